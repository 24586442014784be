//! HTTP pieces every Portcullis endpoint shares: RFC 9457 problem documents
//! ([`Problem`]), the one error shape the device port, DoH, the firmware routes and the
//! admin API answer with, and a bounded drain of an unread request body ([`drain`]).

mod drain;
mod problem;

pub use drain::{DRAIN_CAP, drain};
pub use problem::{InvalidParam, Problem};
