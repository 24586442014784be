//! Devices, groups, state, addresses and profiles.

use async_trait::async_trait;
use portcullis_core::{DeviceId, DeviceState, GroupName};
use rusqlite::{OptionalExtension, params};
use time::OffsetDateTime;

use super::{SqliteStore, from_ts, rows::*, ts};
use crate::*;

#[async_trait]
impl Registry for SqliteStore {
    async fn create_device(&self, device: NewDevice, token: NewToken, actor: Actor) -> Result<Device> {
        self.write_announced(move |c| {
            let now = OffsetDateTime::now_utc();
            if load_device(c, &device.id)?.is_some() {
                return Err(Error::AlreadyExists { what: "device", id: device.id.to_string() });
            }
            c.prepare_cached("INSERT OR IGNORE INTO groups (name, created_at) VALUES (?1, ?2)")?
                .execute(params![device.group.as_str(), ts(now)])?;
            c.prepare_cached(
                "INSERT INTO devices (id, group_name, state, created_at, updated_at) VALUES (?1, ?2, 'active', ?3, ?3)",
            )?
            .execute(params![device.id.as_str(), device.group.as_str(), ts(now)])?;
            c.prepare_cached(
                "INSERT INTO enrollment_tokens (hash, device_id, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![token.hash.as_bytes(), device.id.as_str(), ts(now), ts(token.expires_at)])?;
            event(
                c,
                now,
                &actor,
                "device.created",
                Some(&device.id),
                None,
                serde_json::json!({ "group": device.group, "token_expires_at": ts(token.expires_at) }),
            )?;
            load_device(c, &device.id)?.ok_or(Error::NotFound { what: "device", id: device.id.to_string() })
        })
        .await
    }

    async fn device(&self, id: &DeviceId) -> Result<Option<Device>> {
        let id = id.clone();
        self.read(move |c| load_device(c, &id)).await
    }

    async fn devices(&self) -> Result<Vec<Device>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!("{DEVICE_SELECT} ORDER BY d.id"))?;
            let rows = stmt.query_map([], device_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn groups(&self) -> Result<Vec<Group>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT g.name, (SELECT COUNT(*) FROM devices d WHERE d.group_name = g.name) FROM groups g ORDER BY g.name",
            )?;
            let rows = stmt.query_map([], |r| {
                let name: String = r.get(0)?;
                Ok(Group {
                    name: GroupName::try_new(name.clone()).map_err(|_| corrupt("group", &name))?,
                    devices: r.get::<_, i64>(1)? as u64,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn set_device_state(
        &self,
        id: &DeviceId,
        to: DeviceState,
        reason: Option<String>,
        actor: Actor,
    ) -> Result<Device> {
        let id = id.clone();
        self.write_announced(move |c| {
            let now = OffsetDateTime::now_utc();
            let d = load_device(c, &id)?.ok_or(Error::NotFound { what: "device", id: id.to_string() })?;
            let action = match to {
                DeviceState::Active => "resume",
                DeviceState::Suspended => "suspend",
                DeviceState::Revoked => "revoke",
            };
            let allowed = !matches!(
                (d.state, to),
                (DeviceState::Revoked, _)
                    | (DeviceState::Active, DeviceState::Active)
                    | (DeviceState::Suspended, DeviceState::Suspended)
            );
            if !allowed {
                return Err(Error::InvalidTransition { id, from: d.state, action });
            }
            c.prepare_cached("UPDATE devices SET state = ?1, state_reason = ?2, updated_at = ?3 WHERE id = ?4")?
                .execute(params![to.as_str(), reason, ts(now), id.as_str()])?;
            let mut revoked = Vec::new();
            if to == DeviceState::Revoked {
                let mut stmt = c.prepare_cached(
                    "UPDATE certificates SET state = 'revoked', revoked_at = ?1, revocation_reason = ?2
                     WHERE device_id = ?3 AND state = 'valid' RETURNING serial",
                )?;
                revoked = stmt
                    .query_map(params![ts(now), reason, id.as_str()], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                // Unused tokens die with the device.
                c.prepare_cached(
                    "UPDATE enrollment_tokens SET expires_at = ?1 WHERE device_id = ?2 AND used_at IS NULL AND expires_at > ?1",
                )?
                .execute(params![ts(now), id.as_str()])?;
            }
            event(
                c,
                now,
                &actor,
                &format!("device.{}", match to {
                    DeviceState::Active => "resumed",
                    DeviceState::Suspended => "suspended",
                    DeviceState::Revoked => "revoked",
                }),
                Some(&id),
                None,
                serde_json::json!({ "from": d.state, "reason": reason, "revoked_serials": revoked }),
            )?;
            load_device(c, &id)?.ok_or(Error::NotFound { what: "device", id: id.to_string() })
        })
        .await
    }

    async fn set_device_addresses(
        &self,
        id: &DeviceId,
        addresses: Vec<String>,
        actor: Actor,
    ) -> Result<Device> {
        let id = id.clone();
        self.write_announced(move |c| {
            let now = OffsetDateTime::now_utc();
            load_device(c, &id)?.ok_or(Error::NotFound { what: "device", id: id.to_string() })?;
            for a in &addresses {
                let holder: Option<String> = c
                    .prepare_cached("SELECT device_id FROM device_addresses WHERE cidr = ?1 AND device_id <> ?2")?
                    .query_row(params![a, id.as_str()], |r| r.get(0))
                    .optional()?;
                if let Some(h) = holder {
                    return Err(Error::AlreadyExists { what: "address", id: format!("{a} (held by device {h})") });
                }
            }
            c.prepare_cached("DELETE FROM device_addresses WHERE device_id = ?1")?.execute([id.as_str()])?;
            for a in &addresses {
                c.prepare_cached("INSERT OR IGNORE INTO device_addresses (cidr, device_id, created_at) VALUES (?1, ?2, ?3)")?
                    .execute(params![a, id.as_str(), ts(now)])?;
            }
            event(c, now, &actor, "addresses", Some(&id), None, serde_json::json!({ "addresses": addresses }))?;
            load_device(c, &id)?.ok_or(Error::NotFound { what: "device", id: id.to_string() })
        })
        .await
    }

    async fn put_profile(&self, name: &str, document: Profile, actor: Actor) -> Result<ProfileRecord> {
        let name = name.to_owned();
        self.write_announced(move |c| {
            let now = OffsetDateTime::now_utc();
            c.prepare_cached(
                "INSERT INTO profiles (name, document, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET document = excluded.document, updated_at = excluded.updated_at",
            )?
            .execute(params![name, doc(&document), ts(now)])?;
            event(c, now, &actor, "profile.saved", None, None, serde_json::json!({ "profile": name }))?;
            Ok(ProfileRecord { name, document, updated_at: from_ts(ts(now)) })
        })
        .await
    }

    async fn profiles(&self) -> Result<Vec<ProfileRecord>> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached("SELECT name, document, updated_at FROM profiles ORDER BY name")?;
            let rows = stmt.query_map([], |r| {
                Ok(ProfileRecord {
                    name: r.get(0)?,
                    document: doc_col(r, 1)?,
                    updated_at: from_ts(r.get(2)?),
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn set_device_profile(&self, id: &DeviceId, profile: Option<&str>, actor: Actor) -> Result<Device> {
        let id = id.clone();
        let profile = profile.map(str::to_owned);
        self.write_announced(move |c| {
            let now = OffsetDateTime::now_utc();
            load_device(c, &id)?.ok_or(Error::NotFound { what: "device", id: id.to_string() })?;
            if let Some(p) = &profile {
                let exists: Option<i64> = c
                    .prepare_cached("SELECT 1 FROM profiles WHERE name = ?1")?
                    .query_row([p], |r| r.get(0))
                    .optional()?;
                if exists.is_none() {
                    return Err(Error::NotFound { what: "profile", id: p.clone() });
                }
            }
            c.prepare_cached("UPDATE devices SET profile = ?1, updated_at = ?2 WHERE id = ?3")?
                .execute(params![profile, ts(now), id.as_str()])?;
            event(
                c,
                now,
                &actor,
                "device.profile",
                Some(&id),
                None,
                serde_json::json!({ "profile": profile }),
            )?;
            load_device(c, &id)?.ok_or(Error::NotFound { what: "device", id: id.to_string() })
        })
        .await
    }
}
