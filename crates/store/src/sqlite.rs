use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;

use rusqlite::Connection;
use time::OffsetDateTime;
use tokio::sync::oneshot;

use crate::{AuditRunRecord, FindingRecord};

use crate::{Actor, CertificateRecord, Device, Error, NewCertificate, Result, Store, TokenCheck};

mod audit;
mod credentials;
mod dnslog;
mod events;
mod firmware;
mod registry;
mod rows;
mod schema;
mod writer;

pub use schema::SCHEMA_VERSION;
use schema::*;
use writer::*;

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 512;
/// Read connections kept open; more are opened under load and closed after.
const READERS: usize = 64;

type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> Reply + Send>;

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Backend(Box::new(e))
}

fn ts(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn from_ts(s: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(s).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// SQLite implementation of [`Store`]: one file in the data dir, WAL, group commit.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Shared with the writer thread's jobs, which announce after their commit.
    changes: Arc<crate::Changes>,
    path: PathBuf,
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    readers: Mutex<Vec<Connection>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
    }
}

fn open_conn(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;",
    )?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut conn = open_conn(&path).map_err(backend)?;
        migrate(&mut conn)?;
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(backend)?;
        Ok(Self {
            inner: Arc::new(Inner {
                changes: Arc::default(),
                path,
                writer: Mutex::new(Some(tx)),
                readers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The schema version of the open database.
    pub async fn schema_version(&self) -> Result<usize> {
        self.read(|c| Ok(c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize)).await
    }

    /// Runs `f` inside the next group-committed transaction; resolves once it is durable.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.write_with(f, None).await
    }

    /// A write that authentication or policy depends on: announced once committed,
    /// before the caller hears back.
    async fn write_announced<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.write_with(f, Some(self.inner.changes.clone())).await
    }

    async fn write_with<T, F>(&self, f: F, announce: Option<Arc<crate::Changes>>) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T>>();
        let job: Job = Box::new(move |conn: &Connection| -> Reply {
            let out = savepoint(conn, f);
            Box::new(move |committed: Result<(), String>| {
                let out = match committed {
                    Ok(()) => out,
                    Err(e) => Err(Error::Backend(e.into())),
                };
                if let (Ok(_), Some(changes)) = (&out, &announce) {
                    changes.announce();
                }
                let _ = tx.send(out);
            })
        });
        {
            let guard = self.inner.writer.lock().map_err(|_| Error::Closed)?;
            let sender = guard.as_ref().ok_or(Error::Closed)?;
            sender.send(job).map_err(|_| Error::Closed)?;
        }
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Runs `f` on a pooled read connection on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = inner.readers.lock().ok().and_then(|mut p| p.pop());
            let conn = match conn {
                Some(c) => c,
                None => open_conn(&inner.path).map_err(backend)?,
            };
            let out = f(&conn);
            if let Ok(mut pool) = inner.readers.lock()
                && pool.len() < READERS
            {
                pool.push(conn);
            }
            out
        })
        .await
        .map_err(backend)?
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        backend(e)
    }
}

impl Store for SqliteStore {
    fn changes(&self) -> &crate::Changes {
        &self.inner.changes
    }
}

#[cfg(test)]
mod tests;
