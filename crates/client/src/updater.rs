//! The device side: what `portcullis-agent update` does.
//!
//! 1. Ask the server which version this device should run (over its mTLS identity).
//! 2. Refresh TUF metadata with rust-tuf's client, starting from the provisioned
//!    `root.json` and the metadata kept from earlier runs: root chain, timestamp,
//!    snapshot, targets — signatures, thresholds, versions (no rollback), expiry (no
//!    freeze), snapshot/targets consistency (no mix-and-match), length limits.
//! 3. Find the directed target in the *signed* targets metadata; refuse a name that is
//!    not a plain path, another hardware, and any version not newer than the installed
//!    one or the anti-rollback floor (persisted).
//! 4. Download with HTTP Range resume, never reading past the signed length; verify
//!    length and SHA-256.
//! 5. Write the image into the inactive slot and mark it pending; `confirm` makes it the
//!    active slot and raises the floor, `rollback` (a failed health check) keeps the old.
//!
//! Every state change is reported to the server with a reason: downloading, verified,
//! installed, confirmed, failed.
//!
//! Files under the agent's directory: `firmware/state.json`, `firmware/root.json` (the
//! trust anchor), `firmware/tuf/metadata/` (trusted metadata), `firmware/versions.json`
//! (the highest version of each TUF role ever trusted), `firmware/download/` (partial
//! downloads), `firmware/slot-a.img`, `firmware/slot-b.img`.
//!
//! Every file is written durably (a temporary file, fsync, rename, fsync of the
//! directory): a power cut leaves the old or the new one, never a torn one. A state that
//! is missing next to an installed image, or corrupt, is an error naming the fix, never a
//! silent reset of the anti-rollback floor; and the TUF role versions ever trusted are
//! kept apart from the metadata cache, so a device that was offline until its local
//! timestamp and snapshot expired still refuses older metadata than it once trusted.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tuf::client::{Client, Config};
use tuf::metadata::{Metadata, MetadataPath, MetadataVersion, RawSignedMetadata, RootMetadata, TargetPath};
use tuf::pouf::Pouf1;
use tuf::repository::{FileSystemRepository, RepositoryProvider};

use crate::{TargetInfo, safe_component};

/// A chunked HTTP body.
pub type Body = Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, String>> + Send>>;

/// An answer to a GET.
pub struct Fetched {
    /// HTTP status.
    pub status: u16,
    /// The body, as it arrives.
    pub body: Body,
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched").field("status", &self.status).finish_non_exhaustive()
    }
}

/// How the updater reaches the server's `/firmware/` tree; the agent's is mTLS.
pub trait Transport: Send + Sync {
    /// GET `/firmware/{path}`, from byte `offset` on (a Range request) when non-zero.
    fn get(&self, path: &str, offset: u64) -> impl Future<Output = Result<Fetched, String>> + Send;
    /// POST JSON to `/firmware/{path}`; the status and the JSON answer.
    fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> impl Future<Output = Result<(u16, serde_json::Value), String>> + Send;
}

/// Updater failures; the text is what the agent prints and reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// Local state is missing or broken.
    #[error("{0}")]
    State(String),
    /// The server could not be reached or answered unexpectedly.
    #[error("server: {0}")]
    Server(String),
    /// TUF metadata was refused.
    #[error("metadata refused: {0}")]
    Metadata(String),
    /// The directive or the target was refused.
    #[error("{0}")]
    Refused(Refusal),
    /// The image failed verification.
    #[error("image {target} refused: {reason}")]
    Image {
        /// Target path.
        target: String,
        /// Why.
        reason: String,
    },
}

/// Why a directive or a target was refused: each a security decision with its data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// A version string that is not a semantic version.
    #[error("invalid version {0:?}")]
    InvalidVersion(String),
    /// A target name that could leave its directory.
    #[error("target name {0:?} is not a plain relative path")]
    NotAPlainPath(String),
    /// The target is not in the signed targets metadata.
    #[error("target {0} is not listed in the signed targets metadata")]
    NotSigned(String),
    /// The target's signed metadata names no hardware or version (not one of ours).
    #[error("target {0} has no hardware/version in its signed metadata")]
    NoHardwareOrVersion(String),
    /// Not newer than what the device runs or once ran (anti-rollback).
    #[error("refusing version {offered}: not newer than {floor} (anti-rollback)")]
    Rollback {
        /// The version directed.
        offered: semver::Version,
        /// The newest of the installed version and the anti-rollback floor.
        floor: semver::Version,
    },
    /// Signed for another hardware model.
    #[error("target {target} is signed for hardware {signed_for}, this device is {device}")]
    WrongHardware {
        /// The target.
        target: String,
        /// The hardware its signed metadata names.
        signed_for: String,
        /// This device's hardware.
        device: String,
    },
    /// The signed version differs from the directive's.
    #[error("target {target} is signed as version {signed}, the directive says {directed}")]
    VersionMismatch {
        /// The target.
        target: String,
        /// The version its signed metadata names.
        signed: semver::Version,
        /// The version the server directed.
        directed: semver::Version,
    },
}

/// One slot's content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SlotInfo {
    /// Version in the slot.
    pub version: String,
    /// SHA-256 of the image, hex (empty for the factory image).
    #[serde(default)]
    pub sha256: String,
}

/// An installed image waiting for its first good start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pending {
    /// Slot it was written to.
    pub slot: char,
    /// Its version.
    pub version: String,
    /// Its target path.
    pub target: String,
    /// The rollout that directed it, if any.
    #[serde(default)]
    pub rollout: Option<i64>,
}

/// `firmware/state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpdaterState {
    /// Hardware model (from the agent's configuration).
    pub hardware: String,
    /// The slot the device runs from: `a` or `b`.
    pub active: char,
    /// Slot A.
    pub slot_a: Option<SlotInfo>,
    /// Slot B.
    pub slot_b: Option<SlotInfo>,
    /// Anti-rollback floor: the highest version ever confirmed; nothing at or below it installs.
    pub floor: String,
    /// An installed image not yet confirmed.
    pub pending: Option<Pending>,
}

impl UpdaterState {
    /// The running version.
    pub fn installed(&self) -> &str {
        let slot = if self.active == 'a' { &self.slot_a } else { &self.slot_b };
        slot.as_ref().map(|s| s.version.as_str()).unwrap_or("0.0.0")
    }

    fn inactive(&self) -> char {
        if self.active == 'a' { 'b' } else { 'a' }
    }
}

/// The highest version of each TUF role ever trusted (`firmware/versions.json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct RoleVersions {
    root: u32,
    timestamp: u32,
    snapshot: u32,
    targets: u32,
}

/// The updater's directory.
#[derive(Debug, Clone)]
pub struct UpdaterDir(PathBuf);

/// What [`UpdaterDir::update`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The server directs nothing newer.
    UpToDate {
        /// The running version.
        installed: String,
    },
    /// `--check`: what would be installed.
    Available {
        /// Target path.
        target: String,
        /// Version.
        version: String,
        /// Length in bytes.
        length: u64,
    },
    /// Written to the inactive slot, pending confirmation.
    Installed {
        /// Target path.
        target: String,
        /// Version.
        version: String,
        /// Slot.
        slot: char,
        /// Bytes fetched in this run (less than the length after a resume).
        fetched: u64,
    },
}

/// Options of one update run.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpdateOptions {
    /// Only report what would be installed.
    pub check: bool,
    /// Stop the download after this many bytes (tests of resume).
    pub interrupt_after: Option<u64>,
}

fn io_err(action: &str, path: &Path, e: std::io::Error) -> UpdateError {
    UpdateError::State(format!("cannot {action} {}: {e}", path.display()))
}

fn parse_version(v: &str) -> Result<semver::Version, UpdateError> {
    v.parse().map_err(|_| UpdateError::Refused(Refusal::InvalidVersion(v.to_owned())))
}

/// The remote side of the TUF client: metadata over the transport.
struct Remote<'t, T: Transport>(&'t T);

/// Metadata files larger than this are refused (endless data on metadata).
const MAX_METADATA: usize = 1 << 20;

impl<T: Transport> RepositoryProvider<Pouf1> for Remote<'_, T> {
    fn fetch_metadata<'a>(
        &'a self,
        meta_path: &MetadataPath,
        version: MetadataVersion,
    ) -> BoxFuture<'a, tuf::Result<Box<dyn futures_util::AsyncRead + Send + Unpin + 'a>>> {
        let path = format!("metadata/{}", meta_path.components::<Pouf1>(version).join("/"));
        let meta_path = meta_path.clone();
        Box::pin(async move {
            let fetched =
                self.0.get(&path, 0).await.map_err(|e| tuf::Error::Opaque(format!("{path}: {e}")))?;
            if fetched.status == 404 {
                return Err(tuf::Error::MetadataNotFound { path: meta_path, version });
            }
            if fetched.status != 200 {
                return Err(tuf::Error::Opaque(format!("{path}: HTTP {}", fetched.status)));
            }
            let bytes = read_capped(fetched.body, MAX_METADATA)
                .await
                .map_err(|e| tuf::Error::Opaque(format!("{path}: {e}")))?;
            Ok(Box::new(futures_util::io::Cursor::new(bytes))
                as Box<dyn futures_util::AsyncRead + Send + Unpin>)
        })
    }

    fn fetch_target<'a>(
        &'a self,
        target_path: &TargetPath,
    ) -> BoxFuture<'a, tuf::Result<Box<dyn futures_util::AsyncRead + Send + Unpin + 'a>>> {
        let target = target_path.clone();
        Box::pin(async move { Err(tuf::Error::TargetNotFound(target)) })
    }
}

async fn read_capped(mut body: Body, cap: usize) -> Result<Vec<u8>, String> {
    use futures_util::StreamExt;
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        if out.len() + chunk.len() > cap {
            return Err(format!("larger than {cap} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A directive being carried out.
#[derive(Debug, Clone, Copy)]
struct Directed<'a> {
    target: &'a str,
    version: &'a str,
    rollout: Option<i64>,
}

/// The server's directive for this device.
#[derive(Debug, Clone, Deserialize)]
pub struct Directive {
    /// Target path to run, if any.
    pub target: Option<String>,
    /// Its version.
    pub version: Option<String>,
    /// The rollout it comes from.
    #[serde(default)]
    pub rollout: Option<i64>,
}

impl UpdaterDir {
    /// The updater inside the agent directory `agent_dir`.
    pub fn new(agent_dir: &Path) -> Self {
        Self(agent_dir.join("firmware"))
    }

    fn state_path(&self) -> PathBuf {
        self.0.join("state.json")
    }

    /// Where `slot`'s image lives.
    pub fn slot_path(&self, slot: char) -> PathBuf {
        self.0.join(format!("slot-{slot}.img"))
    }

    /// Creates the state on first use: the hardware model, the factory version in slot
    /// A, and the trust anchor. Later calls only check the hardware matches.
    pub fn init(
        &self,
        hardware: &str,
        factory_version: &str,
        root_json: Option<&[u8]>,
    ) -> Result<UpdaterState, UpdateError> {
        if !safe_component(hardware) {
            return Err(UpdateError::State(format!(
                "invalid hardware name {hardware:?}: use letters, digits and ._-+~"
            )));
        }
        // Nothing here at all: a device set up for the first time. Anything else must
        // load (a missing or corrupt state next to an installed image is an error).
        let first_time = !self.state_path().exists() && self.installed_evidence().is_empty();
        let existing = if first_time { None } else { Some(self.load()?) };
        if let Some(state) = existing {
            if state.hardware != hardware {
                return Err(UpdateError::State(format!(
                    "this device is configured as hardware {}, not {hardware}",
                    state.hardware
                )));
            }
            if let Some(root) = root_json
                && !self.0.join("root.json").is_file()
            {
                self.write_file("root.json", root)?;
            }
            return Ok(state);
        }
        parse_version(factory_version)?;
        let root = root_json.ok_or_else(|| {
            UpdateError::State(
                "no trust anchor: pass --root with the repository's root.json (`portcullis firmware root`)"
                    .into(),
            )
        })?;
        // Parse it now: a broken anchor must fail here, not at the first update.
        RawSignedMetadata::<Pouf1, RootMetadata>::new(root.to_vec())
            .parse_untrusted()
            .map_err(|e| UpdateError::State(format!("--root is not TUF root metadata: {e}")))?;
        std::fs::create_dir_all(self.0.join("tuf")).map_err(|e| io_err("create", &self.0, e))?;
        self.write_file("root.json", root)?;
        let state = UpdaterState {
            hardware: hardware.to_owned(),
            active: 'a',
            slot_a: Some(SlotInfo { version: factory_version.to_owned(), sha256: String::new() }),
            slot_b: None,
            floor: factory_version.to_owned(),
            pending: None,
        };
        self.save(&state)?;
        Ok(state)
    }

    /// Writes `name` durably: a temporary file, fsync, rename over the old one, fsync of
    /// the directory (so the rename itself survives a power cut).
    fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), UpdateError> {
        let path = self.0.join(name);
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::create_dir_all(&self.0).map_err(|e| io_err("create", &self.0, e))?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| io_err("create", &tmp, e))?;
        f.write_all(bytes).map_err(|e| io_err("write", &tmp, e))?;
        f.sync_all().map_err(|e| io_err("sync", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(|e| io_err("rename", &path, e))?;
        std::fs::File::open(&self.0).and_then(|d| d.sync_all()).map_err(|e| io_err("sync", &self.0, e))
    }

    /// What is installed beside a missing state: the files that prove this device was
    /// set up and updated before.
    fn installed_evidence(&self) -> Vec<String> {
        ["slot-a.img", "slot-b.img", "versions.json", "tuf/metadata"]
            .iter()
            .filter(|f| self.0.join(f).exists())
            .map(|f| format!("firmware/{f}"))
            .collect()
    }

    /// The stored state. Missing or corrupt, it is an error that says what to do: the
    /// anti-rollback floor it holds must never be reset without the operator knowing.
    pub fn load(&self) -> Result<UpdaterState, UpdateError> {
        let path = self.state_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let evidence = self.installed_evidence();
                if evidence.is_empty() {
                    return Err(io_err("read", &path, e));
                }
                return Err(UpdateError::State(format!(
                    "{} is missing but this device was updated before ({} present): its anti-rollback floor is \
                     lost. Restore state.json from a backup; or, to set the device up again from scratch, remove \
                     {} and run `portcullis-agent update --hardware HW --installed-version V --root root.json` \
                     with the version it really runs",
                    path.display(),
                    evidence.join(", "),
                    self.0.display()
                )));
            }
            Err(e) => return Err(io_err("read", &path, e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| {
            UpdateError::State(format!(
                "{} is corrupt ({e}): its anti-rollback floor cannot be trusted. Restore it from a backup; or, \
                 to set the device up again from scratch, remove {} and run `portcullis-agent update --hardware \
                 HW --installed-version V --root root.json` with the version it really runs",
                path.display(),
                self.0.display()
            ))
        })
    }

    /// The highest version of each TUF role ever trusted (`firmware/versions.json`);
    /// zero for a role never trusted.
    fn trusted_versions(&self) -> Result<RoleVersions, UpdateError> {
        let path = self.0.join("versions.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                UpdateError::State(format!(
                    "{} is corrupt ({e}): the TUF rollback floor cannot be trusted; restore it from a backup",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RoleVersions::default()),
            Err(e) => Err(io_err("read", &path, e)),
        }
    }

    fn save(&self, state: &UpdaterState) -> Result<(), UpdateError> {
        let json = serde_json::to_vec_pretty(state).map_err(|e| UpdateError::State(e.to_string()))?;
        self.write_file("state.json", &json)
    }

    async fn report<T: Transport>(
        &self,
        t: &T,
        state: &UpdaterState,
        event: &str,
        version: &str,
        reason: &str,
        rollout: Option<i64>,
    ) {
        let body = serde_json::json!({
            "state": event,
            "hardware": state.hardware,
            "installed": state.installed(),
            "version": version,
            "reason": reason,
            "rollout": rollout,
        });
        match t.post("report", body).await {
            Ok((200..=299, _)) => {}
            Ok((status, answer)) => tracing::warn!(status, %answer, "firmware report refused"),
            Err(e) => tracing::warn!(error = %e, "firmware report not delivered"),
        }
    }

    /// Refreshes the TUF metadata (the specification's client workflow, 5.3–5.6) and
    /// returns the trusted targets.
    async fn refresh<T: Transport>(
        &self,
        t: &T,
    ) -> Result<std::collections::HashMap<TargetPath, tuf::metadata::TargetDescription>, UpdateError> {
        let root_path = self.0.join("root.json");
        let root = std::fs::read(&root_path).map_err(|e| io_err("read", &root_path, e))?;
        let root = RawSignedMetadata::<Pouf1, RootMetadata>::new(root);
        let local = FileSystemRepository::<Pouf1>::new(self.0.join("tuf"));
        let config = Config::build()
            .max_root_length(Some(MAX_METADATA))
            .max_timestamp_length(Some(MAX_METADATA))
            .max_snapshot_length(Some(MAX_METADATA))
            .max_targets_length(Some(MAX_METADATA))
            .finish()
            .map_err(|e| UpdateError::Metadata(e.to_string()))?;
        let mut client = Client::with_trusted_root(config, &root, local, Remote(t))
            .await
            .map_err(|e| UpdateError::Metadata(e.to_string()))?;
        client.update().await.map_err(|e| UpdateError::Metadata(e.to_string()))?;
        // The metadata cache may have dropped expired local metadata (a device offline
        // for days), and with it the versions rust-tuf compares against: compare with the
        // highest versions ever trusted, kept apart, before trusting anything.
        let db = client.database();
        let now = RoleVersions {
            root: db.trusted_root().version(),
            timestamp: db.trusted_timestamp().map_or(0, |m| m.version()),
            snapshot: db.trusted_snapshot().map_or(0, |m| m.version()),
            targets: db.trusted_targets().map_or(0, |m| m.version()),
        };
        let floor = self.trusted_versions()?;
        for (role, got, had) in [
            ("root", now.root, floor.root),
            ("timestamp", now.timestamp, floor.timestamp),
            ("snapshot", now.snapshot, floor.snapshot),
            ("targets", now.targets, floor.targets),
        ] {
            if got < had {
                return Err(UpdateError::Metadata(format!(
                    "rollback refused: the repository's {role} metadata is version {got}, but version {had} was \
                     trusted before (firmware/versions.json)"
                )));
            }
        }
        if now != floor {
            let json = serde_json::to_vec_pretty(&now).map_err(|e| UpdateError::State(e.to_string()))?;
            self.write_file("versions.json", &json)?;
        }
        let targets = client
            .database()
            .trusted_targets()
            .ok_or_else(|| UpdateError::Metadata("no trusted targets metadata".into()))?;
        Ok(targets.targets().clone())
    }

    /// The signed description of `target` in `targets`.
    fn verified_target(
        targets: &std::collections::HashMap<TargetPath, tuf::metadata::TargetDescription>,
        target: &str,
    ) -> Result<TargetInfo, UpdateError> {
        let path = TargetPath::new(target.to_owned())
            .map_err(|_| UpdateError::Refused(Refusal::NotAPlainPath(target.to_owned())))?;
        let desc =
            targets.get(&path).ok_or_else(|| UpdateError::Refused(Refusal::NotSigned(target.to_owned())))?;
        TargetInfo::from_description(target, desc)
            .ok_or_else(|| UpdateError::Refused(Refusal::NoHardwareOrVersion(target.to_owned())))
    }

    /// One update run (see the module documentation).
    pub async fn update<T: Transport>(&self, t: &T, opts: UpdateOptions) -> Result<Outcome, UpdateError> {
        let mut state = self.load()?;
        if let Some(p) = &state.pending {
            return Err(UpdateError::State(format!(
                "version {} is installed in slot {} and waits for confirmation: run `portcullis-agent confirm` \
                 after a good start, or `portcullis-agent rollback`",
                p.version, p.slot
            )));
        }
        let installed = state.installed().to_owned();
        let ask = serde_json::json!({ "hardware": state.hardware, "installed": installed });
        let (status, answer) = t.post("assignment", ask).await.map_err(UpdateError::Server)?;
        if status != 200 {
            return Err(UpdateError::Server(format!("assignment refused ({status}): {answer}")));
        }
        let directive: Directive = serde_json::from_value(answer)
            .map_err(|e| UpdateError::Server(format!("malformed assignment: {e}")))?;
        // Metadata is refreshed on every check, directed or not: the root chain, expiry
        // and versions stay current, and a frozen or rolled-back mirror shows at once.
        let targets = self.refresh(t).await?;
        let (Some(target), Some(version)) = (directive.target, directive.version) else {
            return Ok(Outcome::UpToDate { installed });
        };
        let directed = Directed { target: &target, version: &version, rollout: directive.rollout };
        match self.fetch_and_install(t, &mut state, &targets, &directed, opts).await {
            Ok(o) => Ok(o),
            // A transport failure says nothing about the image: the download resumes on
            // the next run, and it must not count against the rollout's failure rate.
            Err(e @ UpdateError::Server(_)) => {
                let why = format!("interrupted, resumes on the next run: {e}");
                self.report(t, &state, "downloading", &version, &why, directive.rollout).await;
                Err(e)
            }
            Err(e) => {
                self.report(t, &state, "failed", &version, &e.to_string(), directive.rollout).await;
                Err(e)
            }
        }
    }

    async fn fetch_and_install<T: Transport>(
        &self,
        t: &T,
        state: &mut UpdaterState,
        targets: &std::collections::HashMap<TargetPath, tuf::metadata::TargetDescription>,
        directed: &Directed<'_>,
        opts: UpdateOptions,
    ) -> Result<Outcome, UpdateError> {
        let Directed { target, version, rollout } = *directed;
        if !target.split('/').all(safe_component) {
            return Err(UpdateError::Refused(Refusal::NotAPlainPath(target.to_owned())));
        }
        let directed = parse_version(version)?;
        let floor = parse_version(&state.floor)?;
        let installed = parse_version(state.installed())?;
        let newest_held = floor.max(installed);
        if directed <= newest_held {
            return Err(UpdateError::Refused(Refusal::Rollback { offered: directed, floor: newest_held }));
        }
        let info = Self::verified_target(targets, target)?;
        if info.hardware != state.hardware {
            return Err(UpdateError::Refused(Refusal::WrongHardware {
                target: target.to_owned(),
                signed_for: info.hardware,
                device: state.hardware.clone(),
            }));
        }
        if info.version != directed {
            return Err(UpdateError::Refused(Refusal::VersionMismatch {
                target: target.to_owned(),
                signed: info.version,
                directed,
            }));
        }
        if opts.check {
            return Ok(Outcome::Available {
                target: target.to_owned(),
                version: version.to_owned(),
                length: info.length,
            });
        }
        self.report(t, state, "downloading", version, &format!("{} bytes", info.length), rollout).await;
        let (part, fetched) = self.download(t, &info, opts.interrupt_after).await?;
        self.report(t, state, "verified", version, &format!("sha256 {}", info.sha256), rollout).await;
        let slot = state.inactive();
        let dest = self.slot_path(slot);
        std::fs::rename(&part, &dest).map_err(|e| io_err("install into", &dest, e))?;
        let slot_info = Some(SlotInfo { version: version.to_owned(), sha256: info.sha256.clone() });
        if slot == 'a' {
            state.slot_a = slot_info;
        } else {
            state.slot_b = slot_info;
        }
        state.pending =
            Some(Pending { slot, version: version.to_owned(), target: target.to_owned(), rollout });
        self.save(state)?;
        self.report(t, state, "installed", version, &format!("slot {slot}, pending confirmation"), rollout)
            .await;
        Ok(Outcome::Installed { target: target.to_owned(), version: version.to_owned(), slot, fetched })
    }

    /// Downloads the image into `download/SHA256.part`, resuming a partial file, and
    /// verifies it; returns the file and how many bytes this run fetched.
    async fn download<T: Transport>(
        &self,
        t: &T,
        info: &TargetInfo,
        interrupt_after: Option<u64>,
    ) -> Result<(PathBuf, u64), UpdateError> {
        use futures_util::StreamExt;
        let image_err = |reason: String| UpdateError::Image { target: info.path.clone(), reason };
        let dir = self.0.join("download");
        std::fs::create_dir_all(&dir).map_err(|e| io_err("create", &dir, e))?;
        let part = dir.join(format!("{}.part", info.sha256));
        let mut have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if have > info.length {
            have = 0;
        }
        let mut fetched = 0u64;
        if have < info.length {
            let answer = t.get(&info.url_path(), have).await.map_err(UpdateError::Server)?;
            let append = match answer.status {
                206 if have > 0 => true,
                200 => false,
                s => return Err(UpdateError::Server(format!("GET {}: HTTP {s}", info.url_path()))),
            };
            if !append {
                have = 0;
            }
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .truncate(!append)
                .open(&part)
                .map_err(|e| io_err("open", &part, e))?;
            let mut body = answer.body;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| UpdateError::Server(format!("download interrupted: {e}")))?;
                if have + chunk.len() as u64 > info.length {
                    drop(file);
                    let _ = std::fs::remove_file(&part);
                    return Err(image_err(format!(
                        "the server sent more than the {} bytes the signed metadata lists (endless data)",
                        info.length
                    )));
                }
                file.write_all(&chunk).map_err(|e| io_err("write", &part, e))?;
                have += chunk.len() as u64;
                fetched += chunk.len() as u64;
                if let Some(limit) = interrupt_after
                    && fetched >= limit
                {
                    file.flush().map_err(|e| io_err("write", &part, e))?;
                    return Err(UpdateError::Server(format!("download interrupted after {fetched} bytes")));
                }
            }
            file.sync_all().map_err(|e| io_err("sync", &part, e))?;
        }
        if have != info.length {
            return Err(UpdateError::Server(format!(
                "download ended after {have} of {} bytes; run again to resume",
                info.length
            )));
        }
        let actual = sha256_file(&part).map_err(|e| io_err("read", &part, e))?;
        if actual != info.sha256 {
            let _ = std::fs::remove_file(&part);
            return Err(image_err(format!("sha256 mismatch (signed {}, got {actual})", info.sha256)));
        }
        Ok((part, fetched))
    }

    /// After a good start of the pending image: make its slot active and raise the
    /// anti-rollback floor.
    pub async fn confirm<T: Transport>(&self, t: &T) -> Result<UpdaterState, UpdateError> {
        let mut state = self.load()?;
        let p = state.pending.take().ok_or_else(|| UpdateError::State("no update is pending".into()))?;
        state.active = p.slot;
        state.floor = p.version.clone();
        self.save(&state)?;
        self.report(t, &state, "confirmed", &p.version, &format!("running from slot {}", p.slot), p.rollout)
            .await;
        Ok(state)
    }

    /// The pending image failed its health check: stay on the active slot and report it.
    pub async fn rollback<T: Transport>(&self, t: &T, reason: &str) -> Result<UpdaterState, UpdateError> {
        let mut state = self.load()?;
        let p = state.pending.take().ok_or_else(|| UpdateError::State("no update is pending".into()))?;
        self.save(&state)?;
        let why = format!("rolled back to slot {}: {reason}", state.active);
        self.report(t, &state, "failed", &p.version, &why, p.rollout).await;
        Ok(state)
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex::encode(ctx.finish().as_ref()))
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    #[test]
    fn refusals_carry_their_data_and_say_why() {
        let v = |s: &str| semver::Version::parse(s).unwrap();
        let r = Refusal::Rollback { offered: v("1.0.0"), floor: v("1.2.0") };
        assert_eq!(r.to_string(), "refusing version 1.0.0: not newer than 1.2.0 (anti-rollback)");
        let e = UpdateError::Refused(Refusal::WrongHardware {
            target: "cam-v1/2.0.0/fw.bin".into(),
            signed_for: "cam-v1".into(),
            device: "cam-v2".into(),
        });
        assert!(
            matches!(&e, UpdateError::Refused(Refusal::WrongHardware { device, .. }) if device == "cam-v2")
        );
        assert_eq!(
            e.to_string(),
            "target cam-v1/2.0.0/fw.bin is signed for hardware cam-v1, this device is cam-v2"
        );
        assert!(matches!(parse_version("1.x"), Err(UpdateError::Refused(Refusal::InvalidVersion(_)))));
    }
}
