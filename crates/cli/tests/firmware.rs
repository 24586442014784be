//! Signed firmware updates end to end: the real server, the real agent binary over
//! mTLS, python-tuf's ngclient as the reference TUF client, and a simulated fleet of
//! 1,000 devices (agent library in-process) for staged rollouts.
#![allow(clippy::unwrap_used)]

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;

use harness::upstream::enroll;
use harness::{Server, curl, curl_mtls};
use portcullis_agent::firmware::MtlsTransport;
use portcullis_agent::{Outcome, UpdateOptions, UpdaterDir};
use portcullis_firmware::updater::Transport;
use serde_json::{Value, json};

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(harness::agent_bin()).args(args).output().unwrap()
}

fn agent_ok(args: &[&str]) -> String {
    let out = agent(args);
    assert!(out.status.success(), "portcullis-agent {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn image(path: &Path, len: usize, seed: u8) -> Vec<u8> {
    let bytes: Vec<u8> =
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8).collect();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

fn sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn ngclient(s: &Server, id: &str, root: &Path, target: &str) -> Value {
    let (ca, _) = s.ca_files();
    let dir = s.path(id);
    let work = s.path(&format!("ngclient-{id}"));
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/tuf_ngclient.py"))
        .arg(s.url())
        .arg(&ca)
        .arg(dir.join("chain.pem"))
        .arg(dir.join("key.pem"))
        .arg(root)
        .arg(target)
        .arg(&work)
        .output()
        .unwrap();
    assert!(out.status.success(), "ngclient: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn cli_err(s: &Server, args: &[&str]) -> String {
    let out = s.cli(args);
    assert!(!out.status.success(), "portcullis {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn publish_roll_out_update_confirm_and_python_tuf_conformance() {
    let s = Server::start();
    let (chain, key) = enroll(&s, "cam-01", "cams");
    let agent_dir = s.path("cam-01");
    let dir = agent_dir.to_str().unwrap();
    let root_json = s.path("root.json");
    std::fs::write(&root_json, s.cli_ok(&["firmware", "root"])).unwrap();

    // First contact: the agent stores hardware, factory version and trust anchor.
    let out = agent_ok(&[
        "update",
        "--dir",
        dir,
        "--hardware",
        "cam",
        "--installed-version",
        "1.0.0",
        "--root",
        root_json.to_str().unwrap(),
    ]);
    assert_eq!(out.trim(), "up to date: running 1.0.0");

    // Publish; the same version twice and a lower one are refused.
    let img = s.path("cam-fw.bin");
    let bytes = image(&img, 3 * 1024 * 1024 + 17, 1);
    let out = s.cli_ok(&[
        "firmware",
        "publish",
        img.to_str().unwrap(),
        "--hardware",
        "cam",
        "--version",
        "1.1.0",
        "--notes",
        "fixes CVE-0000",
    ]);
    assert!(out.starts_with("published cam/1.1.0/cam-fw.bin"), "{out}");
    let err = cli_err(
        &s,
        &["firmware", "publish", img.to_str().unwrap(), "--hardware", "cam", "--version", "1.1.0"],
    );
    assert!(err.contains("version 1.1.0 is already published for hardware cam"), "{err}");
    let err = cli_err(
        &s,
        &["firmware", "publish", img.to_str().unwrap(), "--hardware", "cam", "--version", "1.0.5"],
    );
    assert!(err.contains("version 1.0.5 is lower than the newest published for cam (1.1.0)"), "{err}");
    let list: Value = serde_json::from_str(&s.cli_ok(&["firmware", "list", "--json"])).unwrap();
    let t = &list["targets"][0];
    assert_eq!(
        (t["path"].as_str(), t["length"].as_u64()),
        (Some("cam/1.1.0/cam-fw.bin"), Some(bytes.len() as u64))
    );
    assert_eq!(t["sha256"].as_str().unwrap(), sha256(&bytes));

    // The audit reads the fleet view: cam-01 is behind the newest published version.
    let audit_firmware = |status: &str| {
        let v: Value = serde_json::from_str(&s.cli_ok(&["audit", "run", "--json"])).unwrap();
        assert_eq!(v["run"]["summary"]["checks"]["firmware"], "ran", "{v}");
        let f: Vec<&Value> =
            v["findings"].as_array().unwrap().iter().filter(|f| f["check"] == "firmware").collect();
        assert_eq!(f.len(), 1, "{v}");
        assert_eq!(
            (f[0]["device"].as_str(), f[0]["key"].as_str(), f[0]["status"].as_str()),
            (Some("cam-01"), Some("firmware/outdated"), Some(status)),
            "{v}"
        );
        assert_eq!(
            f[0]["evidence"],
            "running 1.0.0 (last report of its agent); newest published for hardware cam: 1.1.0"
        );
    };
    audit_firmware("new");

    // No rollout yet: nothing directed.
    assert_eq!(agent_ok(&["update", "--dir", dir]).trim(), "up to date: running 1.0.0");
    let r: Value = serde_json::from_str(&s.cli_ok(&[
        "firmware",
        "rollout",
        "create",
        "--hardware",
        "cam",
        "--version",
        "1.1.0",
        "--group",
        "cams",
        "--stages",
        "100",
        "--json",
    ]))
    .unwrap();
    assert_eq!((r["population"].as_u64(), r["admitted"].as_u64()), (Some(1), Some(1)));

    let out = agent_ok(&["update", "--dir", dir, "--check"]);
    assert!(out.starts_with("available: 1.1.0 (cam/1.1.0/cam-fw.bin"), "{out}");
    let out = agent_ok(&["update", "--dir", dir]);
    assert!(out.starts_with("installed 1.1.0 (cam/1.1.0/cam-fw.bin) into slot b"), "{out}");
    assert_eq!(std::fs::read(agent_dir.join("firmware/slot-b.img")).unwrap(), bytes);
    // Pending: a second update waits for the confirmation.
    let err = String::from_utf8_lossy(&agent(&["update", "--dir", dir]).stderr).into_owned();
    assert!(err.contains("version 1.1.0 is installed in slot b and waits for confirmation"), "{err}");
    assert_eq!(agent_ok(&["confirm", "--dir", dir]).trim(), "confirmed: running 1.1.0 from slot b");
    assert_eq!(agent_ok(&["update", "--dir", dir]).trim(), "up to date: running 1.1.0");
    // Updated: the next audit resolves the finding.
    audit_firmware("resolved");

    // The fleet view saw every state change, with reasons.
    let st: Value = serde_json::from_str(&s.cli_ok(&["firmware", "status", "--json"])).unwrap();
    let cam = &st["hardware"][0];
    assert_eq!(cam["versions"], json!({ "1.1.0": 1 }));
    assert_eq!(cam["devices"][0]["last"]["state"], "confirmed");
    assert_eq!(cam["rollouts"][0]["confirmed"], 1);
    let store_reports = rusqlite_reports(&s);
    assert_eq!(store_reports, ["downloading", "verified", "installed", "confirmed"]);

    // The reference client: python-tuf ngclient refreshes from root.json and downloads.
    let v = ngclient(&s, "cam-01", &root_json, "cam/1.1.0/cam-fw.bin");
    assert_eq!(v["sha256"].as_str().unwrap(), sha256(&bytes));
    assert_eq!(v["length"].as_u64(), Some(bytes.len() as u64));
    assert_eq!(v["custom"], json!({ "hardware": "cam", "version": "1.1.0", "notes": "fixes CVE-0000" }));
    assert_eq!((v["root"].as_u64(), v["targets"].as_u64()), (Some(1), Some(2)));

    // Range requests (resume) over mTLS, answered 206 with the exact bytes.
    let path = format!("/firmware/targets/cam/1.1.0/{}.cam-fw.bin", sha256(&bytes));
    let r = curl_mtls(&s, &chain, &key, &path, &["-H", "Range: bytes=1000-"]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, bytes[1000..]);
    // A report naming another device is refused; no certificate, no firmware.
    let spoof = json!({"state": "failed", "hardware": "cam", "installed": "1.1.0", "version": "1.1.0", "device": "cam-02"});
    let r = curl_mtls(&s, &chain, &key, "/firmware/report", &["-X", "POST", "--data", &spoof.to_string()]);
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.detail(), "report names device \"cam-02\" but comes from cam-01's certificate");
    let (ca, _) = s.ca_files();
    let r =
        curl(&["--cacert", ca.to_str().unwrap()], &format!("{}/firmware/metadata/timestamp.json", s.url()));
    assert_eq!(r.status, 401);

    // Root rotation (offline operation: server stopped), then devices holding root v1
    // follow the chain: the agent and ngclient both trust root v2.
    let data = s.data_dir();
    let dir_handle = s.into_dir();
    let new_keys = dir_handle.path().join("new-root-keys");
    let out = harness::run(
        Command::new(harness::BIN)
            .arg("--data-dir")
            .arg(&data)
            .args(["firmware", "keys", "rotate-root", "--old"])
            .arg(data.join("firmware/keys"))
            .arg("--new")
            .arg(&new_keys),
    );
    assert!(out.starts_with("root rotated: version 2"), "{out}");
    let s = Server::start_in(dir_handle, "");
    // The restarted server listens on another port: point the agent at it.
    let cfg = agent_dir.join("agent.json");
    let mut a: Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    a["server"] = Value::from(s.url());
    std::fs::write(&cfg, a.to_string()).unwrap();
    let v = ngclient(&s, "cam-01", &root_json, "cam/1.1.0/cam-fw.bin");
    assert_eq!(v["root"].as_u64(), Some(2));
    assert_eq!(agent_ok(&["update", "--dir", dir]).trim(), "up to date: running 1.1.0");
    assert!(
        agent_dir.join("firmware/tuf/metadata/2.root.json").exists()
            || agent_dir.join("firmware/tuf/metadata/root.json").exists()
    );
}

fn rusqlite_reports(s: &Server) -> Vec<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys,json; c=sqlite3.connect(sys.argv[1]); \
             print(json.dumps([json.loads(d)['state'] for (d,) in c.execute('SELECT document FROM firmware_reports ORDER BY id')]))",
        ])
        .arg(s.data_dir().join("registry.sqlite"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn reports_count_only_from_devices_the_rollout_admitted() {
    let s = Server::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dirs = rt.block_on(fleet(&s, "sensor", "floor-3", 40));
    assert!(rt.block_on(directed(&dirs)).is_empty());
    let img = s.path("sensor.bin");
    image(&img, 4096, 3);
    s.cli_ok(&["firmware", "publish", img.to_str().unwrap(), "--hardware", "sensor", "--version", "2.1.0"]);
    let r: Value = serde_json::from_str(&s.cli_ok(&[
        "firmware",
        "rollout",
        "create",
        "--hardware",
        "sensor",
        "--version",
        "2.1.0",
        "--stages",
        "5,100",
        "--json",
    ]))
    .unwrap();
    let id = r["id"].as_i64().unwrap();
    let admitted = rt.block_on(directed(&dirs));
    assert_eq!(admitted.len(), 2);
    let outsider =
        dirs.iter().find(|d| !admitted.contains(&d.file_name().unwrap().to_string_lossy().into_owned()));
    let report = |dir: &Path, hardware: &str, version: &str| {
        let t = MtlsTransport::open(dir).unwrap();
        let body = json!({"state": "failed", "hardware": hardware, "installed": "2.0.0", "version": version,
                          "reason": "health check failed", "rollout": id});
        rt.block_on(t.post("report", body)).unwrap()
    };
    let status = || -> Value {
        serde_json::from_str(&s.cli_ok(&["firmware", "rollout", "status", &id.to_string(), "--json"]))
            .unwrap()
    };

    // A device the rollout never offered the version to cannot fail it.
    let (code, body) = report(outsider.unwrap(), "sensor", "2.1.0");
    assert_eq!(code, 403, "{body}");
    assert!(body["detail"].as_str().unwrap().contains(&format!("rollout {id} has not admitted")), "{body}");
    // An admitted device, about another version or hardware model: refused too.
    let first = s.path(&admitted[0]);
    let (code, body) = report(&first, "sensor", "2.2.0");
    assert_eq!(code, 403, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("offers sensor 2.1.0, not sensor 2.2.0"), "{body}");
    assert_eq!(report(&first, "cam", "2.1.0").0, 403);
    let st = status();
    assert_eq!((st["state"].as_str(), st["failed"].as_u64()), (Some("active"), Some(0)));

    // The admitted devices' failures count, each once however often it reports, and
    // two reporting devices are fewer than the default ten needed to pause.
    for _ in 0..5 {
        assert_eq!(report(&first, "sensor", "2.1.0").0, 204);
    }
    assert_eq!(report(&s.path(&admitted[1]), "sensor", "2.1.0").0, 204);
    let st = status();
    assert_eq!(st["failed"], 2);
    assert_eq!(st["min_reports"], 10);
    assert_eq!(st["state"], "active", "{st}");
}

/// Enrolls `n` devices in `group` through the admin API and EST; returns their dirs.
async fn fleet(s: &Server, prefix: &str, group: &str, n: usize) -> Vec<PathBuf> {
    let admin = s.admin_client();
    let root_pem = s.root_pem();
    let mut dirs = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let id = format!("{prefix}-{i:04}");
        let r = admin.register_device(&id, Some(group), None).await.unwrap();
        let token = portcullis_core::Token::from_presented(&r.token);
        let dir = s.path(&id);
        dirs.push(dir.clone());
        let (url, root_pem) = (s.url(), root_pem.clone());
        tasks.spawn(async move {
            portcullis_agent::enroll(
                &url,
                &root_pem,
                &portcullis_core::DeviceId::try_new(id).unwrap(),
                &token,
                &dir,
            )
            .await
            .unwrap();
        });
        while tasks.len() >= 32 {
            tasks.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    dirs
}

async fn directed(dirs: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::new();
    for d in dirs {
        let t = MtlsTransport::open(d).unwrap();
        let installed =
            UpdaterDir::new(d).load().map(|s| s.installed().to_owned()).unwrap_or_else(|_| "2.0.0".into());
        let (status, v) =
            t.post("assignment", json!({ "hardware": "sensor", "installed": installed })).await.unwrap();
        assert_eq!(status, 200, "{v}");
        if v["target"].is_string() {
            out.push(d.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    out
}

#[test]
fn rollout_stages_on_a_thousand_devices_resume_and_automatic_pause() {
    let s = Server::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let root_json = s.cli_ok(&["firmware", "root"]);
    let dirs = rt.block_on(fleet(&s, "sensor", "floor-3", 1000));
    // Every device checks in once (that is how the server learns its hardware).
    assert!(rt.block_on(directed(&dirs)).is_empty());

    let img = s.path("sensor.bin");
    let bytes = image(&img, 2 * 1024 * 1024, 7);
    s.cli_ok(&["firmware", "publish", img.to_str().unwrap(), "--hardware", "sensor", "--version", "2.1.0"]);
    let r: Value = serde_json::from_str(&s.cli_ok(&[
        "firmware",
        "rollout",
        "create",
        "--hardware",
        "sensor",
        "--version",
        "2.1.0",
        "--stages",
        "5,25,100",
        "--max-failure-rate",
        "5%",
        "--json",
    ]))
    .unwrap();
    let id = r["id"].as_i64().unwrap().to_string();
    assert_eq!((r["population"].as_u64(), r["admitted"].as_u64()), (Some(1000), Some(50)));

    // Stage sizes are exact, nested, and the same whichever order devices ask in.
    let first = rt.block_on(directed(&dirs));
    assert_eq!(first.len(), 50);
    let mut reversed = dirs.clone();
    reversed.reverse();
    let mut again = rt.block_on(directed(&reversed));
    again.sort();
    assert_eq!(again, first);
    s.cli_ok(&["firmware", "rollout", "advance", &id]);
    let second = rt.block_on(directed(&dirs));
    assert_eq!(second.len(), 250);
    assert!(first.iter().all(|d| second.contains(d)));

    // Ten admitted devices update for real; the first one's download is interrupted
    // after 512 KiB and resumes where it stopped.
    let admitted: Vec<PathBuf> = second.iter().take(10).map(|d| s.path(d)).collect();
    rt.block_on(async {
        for (i, d) in admitted.iter().enumerate() {
            let up = UpdaterDir::new(d);
            up.init("sensor", "2.0.0", Some(root_json.as_bytes())).unwrap();
            let t = MtlsTransport::open(d).unwrap();
            if i == 0 {
                let e = up
                    .update(&t, UpdateOptions { interrupt_after: Some(512 * 1024), ..Default::default() })
                    .await
                    .unwrap_err();
                assert!(e.to_string().starts_with("server: download interrupted after"), "{e}");
                let partial = std::fs::metadata(d.join(format!("firmware/download/{}.part", sha256(&bytes))))
                    .unwrap()
                    .len();
                assert!(partial >= 512 * 1024 && partial < bytes.len() as u64);
                match up.update(&t, UpdateOptions::default()).await.unwrap() {
                    Outcome::Installed { fetched, .. } => assert_eq!(fetched, bytes.len() as u64 - partial),
                    other => panic!("{other:?}"),
                }
            } else {
                assert!(matches!(
                    up.update(&t, UpdateOptions::default()).await.unwrap(),
                    Outcome::Installed { .. }
                ));
            }
            assert_eq!(std::fs::read(up.slot_path('b')).unwrap(), bytes);
            up.confirm(&t).await.unwrap();
        }
    });
    let st: Value =
        serde_json::from_str(&s.cli_ok(&["firmware", "rollout", "status", &id, "--json"])).unwrap();
    assert_eq!((st["confirmed"].as_u64(), st["state"].as_str()), (Some(10), Some("active")));

    // One health-check failure among eleven outcomes is 9 % > 5 %: the rollout pauses
    // itself and admits nobody new.
    rt.block_on(async {
        let d = s.path(&second[10]);
        let up = UpdaterDir::new(&d);
        up.init("sensor", "2.0.0", Some(root_json.as_bytes())).unwrap();
        let t = MtlsTransport::open(&d).unwrap();
        up.update(&t, UpdateOptions::default()).await.unwrap();
        let state = up.rollback(&t, "health check failed: watchdog reset").await.unwrap();
        assert_eq!((state.installed(), state.active), ("2.0.0", 'a'));
    });
    let st: Value =
        serde_json::from_str(&s.cli_ok(&["firmware", "rollout", "status", &id, "--json"])).unwrap();
    assert_eq!(st["state"], "paused");
    assert_eq!(st["reason"], "paused automatically: 1 of 11 reporting devices failed (9.1% > 5.0%)");
    assert!(rt.block_on(directed(&dirs)).is_empty());
    // The operator resumes after looking; the stage admits again (all but the ten
    // devices that already run 2.1.0).
    s.cli_ok(&["firmware", "rollout", "resume", &id]);
    assert_eq!(rt.block_on(directed(&dirs)).len(), 240);
    let fleet_view: Value =
        serde_json::from_str(&s.cli_ok(&["firmware", "status", "--hardware", "sensor", "--json"])).unwrap();
    let hw = &fleet_view["hardware"][0];
    assert_eq!(hw["versions"]["2.1.0"], 10);
    assert_eq!(hw["versions"]["2.0.0"], 990);
    assert_eq!(hw["behind"].as_array().unwrap().len(), 990);
    assert_eq!(hw["failed"].as_array().unwrap().len(), 1);
}

#[test]
fn offline_root_and_targets_keys_sign_on_another_machine() {
    // Before the first start: the repository is created with root and targets keys on
    // "removable media"; the data dir keeps only the online snapshot and timestamp keys.
    let dir = tempfile::tempdir().unwrap();
    let data = harness::data_dir(dir.path());
    let media = dir.path().join("media");
    let cli =
        |args: &[&str]| Command::new(harness::BIN).arg("--data-dir").arg(&data).args(args).output().unwrap();
    assert!(cli(&["init"]).status.success());
    let out = cli(&["firmware", "keys", "init", "--offline", media.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (dir, role, present) in [
        (&media, "root", true),
        (&media, "targets", true),
        (&data.join("firmware/keys"), "root", false),
        (&data.join("firmware/keys"), "targets", false),
        (&data.join("firmware/keys"), "snapshot", true),
        (&data.join("firmware/keys"), "timestamp", true),
    ] {
        let path = dir.join(format!("{role}.pk8"));
        assert_eq!(path.exists(), present, "{}", path.display());
        if present {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
    let s = Server::start_in(dir, "");
    let img = s.path("lock-fw.bin");
    let bytes = image(&img, 700_000, 3);
    let err = cli_err(
        &s,
        &["firmware", "publish", img.to_str().unwrap(), "--hardware", "lock", "--version", "3.0.0"],
    );
    assert!(err.contains("the targets key is kept offline"), "{err}");

    // The signing machine has the key, the image and the current targets metadata —
    // no data dir, no server.
    let current = s.path("targets-current.json");
    std::fs::write(&current, s.cli_ok(&["firmware", "metadata", "targets"])).unwrap();
    let signed = s.path("targets-signed.json");
    let out =
        harness::run(Command::new(harness::BIN).args(["--data-dir", "/nonexistent/portcullis"]).args([
            "firmware",
            "sign-targets",
            img.to_str().unwrap(),
            "--hardware",
            "lock",
            "--version",
            "3.0.0",
            "--keys",
            media.to_str().unwrap(),
            "--current",
            current.to_str().unwrap(),
            "--out",
            signed.to_str().unwrap(),
        ]));
    assert!(out.starts_with("signed targets metadata with lock/3.0.0/lock-fw.bin"), "{out}");
    // A document signed by any other key is refused, and changes nothing.
    let rogue_keys = s.path("rogue");
    portcullis_firmware::repo::KeyDir::new(&rogue_keys).generate(&["targets"]).unwrap();
    let rogue = s.path("targets-rogue.json");
    let forged = portcullis_firmware::repo::sign_targets(
        &std::fs::read(&current).unwrap(),
        portcullis_firmware::repo::NewTarget {
            image: &img,
            hardware: "lock",
            version: &"3.0.0".parse().unwrap(),
            notes: None,
            allow_downgrade: false,
        },
        &portcullis_firmware::repo::KeyDir::new(&rogue_keys).load("targets").unwrap(),
        chrono::Duration::days(30),
    );
    // The rogue key did not sign the current metadata, so even signing is refused...
    assert!(
        forged.unwrap_err().to_string().starts_with("the current targets metadata is not signed by this key")
    );
    // ...and a rogue document built anyway is refused by the server.
    let mut doc: Value = serde_json::from_slice(&std::fs::read(&signed).unwrap()).unwrap();
    doc["signatures"][0]["sig"] = Value::from("00".repeat(64));
    std::fs::write(&rogue, doc.to_string()).unwrap();
    let err = cli_err(
        &s,
        &["firmware", "import-targets", rogue.to_str().unwrap(), "--image", img.to_str().unwrap()],
    );
    assert!(
        err.contains("targets metadata refused: metadata targets signature threshold not met: 0/1"),
        "{err}"
    );

    // Back on the server: the signed document and the image.
    let out =
        s.cli_ok(&["firmware", "import-targets", signed.to_str().unwrap(), "--image", img.to_str().unwrap()]);
    assert!(out.contains("published lock/3.0.0/lock-fw.bin (700000 bytes"), "{out}");
    let err = cli_err(
        &s,
        &["firmware", "import-targets", signed.to_str().unwrap(), "--image", img.to_str().unwrap()],
    );
    assert!(err.contains("targets metadata version 2 does not follow the current 2"), "{err}");

    // A device verifies and installs it; the reference client agrees.
    enroll(&s, "lock-01", "doors");
    let root_json = s.path("root.json");
    std::fs::write(&root_json, s.cli_ok(&["firmware", "root"])).unwrap();
    let agent_dir = s.path("lock-01");
    let d = agent_dir.to_str().unwrap();
    agent_ok(&[
        "update",
        "--dir",
        d,
        "--hardware",
        "lock",
        "--installed-version",
        "2.0.0",
        "--root",
        root_json.to_str().unwrap(),
    ]);
    s.cli_ok(&[
        "firmware",
        "rollout",
        "create",
        "--hardware",
        "lock",
        "--version",
        "3.0.0",
        "--stages",
        "100",
        "--min-reports",
        "1",
    ]);
    let out = agent_ok(&["update", "--dir", d]);
    assert!(out.starts_with("installed 3.0.0 (lock/3.0.0/lock-fw.bin) into slot b"), "{out}");
    assert_eq!(std::fs::read(agent_dir.join("firmware/slot-b.img")).unwrap(), bytes);
    // The next start: a failing health check rolls back and says why; a passing one
    // after the next install confirms.
    let out = agent_ok(&["boot", "--dir", d, "--health-check", "exit 3"]);
    assert_eq!(
        out.trim(),
        "rolled back: health check `exit 3` failed (exit status: 3); running 2.0.0 from slot a"
    );
    let st: Value =
        serde_json::from_str(&s.cli_ok(&["firmware", "status", "--hardware", "lock", "--json"])).unwrap();
    assert_eq!(st["hardware"][0]["devices"][0]["last"]["state"], "failed");
    assert_eq!(
        st["hardware"][0]["devices"][0]["last"]["reason"],
        "rolled back to slot a: health check `exit 3` failed (exit status: 3)"
    );
    // One failure of one reporting device paused the rollout (100% > 5%).
    assert_eq!(st["hardware"][0]["rollouts"][0]["state"], "paused");
    s.cli_ok(&["firmware", "rollout", "resume", "1"]);
    agent_ok(&["update", "--dir", d]);
    let out = agent_ok(&["boot", "--dir", d, "--health-check", "true"]);
    assert_eq!(out.trim(), "health check passed: confirmed 3.0.0 in slot b");
    let out = agent_ok(&["boot", "--dir", d, "--health-check", "false"]);
    assert_eq!(out.trim(), "nothing pending: running 3.0.0 from slot b");
    let v = ngclient(&s, "lock-01", &root_json, "lock/3.0.0/lock-fw.bin");
    assert_eq!(v["sha256"].as_str().unwrap(), sha256(&bytes));
}

/// A transport that answers `metadata/timestamp.json` with bytes captured earlier: the
/// replay of old metadata a device offline for days might be offered.
struct Replay<'t> {
    inner: &'t MtlsTransport,
    timestamp: bytes::Bytes,
}

impl portcullis_firmware::updater::Transport for Replay<'_> {
    async fn get(&self, path: &str, offset: u64) -> Result<portcullis_firmware::updater::Fetched, String> {
        if path == "metadata/timestamp.json" {
            let body = futures_util::stream::once(std::future::ready(Ok(self.timestamp.clone())));
            return Ok(portcullis_firmware::updater::Fetched { status: 200, body: Box::pin(body) });
        }
        self.inner.get(path, offset).await
    }

    async fn post(&self, path: &str, body: Value) -> Result<(u16, Value), String> {
        self.inner.post(path, body).await
    }
}

async fn fetch_all(t: &MtlsTransport, path: &str) -> bytes::Bytes {
    use futures_util::StreamExt;
    let mut f = t.get(path, 0).await.unwrap();
    assert_eq!(f.status, 200);
    let mut out = Vec::new();
    while let Some(chunk) = f.body.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out.into()
}

#[test]
fn an_offline_device_refuses_metadata_older_than_it_ever_trusted() {
    let s = Server::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let root_json = s.cli_ok(&["firmware", "root"]);
    let dirs = rt.block_on(fleet(&s, "lock", "doors", 1));
    let d = &dirs[0];
    let up = UpdaterDir::new(d);
    up.init("lock", "1.0.0", Some(root_json.as_bytes())).unwrap();
    let t = MtlsTransport::open(d).unwrap();
    // The timestamp of today, then a publication: the repository signs a newer one.
    let old = rt.block_on(fetch_all(&t, "metadata/timestamp.json"));
    let img = s.path("lock.bin");
    image(&img, 4096, 9);
    s.cli_ok(&["firmware", "publish", img.to_str().unwrap(), "--hardware", "lock", "--version", "1.1.0"]);
    rt.block_on(up.update(&t, UpdateOptions::default())).unwrap();
    let versions: Value =
        serde_json::from_slice(&std::fs::read(d.join("firmware/versions.json")).unwrap()).unwrap();
    let trusted = versions["timestamp"].as_u64().unwrap();
    assert!(trusted >= 2, "{versions}");

    // Offline for days: the local timestamp and snapshot expired and are gone from the
    // metadata cache. Offered the old timestamp, the device refuses it.
    let cache = d.join("firmware/tuf/metadata");
    for e in std::fs::read_dir(&cache).unwrap() {
        let p = e.unwrap().path();
        if !p.file_name().unwrap().to_string_lossy().contains("root") {
            let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
        }
    }
    let replay = Replay { inner: &t, timestamp: old };
    let e = rt.block_on(up.update(&replay, UpdateOptions::default())).unwrap_err().to_string();
    assert!(
        e.contains(&format!("rollback refused: the repository's timestamp metadata is version 1, but version {trusted} was trusted before")),
        "{e}"
    );
    // The real repository is still accepted.
    rt.block_on(up.update(&t, UpdateOptions::default())).unwrap();
}

#[test]
fn agent_state_is_written_durably_and_never_silently_reset() {
    let s = Server::start();
    let root_json = s.path("root.json");
    std::fs::write(&root_json, s.cli_ok(&["firmware", "root"])).unwrap();
    let (_chain, _key) = enroll(&s, "lock-01", "doors");
    let agent_dir = s.path("lock-01");
    let d = agent_dir.to_str().unwrap();
    let img = s.path("lock.bin");
    image(&img, 4096, 5);
    s.cli_ok(&["firmware", "publish", img.to_str().unwrap(), "--hardware", "lock", "--version", "2.0.0"]);
    let setup = ["update", "--dir", d, "--hardware", "lock", "--installed-version", "1.0.0", "--root"];
    let mut args = setup.to_vec();
    args.push(root_json.to_str().unwrap());
    s.cli_ok(&[
        "firmware",
        "rollout",
        "create",
        "--hardware",
        "lock",
        "--version",
        "2.0.0",
        "--stages",
        "100",
    ]);
    let out = agent_ok(&args);
    assert!(out.starts_with("installed 2.0.0"), "{out}");

    // Durable: the confirmation's state write, syscall by syscall — temporary file
    // synced, renamed over state.json, the directory synced after the rename.
    let trace = s.path("trace.txt");
    let st = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=openat,fsync,fdatasync,rename,renameat,renameat2", "-o"])
        .arg(&trace)
        .arg(harness::agent_bin())
        .args(["boot", "--dir", d, "--health-check", "true"])
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let trace = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = trace.lines().collect();
    let at = |pred: &dyn Fn(&str) -> bool, from: usize| {
        lines.iter().skip(from).position(|l| pred(l)).map(|i| i + from).unwrap_or_else(|| panic!("{trace}"))
    };
    let open_tmp = at(&|l| l.contains("openat(") && l.contains(".state.json.tmp"), 0);
    let fd = lines[open_tmp].rsplit("= ").next().unwrap().trim().to_owned();
    let sync_tmp = at(&|l| l.contains(&format!("fsync({fd})")), open_tmp);
    let rename = at(
        &|l| l.contains("rename") && l.contains(".state.json.tmp") && l.contains("state.json\""),
        sync_tmp,
    );
    let open_dir =
        at(&|l| l.contains("openat(") && l.contains("/firmware\"") && l.contains("O_RDONLY"), rename);
    let dfd = lines[open_dir].rsplit("= ").next().unwrap().trim().to_owned();
    at(&|l| l.contains(&format!("fsync({dfd})")), open_dir);

    // Lost after a power cut: an error that names the fix, and nothing recreated.
    let state = agent_dir.join("firmware/state.json");
    let floor_was = std::fs::read_to_string(&state).unwrap();
    std::fs::remove_file(&state).unwrap();
    let out = agent(&args);
    assert!(!out.status.success(), "a missing state was silently recreated");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is missing but this device was updated before"), "{err}");
    assert!(err.contains("Restore state.json from a backup"), "{err}");
    assert!(!state.exists());
    // Corrupt: the same, and the file is left as it is for inspection.
    std::fs::write(&state, &floor_was[..floor_was.len() / 2]).unwrap();
    let out = agent(&args);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is corrupt"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&state).unwrap(), &floor_was[..floor_was.len() / 2]);
    // Restored from backup: back to work, floor intact.
    std::fs::write(&state, &floor_was).unwrap();
    let out = agent_ok(&["firmware-status", "--dir", d]);
    assert!(out.contains("2.0.0"), "{out}");
}
