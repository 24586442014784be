//! The server's TUF repository: keys, metadata, targets.
//!
//! Layout under the repository directory (`DATA/firmware` by default):
//!
//! | path | what |
//! |---|---|
//! | `keys/{root,targets,snapshot,timestamp}.pk8` | Ed25519 keys (PKCS#8, mode 0600); root and targets may live elsewhere (`keys init --offline`) |
//! | `repo/metadata/N.root.json`, `root.json` | every root version (clients walk the chain) and the newest |
//! | `repo/metadata/timestamp.json`, `N.snapshot.json`, `N.targets.json` | consistent snapshots: snapshot and targets by version |
//! | `repo/targets/HW/VERSION/SHA256.NAME` | the images, stored under their hash (TUF 5.5.2) |
//!
//! Metadata is built and signed by rust-tuf's [`RepoBuilder`], which also checks, before it
//! writes anything, that a client holding the current metadata can update to the new one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};
use tuf::crypto::{Ed25519PrivateKey, HashAlgorithm, PrivateKey};
use tuf::database::Database;
use tuf::metadata::{
    Metadata, MetadataPath, RawSignedMetadata, RawSignedMetadataSetBuilder, RootMetadata, SnapshotMetadata,
    TargetPath, TargetsMetadata, TimestampMetadata,
};
use tuf::pouf::Pouf1;
use tuf::repo_builder::RepoBuilder;
use tuf::repository::FileSystemRepository;

use crate::{Error, TargetInfo};

/// Lifetimes of the four roles' metadata.
#[derive(Debug, Clone, Copy)]
pub struct Expiry {
    /// Root: changes only with a key rotation.
    pub root: Duration,
    /// Targets: re-signed on every publish.
    pub targets: Duration,
    /// Snapshot: re-signed by the server before it expires.
    pub snapshot: Duration,
    /// Timestamp: short, so a frozen mirror is noticed quickly; re-signed by the server.
    pub timestamp: Duration,
}

impl Default for Expiry {
    fn default() -> Self {
        Self {
            root: Duration::days(365),
            targets: Duration::days(90),
            snapshot: Duration::days(7),
            timestamp: Duration::days(1),
        }
    }
}

/// The four top-level roles.
pub const ROLES: [&str; 4] = ["root", "targets", "snapshot", "timestamp"];

/// A directory of role keys (`ROLE.pk8`).
#[derive(Debug, Clone)]
pub struct KeyDir(PathBuf);

impl KeyDir {
    /// The keys in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self(dir.into())
    }

    /// Where the key of `role` lives.
    pub fn path(&self, role: &str) -> PathBuf {
        self.0.join(format!("{role}.pk8"))
    }

    /// Whether `role`'s key is here.
    pub fn has(&self, role: &str) -> bool {
        self.path(role).is_file()
    }

    /// Generates a fresh key for each of `roles` (mode 0600); refuses to overwrite one.
    pub fn generate(&self, roles: &[&str]) -> Result<(), Error> {
        std::fs::create_dir_all(&self.0).map_err(|e| Error::io("create", &self.0, e))?;
        for role in roles {
            let path = self.path(role);
            if path.exists() {
                return Err(Error::Refused(format!(
                    "{} already exists; refusing to replace a key",
                    path.display()
                )));
            }
            let der = Ed25519PrivateKey::pkcs8().map_err(Error::tuf)?;
            portcullis_pki::write_private(&path, &der).map_err(|e| Error::io("write", &path, e))?;
        }
        Ok(())
    }

    /// Loads `role`'s key.
    pub fn load(&self, role: &str) -> Result<Ed25519PrivateKey, Error> {
        let path = self.path(role);
        let der = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
        Ed25519PrivateKey::from_pkcs8(&der)
            .map_err(|_| Error::Refused(format!("{} is not an Ed25519 PKCS#8 key", path.display())))
    }

    /// Loads `role`'s key if it is here.
    pub fn load_if_present(&self, role: &str) -> Result<Option<Ed25519PrivateKey>, Error> {
        if self.has(role) { self.load(role).map(Some) } else { Ok(None) }
    }
}

/// The repository the server signs and serves.
#[derive(Debug)]
pub struct FirmwareRepo {
    dir: PathBuf,
    expiry: Expiry,
    /// One writer at a time: metadata versions must not race.
    write: Mutex<()>,
}

/// The repository's signed roles and where its keys are, for the fleet view.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RepositoryView {
    /// The root role.
    pub root: RoleView,
    /// The targets role.
    pub targets: Option<RoleView>,
    /// The snapshot role.
    pub snapshot: Option<RoleView>,
    /// The timestamp role.
    pub timestamp: Option<RoleView>,
    /// Whether metadata is served under consistent-snapshot names.
    pub consistent_snapshot: bool,
    /// Whether the server holds the targets key (else targets are signed offline).
    pub targets_key_online: bool,
    /// Whether the server holds the root key (it should not).
    pub root_key_online: bool,
}

/// One role's version and expiry.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RoleView {
    /// Its version.
    pub version: u32,
    /// When it expires (RFC 3339).
    pub expires: String,
}

/// What [`FirmwareRepo::refresh`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Refreshed {
    /// A new snapshot was signed.
    pub snapshot: bool,
    /// A new timestamp was signed.
    pub timestamp: bool,
}

type Fs = FileSystemRepository<Pouf1>;

fn image_name(image: &Path) -> Result<String, Error> {
    image
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| crate::safe_component(n))
        .map(str::to_owned)
        .ok_or_else(|| Error::Refused(format!("{}: the file name must be a plain name", image.display())))
}

fn custom_metadata(
    hardware: &str,
    version: &semver::Version,
    notes: Option<&str>,
) -> HashMap<String, serde_json::Value> {
    let mut custom = HashMap::new();
    custom.insert("hardware".to_owned(), serde_json::Value::from(hardware));
    custom.insert("version".to_owned(), serde_json::Value::from(version.to_string()));
    if let Some(n) = notes {
        custom.insert("notes".to_owned(), serde_json::Value::from(n));
    }
    custom
}

/// A version may be published once per hardware, and not below the newest unless asked.
fn check_new_version(
    existing: &[TargetInfo],
    hardware: &str,
    version: &semver::Version,
    allow_downgrade: bool,
) -> Result<(), Error> {
    let same_hw: Vec<&TargetInfo> = existing.iter().filter(|t| t.hardware == hardware).collect();
    if same_hw.iter().any(|t| &t.version == version) {
        return Err(Error::Refused(format!(
            "version {version} is already published for hardware {hardware}"
        )));
    }
    if let Some(newest) = same_hw.iter().map(|t| &t.version).max()
        && version < newest
        && !allow_downgrade
    {
        return Err(Error::Refused(format!(
            "version {version} is lower than the newest published for {hardware} ({newest}); \
             pass --allow-downgrade to publish it anyway"
        )));
    }
    Ok(())
}

/// What [`sign_targets`] adds.
#[derive(Debug, Clone, Copy)]
pub struct NewTarget<'a> {
    /// The image file.
    pub image: &'a Path,
    /// Hardware model.
    pub hardware: &'a str,
    /// Version.
    pub version: &'a semver::Version,
    /// Release notes.
    pub notes: Option<&'a str>,
    /// Allow a version below the newest.
    pub allow_downgrade: bool,
}

/// Signs, where the offline targets key is, the repository's next targets metadata:
/// `current` (its newest targets metadata, which must carry a valid signature by `key`)
/// plus the new target `HW/VERSION/NAME`. Returns the signed document for
/// [`FirmwareRepo::import_targets`].
pub fn sign_targets(
    current: &[u8],
    new: NewTarget<'_>,
    key: &Ed25519PrivateKey,
    lifetime: Duration,
) -> Result<Vec<u8>, Error> {
    crate::check_hardware(new.hardware)?;
    let name = image_name(new.image)?;
    let raw = RawSignedMetadata::<Pouf1, TargetsMetadata>::new(current.to_vec());
    let trusted =
        tuf::verify::verify_signatures(&MetadataPath::targets(), &raw, 1, [key.public()]).map_err(|e| {
            Error::Refused(format!("the current targets metadata is not signed by this key: {e}"))
        })?;
    let existing: Vec<TargetInfo> =
        trusted.targets().iter().filter_map(|(p, d)| TargetInfo::from_description(p.as_str(), d)).collect();
    check_new_version(&existing, new.hardware, new.version, new.allow_downgrade)?;
    let bytes = std::fs::read(new.image).map_err(|e| Error::io("read", new.image, e))?;
    let desc = tuf::metadata::TargetDescription::from_slice_with_custom(
        &bytes,
        &[HashAlgorithm::Sha256],
        custom_metadata(new.hardware, new.version, new.notes),
    )
    .map_err(Error::tuf)?;
    let path = TargetPath::new(format!("{}/{}/{name}", new.hardware, new.version)).map_err(Error::tuf)?;
    let start = tuf::metadata::TargetsMetadataBuilder::new()
        .version(trusted.version() + 1)
        .expires(Utc::now() + lifetime);
    let builder = trusted
        .targets()
        .iter()
        .fold(start, |b, (p, d)| b.insert_target_description(p.clone(), d.clone()))
        .insert_target_description(path, desc);
    let signed = builder.signed::<Pouf1>(key).and_then(|s| s.to_raw()).map_err(Error::tuf)?;
    Ok(signed.as_bytes().to_vec())
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    // Every repository future is file I/O that completes without a reactor.
    futures_util::FutureExt::now_or_never(f).unwrap_or_else(|| unreachable!("rust-tuf file I/O never pends"))
}

impl FirmwareRepo {
    /// Opens (or, on first use, creates) the repository in `dir`. A new repository gets
    /// its keys in `dir/keys` unless `offline` names a directory holding the root and
    /// targets keys (from `keys init --offline`); then only snapshot and timestamp keys
    /// are kept by the server.
    pub fn open(dir: &Path, expiry: Expiry, offline: Option<&KeyDir>) -> Result<Self, Error> {
        let repo = Self { dir: dir.to_path_buf(), expiry, write: Mutex::new(()) };
        if !repo.metadata_dir().join("1.root.json").is_file() {
            repo.create(offline)?;
        }
        Ok(repo)
    }

    /// The online key directory.
    pub fn keys(&self) -> KeyDir {
        KeyDir::new(self.dir.join("keys"))
    }

    /// `repo/metadata`.
    pub fn metadata_dir(&self) -> PathBuf {
        self.dir.join("repo").join("metadata")
    }

    /// `repo/targets`.
    pub fn targets_dir(&self) -> PathBuf {
        self.dir.join("repo").join("targets")
    }

    /// Where uploads are staged before they are published (same file system as the
    /// repository, so publishing moves no bytes twice across devices).
    pub fn upload_dir(&self) -> Result<PathBuf, Error> {
        let d = self.dir.join("uploads");
        std::fs::create_dir_all(&d).map_err(|e| Error::io("create", &d, e))?;
        Ok(d)
    }

    /// Whether the server holds the targets key (can publish by itself).
    pub fn holds_targets_key(&self) -> bool {
        self.keys().has("targets")
    }

    fn fs(&self) -> Fs {
        FileSystemRepository::new(self.dir.join("repo"))
    }

    fn create(&self, offline: Option<&KeyDir>) -> Result<(), Error> {
        let online = self.keys();
        let (root_keys, targets_keys) = match offline {
            Some(off) => (off.clone(), off.clone()),
            None => {
                online.generate(&["root", "targets"])?;
                (online.clone(), online.clone())
            }
        };
        online.generate(&["snapshot", "timestamp"])?;
        let root = root_keys.load("root")?;
        let targets = targets_keys.load("targets")?;
        let snapshot = online.load("snapshot")?;
        let timestamp = online.load("timestamp")?;
        let mut fs = self.fs();
        block_on(
            RepoBuilder::create(&mut fs)
                .root_expiration_duration(self.expiry.root)
                .targets_expiration_duration(self.expiry.targets)
                .snapshot_expiration_duration(self.expiry.snapshot)
                .timestamp_expiration_duration(self.expiry.timestamp)
                .trusted_root_keys(&[&root])
                .trusted_targets_keys(&[&targets])
                .trusted_snapshot_keys(&[&snapshot])
                .trusted_timestamp_keys(&[&timestamp])
                .commit(),
        )
        .map_err(Error::tuf)?;
        if offline.is_none() {
            tracing::warn!(
                keys = %online.0.display(),
                "firmware repository created with all four TUF keys (root and targets too) in the data dir, \
                 mode 0600: whoever holds this server can sign firmware; to keep root and targets offline, \
                 create it with `portcullis firmware keys init --offline DIR` instead"
            );
        } else {
            tracing::info!(dir = %self.dir.display(), "firmware repository created; root and targets keys are offline");
        }
        Ok(())
    }

    fn read_raw<M: Metadata>(&self, file: &str) -> Result<RawSignedMetadata<Pouf1, M>, Error> {
        let path = self.metadata_dir().join(file);
        let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
        Ok(RawSignedMetadata::new(bytes))
    }

    /// The current metadata, verified against its own root (expiry not checked: the
    /// server loads what it must re-sign).
    pub fn database(&self) -> Result<Database<Pouf1>, Error> {
        let root: RawSignedMetadata<Pouf1, RootMetadata> = self.read_raw("root.json")?;
        let timestamp: RawSignedMetadata<Pouf1, TimestampMetadata> = self.read_raw("timestamp.json")?;
        let ts = timestamp.parse_untrusted().map_err(Error::tuf)?.assume_valid().map_err(Error::tuf)?;
        let sv = ts.snapshot().version();
        let snapshot: RawSignedMetadata<Pouf1, SnapshotMetadata> =
            self.read_raw(&format!("{sv}.snapshot.json"))?;
        let sn = snapshot.parse_untrusted().map_err(Error::tuf)?.assume_valid().map_err(Error::tuf)?;
        let tv = sn
            .meta()
            .get(&MetadataPath::targets())
            .map(|m| m.version())
            .ok_or_else(|| Error::Refused("snapshot does not list targets".into()))?;
        let targets: RawSignedMetadata<Pouf1, TargetsMetadata> =
            self.read_raw(&format!("{tv}.targets.json"))?;
        let set = RawSignedMetadataSetBuilder::new()
            .root(root)
            .timestamp(timestamp)
            .snapshot(snapshot)
            .targets(targets)
            .build();
        let epoch = DateTime::<Utc>::UNIX_EPOCH;
        Database::from_trusted_metadata_with_start_time(&set, &epoch).map_err(Error::tuf)
    }

    /// The newest `root.json`: the trust anchor devices are provisioned with.
    pub fn root_json(&self) -> Result<Vec<u8>, Error> {
        let path = self.metadata_dir().join("root.json");
        std::fs::read(&path).map_err(|e| Error::io("read", &path, e))
    }

    /// Every published target.
    pub fn targets(&self) -> Result<Vec<TargetInfo>, Error> {
        let db = self.database()?;
        let mut out: Vec<TargetInfo> = db
            .trusted_targets()
            .map(|t| {
                t.targets()
                    .iter()
                    .filter_map(|(path, desc)| TargetInfo::from_description(path.as_str(), desc))
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.hardware.cmp(&b.hardware).then(a.version.cmp(&b.version)));
        Ok(out)
    }

    /// Metadata versions and expiry of each role, for status output.
    pub fn describe(&self) -> Result<RepositoryView, Error> {
        let db = self.database()?;
        let role = |v: u32, e: &DateTime<Utc>| RoleView { version: v, expires: e.to_rfc3339() };
        let root = db.trusted_root();
        Ok(RepositoryView {
            root: role(root.version(), root.expires()),
            targets: db.trusted_targets().map(|t| role(t.version(), t.expires())),
            snapshot: db.trusted_snapshot().map(|t| role(t.version(), t.expires())),
            timestamp: db.trusted_timestamp().map(|t| role(t.version(), t.expires())),
            consistent_snapshot: root.consistent_snapshot(),
            targets_key_online: self.holds_targets_key(),
            root_key_online: self.keys().has("root"),
        })
    }

    /// Adds `image` as target `HW/VERSION/NAME` (version and hardware in its custom
    /// metadata) and signs new targets, snapshot and timestamp. `offline` supplies the
    /// targets key when the server does not hold it.
    pub fn publish(
        &self,
        image: &Path,
        hardware: &str,
        version: &semver::Version,
        notes: Option<&str>,
        allow_downgrade: bool,
        offline: Option<&KeyDir>,
    ) -> Result<TargetInfo, Error> {
        crate::check_hardware(hardware)?;
        let name = image_name(image)?;
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        check_new_version(&self.targets()?, hardware, version, allow_downgrade)?;
        let targets_key = self.role_key("targets", offline)?;
        let snapshot = self.keys().load("snapshot")?;
        let timestamp = self.keys().load("timestamp")?;
        let path = format!("{hardware}/{version}/{name}");
        let target_path = TargetPath::new(path.clone()).map_err(Error::tuf)?;
        let custom = custom_metadata(hardware, version, notes);
        let file = std::fs::File::open(image).map_err(|e| Error::io("open", image, e))?;
        let reader = futures_util::io::AllowStdIo::new(std::io::BufReader::new(file));
        let db = self.database()?;
        let mut fs = self.fs();
        block_on(async {
            RepoBuilder::from_database(&mut fs, &db)
                .targets_expiration_duration(self.expiry.targets)
                .snapshot_expiration_duration(self.expiry.snapshot)
                .timestamp_expiration_duration(self.expiry.timestamp)
                .signing_targets_keys(&[&targets_key])
                .signing_snapshot_keys(&[&snapshot])
                .signing_timestamp_keys(&[&timestamp])
                .skip_root()
                .target_hash_algorithms(&[HashAlgorithm::Sha256])
                .add_target_with_custom(target_path, reader, custom)
                .await?
                .stage_targets()?
                .stage_snapshot()?
                .stage_timestamp()?
                .commit()
                .await
        })
        .map_err(Error::tuf)?;
        self.targets()?
            .into_iter()
            .find(|t| t.path == path)
            .ok_or_else(|| Error::Refused(format!("{path} missing after publish")))
    }

    /// The newest metadata of `role` as served (`root`, `timestamp`, `snapshot`, `targets`).
    pub fn current_raw(&self, role: &str) -> Result<Vec<u8>, Error> {
        let file = match role {
            "root" | "timestamp" => format!("{role}.json"),
            "snapshot" | "targets" => {
                let db = self.database()?;
                let v = if role == "snapshot" {
                    db.trusted_snapshot().map(|s| s.version())
                } else {
                    db.trusted_targets().map(|t| t.version())
                };
                format!("{}.{role}.json", v.unwrap_or(1))
            }
            other => {
                return Err(Error::Refused(format!("unknown role {other:?}; one of {}", ROLES.join(", "))));
            }
        };
        let path = self.metadata_dir().join(file);
        std::fs::read(&path).map_err(|e| Error::io("read", &path, e))
    }

    /// Stores an uploaded image as `uploads/SHA256` for [`Self::import_targets`].
    pub fn stage_upload(&self, bytes: &[u8]) -> Result<(String, u64), Error> {
        let sha = hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
        let path = self.upload_dir()?.join(&sha);
        std::fs::write(&path, bytes).map_err(|e| Error::io("write", &path, e))?;
        Ok((sha, bytes.len() as u64))
    }

    /// Adopts targets metadata signed elsewhere (an offline targets key, see
    /// [`sign_targets`]): it must carry the trusted root's targets threshold and be the
    /// next version; each target it adds must have its image in `uploads/SHA256` with the
    /// signed length. Then snapshot and timestamp are signed with the online keys, after
    /// checking that a client holding the current metadata accepts the new set.
    pub fn import_targets(&self, signed: &[u8]) -> Result<Vec<TargetInfo>, Error> {
        use tuf::metadata::{MetadataDescription, SnapshotMetadataBuilder, TimestampMetadataBuilder};
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let db = self.database()?;
        let root = db.trusted_root();
        let keys: Vec<&tuf::crypto::PublicKey> =
            root.targets().key_ids().iter().filter_map(|id| root.keys().get(id)).collect();
        let raw = RawSignedMetadata::<Pouf1, TargetsMetadata>::new(signed.to_vec());
        let new =
            tuf::verify::verify_signatures(&MetadataPath::targets(), &raw, root.targets().threshold(), keys)
                .map_err(|e| Error::Refused(format!("targets metadata refused: {e}")))?;
        let current = db.trusted_targets().ok_or_else(|| Error::Refused("no targets metadata yet".into()))?;
        if new.version() != current.version() + 1 {
            return Err(Error::Refused(format!(
                "targets metadata version {} does not follow the current {}",
                new.version(),
                current.version()
            )));
        }
        let mut added = Vec::new();
        for (path, desc) in new.targets() {
            match current.targets().get(path) {
                Some(old) if old == desc => continue,
                Some(_) => {
                    return Err(Error::Refused(format!(
                        "target {path} would change; publish a new version instead"
                    )));
                }
                None => {}
            }
            let info = TargetInfo::from_description(path.as_str(), desc)
                .ok_or_else(|| Error::Refused(format!("target {path} has no hardware/version")))?;
            let upload = self.upload_dir()?.join(&info.sha256);
            if std::fs::metadata(&upload).map(|m| m.len()).ok() != Some(info.length) {
                return Err(Error::Refused(format!(
                    "the image of {path} ({} bytes, sha256 {}) has not been uploaded",
                    info.length, info.sha256
                )));
            }
            added.push((info, upload));
        }
        let now = Utc::now();
        let snapshot_key = self.keys().load("snapshot")?;
        let timestamp_key = self.keys().load("timestamp")?;
        let sv = db.trusted_snapshot().map_or(1, |s| s.version() + 1);
        let targets_desc =
            MetadataDescription::new(new.version(), None, HashMap::new()).map_err(Error::tuf)?;
        let snapshot = SnapshotMetadataBuilder::new()
            .version(sv)
            .expires(now + self.expiry.snapshot)
            .insert_metadata_description(MetadataPath::targets(), targets_desc)
            .signed::<Pouf1>(&snapshot_key)
            .and_then(|s| s.to_raw())
            .map_err(Error::tuf)?;
        let tv = db.trusted_timestamp().map_or(1, |t| t.version() + 1);
        let snapshot_desc = MetadataDescription::new(sv, None, HashMap::new()).map_err(Error::tuf)?;
        let timestamp = TimestampMetadataBuilder::from_metadata_description(snapshot_desc)
            .version(tv)
            .expires(now + self.expiry.timestamp)
            .signed::<Pouf1>(&timestamp_key)
            .and_then(|t| t.to_raw())
            .map_err(Error::tuf)?;
        // What a client holding the current metadata will do with the new set.
        let mut check = db.clone();
        check.update_timestamp(&now, &timestamp).map_err(Error::tuf)?;
        check.update_snapshot(&now, &snapshot).map_err(Error::tuf)?;
        check.update_targets(&now, &raw).map_err(Error::tuf)?;
        for (info, upload) in &added {
            let dest = self.targets_dir().join(info.url_path().trim_start_matches("targets/"));
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
            }
            std::fs::rename(upload, &dest).map_err(|e| Error::io("move", &dest, e))?;
        }
        let meta = self.metadata_dir();
        let write = |name: String, bytes: &[u8]| -> Result<(), Error> {
            let tmp = meta.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, bytes).map_err(|e| Error::io("write", &tmp, e))?;
            std::fs::rename(&tmp, meta.join(&name)).map_err(|e| Error::io("rename", &tmp, e))
        };
        // Targets first, timestamp last: a client never sees a timestamp whose files are missing.
        write(format!("{}.targets.json", new.version()), raw.as_bytes())?;
        write(format!("{sv}.snapshot.json"), snapshot.as_bytes())?;
        write("timestamp.json".into(), timestamp.as_bytes())?;
        Ok(added.into_iter().map(|(i, _)| i).collect())
    }

    fn role_key(&self, role: &str, offline: Option<&KeyDir>) -> Result<Ed25519PrivateKey, Error> {
        if let Some(k) = self.keys().load_if_present(role)? {
            return Ok(k);
        }
        match offline {
            Some(dir) => dir.load(role),
            None => Err(Error::KeyOffline(role.to_owned())),
        }
    }

    /// Re-signs snapshot and timestamp when less than `margin` of their lifetime is left
    /// (or they expired): what keeps devices updating while nobody publishes.
    pub fn refresh(&self, now: DateTime<Utc>) -> Result<Refreshed, Error> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let db = self.database()?;
        let due = |expires: Option<&DateTime<Utc>>, lifetime: Duration| match expires {
            Some(e) => *e - now < lifetime / 2,
            None => true,
        };
        let snapshot_due = due(db.trusted_snapshot().map(|s| s.expires()), self.expiry.snapshot);
        let timestamp_due =
            snapshot_due || due(db.trusted_timestamp().map(|s| s.expires()), self.expiry.timestamp);
        if !timestamp_due {
            return Ok(Refreshed { snapshot: false, timestamp: false });
        }
        let snapshot = self.keys().load("snapshot")?;
        let timestamp = self.keys().load("timestamp")?;
        let mut fs = self.fs();
        block_on(async {
            let b = RepoBuilder::from_database(&mut fs, &db)
                .current_time(now)
                .snapshot_expiration_duration(self.expiry.snapshot)
                .timestamp_expiration_duration(self.expiry.timestamp)
                .signing_snapshot_keys(&[&snapshot])
                .signing_timestamp_keys(&[&timestamp])
                .skip_root()
                .skip_targets();
            let b = if snapshot_due { b.stage_snapshot()? } else { b.skip_snapshot() };
            b.stage_timestamp()?.commit().await
        })
        .map_err(Error::tuf)?;
        tracing::info!(snapshot = snapshot_due, "firmware metadata re-signed before expiry");
        Ok(Refreshed { snapshot: snapshot_due, timestamp: true })
    }

    /// Rotates the root key: root N+1 lists `new_root` and is signed by both the old
    /// and the new key, so clients holding root N accept it (TUF 5.3). Returns the new
    /// root version.
    pub fn rotate_root(&self, old_root: &KeyDir, new_root: &KeyDir) -> Result<u32, Error> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let old = old_root.load("root")?;
        let new = new_root.load("root")?;
        let db = self.database()?;
        let root = db.trusted_root();
        let pubkeys = |ids: &std::collections::HashSet<tuf::crypto::KeyId>| -> Vec<tuf::crypto::PublicKey> {
            ids.iter().filter_map(|id| root.keys().get(id).cloned()).collect()
        };
        let targets = pubkeys(root.targets().key_ids());
        let snapshot = pubkeys(root.snapshot().key_ids());
        let timestamp = pubkeys(root.timestamp().key_ids());
        let mut fs = self.fs();
        let expires = Utc::now() + self.expiry.root;
        let version = db.trusted_root().version() + 1;
        block_on(async {
            RepoBuilder::from_database(&mut fs, &db)
                .signing_root_keys(&[&old as &dyn PrivateKey, &new])
                .stage_root_with_builder(|b| {
                    let b = b.version(version).expires(expires).root_key(new.public().clone());
                    let b = targets.iter().fold(b, |b, k| b.targets_key(k.clone()));
                    let b = snapshot.iter().fold(b, |b, k| b.snapshot_key(k.clone()));
                    timestamp.iter().fold(b, |b, k| b.timestamp_key(k.clone()))
                })?
                .skip_targets()
                .skip_snapshot()
                .skip_timestamp()
                .commit()
                .await
        })
        .map_err(Error::tuf)?;
        Ok(version)
    }

    /// Resolves a request path under `/firmware/` to a file of the repository, refusing
    /// anything that is not a plain relative path inside it.
    pub fn resolve(&self, rel: &str) -> Option<PathBuf> {
        let (base, rest) = if let Some(r) = rel.strip_prefix("metadata/") {
            (self.metadata_dir(), r)
        } else if let Some(r) = rel.strip_prefix("targets/") {
            (self.targets_dir(), r)
        } else {
            return None;
        };
        let mut path = base;
        for part in rest.split('/') {
            if !crate::safe_component(part) {
                return None;
            }
            path.push(part);
        }
        path.is_file().then_some(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_publish_refresh_rotate() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let repo = FirmwareRepo::open(tmp.path(), Expiry::default(), None).unwrap_or_else(|e| panic!("{e}"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for role in ROLES {
                let mode = std::fs::metadata(repo.keys().path(role)).map(|m| m.permissions().mode() & 0o777);
                assert_eq!(mode.ok(), Some(0o600), "{role} key must be 0600");
            }
        }
        let img = tmp.path().join("fw.bin");
        std::fs::write(&img, b"image").unwrap_or_else(|e| panic!("{e}"));
        let v = semver::Version::new(1, 0, 0);
        let t = repo.publish(&img, "cam", &v, None, false, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((t.path.as_str(), t.length), ("cam/1.0.0/fw.bin", 5));
        assert!(repo.resolve(&t.url_path()).is_some());
        assert!(repo.resolve("targets/../keys/root.pk8").is_none());
        assert!(repo.resolve("metadata/../../keys/root.pk8").is_none());
        let now = Utc::now();
        let none = Refreshed { snapshot: false, timestamp: false };
        assert_eq!(repo.refresh(now).ok(), Some(none));
        // Timestamp (1 day) is re-signed with less than half left; snapshot (7 days) not yet.
        assert_eq!(
            repo.refresh(now + Duration::hours(13)).ok(),
            Some(Refreshed { snapshot: false, timestamp: true })
        );
        assert_eq!(
            repo.refresh(now + Duration::days(4)).ok(),
            Some(Refreshed { snapshot: true, timestamp: true })
        );
        let db = repo.database().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(db.trusted_timestamp().map(|t| t.version()), Some(4));
        let new = KeyDir::new(tmp.path().join("new"));
        new.generate(&["root"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(repo.rotate_root(&repo.keys(), &new).ok(), Some(2));
        assert!(repo.metadata_dir().join("2.root.json").is_file());
        // Keys are never replaced.
        assert!(repo.keys().generate(&["root"]).is_err());
    }
}
