//! Rows to records and back: the column lists, row mappers, and the statements several
//! writes share (events, certificate inserts, retiring certificates).

use portcullis_core::{CertState, DeviceId, Fingerprint, GroupName, Serial, TokenHash};
use rusqlite::{Connection, OptionalExtension, Row, params};
use time::OffsetDateTime;

use super::*;

pub(super) fn event(
    conn: &Connection,
    at: OffsetDateTime,
    actor: &Actor,
    kind: &str,
    device: Option<&DeviceId>,
    serial: Option<&Serial>,
    detail: serde_json::Value,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO events (at, actor, kind, device_id, serial, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        ts(at),
        actor.to_string(),
        kind,
        device.map(DeviceId::as_str),
        serial.map(Serial::as_str),
        detail.to_string()
    ])?;
    Ok(())
}

pub(super) const DEVICE_SELECT: &str =
    "SELECT d.id, d.group_name, d.state, d.state_reason, d.created_at, d.updated_at,
        (SELECT COUNT(*) FROM certificates c WHERE c.device_id = d.id),
        (SELECT MAX(c.not_after) FROM certificates c WHERE c.device_id = d.id AND c.state = 'valid'),
        (SELECT group_concat(a.cidr, ' ') FROM device_addresses a WHERE a.device_id = d.id),
        d.profile
     FROM devices d";

pub(super) fn corrupt(what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("corrupt {what} in database: {value:?}").into(),
    )
}

pub(super) fn device_row(r: &Row<'_>) -> rusqlite::Result<Device> {
    let id: String = r.get(0)?;
    let group: String = r.get(1)?;
    let state: String = r.get(2)?;
    Ok(Device {
        id: DeviceId::try_new(id.clone()).map_err(|_| corrupt("device id", &id))?,
        group: GroupName::try_new(group.clone()).map_err(|_| corrupt("group", &group))?,
        state: state.parse().map_err(|_| corrupt("state", &state))?,
        state_reason: r.get(3)?,
        created_at: from_ts(r.get(4)?),
        updated_at: from_ts(r.get(5)?),
        certificates: r.get::<_, i64>(6)? as u64,
        cert_not_after: r.get::<_, Option<i64>>(7)?.map(from_ts),
        addresses: {
            let mut a: Vec<String> = r
                .get::<_, Option<String>>(8)?
                .unwrap_or_default()
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            a.sort();
            a
        },
        profile: r.get(9)?,
    })
}

pub(super) const CERT_SELECT: &str = "SELECT serial, device_id, fingerprint, spki_sha256, not_before, not_after, state,
        revoked_at, revocation_reason, issued_via, der, crl_reason, superseded_by, created_at FROM certificates";

pub(super) fn cert_row(r: &Row<'_>) -> rusqlite::Result<CertificateRecord> {
    let serial: String = r.get(0)?;
    let device: String = r.get(1)?;
    let state: String = r.get(6)?;
    Ok(CertificateRecord {
        serial: Serial::parse(&serial).ok_or_else(|| corrupt("serial", &serial))?,
        device: DeviceId::try_new(device.clone()).map_err(|_| corrupt("device id", &device))?,
        fingerprint: Fingerprint::from_hex(r.get::<_, String>(2)?),
        spki_sha256: r.get(3)?,
        not_before: from_ts(r.get(4)?),
        not_after: from_ts(r.get(5)?),
        state: state.parse::<CertState>().map_err(|_| corrupt("certificate state", &state))?,
        revoked_at: r.get::<_, Option<i64>>(7)?.map(from_ts),
        revocation_reason: r.get(8)?,
        issued_via: r.get(9)?,
        der: r.get(10)?,
        crl_reason: r.get(11)?,
        superseded_by: r.get(12)?,
        issued_at: from_ts(r.get(13)?),
    })
}

/// Revokes the valid certificates of `device` other than `keep`; returns their serials.
pub(super) fn revoke_others(
    conn: &Connection,
    device: &DeviceId,
    keep: &Serial,
    now: OffsetDateTime,
    note: &str,
    crl_reason: &str,
) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "UPDATE certificates SET state = 'revoked', revoked_at = ?1, revocation_reason = ?2, crl_reason = ?3
         WHERE device_id = ?4 AND state = 'valid' AND serial != ?5 RETURNING serial",
    )?;
    let rows = stmt.query_map(params![ts(now), note, crl_reason, device.as_str(), keep.as_str()], |r| {
        r.get::<_, String>(0)
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

pub(super) fn load_device(conn: &Connection, id: &DeviceId) -> Result<Option<Device>> {
    Ok(conn
        .prepare_cached(&format!("{DEVICE_SELECT} WHERE d.id = ?1"))?
        .query_row([id.as_str()], device_row)
        .optional()?)
}

pub(super) fn token_state(
    conn: &Connection,
    device: &DeviceId,
    hash: &TokenHash,
    now: OffsetDateTime,
) -> Result<TokenCheck> {
    let row: Option<(String, i64, Option<i64>)> = conn
        .prepare_cached("SELECT device_id, expires_at, used_at FROM enrollment_tokens WHERE hash = ?1")?
        .query_row([hash.as_bytes()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    Ok(match row {
        // Another device's token is indistinguishable from a wrong one.
        None => TokenCheck::Unknown,
        Some((owner, _, _)) if owner != device.as_str() => TokenCheck::Unknown,
        Some((_, _, Some(_))) => TokenCheck::Used,
        Some((_, expires, None)) if expires <= ts(now) => TokenCheck::Expired,
        Some(_) => TokenCheck::Valid,
    })
}

pub(super) fn insert_cert(conn: &Connection, c: &NewCertificate, now: OffsetDateTime) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO certificates (serial, device_id, fingerprint, spki_sha256, not_before, not_after,
            state, issued_via, der, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'valid', ?7, ?8, ?9)",
    )?
    .execute(params![
        c.serial.as_str(),
        c.device.as_str(),
        c.fingerprint.as_str(),
        c.spki_sha256,
        ts(c.not_before),
        ts(c.not_after),
        c.issued_via,
        c.der,
        ts(now)
    ])
    .map_err(|e| match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
            Error::AlreadyExists { what: "certificate", id: c.serial.to_string() }
        }
        e => backend(e),
    })?;
    Ok(())
}

/// Inserts an issued certificate and its event.
pub(super) fn record_issued(
    conn: &Connection,
    cert: &NewCertificate,
    actor: &Actor,
    now: OffsetDateTime,
) -> Result<()> {
    insert_cert(conn, cert, now)?;
    event(
        conn,
        now,
        actor,
        "certificate.issued",
        Some(&cert.device),
        Some(&cert.serial),
        serde_json::json!({
            "via": cert.issued_via,
            "fingerprint": cert.fingerprint,
            "not_after": ts(cert.not_after),
        }),
    )
}

/// A typed document column (rollouts, firmware status, profiles, audit scope/summary).
pub(super) fn doc_col<T: serde::de::DeserializeOwned>(r: &Row<'_>, i: usize) -> rusqlite::Result<T> {
    let text: String = r.get(i)?;
    serde_json::from_str(&text).map_err(|_| corrupt("document", &text))
}

/// A typed document as stored.
pub(super) fn doc<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

pub(super) fn json_col(r: &Row<'_>, i: usize) -> rusqlite::Result<serde_json::Value> {
    let text: String = r.get(i)?;
    serde_json::from_str(&text).map_err(|_| corrupt("JSON document", &text))
}

pub(super) fn run_row(r: &Row<'_>) -> rusqlite::Result<AuditRunRecord> {
    Ok(AuditRunRecord {
        id: r.get(0)?,
        started_at: from_ts(r.get(1)?),
        finished_at: r.get::<_, Option<i64>>(2)?.map(from_ts),
        status: r.get(3)?,
        request: doc_col(r, 4)?,
        summary: doc_col(r, 5)?,
    })
}

pub(super) const FINDING_SELECT: &str =
    "SELECT device_id, key, check_name, severity, title, target, evidence, why,
        remediation, baselines, status FROM audit_findings";

pub(super) fn finding_row(r: &Row<'_>) -> rusqlite::Result<FindingRecord> {
    Ok(FindingRecord {
        device: r.get(0)?,
        key: r.get(1)?,
        check: r.get(2)?,
        severity: r.get(3)?,
        title: r.get(4)?,
        target: r.get(5)?,
        evidence: r.get(6)?,
        why: r.get(7)?,
        remediation: r.get(8)?,
        baselines: serde_json::from_value(json_col(r, 9)?).unwrap_or_default(),
        status: r.get(10)?,
    })
}

pub(super) fn ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

pub(super) fn from_ms(v: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(v) * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}
