//! The private CA of Portcullis and its enrollment protocol.
//!
//! - [`Ca`]: creates and loads the root and issuing CA (key files mode 0600), issues device
//!   and server certificates whose content the CA alone decides, and signs CRLs.
//! - [`csr`]: decodes and checks PKCS#10 requests from untrusted bytes: signature, key
//!   type and strength. Nothing requested in a CSR beyond its public key is ever copied.
//! - [`Authority`]: the CA bound to the registry store: register devices and tokens,
//!   enroll, re-enroll, suspend, revoke, and authenticate a client certificate against
//!   the *live* registry state on every request.
//! - [`est`]: the EST (RFC 7030) and `/crl` routes of the device port.
//! - [`tls`]: rustls configuration for the device port, with the client certificate
//!   requested but optional, and re-verified per connection.
//!
//! This crate does not listen on sockets (the gateway does) and does not parse
//! configuration files (the binary does).

mod authority;
mod ca;
pub mod csr;
pub mod est;
pub mod metrics;
pub use portcullis_client::pkcs7;
pub mod tls;

pub use authority::{AuthError, AuthenticatedDevice, Authority, Error, IssuancePolicy, Registered};
pub use ca::{CRL_REASONS, Ca, CaError, IssuedCert, ServerIdentity};
pub use csr::{CsrError, KeyKind, ValidCsr};
pub use metrics::Metrics;
pub use portcullis_client::files::{base64_lines, pem_encode, write_private, write_public};
pub use portcullis_http::{InvalidParam, Problem};
pub use tls::{ChainRejected, ClientCertVerifier, PeerCertificate};
