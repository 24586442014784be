//! The DNS port's configuration, validated (the binary parses the TOML into these; lists
//! are read when the resolver starts or reloads).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use portcullis_net::Rate;

/// The DNS port, validated (lists are read when the resolver starts or reloads).
#[derive(Debug, Clone)]
pub struct DnsConfig {
    pub addr: SocketAddr,
    /// Neither address was chosen (config or flag): a port already in use then only
    /// warns, so `portcullis up` still starts on a machine where e.g. mDNS holds 5353.
    pub default_addrs: bool,
    /// DNS over TLS; `None` when set to "" (off).
    pub dot_addr: Option<SocketAddr>,
    /// `IP[:port]`, `tls://IP[:port]#name`, `https://host/path`.
    pub upstreams: Vec<String>,
    /// CA certificates (PEM) for DoT/DoH upstreams instead of the system roots.
    pub upstream_ca: Option<PathBuf>,
    pub upstream_timeout: Duration,
    /// Policy for queries no device is attributed to; `None`: refused.
    pub unknown_clients: Option<String>,
    /// Policy for devices whose group has none.
    pub default_policy: Option<String>,
    pub per_client: Option<Rate>,
    /// TCP and DoT connections at once (each listener).
    pub max_tcp_connections: usize,
    /// TCP and DoT connections at once from one address.
    pub tcp_connections_per_ip: usize,
    /// Most time between two queries on a TCP/DoT connection.
    pub tcp_idle_timeout: Duration,
    /// Most time a TCP/DoT connection stays open, however busy.
    pub tcp_session_timeout: Duration,
    /// UDP queries being answered at once; beyond it new ones are dropped (counted).
    pub max_udp_in_flight: usize,
    /// Queries waiting for an upstream at once (each holds a socket or a stream slot).
    pub max_upstream_in_flight: usize,
    pub cache: crate::CacheConfig,
    /// Persist every query in the query log.
    pub log_queries: bool,
    /// Query-log entries older than this are deleted…
    pub log_retention: Duration,
    /// …and beyond this many rows the oldest are.
    pub log_max_rows: u64,
    pub lists: Vec<ListSource>,
    pub policies: Vec<DnsPolicyConfig>,
}

/// Where a list comes from and how often it is read again.
#[derive(Debug, Clone, PartialEq)]
pub struct ListSource {
    pub name: String,
    pub from: ListFrom,
    /// How its plain names (hosts lines, bare domains) match: the name, or its subtree.
    pub matching: crate::Match,
    /// Read again this often (files: 1 minute; URLs: 1 day, unless set).
    pub refresh: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ListFrom {
    File(PathBuf),
    /// http or https; the last good copy is kept in the data dir.
    Url(String),
}

#[derive(Debug, Clone)]
pub struct DnsPolicyConfig {
    pub name: String,
    pub groups: Vec<String>,
    /// Devices that get this policy whatever their group.
    pub devices: Vec<String>,
    pub mode: crate::Mode,
    pub lists: Vec<String>,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub block: crate::BlockResponse,
}
