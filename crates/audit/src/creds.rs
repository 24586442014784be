//! Default credentials: the pairs IoT malware tries, and vendor defaults.

use serde::{Deserialize, Serialize};

/// A user name and password to try. The password never leaves the prober: findings say
/// only which user was accepted, and `Debug` redacts it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credential {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}:<redacted>)", self.user)
    }
}

/// The credential table of the Mirai scanner (`mirai/bot/scanner.c`, 2016), in its order.
pub const MIRAI: &[(&str, &str)] = &[
    ("root", "xc3511"),
    ("root", "vizxv"),
    ("root", "admin"),
    ("admin", "admin"),
    ("root", "888888"),
    ("root", "xmhdipc"),
    ("root", "default"),
    ("root", "juantech"),
    ("root", "123456"),
    ("root", "54321"),
    ("support", "support"),
    ("root", ""),
    ("admin", "password"),
    ("root", "root"),
    ("root", "12345"),
    ("user", "user"),
    ("admin", ""),
    ("root", "pass"),
    ("admin", "admin1234"),
    ("root", "1111"),
    ("admin", "smcadmin"),
    ("admin", "1111"),
    ("root", "666666"),
    ("root", "password"),
    ("root", "1234"),
    ("root", "klv123"),
    ("Administrator", "admin"),
    ("service", "service"),
    ("supervisor", "supervisor"),
    ("guest", "guest"),
    ("guest", "12345"),
    ("admin1", "password"),
    ("administrator", "1234"),
    ("666666", "666666"),
    ("888888", "888888"),
    ("ubnt", "ubnt"),
    ("root", "klv1234"),
    ("root", "Zte521"),
    ("root", "hi3518"),
    ("root", "jvbzd"),
    ("root", "anko"),
    ("root", "zlxx."),
    ("root", "7ujMko0vizxv"),
    ("root", "7ujMko0admin"),
    ("root", "system"),
    ("root", "ikwb"),
    ("root", "dreambox"),
    ("root", "user"),
    ("root", "realtek"),
    ("root", "00000000"),
    ("admin", "1111111"),
    ("admin", "1234"),
    ("admin", "12345"),
    ("admin", "54321"),
    ("admin", "123456"),
    ("admin", "7ujMko0admin"),
    ("admin", "pass"),
    ("admin", "meinsm"),
    ("tech", "tech"),
    ("mother", "fucker"),
];

/// Vendor defaults seen on cameras, routers and brokers beyond Mirai's table.
pub const VENDOR: &[(&str, &str)] = &[
    ("admin", "12345"),    // Hikvision (older firmware)
    ("admin", "admin123"), // various NVRs
    ("admin", "9999"),     // Samsung/Hanwha DVRs
    ("root", "ismart12"),  // Mitsubishi/other embedded
    ("root", "GM8182"),    // Grain Media camera boards
    ("root", "vizxv"),     // Dahua
    ("pi", "raspberry"),   // Raspberry Pi OS before 2022
    ("ubnt", "ubnt"),      // Ubiquiti
    ("cisco", "cisco"),    // Cisco small business
    ("admin", "changeme"), // assorted appliances
    ("guest", ""),         // brokers with an empty guest
    ("mqtt", "mqtt"),      // MQTT brokers
    ("admin", "public"),   // HiveMQ/other broker samples
    ("user", "password"),  // sample configurations
    ("operator", "operator"),
];

/// The built-in list: vendor defaults first (they are cheap and common), then Mirai's
/// table, without repeats.
pub fn built_in() -> Vec<Credential> {
    let mut out: Vec<Credential> = Vec::new();
    for (u, p) in VENDOR.iter().chain(MIRAI) {
        if !out.iter().any(|c| c.user == *u && c.password == *p) {
            out.push(Credential { user: (*u).into(), password: (*p).into() });
        }
    }
    out
}

/// Parses an operator list: `user:password` per line, `#` comments; the first `:`
/// separates (passwords may contain `:`).
pub fn parse_list(text: &str) -> Result<Vec<Credential>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let (u, p) = line.split_once(':').ok_or_else(|| format!("line {}: expected user:password", i + 1))?;
        if u.is_empty() || u.len() > 128 || p.len() > 128 {
            return Err(format!("line {}: user empty or a field over 128 bytes", i + 1));
        }
        out.push(Credential { user: u.into(), password: p.into() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists() {
        assert_eq!(MIRAI.len(), 60);
        let b = built_in();
        assert!(b.len() > 60 && b.len() < MIRAI.len() + VENDOR.len());
        let l = parse_list("# mine\nadmin:pa:ss\n\nops:\n").unwrap();
        assert_eq!(l[0].password, "pa:ss");
        assert_eq!(l[1].password, "");
        assert!(parse_list("nocolon").is_err());
        assert!(!format!("{:?}", l[0]).contains("pa:ss"));
    }
}
