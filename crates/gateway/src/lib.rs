//! The device port: a TLS listener that knows which device is calling, and the gateway
//! that forwards authenticated requests to the fleet's HTTP APIs.
//!
//! Each accepted connection gets a bounded TLS handshake; the client certificate it
//! presented (if any) is verified against the CA and attached to every request on that
//! connection as a [`portcullis_pki::PeerCertificate`]. Routes decide what identity they
//! need and check the live registry per request. Slow clients are cut off: the handshake,
//! the request head and the whole request each have a deadline, and the number of
//! concurrent connections is capped.
//!
//! The [`Gateway`] answers every path the built-in routes (EST, CRL) do not: longest
//! prefix route, device authenticated per request, group allow-list, per-device GCRA
//! rate limit, [`openapi`] validation of every request against the route's document
//! (or shadow mode), gateway-owned headers stripped and identity headers set, pooled
//! http or verified https upstream connections, 502/504 as problem documents.

mod fastbody;
mod formats;
mod h2guard;
mod listener;
pub mod openapi;
mod outcome;
mod proxy;
mod route;
mod strictjson;
mod upstream;

pub use h2guard::H2Limits;
#[doc(hidden)]
pub use h2guard::guard_for_fuzzing;
pub use listener::{DeviceApp, ListenerConfig, serve};
pub use portcullis_net::{Limiter, Rate, conns};
pub use proxy::{Gateway, RateView, RouteView, Routes};
pub use route::{Forwarded, RouteConfig, RouteError, RouteTable};
#[doc(hidden)]
pub use upstream::parse_response_for_fuzzing;
