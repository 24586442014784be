//! Signed firmware updates on The Update Framework (TUF 1.0).
//!
//! - [`repo`]: the server's repository — Ed25519 keys per role, consistent snapshots,
//!   expiry per role, re-signing of snapshot and timestamp, root rotation — built and
//!   signed by rust-tuf.
//! - [`rollout`]: staged rollouts — deterministic placement of devices into stages by a
//!   hash of their id, exact stage sizes, automatic pause on the failure rate.
//!
//! The device side (the TUF client workflow, [`updater`]) and the description of a
//! published image both sides share ([`TargetInfo`]) live in `portcullis-client`, so the
//! device agent links none of this crate; they are re-exported here.

pub mod http;
pub mod repo;
pub mod rollout;
pub mod service;

pub use portcullis_client::updater;
pub use portcullis_client::{TargetInfo, safe_component};

use std::path::{Path, PathBuf};

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
    /// A device's report names another device than its certificate does.
    #[error("report names device {claimed:?} but comes from {device}'s certificate")]
    NotYourReport {
        /// The device the report names.
        claimed: String,
        /// The device its certificate authenticates.
        device: String,
    },
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

/// Hardware model names: one path component of letters, digits, `._-+~`.
pub fn check_hardware(hw: &str) -> Result<(), Error> {
    if safe_component(hw) {
        Ok(())
    } else {
        Err(Error::Refused(format!("invalid hardware name {hw:?}: use letters, digits and ._-+~")))
    }
}
