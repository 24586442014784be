//! The single writer thread: jobs run in savepoints and commit in groups of up to
//! `MAX_BATCH`, each caller answered only after its group's commit is durable.

use std::sync::mpsc;

use rusqlite::Connection;

use super::*;

pub(super) fn savepoint<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    conn.execute_batch("SAVEPOINT job")?;
    match f(conn) {
        Ok(v) => {
            conn.execute_batch("RELEASE job")?;
            Ok(v)
        }
        Err(e) => {
            conn.execute_batch("ROLLBACK TO job; RELEASE job")?;
            Err(e)
        }
    }
}

pub(super) fn writer_loop(conn: Connection, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            // Dropping the jobs unblocks their callers with `Error::Closed`.
            tracing::error!(error = %e, jobs = batch.len(), "store: cannot begin transaction");
            continue;
        }
        let replies: Vec<Reply> = batch.into_iter().map(|job| job(&conn)).collect();
        let committed = conn.execute_batch("COMMIT").map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            tracing::error!(error = %e, "store: commit failed");
            e.to_string()
        });
        for reply in replies {
            reply(committed.clone());
        }
    }
}
