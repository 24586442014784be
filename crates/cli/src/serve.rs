//! `portcullis up`: the device port, DNS and the admin API, until SIGINT/SIGTERM.
//!
//! The binary parses the configuration, binds the sockets and composes the services;
//! each capability starts its own tasks (`Dns::start`, `Authority::start` for the CRL,
//! `Firmware::start` for metadata) and stops them on the one shutdown signal.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use portcullis_admin::{AdminToken, Reload, Running};
use portcullis_gateway::{DeviceApp, Gateway, ListenerConfig, RouteTable};
use portcullis_net::{Shutdown, Tasks};
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::config::Config;
use crate::node::{ConfigReload, Node, Open};

pub async fn up(cfg: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    // Absolute, so reloads read the same file whatever the working directory, and a
    // `--config` given to a management command can be compared with it.
    let config_path = config_path.map(|p| std::path::absolute(&p).unwrap_or(p));
    let node = Node::open(&cfg, Open::CreateIfMissing).await?;
    let tls = node.device_tls(&cfg)?;
    let routes = RouteTable::try_new(cfg.routes.clone()).context("gateway routes")?;
    let (signals, hup) = Signals::install()?;
    let ports = Ports::bind(&cfg).await?;
    let addrs = ports.addrs;
    node.inst.write_admin_addr(ports.admin.local_addr()?)?;
    raise_descriptor_limit(&cfg);
    let conn_metrics = portcullis_net::conns::ConnMetrics::default();
    node.authority.metrics().register(|r| conn_metrics.register(r));

    let (stop_tx, stop) = portcullis_net::tasks::shutdown();
    let mut tasks = Tasks::new();
    let dns = match (&cfg.dns, ports.dns) {
        (Some(d), Some(sockets)) => {
            let shared = portcullis_dns::Shared {
                device_tls: tls.config.clone(),
                verifier: tls.verifier.clone(),
                conn_metrics: conn_metrics.clone(),
            };
            let dir = cfg.data_dir.join("dns-lists");
            let (dns, t) =
                portcullis_dns::Dns::start(d, node.authority.clone(), dir, sockets, shared, stop.clone())
                    .await?;
            tasks.extend(t);
            Some(dns)
        }
        _ => None,
    };
    tracing::info!(routes = routes.len(), "gateway routes loaded");
    let gateway = Arc::new(Gateway::new(
        node.authority.clone(),
        routes,
        cfg.unauthenticated_per_ip,
        cfg.listener.workers,
    ));
    let app = device_app(&node, &gateway, dns.as_deref());
    let listener = ListenerConfig { conn_metrics, ..cfg.listener.clone() };
    tasks.spawn(portcullis_gateway::serve(
        ports.device,
        tls.config,
        tls.verifier,
        app,
        listener,
        stop.clone(),
    ));
    let reload =
        Arc::new(ConfigReload { path: config_path.clone(), gateway: gateway.clone(), dns: dns.clone() });
    let running = Running { gateway, dns, reload: reload.clone(), config: config_path };
    let token = AdminToken::new(&node.inst.admin_token()?)
        .with_scrape_token_file(node.inst.ensure_metrics_token(false)?);
    tasks.spawn(serve_admin(ports.admin, node.admin(token, "admin-api", Some(running)), stop.clone()));
    tasks.extend(node.authority.start(stop.clone()));
    tasks.extend(node.firmware.start(stop.clone()));
    tasks.spawn(reload_on_sighup(hup, reload, stop));
    announce(addrs, &node)?;

    signals.wait().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    tasks.join().await;
    let _ = std::fs::remove_file(node.inst.admin_addr_path());
    eprintln!("portcullis: stopped");
    Ok(())
}

/// What the device port serves besides the gateway's routes: EST and the CRL, firmware,
/// and DoH when DNS runs.
fn device_app(node: &Node, gateway: &Arc<Gateway>, dns: Option<&portcullis_dns::Dns>) -> DeviceApp {
    let mut built_in = portcullis_pki::est::router(node.authority.clone())
        .merge(portcullis_firmware::http::router(node.authority.clone(), node.firmware.clone()));
    let mut built_in_paths = portcullis_pki::est::PATHS.to_vec();
    if let Some(dns) = dns {
        built_in = built_in.merge(dns.doh_router());
        built_in_paths.push(portcullis_dns::service::DOH_PATH);
    }
    DeviceApp {
        built_in,
        built_in_paths,
        built_in_prefixes: vec![portcullis_firmware::http::PREFIX],
        gateway: gateway.clone(),
    }
}

/// The listening sockets, bound before anything is announced.
struct Ports {
    device: TcpListener,
    admin: TcpListener,
    dns: Option<portcullis_dns::Sockets>,
    addrs: Addrs,
}

/// Device port, admin API, and DNS (UDP/TCP, then DoT).
type Addrs = (SocketAddr, SocketAddr, Option<(SocketAddr, Option<SocketAddr>)>);

impl Ports {
    async fn bind(cfg: &Config) -> anyhow::Result<Self> {
        let device = TcpListener::bind(cfg.device_addr)
            .await
            .with_context(|| format!("cannot bind the device port to {}", cfg.device_addr))?;
        let admin = TcpListener::bind(cfg.admin_addr)
            .await
            .with_context(|| format!("cannot bind the admin API to {}", cfg.admin_addr))?;
        let dns = match &cfg.dns {
            Some(d) => portcullis_dns::Sockets::bind(d).await?,
            None => None,
        };
        let addrs =
            (device.local_addr()?, admin.local_addr()?, dns.as_ref().map(|s| s.local_addrs()).transpose()?);
        Ok(Self { device, admin, dns, addrs })
    }
}

/// The listen lines on stdout; the admin one last: scripts and tests wait for it.
fn announce((device, admin, dns): Addrs, node: &Node) -> std::io::Result<()> {
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "portcullis: device port (EST, CRL) listening on {device}")?;
        if let Some((udp, dot)) = dns {
            writeln!(out, "portcullis: dns (udp, tcp) listening on {udp}")?;
            if let Some(dot) = dot {
                writeln!(out, "portcullis: dns over tls listening on {dot}")?;
            }
        }
        writeln!(out, "portcullis: admin API listening on {admin}")?;
        out.flush()?;
        tracing::info!(device_addr = %device, admin_addr = %admin, trust_domain = %node.authority.trust_domain(), "portcullis up");
        Ok(())
    }
}

async fn serve_admin(listener: TcpListener, app: axum::Router, mut stop: Shutdown) {
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(async move { portcullis_net::tasks::stopped(&mut stop).await })
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "admin API stopped");
    }
}

/// Installed before the listen lines are printed: from then on a supervisor (or a test)
/// may send SIGTERM or SIGHUP at once, and the default action would kill the process.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// SIGTERM and SIGINT (stop), and SIGHUP (reload).
    fn install() -> anyhow::Result<(Self, Signal)> {
        let term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        Ok((Self { term, int }, hup))
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// SIGHUP re-reads the configuration; a failure is logged and changes nothing.
async fn reload_on_sighup(mut hup: Signal, reload: Arc<ConfigReload>, mut stop: Shutdown) {
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if let Err(e) = reload.reload() {
                    tracing::error!(error = %e, "reload failed; the previous routes keep serving");
                }
            }
            _ = portcullis_net::tasks::stopped(&mut stop) => return,
        }
    }
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
