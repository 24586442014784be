//! Shared vocabulary of Portcullis.
//!
//! Identifiers that cross crate boundaries ([`DeviceId`], [`GroupName`], [`TrustDomain`]),
//! registry states, certificate fingerprints and serials, and a few helpers for time and
//! secrets. This crate does no I/O and holds no policy: it only makes invalid values
//! unrepresentable, so every other crate can take a `DeviceId` and trust it.

mod cidr;
mod id;
mod secret;
mod state;

pub use cidr::{Cidr, InvalidCidr};
pub use id::{DeviceId, GroupName, InvalidName, TrustDomain};
pub use secret::{Fingerprint, Serial, Token, TokenHash, parse_duration, random_bytes};
pub use state::{CertState, DeviceState, UnknownState};
