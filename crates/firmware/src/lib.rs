//! Signed firmware updates on The Update Framework (TUF 1.0).
//!
//! - [`repo`]: the server's repository — Ed25519 keys per role, consistent snapshots,
//!   expiry per role, re-signing of snapshot and timestamp, root rotation — built and
//!   signed by rust-tuf.
//! - [`rollout`]: staged rollouts — deterministic placement of devices into stages by a
//!   hash of their id, exact stage sizes, automatic pause on the failure rate.
//! - [`updater`]: the device side — the TUF client workflow (rust-tuf's client), a
//!   resumable download, length and hash verification, anti-rollback, A/B slots with a
//!   pending state confirmed or rolled back on the next start.

pub mod http;
pub mod repo;
pub mod rollout;
pub mod service;
pub mod updater;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Firmware failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TUF metadata could not be built, signed or verified.
    #[error("TUF: {0}")]
    Tuf(String),
    /// The operation is not allowed; the message says why.
    #[error("{0}")]
    Refused(String),
    /// The caller may not do this (a device reporting on a rollout that did not admit it).
    #[error("{0}")]
    Forbidden(String),
    /// A role key the operation needs is kept offline.
    #[error(
        "the {0} key is kept offline: sign where the key is (`portcullis firmware sign-targets \
         --keys DIR`), then hand the result to the server (`portcullis firmware import-targets`)"
    )]
    KeyOffline(String),
}

impl Error {
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io { action, path: path.to_path_buf(), source }
    }

    pub(crate) fn tuf(e: tuf::Error) -> Self {
        Self::Tuf(e.to_string())
    }
}

/// One published image, as its target's custom metadata describes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetInfo {
    /// TUF target path, `HW/VERSION/NAME`.
    pub path: String,
    /// Hardware model it is built for.
    pub hardware: String,
    /// Its version.
    #[serde(with = "version_str")]
    pub version: semver::Version,
    /// Length in bytes.
    pub length: u64,
    /// SHA-256, hex.
    pub sha256: String,
    /// Release notes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

mod version_str {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &semver::Version, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<semver::Version, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl TargetInfo {
    /// Reads a target description; `None` when its custom metadata does not name a
    /// hardware and a semantic version (not one of ours).
    pub fn from_description(path: &str, desc: &tuf::metadata::TargetDescription) -> Option<Self> {
        let custom = desc.custom();
        let hardware = custom.get("hardware")?.as_str()?.to_owned();
        let version = custom.get("version")?.as_str()?.parse().ok()?;
        let sha256 =
            desc.hashes().get(&tuf::crypto::HashAlgorithm::Sha256).map(|h| hex::encode(h.value()))?;
        Some(Self {
            path: path.to_owned(),
            hardware,
            version,
            length: desc.length(),
            sha256,
            notes: custom.get("notes").and_then(|n| n.as_str()).map(str::to_owned),
        })
    }

    /// Where the image is served under `/firmware/` (consistent snapshot: `DIR/HASH.NAME`).
    pub fn url_path(&self) -> String {
        match self.path.rsplit_once('/') {
            Some((dir, name)) => format!("targets/{dir}/{}.{name}", self.sha256),
            None => format!("targets/{}.{}", self.sha256, self.path),
        }
    }
}

/// A path component that cannot escape its directory.
pub fn safe_component(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 255
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+~".contains(&b))
}

/// Hardware model names: one path component of letters, digits, `._-+~`.
pub fn check_hardware(hw: &str) -> Result<(), Error> {
    if safe_component(hw) {
        Ok(())
    } else {
        Err(Error::Refused(format!("invalid hardware name {hw:?}: use letters, digits and ._-+~")))
    }
}
