//! Management commands: they reach the running server through its admin API, or, when
//! none runs, the same API in-process over the data dir.

use anyhow::Context;
use portcullis_admin::AdminClient;
use serde_json::Value;

use crate::config::Config;
use crate::instance::Instance;
use crate::node::{Node, Open};

pub async fn client(cfg: &Config) -> anyhow::Result<AdminClient> {
    let inst = Instance::new(&cfg.data_dir);
    if inst.is_initialised()
        && let Some(addr) = inst.admin_addr()
        && tokio::net::TcpStream::connect(addr).await.is_ok()
    {
        return Ok(AdminClient::remote(addr, inst.admin_token()?));
    }
    // No server: the same assembly as `portcullis up`, serving the admin API in-process.
    let node = Node::open(cfg, Open::Existing).await?;
    let token = node.inst.admin_token()?;
    let router = node.admin(portcullis_admin::AdminToken::new(&token), "cli", None);
    Ok(AdminClient::local(router, token, node.lock))
}

/// Pretty JSON on stdout (`--json`).
pub(crate) fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub async fn device_add(
    c: &AdminClient,
    id: &str,
    group: Option<&str>,
    ttl: Option<&str>,
    as_json: bool,
) -> anyhow::Result<()> {
    let r = c.register_device(id, group, ttl).await?;
    if as_json {
        print_json(&r);
    } else {
        eprintln!(
            "device {} registered in group {}; one-time enrollment token below (shown once, expires {}):",
            r.device.id, r.device.group, r.token_expires_at
        );
        println!("{}", r.token);
    }
    Ok(())
}

pub async fn device_token(c: &AdminClient, id: &str, ttl: Option<&str>, as_json: bool) -> anyhow::Result<()> {
    let r = c.new_token(id, ttl).await?;
    if as_json {
        print_json(&r);
    } else {
        eprintln!("new one-time enrollment token for {id} (shown once, expires {}):", r.token_expires_at);
        println!("{}", r.token);
    }
    Ok(())
}

pub async fn device_list(c: &AdminClient, as_json: bool) -> anyhow::Result<()> {
    let r = c.devices().await?;
    if as_json {
        print_json(&r);
        return Ok(());
    }
    println!("{:<24} {:<16} {:<10} {:>5}  CERT EXPIRES", "ID", "GROUP", "STATE", "CERTS");
    for d in &r.devices {
        println!(
            "{:<24} {:<16} {:<10} {:>5}  {}",
            d.id.as_str(),
            d.group.as_str(),
            d.state.to_string(),
            d.certificates,
            d.cert_not_after.map_or_else(|| "-".to_owned(), rfc3339)
        );
    }
    Ok(())
}

pub async fn device_show(c: &AdminClient, id: &str, as_json: bool) -> anyhow::Result<()> {
    let r = c.device(id).await?;
    if as_json {
        print_json(&r);
        return Ok(());
    }
    let d = &r.device;
    println!("id:          {}", d.id);
    println!("spiffe id:   {}", r.spiffe_id);
    println!("group:       {}", d.group);
    println!("state:       {}", d.state);
    if let Some(reason) = &d.state_reason {
        println!("reason:      {reason}");
    }
    println!("registered:  {}", rfc3339(d.created_at));
    println!("certificates:");
    for c in &r.certificates {
        println!(
            "  {}  {:<8} {} .. {}  sha256:{}",
            c.serial,
            c.state.to_string(),
            rfc3339(c.not_before),
            rfc3339(c.not_after),
            c.fingerprint
        );
    }
    Ok(())
}

pub async fn device_state(
    c: &AdminClient,
    id: &str,
    action: &str,
    reason: Option<&str>,
) -> anyhow::Result<()> {
    let r = c.change_device(id, action, reason).await?;
    println!("device {} is now {}", r.device.id, r.device.state);
    Ok(())
}

pub async fn device_addresses(
    c: &AdminClient,
    id: &str,
    addresses: Vec<String>,
    clear: bool,
) -> anyhow::Result<()> {
    let device = if addresses.is_empty() && !clear {
        c.device(id).await?.device
    } else {
        c.set_addresses(id, &addresses).await?.device
    };
    if device.addresses.is_empty() {
        println!("device {id} has no addresses (its DNS queries are an unknown client's)");
    } else {
        println!("device {id} addresses: {}", device.addresses.join(" "));
    }
    Ok(())
}

fn dns_query(device: Option<&str>, blocked: bool, since: Option<&str>, limit: Option<u32>) -> String {
    let mut q: Vec<String> = Vec::new();
    if let Some(d) = device {
        q.push(format!("device={}", portcullis_admin::component(d)));
    }
    if blocked {
        q.push("blocked=true".into());
    }
    if let Some(s) = since {
        q.push(format!("since={}", portcullis_admin::component(s)));
    }
    if let Some(l) = limit {
        q.push(format!("limit={l}"));
    }
    if q.is_empty() { String::new() } else { format!("?{}", q.join("&")) }
}

pub async fn dns_log(
    c: &AdminClient,
    device: Option<&str>,
    blocked: bool,
    since: Option<&str>,
    limit: Option<u32>,
    as_json: bool,
) -> anyhow::Result<()> {
    let r = c.dns_log(&dns_query(device, blocked, since, limit)).await?;
    if as_json {
        print_json(&r);
        return Ok(());
    }
    for q in &r.queries {
        println!(
            "{} {:<15} {:<16} {:<40} {:<5} {:<8} {:<9} {}",
            rfc3339(q.at),
            q.client,
            q.device.as_deref().unwrap_or("-"),
            q.name,
            q.qtype,
            q.action,
            q.rcode,
            q.reason
        );
    }
    Ok(())
}

pub async fn dns_policies(c: &AdminClient, as_json: bool) -> anyhow::Result<()> {
    let r = c.dns_policies().await?;
    if as_json {
        print_json(&r);
        return Ok(());
    }
    let names = |v: &[String]| if v.is_empty() { "-".to_owned() } else { v.join(", ") };
    println!("queries from no known device: {}", r.unknown_clients);
    for p in &r.policies {
        println!("policy {} ({})", p.name, json_word(&p.mode));
        println!("  groups: {}   devices: {}", names(&p.groups), names(&p.devices));
        println!("  lists: {}   allow: {}   deny: {}", names(&p.lists), names(&p.allow), names(&p.deny));
        println!("  blocked names get: {}", json_word(&p.block));
        println!("  every other name: {}", p.everything_else);
    }
    for l in &r.lists {
        let from = l.url.as_deref().or(l.file.as_deref()).unwrap_or("-");
        println!(
            "list {}: {} rules, {} comments, {} junk lines skipped, refreshed every {} s, from {from}",
            l.name, l.rules, l.comments, l.junk, l.refresh_s
        );
    }
    Ok(())
}

pub async fn dns_top(
    c: &AdminClient,
    device: Option<&str>,
    since: Option<&str>,
    limit: Option<u32>,
    as_json: bool,
) -> anyhow::Result<()> {
    let r = c.dns_top_blocked(&dns_query(device, false, since, limit)).await?;
    if as_json {
        print_json(&r);
        return Ok(());
    }
    for b in &r.top_blocked {
        println!("{:>8}  {:<16} {}", b.count, b.device.as_deref().unwrap_or("-"), b.name);
    }
    Ok(())
}

pub async fn events(c: &AdminClient, device: Option<&str>, as_json: bool) -> anyhow::Result<()> {
    let r = c.events(device).await?;
    if as_json {
        print_json(&r);
        return Ok(());
    }
    for e in &r.events {
        println!(
            "{:>6} {} {:<22} {:<20} {:<16} {}",
            e.id,
            rfc3339(e.at),
            e.kind,
            e.actor,
            e.device.as_deref().unwrap_or("-"),
            e.detail
        );
    }
    Ok(())
}

pub async fn pem(c: &AdminClient, path: &str) -> anyhow::Result<()> {
    let text = c.get_text(path).await.context("cannot fetch from the admin API")?;
    print!("{text}");
    Ok(())
}

pub async fn gateway_routes(c: &AdminClient, as_json: bool) -> anyhow::Result<()> {
    let r = c.gateway_routes().await?;
    if as_json {
        print_json(&r);
        return Ok(());
    }
    println!(
        "{:<20} {:<28} {:<16} {:>10}  REJECTED (by reason), LOGGED",
        "PREFIX", "UPSTREAM", "GROUPS", "FORWARDED"
    );
    for route in &r.routes {
        let rejected: Vec<String> = route
            .counts
            .iter()
            .filter(|(k, n)| k.as_str() != "forwarded" && **n > 0)
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        println!(
            "{:<20} {:<28} {:<16} {:>10}  {}",
            route.prefix,
            route.upstream,
            if route.groups.is_empty() { "*".to_owned() } else { route.groups.join(",") },
            route.counts.get("forwarded").copied().unwrap_or(0),
            if rejected.is_empty() { "-".to_owned() } else { rejected.join(" ") }
        );
        if let Some(doc) = &route.openapi {
            println!(
                "{:<20} openapi {doc} (OpenAPI {}, {} operations under {}, action {}{})",
                "",
                route.openapi_version.as_deref().unwrap_or("-"),
                route.operations.unwrap_or(0),
                route.openapi_base.as_deref().unwrap_or("-"),
                json_word(&route.action),
                if route.strict_query { ", strict query" } else { "" }
            );
        }
    }
    Ok(())
}

/// Asks the running server to re-read its configuration. With `--config`, the server
/// refuses unless that is the file it runs with (it cannot adopt another one).
pub async fn gateway_reload(c: &AdminClient, config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let asked = match config {
        Some(p) => Some(std::path::absolute(p).with_context(|| format!("--config {}", p.display()))?),
        None => None,
    };
    let r = c.reload(asked.as_deref()).await?;
    let from = match &r.config {
        Some(p) => format!("from {p}"),
        None => "(embedded defaults: the server runs without a config file)".to_owned(),
    };
    println!("reloaded: {} routes {from}", r.routes);
    Ok(())
}

/// `portcullis cert show SERIAL`.
pub async fn cert_show(c: &AdminClient, serial: &str, as_json: bool, pem_only: bool) -> anyhow::Result<()> {
    let r = c.certificate(serial).await?;
    let cert = &r.certificate;
    if pem_only {
        print!("{}", r.pem);
    } else if as_json {
        print_json(&r);
    } else {
        println!("serial      {}", cert.serial);
        println!("device      {} ({}, group {})", cert.device, r.device_state, r.group);
        println!("state       {}", cert.state);
        println!("issued      {} via {}", rfc3339(cert.issued_at), cert.issued_via);
        println!("valid       {} .. {}", rfc3339(cert.not_before), rfc3339(cert.not_after));
        println!("fingerprint {}", cert.fingerprint);
        if let Some(at) = cert.revoked_at {
            println!(
                "revoked     {} ({}): {}",
                rfc3339(at),
                cert.crl_reason.as_deref().unwrap_or("-"),
                cert.revocation_reason.as_deref().unwrap_or("-")
            );
        }
        if let Some(next) = &cert.superseded_by {
            println!("superseded  by {next}");
        }
    }
    Ok(())
}

/// `portcullis cert revoke SERIAL --reason R`.
pub async fn cert_revoke(
    c: &AdminClient,
    serial: &str,
    reason: &str,
    note: Option<&str>,
) -> anyhow::Result<()> {
    let r = c.revoke_certificate(serial, reason, note).await?;
    println!(
        "certificate {} of device {} revoked ({reason}); the CRL is re-signed",
        r.certificate.serial, r.certificate.device
    );
    Ok(())
}

/// A timestamp as the admin API writes it (RFC 3339).
fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// A unit enum as the API spells it (`blocklist`, `nxdomain`, `block`).
pub(crate) fn json_word(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => "-".to_owned(),
    }
}
