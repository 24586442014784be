//! `portcullis profile …` and `portcullis audit …`: profiles in, findings out.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use portcullis_admin::{AdminClient, wire};
use portcullis_store::{AuditSummary, AuditTotals};
use serde_json::{Value, json};

/// The firmware service's fleet view, as the audit reads it.
struct FirmwareFleet(std::sync::Arc<portcullis_firmware::service::Firmware>);

impl portcullis_audit::FirmwareView for FirmwareFleet {
    fn outdated(
        &self,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Vec<portcullis_audit::Outdated>, String>> + Send + '_>,
    > {
        Box::pin(async move {
            let rows = self.0.outdated().await.map_err(|e| e.to_string())?;
            Ok(rows
                .into_iter()
                .map(|b| portcullis_audit::Outdated {
                    device: b.device,
                    hardware: b.hardware,
                    installed: b.installed,
                    newest: b.newest,
                })
                .collect())
        })
    }
}

/// An auditor over `store` that also reports devices behind the newest published
/// firmware.
pub fn auditor(
    store: std::sync::Arc<dyn portcullis_store::Store>,
    data_dir: &Path,
    firmware: &std::sync::Arc<portcullis_firmware::service::Firmware>,
) -> std::sync::Arc<portcullis_audit::Auditor> {
    portcullis_audit::Auditor::new(
        store,
        Some(data_dir.join("audit")),
        Some(std::sync::Arc::new(FirmwareFleet(firmware.clone()))),
    )
}

/// Items joined with commas, `-` for none.
fn list(items: &[impl std::fmt::Display]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
    }
}

/// Reads a profile document: TOML (`tcp = [443]`) or JSON.
fn read_profile(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if text.trim_start().starts_with('{') {
        return serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()));
    }
    let v: toml::Value = toml::from_str(&text).with_context(|| format!("{}: not TOML", path.display()))?;
    Ok(serde_json::to_value(v)?)
}

pub struct ProfileFlags {
    pub file: Option<std::path::PathBuf>,
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
    pub domains: Vec<String>,
    pub tls_required: Vec<u16>,
    pub description: Option<String>,
}

pub async fn profile_set(c: &AdminClient, name: &str, f: ProfileFlags) -> anyhow::Result<()> {
    let doc = match &f.file {
        Some(p) => read_profile(p)?,
        None => json!({
            "description": f.description,
            "tcp": f.tcp,
            "udp": f.udp,
            "domains": f.domains,
            "tls_required": f.tls_required,
        }),
    };
    let mut doc = doc;
    if let Some(o) = doc.as_object_mut() {
        o.retain(|_, v| !v.is_null());
    }
    let p = c.put_profile(name, &doc).await?.profile;
    println!(
        "profile {name} saved: tcp {} udp {} tls-required {} domains {}",
        list(&p.tcp),
        list(&p.udp),
        list(&p.tls_required),
        list(&p.domains)
    );
    Ok(())
}

pub async fn profile_import_mud(
    c: &AdminClient,
    file: &Path,
    name: Option<&str>,
    as_json: bool,
) -> anyhow::Result<()> {
    let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let mud: Value =
        serde_json::from_slice(&text).with_context(|| format!("{}: not JSON", file.display()))?;
    let r = c.import_mud(name, &mud).await?;
    if as_json {
        crate::manage::print_json(&r);
        return Ok(());
    }
    let p = &r.profile;
    println!(
        "profile {} imported from {}: tcp {} udp {} domains {}",
        r.name,
        p.source.as_deref().unwrap_or("-"),
        list(&p.tcp),
        list(&p.udp),
        list(&p.domains)
    );
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    Ok(())
}

pub async fn profile_list(c: &AdminClient, as_json: bool) -> anyhow::Result<()> {
    let r = c.profiles().await?;
    if as_json {
        crate::manage::print_json(&r);
        return Ok(());
    }
    println!("{:<20} {:<16} {:<10} {:<12} {:<30} DEVICES", "NAME", "TCP", "UDP", "TLS", "DOMAINS");
    for p in &r.profiles {
        let d = &p.profile;
        println!(
            "{:<20} {:<16} {:<10} {:<12} {:<30} {}",
            p.name,
            list(&d.tcp),
            list(&d.udp),
            list(&d.tls_required),
            list(&d.domains),
            list(&p.devices)
        );
    }
    Ok(())
}

pub async fn device_profile(c: &AdminClient, id: &str, profile: Option<&str>) -> anyhow::Result<()> {
    let r = c.set_device_profile(id, profile).await?;
    match r.device.profile.as_deref() {
        Some(p) => println!("device {id} now has profile {p}"),
        None => println!("device {id} has no profile (nothing is allowed to listen)"),
    }
    Ok(())
}

/// `portcullis audit run`'s flags.
#[derive(clap::Args)]
pub struct RunFlags {
    /// Only this device.
    #[arg(long, conflicts_with = "group")]
    pub device: Option<String>,
    /// Only the devices of this group.
    #[arg(long)]
    pub group: Option<String>,
    /// Only this address (must belong to an inventory device); repeatable.
    #[arg(long = "address")]
    pub addresses: Vec<String>,
    /// Ports: `default` (the IoT list), lists and ranges (`22,80,8000-8100`), or `all`.
    #[arg(long)]
    pub ports: Option<String>,
    /// Global cap on probes per second [default: 10000].
    #[arg(long)]
    pub rate: Option<u32>,
    /// Concurrent probes per device [default: 64].
    #[arg(long)]
    pub per_device: Option<usize>,
    /// TCP connect timeout in milliseconds [default: 1500].
    #[arg(long = "connect-timeout")]
    pub connect_timeout_ms: Option<u64>,
    /// Login attempts per device over all its services [default: 150].
    #[arg(long)]
    pub attempts: Option<u32>,
    /// Extra credentials to try, `user:password` per line.
    #[arg(long)]
    pub credentials: Option<std::path::PathBuf>,
    /// Skip the default-credential check.
    #[arg(long)]
    pub no_credentials: bool,
    /// Exposure check alone: connect scan, no identification, TLS checks or logins.
    #[arg(long)]
    pub scan_only: bool,
    /// Device certificates expiring within this many days are findings [default: 7].
    #[arg(long)]
    pub cert_expiry_days: Option<u32>,
    /// Print the planned probes and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// The finished run and its findings as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(c: &AdminClient, f: RunFlags) -> anyhow::Result<()> {
    let creds = match &f.credentials {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            portcullis_audit::creds::parse_list(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        }
        None => Vec::new(),
    };
    let req = json!({
        "device": f.device, "group": f.group, "addresses": f.addresses, "ports": f.ports,
        "rate": f.rate, "per_device": f.per_device, "connect_timeout_ms": f.connect_timeout_ms,
        "attempts": f.attempts, "credentials": creds, "no_credentials": f.no_credentials, "scan_only": f.scan_only, "cert_expiry_days": f.cert_expiry_days, "dry_run": f.dry_run,
    });
    let id = match c.start_audit(&req).await? {
        wire::AuditStarted::Plan { plan, .. } => {
            if f.json {
                crate::manage::print_json(&plan);
            } else {
                print_plan(&plan);
            }
            return Ok(());
        }
        wire::AuditStarted::Run { run, .. } => run,
    };
    let tty = std::io::stderr().is_terminal() && !f.json;
    if !f.json {
        eprintln!("audit run {id} started");
    }
    let mut last_line = String::new();
    let mut last_print = std::time::Instant::now();
    let done = loop {
        let v = c.audit_run(&id.to_string()).await?;
        if v.run.status != "running" {
            break v;
        }
        if let Some(p) = v.progress.as_ref().filter(|_| !f.json) {
            let planned = p.probes_planned.max(1);
            let done = p.probes_done;
            let line = format!(
                "{} devices {}/{}, probes {done}/{planned}, open ports {}, logins {}",
                p.phase, p.devices_done, p.devices, p.open_ports, p.login_attempts
            );
            if tty {
                let width = 30usize;
                let filled = (done as usize * width / planned as usize).min(width);
                eprint!(
                    "\r[{}{}] {:>3}% {line}   ",
                    "#".repeat(filled),
                    ".".repeat(width - filled),
                    done * 100 / planned
                );
                let _ = std::io::stderr().flush();
            } else if line != last_line && last_print.elapsed() >= Duration::from_secs(2) {
                eprintln!("progress: {line}");
                last_line = line;
                last_print = std::time::Instant::now();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if tty {
        eprintln!();
    }
    if f.json {
        crate::manage::print_json(&done);
        return Ok(());
    }
    print_findings(&done);
    if done.run.status != "finished" {
        let why = match &done.run.summary {
            AuditSummary::Failed { error } => error.clone(),
            _ => "no summary".to_owned(),
        };
        anyhow::bail!("audit run {id} {}: {why}", done.run.status);
    }
    Ok(())
}

fn print_plan(p: &portcullis_audit::PlanView) {
    println!(
        "dry run: {} probes over ports {} ({} ports) at most {}/s, {} at a time per device; login attempts per device: {}",
        p.scan_probes,
        if p.ports.is_empty() { "-" } else { &p.ports },
        p.port_count,
        p.rate_per_second,
        p.per_device_concurrency,
        p.login_attempts_per_device
    );
    for d in &p.devices {
        println!(
            "  {:<20} profile {:<14} addresses {:<24} probes {}",
            d.device,
            d.profile.as_deref().unwrap_or("-"),
            list(&d.addresses),
            d.probes
        );
    }
    println!("  then: {}", p.then);
    for n in &p.notes {
        println!("  note: {n}");
    }
}

fn print_findings(v: &wire::AuditRunDetail) {
    let run = &v.run;
    let t = match &run.summary {
        AuditSummary::Finished(t) => t.as_ref().clone(),
        _ => AuditTotals::default(),
    };
    println!(
        "audit run {} {}: {} devices, {} probes in {} s ({}/s), {} open ports; findings: {} new, {} still open, {} resolved",
        run.id,
        run.status,
        t.devices,
        t.scan_probes,
        t.seconds,
        t.probes_per_second,
        t.open_ports,
        t.findings.new,
        t.findings.still_open,
        t.findings.resolved
    );
    println!("{:<9} {:<9} {:<16} {:<22} FINDING", "STATUS", "SEVERITY", "DEVICE", "TARGET");
    for f in &v.findings {
        println!("{:<9} {:<9} {:<16} {:<22} {}", f.status, f.severity, f.device, f.target, f.title);
    }
    for n in &t.not_tested {
        println!("NOT TESTED {:<16} {:<22} {}: {}", n.device, n.target, n.check, n.reason);
    }
    for n in &t.notes {
        println!("note: {n}");
    }
    println!("details: portcullis audit report {} --format markdown|html|json", run.id);
}
pub async fn report(c: &AdminClient, run: Option<&str>, format: &str) -> anyhow::Result<()> {
    let run = run.unwrap_or("latest");
    let body = c.get_text(&format!("/v1/audit/runs/{run}/report?format={format}")).await?;
    print!("{body}");
    Ok(())
}

pub async fn runs(c: &AdminClient, as_json: bool) -> anyhow::Result<()> {
    let r = c.audit_runs().await?;
    if as_json {
        crate::manage::print_json(&r);
        return Ok(());
    }
    println!(
        "{:<5} {:<26} {:<12} {:<8} {:<6} {:<6} RESOLVED",
        "RUN", "STARTED", "STATUS", "DEVICES", "NEW", "OPEN"
    );
    for x in &r.runs {
        let (devices, new, open, resolved) = match &x.summary {
            AuditSummary::Finished(t) => (
                t.devices.to_string(),
                t.findings.new.to_string(),
                t.findings.still_open.to_string(),
                t.findings.resolved.to_string(),
            ),
            _ => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let started = x.started_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        println!(
            "{:<5} {:<26} {:<12} {:<8} {:<6} {:<6} {resolved}",
            x.id, started, x.status, devices, new, open
        );
    }
    Ok(())
}
