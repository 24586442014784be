//! The fleet audit: probes the owner's own inventory devices for open ports their profile
//! does not allow, default credentials, plaintext protocols and TLS problems, checks the
//! registry for identity hygiene, and tracks findings from run to run.
//!
//! Targets come only from the registry: [`Auditor::plan`] resolves a request to the host
//! addresses of inventory devices and refuses anything else. Probes are paced by a global
//! rate cap and a per-device concurrency cap, and each one is written to the run's probe
//! log. Passwords are never written anywhere: a finding names only the user.

pub mod creds;
mod engine;
pub mod finding;
pub mod mud;
pub mod ports;
mod probe;
pub mod report;
mod rules;
mod scan;
pub mod ssh;
pub mod tlscheck;
pub mod wire;

pub use engine::{
    AuditError, AuditRequest, Auditor, FirmwareView, Outdated, Plan, PlanView, PlannedDevice, ProgressView,
    Started, compress, limits,
};
pub use portcullis_store::Profile;
pub use portcullis_store::profile;
