//! Request validation against the compiled example documents with arbitrary method,
//! path, query, headers, content type and body: everything a device controls. It must
//! never panic, a request it accepts must match an operation, and a body the JSON fast
//! path accepts must be one the general validator accepts.
#![no_main]

use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use portcullis_gateway::openapi::{Caller, Spec, SpecOptions};

fn specs() -> &'static [Spec; 2] {
    static SPECS: OnceLock<[Spec; 2]> = OnceLock::new();
    SPECS.get_or_init(|| {
        let strict = SpecOptions { strict_query: true, ..SpecOptions::default() };
        [
            Spec::load(include_bytes!("../../examples/telemetry.openapi.yaml"), &SpecOptions::default())
                .expect("telemetry example compiles"),
            Spec::load(include_bytes!("../../examples/inventory.openapi.json"), &strict)
                .expect("inventory example compiles"),
        ]
    })
}

const METHODS: [Method; 6] = [Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::HEAD];

fuzz_target!(|data: &[u8]| {
    // Layout: [spec/method byte] path \n query \n content-type \n header lines... \0 body
    let Some((&sel, rest)) = data.split_first() else { return };
    let (head, body) = match rest.iter().position(|b| *b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split('\n');
    let path = lines.next().unwrap_or("/");
    let query = lines.next().filter(|q| !q.is_empty());
    let content_type = lines.next().filter(|c| !c.is_empty());
    let mut headers = HeaderMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':')
            && let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.trim().as_bytes()), HeaderValue::from_str(v.trim()))
        {
            headers.append(k, v);
        }
    }
    let spec = &specs()[usize::from(sel & 1)];
    let method = &METHODS[usize::from(sel >> 1) % METHODS.len()];
    let path = if path.starts_with('/') { path.to_owned() } else { format!("/{path}") };
    let caller = Caller { device: "cam-01", group: "cameras" };
    if let Ok(op) = spec.check(method, &path, query, &headers, caller) {
        assert!(!op.id().is_empty());
        if let Ok(plan) = spec.body_plan(op, content_type, !body.is_empty()) {
            let _ = plan.check(body);
            // The fast accept path never accepts what the general validator rejects.
            if let Some((fast, full)) = plan.fast_path_verdicts(body) {
                assert!(!fast || full, "fast path accepted an invalid body");
            }
        }
    }
});
