//! The server side beyond the repository: rollouts, per-device directives, reports and
//! the fleet view. State lives in the registry (`firmware_rollouts`, `firmware_devices`,
//! `firmware_reports`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use portcullis_core::{DeviceId, DeviceState};
use portcullis_store::{Actor, FirmwareOutcome, FirmwareStatus, RolloutRecord, Store};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::repo::FirmwareRepo;
use crate::rollout::{self, Rollout, State};
use crate::{Error, TargetInfo};

/// The states a device reports.
pub const REPORT_STATES: [&str; 5] = ["downloading", "verified", "installed", "confirmed", "failed"];

/// What a device says about itself when it asks for a directive.
#[derive(Debug, Clone, Deserialize)]
pub struct CheckIn {
    /// Its hardware model.
    pub hardware: String,
    /// The version it runs.
    pub installed: String,
}

/// A device's status report.
pub use portcullis_store::FirmwareReport as Report;

/// Firmware on the server: repository plus fleet state.
#[derive(Debug)]
pub struct Firmware {
    repo: FirmwareRepo,
    store: Arc<dyn Store>,
    /// Serialises rollout read-modify-write.
    rollouts: tokio::sync::Mutex<()>,
    /// The rollouts as stored, read once per change: every device check reads them.
    cache: std::sync::RwLock<Option<Arc<Vec<Rollout>>>>,
    /// Bumped by every write, so a read that raced one never fills the cache.
    generation: std::sync::atomic::AtomicU64,
}

fn store_err(e: portcullis_store::Error) -> Error {
    Error::Refused(format!("registry: {e}"))
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Options of `rollout create`.
#[derive(Debug, Clone, Deserialize)]
pub struct NewRollout {
    /// Hardware model.
    pub hardware: String,
    /// Published version to roll out.
    pub version: String,
    /// Only this group.
    #[serde(default)]
    pub group: Option<String>,
    /// e.g. `5,25,100`.
    #[serde(default)]
    pub stages: Option<String>,
    /// e.g. `5%`.
    #[serde(default)]
    pub max_failure_rate: Option<String>,
    /// Reporting devices needed before the failure rate can pause the rollout
    /// (default [`rollout::DEFAULT_MIN_REPORTS`]).
    #[serde(default)]
    pub min_reports: Option<usize>,
}

impl Firmware {
    /// Firmware over `repo`, with fleet state in `store`.
    pub fn new(repo: FirmwareRepo, store: Arc<dyn Store>) -> Self {
        Self {
            repo,
            store,
            rollouts: tokio::sync::Mutex::new(()),
            cache: std::sync::RwLock::new(None),
            generation: Default::default(),
        }
    }

    /// Opens the repository in `data_dir/firmware` (creating it, keys included, on
    /// first use) over the registry `store`.
    pub fn open(data_dir: &std::path::Path, store: Arc<dyn Store>) -> Result<Arc<Self>, Error> {
        let repo = FirmwareRepo::open(&data_dir.join("firmware"), crate::repo::Expiry::default(), None)?;
        Ok(Arc::new(Self::new(repo, store)))
    }

    /// The repository's background task: re-signs the timestamp and snapshot before they
    /// expire (checked at once and every 10 minutes; each is re-signed once less than half
    /// its lifetime is left).
    pub fn start(self: &Arc<Self>, stop: portcullis_net::Shutdown) -> portcullis_net::Tasks {
        let mut tasks = portcullis_net::Tasks::new();
        let firmware = self.clone();
        let period = std::time::Duration::from_secs(600);
        tasks.every(period, portcullis_net::First::Now, stop, move || {
            let fw = firmware.clone();
            async move {
                match tokio::task::spawn_blocking(move || fw.repo().refresh(chrono::Utc::now())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot re-sign firmware metadata"),
                    Err(e) => tracing::error!(error = %e, "firmware refresh task failed"),
                }
            }
        });
        tasks
    }

    /// The repository.
    pub fn repo(&self) -> &FirmwareRepo {
        &self.repo
    }

    /// Every rollout.
    pub async fn rollouts(&self) -> Result<Vec<Rollout>, Error> {
        Ok(self.shared_rollouts().await?.as_ref().clone())
    }

    async fn shared_rollouts(&self) -> Result<Arc<Vec<Rollout>>, Error> {
        if let Some(cached) = self.cache.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(cached.clone());
        }
        use std::sync::atomic::Ordering;
        let generation = self.generation.load(Ordering::Acquire);
        let rows = self.store.rollouts().await.map_err(store_err)?;
        let all: Vec<Rollout> = rows.into_iter().map(Rollout).collect();
        let all = Arc::new(all);
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(Ordering::Acquire) == generation {
            *cache = Some(all.clone());
        }
        Ok(all)
    }

    async fn save(&self, id: Option<i64>, r: &Rollout, actor: Actor) -> Result<i64, Error> {
        let saved = self.store.save_rollout(id, r.0.clone(), actor).await.map_err(store_err);
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        *cache = None;
        saved
    }

    /// One rollout.
    pub async fn rollout(&self, id: i64) -> Result<Rollout, Error> {
        self.rollouts()
            .await?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| Error::Refused(format!("no rollout {id}")))
    }

    async fn devices_fw(&self) -> Result<HashMap<String, FirmwareStatus>, Error> {
        Ok(self.store.firmware_devices().await.map_err(store_err)?.into_iter().collect())
    }

    /// Creates a rollout of a published version. Its population: the active devices
    /// (of `group`, if given) that have checked in with this hardware model.
    pub async fn create_rollout(&self, req: NewRollout, actor: Actor) -> Result<Rollout, Error> {
        let stages =
            rollout::parse_stages(req.stages.as_deref().unwrap_or("5,25,100")).map_err(Error::Refused)?;
        let max_failure_rate =
            rollout::parse_rate(req.max_failure_rate.as_deref().unwrap_or("5%")).map_err(Error::Refused)?;
        let version: semver::Version =
            req.version.parse().map_err(|_| Error::Refused(format!("invalid version {:?}", req.version)))?;
        let target = self
            .repo
            .targets()?
            .into_iter()
            .find(|t| t.hardware == req.hardware && t.version == version)
            .ok_or_else(|| {
                Error::Refused(format!("version {version} is not published for hardware {}", req.hardware))
            })?;
        let _guard = self.rollouts.lock().await;
        if let Some(r) = self.rollouts().await?.into_iter().find(|r| {
            r.hardware == req.hardware
                && r.group == req.group
                && r.state != State::Aborted
                && r.version == req.version
        }) {
            return Err(Error::Refused(format!(
                "rollout {} already offers {version} to these devices",
                r.id
            )));
        }
        let fw = self.devices_fw().await?;
        let devices = self.store.devices().await.map_err(store_err)?;
        let eligible: Vec<String> = devices
            .into_iter()
            .filter(|d| d.state == DeviceState::Active)
            .filter(|d| req.group.as_deref().is_none_or(|g| d.group.as_str() == g))
            .filter(|d| fw.get(d.id.as_str()).is_some_and(|f| f.hardware == req.hardware))
            .map(|d| d.id.to_string())
            .collect();
        let mut r = Rollout(RolloutRecord {
            id: 0,
            hardware: req.hardware,
            version: version.to_string(),
            target: target.path,
            group: req.group,
            stages,
            stage: 0,
            max_failure_rate,
            min_reports: req.min_reports.unwrap_or(rollout::DEFAULT_MIN_REPORTS).max(1),
            state: State::Active,
            reason: None,
            population: Vec::new(),
            created_at: now_rfc3339(),
        });
        let id = self.save(None, &r, actor.clone()).await?;
        r.id = id;
        r.population = rollout::rank(id, eligible);
        self.save(Some(id), &r, actor).await?;
        Ok(r)
    }

    /// `advance`, `pause`, `resume` or `abort`.
    pub async fn change_rollout(&self, id: i64, action: &str, actor: Actor) -> Result<Rollout, Error> {
        let _guard = self.rollouts.lock().await;
        let mut r = self.rollout(id).await?;
        if r.state == State::Aborted {
            return Err(Error::Refused(format!("rollout {id} was aborted")));
        }
        match action {
            "advance" => {
                r.advance().map_err(Error::Refused)?;
            }
            "pause" => {
                r.state = State::Paused;
                r.reason = Some("paused by the operator".into());
            }
            "resume" => {
                r.state = State::Active;
                r.reason = None;
            }
            "abort" => {
                r.state = State::Aborted;
                r.reason = Some("aborted by the operator".into());
            }
            other => return Err(Error::Refused(format!("unknown rollout action {other:?}"))),
        }
        self.save(Some(id), &r, actor).await?;
        Ok(r)
    }

    /// What `device` should run: the newest version of an active rollout that admits
    /// it and is newer than what it runs. Records the check-in.
    pub async fn assignment(&self, device: &DeviceId, group: &str, check: CheckIn) -> Result<Value, Error> {
        crate::check_hardware(&check.hardware)?;
        let installed: semver::Version = check
            .installed
            .parse()
            .map_err(|_| Error::Refused(format!("invalid version {:?}", check.installed)))?;
        let known: Option<FirmwareStatus> = self.store.firmware_device(device).await.map_err(store_err)?;
        if known.as_ref().is_none_or(|k| k.hardware != check.hardware || k.installed != check.installed) {
            let mut status = known.unwrap_or_default();
            status.hardware = check.hardware.clone();
            status.installed = check.installed.clone();
            self.store.record_firmware_report(device, None, status).await.map_err(store_err)?;
        }
        let rollouts = self.shared_rollouts().await?;
        let best = rollouts
            .iter()
            .filter(|r| r.hardware == check.hardware)
            .filter(|r| r.group.as_deref().is_none_or(|g| g == group))
            .filter(|r| r.admits(device.as_str()))
            .filter_map(|r| r.version.parse::<semver::Version>().ok().map(|v| (v, r)))
            .filter(|(v, _)| *v > installed)
            .max_by(|a, b| a.0.cmp(&b.0));
        Ok(match best {
            Some((v, r)) => json!({ "target": r.target, "version": v.to_string(), "rollout": r.id }),
            None => json!({ "target": null, "version": null }),
        })
    }

    /// Records a report from `device` of `group` (already authenticated by its
    /// certificate); evaluates its rollout's failure rate. A report naming a rollout is
    /// refused unless that rollout admitted the device, for its hardware and version.
    pub async fn report(&self, device: &DeviceId, group: &str, mut report: Report) -> Result<(), Error> {
        if let Some(claimed) = &report.device
            && claimed != device.as_str()
        {
            return Err(Error::NotYourReport { claimed: claimed.clone(), device: device.to_string() });
        }
        if !REPORT_STATES.contains(&report.state.as_str()) {
            return Err(Error::Refused(format!(
                "unknown state {:?}; one of {}",
                report.state,
                REPORT_STATES.join(", ")
            )));
        }
        crate::check_hardware(&report.hardware)?;
        for v in [&report.installed, &report.version] {
            v.parse::<semver::Version>().map_err(|_| Error::Refused(format!("invalid version {v:?}")))?;
        }
        if let Some(id) = report.rollout {
            self.check_admitted(id, device, group, &report).await?;
        }
        report.reason = report.reason.chars().take(500).collect();
        report.device = Some(device.to_string());
        let at = now_rfc3339();
        let status = FirmwareStatus {
            hardware: report.hardware.clone(),
            installed: report.installed.clone(),
            last: Some(FirmwareOutcome {
                state: report.state.clone(),
                version: report.version.clone(),
                reason: report.reason.clone(),
                rollout: report.rollout,
                at: at.clone(),
            }),
            rollout: report.rollout,
        };
        report.at = Some(at);
        let (rollout, decisive) = (report.rollout, matches!(report.state.as_str(), "failed" | "confirmed"));
        self.store.record_firmware_report(device, Some(report), status).await.map_err(store_err)?;
        if let Some(id) = rollout
            && decisive
        {
            self.evaluate(id).await?;
        }
        Ok(())
    }

    /// Refuses (403) a report on rollout `id` from a device it did not admit, or about
    /// another hardware model or version than the rollout's.
    async fn check_admitted(
        &self,
        id: i64,
        device: &DeviceId,
        group: &str,
        report: &Report,
    ) -> Result<(), Error> {
        let r = self
            .rollout(id)
            .await
            .map_err(|_| Error::Forbidden(format!("no rollout {id} admits {device}")))?;
        let why = if report.hardware != r.hardware || report.version != r.version {
            Some(format!(
                "rollout {id} offers {} {}, not {} {}",
                r.hardware, r.version, report.hardware, report.version
            ))
        } else if r.group.as_deref().is_some_and(|g| g != group) || !r.has_admitted(device.as_str()) {
            Some(format!("rollout {id} has not admitted {device}"))
        } else if !r.population.iter().any(|d| d == device.as_str()) {
            // Joined after creation: the hardware the server knows from its check-ins
            // must be the rollout's too.
            let known: Option<FirmwareStatus> =
                self.store.firmware_device(device).await.map_err(store_err)?;
            (known.is_none_or(|k| k.hardware != r.hardware)).then(|| {
                format!("rollout {id} has not admitted {device}: it never checked in as {}", r.hardware)
            })
        } else {
            None
        };
        match why {
            Some(m) => {
                tracing::warn!(rollout = id, device = %device, reason = %m, "firmware report refused");
                Err(Error::Forbidden(m))
            }
            None => Ok(()),
        }
    }

    /// Outcomes of a rollout's devices: (confirmed, failed).
    async fn outcomes(&self, r: &Rollout) -> Result<(usize, usize), Error> {
        let fw = self.devices_fw().await?;
        let mut ok = 0;
        let mut failed = 0;
        for d in fw.values().filter(|d| d.rollout == Some(r.id)) {
            let last = d.last.as_ref();
            let state = last.map(|l| l.state.as_str());
            let version = last.map(|l| l.version.as_str());
            if version != Some(r.version.as_str()) {
                continue;
            }
            match state {
                Some("confirmed") => ok += 1,
                Some("failed") => failed += 1,
                _ => {}
            }
        }
        Ok((ok, failed))
    }

    async fn evaluate(&self, id: i64) -> Result<(), Error> {
        let _guard = self.rollouts.lock().await;
        let mut r = self.rollout(id).await?;
        let (ok, failed) = self.outcomes(&r).await?;
        if let Some(reason) = r.check_failures(failed, ok + failed) {
            tracing::warn!(rollout = id, %reason, "firmware rollout paused");
            self.save(Some(id), &r, Actor::System).await?;
        }
        Ok(())
    }

    /// A rollout with its progress.
    pub async fn rollout_status(&self, id: i64) -> Result<RolloutStatus, Error> {
        let r = self.rollout(id).await?;
        let (confirmed, failed) = self.outcomes(&r).await?;
        Ok(RolloutStatus {
            id: r.id,
            hardware: r.hardware.clone(),
            version: r.version.clone(),
            target: r.target.clone(),
            group: r.group.clone(),
            state: r.state,
            reason: r.reason.clone(),
            stages: r.stages.clone(),
            stage: r.stage + 1,
            percent: r.percent(),
            population: r.population.len(),
            admitted: r.admitted_count(),
            confirmed,
            failed,
            max_failure_rate: r.max_failure_rate,
            min_reports: r.min_reports,
            created_at: r.created_at.clone(),
        })
    }

    /// Every device whose last report names an older version than the newest published
    /// for its hardware, by device id.
    pub async fn outdated(&self) -> Result<Vec<Behind>, Error> {
        let targets = self.repo.targets()?;
        let mut newest: HashMap<&str, &semver::Version> = HashMap::new();
        for t in &targets {
            let n = newest.entry(t.hardware.as_str()).or_insert(&t.version);
            if t.version > **n {
                *n = &t.version;
            }
        }
        let mut out: Vec<_> = self
            .devices_fw()
            .await?
            .into_iter()
            .filter_map(|(id, d)| {
                let n = newest.get(d.hardware.as_str())?;
                is_behind(&d.installed, Some(*n)).then(|| Behind {
                    device: id,
                    hardware: d.hardware,
                    installed: d.installed,
                    newest: n.to_string(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(out)
    }

    /// The fleet view: per hardware model, devices per version, who is behind, failures,
    /// rollouts; per device the last report.
    pub async fn status(&self, hardware: Option<&str>) -> Result<FleetStatus, Error> {
        let targets = self.repo.targets()?;
        let fw = self.devices_fw().await?;
        let mut models: BTreeMap<String, Vec<(&String, &FirmwareStatus)>> = BTreeMap::new();
        for (id, d) in &fw {
            models.entry(d.hardware.clone()).or_default().push((id, d));
        }
        for t in &targets {
            models.entry(t.hardware.clone()).or_default();
        }
        let rollouts = self.rollouts().await?;
        let mut out = Vec::new();
        for (hw, mut devices) in models {
            if hardware.is_some_and(|h| h != hw) {
                continue;
            }
            devices.sort_by(|a, b| a.0.cmp(b.0));
            let newest = targets.iter().filter(|t| t.hardware == hw).map(|t| t.version.clone()).max();
            let mut versions: BTreeMap<String, usize> = BTreeMap::new();
            let mut behind = Vec::new();
            let mut failures = Vec::new();
            let mut per_device = Vec::new();
            for (id, d) in &devices {
                *versions.entry(d.installed.clone()).or_default() += 1;
                if is_behind(&d.installed, newest.as_ref()) {
                    behind.push((*id).clone());
                }
                if d.last.as_ref().is_some_and(|l| l.state == "failed") {
                    failures.push((*id).clone());
                }
                per_device.push(DeviceVersion {
                    device: (*id).clone(),
                    installed: d.installed.clone(),
                    last: d.last.clone(),
                });
            }
            let mut rs = Vec::new();
            for r in rollouts.iter().filter(|r| r.hardware == hw) {
                rs.push(self.rollout_status(r.id).await?);
            }
            out.push(ModelStatus {
                published: targets.iter().filter(|t| t.hardware == hw).cloned().collect(),
                hardware: hw,
                newest: newest.map(|v| v.to_string()),
                versions,
                behind,
                failed: failures,
                rollouts: rs,
                devices: per_device,
            });
        }
        Ok(FleetStatus { hardware: out, repository: self.repo.describe()? })
    }
}

/// A rollout and how far it got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// Its id.
    pub id: i64,
    /// Hardware model.
    pub hardware: String,
    /// Version offered.
    pub version: String,
    /// TUF target path.
    pub target: String,
    /// Only this group's devices, if set.
    pub group: Option<String>,
    /// Active, paused or aborted.
    pub state: State,
    /// Why paused or aborted.
    pub reason: Option<String>,
    /// Stage percentages.
    pub stages: Vec<u8>,
    /// The current stage, from 1.
    pub stage: usize,
    /// Its percentage.
    pub percent: u8,
    /// Devices eligible at creation.
    pub population: usize,
    /// Devices the stage admits.
    pub admitted: usize,
    /// Devices that confirmed the update.
    pub confirmed: usize,
    /// Devices whose update failed.
    pub failed: usize,
    /// Failure share that pauses it.
    pub max_failure_rate: f64,
    /// Reports needed before that applies.
    pub min_reports: usize,
    /// Created (RFC 3339).
    pub created_at: String,
}

/// The fleet view: per hardware model, and the repository.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetStatus {
    /// Per hardware model.
    pub hardware: Vec<ModelStatus>,
    /// The repository's roles and keys.
    pub repository: crate::repo::RepositoryView,
}

/// One hardware model's devices, versions and rollouts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelStatus {
    /// The model.
    pub hardware: String,
    /// The newest version published for it.
    pub newest: Option<String>,
    /// Everything published for it.
    pub published: Vec<TargetInfo>,
    /// Devices per installed version.
    pub versions: BTreeMap<String, usize>,
    /// Devices behind the newest.
    pub behind: Vec<String>,
    /// Devices whose last report failed.
    pub failed: Vec<String>,
    /// Its rollouts.
    pub rollouts: Vec<RolloutStatus>,
    /// Each device's version and last report.
    pub devices: Vec<DeviceVersion>,
}

/// One device's installed version and last report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceVersion {
    /// The device.
    pub device: String,
    /// Installed version.
    pub installed: String,
    /// Its last report's outcome.
    pub last: Option<FirmwareOutcome>,
}

/// A device behind the newest firmware published for its hardware.
#[derive(Debug, Clone)]
pub struct Behind {
    /// The device.
    pub device: String,
    /// Its hardware model.
    pub hardware: String,
    /// The version its agent last reported.
    pub installed: String,
    /// The newest version published for that hardware.
    pub newest: String,
}

/// Whether a device reporting `installed` runs an older version than `newest`. A version
/// that is not semver is never called behind (nothing to compare).
fn is_behind(installed: &str, newest: Option<&semver::Version>) -> bool {
    match (newest, installed.parse::<semver::Version>()) {
        (Some(n), Ok(v)) => v < *n,
        _ => false,
    }
}
