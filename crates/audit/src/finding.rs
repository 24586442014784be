//! Findings: what each check reports, with why it matters, how to fix it and the
//! baseline it violates.

use portcullis_store::FindingRecord;
use serde::Serialize;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// For the record.
    Info,
    /// Worth fixing.
    Low,
    /// Fix soon.
    Medium,
    /// Fix now.
    High,
    /// The device is probably already someone else's.
    Critical,
}

impl Severity {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Self {
        match s {
            "critical" => Self::Critical,
            "high" => Self::High,
            "medium" => Self::Medium,
            "low" => Self::Low,
            _ => Self::Info,
        }
    }
}

/// ETSI EN 303 645 V2.1.1 provisions and OWASP IoT Top 10 (2018) items the checks cite.
pub mod baseline {
    /// Unique per-device passwords, no universal defaults.
    pub const ETSI_5_1_1: &str = "ETSI EN 303 645 5.1-1 (no universal default passwords)";
    /// Keep software updated.
    pub const ETSI_5_3_2: &str = "ETSI EN 303 645 5.3-2 (secure update mechanism)";
    /// Timely security updates.
    pub const ETSI_5_3_8: &str = "ETSI EN 303 645 5.3-8 (security updates shall be timely)";
    /// No hard-coded critical security parameters.
    pub const ETSI_5_4_3: &str = "ETSI EN 303 645 5.4-3 (no hard-coded critical security parameters)";
    /// Communicate securely.
    pub const ETSI_5_5_1: &str = "ETSI EN 303 645 5.5-1 (best-practice cryptography to communicate securely)";
    /// Manage critical security parameters.
    pub const ETSI_5_5_8: &str = "ETSI EN 303 645 5.5-8 (secure management of critical security parameters)";
    /// Disable unused interfaces.
    pub const ETSI_5_6_1: &str = "ETSI EN 303 645 5.6-1 (unused network interfaces disabled)";
    /// Minimise unauthenticated disclosure.
    pub const ETSI_5_6_2: &str =
        "ETSI EN 303 645 5.6-2 (minimise unauthenticated disclosure of security-relevant information)";
    /// OWASP I1.
    pub const OWASP_I1: &str = "OWASP IoT Top 10 I1 (weak, guessable or hardcoded passwords)";
    /// OWASP I2.
    pub const OWASP_I2: &str = "OWASP IoT Top 10 I2 (insecure network services)";
    /// OWASP I4.
    pub const OWASP_I4: &str = "OWASP IoT Top 10 I4 (lack of secure update mechanism)";
    /// OWASP I5.
    pub const OWASP_I5: &str = "OWASP IoT Top 10 I5 (use of insecure or outdated components)";
    /// OWASP I7.
    pub const OWASP_I7: &str = "OWASP IoT Top 10 I7 (insecure data transfer and storage)";
    /// OWASP I8.
    pub const OWASP_I8: &str = "OWASP IoT Top 10 I8 (lack of device management)";
    /// OWASP I9.
    pub const OWASP_I9: &str = "OWASP IoT Top 10 I9 (insecure default settings)";
}

/// One finding on one device.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The device.
    pub device: String,
    /// Stable key on that device, e.g. `exposure/tcp/23`.
    pub key: String,
    /// The check (`exposure`, `credentials`, `plaintext`, `tls`, `identity`, `firmware`).
    pub check: &'static str,
    /// How bad.
    pub severity: Severity,
    /// One line.
    pub title: String,
    /// `address:port`, or the device id for registry findings.
    pub target: String,
    /// What was observed. Never a password.
    pub evidence: String,
    /// Why it matters.
    pub why: &'static str,
    /// How to fix it.
    pub remediation: String,
    /// Baselines violated.
    pub baselines: &'static [&'static str],
}

impl Finding {
    /// As stored, with a diff status.
    pub fn record(&self, status: &str) -> FindingRecord {
        FindingRecord {
            device: self.device.clone(),
            key: self.key.clone(),
            check: self.check.to_owned(),
            severity: self.severity.as_str().to_owned(),
            title: self.title.clone(),
            target: self.target.clone(),
            evidence: self.evidence.clone(),
            why: self.why.to_owned(),
            remediation: self.remediation.clone(),
            baselines: self.baselines.iter().map(|s| (*s).to_owned()).collect(),
            status: status.to_owned(),
        }
    }
}
