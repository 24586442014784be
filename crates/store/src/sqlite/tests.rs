use super::*;
use portcullis_core::Token;

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
