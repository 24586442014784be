//! What bounds a listener, shared by every port Portcullis serves (the device port and
//! the DNS TCP/DoT listeners): the admission table that caps connections in total and
//! per address and sheds idle anonymous ones ([`conns`]), and the keyed GCRA rate limiter
//! ([`Limiter`]) used for handshakes, per-device request rates and DNS clients, and the
//! accept loop that puts the two in front of every TCP listener ([`next_admitted`]), and
//! the background tasks each capability service owns and stops with ([`Tasks`]).
//!
//! It knows nothing of TLS, HTTP or DNS; the listeners do.

mod accept;
pub mod conns;
mod ratelimit;
pub mod tasks;

pub use accept::next_admitted;
pub use ratelimit::{Limiter, Rate};
pub use tasks::{First, Shutdown, Tasks};
