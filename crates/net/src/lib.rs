//! What bounds a listener, shared by every port Portcullis serves (the device port and
//! the DNS TCP/DoT listeners): the admission table that caps connections in total and
//! per address and sheds idle anonymous ones ([`conns`]), and the keyed GCRA rate limiter
//! ([`Limiter`]) used for handshakes, per-device request rates and DNS clients.
//!
//! It knows nothing of TLS, HTTP or DNS; the listeners do.

pub mod conns;
mod ratelimit;

pub use ratelimit::{Limiter, Rate};
