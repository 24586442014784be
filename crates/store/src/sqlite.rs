use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;

use async_trait::async_trait;
use portcullis_core::{DeviceId, DeviceState, GroupName, Serial, TokenHash};
use rusqlite::{Connection, OptionalExtension, params};
use time::OffsetDateTime;
use tokio::sync::oneshot;

use crate::{AuditRunRecord, BlockedName, DnsQueryFilter, DnsQueryRecord, FindingRecord, ProfileRecord};

use crate::{
    Actor, CertificateRecord, CertificateStatus, Device, Error, Event, EventFilter, Group, NewCertificate,
    NewDevice, NewToken, Result, RevokedEntry, Store, TokenCheck,
};

mod rows;
mod schema;
mod writer;

use rows::*;
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

#[async_trait]
impl Store for SqliteStore {
    fn changes(&self) -> &crate::Changes {
        &self.inner.changes
    }

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

    async fn put_profile(
        &self,
        name: &str,
        document: serde_json::Value,
        actor: Actor,
    ) -> Result<ProfileRecord> {
        let name = name.to_owned();
        self.write_announced(move |c| {
            let now = OffsetDateTime::now_utc();
            c.prepare_cached(
                "INSERT INTO profiles (name, document, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET document = excluded.document, updated_at = excluded.updated_at",
            )?
            .execute(params![name, document.to_string(), ts(now)])?;
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
                    document: json_col(r, 1)?,
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

    async fn start_audit_run(&self, request: serde_json::Value, actor: Actor) -> Result<i64> {
        self.write(move |c| {
            let now = OffsetDateTime::now_utc();
            // A run left `running` by a process that stopped will never finish.
            c.prepare_cached("UPDATE audit_runs SET status = 'interrupted' WHERE status = 'running'")?.execute([])?;
            c.prepare_cached(
                "INSERT INTO audit_runs (started_at, status, request, summary) VALUES (?1, 'running', ?2, '{}')",
            )?
            .execute(params![ts(now), request.to_string()])?;
            let id = c.last_insert_rowid();
            event(c, now, &actor, "audit.started", None, None, serde_json::json!({ "run": id, "request": request }))?;
            Ok(id)
        })
        .await
    }

    async fn finish_audit_run(
        &self,
        id: i64,
        status: &str,
        summary: serde_json::Value,
        devices: Vec<String>,
        findings: Vec<FindingRecord>,
    ) -> Result<()> {
        let status = status.to_owned();
        self.write(move |c| {
            let now = OffsetDateTime::now_utc();
            let n = c
                .prepare_cached("UPDATE audit_runs SET finished_at = ?1, status = ?2, summary = ?3 WHERE id = ?4")?
                .execute(params![ts(now), status, summary.to_string(), id])?;
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

    async fn save_rollout(&self, id: Option<i64>, document: serde_json::Value, actor: Actor) -> Result<i64> {
        self.write(move |c| {
            let now = OffsetDateTime::now_utc();
            let id = match id {
                Some(id) => {
                    let n = c
                        .prepare_cached(
                            "UPDATE firmware_rollouts SET document = ?2, updated_at = ?3 WHERE id = ?1",
                        )?
                        .execute(params![id, document.to_string(), ts(now)])?;
                    if n == 0 {
                        return Err(Error::NotFound { what: "rollout", id: id.to_string() });
                    }
                    id
                }
                None => {
                    c.prepare_cached("INSERT INTO firmware_rollouts (document, updated_at) VALUES (?1, ?2)")?
                        .execute(params![document.to_string(), ts(now)])?;
                    c.last_insert_rowid()
                }
            };
            let state = document.get("state").cloned().unwrap_or_default();
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

    async fn rollouts(&self) -> Result<Vec<(i64, serde_json::Value)>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT id, document FROM firmware_rollouts ORDER BY id")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, json_col(r, 1)?)))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn record_firmware_report(
        &self,
        device: &DeviceId,
        report: serde_json::Value,
        status: serde_json::Value,
    ) -> Result<()> {
        let device = device.to_string();
        self.write(move |c| {
            let now = OffsetDateTime::now_utc();
            if !report.is_null() {
                c.prepare_cached("INSERT INTO firmware_reports (device_id, at, document) VALUES (?1, ?2, ?3)")?
                    .execute(params![device, ts(now), report.to_string()])?;
            }
            c.prepare_cached(
                "INSERT INTO firmware_devices (device_id, document, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(device_id) DO UPDATE SET document = excluded.document, updated_at = excluded.updated_at",
            )?
            .execute(params![device, status.to_string(), ts(now)])?;
            Ok(())
        })
        .await
    }

    async fn firmware_device(&self, device: &DeviceId) -> Result<Option<serde_json::Value>> {
        let device = device.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare_cached("SELECT document FROM firmware_devices WHERE device_id = ?1")?;
            Ok(stmt.query_row(params![device], |r| json_col(r, 0)).optional()?)
        })
        .await
    }

    async fn firmware_devices(&self) -> Result<Vec<(String, serde_json::Value)>> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached("SELECT device_id, document FROM firmware_devices ORDER BY device_id")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, json_col(r, 1)?)))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
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

#[cfg(test)]
mod tests;
