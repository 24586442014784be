//! Firmware rollouts, status and reports.

use async_trait::async_trait;
use portcullis_core::DeviceId;
use rusqlite::{OptionalExtension, params};
use time::OffsetDateTime;

use super::{SqliteStore, rows::*, ts};
use crate::*;

#[async_trait]
impl FirmwareState for SqliteStore {
    async fn save_rollout(&self, id: Option<i64>, rollout: RolloutRecord, actor: Actor) -> Result<i64> {
        self.write(move |c| {
            let now = OffsetDateTime::now_utc();
            let id = match id {
                Some(id) => {
                    let n = c
                        .prepare_cached(
                            "UPDATE firmware_rollouts SET document = ?2, updated_at = ?3 WHERE id = ?1",
                        )?
                        .execute(params![id, doc(&rollout), ts(now)])?;
                    if n == 0 {
                        return Err(Error::NotFound { what: "rollout", id: id.to_string() });
                    }
                    id
                }
                None => {
                    c.prepare_cached("INSERT INTO firmware_rollouts (document, updated_at) VALUES (?1, ?2)")?
                        .execute(params![doc(&rollout), ts(now)])?;
                    c.last_insert_rowid()
                }
            };
            let state = rollout.state;
            event(
                c,
                now,
                &actor,
                "firmware.rollout",
                None,
                None,
                serde_json::json!({ "rollout": id, "state": state }),
            )?;
            Ok(id)
        })
        .await
    }

    async fn rollouts(&self) -> Result<Vec<RolloutRecord>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT id, document FROM firmware_rollouts ORDER BY id")?;
            let rows = stmt.query_map([], |r| {
                let mut rollout: RolloutRecord = doc_col(r, 1)?;
                rollout.id = r.get(0)?;
                Ok(rollout)
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn record_firmware_report(
        &self,
        device: &DeviceId,
        report: Option<FirmwareReport>,
        status: FirmwareStatus,
    ) -> Result<()> {
        let device = device.to_string();
        self.write(move |c| {
            let now = OffsetDateTime::now_utc();
            if let Some(report) = report {
                c.prepare_cached("INSERT INTO firmware_reports (device_id, at, document) VALUES (?1, ?2, ?3)")?
                    .execute(params![device, ts(now), doc(&report)])?;
            }
            c.prepare_cached(
                "INSERT INTO firmware_devices (device_id, document, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(device_id) DO UPDATE SET document = excluded.document, updated_at = excluded.updated_at",
            )?
            .execute(params![device, doc(&status), ts(now)])?;
            Ok(())
        })
        .await
    }

    async fn firmware_devices(&self) -> Result<Vec<(String, FirmwareStatus)>> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached("SELECT device_id, document FROM firmware_devices ORDER BY device_id")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, doc_col(r, 1)?)))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn firmware_device(&self, device: &DeviceId) -> Result<Option<FirmwareStatus>> {
        let device = device.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare_cached("SELECT document FROM firmware_devices WHERE device_id = ?1")?;
            Ok(stmt.query_row(params![device], |r| doc_col(r, 0)).optional()?)
        })
        .await
    }
}
