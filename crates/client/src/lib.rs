//! The device side of Portcullis as a library, for the agent and for anyone building
//! their own: the TUF firmware updater ([`updater`]), the description of a published
//! image ([`TargetInfo`]), EST's certs-only PKCS#7 ([`pkcs7`]), PEM armour and durable,
//! owner-only key files ([`files`]), and the TLS pieces every side needs once: the
//! tree's one crypto provider, trust roots from a CA file or the system ([`tls`]).
//!
//! It deliberately links no server code — no CA, no registry, no SQLite, no HTTP server:
//! `cargo tree -p portcullis-agent` shows none of them. The server crates use the pieces
//! both sides share from here (`portcullis-pki` re-exports [`files`] and [`pkcs7`],
//! `portcullis-firmware` [`updater`] and [`TargetInfo`]).

pub mod files;
pub mod pkcs7;
mod target;
pub mod tls;
pub mod updater;

pub use files::{base64_lines, pem_encode, write_private, write_public};
pub use target::{TargetInfo, safe_component};
