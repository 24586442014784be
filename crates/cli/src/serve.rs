//! `portcullis up`: the device port and the admin API, until SIGINT/SIGTERM.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use portcullis_admin::{AdminToken, GatewayHooks};
use portcullis_gateway::{Gateway, RouteTable};
use portcullis_pki::{ClientCertVerifier, est, tls};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::instance::Instance;

pub async fn up(cfg: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    // Absolute, so reloads read the same file whatever the working directory, and a
    // `--config` given to a management command can be compared with it.
    let config_path = config_path.map(|p| std::path::absolute(&p).unwrap_or(p));
    let inst = Instance::new(&cfg.data_dir);
    if !inst.is_initialised() {
        inst.init(cfg.trust_domain.clone())?;
        eprintln!("portcullis: initialised {} (trust domain {})", cfg.data_dir.display(), cfg.trust_domain);
    }
    let _lock = inst.lock()?;
    let authority = inst.authority(cfg.policy.clone()).await?;
    let token = inst.admin_token()?;
    let scrape_token = inst.ensure_metrics_token(false)?;

    // A fresh server certificate each start: it always carries the configured names.
    let server = authority
        .ca()
        .issue_server(&cfg.server_names, cfg.server_cert_lifetime)
        .context("cannot issue the device-port certificate")?;
    let tls_dir = cfg.data_dir.join("tls");
    std::fs::create_dir_all(&tls_dir).with_context(|| format!("cannot create {}", tls_dir.display()))?;
    portcullis_pki::write_public(&tls_dir.join("server.crt"), server.chain_pem.as_bytes())?;
    portcullis_pki::write_private(&tls_dir.join("server.key"), server.key_pem.as_bytes())?;
    let chain = CertificateDer::pem_slice_iter(server.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("server chain")?;
    let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).context("server key")?;
    let verifier = ClientCertVerifier::new(authority.ca()).context("client verifier")?;
    let tls_config = tls::server_config(&verifier, chain, key).context("TLS configuration")?;

    // Signal handlers first: once the listen lines are printed, a supervisor (or a test)
    // may send SIGTERM or SIGHUP at once, and the default action would kill the process.
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;

    let device_listener = TcpListener::bind(cfg.device_addr)
        .await
        .with_context(|| format!("cannot bind the device port to {}", cfg.device_addr))?;
    let admin_listener = TcpListener::bind(cfg.admin_addr)
        .await
        .with_context(|| format!("cannot bind the admin API to {}", cfg.admin_addr))?;
    let device_addr = device_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    inst.write_admin_addr(admin_addr)?;
    // The DNS helpers stop after the listeners, so the last queries reach the log.
    let (dns_stop_tx, dns_stop_rx) = watch::channel(false);
    let mut dns_tasks = Vec::new();
    let mut dns_lists = None;
    // On default addresses a port in use only warns (mDNS daemons hold 5353 on many
    // machines); chosen addresses must bind.
    let dns_cfg = match &cfg.dns {
        Some(d) => match portcullis_dns::service::bind(d.addr).await {
            Ok(bound) => Some((d, bound)),
            Err(e) if d.default_addrs => {
                tracing::warn!(error = %format!("{e:#}"), "DNS port not started; set dns.addr (or dns.enabled = false)");
                eprintln!("portcullis: DNS port not started: {e:#}; set dns.addr (or dns.enabled = false)");
                None
            }
            Err(e) => return Err(e.into()),
        },
        None => None,
    };
    let profiles = portcullis_dns::service::ProfilePolicies::default();
    // One set of connection-admission counters for every listener (labelled by name).
    let conn_metrics = portcullis_gateway::conns::ConnMetrics::default();
    authority.metrics().register(|r| conn_metrics.register(r));
    raise_descriptor_limit(&cfg);
    let dns = match dns_cfg {
        Some((d, (udp, tcp))) => {
            let (lists, table) = portcullis_dns::service::DnsLists::new(d, cfg.data_dir.join("dns-lists"))?;
            let lists = Arc::new(lists);
            let (identify, attribution) = portcullis_dns::service::attribution(
                authority.clone(),
                profiles.clone(),
                dns_stop_rx.clone(),
            )
            .await?;
            let (on_query, log_writer) =
                portcullis_dns::service::query_log(authority.clone(), d, dns_stop_rx.clone());
            dns_tasks.push(attribution);
            dns_tasks.push(log_writer);
            let resolver = Arc::new(
                portcullis_dns::Resolver::new(
                    table,
                    identify,
                    portcullis_dns::Upstreams::new(
                        portcullis_dns::service::upstreams(d)?,
                        d.upstream_timeout,
                        d.max_upstream_in_flight,
                    ),
                    portcullis_dns::Cache::new(d.cache),
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
            if d.upstreams.is_empty() {
                tracing::warn!(
                    "dns: no upstream resolver (none configured, none in /etc/resolv.conf): answers will be SERVFAIL"
                );
            }
            let dot = match d.dot_addr {
                Some(a) => match TcpListener::bind(a).await {
                    Ok(l) => Some(l),
                    Err(e) if d.default_addrs => {
                        tracing::warn!(error = %e, addr = %a, "DNS over TLS not started; set dns.dot_addr");
                        None
                    }
                    Err(e) => return Err(e).with_context(|| format!("cannot bind DNS over TLS to {a}")),
                },
                None => None,
            };
            dns_tasks.push(portcullis_dns::service::spawn_list_refresh(
                lists.clone(),
                resolver.clone(),
                dns_stop_rx.clone(),
            ));
            dns_lists = Some(lists);
            let serve_cfg = portcullis_dns::ServeConfig {
                per_client: d.per_client,
                max_tcp_connections: d.max_tcp_connections,
                tcp_connections_per_ip: d.tcp_connections_per_ip,
                tcp_idle_timeout: d.tcp_idle_timeout,
                tcp_session_timeout: d.tcp_session_timeout,
                max_udp_in_flight: d.max_udp_in_flight,
                conn_metrics: conn_metrics.clone(),
            };
            Some((resolver, udp, tcp, serve_cfg, dot))
        }
        None => None,
    };

    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "portcullis: device port (EST, CRL) listening on {device_addr}")?;
        if let Some((_, udp, _, _, dot)) = &dns {
            writeln!(out, "portcullis: dns (udp, tcp) listening on {}", udp.local_addr()?)?;
            if let Some(dot) = dot {
                writeln!(out, "portcullis: dns over tls listening on {}", dot.local_addr()?)?;
            }
        }
        // Last: scripts and tests wait for this line.
        writeln!(out, "portcullis: admin API listening on {admin_addr}")?;
        out.flush()?;
    }
    tracing::info!(%device_addr, %admin_addr, trust_domain = %authority.trust_domain(), "portcullis up");

    let table = RouteTable::try_new(cfg.routes.clone()).context("gateway routes")?;
    tracing::info!(routes = table.len(), "gateway routes loaded");
    let gateway = Arc::new(Gateway::new(authority.clone(), table, cfg.unauthenticated_per_ip));
    let resolver = dns.as_ref().map(|(r, ..)| r.clone());
    let firmware = portcullis_firmware::service::Firmware::open(&cfg.data_dir, authority.store().clone())
        .context("firmware repository")?;
    let mut built_in = est::router(authority.clone())
        .merge(portcullis_firmware::http::router(authority.clone(), firmware.clone()));
    let mut built_in_paths = est::PATHS.to_vec();
    if let Some(r) = &resolver {
        built_in = built_in.merge(portcullis_dns::service::doh_router(
            r.clone(),
            authority.clone(),
            profiles.clone(),
        ));
        built_in_paths.push(portcullis_dns::service::DOH_PATH);
    }
    let reload: Arc<dyn Fn() -> Result<usize, String> + Send + Sync> = {
        let gateway = gateway.clone();
        let dns_lists = dns_lists.clone();
        let config_path = config_path.clone();
        Arc::new(move || {
            let fresh = Config::load(config_path.as_deref()).map_err(|e| format!("{e:#}"))?;
            let table = RouteTable::try_new(fresh.routes).map_err(|e| e.to_string())?;
            let policies = match (&dns_lists, &fresh.dns) {
                (Some(l), Some(d)) => Some(l.reconfigure(d).map_err(|e| format!("{e:#}"))?),
                _ => None,
            };
            if let (Some(r), Some(p)) = (&resolver, policies) {
                r.replace(p);
                tracing::info!("dns policies reloaded");
            }
            let n = table.len();
            gateway.replace(table);
            tracing::info!(routes = n, "gateway routes reloaded");
            Ok(n)
        })
    };
    let hooks = GatewayHooks {
        config: config_path.clone(),
        describe: {
            let gateway = gateway.clone();
            Arc::new(move || gateway.describe())
        },
        reload: reload.clone(),
        dns: dns_lists
            .clone()
            .map(|l| -> Arc<dyn Fn() -> serde_json::Value + Send + Sync> { Arc::new(move || l.describe()) }),
    };

    let dot_config = portcullis_dns::service::dot_tls(&tls_config);
    let dot_attribution =
        portcullis_dns::service::tls_attribution(authority.clone(), verifier.clone(), profiles.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let device = tokio::spawn(portcullis_gateway::serve(
        device_listener,
        tls_config,
        verifier,
        portcullis_gateway::DeviceApp {
            built_in,
            built_in_paths,
            built_in_prefixes: vec![portcullis_firmware::http::PREFIX],
            gateway,
        },
        portcullis_gateway::ListenerConfig { conn_metrics: conn_metrics.clone(), ..cfg.listener.clone() },
        stop_rx.clone(),
    ));
    let hup = spawn_reload_on_sighup(hup, reload, stop_rx.clone());
    let admin_app = portcullis_admin::router(
        authority.clone(),
        AdminToken::new(&token).with_scrape_token_file(scrape_token),
        "admin-api",
        Some(hooks),
        crate::audit::auditor(authority.store().clone(), &cfg.data_dir, &firmware),
        firmware.clone(),
    );
    let mut admin_stop = stop_rx.clone();
    let admin = tokio::spawn(async move {
        let r = axum::serve(admin_listener, admin_app)
            .with_graceful_shutdown(async move {
                let _ = admin_stop.changed().await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "admin API stopped");
        }
    });
    let crl_task = spawn_crl_refresh(authority.clone(), cfg.policy.crl_validity, stop_rx.clone());
    let firmware_task = spawn_firmware_refresh(firmware, stop_rx.clone());
    let dns_task = tokio::spawn({
        let stop = stop_rx.clone();
        async move {
            if let Some((resolver, udp, tcp, serve_cfg, dot)) = dns {
                let dot_task = dot.map(|l| {
                    tokio::spawn(resolver.clone().serve_tls(
                        l,
                        tokio_rustls::TlsAcceptor::from(dot_config),
                        dot_attribution,
                        serve_cfg.clone(),
                        stop.clone(),
                    ))
                });
                resolver.serve(udp, tcp, serve_cfg, stop).await;
                if let Some(t) = dot_task {
                    let _ = t.await;
                }
            }
        }
    });

    wait_for_signal(term, int).await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::join!(device, admin, crl_task, firmware_task, hup, dns_task);
    let _ = dns_stop_tx.send(true);
    for t in dns_tasks {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(inst.admin_addr_path());
    eprintln!("portcullis: stopped");
    Ok(())
}

/// Raises the soft limit on open files to the hard limit (as nginx's
/// `worker_rlimit_nofile` and Go's runtime do): the connection caps are only real if the
/// process can hold that many sockets. Warns when even the hard limit is below them.
fn raise_descriptor_limit(cfg: &Config) {
    let want = cfg.listener.max_connections as u64
        + cfg.dns.as_ref().map_or(0, |d| 2 * d.max_tcp_connections as u64 + d.max_upstream_in_flight as u64)
        + 256;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < want => tracing::warn!(
            limit = n,
            needed = want,
            "open-file limit is below the connection caps; raise it (LimitNOFILE=) or lower device.max_connections"
        ),
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// SIGHUP re-reads the gateway routes; a failure is logged and changes nothing.
fn spawn_reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    reload: Arc<dyn Fn() -> Result<usize, String> + Send + Sync>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    if let Err(e) = reload() {
                        tracing::error!(error = %e, "reload failed; the previous routes keep serving");
                    }
                }
                _ = stop.changed() => return,
            }
        }
    })
}

/// Re-signs the CRL at a quarter of its validity so it never lapses.
fn spawn_crl_refresh(
    authority: Arc<portcullis_pki::Authority>,
    validity: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let period = validity / 4;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {
                    if let Err(e) = authority.refresh_crl().await {
                        tracing::error!(error = %e, "cannot re-sign the CRL");
                    }
                }
                _ = stop.changed() => return,
            }
        }
    })
}

/// Re-signs the firmware timestamp and snapshot before they expire (checked at start and
/// every 10 minutes; each is re-signed once less than half its lifetime is left).
fn spawn_firmware_refresh(
    firmware: Arc<portcullis_firmware::service::Firmware>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let fw = firmware.clone();
            match tokio::task::spawn_blocking(move || fw.repo().refresh(chrono::Utc::now())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "cannot re-sign firmware metadata"),
                Err(e) => tracing::error!(error = %e, "firmware refresh task failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(600)) => {}
                _ = stop.changed() => return,
            }
        }
    })
}

async fn wait_for_signal(mut term: tokio::signal::unix::Signal, mut int: tokio::signal::unix::Signal) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
