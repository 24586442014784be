//! Import of IETF MUD files (RFC 8520) into profiles.
//!
//! `to-device` ACL entries that accept traffic initiated toward the device become allowed
//! inbound ports (the device's port is the entry's destination port); `from-device`
//! entries naming `ietf-acldns:dst-dnsname` become allowed domains. Everything the
//! mapping cannot express (manufacturer/controller classes, port ranges wider than
//! 1024, operators other than `eq`/ranges) is reported as a warning, never guessed.

use serde_json::Value;

use portcullis_store::Profile;

/// A MUD file that cannot be imported.
#[derive(Debug, thiserror::Error)]
#[error("MUD file: {0}")]
pub struct MudError(String);

/// The result of an import.
#[derive(Debug, Clone)]
pub struct Imported {
    /// A profile name derived from the MUD URL (its last path segment).
    pub suggested_name: String,
    /// The profile.
    pub profile: Profile,
    /// What was not mapped, and why.
    pub warnings: Vec<String>,
}

fn err(s: impl Into<String>) -> MudError {
    MudError(s.into())
}

/// Imports a MUD file (JSON, RFC 8520 section 8).
pub fn import(bytes: &[u8]) -> Result<Imported, MudError> {
    if bytes.len() > 1 << 20 {
        return Err(err("larger than 1 MiB"));
    }
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| err(format!("not JSON: {e}")))?;
    let mud = doc.get("ietf-mud:mud").ok_or_else(|| err("no \"ietf-mud:mud\" container"))?;
    let url = mud.get("mud-url").and_then(Value::as_str).ok_or_else(|| err("no mud-url"))?;
    let acls = doc
        .get("ietf-access-control-list:acls")
        .and_then(|a| a.get("acl"))
        .and_then(Value::as_array)
        .ok_or_else(|| err("no \"ietf-access-control-list:acls\" acl list"))?;
    let names = |policy: &str| -> Vec<String> {
        mud.get(policy)
            .and_then(|p| p.get("access-lists"))
            .and_then(|a| a.get("access-list"))
            .and_then(Value::as_array)
            .map(|l| {
                l.iter().filter_map(|e| e.get("name").and_then(Value::as_str)).map(str::to_owned).collect()
            })
            .unwrap_or_default()
    };
    let (to_names, from_names) = (names("to-device-policy"), names("from-device-policy"));
    let mut profile = Profile { source: Some(format!("mud:{url}")), ..Profile::default() };
    let mut warnings = Vec::new();
    for acl in acls {
        let name = acl.get("name").and_then(Value::as_str).unwrap_or("");
        let to_device = to_names.iter().any(|n| n == name);
        let from_device = from_names.iter().any(|n| n == name);
        if !to_device && !from_device {
            warnings.push(format!("ACL {name:?} is not referenced by either policy; ignored"));
            continue;
        }
        let aces = acl.get("aces").and_then(|a| a.get("ace")).and_then(Value::as_array);
        for ace in aces.into_iter().flatten() {
            let ace_name = ace.get("name").and_then(Value::as_str).unwrap_or("?");
            let accept = ace.pointer("/actions/forwarding").and_then(Value::as_str) == Some("accept");
            if !accept {
                continue;
            }
            let m = ace.get("matches").cloned().unwrap_or(Value::Null);
            if let Some(k) = m.get("ietf-mud:mud").and_then(Value::as_object).and_then(|o| o.keys().next()) {
                warnings.push(format!("ACE {ace_name}: MUD class {k:?} has no profile equivalent; ignored"));
            }
            if from_device {
                for ip in ["ipv4", "ipv6"] {
                    if let Some(d) =
                        m.get(ip).and_then(|v| v.get("ietf-acldns:dst-dnsname")).and_then(Value::as_str)
                    {
                        profile.domains.push(d.to_owned());
                    }
                }
            }
            if to_device {
                for (proto, list) in [("tcp", &mut profile.tcp), ("udp", &mut profile.udp)] {
                    let Some(p) = m.get(proto) else { continue };
                    // Replies to connections the device opened are not listening ports.
                    if p.get("ietf-mud:direction-initiated").and_then(Value::as_str) == Some("from-device") {
                        continue;
                    }
                    match p.get("destination-port") {
                        Some(port) => list.extend(ports(port, ace_name, &mut warnings)),
                        None => warnings.push(format!(
                            "ACE {ace_name}: {proto} traffic to the device on any port; not mapped (name the ports)"
                        )),
                    }
                }
            }
        }
    }
    let profile = profile.checked().map_err(err)?;
    let suggested_name = url
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("mud")
        .trim_end_matches(".json")
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' })
        .take(64)
        .collect::<String>();
    Ok(Imported { suggested_name, profile, warnings })
}

fn ports(v: &Value, ace: &str, warnings: &mut Vec<String>) -> Vec<u16> {
    let num =
        |k: &str| v.get(k).and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0);
    if let (Some(lo), Some(hi)) = (num("lower-port"), num("upper-port")) {
        if hi < lo || hi - lo > 1024 {
            warnings.push(format!("ACE {ace}: port range {lo}-{hi} too wide to allow; ignored"));
            return Vec::new();
        }
        return (lo..=hi).collect();
    }
    match (v.get("operator").and_then(Value::as_str).unwrap_or("eq"), num("port")) {
        ("eq", Some(p)) => vec![p],
        (op, p) => {
            warnings.push(format!("ACE {ace}: port match {op} {p:?} not mapped; ignored"));
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junk_is_an_error_not_a_panic() {
        for junk in [&b""[..], b"[]", b"{}", b"{\"ietf-mud:mud\":{}}", b"\xff\xfe"] {
            assert!(import(junk).is_err());
        }
    }
}

#[cfg(test)]
mod example {
    #[test]
    fn the_example_mud_file_maps_to_ports_and_domains() {
        let text = include_bytes!("../../../examples/mud/acme-cam.json");
        let i = super::import(text).unwrap();
        assert_eq!(i.suggested_name, "acme-cam-2000");
        // 8443 comes from a local-networks class entry: mapped, with a warning about the class.
        assert_eq!(i.profile.tcp, vec![443, 554, 8443]);
        assert_eq!(i.profile.udp, vec![3702]);
        assert_eq!(i.profile.domains, vec!["cloud.acme.example", "pool.ntp.org"]);
        assert_eq!(i.profile.source.as_deref(), Some("mud:https://mud.acme.example/acme-cam-2000.json"));
        assert!(i.warnings.iter().any(|w| w.contains("local-networks")), "{:?}", i.warnings);
        // The dropped telnet entry is not allowed.
        assert!(!i.profile.allows_tcp(23));
    }
}
