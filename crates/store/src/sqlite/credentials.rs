//! Enrollment tokens, certificates and the CRL's inputs.

use async_trait::async_trait;
use portcullis_core::{DeviceId, DeviceState, GroupName, Serial, TokenHash};
use rusqlite::{OptionalExtension, params};
use time::OffsetDateTime;

use super::{SqliteStore, from_ts, rows::*, ts};
use crate::*;

#[async_trait]
impl Credentials for SqliteStore {
    async fn add_token(&self, device: &DeviceId, token: NewToken, actor: Actor) -> Result<()> {
        let device = device.clone();
        self.write(move |c| {
            let now = OffsetDateTime::now_utc();
            let d = load_device(c, &device)?.ok_or(Error::NotFound { what: "device", id: device.to_string() })?;
            if d.state == DeviceState::Revoked {
                return Err(Error::InvalidTransition { id: device, from: d.state, action: "issue an enrollment token" });
            }
            c.prepare_cached(
                "INSERT INTO enrollment_tokens (hash, device_id, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![token.hash.as_bytes(), device.as_str(), ts(now), ts(token.expires_at)])?;
            event(
                c,
                now,
                &actor,
                "token.created",
                Some(&device),
                None,
                serde_json::json!({ "expires_at": ts(token.expires_at) }),
            )
        })
        .await
    }

    async fn check_token(
        &self,
        device: &DeviceId,
        hash: &TokenHash,
        now: OffsetDateTime,
    ) -> Result<Option<(DeviceState, TokenCheck)>> {
        let (device, hash) = (device.clone(), hash.clone());
        self.read(move |c| {
            let state: Option<String> = c
                .prepare_cached("SELECT state FROM devices WHERE id = ?1")?
                .query_row([device.as_str()], |r| r.get(0))
                .optional()?;
            let Some(state) = state else { return Ok(None) };
            let state = state.parse().map_err(|_| corrupt("state", &state))?;
            Ok(Some((state, token_state(c, &device, &hash, now)?)))
        })
        .await
    }

    async fn enroll(&self, hash: &TokenHash, cert: NewCertificate, now: OffsetDateTime) -> Result<usize> {
        let hash = hash.clone();
        self.write_announced(move |c| {
            match token_state(c, &cert.device, &hash, now)? {
                TokenCheck::Valid => {}
                other => return Err(Error::Token(other)),
            }
            let d = load_device(c, &cert.device)?
                .ok_or(Error::NotFound { what: "device", id: cert.device.to_string() })?;
            if d.state != DeviceState::Active {
                return Err(Error::InvalidTransition { id: d.id, from: d.state, action: "enroll" });
            }
            c.prepare_cached("UPDATE enrollment_tokens SET used_at = ?1, used_for = ?2 WHERE hash = ?3 AND used_at IS NULL")?
                .execute(params![ts(now), cert.serial.as_str(), hash.as_bytes()])?;
            let actor = Actor::Device(cert.device.clone());
            record_issued(c, &cert, &actor, now)?;
            // Enrolling with a new token is re-provisioning (a lost or replaced key):
            // whatever was issued to this device before is retired with it.
            let note = format!("re-provisioned: superseded by {}", cert.serial);
            let retired = revoke_others(c, &cert.device, &cert.serial, now, &note, "superseded")?;
            if !retired.is_empty() {
                event(
                    c,
                    now,
                    &actor,
                    "certificate.superseded",
                    Some(&cert.device),
                    Some(&cert.serial),
                    serde_json::json!({ "via": "enroll", "revoked_serials": retired }),
                )?;
            }
            Ok(retired.len())
        })
        .await
    }

    async fn record_certificate(
        &self,
        cert: NewCertificate,
        supersedes: &Serial,
        actor: Actor,
    ) -> Result<()> {
        let old = supersedes.clone();
        self.write_announced(move |c| {
            let now = OffsetDateTime::now_utc();
            let d = load_device(c, &cert.device)?
                .ok_or(Error::NotFound { what: "device", id: cert.device.to_string() })?;
            if d.state != DeviceState::Active {
                return Err(Error::InvalidTransition { id: d.id, from: d.state, action: "re-enroll" });
            }
            // The certificate the device authenticated with is retired in the same
            // transaction; if another re-enrollment retired it first, this one loses.
            let retired = c
                .prepare_cached(
                    "UPDATE certificates SET state = 'revoked', revoked_at = ?1, revocation_reason = ?2,
                        crl_reason = 'superseded', superseded_by = ?3
                     WHERE serial = ?4 AND device_id = ?5 AND state = 'valid'",
                )?
                .execute(params![
                    ts(now),
                    format!("superseded by {}", cert.serial),
                    cert.serial.as_str(),
                    old.as_str(),
                    cert.device.as_str()
                ])?;
            if retired != 1 {
                return Err(Error::NotValid { what: "certificate", id: old.to_string() });
            }
            record_issued(c, &cert, &actor, now)?;
            event(
                c,
                now,
                &actor,
                "certificate.superseded",
                Some(&cert.device),
                Some(&old),
                serde_json::json!({ "via": "reenroll", "superseded_by": cert.serial }),
            )
        })
        .await
    }

    async fn revoke_certificate(
        &self,
        serial: &Serial,
        crl_reason: &str,
        note: Option<String>,
        actor: Actor,
    ) -> Result<CertificateRecord> {
        let serial = serial.clone();
        let crl_reason = crl_reason.to_owned();
        self.write_announced(move |c| {
            let now = OffsetDateTime::now_utc();
            let changed = c
                .prepare_cached(
                    "UPDATE certificates SET state = 'revoked', revoked_at = ?1, revocation_reason = ?2, crl_reason = ?3
                     WHERE serial = ?4 AND state = 'valid'",
                )?
                .execute(params![ts(now), note, crl_reason, serial.as_str()])?;
            let cert = c
                .prepare_cached(&format!("{CERT_SELECT} WHERE serial = ?1"))?
                .query_row([serial.as_str()], cert_row)
                .optional()?
                .ok_or(Error::NotFound { what: "certificate", id: serial.to_string() })?;
            if changed != 1 {
                return Err(Error::NotValid { what: "certificate", id: serial.to_string() });
            }
            event(
                c,
                now,
                &actor,
                "certificate.revoked",
                Some(&cert.device),
                Some(&serial),
                serde_json::json!({ "reason": crl_reason, "note": note }),
            )?;
            Ok(cert)
        })
        .await
    }

    async fn certificate(&self, serial: &Serial) -> Result<Option<CertificateStatus>> {
        let serial = serial.clone();
        self.read(move |c| {
            let cert = c
                .prepare_cached(&format!("{CERT_SELECT} WHERE serial = ?1"))?
                .query_row([serial.as_str()], cert_row)
                .optional()?;
            let Some(cert) = cert else { return Ok(None) };
            let (state, group): (String, String) = c
                .prepare_cached("SELECT state, group_name FROM devices WHERE id = ?1")?
                .query_row([cert.device.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
            let device_state = state.parse().map_err(|_| corrupt("state", &state))?;
            let group = GroupName::try_new(group.clone()).map_err(|_| corrupt("group", &group))?;
            Ok(Some(CertificateStatus { certificate: cert, device_state, group }))
        })
        .await
    }

    async fn certificates(&self, device: Option<&DeviceId>) -> Result<Vec<CertificateRecord>> {
        let device = device.cloned();
        self.read(move |c| {
            let rows = match &device {
                Some(d) => {
                    let mut stmt = c.prepare_cached(&format!(
                        "{CERT_SELECT} WHERE device_id = ?1 ORDER BY created_at DESC, serial"
                    ))?;
                    stmt.query_map([d.as_str()], cert_row)?.collect::<rusqlite::Result<Vec<_>>>()?
                }
                None => {
                    let mut stmt =
                        c.prepare_cached(&format!("{CERT_SELECT} ORDER BY created_at DESC, serial"))?;
                    stmt.query_map([], cert_row)?.collect::<rusqlite::Result<Vec<_>>>()?
                }
            };
            Ok(rows)
        })
        .await
    }

    async fn revoked(&self, now: OffsetDateTime) -> Result<Vec<RevokedEntry>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT serial, revoked_at, crl_reason FROM certificates WHERE state = 'revoked' AND not_after > ?1 ORDER BY revoked_at, serial",
            )?;
            let rows = stmt.query_map([ts(now)], |r| {
                let s: String = r.get(0)?;
                Ok(RevokedEntry {
                    serial: Serial::parse(&s).ok_or_else(|| corrupt("serial", &s))?,
                    revoked_at: from_ts(r.get::<_, Option<i64>>(1)?.unwrap_or(0)),
                    reason: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn next_crl_number(&self) -> Result<u64> {
        self.write(|c| {
            let n: i64 = c
                .prepare_cached("UPDATE crl SET number = number + 1 WHERE id = 1 RETURNING number")?
                .query_row([], |r| r.get(0))?;
            Ok(n as u64)
        })
        .await
    }
}
