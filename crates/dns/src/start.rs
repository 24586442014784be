//! The running DNS capability: [`Dns::start`] takes the configuration, the registry's
//! `Authority` and the bound sockets, and owns everything from there — the resolver,
//! lists and their refresh, attribution by address (rebuilt on every announced store
//! change) and by DoT/DoH certificate, the query log writer, and the UDP/TCP/DoT
//! listeners. The binary keeps the handle for reloads, the admin API and DoH.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use portcullis_net::conns::ConnMetrics;
use portcullis_net::{First, Shutdown, Tasks};
use tokio::net::{TcpListener, UdpSocket};

use crate::config::DnsConfig;
use crate::service::{DnsLists, ProfilePolicies, ServiceError};

/// The sockets the binary bound for DNS.
#[derive(Debug)]
pub struct Sockets {
    /// Plain DNS over UDP.
    pub udp: UdpSocket,
    /// Plain DNS over TCP, on the same address.
    pub tcp: TcpListener,
    /// DNS over TLS, when configured and bound.
    pub dot: Option<TcpListener>,
}

impl Sockets {
    /// Binds UDP and TCP on `cfg.addr` and DoT on `cfg.dot_addr`. On the default
    /// addresses a port in use is not an error (mDNS daemons hold 5353 on many machines):
    /// `Ok(None)` for DNS as a whole, no DoT listener for DoT; the reason is logged.
    pub async fn bind(cfg: &DnsConfig) -> Result<Option<Self>, ServiceError> {
        let (udp, tcp) = match crate::service::bind(cfg.addr).await {
            Ok(b) => b,
            Err(e) if cfg.default_addrs => {
                tracing::warn!(error = %e, "DNS port not started; set dns.addr (or dns.enabled = false)");
                eprintln!("portcullis: DNS port not started: {e}; set dns.addr (or dns.enabled = false)");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let dot = match cfg.dot_addr {
            Some(addr) => match TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(error) if cfg.default_addrs => {
                    tracing::warn!(%error, %addr, "DNS over TLS not started; set dns.dot_addr");
                    None
                }
                Err(error) => return Err(ServiceError::Bind { proto: "dot", addr, error }),
            },
            None => None,
        };
        Ok(Some(Self { udp, tcp, dot }))
    }

    /// The UDP/TCP address, then the DoT one.
    pub fn local_addrs(&self) -> std::io::Result<(SocketAddr, Option<SocketAddr>)> {
        Ok((self.udp.local_addr()?, self.dot.as_ref().map(TcpListener::local_addr).transpose()?))
    }
}

/// What `Dns::start` needs from the device port: its TLS configuration (DoT uses the
/// same certificate and client-certificate rules) and the connection counters.
#[derive(Clone, Debug)]
pub struct Shared {
    /// The device port's TLS configuration.
    pub device_tls: Arc<rustls::ServerConfig>,
    /// The verifier of device certificates.
    pub verifier: portcullis_pki::ClientCertVerifier,
    /// Connection admissions, counted by listener.
    pub conn_metrics: ConnMetrics,
}

/// The running DNS capability.
#[derive(Debug)]
pub struct Dns {
    resolver: Arc<crate::Resolver>,
    lists: Arc<DnsLists>,
    authority: Arc<portcullis_pki::Authority>,
    profiles: ProfilePolicies,
}

impl Dns {
    /// Starts DNS on `sockets`: listeners stop when `stop` fires, then the helpers (so
    /// the last queries reach the log). `cache_dir` holds downloaded lists.
    pub async fn start(
        cfg: &DnsConfig,
        authority: Arc<portcullis_pki::Authority>,
        cache_dir: PathBuf,
        sockets: Sockets,
        shared: Shared,
        stop: Shutdown,
    ) -> Result<(Arc<Self>, Tasks), ServiceError> {
        let (lists, table) = DnsLists::new(cfg, cache_dir)?;
        let lists = Arc::new(lists);
        let profiles = ProfilePolicies::default();
        // The helpers have their own signal, sent once the listeners are done.
        let (helpers_stop_tx, helpers_stop) = portcullis_net::tasks::shutdown();
        let mut helpers = Tasks::new();
        let (identify, attribution) =
            crate::service::attribution(authority.clone(), profiles.clone(), helpers_stop.clone()).await?;
        helpers.push(attribution);
        let (on_query, log_writer) = crate::service::query_log(authority.clone(), cfg, helpers_stop.clone());
        helpers.push(log_writer);
        let resolver = Arc::new(
            crate::Resolver::new(
                table,
                identify,
                crate::Upstreams::new(
                    crate::service::upstreams(cfg)?,
                    cfg.upstream_timeout,
                    cfg.max_upstream_in_flight,
                ),
                crate::Cache::new(cfg.cache),
            )
            .on_query(on_query),
        );
        authority.metrics().register(|r| {
            r.register(
                "dns_dropped_overload",
                "UDP queries dropped because dns.max_udp_in_flight were waiting for upstreams",
                resolver.stats.dropped_overload.clone(),
            );
            r.register(
                "dns_rate_limited",
                "DNS queries dropped by the per-client rate limit",
                resolver.stats.rate_limited.clone(),
            );
        });
        if cfg.upstreams.is_empty() {
            tracing::warn!(
                "dns: no upstream resolver (none configured, none in /etc/resolv.conf): answers will be SERVFAIL"
            );
        }
        {
            let (lists, resolver) = (lists.clone(), resolver.clone());
            helpers.every(Duration::from_millis(500), First::Now, helpers_stop, move || {
                let (lists, resolver) = (lists.clone(), resolver.clone());
                async move {
                    if let Some(table) = lists.refresh_due().await {
                        resolver.replace(table);
                        tracing::info!("dns lists refreshed; policies swapped");
                    }
                }
            });
        }
        let serve_cfg = crate::ServeConfig {
            per_client: cfg.per_client,
            max_tcp_connections: cfg.max_tcp_connections,
            tcp_connections_per_ip: cfg.tcp_connections_per_ip,
            tcp_idle_timeout: cfg.tcp_idle_timeout,
            tcp_session_timeout: cfg.tcp_session_timeout,
            max_udp_in_flight: cfg.max_udp_in_flight,
            conn_metrics: shared.conn_metrics,
        };
        let dns = Arc::new(Self { resolver, lists, authority, profiles });
        let mut tasks = Tasks::new();
        let listeners = {
            let dns = dns.clone();
            let dot_attribution =
                crate::service::tls_attribution(dns.authority.clone(), shared.verifier, dns.profiles.clone());
            let dot_tls = crate::service::dot_tls(&shared.device_tls);
            async move {
                let Sockets { udp, tcp, dot } = sockets;
                let dot = dot.map(|l| {
                    tokio::spawn(dns.resolver.clone().serve_tls(
                        l,
                        tokio_rustls::TlsAcceptor::from(dot_tls),
                        dot_attribution,
                        serve_cfg.clone(),
                        stop.clone(),
                    ))
                });
                dns.resolver.clone().serve(udp, tcp, serve_cfg, stop).await;
                if let Some(t) = dot {
                    let _ = t.await;
                }
                let _ = helpers_stop_tx.send(true);
                helpers.join().await;
            }
        };
        tasks.spawn(listeners);
        Ok((dns, tasks))
    }

    /// Takes a new configuration's lists and policies; on error the running ones stay.
    pub fn reload(&self, cfg: &DnsConfig) -> Result<(), ServiceError> {
        let table = self.lists.reconfigure(cfg)?;
        self.resolver.replace(table);
        tracing::info!("dns policies reloaded");
        Ok(())
    }

    /// The policies and lists in force, for the admin API and CLI.
    pub fn describe(&self) -> crate::service::DnsPolicies {
        self.lists.describe()
    }

    /// DNS-over-HTTPS (RFC 8484) at [`crate::service::DOH_PATH`], for the device port.
    pub fn doh_router(&self) -> axum::Router {
        crate::service::doh_router(self.resolver.clone(), self.authority.clone(), self.profiles.clone())
    }

    /// The resolver (for tests and benchmarks that drive it directly).
    pub fn resolver(&self) -> &Arc<crate::Resolver> {
        &self.resolver
    }
}
