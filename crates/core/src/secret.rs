use std::fmt;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// `N` bytes from the operating system's CSPRNG.
///
/// # Panics
/// If the operating system cannot provide randomness, which leaves nothing safe to do.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    #[allow(clippy::expect_used)]
    SystemRandom::new().fill(&mut out).expect("operating system randomness is unavailable");
    out
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SHA-256 of a certificate's DER encoding, lowercase hex. Safe to log.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// The fingerprint of `der`.
    pub fn of(der: &[u8]) -> Self {
        Self(hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref()))
    }

    /// Wraps a stored fingerprint.
    pub fn from_hex(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// Lowercase hex.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.0)
    }
}

/// A certificate serial number as lowercase hex without leading zeros, the form
/// `openssl x509 -serial` and `openssl crl -text` print (modulo case).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Serial(String);

impl Serial {
    /// From the big-endian bytes of a serial number.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let h = hex(bytes);
        let t = h.trim_start_matches('0');
        Self(if t.is_empty() { "0".to_owned() } else { t.to_owned() })
    }

    /// Parses hex (any case, optional `0x` or `:` separators), as an operator might paste it.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim().trim_start_matches("0x").replace(':', "").to_ascii_lowercase();
        if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let t = s.trim_start_matches('0');
        Some(Self(if t.is_empty() { "0".into() } else { t.to_owned() }))
    }

    /// Big-endian bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let s = if self.0.len() % 2 == 1 { format!("0{}", self.0) } else { self.0.clone() };
        (0..s.len()).step_by(2).filter_map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
    }

    /// Lowercase hex.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({})", self.0)
    }
}

/// A bearer secret (enrollment token, admin token). Its `Debug` never shows the value;
/// only its [`TokenHash`] is ever stored.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A fresh token with 256 bits of entropy and a recognisable prefix.
    pub fn generate(prefix: &str) -> Self {
        use std::fmt::Write;
        let bytes = random_bytes::<32>();
        let mut s = String::with_capacity(prefix.len() + 1 + 64);
        s.push_str(prefix);
        s.push('_');
        for b in bytes {
            let _ = write!(s, "{b:02x}");
        }
        Self(s)
    }

    /// Wraps a token presented by a client.
    pub fn from_presented(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself. Call only to hand it to its owner.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The value stored in place of the token.
    pub fn hash(&self) -> TokenHash {
        // Tokens carry 256 random bits, so a plain SHA-256 is preimage-resistant enough;
        // a password hash would only slow down enrollment storms.
        TokenHash(ring::digest::digest(&ring::digest::SHA256, self.0.as_bytes()).as_ref().to_vec())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// SHA-256 of a [`Token`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TokenHash(Vec<u8>);

impl TokenHash {
    /// From stored bytes.
    pub fn from_bytes(b: Vec<u8>) -> Self {
        Self(b)
    }

    /// The stored bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Compares in constant time.
    pub fn matches(&self, other: &TokenHash) -> bool {
        self.0.len() == other.0.len()
            && self.0.iter().zip(&other.0).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

/// Parses a human duration such as `30d`, `24h`, `90s` or `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_forms() {
        let s = Serial::from_bytes(&[0x00, 0x0a, 0xbc]);
        assert_eq!(s.as_str(), "abc");
        assert_eq!(Serial::parse("0A:BC"), Some(s.clone()));
        assert_eq!(s.to_bytes(), vec![0x0a, 0xbc]);
        assert_eq!(Serial::parse("xyz"), None);
    }

    #[test]
    fn token_is_redacted_and_hashed() {
        let t = Token::generate("pct");
        assert!(t.expose().starts_with("pct_"));
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        assert!(t.hash().matches(&Token::from_presented(t.expose()).hash()));
        assert!(!t.hash().matches(&Token::generate("pct").hash()));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap(), Duration::from_secs(30 * 86400));
        assert!(parse_duration("soon").is_err());
    }
}
