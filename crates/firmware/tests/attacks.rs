//! One fixture per attack TUF exists to stop. Each one starts from a real repository
//! (the server's [`FirmwareRepo`]), copies it to a "mirror" the attacker controls, tampers
//! with the mirror, and runs the device updater against it. Each asserts the updater's
//! exact error, that it reported the failure, and that nothing was installed.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use chrono::{Duration, Utc};
use portcullis_firmware::repo::{Expiry, FirmwareRepo, KeyDir};
use portcullis_firmware::updater::{Fetched, Outcome, Transport, UpdateOptions, UpdaterDir};
use serde_json::{Value, json};
use tuf::crypto::{Ed25519PrivateKey, HashAlgorithm, PrivateKey};
use tuf::metadata::{
    MetadataDescription, MetadataPath, SnapshotMetadataBuilder, TargetDescription, TargetPath,
    TargetsMetadataBuilder, TimestampMetadataBuilder,
};
use tuf::pouf::Pouf1;

/// A mirror of the repository on disk, plus the server's directive and report sink.
struct Mirror {
    dir: PathBuf,
    directive: Value,
    reports: Mutex<Vec<Value>>,
}

impl Transport for Mirror {
    async fn get(&self, path: &str, offset: u64) -> Result<Fetched, String> {
        let body = match std::fs::read(self.dir.join(path)) {
            Ok(b) => b,
            Err(_) => return Ok(Fetched { status: 404, body: Box::pin(futures_util::stream::empty()) }),
        };
        let (status, body) = if offset > 0 { (206, body[offset as usize..].to_vec()) } else { (200, body) };
        let chunks: Vec<Result<Bytes, String>> =
            body.chunks(64 * 1024).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        Ok(Fetched { status, body: Box::pin(futures_util::stream::iter(chunks)) })
    }

    async fn post(&self, path: &str, body: Value) -> Result<(u16, Value), String> {
        match path {
            "assignment" => Ok((200, self.directive.clone())),
            "report" => {
                self.reports.lock().unwrap().push(body);
                Ok((204, Value::Null))
            }
            other => Ok((404, json!({ "detail": other }))),
        }
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    repo: FirmwareRepo,
    repo_dir: PathBuf,
    device: UpdaterDir,
    mirror: Mirror,
    image: Vec<u8>,
}

const TARGET: &str = "cam/1.1.0/fw.bin";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let repo_dir = tmp.path().join("server");
    let repo = FirmwareRepo::open(&repo_dir, Expiry::default(), None).unwrap();
    let image: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let file = tmp.path().join("fw.bin");
    std::fs::write(&file, &image).unwrap();
    repo.publish(&file, "cam", &"1.1.0".parse().unwrap(), None, false, None).unwrap();
    let device = UpdaterDir::new(&tmp.path().join("device"));
    device.init("cam", "1.0.0", Some(&repo.root_json().unwrap())).unwrap();
    let mirror_dir = tmp.path().join("mirror");
    copy_dir(&repo_dir.join("repo"), &mirror_dir);
    let mirror = Mirror {
        dir: mirror_dir,
        directive: json!({ "target": TARGET, "version": "1.1.0", "rollout": null }),
        reports: Mutex::new(Vec::new()),
    };
    Fixture { _tmp: tmp, repo, repo_dir, device, mirror, image }
}

impl Fixture {
    fn sha(&self) -> String {
        ring::digest::digest(&ring::digest::SHA256, &self.image)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn image_path(&self) -> PathBuf {
        self.mirror.dir.join(format!("targets/cam/1.1.0/{}.fw.bin", self.sha()))
    }

    fn key(&self, role: &str) -> Ed25519PrivateKey {
        KeyDir::new(self.repo_dir.join("keys")).load(role).unwrap()
    }

    fn update(&self) -> Result<Outcome, String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(self.device.update(&self.mirror, UpdateOptions::default())).map_err(|e| e.to_string())
    }

    /// Asserts the update fails with exactly `expected` and changes nothing installed.
    fn refused(&self, expected: &str) {
        let err = self.update().unwrap_err();
        assert_eq!(err, expected);
        self.nothing_installed(&err);
    }

    /// Nothing installed or pending, and the failure reported with its reason.
    fn nothing_installed(&self, expected: &str) {
        let state = self.device.load().unwrap();
        assert_eq!(state.installed(), "1.0.0");
        assert_eq!(state.pending, None, "nothing may be pending");
        assert!(!self.device.slot_path('b').exists(), "nothing may reach the inactive slot");
        let reports = self.mirror.reports.lock().unwrap();
        if let Some(last) = reports.last() {
            assert_eq!(last["state"], "failed");
            assert_eq!(last["reason"], expected);
        }
    }

    /// Signs a targets (version `tv`), snapshot and timestamp with the given keys into
    /// the mirror, the way an attacker holding those keys would.
    fn forge(
        &self,
        targets: &[(&str, &[u8], &str)],
        tv: u32,
        targets_key: &dyn PrivateKey,
        timestamp_expires: chrono::DateTime<Utc>,
    ) {
        let mut b = TargetsMetadataBuilder::new().version(tv).expires(Utc::now() + Duration::days(30));
        for (path, bytes, version) in targets {
            let mut custom = HashMap::new();
            custom.insert("hardware".to_owned(), Value::from("cam"));
            custom.insert("version".to_owned(), Value::from(*version));
            let desc =
                TargetDescription::from_slice_with_custom(bytes, &[HashAlgorithm::Sha256], custom).unwrap();
            b = b.insert_target_description(TargetPath::new((*path).to_owned()).unwrap(), desc);
        }
        let raw_targets = b.signed::<Pouf1>(targets_key).unwrap().to_raw().unwrap();
        let meta = self.mirror.dir.join("metadata");
        std::fs::write(meta.join(format!("{tv}.targets.json")), raw_targets.as_bytes()).unwrap();
        let sv = tv + 10;
        let snapshot = SnapshotMetadataBuilder::new()
            .version(sv)
            .expires(Utc::now() + Duration::days(7))
            .insert_metadata_description(
                MetadataPath::targets(),
                MetadataDescription::from_slice(raw_targets.as_bytes(), tv, &[]).unwrap(),
            )
            .signed::<Pouf1>(&self.key("snapshot"))
            .unwrap()
            .to_raw()
            .unwrap();
        std::fs::write(meta.join(format!("{sv}.snapshot.json")), snapshot.as_bytes()).unwrap();
        let timestamp = TimestampMetadataBuilder::from_metadata_description(
            MetadataDescription::from_slice(snapshot.as_bytes(), sv, &[]).unwrap(),
        )
        .version(sv + 10)
        .expires(timestamp_expires)
        .signed::<Pouf1>(&self.key("timestamp"))
        .unwrap()
        .to_raw()
        .unwrap();
        std::fs::write(meta.join("timestamp.json"), timestamp.as_bytes()).unwrap();
    }
}

#[test]
fn the_untampered_mirror_installs() {
    let f = fixture();
    assert!(
        matches!(f.update().unwrap(), Outcome::Installed { ref version, slot: 'b', .. } if version == "1.1.0")
    );
    assert_eq!(std::fs::read(f.device.slot_path('b')).unwrap(), f.image);
}

#[test]
fn tampered_image() {
    let f = fixture();
    let mut evil = f.image.clone();
    evil[1000] ^= 0xff;
    std::fs::write(f.image_path(), &evil).unwrap();
    let got = ring::digest::digest(&ring::digest::SHA256, &evil)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    f.refused(&format!("image {TARGET} refused: sha256 mismatch (signed {}, got {got})", f.sha()));
}

#[test]
fn image_listed_by_an_untrusted_key() {
    // The attacker holds the online snapshot and timestamp keys, not the targets key.
    let f = fixture();
    let attacker = Ed25519PrivateKey::from_pkcs8(&Ed25519PrivateKey::pkcs8().unwrap()).unwrap();
    let evil = b"evil firmware".to_vec();
    f.forge(&[(TARGET, &evil, "1.1.0")], 3, &attacker, Utc::now() + Duration::days(1));
    f.refused("metadata refused: metadata targets signature threshold not met: 0/1");
}

#[test]
fn metadata_rolled_back_to_an_older_version() {
    let f = fixture();
    // The device has seen timestamp 2 (after the publish)...
    let old_timestamp = std::fs::read(f.mirror.dir.join("metadata/timestamp.json")).unwrap();
    f.device.load().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let check = UpdateOptions { check: true, ..Default::default() };
    let noop = Mirror {
        dir: f.mirror.dir.clone(),
        directive: json!({ "target": null, "version": null }),
        reports: Mutex::new(vec![]),
    };
    rt.block_on(f.device.update(&noop, check)).unwrap();
    // ...the server moves on to timestamp 3 and the device sees it too...
    f.repo.refresh(Utc::now() + Duration::days(6)).unwrap();
    copy_dir(&f.repo_dir.join("repo"), &f.mirror.dir);
    rt.block_on(f.device.update(&noop, check)).unwrap();
    // ...then the mirror serves the older, still valid timestamp 2.
    std::fs::write(f.mirror.dir.join("metadata/timestamp.json"), old_timestamp).unwrap();
    f.refused("metadata refused: attempted to roll back metadata timestamp from version 3 to 2");
}

#[test]
fn expired_timestamp_freeze() {
    let f = fixture();
    // A correctly signed but expired timestamp, as a mirror frozen in time serves it.
    let expired = Utc::now() - Duration::hours(1);
    f.forge(&[(TARGET, &f.image, "1.1.0")], 2, &f.key("targets"), expired);
    let err = f.update().unwrap_err();
    assert!(
        err.starts_with(&format!(
            "metadata refused: metadata timestamp expired at {}",
            expired.format("%Y-%m-%d %H:%M")
        )),
        "{err}"
    );
    f.nothing_installed(&err);
}

#[test]
fn snapshot_that_does_not_match_targets_mix_and_match() {
    let f = fixture();
    // Snapshot says targets version 2; the mirror serves version 1 under that name.
    let meta = f.mirror.dir.join("metadata");
    std::fs::copy(meta.join("1.targets.json"), meta.join("2.targets.json")).unwrap();
    f.refused("metadata refused: metadata snapshot expected metadata targets version 2, but found 1");
}

#[test]
fn target_larger_than_its_listed_length_endless_data() {
    let f = fixture();
    let mut longer = f.image.clone();
    longer.extend(std::iter::repeat_n(0u8, 1 << 20));
    std::fs::write(f.image_path(), &longer).unwrap();
    f.refused(&format!(
        "image {TARGET} refused: the server sent more than the {} bytes the signed metadata lists (endless data)",
        f.image.len()
    ));
}

#[test]
fn target_name_with_path_traversal() {
    let mut f = fixture();
    f.mirror.directive = json!({ "target": "cam/1.1.0/../../../../etc/passwd", "version": "1.1.0" });
    f.refused("target name \"cam/1.1.0/../../../../etc/passwd\" is not a plain relative path");
    // Signed metadata cannot smuggle one in either: rust-tuf refuses such a target path.
    assert!(TargetPath::new("../../etc/passwd".to_owned()).is_err());
}

#[test]
fn directive_to_install_an_older_version() {
    let f = fixture();
    // Install and confirm 1.1.0 first.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(f.device.update(&f.mirror, UpdateOptions::default())).unwrap();
    rt.block_on(f.device.confirm(&f.mirror)).unwrap();
    // The server (or whoever speaks for it) now directs 1.0.0, which is also signed.
    let old = b"old but signed".to_vec();
    f.forge(
        &[(TARGET, &f.image, "1.1.0"), ("cam/1.0.0/fw.bin", &old, "1.0.0")],
        3,
        &f.key("targets"),
        Utc::now() + Duration::days(1),
    );
    let downgrade = Mirror {
        dir: f.mirror.dir.clone(),
        directive: json!({ "target": "cam/1.0.0/fw.bin", "version": "1.0.0" }),
        reports: Mutex::new(vec![]),
    };
    let err = rt.block_on(f.device.update(&downgrade, UpdateOptions::default())).unwrap_err();
    assert_eq!(err.to_string(), "refusing version 1.0.0: not newer than 1.1.0 (anti-rollback)");
    let state = f.device.load().unwrap();
    assert_eq!((state.installed(), state.floor.as_str(), state.pending.clone()), ("1.1.0", "1.1.0", None));
    assert_eq!(downgrade.reports.lock().unwrap().last().unwrap()["state"], "failed");
    // The floor is persisted: a fresh process refuses just the same.
    let again = UpdaterDir::new(&f._tmp.path().join("device"));
    assert_eq!(again.load().unwrap().floor, "1.1.0");
}
