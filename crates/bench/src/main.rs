//! `portcullis-bench`: end-to-end EST enrollments per second against a running
//! `portcullis up`, next to the in-process ceiling (CSR verify + sign only) measured in
//! the same run on the same machine; TLS handshakes against any server; firmware update
//! checks of a simulated fleet; the agent's image hashing speed.
//!
//! Each simulated device has its own key and CSR, made before the clock starts (that is
//! the device's own CPU in a real fleet). Timed, per device: a fresh TCP connection, a
//! full TLS 1.3 handshake (no resumption), `POST /.well-known/est/simpleenroll` with its
//! one-time token, and the server's durable commit of the certificate before it answers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use clap::Parser;
use portcullis_admin::AdminClient;
use portcullis_agent::EstClient;
use portcullis_core::{DeviceId, Token, TrustDomain};
use serde_json::json;

#[derive(Parser)]
#[command(about = "EST enrollment throughput, end to end and in-process")]
enum Cmd {
    /// End-to-end enrollments against a running `portcullis up`, next to the ceiling.
    Enroll(Args),
    /// Fresh-connection HTTPS GETs against any server (the TLS baseline, e.g. nginx).
    Handshake(HandshakeArgs),
    /// Enroll N agents and prepare their firmware updaters (trust anchor, hardware).
    FirmwareFleet(FleetArgs),
    /// N agents check for an update concurrently: TUF metadata refresh + directive, each
    /// over its own new mTLS connection; against Portcullis or any mirror of /firmware/.
    FirmwareCheck(CheckArgs),
    /// SHA-256 of a file as the agent verifies images (ring), in MB/s.
    Sha256 { file: PathBuf },
}

/// Where the running server is and how to manage it.
#[derive(clap::Args)]
struct ServerArgs {
    /// Device port URL of the running server.
    #[arg(long)]
    server: String,
    /// Root CA (PEM) of the running server.
    #[arg(long)]
    ca: PathBuf,
    /// Admin API address of the running server.
    #[arg(long)]
    admin: SocketAddr,
    /// File holding the admin token.
    #[arg(long)]
    admin_token: PathBuf,
}

#[derive(clap::Args)]
struct FleetArgs {
    #[command(flatten)]
    at: ServerArgs,
    /// The repository's root.json.
    #[arg(long)]
    root: PathBuf,
    /// Where the agents' directories go (DIR/agent-NNNN).
    #[arg(long)]
    dir: PathBuf,
    #[arg(short, long, default_value_t = 1000)]
    n: usize,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// Base URL of the server to check against (Portcullis's device port or a mirror).
    #[arg(long)]
    server: String,
    #[arg(long)]
    ca: PathBuf,
    /// The agents' directories (from firmware-fleet).
    #[arg(long)]
    dir: PathBuf,
    /// Rounds; each round every agent checks once, all at the same time.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(clap::Args)]
struct HandshakeArgs {
    /// Base URL, e.g. https://127.0.0.1:8443
    #[arg(long)]
    server: String,
    /// Root CA (PEM) that the server's certificate chains to.
    #[arg(long)]
    ca: PathBuf,
    /// Path to GET.
    #[arg(long, default_value = "/")]
    path: String,
    /// Requests, each on a new connection with a full handshake.
    #[arg(short, long, default_value_t = 5000)]
    n: usize,
    /// Concurrent clients.
    #[arg(short, long, default_value_t = 64)]
    concurrency: usize,
}

#[derive(clap::Args)]
struct Args {
    #[command(flatten)]
    at: ServerArgs,
    /// Enrollments to run.
    #[arg(short, long, default_value_t = 5000)]
    n: usize,
    /// Concurrent agents.
    #[arg(short, long, default_value_t = 64)]
    concurrency: usize,
    /// PID of the server, to report its CPU time per enrollment (Linux /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Device id prefix (use a new one per run against the same data dir).
    #[arg(long, default_value = "bench")]
    prefix: String,
}

struct Device {
    id: DeviceId,
    token: Token,
    csr: Vec<u8>,
}

fn csr_for(id: &DeviceId) -> anyhow::Result<Vec<u8>> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, id.as_str());
    Ok(p.serialize_request(&key)?.der().to_vec())
}

/// User + system CPU seconds of a process so far (USER_HZ is 100 on Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// CSR decode + verify + certificate signing on every core, no I/O: the ceiling.
fn ceiling(csrs: &[Vec<u8>]) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let ca =
        Arc::new(portcullis_pki::Ca::init(&dir.path().join("ca"), TrustDomain::try_new("bench.local")?)?);
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        csrs.iter().map(|c| base64::engine::general_purpose::STANDARD.encode(c).into_bytes()).collect(),
    );
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let next = Arc::new(AtomicUsize::new(0));
    let id = DeviceId::try_new("ceiling")?;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (ca, bodies, next, id) = (ca.clone(), bodies.clone(), next.clone(), id.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { return Ok(()) };
                    let csr = portcullis_pki::csr::parse_est_body(body)?;
                    ca.issue_device(&id, &csr, Duration::from_secs(30 * 86400))?;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("ceiling thread panicked"))??;
    }
    Ok(bodies.len() as f64 / t0.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cmd::parse() {
        Cmd::Enroll(args) => enroll(args).await,
        Cmd::Handshake(args) => handshake(args).await,
        Cmd::FirmwareFleet(args) => firmware_fleet(args).await,
        Cmd::FirmwareCheck(args) => firmware_check(args).await,
        Cmd::Sha256 { file } => {
            let len = std::fs::metadata(&file)?.len() as f64;
            let t0 = Instant::now();
            let hex = portcullis_firmware::updater::sha256_file(&file)?;
            let secs = t0.elapsed().as_secs_f64();
            println!("{hex}  {}  {:.3} s  {:.0} MB/s", file.display(), secs, len / secs / 1e6);
            Ok(())
        }
    }
}

async fn firmware_fleet(args: FleetArgs) -> anyhow::Result<()> {
    let ca_pem = std::fs::read(&args.at.ca)?;
    let root = std::fs::read(&args.root)?;
    let token = std::fs::read_to_string(&args.at.admin_token)?;
    let admin = AdminClient::remote(args.at.admin, Token::from_presented(token.trim()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.n {
        let id = format!("agent-{i:04}");
        let r = admin.register_device(&id, Some("bench"), None).await?;
        let token = Token::from_presented(&r.token);
        let dir = args.dir.join(&id);
        let (server, ca_pem, root) = (args.at.server.clone(), ca_pem.clone(), root.clone());
        tasks.spawn(async move {
            portcullis_agent::enroll(&server, &ca_pem, &DeviceId::try_new(id)?, &token, &dir).await?;
            portcullis_agent::UpdaterDir::new(&dir).init("bench-hw", "1.0.0", Some(&root))?;
            anyhow::Ok(())
        });
        while tasks.len() >= 64 {
            tasks.join_next().await.context("join")???;
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    println!("{} agents enrolled in {}", args.n, args.dir.display());
    Ok(())
}

/// Counts requests on the way through.
struct Counting<T> {
    inner: T,
    requests: Arc<AtomicUsize>,
}

impl<T: portcullis_firmware::updater::Transport> portcullis_firmware::updater::Transport for Counting<T> {
    async fn get(&self, path: &str, offset: u64) -> Result<portcullis_firmware::updater::Fetched, String> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.get(path, offset).await
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> Result<(u16, serde_json::Value), String> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.post(path, body).await
    }
}

async fn firmware_check(args: CheckArgs) -> anyhow::Result<()> {
    let ca_pem = std::fs::read(&args.ca)?;
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&args.dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("firmware/state.json").exists())
        .collect();
    dirs.sort();
    let mut clients = Vec::new();
    for d in &dirs {
        let chain = std::fs::read(d.join("chain.pem"))?;
        let key = std::fs::read(d.join("key.pem"))?;
        clients.push(EstClient::new(&args.server, &ca_pem, Some((chain, key)))?.without_resumption());
    }
    for round in 1..=args.rounds {
        let requests = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (d, client) in dirs.iter().zip(&clients) {
            let transport = Counting {
                inner: portcullis_agent::firmware::MtlsTransport::new(client.clone()),
                requests: requests.clone(),
            };
            let up = portcullis_agent::UpdaterDir::new(d);
            let failures = failures.clone();
            tasks.spawn(async move {
                let t = Instant::now();
                let opts = portcullis_agent::UpdateOptions { check: true, ..Default::default() };
                if let Err(e) = up.update(&transport, opts).await
                    && failures.fetch_add(1, Ordering::Relaxed) == 0
                {
                    eprintln!("first failure: {e}");
                }
                t.elapsed()
            });
        }
        let mut lat = Vec::with_capacity(dirs.len());
        while let Some(r) = tasks.join_next().await {
            lat.push(r?);
        }
        let wall = t0.elapsed().as_secs_f64();
        lat.sort();
        let n = requests.load(Ordering::Relaxed);
        println!(
            "round {round}: {} checks in {wall:.2} s = {:.0} checks/s, {n} requests = {:.0} requests/s, \
             p50 {:.0} ms, p99 {:.0} ms, failures {}",
            dirs.len(),
            dirs.len() as f64 / wall,
            n as f64 / wall,
            percentile(&lat, 0.50).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
            failures.load(Ordering::Relaxed)
        );
    }
    Ok(())
}

async fn handshake(args: HandshakeArgs) -> anyhow::Result<()> {
    let ca_pem = std::fs::read(&args.ca).with_context(|| format!("read {}", args.ca.display()))?;
    let client = EstClient::new(&args.server, &ca_pem, None)?.without_resumption();
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (client, next, path, n) = (client.clone(), next.clone(), args.path.clone(), args.n);
        tasks.push(tokio::spawn(async move {
            let mut ok = 0usize;
            while next.fetch_add(1, Ordering::Relaxed) < n {
                if matches!(client.get(&path).await, Ok((200, _))) {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await?;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "server": args.server, "path": args.path, "requests": args.n, "ok": ok,
            "concurrency": args.concurrency, "seconds": secs, "per_sec": (ok as f64 / secs).round(),
        }))?
    );
    if ok != args.n {
        anyhow::bail!("{} of {} requests failed", args.n - ok, args.n);
    }
    Ok(())
}

async fn enroll(args: Args) -> anyhow::Result<()> {
    let ca_pem = std::fs::read(&args.at.ca).with_context(|| format!("read {}", args.at.ca.display()))?;
    let token = std::fs::read_to_string(&args.at.admin_token).context("admin token")?;
    let admin = Arc::new(AdminClient::remote(args.at.admin, Token::from_presented(token.trim())));

    eprintln!("registering {} devices and making their CSRs ...", args.n);
    let mut devices = Vec::with_capacity(args.n);
    for i in 0..args.n {
        let id = DeviceId::try_new(format!("{}-{i:06}", args.prefix))?;
        let r = admin.register_device(id.as_str(), None, None).await?;
        let token = Token::from_presented(&r.token);
        let csr = csr_for(&id)?;
        devices.push(Device { id, token, csr });
    }
    let devices = Arc::new(devices);
    let client = EstClient::new(&args.at.server, &ca_pem, None)?.without_resumption();

    eprintln!("enrolling with {} concurrent agents ...", args.concurrency);
    let next = Arc::new(AtomicUsize::new(0));
    let cpu0 = args.server_pid.and_then(cpu_seconds);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (devices, client, next) = (devices.clone(), client.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(d) = devices.get(i) else { return (lat, errors) };
                let t = Instant::now();
                match client.simple_enroll(&d.id, &d.token, &d.csr).await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        if errors <= 3 {
                            eprintln!("enrollment failed: {e:#}");
                        }
                    }
                }
            }
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let elapsed = t0.elapsed();
    let server_cpu = args.server_pid.and_then(cpu_seconds).zip(cpu0).map(|(b, a)| b - a);
    lat.sort();
    let e2e = lat.len() as f64 / elapsed.as_secs_f64();

    // Every returned certificate must be in the registry.
    let stored = admin.certificates(None).await?;
    let stored = stored.certificates.iter().filter(|c| c.device.as_str().starts_with(&args.prefix)).count();

    eprintln!("measuring the in-process ceiling ...");
    let csrs: Vec<Vec<u8>> = devices.iter().map(|d| d.csr.clone()).collect();
    let ceil = ceiling(&csrs)?;

    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "enrollments": lat.len(),
            "errors": errors,
            "stored": stored,
            "concurrency": args.concurrency,
            "seconds": elapsed.as_secs_f64(),
            "e2e_per_sec": e2e.round(),
            "latency_ms": {
                "p50": percentile(&lat, 0.50).as_secs_f64() * 1e3,
                "p99": percentile(&lat, 0.99).as_secs_f64() * 1e3,
                "max": lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            },
            "server_cpu_ms_per_enrollment": server_cpu.map(|c| c * 1e3 / lat.len().max(1) as f64),
            "ceiling_per_sec": ceil.round(),
            "ratio_e2e_to_ceiling": (e2e / ceil * 1000.0).round() / 1000.0,
        }))?
    );
    if errors > 0 || stored != lat.len() {
        anyhow::bail!("{errors} enrollments failed; {stored} of {} stored", lat.len());
    }
    Ok(())
}
