use super::*;
use crate::*;
use portcullis_core::{CertState, Fingerprint, Token};
use portcullis_core::{DeviceId, DeviceState, GroupName, Serial};

fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(dir.path().join("db.sqlite")).unwrap();
    (dir, s)
}

fn id(s: &str) -> DeviceId {
    DeviceId::try_new(s).unwrap()
}

fn cert(device: &str, serial: &str) -> NewCertificate {
    let now = OffsetDateTime::now_utc();
    NewCertificate {
        serial: Serial::parse(serial).unwrap(),
        device: id(device),
        fingerprint: Fingerprint::from_hex(format!("fp-{serial}")),
        spki_sha256: format!("spki-{serial}"),
        not_before: now,
        not_after: now + time::Duration::days(30),
        issued_via: "enroll",
        der: vec![1, 2, 3],
    }
}

async fn add(s: &SqliteStore, dev: &str) -> Token {
    let t = Token::generate("pct");
    s.create_device(
        NewDevice { id: id(dev), group: GroupName::default_group() },
        NewToken { hash: t.hash(), expires_at: OffsetDateTime::now_utc() + time::Duration::hours(1) },
        Actor::System,
    )
    .await
    .unwrap();
    t
}

#[tokio::test]
async fn migrates_to_current_version() {
    let (_d, s) = store();
    assert_eq!(s.schema_version().await.unwrap(), SCHEMA_VERSION);
}

#[tokio::test]
async fn token_lifecycle() {
    let (_d, s) = store();
    let t = add(&s, "cam-1").await;
    let other = add(&s, "cam-2").await;
    let now = OffsetDateTime::now_utc();
    assert_eq!(s.check_token(&id("cam-1"), &t.hash(), now).await.unwrap().unwrap().1, TokenCheck::Valid);
    assert_eq!(
        s.check_token(&id("cam-1"), &other.hash(), now).await.unwrap().unwrap().1,
        TokenCheck::Unknown
    );
    assert_eq!(
        s.check_token(&id("cam-1"), &t.hash(), now + time::Duration::hours(2)).await.unwrap().unwrap().1,
        TokenCheck::Expired
    );
    s.enroll(&t.hash(), cert("cam-1", "01"), now).await.unwrap();
    assert_eq!(s.check_token(&id("cam-1"), &t.hash(), now).await.unwrap().unwrap().1, TokenCheck::Used);
    let again = s.enroll(&t.hash(), cert("cam-1", "02"), now).await;
    assert!(matches!(again, Err(Error::Token(TokenCheck::Used))), "{again:?}");
    assert_eq!(s.certificates(Some(&id("cam-1"))).await.unwrap().len(), 1);
    let dup = s
        .create_device(
            NewDevice { id: id("cam-1"), group: GroupName::default_group() },
            NewToken { hash: Token::generate("pct").hash(), expires_at: now },
            Actor::System,
        )
        .await;
    assert!(matches!(dup, Err(Error::AlreadyExists { what: "device", .. })));
}

#[tokio::test]
async fn concurrent_use_of_one_token_issues_once() {
    let (_d, s) = store();
    let t = add(&s, "cam-1").await;
    let now = OffsetDateTime::now_utc();
    let mut tasks = Vec::new();
    for i in 0..32 {
        let (s, h) = (s.clone(), t.hash());
        tasks.push(tokio::spawn(
            async move { s.enroll(&h, cert("cam-1", &format!("{:x}", i + 1)), now).await },
        ));
    }
    let mut ok = 0;
    for task in tasks {
        if task.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(s.certificates(None).await.unwrap().len(), 1);
}

#[tokio::test]
async fn revoke_revokes_certificates_and_is_final() {
    let (_d, s) = store();
    let t = add(&s, "cam-1").await;
    let now = OffsetDateTime::now_utc();
    s.enroll(&t.hash(), cert("cam-1", "0a"), now).await.unwrap();
    let d = s.set_device_state(&id("cam-1"), DeviceState::Suspended, None, Actor::System).await.unwrap();
    assert_eq!(d.state, DeviceState::Suspended);
    assert!(s.revoked(now).await.unwrap().is_empty());
    s.set_device_state(&id("cam-1"), DeviceState::Revoked, Some("stolen".into()), Actor::System)
        .await
        .unwrap();
    let revoked = s.revoked(now).await.unwrap();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].serial.as_str(), "a");
    let st = s.certificate(&Serial::parse("0a").unwrap()).await.unwrap().unwrap();
    assert_eq!((st.certificate.state, st.device_state), (CertState::Revoked, DeviceState::Revoked));
    assert_eq!(st.group, GroupName::default_group());
    let resume = s.set_device_state(&id("cam-1"), DeviceState::Active, None, Actor::System).await;
    assert!(matches!(resume, Err(Error::InvalidTransition { .. })));
    let kinds: Vec<String> =
        s.events(EventFilter::default()).await.unwrap().into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, ["device.created", "certificate.issued", "device.suspended", "device.revoked"]);
}

#[tokio::test]
async fn events_are_append_only() {
    let (dir, s) = store();
    add(&s, "cam-1").await;
    let conn = open_conn(&dir.path().join("db.sqlite")).unwrap();
    assert!(conn.execute("UPDATE events SET kind = 'x'", []).is_err());
    assert!(conn.execute("DELETE FROM events", []).is_err());
}

#[tokio::test]
async fn crl_numbers_increase() {
    let (_d, s) = store();
    let a = s.next_crl_number().await.unwrap();
    let b = s.next_crl_number().await.unwrap();
    assert!(b > a);
}

#[tokio::test]
async fn dns_query_log_is_pruned_by_age_and_row_count() {
    let (_d, s) = store();
    let now = OffsetDateTime::now_utc();
    let row = |age_h: i64, name: &str, action: &str| DnsQueryRecord {
        at: now - time::Duration::hours(age_h),
        client: "127.0.0.2".into(),
        device: Some("cam-01".into()),
        name: name.into(),
        qtype: "A".into(),
        action: action.to_owned().into(),
        reason: "r".into(),
        rcode: "NXDomain".into(),
        upstream_us: None,
    };
    let mut rows: Vec<_> = (0..5).map(|i| row(48, &format!("old{i}.test"), "allowed")).collect();
    rows.extend(
        (0..10).map(|i| row(1, &format!("new{i}.test"), if i % 2 == 0 { "blocked" } else { "allowed" })),
    );
    rows.push(row(0, "new0.test", "blocked"));
    s.log_dns_queries(rows).await.unwrap();
    let blocked = s
        .dns_queries(DnsQueryFilter {
            blocked_only: true,
            device: Some("cam-01".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(blocked.len(), 6);
    assert_eq!(blocked[0].name, "new0.test", "newest first");
    let top = s.dns_top_blocked(DnsQueryFilter::default()).await.unwrap();
    assert_eq!((top[0].name.as_str(), top[0].count), ("new0.test", 2));
    // Older than a day: the 5 old rows; then at most 8 rows kept: 3 more of the oldest.
    let gone = s.prune_dns_queries(now - time::Duration::hours(24), 8).await.unwrap();
    assert_eq!(gone, 5 + 3);
    let left = s.dns_queries(DnsQueryFilter { limit: Some(100), ..Default::default() }).await.unwrap();
    assert_eq!(left.len(), 8);
    assert!(left.iter().all(|r| r.name.starts_with("new")));
    let since = s
        .dns_queries(DnsQueryFilter { since: Some(now - time::Duration::minutes(30)), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(since.len(), 1);
}

/// Time bounds are found by binary search over the ids (no index on time): the same
/// rows as a linear filter, with gaps in the ids from pruning, at every boundary.
#[tokio::test]
async fn query_log_time_bounds_match_a_linear_filter() {
    let (_d, s) = store();
    let t0 = OffsetDateTime::now_utc() - time::Duration::hours(10);
    let rows: Vec<_> = (0..600)
        .map(|i| DnsQueryRecord {
            at: t0 + time::Duration::seconds(i * 30),
            client: "127.0.0.2".into(),
            device: None,
            name: format!("n{i}.test"),
            qtype: "A".into(),
            action: "allowed".into(),
            reason: "r".into(),
            rcode: "NoError".into(),
            upstream_us: None,
        })
        .collect();
    s.log_dns_queries(rows).await.unwrap();
    // Ids 1..=600; pruning by count leaves 401..=600, by age then a gap-free tail.
    assert_eq!(s.prune_dns_queries(t0, 400).await.unwrap(), 200);
    for minutes in [0i64, 1, 99, 100, 101, 150, 299, 300, 301, 400] {
        let since = t0 + time::Duration::minutes(minutes);
        let got = s
            .dns_queries(DnsQueryFilter { since: Some(since), limit: Some(10_000), ..Default::default() })
            .await
            .unwrap();
        let want = (200..600).filter(|i| t0 + time::Duration::seconds(i * 30) >= since).count();
        assert_eq!(got.len(), want, "since +{minutes} min");
    }
    let gone = s.prune_dns_queries(t0 + time::Duration::minutes(200), 1_000_000).await.unwrap();
    assert_eq!(gone, 200, "rows 200..400 are older than +200 min");
}

/// A registry written by the previous schema keeps its query log through the migration
/// that rebuilt the table without AUTOINCREMENT and indexes.
#[tokio::test]
async fn the_query_log_survives_its_migration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        let before = super::schema::MIGRATIONS.len() - 1;
        for sql in &super::schema::MIGRATIONS[..before] {
            c.execute_batch(sql).unwrap();
        }
        c.pragma_update(None, "user_version", before as i64).unwrap();
        c.execute(
            "INSERT INTO dns_queries (at_ms, client, device_id, name, qtype, action, reason, rcode)
             VALUES (1765000000000, '10.0.0.9', 'cam-01', 'old.test', 'A', 'blocked', 'r', 'NXDomain')",
            [],
        )
        .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.schema_version().await.unwrap(), SCHEMA_VERSION);
    let rows = s.dns_queries(DnsQueryFilter::default()).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].name.as_str(), rows[0].device.as_deref()), ("old.test", Some("cam-01")));
}

#[tokio::test]
async fn device_addresses_are_unique_across_devices() {
    let (_d, s) = store();
    add(&s, "cam-01").await;
    add(&s, "cam-02").await;
    let d = s
        .set_device_addresses(&id("cam-01"), vec!["10.0.0.0/24".into(), "10.0.1.5".into()], Actor::System)
        .await
        .unwrap();
    assert_eq!(d.addresses, ["10.0.0.0/24", "10.0.1.5"]);
    let e = s.set_device_addresses(&id("cam-02"), vec!["10.0.1.5".into()], Actor::System).await.unwrap_err();
    assert!(e.to_string().contains("held by device cam-01"), "{e}");
    // Replacing is allowed, and frees the old ones.
    s.set_device_addresses(&id("cam-01"), vec![], Actor::System).await.unwrap();
    s.set_device_addresses(&id("cam-02"), vec!["10.0.1.5".into()], Actor::System).await.unwrap();
    assert_eq!(s.device(&id("cam-02")).await.unwrap().unwrap().addresses, ["10.0.1.5"]);
}

fn finding(device: &str, key: &str, status: &str) -> FindingRecord {
    FindingRecord {
        device: device.into(),
        key: key.into(),
        check: "exposure".into(),
        severity: "high".into(),
        title: "t".into(),
        target: "127.0.0.1:23".into(),
        evidence: "e".into(),
        why: "w".into(),
        remediation: "r".into(),
        baselines: vec!["ETSI EN 303 645 5.6-1".into()],
        status: status.into(),
    }
}

#[tokio::test]
async fn profiles_and_audit_runs_round_trip_and_diff_per_device() {
    let (_d, s) = store();
    add(&s, "cam-1").await;
    add(&s, "cam-2").await;
    let err = s.set_device_profile(&id("cam-1"), Some("camera"), Actor::System).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { what: "profile", .. }), "{err}");
    s.put_profile("camera", Profile { tcp: vec![443], ..Profile::default() }, Actor::System).await.unwrap();
    s.put_profile("camera", Profile { tcp: vec![443, 554], ..Profile::default() }, Actor::System)
        .await
        .unwrap();
    let profiles = s.profiles().await.unwrap();
    assert_eq!(profiles.len(), 1);
    assert_eq!(profiles[0].document.tcp, [443, 554]);
    let d = s.set_device_profile(&id("cam-1"), Some("camera"), Actor::System).await.unwrap();
    assert_eq!(d.profile.as_deref(), Some("camera"));

    let r1 = s.start_audit_run(AuditScope::default(), Actor::System).await.unwrap();
    s.finish_audit_run(
        r1,
        "finished",
        AuditSummary::Finished(Box::new(AuditTotals { devices: 2, ..AuditTotals::default() })),
        vec!["cam-1".into(), "cam-2".into()],
        vec![finding("cam-1", "exposure/tcp/23", "new"), finding("cam-2", "exposure/tcp/80", "new")],
    )
    .await
    .unwrap();
    // A second run covering only cam-1: cam-2's previous findings still come from run 1.
    let r2 = s
        .start_audit_run(AuditScope { device: Some("cam-1".into()), ..AuditScope::default() }, Actor::System)
        .await
        .unwrap();
    s.finish_audit_run(r2, "finished", AuditSummary::Pending {}, vec!["cam-1".into()], vec![]).await.unwrap();
    let r3 = s.start_audit_run(AuditScope::default(), Actor::System).await.unwrap();
    let prev = s.previous_findings(vec!["cam-1".into(), "cam-2".into()], r3).await.unwrap();
    assert_eq!(prev, vec![finding("cam-2", "exposure/tcp/80", "new")]);
    // A run that never finished is marked interrupted when the next one starts.
    let r4 = s.start_audit_run(AuditScope::default(), Actor::System).await.unwrap();
    let runs = s.audit_runs(10).await.unwrap();
    assert_eq!(
        runs.iter().map(|r| (r.id, r.status.as_str())).collect::<Vec<_>>(),
        vec![(r4, "running"), (r3, "interrupted"), (r2, "finished"), (r1, "finished")]
    );
    let (run, findings) = s.audit_run(r1).await.unwrap().unwrap();
    assert_eq!(run.status, "finished");
    assert!(matches!(&run.summary, AuditSummary::Finished(t) if t.devices == 2), "{:?}", run.summary);
    let (run2, _) = s.audit_run(r2).await.unwrap().unwrap();
    assert_eq!(run2.request.device.as_deref(), Some("cam-1"));
    assert_eq!(findings.len(), 2);
    assert!(s.audit_run(999).await.unwrap().is_none());
}

/// Every write that authentication or policy depends on is announced by the store after
/// it commits (no caller has to remember); writes that change neither are not, and a
/// refused write is not.
#[tokio::test]
async fn writes_that_matter_are_announced_and_others_are_not() {
    let (_d, s) = store();
    let mut rx = s.changes().subscribe();
    let g = || s.changes().generation();
    let now = OffsetDateTime::now_utc();

    let t = add(&s, "cam-1").await;
    assert_eq!(g(), 1, "create_device");
    assert!(rx.has_changed().unwrap(), "subscribers are woken");
    s.enroll(&t.hash(), cert("cam-1", "01"), now).await.unwrap();
    assert_eq!(g(), 2, "enroll");
    s.set_device_addresses(&id("cam-1"), vec!["10.0.0.5".into()], Actor::System).await.unwrap();
    assert_eq!(g(), 3, "set_device_addresses");
    s.put_profile("camera", Profile { tcp: vec![443], ..Profile::default() }, Actor::System).await.unwrap();
    assert_eq!(g(), 4, "put_profile");
    s.set_device_profile(&id("cam-1"), Some("camera"), Actor::System).await.unwrap();
    assert_eq!(g(), 5, "set_device_profile");
    s.set_device_state(&id("cam-1"), DeviceState::Suspended, None, Actor::System).await.unwrap();
    assert_eq!(g(), 6, "set_device_state");
    s.revoke_certificate(&Serial::parse("01").unwrap(), "keyCompromise", None, Actor::System).await.unwrap();
    assert_eq!(g(), 7, "revoke_certificate");

    // Not announced: a token, the query log, a refused write.
    let t2 = Token::generate("pct");
    let token = NewToken { hash: t2.hash(), expires_at: now + time::Duration::hours(1) };
    s.add_token(&id("cam-1"), token, Actor::System).await.unwrap();
    s.log_dns_queries(Vec::new()).await.unwrap();
    assert!(s.set_device_profile(&id("cam-1"), Some("no-such-profile"), Actor::System).await.is_err());
    assert_eq!(g(), 7);
    rx.borrow_and_update();
    assert!(!rx.has_changed().unwrap());
}

#[tokio::test]
async fn firmware_documents_round_trip_typed() {
    let (_d, s) = store();
    add(&s, "cam-1").await;
    let rollout = RolloutRecord {
        id: 0,
        hardware: "cam-v2".into(),
        version: "1.2.0".into(),
        target: "cam-v2/1.2.0.bin".into(),
        group: None,
        stages: vec![5, 100],
        stage: 0,
        max_failure_rate: 0.05,
        min_reports: DEFAULT_MIN_REPORTS,
        state: RolloutState::Active,
        reason: None,
        population: vec!["cam-1".into()],
        created_at: "2026-12-08T00:00:00Z".into(),
    };
    let rid = s.save_rollout(None, rollout.clone(), Actor::System).await.unwrap();
    let paused = RolloutRecord { id: rid, state: RolloutState::Paused, ..rollout.clone() };
    s.save_rollout(Some(rid), paused.clone(), Actor::System).await.unwrap();
    assert_eq!(s.rollouts().await.unwrap(), vec![paused]);
    let missing = s.save_rollout(Some(rid + 1), rollout, Actor::System).await.unwrap_err();
    assert!(matches!(missing, Error::NotFound { what: "rollout", .. }), "{missing}");

    let status =
        FirmwareStatus { hardware: "cam-v2".into(), installed: "1.1.0".into(), ..Default::default() };
    s.record_firmware_report(&id("cam-1"), None, status.clone()).await.unwrap();
    assert_eq!(s.firmware_device(&id("cam-1")).await.unwrap(), Some(status));
    let report = FirmwareReport {
        state: "failed".into(),
        hardware: "cam-v2".into(),
        installed: "1.1.0".into(),
        version: "1.2.0".into(),
        reason: "checksum".into(),
        rollout: Some(rid),
        device: Some("cam-1".into()),
        at: Some("2026-12-08T00:01:00Z".into()),
    };
    let outcome = FirmwareOutcome {
        state: report.state.clone(),
        version: report.version.clone(),
        reason: report.reason.clone(),
        rollout: Some(rid),
        at: "2026-12-08T00:01:00Z".into(),
    };
    let after = FirmwareStatus {
        hardware: "cam-v2".into(),
        installed: "1.1.0".into(),
        last: Some(outcome),
        rollout: Some(rid),
    };
    s.record_firmware_report(&id("cam-1"), Some(report), after.clone()).await.unwrap();
    assert_eq!(s.firmware_devices().await.unwrap(), vec![("cam-1".to_owned(), after)]);
}
