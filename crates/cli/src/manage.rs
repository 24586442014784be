//! Management commands: they reach the running server through its admin API, or, when
//! none runs, the same API in-process over the data dir.

use anyhow::Context;
use portcullis_admin::AdminClient;
use serde_json::{Value, json};

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

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("-")
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
    let r = c.get(&format!("/v1/dns/log{}", dns_query(device, blocked, since, limit))).await?;
    if as_json {
        print_json(&r);
        return Ok(());
    }
    for q in r["queries"].as_array().into_iter().flatten() {
        println!(
            "{} {:<15} {:<16} {:<40} {:<5} {:<8} {:<9} {}",
            s(q, "at"),
            s(q, "client"),
            q.get("device").and_then(Value::as_str).unwrap_or("-"),
            s(q, "name"),
            s(q, "qtype"),
            s(q, "action"),
            s(q, "rcode"),
            s(q, "reason")
        );
    }
    Ok(())
}

pub async fn dns_policies(c: &AdminClient, as_json: bool) -> anyhow::Result<()> {
    let r = c.get("/v1/dns/policies").await?;
    if as_json {
        print_json(&r);
        return Ok(());
    }
    let names = |v: &Value| -> String {
        let items: Vec<&str> = v.as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        if items.is_empty() { "-".into() } else { items.join(", ") }
    };
    println!("queries from no known device: {}", s(&r, "unknown_clients"));
    for p in r["policies"].as_array().into_iter().flatten() {
        println!("policy {} ({})", s(p, "name"), s(p, "mode"));
        println!("  groups: {}   devices: {}", names(&p["groups"]), names(&p["devices"]));
        println!(
            "  lists: {}   allow: {}   deny: {}",
            names(&p["lists"]),
            names(&p["allow"]),
            names(&p["deny"])
        );
        println!("  blocked names get: {}", s(p, "block"));
        println!("  every other name: {}", s(p, "everything_else"));
    }
    for l in r["lists"].as_array().into_iter().flatten() {
        let from = l.get("url").or_else(|| l.get("file")).and_then(Value::as_str).unwrap_or("-");
        println!(
            "list {}: {} rules, {} comments, {} junk lines skipped, refreshed every {} s, from {from}",
            s(l, "name"),
            l["rules"].as_u64().unwrap_or(0),
            l["comments"].as_u64().unwrap_or(0),
            l["junk"].as_u64().unwrap_or(0),
            l["refresh_s"].as_u64().unwrap_or(0)
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
    let r = c.get(&format!("/v1/dns/top-blocked{}", dns_query(device, false, since, limit))).await?;
    if as_json {
        print_json(&r);
        return Ok(());
    }
    for b in r["top_blocked"].as_array().into_iter().flatten() {
        println!(
            "{:>8}  {:<16} {}",
            b["count"].as_u64().unwrap_or(0),
            b.get("device").and_then(Value::as_str).unwrap_or("-"),
            s(b, "name")
        );
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
    let r = c.get("/v1/gateway/routes").await?;
    if as_json {
        print_json(&r);
        return Ok(());
    }
    println!(
        "{:<20} {:<28} {:<16} {:>10}  REJECTED (by reason), LOGGED",
        "PREFIX", "UPSTREAM", "GROUPS", "FORWARDED"
    );
    for route in r["routes"].as_array().into_iter().flatten() {
        let counts = &route["counts"];
        let rejected: Vec<String> = counts
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| k.as_str() != "forwarded" && v.as_u64().unwrap_or(0) > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let groups: Vec<&str> =
            route["groups"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        println!(
            "{:<20} {:<28} {:<16} {:>10}  {}",
            s(route, "prefix"),
            s(route, "upstream"),
            if groups.is_empty() { "*".to_owned() } else { groups.join(",") },
            counts["forwarded"].as_u64().unwrap_or(0),
            if rejected.is_empty() { "-".to_owned() } else { rejected.join(" ") }
        );
        if let Some(doc) = route["openapi"].as_str() {
            println!(
                "{:<20} openapi {doc} (OpenAPI {}, {} operations under {}, action {}{})",
                "",
                s(route, "openapi_version"),
                route["operations"].as_u64().unwrap_or(0),
                s(route, "openapi_base"),
                s(route, "action"),
                if route["strict_query"] == true { ", strict query" } else { "" }
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
    let r = c.post("/v1/gateway/reload", &json!({ "config": asked })).await?;
    let from = match r["config"].as_str() {
        Some(p) => format!("from {p}"),
        None => "(embedded defaults: the server runs without a config file)".to_owned(),
    };
    println!("reloaded: {} routes {from}", r["routes"].as_u64().unwrap_or(0));
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
