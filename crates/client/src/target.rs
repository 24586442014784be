//! A published firmware image as both sides see it: the server's repository lists them,
//! the device's updater picks one from signed targets metadata.

use serde::{Deserialize, Serialize};

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
