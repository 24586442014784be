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

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub async fn device_add(
    c: &AdminClient,
    id: &str,
    group: Option<&str>,
    ttl: Option<&str>,
    as_json: bool,
) -> anyhow::Result<()> {
    let r = c.post("/v1/devices", &json!({ "id": id, "group": group, "token_ttl": ttl })).await?;
    if as_json {
        print_json(&r);
    } else {
        let d = &r["device"];
        eprintln!(
            "device {} registered in group {}; one-time enrollment token below (shown once, expires {}):",
            s(d, "id"),
            s(d, "group"),
            s(&r, "token_expires_at")
        );
        println!("{}", s(&r, "token"));
    }
    Ok(())
}

pub async fn device_token(c: &AdminClient, id: &str, ttl: Option<&str>, as_json: bool) -> anyhow::Result<()> {
    let r = c.post(&format!("/v1/devices/{id}/tokens"), &json!({ "ttl": ttl })).await?;
    if as_json {
        print_json(&r);
    } else {
        eprintln!(
            "new one-time enrollment token for {id} (shown once, expires {}):",
            s(&r, "token_expires_at")
        );
        println!("{}", s(&r, "token"));
    }
    Ok(())
}

pub async fn device_list(c: &AdminClient, as_json: bool) -> anyhow::Result<()> {
    let r = c.get("/v1/devices").await?;
    if as_json {
        print_json(&r);
        return Ok(());
    }
    println!("{:<24} {:<16} {:<10} {:>5}  CERT EXPIRES", "ID", "GROUP", "STATE", "CERTS");
    for d in r["devices"].as_array().into_iter().flatten() {
        println!(
            "{:<24} {:<16} {:<10} {:>5}  {}",
            s(d, "id"),
            s(d, "group"),
            s(d, "state"),
            d["certificates"].as_u64().unwrap_or(0),
            d.get("cert_not_after").and_then(Value::as_str).unwrap_or("-")
        );
    }
    Ok(())
}

pub async fn device_show(c: &AdminClient, id: &str, as_json: bool) -> anyhow::Result<()> {
    let r = c.get(&format!("/v1/devices/{id}")).await?;
    if as_json {
        print_json(&r);
        return Ok(());
    }
    let d = &r["device"];
    println!("id:          {}", s(d, "id"));
    println!("spiffe id:   {}", s(&r, "spiffe_id"));
    println!("group:       {}", s(d, "group"));
    println!("state:       {}", s(d, "state"));
    if let Some(reason) = d.get("state_reason").and_then(Value::as_str) {
        println!("reason:      {reason}");
    }
    println!("registered:  {}", s(d, "created_at"));
    println!("certificates:");
    for c in r["certificates"].as_array().into_iter().flatten() {
        println!(
            "  {}  {:<8} {} .. {}  sha256:{}",
            s(c, "serial"),
            s(c, "state"),
            s(c, "not_before"),
            s(c, "not_after"),
            s(c, "fingerprint")
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
    let r = c.post(&format!("/v1/devices/{id}/{action}"), &json!({ "reason": reason })).await?;
    println!("device {} is now {}", s(&r["device"], "id"), s(&r["device"], "state"));
    Ok(())
}

pub async fn device_addresses(
    c: &AdminClient,
    id: &str,
    addresses: Vec<String>,
    clear: bool,
) -> anyhow::Result<()> {
    let r = if addresses.is_empty() && !clear {
        c.get(&format!("/v1/devices/{id}")).await?
    } else {
        c.post(&format!("/v1/devices/{id}/addresses"), &json!({ "addresses": addresses })).await?
    };
    let list: Vec<&str> =
        r["device"]["addresses"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if list.is_empty() {
        println!("device {id} has no addresses (its DNS queries are an unknown client's)");
    } else {
        println!("device {id} addresses: {}", list.join(" "));
    }
    Ok(())
}

fn dns_query(device: Option<&str>, blocked: bool, since: Option<&str>, limit: Option<u32>) -> String {
    let mut q: Vec<String> = Vec::new();
    if let Some(d) = device {
        q.push(format!("device={}", enc(d)));
    }
    if blocked {
        q.push("blocked=true".into());
    }
    if let Some(s) = since {
        q.push(format!("since={}", enc(s)));
    }
    if let Some(l) = limit {
        q.push(format!("limit={l}"));
    }
    if q.is_empty() { String::new() } else { format!("?{}", q.join("&")) }
}

fn enc(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
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
    let path = match device {
        Some(d) => format!("/v1/events?device={d}"),
        None => "/v1/events".to_owned(),
    };
    let r = c.get(&path).await?;
    if as_json {
        print_json(&r);
        return Ok(());
    }
    for e in r["events"].as_array().into_iter().flatten() {
        println!(
            "{:>6} {} {:<22} {:<20} {:<16} {}",
            e["id"].as_i64().unwrap_or(0),
            s(e, "at"),
            s(e, "kind"),
            s(e, "actor"),
            e.get("device").and_then(Value::as_str).unwrap_or("-"),
            e["detail"]
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
    let r = c.get(&format!("/v1/certificates/{serial}")).await?;
    if pem_only {
        print!("{}", s(&r, "pem"));
    } else if as_json {
        print_json(&r);
    } else {
        println!("serial      {}", s(&r, "serial"));
        println!("device      {} ({}, group {})", s(&r, "device"), s(&r, "device_state"), s(&r, "group"));
        println!("state       {}", s(&r, "state"));
        println!("issued      {} via {}", s(&r, "issued_at"), s(&r, "issued_via"));
        println!("valid       {} .. {}", s(&r, "not_before"), s(&r, "not_after"));
        println!("fingerprint {}", s(&r, "fingerprint"));
        if r["state"] == "revoked" {
            println!(
                "revoked     {} ({}): {}",
                s(&r, "revoked_at"),
                s(&r, "crl_reason"),
                s(&r, "revocation_reason")
            );
        }
        if let Some(next) = r["superseded_by"].as_str() {
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
    let r = c
        .post(&format!("/v1/certificates/{serial}/revoke"), &json!({ "reason": reason, "note": note }))
        .await?;
    let cert = &r["certificate"];
    println!(
        "certificate {} of device {} revoked ({reason}); the CRL is re-signed",
        s(cert, "serial"),
        s(cert, "device")
    );
    Ok(())
}
