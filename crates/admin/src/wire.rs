//! The admin API's answers, shared by the server (which builds them) and
//! [`AdminClient`](crate::AdminClient) (which reads them): the CLI reads fields, not JSON
//! keys, and a field renamed on one side breaks the build, not the operator.

use portcullis_core::{DeviceId, DeviceState, GroupName};
use portcullis_store::{
    AuditRunRecord, BlockedName, CertificateRecord, Device, DnsQueryRecord, Event, FindingRecord, Group,
    Profile,
};
use serde::{Deserialize, Serialize};

/// `POST /v1/devices`: the device and its one-time enrollment token (shown once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRegistered {
    /// The device.
    pub device: Device,
    /// The enrollment token, in the clear this once.
    pub token: String,
    /// When the token stops working (RFC 3339).
    pub token_expires_at: String,
    /// The device's SPIFFE ID.
    pub spiffe_id: String,
}

/// `POST /v1/devices/{id}/tokens`: another one-time enrollment token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenIssued {
    /// The device.
    pub device: DeviceId,
    /// The enrollment token, in the clear this once.
    pub token: String,
    /// When it stops working (RFC 3339).
    pub token_expires_at: String,
}

/// `GET /v1/devices`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceList {
    /// Every device, by id.
    pub devices: Vec<Device>,
}

/// `GET /v1/groups`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupList {
    /// Every group with its device count.
    pub groups: Vec<Group>,
}

/// `GET /v1/devices/{id}`: the device, its SPIFFE ID and its certificates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceDetail {
    /// The device.
    pub device: Device,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// Its certificates, newest first.
    pub certificates: Vec<CertificateRecord>,
}

/// A device after a change (suspend, resume, revoke, addresses, profile).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceChanged {
    /// The device as it is now.
    pub device: Device,
}

/// `GET /v1/certificates/{serial}`: the certificate, its device's live state, its PEM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateDetail {
    /// The certificate.
    #[serde(flatten)]
    pub certificate: CertificateRecord,
    /// Its device's state now.
    pub device_state: DeviceState,
    /// Its device's group now.
    pub group: GroupName,
    /// The certificate, PEM.
    pub pem: String,
}

/// `GET /v1/certificates`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateList {
    /// Newest first.
    pub certificates: Vec<CertificateRecord>,
}

/// `POST /v1/certificates/{serial}/revoke`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateRevoked {
    /// Always true (a refusal is a problem document).
    pub revoked: bool,
    /// The certificate as it is now.
    pub certificate: CertificateRecord,
}

/// `GET /v1/events`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventList {
    /// Oldest first.
    pub events: Vec<Event>,
}

/// `GET /v1/dns/log`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DnsLog {
    /// Newest first.
    pub queries: Vec<DnsQueryRecord>,
}

/// `GET /v1/dns/top-blocked`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopBlocked {
    /// Most first.
    pub top_blocked: Vec<BlockedName>,
}

/// `POST /v1/gateway/reload` (and `dns reload`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reloaded {
    /// Always true (a failure is a problem document).
    pub reloaded: bool,
    /// Gateway routes in force.
    pub routes: usize,
    /// The file reloaded; `None` on the embedded defaults.
    pub config: Option<String>,
}

/// `GET /v1/gateway/routes`: the gateway's description.
pub use portcullis_gateway::{RouteView, Routes};

/// `GET /v1/dns/policies`: the DNS service's description.
pub use portcullis_dns::service::{DnsPolicies, ListView, PolicyView};

/// `POST /v1/profiles` and `POST /v1/profiles/import-mud`: the profile as saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileSaved {
    /// Its name.
    pub name: String,
    /// The profile, normalised.
    pub profile: Profile,
    /// What a MUD import could not carry over.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// `GET /v1/profiles`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileList {
    /// By name.
    pub profiles: Vec<ProfileUse>,
}

/// One profile and the devices that have it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileUse {
    /// Its name.
    pub name: String,
    /// The profile.
    pub profile: Profile,
    /// When it was last saved (RFC 3339).
    pub updated_at: String,
    /// The devices assigned it.
    pub devices: Vec<String>,
}

/// `POST /v1/audit/runs`: a run started, or a dry run's plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AuditStarted {
    /// A dry run: what would be probed.
    Plan {
        /// Always true.
        dry_run: bool,
        /// The plan.
        plan: portcullis_audit::PlanView,
    },
    /// The run, going on in the background.
    Run {
        /// Its id.
        run: i64,
        /// `running`.
        status: String,
    },
}

/// `GET /v1/audit/runs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRuns {
    /// Newest first.
    pub runs: Vec<AuditRunRecord>,
}

/// `GET /v1/audit/runs/{id}`: the run, its progress while it runs, its findings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRunDetail {
    /// The run.
    pub run: AuditRunRecord,
    /// Its progress, while it runs.
    pub progress: Option<portcullis_audit::ProgressView>,
    /// Its findings (new, open and resolved).
    pub findings: Vec<FindingRecord>,
}

/// `GET /v1/audit/findings`: the open findings of the latest finished run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenFindings {
    /// The run.
    pub run: i64,
    /// Not resolved.
    pub findings: Vec<FindingRecord>,
}

/// `GET /v1/firmware/targets` and `POST /v1/firmware/import`: published images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FirmwareTargets {
    /// The images.
    pub targets: Vec<portcullis_firmware::TargetInfo>,
}

/// `POST /v1/firmware/targets`: the image published.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FirmwarePublished {
    /// The image.
    pub target: portcullis_firmware::TargetInfo,
}

/// `POST /v1/firmware/uploads`: an image staged for a signed-offline import.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FirmwareUploaded {
    /// SHA-256, hex.
    pub sha256: String,
    /// Bytes.
    pub length: u64,
}

/// `GET /v1/firmware/rollouts`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollouts {
    /// Oldest first.
    pub rollouts: Vec<RolloutStatus>,
}

/// `GET /v1/firmware/status`, `GET /v1/firmware/rollouts/{id}` (and the rollout
/// actions) and `POST /v1/firmware/refresh`: the firmware service's own types.
pub use portcullis_firmware::repo::Refreshed;
pub use portcullis_firmware::service::{DeviceVersion, FleetStatus, ModelStatus, RolloutStatus};
