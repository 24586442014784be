//! The DNS port: policies from the configuration, lists read from their files.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use portcullis_dns::{DomainSet, Policy, PolicyTable};
use tokio::net::{TcpListener, UdpSocket};

use crate::config::DnsConfig;

/// Reads every list and builds the policies; any unreadable list fails the whole table
/// (the caller keeps the previous one). Junk lines are counted and logged, never fatal.
pub fn policy_table(cfg: &DnsConfig) -> anyhow::Result<PolicyTable> {
    let mut lists: HashMap<&str, Arc<DomainSet>> = HashMap::new();
    for (name, path) in &cfg.lists {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("dns list {name:?}: cannot read {}", path.display()))?;
        let (set, stats) = DomainSet::parse(&text);
        tracing::info!(list = %name, path = %path.display(), entries = stats.entries, comments = stats.comments,
            junk = stats.junk, "dns list loaded");
        if stats.junk > 0 {
            tracing::warn!(list = %name, junk = stats.junk, examples = ?stats.junk_examples,
                "dns list has lines that are no rule; skipped");
        }
        lists.insert(name, Arc::new(set));
    }
    let mut table = PolicyTable::default();
    let mut by_name: HashMap<&str, Arc<Policy>> = HashMap::new();
    for p in &cfg.policies {
        let rules = |what: &str, rules: &[String]| -> anyhow::Result<DomainSet> {
            let mut set = DomainSet::new();
            for r in rules {
                anyhow::ensure!(
                    set.add_rule(r),
                    "dns policy {:?}: {what} rule {r:?} is not a domain",
                    p.name
                );
            }
            Ok(set)
        };
        let policy = Arc::new(Policy {
            name: p.name.clone(),
            mode: p.mode,
            lists: p
                .lists
                .iter()
                .filter_map(|l| lists.get(l.as_str()).map(|s| (l.clone(), s.clone())))
                .collect(),
            allow: rules("allow", &p.allow)?,
            deny: rules("deny", &p.deny)?,
            block: p.block,
        });
        if p.mode == portcullis_dns::Mode::Allowlist {
            tracing::info!(policy = %p.name, groups = ?p.groups,
                "dns policy in allowlist mode: every name not on its lists or allow rules is DENIED");
        }
        for g in &p.groups {
            table.by_group.insert(g.clone(), policy.clone());
        }
        by_name.insert(&p.name, policy);
    }
    table.default = cfg.default_policy.as_deref().and_then(|n| by_name.get(n).cloned());
    table.unknown = cfg.unknown_clients.as_deref().and_then(|n| by_name.get(n).cloned());
    Ok(table)
}

/// Binds UDP and TCP on the same address (port 0: one free port for both).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<(UdpSocket, TcpListener)> {
    for _ in 0..20 {
        let udp = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("cannot bind the DNS port (udp) to {addr}"))?;
        let bound = udp.local_addr()?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(_) if addr.port() == 0 => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot bind the DNS port (tcp) to {addr}")),
        }
    }
    anyhow::bail!("no port free for DNS on both UDP and TCP at {addr}")
}
