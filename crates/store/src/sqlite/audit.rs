//! Audit runs and findings.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};
use time::OffsetDateTime;

use super::{SqliteStore, rows::*, ts};
use crate::*;

#[async_trait]
impl AuditRuns for SqliteStore {
    async fn start_audit_run(&self, scope: AuditScope, actor: Actor) -> Result<i64> {
        self.write(move |c| {
            let now = OffsetDateTime::now_utc();
            // A run left `running` by a process that stopped will never finish.
            c.prepare_cached("UPDATE audit_runs SET status = 'interrupted' WHERE status = 'running'")?.execute([])?;
            c.prepare_cached(
                "INSERT INTO audit_runs (started_at, status, request, summary) VALUES (?1, 'running', ?2, '{}')",
            )?
            .execute(params![ts(now), doc(&scope)])?;
            let id = c.last_insert_rowid();
            event(c, now, &actor, "audit.started", None, None, serde_json::json!({ "run": id, "request": scope }))?;
            Ok(id)
        })
        .await
    }

    async fn finish_audit_run(
        &self,
        id: i64,
        status: &str,
        summary: AuditSummary,
        devices: Vec<String>,
        findings: Vec<FindingRecord>,
    ) -> Result<()> {
        let status = status.to_owned();
        self.write(move |c| {
            let now = OffsetDateTime::now_utc();
            let n = c
                .prepare_cached("UPDATE audit_runs SET finished_at = ?1, status = ?2, summary = ?3 WHERE id = ?4")?
                .execute(params![ts(now), status, doc(&summary), id])?;
            if n == 0 {
                return Err(Error::NotFound { what: "audit run", id: id.to_string() });
            }
            let mut dev = c.prepare_cached("INSERT OR IGNORE INTO audit_run_devices (run_id, device_id) VALUES (?1, ?2)")?;
            for d in &devices {
                dev.execute(params![id, d])?;
            }
            let mut stmt = c.prepare_cached(
                "INSERT OR REPLACE INTO audit_findings (run_id, device_id, key, check_name, severity, title, target,
                    evidence, why, remediation, baselines, status)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            for f in &findings {
                stmt.execute(params![
                    id,
                    f.device,
                    f.key,
                    f.check,
                    f.severity,
                    f.title,
                    f.target,
                    f.evidence,
                    f.why,
                    f.remediation,
                    serde_json::to_string(&f.baselines).unwrap_or_else(|_| "[]".into()),
                    f.status
                ])?;
            }
            event(
                c,
                now,
                &Actor::System,
                "audit.finished",
                None,
                None,
                serde_json::json!({ "run": id, "status": status, "findings": findings.len() }),
            )?;
            Ok(())
        })
        .await
    }

    async fn audit_runs(&self, limit: u32) -> Result<Vec<AuditRunRecord>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, started_at, finished_at, status, request, summary FROM audit_runs ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit.min(10_000)], run_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn audit_run(&self, id: i64) -> Result<Option<(AuditRunRecord, Vec<FindingRecord>)>> {
        self.read(move |c| {
            let run = c
                .prepare_cached(
                    "SELECT id, started_at, finished_at, status, request, summary FROM audit_runs WHERE id = ?1",
                )?
                .query_row([id], run_row)
                .optional()?;
            let Some(run) = run else { return Ok(None) };
            let mut stmt = c.prepare_cached(&format!("{FINDING_SELECT} WHERE run_id = ?1 ORDER BY device_id, key"))?;
            let rows = stmt.query_map([id], finding_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some((run, rows)))
        })
        .await
    }

    async fn previous_findings(&self, devices: Vec<String>, before_run: i64) -> Result<Vec<FindingRecord>> {
        self.read(move |c| {
            let mut last = c.prepare_cached(
                "SELECT MAX(d.run_id) FROM audit_run_devices d JOIN audit_runs r ON r.id = d.run_id
                 WHERE d.device_id = ?1 AND d.run_id < ?2 AND r.status = 'finished'",
            )?;
            let mut stmt = c.prepare_cached(&format!(
                "{FINDING_SELECT} WHERE run_id = ?1 AND device_id = ?2 AND status <> 'resolved' ORDER BY key"
            ))?;
            let mut out = Vec::new();
            for d in &devices {
                let run: Option<i64> = last.query_row(params![d, before_run], |r| r.get(0))?;
                if let Some(run) = run {
                    out.extend(
                        stmt.query_map(params![run, d], finding_row)?
                            .collect::<rusqlite::Result<Vec<_>>>()?,
                    );
                }
            }
            Ok(out)
        })
        .await
    }
}
