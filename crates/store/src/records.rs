//! The documents capabilities keep in the registry, typed: firmware rollouts and each
//! device's firmware status and reports, and audit runs' scope and summary. The owning
//! crate decides what they mean (`portcullis-firmware` stages a rollout,
//! `portcullis-audit` writes a summary); the store keeps them, so every implementation
//! (SQLite today, PostgreSQL next) reads and writes the same shape.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    /// Admitting devices of the current stage.
    Active,
    /// Admitting nobody new (by hand or by the failure rate); devices already updated stay.
    Paused,
    /// Stopped for good.
    Aborted,
}

/// A firmware rollout as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RolloutRecord {
    /// Its id (the store's).
    #[serde(default)]
    pub id: i64,
    /// Hardware model.
    pub hardware: String,
    /// Version offered.
    pub version: String,
    /// TUF target path of the image.
    pub target: String,
    /// Only devices of this group, if set.
    #[serde(default)]
    pub group: Option<String>,
    /// Stage percentages, increasing, the last 100.
    pub stages: Vec<u8>,
    /// Index of the current stage in `stages`.
    pub stage: usize,
    /// Failure share (0..1) above which the rollout pauses itself.
    pub max_failure_rate: f64,
    /// Reporting devices needed before the failure share can pause the rollout.
    #[serde(default = "default_min_reports")]
    pub min_reports: usize,
    /// Its state.
    pub state: RolloutState,
    /// Why it is paused or aborted.
    #[serde(default)]
    pub reason: Option<String>,
    /// The eligible devices at creation, in rank order.
    pub population: Vec<String>,
    /// Creation time, RFC 3339.
    pub created_at: String,
}

/// Reporting devices needed before a rollout pauses itself, unless set at creation.
pub const DEFAULT_MIN_REPORTS: usize = 10;

fn default_min_reports() -> usize {
    DEFAULT_MIN_REPORTS
}

/// A device's report on an update: as the device sends it, and as stored once the
/// server checked it and filled in `device` (the certificate's) and `at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirmwareReport {
    /// `downloading`, `installing`, `confirmed`, `failed`, `rolled-back`.
    pub state: String,
    /// Hardware model.
    pub hardware: String,
    /// Version running when it reported.
    pub installed: String,
    /// Version the report is about.
    pub version: String,
    /// Why (free text, capped at 500 characters when stored).
    #[serde(default)]
    pub reason: String,
    /// The rollout that directed the update.
    #[serde(default)]
    pub rollout: Option<i64>,
    /// The device: as claimed (must be the certificate's), as stored the certificate's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// When the server took it, RFC 3339 (set by the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

/// The outcome of a device's last report, kept with its firmware status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirmwareOutcome {
    /// The report's state.
    pub state: String,
    /// The version it was about.
    pub version: String,
    /// Why.
    #[serde(default)]
    pub reason: String,
    /// Its rollout.
    #[serde(default)]
    pub rollout: Option<i64>,
    /// When, RFC 3339.
    pub at: String,
}

/// What the server knows of one device's firmware.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FirmwareStatus {
    /// Hardware model.
    pub hardware: String,
    /// Running version.
    pub installed: String,
    /// Last report.
    #[serde(default)]
    pub last: Option<FirmwareOutcome>,
    /// Rollout of the last report.
    #[serde(default)]
    pub rollout: Option<i64>,
}

/// What an audit run was asked to cover and how hard to push, as the operator asks it
/// and as it is recorded (never the credentials themselves: only how many the operator
/// supplied).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditScope {
    /// Only this device.
    #[serde(default)]
    pub device: Option<String>,
    /// Only this group.
    #[serde(default)]
    pub group: Option<String>,
    /// Only these addresses; each must be an inventory device's address.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Port expression (`default`, `1-1024,8080`, `all`).
    #[serde(default)]
    pub ports: Option<String>,
    /// Plan only.
    #[serde(default)]
    pub dry_run: bool,
    /// Global cap on probes (connection attempts) per second.
    #[serde(default)]
    pub rate: Option<u32>,
    /// Concurrent probes per device.
    #[serde(default)]
    pub per_device: Option<usize>,
    /// TCP connect timeout in milliseconds.
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    /// Login attempts per device, over all its services.
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Skip the default-credential check.
    #[serde(default)]
    pub no_credentials: bool,
    /// Exposure check alone: the connect scan, without service identification, TLS
    /// checks or logins.
    #[serde(default)]
    pub scan_only: bool,
    /// Certificates expiring within this many days are findings.
    #[serde(default)]
    pub cert_expiry_days: Option<u32>,
    /// How many credentials the operator supplied (recorded with the run).
    #[serde(default)]
    pub operator_credentials: usize,
}

/// An audit run's summary: empty while it runs (or if it was interrupted), the error if
/// it failed, the totals once it finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AuditSummary {
    /// The run failed before it could record findings.
    Failed {
        /// Why.
        error: String,
    },
    /// The run finished.
    Finished(Box<AuditTotals>),
    /// Nothing yet (running or interrupted).
    Pending {},
}

/// A finished run's totals.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditTotals {
    /// Devices in scope.
    pub devices: u64,
    /// Devices with an address to scan.
    #[serde(default)]
    pub devices_scanned: u64,
    /// The ports scanned, compressed (`22,80,8000-8100`).
    #[serde(default)]
    pub ports: String,
    /// Connection probes made.
    #[serde(default)]
    pub scan_probes: u64,
    /// Open ports found.
    #[serde(default)]
    pub open_ports: u64,
    /// Login attempts made.
    #[serde(default)]
    pub login_attempts: u64,
    /// Wall time.
    #[serde(default)]
    pub seconds: f64,
    /// Probe rate reached.
    #[serde(default)]
    pub probes_per_second: f64,
    /// Findings by status.
    #[serde(default)]
    pub findings: FindingCounts,
    /// Findings not resolved, by severity.
    #[serde(default)]
    pub open_by_severity: BTreeMap<String, u64>,
    /// Each check: `ran`, `skipped …` or `failed: …`.
    #[serde(default)]
    pub checks: BTreeMap<String, String>,
    /// Checks that applied but could not be made.
    #[serde(default)]
    pub not_tested: Vec<NotTested>,
    /// Notes on the plan (limits applied, addresses skipped).
    #[serde(default)]
    pub notes: Vec<String>,
    /// Where the probe log was written.
    #[serde(default)]
    pub probe_log: Option<String>,
}

/// Findings of a run by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindingCounts {
    /// Not seen in the previous run.
    pub new: u64,
    /// Seen in the previous run too.
    pub still_open: u64,
    /// Seen before, gone now.
    pub resolved: u64,
}

/// A check that applied to a service but could not be made, and why: reported in the
/// run and the report, never a finding, never silence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotTested {
    /// The device.
    pub device: String,
    /// `ip:port`.
    pub target: String,
    /// The check (`credentials`).
    pub check: String,
    /// Why it was not made.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_read_back_as_their_kind() {
        let pending: AuditSummary = serde_json::from_str("{}").unwrap();
        assert_eq!(pending, AuditSummary::Pending {});
        assert_eq!(serde_json::to_string(&pending).unwrap(), "{}");
        let failed: AuditSummary = serde_json::from_str(r#"{"error":"boom"}"#).unwrap();
        assert_eq!(failed, AuditSummary::Failed { error: "boom".into() });
        let done: AuditSummary =
            serde_json::from_str(r#"{"devices":2,"findings":{"new":1,"still_open":0,"resolved":3}}"#)
                .unwrap();
        let AuditSummary::Finished(t) = done else { panic!("not finished: {done:?}") };
        assert_eq!((t.devices, t.findings.new, t.findings.resolved), (2, 1, 3));
    }
}
