//! Conformance of the gateway's validation, judged by an outside tool: `schemathesis`
//! (PyPI) generates requests from each example document and sends them through the real
//! binary with a device certificate. Every request it generates as valid must be
//! forwarded (no false positives: each reaches the upstream exactly once); every request
//! it generates as invalid must be refused and reach nothing.
//!
//! Needs `schemathesis` on PATH (`.ci/run` installs it; `pip install schemathesis`), or
//! its path in `SCHEMATHESIS`.
#![allow(clippy::unwrap_used)]

mod harness;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use harness::upstream::{Upstream, enroll};
use harness::*;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");

/// Examples per operation and phase; schemathesis adds its coverage cases on top.
const MAX_EXAMPLES: &str = "40";

struct Run {
    generated: usize,
    output: String,
    /// Test case id (sent as `X-Schemathesis-TestCaseId`) to its generation mode.
    modes: HashMap<String, String>,
    /// Test case ids whose `negative_data_rejection` check schemathesis passed.
    rejection_ok: std::collections::HashSet<String>,
}

/// Case ids whose `negative_data_rejection` check passed, from a report's `checks` maps.
fn rejection_passed(v: &serde_json::Value, out: &mut std::collections::HashSet<String>) {
    match v {
        serde_json::Value::Object(o) => {
            if let Some(serde_json::Value::Object(checks)) = o.get("checks") {
                for (id, list) in checks {
                    let passed = list.as_array().is_some_and(|l| {
                        l.iter().any(|c| c["name"] == "negative_data_rejection" && c["status"] == "success")
                    });
                    if passed {
                        out.insert(id.clone());
                    }
                }
            }
            o.values().for_each(|x| rejection_passed(x, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| rejection_passed(x, out)),
        _ => {}
    }
}

/// Collects `{"id": .., "meta": {"generation": {"mode": ..}}}` from a report event.
fn case_modes(v: &serde_json::Value, out: &mut HashMap<String, String>) {
    match v {
        serde_json::Value::Object(o) => {
            if let (Some(id), Some(mode)) = (
                o.get("id").and_then(|i| i.as_str()),
                v.pointer("/meta/generation/mode").and_then(|m| m.as_str()),
            ) {
                out.insert(id.to_owned(), mode.to_owned());
            }
            o.values().for_each(|x| case_modes(x, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| case_modes(x, out)),
        _ => {}
    }
}

fn schemathesis(s: &Server, spec: &Path, base: &str, mode: &str, cert: &Path, key: &Path) -> Run {
    let (root, _) = s.ca_files();
    let bin = std::env::var("SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".into());
    let reports = tempfile::tempdir().unwrap();
    let check = if mode == "positive" { "positive_data_acceptance" } else { "negative_data_rejection" };
    let out = Command::new(&bin)
        .arg("run")
        .arg(spec)
        .args(["--url", &format!("{}{base}", s.url())])
        .arg("--request-cert")
        .arg(cert)
        .arg("--request-cert-key")
        .arg(key)
        .arg("--tls-verify")
        .arg(&root)
        .args(["--mode", mode, "--checks", &format!("{check},not_a_server_error"), "-n", MAX_EXAMPLES])
        .args(["--no-color", "--request-timeout", "10", "--report", "ndjson", "--report-dir"])
        .arg(reports.path())
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin} ({e}); install it with `pip install schemathesis`"));
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "schemathesis --mode {mode} on {} found problems:\n{output}",
        spec.display()
    );
    // "  453 generated, 453 passed"
    let generated = output
        .lines()
        .find_map(|l| l.trim().strip_suffix(" passed").and_then(|l| l.split_once(" generated")))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no test-case count in schemathesis output:\n{output}"));
    let mut modes = HashMap::new();
    let mut rejection_ok = std::collections::HashSet::new();
    for entry in std::fs::read_dir(reports.path()).unwrap() {
        for line in std::fs::read_to_string(entry.unwrap().path()).unwrap().lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                case_modes(&v, &mut modes);
                rejection_passed(&v, &mut rejection_ok);
            }
        }
    }
    Run { generated, output, modes, rejection_ok }
}

#[test]
fn schemathesis_finds_no_false_positive_and_no_invalid_request_gets_through() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    // The telemetry document without its Portcullis policy (identity binding, groups,
    // log mode): schemathesis cannot know which device it is, and shadow mode forwards
    // invalid requests on purpose.
    let telemetry = dir.path().join("telemetry.yaml");
    let text = std::fs::read_to_string(format!("{EXAMPLES}/telemetry.openapi.yaml")).unwrap();
    let policy_free: String =
        text.lines().filter(|l| !l.contains("x-portcullis-")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&telemetry, policy_free).unwrap();
    let inventory = format!("{EXAMPLES}/inventory.openapi.json");
    let config = format!(
        r#"
[[gateway.routes]]
prefix = "/api/"
upstream = "http://{up}"
openapi = "{telemetry}"
strict_query = true

[[gateway.routes]]
prefix = "/inv/"
upstream = "http://{up}"
openapi = "{inventory}"
strict_query = true
"#,
        up = up.addr,
        telemetry = telemetry.display(),
    );
    let s = Server::start_logged(dir, &config, None);
    let (cert, key) = enroll(&s, "conformance-01", "testers");

    for (spec, base) in [(telemetry.clone(), "/api"), (Path::new(&inventory).to_owned(), "/inv/v2")] {
        let before = up.count();
        let run = schemathesis(&s, &spec, base, "positive", &cert, &key);
        let forwarded = up.count() - before;
        assert!(run.generated >= 20, "too few cases to mean anything:\n{}", run.output);
        assert_eq!(
            forwarded,
            run.generated,
            "every valid request must reach the upstream exactly once ({}):\n{}",
            spec.display(),
            run.output
        );

        let before = up.count();
        let run = schemathesis(&s, &spec, base, "negative", &cert, &key);
        assert!(run.generated >= 20, "too few cases to mean anything:\n{}", run.output);
        let negative = run.modes.values().filter(|m| *m == "negative").count();
        assert!(negative >= 20, "too few negative cases ({negative}):\n{}", run.output);
        // Some mutations do not survive serialisation (an extra query key whose value is
        // an empty list is not sent at all): the request on the wire is valid, and
        // schemathesis, seeing the 2xx, accepts it as such. Every other case generated as
        // invalid must never reach the upstream.
        let seen = up.seen.lock().unwrap()[before..].to_vec();
        let mut lost_mutations = 0;
        let leaked: Vec<String> = seen
            .iter()
            .filter(|r| {
                let id =
                    r.headers.get("x-schemathesis-testcaseid").and_then(|v| v.to_str().ok()).unwrap_or("");
                let negative = run.modes.get(id).is_none_or(|m| m == "negative");
                if negative && run.rejection_ok.contains(id) {
                    lost_mutations += 1;
                    return false;
                }
                negative
            })
            .map(|r| format!("{} {} {}", r.method, r.path, String::from_utf8_lossy(&r.body)))
            .collect();
        assert!(
            leaked.is_empty(),
            "invalid requests reached the upstream ({}): {leaked:#?}\n{}",
            spec.display(),
            run.output
        );
        eprintln!(
            "{}: {forwarded} positive cases all forwarded; {} cases in negative mode, {negative} generated invalid, \
             none forwarded ({lost_mutations} whose mutation was lost on the wire and {} marked positive were)",
            spec.display(),
            run.generated,
            seen.len() - lost_mutations
        );
    }
}
