//! The DNS query log.

use async_trait::async_trait;
use rusqlite::params;
use time::OffsetDateTime;

use super::{SqliteStore, rows::*};
use crate::*;

#[async_trait]
impl DnsLog for SqliteStore {
    async fn log_dns_queries(&self, rows: Vec<DnsQueryRecord>) -> Result<()> {
        self.write(move |c| {
            let mut stmt = c.prepare_cached(
                "INSERT INTO dns_queries (at_ms, client, device_id, name, qtype, action, reason, rcode, upstream_us)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for r in &rows {
                stmt.execute(params![
                    ms(r.at),
                    r.client,
                    r.device,
                    r.name,
                    r.qtype,
                    r.action,
                    r.reason,
                    r.rcode,
                    r.upstream_us.map(|u| i64::try_from(u).unwrap_or(i64::MAX))
                ])?;
            }
            Ok(())
        })
        .await
    }

    async fn dns_queries(&self, filter: DnsQueryFilter) -> Result<Vec<DnsQueryRecord>> {
        self.read(move |c| {
            let limit = filter.limit.unwrap_or(100).min(10_000);
            let mut stmt = c.prepare_cached(
                "SELECT at_ms, client, device_id, name, qtype, action, reason, rcode, upstream_us FROM dns_queries
                 WHERE (?1 IS NULL OR device_id = ?1) AND (?2 = 0 OR action = 'blocked') AND at_ms >= ?3
                 ORDER BY id DESC LIMIT ?4",
            )?;
            let rows = stmt.query_map(
                params![filter.device, filter.blocked_only, filter.since.map_or(0, ms), limit],
                |r| {
                    Ok(DnsQueryRecord {
                        at: from_ms(r.get(0)?),
                        client: r.get(1)?,
                        device: r.get(2)?,
                        name: r.get(3)?,
                        qtype: r.get(4)?,
                        action: r.get(5)?,
                        reason: r.get(6)?,
                        rcode: r.get(7)?,
                        upstream_us: r.get::<_, Option<i64>>(8)?.map(|u| u.max(0) as u64),
                    })
                },
            )?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn dns_top_blocked(&self, filter: DnsQueryFilter) -> Result<Vec<BlockedName>> {
        self.read(move |c| {
            let limit = filter.limit.unwrap_or(20).min(10_000);
            let mut stmt = c.prepare_cached(
                "SELECT device_id, name, COUNT(*) AS n FROM dns_queries
                 WHERE action = 'blocked' AND (?1 IS NULL OR device_id = ?1) AND at_ms >= ?2
                 GROUP BY device_id, name ORDER BY n DESC, name LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![filter.device, filter.since.map_or(0, ms), limit], |r| {
                Ok(BlockedName {
                    device: r.get(0)?,
                    name: r.get(1)?,
                    count: r.get::<_, i64>(2)?.max(0) as u64,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn prune_dns_queries(&self, before: OffsetDateTime, max_rows: u64) -> Result<u64> {
        self.write(move |c| {
            let old = c.prepare_cached("DELETE FROM dns_queries WHERE at_ms < ?1")?.execute([ms(before)])?;
            let keep = i64::try_from(max_rows).unwrap_or(i64::MAX);
            let over = c
                .prepare_cached("DELETE FROM dns_queries WHERE id <= (SELECT MAX(id) FROM dns_queries) - ?1")?
                .execute([keep])?;
            Ok((old + over) as u64)
        })
        .await
    }
}
