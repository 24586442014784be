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
            // Rows go in by the chunk, one statement each: the statement's own work
            // (step, reset) is paid once per chunk, not once per query.
            let mut chunks = rows.chunks_exact(INSERT_CHUNK);
            if chunks.len() > 0 {
                static CHUNK_SQL: std::sync::LazyLock<String> =
                    std::sync::LazyLock::new(|| insert_sql(INSERT_CHUNK));
                let mut stmt = c.prepare_cached(&CHUNK_SQL)?;
                for chunk in &mut chunks {
                    stmt.execute(rusqlite::params_from_iter(chunk.iter().flat_map(row_values)))?;
                }
            }
            let rest = chunks.remainder();
            if !rest.is_empty() {
                static ONE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| insert_sql(1));
                let mut stmt = c.prepare_cached(&ONE_SQL)?;
                for r in rest {
                    stmt.execute(rusqlite::params_from_iter(row_values(r)))?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn dns_queries(&self, filter: DnsQueryFilter) -> Result<Vec<DnsQueryRecord>> {
        self.read(move |c| {
            let limit = filter.limit.unwrap_or(100).min(10_000);
            let from = first_id_since(c, filter.since)?;
            let mut stmt = c.prepare_cached(
                "SELECT at_ms, client, device_id, name, qtype, action, reason, rcode, upstream_us FROM dns_queries
                 WHERE id >= ?3 AND (?1 IS NULL OR device_id = ?1) AND (?2 = 0 OR action = 'blocked')
                 ORDER BY id DESC LIMIT ?4",
            )?;
            let rows = stmt.query_map(
                params![filter.device, filter.blocked_only, from, limit],
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
            let from = first_id_since(c, filter.since)?;
            let mut stmt = c.prepare_cached(
                "SELECT device_id, name, COUNT(*) AS n FROM dns_queries
                 WHERE id >= ?2 AND action = 'blocked' AND (?1 IS NULL OR device_id = ?1)
                 GROUP BY device_id, name ORDER BY n DESC, name LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![filter.device, from, limit], |r| {
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
            let from = first_id_since(c, Some(before))?;
            let old = c.prepare_cached("DELETE FROM dns_queries WHERE id < ?1")?.execute([from])?;
            let keep = i64::try_from(max_rows).unwrap_or(i64::MAX);
            let over = c
                .prepare_cached("DELETE FROM dns_queries WHERE id <= (SELECT MAX(id) FROM dns_queries) - ?1")?
                .execute([keep])?;
            Ok((old + over) as u64)
        })
        .await
    }
}

/// The id of the first row at or after `since` (0 without a bound), found by binary search
/// over the rowid: the log is appended in time order by one writer, so `at_ms` rises with
/// `id` (queries answered on different threads in the same millisecond may be a few
/// rows out of order; a time bound is exact to that). O(log n) point reads, no index.
fn first_id_since(c: &rusqlite::Connection, since: Option<OffsetDateTime>) -> rusqlite::Result<i64> {
    let Some(since) = since.map(ms) else { return Ok(0) };
    let (lo, hi): (Option<i64>, Option<i64>) = c
        .prepare_cached("SELECT MIN(id), MAX(id) FROM dns_queries")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let (Some(mut lo), Some(hi)) = (lo, hi) else { return Ok(0) };
    // The first row with id >= `at`, and its time.
    let mut probe =
        c.prepare_cached("SELECT id, at_ms FROM dns_queries WHERE id >= ?1 ORDER BY id LIMIT 1")?;
    let mut row_at = |at: i64| -> rusqlite::Result<Option<(i64, i64)>> {
        use rusqlite::OptionalExtension;
        probe.query_row([at], |r| Ok((r.get(0)?, r.get(1)?))).optional()
    };
    // Invariant: every row below `lo` is older than `since`; the answer is in lo..=hi+1.
    let mut hi = hi + 1;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match row_at(mid)? {
            Some((id, at)) if at < since => lo = id + 1,
            Some(_) => hi = mid,
            None => hi = mid,
        }
    }
    Ok(lo)
}

/// Rows per INSERT statement (9 parameters each, well under SQLite's limit).
const INSERT_CHUNK: usize = 64;

fn insert_sql(rows: usize) -> String {
    let one = "(?, ?, ?, ?, ?, ?, ?, ?, ?)";
    let values = vec![one; rows].join(", ");
    format!(
        "INSERT INTO dns_queries (at_ms, client, device_id, name, qtype, action, reason, rcode, upstream_us) VALUES {values}"
    )
}

/// One column's value, borrowing the row's text.
enum Cell<'a> {
    Int(i64),
    Text(&'a str),
    Null,
}

impl rusqlite::ToSql for Cell<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value, ValueRef};
        Ok(match self {
            Cell::Int(i) => ToSqlOutput::Owned(Value::Integer(*i)),
            Cell::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Cell::Null => ToSqlOutput::Owned(Value::Null),
        })
    }
}

fn row_values(r: &DnsQueryRecord) -> [Cell<'_>; 9] {
    [
        Cell::Int(ms(r.at)),
        Cell::Text(&r.client),
        r.device.as_deref().map_or(Cell::Null, Cell::Text),
        Cell::Text(&r.name),
        Cell::Text(&r.qtype),
        Cell::Text(&r.action),
        Cell::Text(&r.reason),
        Cell::Text(&r.rcode),
        r.upstream_us.map_or(Cell::Null, |u| Cell::Int(i64::try_from(u).unwrap_or(i64::MAX))),
    ]
}
