//! Running an audit: resolve the scope to inventory addresses, scan, identify, check,
//! diff against the previous run, persist.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use portcullis_core::{Cidr, DeviceState};
use portcullis_store::{
    Actor, AuditScope, AuditSummary, AuditTotals, Device, FindingCounts, FindingRecord, NotTested, Store,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::creds::{self, Credential};
use crate::finding::{Finding, Severity};
use crate::probe::{Kind, Prober, Service, Timeouts};
use crate::rules::{default_credential, firmware_finding, identity_checks, legacy_tls, port_findings};
use crate::scan::{self, PortState};
use crate::{ports, wire};
use portcullis_store::Profile;

/// What to audit and how hard to push: the scope (recorded with the run) and the
/// operator's credentials to try after the built-in list (never recorded or echoed; the
/// run records only how many there were).
#[derive(Debug, Clone, Default)]
pub struct AuditRequest {
    /// What to audit.
    pub scope: AuditScope,
    /// Operator-supplied credentials.
    pub credentials: Vec<Credential>,
}

impl<'de> Deserialize<'de> for AuditRequest {
    /// The scope's fields and `credentials`, in one object (as the admin API takes it).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut fields = serde_json::Map::<String, Value>::deserialize(d)?;
        if fields.contains_key("operator_credentials") {
            return Err(D::Error::custom("unknown field `operator_credentials`: it is recorded, not asked"));
        }
        let credentials = match fields.remove("credentials") {
            Some(v) => {
                serde_json::from_value(v).map_err(|e| D::Error::custom(format!("credentials: {e}")))?
            }
            None => Vec::new(),
        };
        let scope = AuditScope::deserialize(Value::Object(fields)).map_err(D::Error::custom)?;
        Ok(Self { scope, credentials })
    }
}

impl AuditRequest {
    /// What is recorded of the request: the scope and how many credentials came with it.
    pub fn scope(&self) -> AuditScope {
        AuditScope { operator_credentials: self.credentials.len(), ..self.scope.clone() }
    }
}

/// Defaults and hard caps.
pub mod limits {
    /// Default probes per second, over the whole run.
    pub const RATE: u32 = 10_000;
    /// Highest accepted probe rate.
    pub const MAX_RATE: u32 = 100_000;
    /// Default concurrent probes per device.
    pub const PER_DEVICE: usize = 64;
    /// Most sockets open at once.
    pub const SOCKETS: usize = 1024;
    /// Default connect timeout.
    pub const CONNECT_MS: u64 = 1500;
    /// Default login attempts per device.
    pub const ATTEMPTS: u32 = 150;
    /// Default certificate-expiry horizon: the agent renews with a third of the lifetime
    /// left (10 days of the default 30), so a week left means renewal has failed.
    pub const EXPIRY_DAYS: u32 = 7;
}

/// Why an audit cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The request asks for something the guard rails refuse, or is malformed.
    #[error("{0}")]
    Refused(String),
    /// Another audit runs.
    #[error("audit run {0} is still running; wait for it to finish")]
    Busy(i64),
    /// The store failed.
    #[error("registry store: {0}")]
    Store(#[from] portcullis_store::Error),
}

/// One device to audit: its registry record, its profile and the addresses it is probed at.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) device: Device,
    pub(crate) profile_name: Option<String>,
    pub(crate) profile: Option<Profile>,
    pub(crate) addrs: Vec<IpAddr>,
}

/// A resolved audit: who gets probed where.
#[derive(Debug)]
pub struct Plan {
    targets: Vec<Target>,
    ports: Vec<u16>,
    notes: Vec<String>,
    rate: u32,
    per_device: usize,
    connect: Duration,
    attempts: u32,
    creds: Vec<Credential>,
    expiry_days: u32,
    scan_only: bool,
}

impl Plan {
    /// Connection attempts of the port scan.
    pub fn scan_probes(&self) -> u64 {
        self.targets.iter().map(|t| t.addrs.len() as u64).sum::<u64>() * self.ports.len() as u64
    }

    /// What `--dry-run` prints.
    pub fn describe(&self) -> PlanView {
        PlanView {
            devices: self
                .targets
                .iter()
                .map(|t| PlannedDevice {
                    device: t.device.id.to_string(),
                    state: t.device.state,
                    profile: t.profile_name.clone(),
                    addresses: t.addrs.clone(),
                    probes: (t.addrs.len() * self.ports.len()) as u64,
                })
                .collect(),
            ports: compress(&self.ports),
            port_count: self.ports.len(),
            scan_probes: self.scan_probes(),
            rate_per_second: self.rate,
            per_device_concurrency: self.per_device,
            connect_timeout_ms: self.connect.as_millis() as u64,
            login_attempts_per_device: if self.creds.is_empty() { 0 } else { self.attempts },
            credentials: self.creds.len(),
            then: if self.scan_only {
                "nothing more (scan only)"
            } else {
                "each open port: service identification (banner, TLS, HTTP, MQTT, RTSP), plaintext and TLS checks, default credentials"
            }
            .to_owned(),
            notes: self.notes.clone(),
        }
    }
}

/// A dry run's answer: who would be probed where, and how hard.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanView {
    /// Each device in scope.
    pub devices: Vec<PlannedDevice>,
    /// The ports, compressed (`22,80,8000-8100`).
    pub ports: String,
    /// How many ports.
    pub port_count: usize,
    /// Connection probes of the scan.
    pub scan_probes: u64,
    /// Probe rate cap.
    pub rate_per_second: u32,
    /// Probes at once per device.
    pub per_device_concurrency: usize,
    /// Connect timeout.
    pub connect_timeout_ms: u64,
    /// Login attempts per device (0: no credential check).
    pub login_attempts_per_device: u32,
    /// Credentials that would be tried.
    pub credentials: usize,
    /// What follows the scan.
    pub then: String,
    /// Notes (limits applied, addresses skipped).
    pub notes: Vec<String>,
}

/// One device of a plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedDevice {
    /// Its id.
    pub device: String,
    /// Its state.
    pub state: DeviceState,
    /// Its profile.
    pub profile: Option<String>,
    /// The addresses it would be probed at.
    pub addresses: Vec<IpAddr>,
    /// Probes at those addresses.
    pub probes: u64,
}

/// A running audit's progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgressView {
    /// The run.
    pub run: i64,
    /// `running` or `finished`.
    pub status: String,
    /// What it is doing (`scanning`, `registry checks`, `saving`, `done`).
    pub phase: String,
    /// Probes planned.
    pub probes_planned: u64,
    /// Probes made.
    pub probes_done: u64,
    /// Devices in scope.
    pub devices: u64,
    /// Devices done.
    pub devices_done: u64,
    /// Open ports found so far.
    pub open_ports: u64,
    /// Login attempts so far.
    pub login_attempts: u64,
}

/// `1-3,7` from a sorted port list.
pub fn compress(ports: &[u16]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < ports.len() {
        let mut j = i;
        while j + 1 < ports.len() && ports[j + 1] == ports[j] + 1 {
            j += 1;
        }
        out.push(if i == j { ports[i].to_string() } else { format!("{}-{}", ports[i], ports[j]) });
        i = j + 1;
    }
    out.join(",")
}

/// Live progress of a run.
#[derive(Debug, Default)]
pub struct Progress {
    planned: AtomicU64,
    done: AtomicU64,
    devices: AtomicU64,
    devices_done: AtomicU64,
    open_ports: AtomicU64,
    logins: AtomicU64,
    finished: AtomicBool,
    phase: Mutex<&'static str>,
}

impl Progress {
    fn snapshot(&self, run: i64) -> ProgressView {
        ProgressView {
            run,
            status: if self.finished.load(Ordering::Relaxed) { "finished" } else { "running" }.to_owned(),
            phase: (*self.phase.lock().unwrap_or_else(|e| e.into_inner())).to_owned(),
            probes_planned: self.planned.load(Ordering::Relaxed),
            probes_done: self.done.load(Ordering::Relaxed),
            devices: self.devices.load(Ordering::Relaxed),
            devices_done: self.devices_done.load(Ordering::Relaxed),
            open_ports: self.open_ports.load(Ordering::Relaxed),
            login_attempts: self.logins.load(Ordering::Relaxed),
        }
    }

    fn phase(&self, p: &'static str) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }
}

/// A device running older firmware than the newest published for its hardware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outdated {
    /// The device.
    pub device: String,
    /// Its hardware model, as its agent reported it.
    pub hardware: String,
    /// The version it last reported running.
    pub installed: String,
    /// The newest version published for that hardware.
    pub newest: String,
}

/// Where the audit learns which devices run outdated firmware: the firmware service's
/// fleet view (what each device's agent last reported against the published targets).
pub trait FirmwareView: Send + Sync {
    /// Every device behind the newest published version of its hardware.
    fn outdated(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Outdated>, String>> + Send + '_>>;
}

/// Runs audits against the inventory in `store`; one at a time.
pub struct Auditor {
    store: Arc<dyn Store>,
    log_dir: Option<PathBuf>,
    firmware: Option<Arc<dyn FirmwareView>>,
    current: Mutex<Option<(i64, Arc<Progress>)>>,
    /// Held while a run is being registered, so two starts cannot both pass the check.
    starting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor").field("log_dir", &self.log_dir).finish_non_exhaustive()
    }
}

/// How a start request ended.
#[derive(Debug)]
pub enum Started {
    /// The run, going on in the background.
    Run(i64),
    /// `dry_run`: what would be probed.
    Plan(PlanView),
}

impl Auditor {
    /// An auditor over `store`, writing each run's probe log into `log_dir`; with
    /// `firmware`, a run also reports devices behind the newest published firmware.
    pub fn new(
        store: Arc<dyn Store>,
        log_dir: Option<PathBuf>,
        firmware: Option<Arc<dyn FirmwareView>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            log_dir,
            firmware,
            current: Mutex::new(None),
            starting: tokio::sync::Mutex::new(()),
        })
    }

    /// Resolves a request against the inventory. Every probed address is a host
    /// address of an inventory device; anything else is refused.
    pub async fn plan(&self, req: &AuditRequest) -> Result<Plan, AuditError> {
        let refuse = |s: String| AuditError::Refused(s);
        let ports = ports::parse(req.scope.ports.as_deref().unwrap_or("default")).map_err(refuse)?;
        let rate = req.scope.rate.unwrap_or(limits::RATE);
        if rate == 0 || rate > limits::MAX_RATE {
            return Err(refuse(format!("rate: {rate} probes/s is outside 1-{}", limits::MAX_RATE)));
        }
        let per_device = req.scope.per_device.unwrap_or(limits::PER_DEVICE);
        if per_device == 0 || per_device > limits::SOCKETS {
            return Err(refuse(format!("per_device: {per_device} is outside 1-{}", limits::SOCKETS)));
        }
        let connect = Duration::from_millis(
            req.scope.connect_timeout_ms.unwrap_or(limits::CONNECT_MS).clamp(50, 30_000),
        );
        let devices = self.store.devices().await?;
        let profiles: HashMap<String, Profile> =
            self.store.profiles().await?.into_iter().map(|p| (p.name, p.document)).collect();
        if let Some(d) = &req.scope.device
            && !devices.iter().any(|x| x.id.as_str() == d)
        {
            return Err(refuse(format!("device {d} is not in the inventory")));
        }
        if let Some(g) = &req.scope.group
            && !devices.iter().any(|x| x.group.as_str() == g)
        {
            return Err(refuse(format!("group {g} has no devices in the inventory")));
        }
        let mut wanted: Vec<IpAddr> = Vec::new();
        for a in &req.scope.addresses {
            let ip: IpAddr =
                a.trim().parse().map_err(|_| refuse(format!("address {a:?} is not an IP address")))?;
            wanted.push(ip);
        }
        let mut notes = Vec::new();
        let mut targets = Vec::new();
        let mut matched: BTreeSet<IpAddr> = BTreeSet::new();
        for d in devices {
            if req.scope.device.as_deref().is_some_and(|x| x != d.id.as_str())
                || req.scope.group.as_deref().is_some_and(|g| g != d.group.as_str())
            {
                continue;
            }
            let mut addrs = Vec::new();
            for a in &d.addresses {
                let Ok(c) = a.parse::<Cidr>() else { continue };
                let host = c.addr();
                let is_host = (host.is_ipv4() && c.len() == 32) || (host.is_ipv6() && c.len() == 128);
                if !is_host {
                    notes.push(format!(
                        "{}: address range {a} not scanned; give the device its host address",
                        d.id
                    ));
                    continue;
                }
                if wanted.is_empty() || wanted.contains(&host) {
                    matched.insert(host);
                    addrs.push(host);
                }
            }
            if !wanted.is_empty() && addrs.is_empty() {
                continue;
            }
            if addrs.is_empty() {
                notes.push(format!("{}: no address in the registry; only registry checks ran", d.id));
            }
            let profile = d.profile.as_ref().and_then(|p| profiles.get(p).cloned());
            targets.push(Target { profile_name: d.profile.clone(), profile, addrs, device: d });
        }
        for w in &wanted {
            if !matched.contains(w) {
                return Err(refuse(format!(
                    "{w} is not the address of any device in scope; the audit probes only inventory devices \
                     (add it with `portcullis device addresses ID {w}`)"
                )));
            }
        }
        if targets.is_empty() {
            return Err(refuse("no devices in scope".into()));
        }
        let mut creds = Vec::new();
        if !req.scope.no_credentials && !req.scope.scan_only {
            creds = creds::built_in();
            for c in &req.credentials {
                if !creds.contains(c) {
                    creds.push(c.clone());
                }
            }
        }
        if self.firmware.is_none() {
            notes.push("firmware: skipped; no firmware service to compare against".to_owned());
        }
        Ok(Plan {
            targets,
            ports,
            notes,
            rate,
            per_device,
            connect,
            attempts: req.scope.attempts.unwrap_or(limits::ATTEMPTS),
            creds,
            expiry_days: req.scope.cert_expiry_days.unwrap_or(limits::EXPIRY_DAYS),
            scan_only: req.scope.scan_only,
        })
    }

    /// Starts a run in the background (or returns the plan for a dry run).
    pub async fn start(self: &Arc<Self>, req: AuditRequest, actor: Actor) -> Result<Started, AuditError> {
        let plan = self.plan(&req).await?;
        if req.scope.dry_run {
            return Ok(Started::Plan(plan.describe()));
        }
        let progress = Arc::new(Progress::default());
        let _one_at_a_time = self.starting.lock().await;
        let run = {
            if let Some(id) = self.running() {
                return Err(AuditError::Busy(id));
            }
            let id = self.store.start_audit_run(req.scope(), actor).await?;
            let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
            *cur = Some((id, progress.clone()));
            id
        };
        let me = self.clone();
        tokio::spawn(async move {
            let out = me.execute(run, plan, progress.clone()).await;
            if let Err(e) = out {
                tracing::error!(run, error = %e, "audit run failed");
                let _ = me
                    .store
                    .finish_audit_run(
                        run,
                        "failed",
                        AuditSummary::Failed { error: e.to_string() },
                        vec![],
                        vec![],
                    )
                    .await;
            }
            progress.finished.store(true, Ordering::Relaxed);
        });
        Ok(Started::Run(run))
    }

    fn running(&self) -> Option<i64> {
        let cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        cur.as_ref().filter(|(_, p)| !p.finished.load(Ordering::Relaxed)).map(|(id, _)| *id)
    }

    /// Progress of the current (or last) run started by this process.
    pub fn progress(&self, run: i64) -> Option<ProgressView> {
        let cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        cur.as_ref().filter(|(id, _)| *id == run).map(|(id, p)| p.snapshot(*id))
    }

    async fn execute(&self, run: i64, plan: Plan, progress: Arc<Progress>) -> Result<(), AuditError> {
        let started = Instant::now();
        progress.planned.store(plan.scan_probes(), Ordering::Relaxed);
        progress.devices.store(plan.targets.len() as u64, Ordering::Relaxed);
        progress.phase("scanning");
        let log = ProbeLog::open(self.log_dir.as_ref(), run);
        let ctx = Arc::new(Ctx {
            pace: scan::Pace::new(plan.rate),
            sockets: Semaphore::new(limits::SOCKETS),
            prober: Prober {
                t: Timeouts {
                    connect: plan.connect,
                    banner: Duration::from_millis(800),
                    io: Duration::from_secs(3),
                },
                tls: crate::probe::tls_connector(),
                inspect: crate::probe::inspect_connector(),
            },
            log,
            progress: progress.clone(),
            per_device: plan.per_device,
            creds: plan.creds.clone(),
            attempts: plan.attempts,
            scan_only: plan.scan_only,
        });
        let open = scan_phase(&ctx, &plan).await;
        progress.phase("checking open ports");
        let parallel_devices = (limits::SOCKETS / plan.per_device).max(1);
        let results: Vec<(Target, DeviceResult)> = stream::iter(plan.targets.clone().into_iter().enumerate())
            .map(|(i, t)| {
                let ctx = ctx.clone();
                let open: Vec<(IpAddr, Vec<u16>)> = open.get(&i).cloned().unwrap_or_default();
                async move {
                    let r = audit_device(&ctx, &t, open).await;
                    ctx.progress.devices_done.fetch_add(1, Ordering::Relaxed);
                    (t, r)
                }
            })
            .buffer_unordered(parallel_devices)
            .collect()
            .await;
        progress.phase("registry checks");
        let mut findings: Vec<Finding> = Vec::new();
        let certs = self.store.certificates(None).await?;
        let now = OffsetDateTime::now_utc();
        let mut not_tested: Vec<NotTested> = Vec::new();
        for (t, r) in &results {
            findings.extend(r.findings.iter().cloned());
            findings.extend(identity_checks(t, r.seen, &certs, now, plan.expiry_days));
            not_tested.extend(r.not_tested.iter().cloned());
        }
        // Firmware currency, from the firmware service's fleet view. If it cannot be read,
        // earlier firmware findings stay open (not resolved by a check that did not run).
        let (firmware_ran, firmware_check) = match &self.firmware {
            None => (false, "skipped: no firmware service".to_owned()),
            Some(view) => match view.outdated().await {
                Ok(outdated) => {
                    let by_device: BTreeMap<&str, &Outdated> =
                        outdated.iter().map(|o| (o.device.as_str(), o)).collect();
                    for (t, _) in &results {
                        if let Some(o) = by_device.get(t.device.id.as_str()) {
                            findings.push(firmware_finding(o));
                        }
                    }
                    (true, "ran".to_owned())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "audit: firmware fleet view unavailable; firmware check skipped");
                    (false, format!("failed: {e}"))
                }
            },
        };
        progress.phase("saving");
        let scanned_ports: BTreeSet<u16> = plan.ports.iter().copied().collect();
        let devices: Vec<String> = results.iter().map(|(t, _)| t.device.id.to_string()).collect();
        let scanned_devices: BTreeSet<String> = results
            .iter()
            .filter(|(t, _)| !t.addrs.is_empty())
            .map(|(t, _)| t.device.id.to_string())
            .collect();
        let untested: BTreeSet<(&str, &str)> =
            not_tested.iter().map(|n| (n.device.as_str(), n.target.as_str())).collect();
        let previous = self.store.previous_findings(devices.clone(), run).await?;
        let credentials_ran = !plan.creds.is_empty();
        let records = diff(&findings, previous, |f| {
            // A previous finding is resolved only if this run looked where it was seen.
            let port = f.target.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
            match port {
                None => f.check != "firmware" || firmware_ran,
                Some(p) => {
                    scanned_devices.contains(&f.device)
                        && scanned_ports.contains(&p)
                        && (f.check == "exposure" || !plan.scan_only)
                        && (f.check != "credentials"
                            || (credentials_ran
                                && !untested.contains(&(f.device.as_str(), f.target.as_str()))))
                }
            }
        });
        let mut by_sev: BTreeMap<&str, u64> = BTreeMap::new();
        let (mut new, mut open, mut resolved) = (0u64, 0u64, 0u64);
        for r in &records {
            match r.status.as_str() {
                "new" => new += 1,
                "open" => open += 1,
                _ => resolved += 1,
            }
            if r.status != "resolved" {
                *by_sev.entry(Severity::parse(&r.severity).as_str()).or_default() += 1;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let probes = progress.done.load(Ordering::Relaxed);
        let skipped_if_scan_only = if plan.scan_only { "skipped (scan only)" } else { "ran" };
        let checks = [
            ("exposure", "ran".to_owned()),
            ("service", skipped_if_scan_only.to_owned()),
            ("plaintext", skipped_if_scan_only.to_owned()),
            ("tls", skipped_if_scan_only.to_owned()),
            ("credentials", if credentials_ran { "ran" } else { "skipped" }.to_owned()),
            ("identity", "ran".to_owned()),
            ("firmware", firmware_check),
        ];
        let summary = AuditSummary::Finished(Box::new(AuditTotals {
            devices: devices.len() as u64,
            devices_scanned: scanned_devices.len() as u64,
            ports: compress(&plan.ports),
            scan_probes: probes,
            open_ports: progress.open_ports.load(Ordering::Relaxed),
            login_attempts: progress.logins.load(Ordering::Relaxed),
            seconds: (elapsed * 1000.0).round() / 1000.0,
            probes_per_second: if elapsed > 0.0 { (probes as f64 / elapsed).round() } else { 0.0 },
            findings: FindingCounts { new, still_open: open, resolved },
            open_by_severity: by_sev.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            checks: checks.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            not_tested,
            notes: plan.notes,
            probe_log: ctx.log.path.as_ref().map(|p| p.display().to_string()),
        }));
        ctx.log.flush();
        self.store.finish_audit_run(run, "finished", summary, devices, records).await?;
        progress.phase("done");
        tracing::info!(run, seconds = elapsed, probes, new, open, resolved, "audit run finished");
        Ok(())
    }
}

/// Marks `current` new or open against `previous`, and adds the previous findings that
/// are gone (where `looked(previous)` says this run would have seen them) as resolved.
fn diff(
    current: &[Finding],
    previous: Vec<FindingRecord>,
    looked: impl Fn(&FindingRecord) -> bool,
) -> Vec<FindingRecord> {
    let before: BTreeSet<(String, String)> =
        previous.iter().map(|f| (f.device.clone(), f.key.clone())).collect();
    let now: BTreeSet<(String, String)> = current.iter().map(|f| (f.device.clone(), f.key.clone())).collect();
    let mut out: Vec<FindingRecord> = current
        .iter()
        .map(|f| f.record(if before.contains(&(f.device.clone(), f.key.clone())) { "open" } else { "new" }))
        .collect();
    for mut p in previous {
        if !now.contains(&(p.device.clone(), p.key.clone())) {
            if looked(&p) {
                p.status = "resolved".into();
            } else {
                // Not looked at this time: still open as far as anyone knows.
                p.status = "open".into();
            }
            out.push(p);
        }
    }
    out.sort_by(|a, b| (&a.device, &a.key).cmp(&(&b.device, &b.key)));
    out
}

struct Ctx {
    pace: scan::Pace,
    sockets: Semaphore,
    prober: Prober,
    log: ProbeLog,
    progress: Arc<Progress>,
    per_device: usize,
    creds: Vec<Credential>,
    attempts: u32,
    scan_only: bool,
}

impl Ctx {
    /// Waits for the global pace (probes other than the connect scan's).
    async fn paced(&self) {
        let at = self.pace.slot();
        if at > std::time::Instant::now() + Duration::from_millis(1) {
            tokio::time::sleep_until(at.into()).await;
        }
    }
}

/// Every probe of a run, one JSON line each, in `audit/run-N.probes.jsonl`.
struct ProbeLog {
    path: Option<PathBuf>,
    out: Option<Mutex<BufWriter<File>>>,
}

impl ProbeLog {
    fn open(dir: Option<&PathBuf>, run: i64) -> Self {
        let Some(dir) = dir else { return Self { path: None, out: None } };
        let path = dir.join(format!("run-{run}.probes.jsonl"));
        let file = std::fs::create_dir_all(dir).and_then(|_| {
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            o.open(&path)
        });
        match file {
            Ok(f) => {
                Self { path: Some(path), out: Some(Mutex::new(BufWriter::with_capacity(256 * 1024, f))) }
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "audit: cannot write the probe log");
                Self { path: None, out: None }
            }
        }
    }

    fn write(&self, device: &str, addr: SocketAddr, probe: &str, result: &str) {
        tracing::trace!(device, %addr, probe, result, "audit probe");
        if let Some(out) = &self.out {
            let t = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
            let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
            let line = format!(
                "{{\"t_ms\":{t},\"device\":{},\"addr\":\"{addr}\",\"probe\":{},\"result\":{}}}\n",
                q(device),
                q(probe),
                q(result)
            );
            let mut w = out.lock().unwrap_or_else(|e| e.into_inner());
            let _ = w.write_all(line.as_bytes());
        }
    }

    fn flush(&self) {
        if let Some(out) = &self.out {
            let _ = out.lock().unwrap_or_else(|e| e.into_inner()).flush();
        }
    }
}

/// The connect scan of every target address, on one thread per core (see [`scan`]).
/// Returns, per target index, the open ports of each of its addresses.
async fn scan_phase(ctx: &Arc<Ctx>, plan: &Plan) -> HashMap<usize, Vec<(IpAddr, Vec<u16>)>> {
    let addrs: Vec<(usize, IpAddr)> =
        plan.targets.iter().enumerate().flat_map(|(i, t)| t.addrs.iter().map(move |a| (i, *a))).collect();
    let ids: Arc<Vec<String>> = Arc::new(plan.targets.iter().map(|t| t.device.id.to_string()).collect());
    let threads =
        std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8).min(addrs.len().max(1));
    let mut handles = Vec::new();
    for n in 0..threads {
        // Global index of each address, so results map back.
        let mine: Vec<(usize, IpAddr)> =
            addrs.iter().enumerate().filter(|(k, _)| k % threads == n).map(|(k, (_, ip))| (k, *ip)).collect();
        let (ctx, ids, ports) = (ctx.clone(), ids.clone(), plan.ports.clone());
        let owner: Vec<(usize, IpAddr)> = addrs.clone();
        let (per_target, timeout) = (ctx.per_device, ctx.prober.t.connect);
        handles.push(tokio::task::spawn_blocking(move || {
            let mut open: Vec<(usize, u16)> = Vec::new();
            scan::scan(&mine, &ports, per_target, limits::SOCKETS / threads, timeout, &ctx.pace, |o| {
                ctx.progress.done.fetch_add(1, Ordering::Relaxed);
                let (device, ip) = owner[o.target];
                ctx.log.write(&ids[device], SocketAddr::new(ip, o.port), "tcp-connect", o.detail);
                if o.state == PortState::Open {
                    open.push((o.target, o.port));
                }
            });
            open
        }));
    }
    let mut by_addr: BTreeMap<usize, Vec<u16>> = BTreeMap::new();
    for h in handles {
        for (k, port) in h.await.unwrap_or_default() {
            by_addr.entry(k).or_default().push(port);
        }
    }
    let mut out: HashMap<usize, Vec<(IpAddr, Vec<u16>)>> = HashMap::new();
    for (k, (target, ip)) in addrs.iter().enumerate() {
        let mut ports = by_addr.remove(&k).unwrap_or_default();
        ports.sort_unstable();
        out.entry(*target).or_default().push((*ip, ports));
    }
    out
}

/// What one device's checks found.
struct DeviceResult {
    findings: Vec<Finding>,
    /// Anything answered on any of its addresses.
    seen: bool,
    not_tested: Vec<NotTested>,
}

/// Identifies and checks one device's open ports.
async fn audit_device(ctx: &Ctx, t: &Target, scanned: Vec<(IpAddr, Vec<u16>)>) -> DeviceResult {
    let id = t.device.id.as_str();
    let mut not_tested = Vec::new();
    let mut findings = Vec::new();
    let mut seen = false;
    let mut attempts_left = ctx.attempts;
    for (ip, open) in scanned {
        ctx.progress.open_ports.fetch_add(open.len() as u64, Ordering::Relaxed);
        if !open.is_empty() {
            seen = true;
        }
        if ctx.scan_only {
            for port in open {
                let svc = Service {
                    kind: Kind::Unknown,
                    tls: None,
                    banner: String::new(),
                    http: None,
                    mqtt_anonymous: None,
                };
                findings.extend(port_findings(id, t, SocketAddr::new(ip, port), &svc, true, false));
            }
            continue;
        }
        let mut services: Vec<(SocketAddr, Service)> = stream::iter(open)
            .map(|port| async move {
                let addr = SocketAddr::new(ip, port);
                let _permit = ctx.sockets.acquire().await;
                ctx.paced().await;
                let svc = ctx
                    .prober
                    .identify(addr, &mut |probe, result| ctx.log.write(id, addr, probe, result))
                    .await;
                let svc = svc.unwrap_or_else(|e| {
                    ctx.log.write(id, addr, "identify", &format!("failed: {e}"));
                    Service {
                        kind: Kind::Unknown,
                        tls: None,
                        banner: String::new(),
                        http: None,
                        mqtt_anonymous: None,
                    }
                });
                (addr, svc)
            })
            .buffer_unordered(ctx.per_device.min(16))
            .collect()
            .await;
        services.sort_by_key(|(a, _)| a.port());
        for (addr, svc) in services {
            // A silent port that rustls could not talk to may still be TLS, of a version
            // rustls refuses to speak: ask it in TLS 1.1.
            let legacy_only = svc.kind == Kind::Unknown && svc.tls.is_none() && svc.banner.is_empty();
            let mut legacy = None;
            if svc.tls.is_some() || legacy_only {
                ctx.paced().await;
                legacy = ctx.prober.legacy_tls(addr).await;
                ctx.log.write(id, addr, "tls-legacy-hello", legacy.map_or("refused", wire::tls_version_name));
            }
            findings.extend(port_findings(id, t, addr, &svc, false, legacy.is_some()));
            if let Some(v) = legacy {
                findings.push(legacy_tls(id, addr, v));
            }
            match try_credentials(ctx, t, addr, &svc, &mut attempts_left).await {
                Creds::Accepted(f) => findings.push(*f),
                Creds::NotTested(reason) => {
                    ctx.log.write(id, addr, "credentials", &format!("not tested: {reason}"));
                    not_tested.push(NotTested {
                        device: id.to_owned(),
                        target: addr.to_string(),
                        check: "credentials".into(),
                        reason,
                    });
                }
                Creds::Refused => {}
            }
        }
    }
    DeviceResult { findings, seen, not_tested }
}

/// The outcome of the credential check on one service.
enum Creds {
    /// A default credential was accepted.
    Accepted(Box<Finding>),
    /// Every credential tried was refused, or the check does not apply.
    Refused,
    /// The check applied but could not be made.
    NotTested(String),
}

async fn try_credentials(ctx: &Ctx, t: &Target, addr: SocketAddr, svc: &Service, left: &mut u32) -> Creds {
    let id = t.device.id.as_str();
    let applicable = match svc.kind {
        Kind::Telnet | Kind::Ssh => true,
        Kind::Http => svc.http.as_ref().is_some_and(|h| h.status == 401 && h.basic_auth),
        // 4: bad user name or password, 5: not authorised — the broker wants a login.
        Kind::Mqtt => matches!(svc.mqtt_anonymous, Some(4 | 5)),
        _ => false,
    };
    if !applicable || ctx.creds.is_empty() {
        return Creds::Refused;
    }
    // A suspended or revoked device may be in someone else's hands: no passwords are
    // sent to it, even default ones.
    if t.device.state != DeviceState::Active {
        return Creds::NotTested(format!(
            "device is {}: no login is tried on a device that is not active",
            t.device.state
        ));
    }
    for (n, c) in ctx.creds.iter().enumerate() {
        if *left == 0 {
            ctx.log.write(id, addr, "login", "attempt budget exhausted");
            return Creds::NotTested(format!(
                "login attempt budget of the device used up after {} credentials",
                n
            ));
        }
        *left -= 1;
        ctx.paced().await;
        ctx.progress.logins.fetch_add(1, Ordering::Relaxed);
        let ok = ctx.prober.login(addr, svc, &c.user, &c.password).await;
        let probe = format!("{}-login user={}", svc.name(), c.user);
        match ok {
            Ok(true) => {
                ctx.log.write(id, addr, &probe, "accepted");
                return Creds::Accepted(Box::new(default_credential(id, addr, svc, &c.user, n + 1)));
            }
            Ok(false) => ctx.log.write(id, addr, &probe, "refused"),
            Err(e) => {
                ctx.log.write(id, addr, &probe, &format!("error: {e}"));
                // Nothing more to learn here: the service went away, does not take
                // passwords, or cannot be talked to (no common SSH algorithms, a TLS
                // handshake that cannot be verified).
                if matches!(e.kind(), std::io::ErrorKind::Unsupported | std::io::ErrorKind::InvalidData) {
                    return Creds::NotTested(format!("{} login: {e}", svc.name()));
                }
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    return Creds::NotTested(format!("{} stopped accepting connections: {e}", svc.name()));
                }
            }
        }
    }
    Creds::Refused
}
