//! Device profiles (a record the registry keeps for the audit and DNS): what a kind of
//! device may expose and reach.

use serde::{Deserialize, Serialize};

/// What a kind of device may expose (listening ports, which must speak TLS) and reach
/// (outbound domains, which the DNS allowlist policy reads too).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// TCP ports the device may listen on.
    #[serde(default)]
    pub tcp: Vec<u16>,
    /// UDP ports the device may listen on (recorded; the audit's scan is TCP).
    #[serde(default)]
    pub udp: Vec<u16>,
    /// Domains the device may resolve and reach (a name covers its subdomains).
    #[serde(default)]
    pub domains: Vec<String>,
    /// TCP ports whose service must speak TLS.
    #[serde(default)]
    pub tls_required: Vec<u16>,
    /// Where the profile came from (e.g. the MUD URL it was imported from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Checks a profile name: 1–64 of `a-z 0-9 . _ -`, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!("profile name {name:?}: use 1-64 of a-z 0-9 . _ -, starting with a letter or digit"))
    }
}

impl Profile {
    /// Parses and checks a profile document (JSON or TOML text).
    pub fn parse(text: &str) -> Result<Self, String> {
        let p: Self = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| format!("profile: {e}"))?
        } else {
            return Err("profile: expected a JSON object (the CLI converts TOML)".into());
        };
        p.checked()
    }

    /// Validates and normalises (sorted, deduplicated, lower-case domains).
    pub fn checked(mut self) -> Result<Self, String> {
        for list in [&self.tcp, &self.udp, &self.tls_required] {
            if list.contains(&0) {
                return Err("profile: port 0 is not a port".into());
            }
        }
        for d in &mut self.domains {
            let name = d.trim().trim_end_matches('.').trim_start_matches("*.").to_ascii_lowercase();
            let valid = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !valid {
                return Err(format!("profile: {d:?} is not a domain name"));
            }
            *d = name;
        }
        for v in [&mut self.tcp, &mut self.udp, &mut self.tls_required] {
            v.sort_unstable();
            v.dedup();
        }
        self.domains.sort();
        self.domains.dedup();
        Ok(self)
    }

    /// True if the device may listen on TCP `port`.
    pub fn allows_tcp(&self, port: u16) -> bool {
        self.tcp.binary_search(&port).is_ok()
    }

    /// True if the service on TCP `port` must speak TLS.
    pub fn requires_tls(&self, port: u16) -> bool {
        self.tls_required.binary_search(&port).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_normalise_and_refuse_nonsense() {
        let p =
            Profile::parse(r#"{"tcp":[554,443,443],"domains":["Cloud.Vendor.example.","*.cdn.example"]}"#)
                .unwrap();
        assert_eq!(p.tcp, vec![443, 554]);
        assert_eq!(p.domains, vec!["cdn.example", "cloud.vendor.example"]);
        assert!(p.allows_tcp(554) && !p.allows_tcp(23));
        assert!(Profile::parse(r#"{"tcp":[0]}"#).is_err());
        assert!(Profile::parse(r#"{"tcp":[70000]}"#).is_err());
        assert!(Profile::parse(r#"{"domains":["bad name"]}"#).is_err());
        assert!(Profile::parse(r#"{"tpc":[1]}"#).unwrap_err().contains("unknown field"));
        assert!(check_name("camera-v2").is_ok());
        assert!(check_name("../etc").is_err());
    }
}
