use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidName {
    /// The name was empty.
    #[error("{kind} must not be empty")]
    Empty {
        /// What kind of name it was.
        kind: &'static str,
    },
    /// The name was longer than allowed.
    #[error("{kind} is {len} characters long, at most {max} are allowed")]
    TooLong {
        /// What kind of name it was.
        kind: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The name held a character outside its alphabet.
    #[error("{kind} may only contain {allowed} (found {found:?})")]
    BadChar {
        /// What kind of name it was.
        kind: &'static str,
        /// The allowed alphabet, for the message.
        allowed: &'static str,
        /// The offending character.
        found: char,
    },
    /// The name started with a character it may not start with.
    #[error("{kind} must start with a letter or digit")]
    BadStart {
        /// What kind of name it was.
        kind: &'static str,
    },
}

fn check_slug(kind: &'static str, s: &str, max: usize) -> Result<(), InvalidName> {
    if s.is_empty() {
        return Err(InvalidName::Empty { kind });
    }
    if s.len() > max {
        return Err(InvalidName::TooLong { kind, len: s.len(), max });
    }
    if let Some(found) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(InvalidName::BadChar { kind, allowed: "ASCII letters, digits, '-', '_' and '.'", found });
    }
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(InvalidName::BadStart { kind });
    }
    Ok(())
}

macro_rules! slug_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `s` and wraps it.
            pub fn try_new(s: impl Into<String>) -> Result<Self, InvalidName> {
                let s = s.into();
                ($check)($kind, s.as_str(), $max)?;
                Ok(Self(s))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::try_new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::try_new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

slug_type!(
    /// A device identifier: a short slug such as `cam-lobby-01`.
    ///
    /// It becomes the certificate's CN and the last segment of its SPIFFE URI SAN, so it
    /// is restricted to characters that are valid in both.
    DeviceId,
    "device id",
    64,
    check_slug
);

slug_type!(
    /// The name of a device group (`cameras`, `floor-3`).
    GroupName,
    "group name",
    64,
    check_slug
);

fn check_trust_domain(kind: &'static str, s: &str, max: usize) -> Result<(), InvalidName> {
    // SPIFFE trust domains: lowercase letters, digits, '.', '-' and '_'.
    if s.is_empty() {
        return Err(InvalidName::Empty { kind });
    }
    if s.len() > max {
        return Err(InvalidName::TooLong { kind, len: s.len(), max });
    }
    if let Some(found) =
        s.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')))
    {
        return Err(InvalidName::BadChar {
            kind,
            allowed: "lowercase ASCII letters, digits, '-', '_' and '.'",
            found,
        });
    }
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(InvalidName::BadStart { kind });
    }
    Ok(())
}

slug_type!(
    /// A SPIFFE trust domain, the authority part of every device's URI SAN.
    TrustDomain,
    "trust domain",
    255,
    check_trust_domain
);

impl GroupName {
    /// The group a device joins when none is named.
    pub fn default_group() -> Self {
        Self("default".to_owned())
    }
}

impl TrustDomain {
    /// The SPIFFE id of `device` in this trust domain.
    pub fn device_uri(&self, device: &DeviceId) -> String {
        format!("spiffe://{}/device/{}", self.0, device.0)
    }

    /// Extracts the device id from a SPIFFE URI of this trust domain, if it is one.
    pub fn device_from_uri(&self, uri: &str) -> Option<DeviceId> {
        let rest = uri.strip_prefix("spiffe://")?.strip_prefix(self.0.as_str())?;
        let id = rest.strip_prefix("/device/")?;
        DeviceId::try_new(id).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        assert!(DeviceId::try_new("cam-lobby-01").is_ok());
        assert!(DeviceId::try_new("A.b_c-9").is_ok());
        assert!(matches!(DeviceId::try_new(""), Err(InvalidName::Empty { .. })));
        assert!(matches!(DeviceId::try_new("-x"), Err(InvalidName::BadStart { .. })));
        assert!(matches!(DeviceId::try_new("a/b"), Err(InvalidName::BadChar { found: '/', .. })));
        assert!(matches!(DeviceId::try_new("a b"), Err(InvalidName::BadChar { .. })));
        assert!(matches!(DeviceId::try_new("x".repeat(65)), Err(InvalidName::TooLong { .. })));
    }

    #[test]
    fn spiffe_round_trip() {
        let td = TrustDomain::try_new("fleet.example").unwrap();
        let id = DeviceId::try_new("cam-01").unwrap();
        let uri = td.device_uri(&id);
        assert_eq!(uri, "spiffe://fleet.example/device/cam-01");
        assert_eq!(td.device_from_uri(&uri), Some(id));
        assert_eq!(td.device_from_uri("spiffe://other.example/device/cam-01"), None);
        assert_eq!(td.device_from_uri("spiffe://fleet.example.evil/device/cam-01"), None);
        assert_eq!(td.device_from_uri("spiffe://fleet.example/device/a/b"), None);
        assert!(TrustDomain::try_new("Upper.case").is_err());
    }
}
