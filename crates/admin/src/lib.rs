//! The operator's API: JSON over HTTP on the admin port, every endpoint behind a bearer
//! token, errors as RFC 9457 problem documents.
//!
//! [`router`] builds the API over an [`portcullis_pki::Authority`]; [`AdminClient`] is
//! what the `portcullis` CLI uses to reach it, so a change made from the command line
//! takes effect in the running listeners at once; both speak the [`wire`] types. The API never returns key material;
//! enrollment tokens appear exactly once, in the response that creates them.

mod api;
mod client;
mod firmware;
pub mod wire;

pub use api::{AdminToken, Reload, Running, router};
pub use client::{AdminClient, ClientError, component};
