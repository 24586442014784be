//! The DNS port: a filtering forwarder with per-device policies.
//!
//! Each query is attributed to a device (by its registered source address), answered by
//! the policy of the device's group — blocklist mode or default-deny allowlist mode —
//! from a TTL cache or the configured upstreams, with every name in the answer's CNAME
//! chain checked too. Malformed packets get FORMERR (or nothing, when they cannot say whom
//! to answer); UDP answers respect the client's EDNS buffer size and set TC beyond it.
//!
//! [`service`] is everything around the resolver: lists fetched and refreshed, policies
//! from the [`config`] and from device profiles, attribution by address or client
//! certificate (through `portcullis-pki`'s `Authority`, as the gateway does), the query
//! log, DoT and DoH; [`Dns::start`] puts them together and owns their tasks. The binary
//! only parses the configuration, binds the [`Sockets`] and keeps the [`Dns`] handle.

pub mod cache;
pub mod config;
pub mod lists;
mod pipeline;
pub mod policy;
mod server;
pub mod service;
mod start;
pub mod upstream;

pub use cache::{Cache, CacheConfig};
pub use lists::{DomainSet, ListStats, Match};
pub use pipeline::Pipeline;
#[doc(hidden)]
pub use pipeline::exchange_for_fuzzing as pipeline_for_fuzzing;
pub use policy::{BlockResponse, Mode, Policy, Rule, Verdict};
pub use server::{
    Attribution, Client, ConnAttribution, Identify, OnQuery, PolicyTable, QueryEvent, Resolver, ServeConfig,
    Stats, TlsAttribution,
};
pub use start::{Dns, Shared, Sockets};
pub use upstream::{BadUpstream, Upstream, UpstreamError, Upstreams};
