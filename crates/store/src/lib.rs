//! The registry's storage: the [`Store`] trait, made of one part per capability
//! ([`Registry`], [`Credentials`], [`EventLog`], [`DnsLog`], [`AuditRuns`],
//! [`FirmwareState`]) with typed records, and its SQLite implementation.
//!
//! Callers (the CA, the admin API, the listeners) see only the trait, so a PostgreSQL
//! implementation can follow without touching them. Every state change appends an
//! [`Event`] in the same transaction; the event table cannot be updated or deleted.
//!
//! The SQLite implementation runs in WAL mode with `synchronous = FULL` and funnels all
//! writes through one writer thread that commits them in groups: a caller's write is
//! acknowledged only after the transaction holding it is durable, and concurrent
//! enrollments share one fsync instead of queueing for one each.
//!
//! Every write that changes what authentication or policy depends on (devices and their
//! state, certificates, addresses, profiles) is announced by the store itself, after it
//! committed and before the caller hears back, through [`Changes`]: a generation number
//! that caches compare against, and a channel that listeners wait on. No caller has to
//! remember to say that the registry changed. A second node's store will announce the
//! writes of the first the same way (PostgreSQL `LISTEN`), behind the same seam.
//!
//! This crate does not sign, verify or decide policy; it stores what it is told.

mod changes;
mod model;
pub mod profile;
mod records;
mod sqlite;

pub use changes::Changes;
pub use model::{
    Actor, AuditRunRecord, BlockedName, CertificateRecord, CertificateStatus, Device, DnsQueryFilter,
    DnsQueryRecord, Event, EventFilter, FindingRecord, Group, NewCertificate, NewDevice, NewToken,
    ProfileRecord, RevokedEntry, TokenCheck,
};
pub use profile::Profile;
pub use records::{
    AuditScope, AuditSummary, AuditTotals, DEFAULT_MIN_REPORTS, FindingCounts, FirmwareOutcome,
    FirmwareReport, FirmwareStatus, NotTested, RolloutRecord, RolloutState,
};
pub use sqlite::{SCHEMA_VERSION, SqliteStore};

use async_trait::async_trait;
use portcullis_core::{DeviceId, DeviceState, Serial, TokenHash};
use time::OffsetDateTime;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The named thing does not exist.
    #[error("{what} {id} not found")]
    NotFound {
        /// What kind of record.
        what: &'static str,
        /// Its key.
        id: String,
    },
    /// A record with that key already exists.
    #[error("{what} {id} already exists")]
    AlreadyExists {
        /// What kind of record.
        what: &'static str,
        /// Its key.
        id: String,
    },
    /// The enrollment token was refused; nothing was written.
    #[error("enrollment token refused: {0}")]
    Token(TokenCheck),
    /// The record is no longer valid (a certificate already revoked or superseded).
    #[error("{what} {id} is no longer valid")]
    NotValid {
        /// What kind of record.
        what: &'static str,
        /// Its key.
        id: String,
    },
    /// The requested state change is not allowed from the current state.
    #[error("device {id} is {from}; cannot {action}")]
    InvalidTransition {
        /// The device.
        id: DeviceId,
        /// Its current state.
        from: DeviceState,
        /// What was asked.
        action: &'static str,
    },
    /// The database failed.
    #[error("database error")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store was shut down.
    #[error("store is closed")]
    Closed,
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The registry's storage: every capability's part of it, and the announcements of the
/// writes that authentication and policy depend on. Implementations must make each
/// method atomic. Callers hold `Arc<dyn Store>` (a trait object's supertrait methods
/// need no import); a second implementation (PostgreSQL) implements each part.
pub trait Store:
    Registry + Credentials + EventLog + DnsLog + AuditRuns + FirmwareState + std::fmt::Debug + 'static
{
    /// The announcements of writes that authentication and policy depend on.
    fn changes(&self) -> &Changes;
}

/// Devices, their groups, state, source addresses and profiles: what authentication
/// and DNS attribution read on every request. Every write here is announced on
/// [`Store::changes`].
#[async_trait]
pub trait Registry: Send + Sync {
    /// Registers a device (creating its group if needed) with its first enrollment token.
    async fn create_device(&self, device: NewDevice, token: NewToken, actor: Actor) -> Result<Device>;

    /// One device.
    async fn device(&self, id: &DeviceId) -> Result<Option<Device>>;

    /// All devices, ordered by id.
    async fn devices(&self) -> Result<Vec<Device>>;

    /// All groups with their device counts.
    async fn groups(&self) -> Result<Vec<Group>>;

    /// Moves a device to `to`. Revoking also revokes all of its valid certificates in the
    /// same transaction. Returns the updated device.
    async fn set_device_state(
        &self,
        id: &DeviceId,
        to: DeviceState,
        reason: Option<String>,
        actor: Actor,
    ) -> Result<Device>;

    /// Replaces the source addresses (IPs or CIDRs, validated by the caller) of a device.
    /// An address already held by another device is refused ([`Error::AlreadyExists`]).
    async fn set_device_addresses(
        &self,
        id: &DeviceId,
        addresses: Vec<String>,
        actor: Actor,
    ) -> Result<Device>;

    /// Creates or replaces a profile.
    async fn put_profile(&self, name: &str, document: Profile, actor: Actor) -> Result<ProfileRecord>;

    /// All profiles, by name.
    async fn profiles(&self) -> Result<Vec<ProfileRecord>>;

    /// Assigns a profile (which must exist) to a device, or clears it.
    async fn set_device_profile(&self, id: &DeviceId, profile: Option<&str>, actor: Actor) -> Result<Device>;
}

/// Enrollment tokens and certificates, and what the CRL is signed from. Writes that
/// change which certificates authenticate are announced on [`Store::changes`].
#[async_trait]
pub trait Credentials: Send + Sync {
    /// Adds another enrollment token for an existing, non-revoked device.
    async fn add_token(&self, device: &DeviceId, token: NewToken, actor: Actor) -> Result<()>;

    /// Checks a presented token without consuming it, in one read with the device's
    /// state. `None` if the device does not exist.
    async fn check_token(
        &self,
        device: &DeviceId,
        hash: &TokenHash,
        now: OffsetDateTime,
    ) -> Result<Option<(DeviceState, TokenCheck)>>;

    /// Atomically consumes the token, records the certificate issued with it and revokes
    /// (reason superseded) every earlier valid certificate of the device: enrolling with
    /// a new token is re-provisioning. Returns how many were revoked. Fails with
    /// [`Error::Token`] (and writes nothing) if the token is no longer usable.
    async fn enroll(&self, hash: &TokenHash, cert: NewCertificate, now: OffsetDateTime) -> Result<usize>;

    /// Records a certificate issued on re-enrollment by an authenticated device and, in
    /// the same transaction, revokes the certificate it authenticated with (`supersedes`,
    /// reason superseded). Fails with [`Error::NotValid`] (and writes nothing) if that
    /// certificate is no longer valid.
    async fn record_certificate(&self, cert: NewCertificate, supersedes: &Serial, actor: Actor)
    -> Result<()>;

    /// Revokes one certificate with an RFC 5280 reason name (`keyCompromise`, …) and an
    /// optional note. [`Error::NotValid`] if it is already revoked.
    async fn revoke_certificate(
        &self,
        serial: &Serial,
        crl_reason: &str,
        note: Option<String>,
        actor: Actor,
    ) -> Result<CertificateRecord>;

    /// One certificate with the live state and group of its device.
    async fn certificate(&self, serial: &Serial) -> Result<Option<CertificateStatus>>;

    /// Certificates, newest first, optionally of one device.
    async fn certificates(&self, device: Option<&DeviceId>) -> Result<Vec<CertificateRecord>>;

    /// Revoked certificates that have not yet expired, for the CRL.
    async fn revoked(&self, now: OffsetDateTime) -> Result<Vec<RevokedEntry>>;

    /// Increments and returns the CRL number (RFC 5280 5.2.3: monotonically increasing).
    async fn next_crl_number(&self) -> Result<u64>;
}

/// The append-only event log (every write above appends to it in its transaction).
#[async_trait]
pub trait EventLog: Send + Sync {
    /// Events, oldest first.
    async fn events(&self, filter: EventFilter) -> Result<Vec<Event>>;
}

/// The DNS query log: batched appends, queries for the admin API, retention.
#[async_trait]
pub trait DnsLog: Send + Sync {
    /// Appends answered DNS queries to the query log.
    async fn log_dns_queries(&self, rows: Vec<DnsQueryRecord>) -> Result<()>;

    /// Query-log entries, newest first.
    async fn dns_queries(&self, filter: DnsQueryFilter) -> Result<Vec<DnsQueryRecord>>;

    /// The most often blocked names (per device), most first.
    async fn dns_top_blocked(&self, filter: DnsQueryFilter) -> Result<Vec<BlockedName>>;

    /// Deletes query-log entries older than `before`, then the oldest beyond `max_rows`;
    /// returns how many went.
    async fn prune_dns_queries(&self, before: OffsetDateTime, max_rows: u64) -> Result<u64>;
}

/// Audit runs and their findings.
#[async_trait]
pub trait AuditRuns: Send + Sync {
    /// Records the start of an audit run; returns its id.
    async fn start_audit_run(&self, scope: AuditScope, actor: Actor) -> Result<i64>;

    /// Records the end of an audit run with its findings and the devices it covered.
    async fn finish_audit_run(
        &self,
        id: i64,
        status: &str,
        summary: AuditSummary,
        devices: Vec<String>,
        findings: Vec<FindingRecord>,
    ) -> Result<()>;

    /// Runs, newest first.
    async fn audit_runs(&self, limit: u32) -> Result<Vec<AuditRunRecord>>;

    /// One run and its findings.
    async fn audit_run(&self, id: i64) -> Result<Option<(AuditRunRecord, Vec<FindingRecord>)>>;

    /// For each device, the findings (not resolved) of the newest finished run before
    /// `before_run` that covered it.
    async fn previous_findings(&self, devices: Vec<String>, before_run: i64) -> Result<Vec<FindingRecord>>;
}

/// Firmware rollouts and each device's firmware status and reports (the images and
/// TUF metadata live in the firmware repository, not here).
#[async_trait]
pub trait FirmwareState: Send + Sync {
    /// Creates (`id` = `None`) or replaces a firmware rollout document; returns its id.
    async fn save_rollout(&self, id: Option<i64>, rollout: RolloutRecord, actor: Actor) -> Result<i64>;

    /// Every rollout, oldest first.
    async fn rollouts(&self) -> Result<Vec<RolloutRecord>>;

    /// Appends a device's firmware report (`None`: a check-in) and replaces its firmware
    /// status.
    async fn record_firmware_report(
        &self,
        device: &DeviceId,
        report: Option<FirmwareReport>,
        status: FirmwareStatus,
    ) -> Result<()>;

    /// Each device's firmware status (installed version, last report), by device id.
    async fn firmware_devices(&self) -> Result<Vec<(String, FirmwareStatus)>>;

    /// One device's firmware status.
    async fn firmware_device(&self, device: &DeviceId) -> Result<Option<FirmwareStatus>>;
}
