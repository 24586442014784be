use std::fmt;

use portcullis_core::{CertState, DeviceId, DeviceState, Fingerprint, GroupName, Serial, TokenHash};
use serde::Serialize;
use time::OffsetDateTime;

/// Who made a change, as recorded in the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// The operator, through the admin API or CLI.
    Operator(String),
    /// A device acting with its own credentials.
    Device(DeviceId),
    /// Portcullis itself.
    System,
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Operator(who) => write!(f, "operator:{who}"),
            Self::Device(id) => write!(f, "device:{id}"),
            Self::System => f.write_str("system"),
        }
    }
}

/// A device to register.
#[derive(Debug, Clone)]
pub struct NewDevice {
    /// Its id.
    pub id: DeviceId,
    /// Its group.
    pub group: GroupName,
}

/// A one-time enrollment token to store (as its hash).
#[derive(Debug, Clone)]
pub struct NewToken {
    /// SHA-256 of the token.
    pub hash: TokenHash,
    /// When it stops working.
    pub expires_at: OffsetDateTime,
}

/// A registered device.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Device {
    /// Its id.
    pub id: DeviceId,
    /// Its group.
    pub group: GroupName,
    /// Its live state.
    pub state: DeviceState,
    /// Why it is in that state, when the operator said.
    pub state_reason: Option<String>,
    /// When it was registered.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When its state last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Number of certificates ever issued to it.
    pub certificates: u64,
    /// `not_after` of its newest valid certificate, if any.
    #[serde(with = "time::serde::rfc3339::option")]
    pub cert_not_after: Option<OffsetDateTime>,
    /// Source addresses (IPs or CIDRs) its traffic comes from, for DNS attribution.
    pub addresses: Vec<String>,
    /// The name of the profile that says what it may expose and reach, if assigned.
    pub profile: Option<String>,
}

/// A group and how many devices it holds.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Group {
    /// Its name.
    pub name: GroupName,
    /// Its device count.
    pub devices: u64,
}

/// The outcome of checking a presented enrollment token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenCheck {
    /// The token belongs to this device and may be used.
    Valid,
    /// No token of this device has that hash (wrong token, or another device's).
    Unknown,
    /// The token was already used.
    Used,
    /// The token expired.
    Expired,
}

impl fmt::Display for TokenCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Valid => "valid",
            Self::Unknown => "unknown token",
            Self::Used => "token already used",
            Self::Expired => "token expired",
        })
    }
}

/// A freshly issued certificate to record.
#[derive(Debug, Clone)]
pub struct NewCertificate {
    /// Its serial.
    pub serial: Serial,
    /// The device it was issued to.
    pub device: DeviceId,
    /// SHA-256 of its DER.
    pub fingerprint: Fingerprint,
    /// SHA-256 of its SubjectPublicKeyInfo, to spot one key on two devices.
    pub spki_sha256: String,
    /// Validity start.
    pub not_before: OffsetDateTime,
    /// Validity end.
    pub not_after: OffsetDateTime,
    /// `enroll` or `reenroll`.
    pub issued_via: &'static str,
    /// The certificate itself.
    pub der: Vec<u8>,
}

/// A stored certificate.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CertificateRecord {
    /// Its serial.
    pub serial: Serial,
    /// Its device.
    pub device: DeviceId,
    /// SHA-256 of its DER.
    pub fingerprint: Fingerprint,
    /// SHA-256 of its public key.
    pub spki_sha256: String,
    /// Validity start.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// Validity end.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Valid or revoked.
    pub state: CertState,
    /// When it was revoked.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// Why.
    pub revocation_reason: Option<String>,
    /// `enroll` or `reenroll`.
    pub issued_via: String,
    /// The certificate itself.
    #[serde(skip)]
    pub der: Vec<u8>,
    /// RFC 5280 reason name on the CRL (`superseded`, `keyCompromise`, …), if revoked
    /// with one.
    pub crl_reason: Option<String>,
    /// The certificate that replaced it on re-enrollment.
    pub superseded_by: Option<String>,
    /// When it was issued (recorded).
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
}

/// A certificate with the live registry state of its device: what every per-request
/// authentication reads.
#[derive(Debug, Clone)]
pub struct CertificateStatus {
    /// The certificate.
    pub certificate: CertificateRecord,
    /// Its device's state now.
    pub device_state: DeviceState,
    /// Its device's group now.
    pub group: GroupName,
}

/// One entry of the CRL.
#[derive(Debug, Clone)]
pub struct RevokedEntry {
    /// Serial of the revoked certificate.
    pub serial: Serial,
    /// When.
    pub revoked_at: OffsetDateTime,
    /// RFC 5280 reason name, if any.
    pub reason: Option<String>,
}

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this device's.
    pub device: Option<DeviceId>,
    /// Only those with an id above this.
    pub after_id: Option<i64>,
    /// At most this many (default 1000).
    pub limit: Option<u32>,
}

/// One entry of the append-only event log.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Event {
    /// Monotonic id.
    pub id: i64,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Who.
    pub actor: String,
    /// What, e.g. `device.created`, `certificate.issued`, `device.revoked`.
    pub kind: String,
    /// The device concerned.
    pub device: Option<String>,
    /// The certificate concerned.
    pub serial: Option<String>,
    /// Details (never secrets).
    pub detail: serde_json::Value,
}

/// One answered DNS query, for the query log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DnsQueryRecord {
    /// When (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The client's address.
    pub client: String,
    /// The device it was attributed to.
    pub device: Option<String>,
    /// The name asked (lower case, no trailing dot).
    pub name: String,
    /// The query type (`A`, `AAAA`, …).
    pub qtype: std::borrow::Cow<'static, str>,
    /// `allowed`, `blocked`, `refused` or `failed`.
    pub action: std::borrow::Cow<'static, str>,
    /// The rule or reason behind the action.
    pub reason: String,
    /// The response code sent.
    pub rcode: std::borrow::Cow<'static, str>,
    /// Time the upstream took, when one was asked.
    pub upstream_us: Option<u64>,
}

/// Which query-log entries to read.
#[derive(Debug, Clone, Default)]
pub struct DnsQueryFilter {
    /// Only this device's.
    pub device: Option<String>,
    /// Only blocked ones.
    pub blocked_only: bool,
    /// Only at or after this time.
    pub since: Option<OffsetDateTime>,
    /// At most this many, newest first (default 100).
    pub limit: Option<u32>,
}

/// A blocked name and how often it was asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BlockedName {
    /// The device that asked.
    pub device: Option<String>,
    /// The name.
    pub name: String,
    /// Times blocked.
    pub count: u64,
}

/// A device profile as stored: its name and its document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProfileRecord {
    /// Its name.
    pub name: String,
    /// The profile.
    pub document: crate::Profile,
    /// When it was last written.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// An audit run as stored.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AuditRunRecord {
    /// Its id, increasing.
    pub id: i64,
    /// When it started.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// When it ended.
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// `running`, `finished`, `failed` or `interrupted`.
    pub status: String,
    /// What was asked (scope, ports, limits).
    pub request: crate::AuditScope,
    /// Counts and notes.
    pub summary: crate::AuditSummary,
}

/// One audit finding as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FindingRecord {
    /// The device.
    pub device: String,
    /// Stable key of the finding on that device (e.g. `exposure/tcp/23`), for diffs.
    pub key: String,
    /// The check that found it.
    pub check: String,
    /// `critical`, `high`, `medium`, `low` or `info`.
    pub severity: String,
    /// One line.
    pub title: String,
    /// Where: `address:port` or the device.
    pub target: String,
    /// What was observed (never a password).
    pub evidence: String,
    /// Why it matters.
    pub why: String,
    /// How to fix it.
    pub remediation: String,
    /// Baselines violated (ETSI EN 303 645 provisions, OWASP IoT Top 10 items).
    pub baselines: Vec<String>,
    /// `new`, `open` (seen in the previous run too) or `resolved` (seen before, gone now).
    pub status: String,
}
