//! What became of each request, counted once: the `outcome` label of
//! `portcullis_gateway_requests_total{route, outcome}` and, grouped, the route's `counts`
//! in `describe` (the admin API's `gateway routes`). Both read the same counters, resolved
//! per route when a table is loaded, so the hot path increments one atomic and never
//! looks a series up by string.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// The outcome of one request on a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Sent upstream and answered.
    Forwarded,
    /// A path some backend would read differently (dot segments, encoded `/`, …).
    BadPath,
    /// No (valid) device certificate.
    Unauthenticated,
    /// A certificate of a suspended or revoked device.
    Forbidden,
    /// Over the per-address limit on requests that fail authentication.
    UnauthenticatedRateLimited,
    /// Over the route's per-device rate.
    RateLimited,
    /// The path names another device than the caller.
    BindingMismatch,
    /// The device's group may not use the route.
    GroupDenied,
    /// A header the gateway validates is given twice.
    DuplicateHeader,
    /// Body over `max_body_bytes`.
    BodyTooLarge,
    /// The body could not be read.
    BadBody,
    /// No operation of the OpenAPI document matches.
    NoOperation,
    /// The path exists, not with this method.
    MethodNotAllowed,
    /// A content type the operation does not accept.
    UnsupportedMediaType,
    /// Parameters (path, query, headers) that fail the schema.
    InvalidParams,
    /// A body that fails the schema.
    InvalidBody,
    /// The upstream failed.
    UpstreamError,
    /// The upstream did not answer in time.
    UpstreamTimeout,
}

impl Outcome {
    /// Every outcome, in the order of [`Outcome::index`].
    pub(crate) const ALL: [Outcome; 18] = [
        Self::Forwarded,
        Self::BadPath,
        Self::Unauthenticated,
        Self::Forbidden,
        Self::UnauthenticatedRateLimited,
        Self::RateLimited,
        Self::BindingMismatch,
        Self::GroupDenied,
        Self::DuplicateHeader,
        Self::BodyTooLarge,
        Self::BadBody,
        Self::NoOperation,
        Self::MethodNotAllowed,
        Self::UnsupportedMediaType,
        Self::InvalidParams,
        Self::InvalidBody,
        Self::UpstreamError,
        Self::UpstreamTimeout,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The metric label and access-log `outcome`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::BadPath => "bad_path",
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::UnauthenticatedRateLimited => "unauthenticated_rate_limited",
            Self::RateLimited => "rate_limited",
            Self::BindingMismatch => "binding_mismatch",
            Self::GroupDenied => "group_denied",
            Self::DuplicateHeader => "duplicate_header",
            Self::BodyTooLarge => "body_too_large",
            Self::BadBody => "bad_body",
            Self::NoOperation => "no_operation",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::InvalidParams => "invalid_params",
            Self::InvalidBody => "invalid_body",
            Self::UpstreamError => "upstream_error",
            Self::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// The outcome of an OpenAPI violation, by its reason.
    pub(crate) fn of_violation(reason: &str) -> Self {
        Self::ALL.into_iter().find(|o| o.label() == reason && o.is_violation()).unwrap_or(Self::InvalidParams)
    }

    fn is_violation(self) -> bool {
        matches!(
            self,
            Self::BindingMismatch
                | Self::GroupDenied
                | Self::BodyTooLarge
                | Self::BadBody
                | Self::NoOperation
                | Self::MethodNotAllowed
                | Self::UnsupportedMediaType
                | Self::InvalidParams
                | Self::InvalidBody
        )
    }

    /// The key it is counted under in `describe`'s coarser `counts`.
    fn count_key(self) -> &'static str {
        match self {
            Self::UnauthenticatedRateLimited => "rate_limited",
            Self::DuplicateHeader | Self::BadBody | Self::InvalidParams | Self::InvalidBody => {
                "invalid_request"
            }
            other => other.label(),
        }
    }
}

/// The keys of `describe`'s `counts`, in order.
const COUNT_KEYS: [&str; 15] = [
    "forwarded",
    "unauthenticated",
    "forbidden",
    "group_denied",
    "rate_limited",
    "body_too_large",
    "bad_path",
    "binding_mismatch",
    "no_operation",
    "method_not_allowed",
    "unsupported_media_type",
    "invalid_request",
    "violations_logged",
    "upstream_error",
    "upstream_timeout",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) route: String,
    pub(crate) outcome: &'static str,
}

/// One route's counters: its series of the requests family (one per outcome) and of
/// the violations-forwarded-in-log-mode family (one per violation).
#[derive(Debug, Default)]
pub(crate) struct RouteCounters {
    requests: Vec<Counter>,
    logged: Vec<Counter>,
}

impl RouteCounters {
    /// Resolves `route`'s series in the two families.
    pub(crate) fn bind(
        route: &str,
        requests: &Family<RequestLabels, Counter>,
        violations: &Family<RequestLabels, Counter>,
    ) -> Self {
        let series = |f: &Family<RequestLabels, Counter>, o: Outcome| {
            f.get_or_create(&RequestLabels { route: route.to_owned(), outcome: o.label() }).clone()
        };
        Self {
            requests: Outcome::ALL.iter().map(|&o| series(requests, o)).collect(),
            logged: Outcome::ALL
                .iter()
                .map(|&o| if o.is_violation() { series(violations, o) } else { Counter::default() })
                .collect(),
        }
    }

    /// Counts one request.
    pub(crate) fn count(&self, o: Outcome) {
        if let Some(c) = self.requests.get(o.index()) {
            c.inc();
        }
    }

    /// Counts a violation forwarded in log mode.
    pub(crate) fn count_logged(&self, o: Outcome) {
        if let Some(c) = self.logged.get(o.index()) {
            c.inc();
        }
    }

    /// The counts for `describe`: the same counters, grouped.
    pub(crate) fn describe(&self) -> std::collections::BTreeMap<String, u64> {
        let mut counts: Vec<(&str, u64)> = COUNT_KEYS.iter().map(|&k| (k, 0)).collect();
        let mut add = |key: &str, n: u64| {
            if let Some(slot) = counts.iter_mut().find(|(k, _)| *k == key) {
                slot.1 += n;
            }
        };
        for (o, c) in Outcome::ALL.iter().zip(&self.requests) {
            add(o.count_key(), c.get());
        }
        add("violations_logged", self.logged.iter().map(Counter::get).sum());
        counts.into_iter().map(|(k, n)| (k.to_owned(), n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_index_order_and_labels_are_unique() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(o.index(), i, "{o:?}");
        }
        let mut labels: Vec<_> = Outcome::ALL.iter().map(|o| o.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Outcome::ALL.len());
        for o in Outcome::ALL {
            assert!(COUNT_KEYS.contains(&o.count_key()), "{o:?}");
        }
    }

    #[test]
    fn one_counter_feeds_metrics_and_describe() {
        let (requests, violations) = (Family::default(), Family::default());
        let c = RouteCounters::bind("/api/", &requests, &violations);
        c.count(Outcome::Forwarded);
        c.count(Outcome::DuplicateHeader);
        c.count(Outcome::InvalidBody);
        c.count(Outcome::UnauthenticatedRateLimited);
        c.count_logged(Outcome::of_violation("invalid_body"));
        let d = c.describe();
        assert_eq!(d["forwarded"], 1);
        assert_eq!(d["invalid_request"], 2);
        assert_eq!(d["rate_limited"], 1);
        assert_eq!(d["violations_logged"], 1);
        let forwarded =
            requests.get_or_create(&RequestLabels { route: "/api/".into(), outcome: "forwarded" }).get();
        assert_eq!(forwarded, 1, "the metric is the same counter");
        assert_eq!(Outcome::of_violation("no_operation"), Outcome::NoOperation);
        assert_eq!(Outcome::of_violation("forwarded"), Outcome::InvalidParams, "not a violation reason");
    }
}
