//! Concurrency and crash safety of enrollment: unique serials, no lost records, and a
//! `kill -9` mid-storm loses no certificate that a client received.

#![allow(clippy::unwrap_used)]

mod harness;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use harness::*;
use portcullis_agent::EstClient;
use portcullis_core::{DeviceId, Serial, Token};
use serde_json::Value;

async fn register(s: &Server, prefix: &str, n: usize) -> Vec<(DeviceId, Token)> {
    let admin = s.admin_client();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{prefix}-{i:05}");
        let r = admin.register_device(&id, None, None).await.expect("register");
        out.push((DeviceId::try_new(id).unwrap(), Token::from_presented(&r.token)));
    }
    out
}

fn csr(id: &DeviceId) -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, id.as_str());
    p.serialize_request(&key).unwrap().der().to_vec()
}

fn serial_of(der: &[u8]) -> Serial {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    Serial::from_bytes(c.raw_serial())
}

async fn stored_serials(s: &Server) -> HashSet<String> {
    let list = s.admin_client().certificates(None).await.unwrap();
    list.certificates.iter().map(|c| c.serial.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enrollments_get_unique_serials_and_all_are_stored() {
    let s = Server::start();
    let devices = Arc::new(register(&s, "conc", 200).await);
    let client = EstClient::new(&s.url(), &s.root_pem(), None).unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (devices, client, next) = (devices.clone(), client.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((id, token)) = devices.get(i) else { return got };
                let (_, leaf) = client.enroll(id, token, &csr(id)).await.expect("enroll");
                got.push(serial_of(&leaf));
            }
        }));
    }
    let mut serials = Vec::new();
    for t in tasks {
        serials.extend(t.await.unwrap());
    }
    assert_eq!(serials.len(), 200);
    let unique: HashSet<String> = serials.iter().map(|s| s.to_string()).collect();
    assert_eq!(unique.len(), 200, "duplicate serials");
    assert_eq!(stored_serials(&s).await, unique);
    let events: Value = s.admin_client().get_as("/v1/events?limit=10000").await.unwrap();
    let issued =
        events["events"].as_array().unwrap().iter().filter(|e| e["kind"] == "certificate.issued").count();
    assert_eq!(issued, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_an_enrollment_storm_loses_no_returned_certificate() {
    let s = Server::start();
    let devices = Arc::new(register(&s, "storm", 600).await);
    let client = EstClient::new(&s.url(), &s.root_pem(), None).unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (devices, client, next, done) = (devices.clone(), client.clone(), next.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let mut failures = 0;
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((id, token)) = devices.get(i) else { return (got, failures) };
                match client.enroll(id, token, &csr(id)).await {
                    Ok((_, leaf)) => {
                        got.push(serial_of(&leaf));
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => failures += 1,
                }
            }
        }));
    }
    // Kill the server while enrollments are in flight.
    while done.load(Ordering::SeqCst) < 150 {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let pid = s.child.as_ref().unwrap().id();
    let killed = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    let mut returned = Vec::new();
    let mut failures = 0;
    for t in tasks {
        let (got, f) = t.await.unwrap();
        returned.extend(got);
        failures += f;
    }
    assert!(returned.len() >= 150);
    assert!(failures > 0, "the kill happened after the storm; nothing was tested");

    let s = Server::start_in(s.into_dir(), "");
    let stored = stored_serials(&s).await;
    let lost: Vec<_> = returned.iter().filter(|r| !stored.contains(r.as_str())).collect();
    assert!(lost.is_empty(), "{} certificates returned to clients were lost: {lost:?}", lost.len());
    eprintln!(
        "returned {} certificates before kill -9, {} failed, {} stored",
        returned.len(),
        failures,
        stored.len()
    );
}
