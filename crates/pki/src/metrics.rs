//! Counters an operator alerts on, in Prometheus text format.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
pub use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Enrollment {
    via: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    to: &'static str,
}

/// The CA's counters.
pub struct Metrics {
    registry: Mutex<Registry>,
    enrollments: Family<Enrollment, Counter>,
    client_auth: Family<Outcome, Counter>,
    /// The `ok` series of `client_auth`, resolved once: every proxied request counts one,
    /// and the family's lookup takes a lock the device-port workers would share.
    client_auth_ok: Counter,
    state_changes: Family<State, Counter>,
    crl_signed: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let enrollments = Family::<Enrollment, Counter>::default();
        registry.register(
            "est_enrollments",
            "EST enrollments by route (enroll, reenroll) and outcome",
            enrollments.clone(),
        );
        let client_auth = Family::<Outcome, Counter>::default();
        registry.register(
            "client_auth",
            "Client-certificate authentications by outcome (checked per request)",
            client_auth.clone(),
        );
        let state_changes = Family::<State, Counter>::default();
        registry.register(
            "device_state_changes",
            "Device suspensions, resumptions and revocations",
            state_changes.clone(),
        );
        let crl_signed = Counter::default();
        registry.register("crl_signed", "CRLs signed", crl_signed.clone());
        let client_auth_ok = client_auth.get_or_create(&Outcome { result: "ok" }).clone();
        Self {
            registry: Mutex::new(registry),
            enrollments,
            client_auth,
            client_auth_ok,
            state_changes,
            crl_signed,
        }
    }
}

impl Metrics {
    pub(crate) fn enrollment(&self, via: &'static str, result: &'static str) {
        self.enrollments.get_or_create(&Enrollment { via, result }).inc();
    }

    pub(crate) fn client_auth(&self, result: &'static str) {
        if result == "ok" {
            self.client_auth_ok.inc();
        } else {
            self.client_auth.get_or_create(&Outcome { result }).inc();
        }
    }

    pub(crate) fn state_change(&self, to: &'static str) {
        self.state_changes.get_or_create(&State { to }).inc();
    }

    pub(crate) fn crl_signed(&self) {
        self.crl_signed.inc();
    }

    /// Lets another component register its metrics in the same registry, so `/metrics`
    /// serves one exposition.
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        if let Ok(mut r) = self.registry.lock() {
            f(&mut r);
        }
    }

    /// The Prometheus text exposition of every counter.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}
