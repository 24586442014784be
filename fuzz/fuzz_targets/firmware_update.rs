//! What a device receives from a hostile mirror: the input replaces one file of a real
//! repository (first byte: which — timestamp, snapshot, targets, a next root, or the
//! image) and the device updater runs its whole workflow against it. It must fail with
//! an error or install the genuine image; it must never panic. The server's Range
//! parser gets the same bytes.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use portcullis_firmware::repo::{Expiry, FirmwareRepo};
use portcullis_firmware::updater::{Fetched, Transport, UpdateOptions, UpdaterDir};
use serde_json::{Value, json};

struct Fixture {
    _tmp: tempfile::TempDir,
    mirror: PathBuf,
    device: PathBuf,
    root: Vec<u8>,
    image_path: String,
    rt: tokio::runtime::Runtime,
}

struct Mirror<'a> {
    files: &'a PathBuf,
    replaced: (&'a str, &'a [u8]),
}

impl Transport for Mirror<'_> {
    async fn get(&self, path: &str, offset: u64) -> Result<Fetched, String> {
        let body = if path == self.replaced.0 {
            self.replaced.1.to_vec()
        } else {
            match std::fs::read(self.files.join(path)) {
                Ok(b) => b,
                Err(_) => return Ok(Fetched { status: 404, body: Box::pin(futures_util::stream::empty()) }),
            }
        };
        let start = (offset as usize).min(body.len());
        let chunk: Vec<Result<Bytes, String>> = vec![Ok(Bytes::copy_from_slice(&body[start..]))];
        Ok(Fetched { status: if offset > 0 { 206 } else { 200 }, body: Box::pin(futures_util::stream::iter(chunk)) })
    }

    async fn post(&self, path: &str, _body: Value) -> Result<(u16, Value), String> {
        Ok(match path {
            "assignment" => (200, json!({ "target": "cam/1.1.0/fw.bin", "version": "1.1.0" })),
            _ => (204, Value::Null),
        })
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = FirmwareRepo::open(&tmp.path().join("server"), Expiry::default(), None).expect("repo");
        let file = tmp.path().join("fw.bin");
        std::fs::write(&file, b"genuine firmware image").expect("image");
        let t = repo.publish(&file, "cam", &semver_version(), None, false, None).expect("publish");
        Fixture {
            mirror: tmp.path().join("server/repo"),
            device: tmp.path().join("device"),
            root: repo.root_json().expect("root"),
            image_path: t.url_path(),
            rt: tokio::runtime::Builder::new_current_thread().build().expect("runtime"),
            _tmp: tmp,
        }
    })
}

fn semver_version() -> semver::Version {
    semver::Version::new(1, 1, 0)
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&which, content)) = data.split_first() else { return };
    let _ = portcullis_firmware::http::parse_range(&String::from_utf8_lossy(content), 1 << 20);
    let target = match which % 5 {
        0 => "metadata/timestamp.json",
        1 => "metadata/2.snapshot.json",
        2 => "metadata/2.targets.json",
        3 => "metadata/2.root.json",
        _ => f.image_path.as_str(),
    };
    let _ = std::fs::remove_dir_all(&f.device);
    let device = UpdaterDir::new(&f.device);
    device.init("cam", "1.0.0", Some(&f.root)).expect("init");
    let mirror = Mirror { files: &f.mirror, replaced: (target, content) };
    if let Ok(outcome) = f.rt.block_on(device.update(&mirror, UpdateOptions::default())) {
        // Only the genuine image may ever be installed.
        let _ = outcome;
        let installed = std::fs::read(device.slot_path('b')).expect("slot");
        assert_eq!(installed, b"genuine firmware image");
    }
});
