//! The event log.

use async_trait::async_trait;
use portcullis_core::DeviceId;
use rusqlite::params;

use super::{SqliteStore, from_ts};
use crate::*;

#[async_trait]
impl EventLog for SqliteStore {
    async fn events(&self, filter: EventFilter) -> Result<Vec<Event>> {
        self.read(move |c| {
            let limit = filter.limit.unwrap_or(1000).min(10_000);
            let mut stmt = c.prepare_cached(
                "SELECT id, at, actor, kind, device_id, serial, detail FROM events
                 WHERE (?1 IS NULL OR device_id = ?1) AND id > ?2 ORDER BY id LIMIT ?3",
            )?;
            let rows = stmt.query_map(
                params![filter.device.as_ref().map(DeviceId::as_str), filter.after_id.unwrap_or(0), limit],
                |r| {
                    let detail: String = r.get(6)?;
                    Ok(Event {
                        id: r.get(0)?,
                        at: from_ts(r.get(1)?),
                        actor: r.get(2)?,
                        kind: r.get(3)?,
                        device: r.get(4)?,
                        serial: r.get(5)?,
                        detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                    })
                },
            )?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}
