//! The device port: a TLS listener that knows which device is calling.
//!
//! Each accepted connection gets a bounded TLS handshake; the client certificate it
//! presented (if any) is verified against the CA and attached to every request on that
//! connection as a [`portcullis_pki::PeerCertificate`]. Routes decide what identity they
//! need and check the live registry per request. Slow clients are cut off: the handshake,
//! the request head and the whole request each have a deadline, and the number of
//! concurrent connections is capped.
//!
//! Today it serves the built-in routes (EST, CRL). Proxying to upstreams with OpenAPI
//! validation and rate limits is a later addition and will live here.

mod listener;

pub use listener::{ListenerConfig, serve};
