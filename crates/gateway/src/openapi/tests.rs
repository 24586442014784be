use http::HeaderMap;
use serde_json::json;

use super::check::*;
use super::*;

#[test]
fn path_segments_split_and_decode() {
    let segs = |p| path_segments(p).map(|v| v.into_iter().map(|c| c.into_owned()).collect::<Vec<_>>());
    assert_eq!(
        segs("devices/cam-01/telemetry"),
        Some(vec!["devices".into(), "cam-01".into(), "telemetry".into()])
    );
    assert_eq!(segs(""), Some(vec![String::new()]));
    assert_eq!(segs("a/"), Some(vec!["a".into(), String::new()]));
    assert_eq!(segs("a%2Fb/c%20d"), Some(vec!["a/b".into(), "c d".into()]));
    assert_eq!(segs("%E2%9C%93/x"), Some(vec!["\u{2713}".into(), "x".into()]));
    assert_eq!(segs("ok/%FF"), None);
    assert!(matches!(path_segments("a/b").unwrap()[0], std::borrow::Cow::Borrowed(_)));
}

const TELEMETRY: &str = include_str!("../../../../examples/telemetry.openapi.yaml");
const ME: Caller<'static> = Caller { device: "cam-01", group: "cameras" };

/// Found by the openapi_load fuzz target: a '}' before the '{' in one segment sliced
/// the template backwards and panicked. Every malformed template is an error.
#[test]
fn malformed_path_templates_are_errors_not_panics() {
    for template in ["/sites/s}{tei/devices", "/a/}{", "/a/{x", "/a/x}", "/a/{}", "/a/{x}{y}", "/a/}{x}"] {
        let doc = format!(
            r#"{{"openapi":"3.1.0","info":{{"title":"t","version":"1"}},"paths":{{"{template}":{{"get":{{"responses":{{"200":{{"description":"ok"}}}}}}}}}}}}"#
        );
        assert!(Spec::load(doc.as_bytes(), &SpecOptions::default()).is_err(), "{template} loaded");
    }
}

fn spec() -> Spec {
    Spec::load(TELEMETRY.as_bytes(), &SpecOptions::default()).unwrap()
}

fn check<'s>(
    s: &'s Spec,
    m: Method,
    path: &str,
    q: Option<&str>,
    h: &[(&str, &str)],
) -> Result<&'s str, Violation> {
    let mut headers = HeaderMap::new();
    for (k, v) in h {
        headers.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    s.check(&m, path, q, &headers, ME).map(|o| o.id()).map_err(|(_, v)| v)
}

fn body(s: &Spec, path: &str, m: Method, ct: &str, b: &str) -> Result<(), Violation> {
    let op = s.check(&m, path, None, &HeaderMap::new(), ME).map_err(|(_, v)| v)?;
    let plan = s.body_plan(op, Some(ct), !b.is_empty())?;
    plan.check(b.as_bytes())
}

/// The fast accept path never accepts what the general validator rejects: thousands
/// of bodies mixing good and bad values for every property of the telemetry schema.
#[test]
fn fast_path_accepts_only_what_the_validator_accepts() {
    let s = spec();
    let op = s.check(&Method::POST, "/api/devices/cam-01/telemetry", None, &HeaderMap::new(), ME).unwrap();
    let plan = s.body_plan(op, Some("application/json"), true).unwrap();
    let Plan::Json(validator, _, Some(fast)) = plan.0 else { panic!("the telemetry schema has a fast path") };
    let pool: Vec<(&str, Vec<&str>)> = vec![
        (
            "temperature",
            vec!["21.5", "-50", "150", "150.0001", "-50.5", "1e2", "\"20\"", "null", "true", "0"],
        ),
        ("humidity", vec!["40.25", "null", "100", "101", "-0.0", "\"x\"", "[]", "0"]),
        (
            "taken_at",
            vec![
                "\"2026-11-25T10:00:00Z\"",
                "\"2026-11-25T10:00:00.5+01:00\"",
                "\"2026-11-25t10:00:00z\"",
                "\"2026-02-29T10:00:00Z\"",
                "\"2024-02-29T23:59:60Z\"",
                "\"2026-11-25T24:00:00Z\"",
                "\"2026-11-25\"",
                "5",
            ],
        ),
        (
            "sequence",
            vec![
                "0",
                "184467",
                "-1",
                "1.0",
                "9223372036854775807",
                "9223372036854775808",
                "9007199254740993",
                "\"1\"",
            ],
        ),
        ("battery", vec!["0", "100", "101", "\"external\"", "\"internal\"", "50.5", "null", "-1"]),
        (
            "tags",
            vec![
                "[]",
                "[\"a\"]",
                "[\"lobby\", \"north\", \"floor-2\", \"door-east\", \"ceiling\"]",
                "[1]",
                "[\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"]",
                "[\"é\\u00e9\"]",
                "[\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\"]",
                "{}",
            ],
        ),
        ("source", vec!["\"10.20.30.40\"", "\"010.2.3.4\"", "\"256.1.1.1\"", "\"1.2.3\"", "\"::1\"", "null"]),
        ("extra", vec!["1"]),
    ];
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let (mut accepted, mut valid) = (0, 0);
    for _ in 0..20_000 {
        let mut fields = Vec::new();
        for (name, values) in &pool {
            // Each property present two times in three (the extra one rarely).
            let present = if *name == "extra" { next(20) == 0 } else { next(3) != 0 };
            if present {
                fields.push(format!("\"{name}\": {}", values[next(values.len())]));
            }
        }
        let body = format!("{{{}}}", fields.join(", "));
        let full = crate::strictjson::from_slice(body.as_bytes()).is_ok_and(|v| validator.is_valid(&v));
        valid += usize::from(full);
        if fast.accepts(body.as_bytes()) {
            accepted += 1;
            assert!(full, "fast path accepted what the validator rejects: {body}");
        }
    }
    // The pool is mostly edge cases the fast path leaves to the validator on purpose
    // (lower-case `t`/`z`, leap seconds, integers beyond 2^53, escapes); the plain
    // valid bodies take it.
    assert!(valid > 100 && accepted * 4 >= valid, "fast path accepted {accepted} of {valid} valid bodies");
    let reading = br#"{"temperature": 21.5, "humidity": 40.25, "taken_at": "2026-11-25T10:00:00Z", "sequence": 184467, "battery": 87, "tags": ["lobby", "north", "floor-2", "door-east", "ceiling"], "source": "10.20.30.40"}"#;
    assert!(fast.accepts(reading), "the benchmark's reading takes the fast path");
}

#[test]
fn remembered_parameter_values_are_only_the_valid_ones() {
    let s = spec();
    for _ in 0..3 {
        assert!(check(&s, Method::GET, "/api/devices/cam-01/telemetry", Some("limit=5"), &[]).is_ok());
        let v = check(&s, Method::GET, "/api/devices/cam-01/telemetry", Some("limit=500"), &[]).unwrap_err();
        assert_eq!(v.status, StatusCode::BAD_REQUEST);
    }
    // A reloaded document's parameters start with nothing remembered.
    let again = spec();
    let v = check(&again, Method::GET, "/api/devices/cam-01/telemetry", Some("limit=0"), &[]).unwrap_err();
    assert_eq!(v.status, StatusCode::BAD_REQUEST);
}

#[test]
fn loads_yaml_with_refs_and_base_from_servers() {
    let s = spec();
    assert_eq!(s.version(), "3.0.3");
    assert_eq!(s.operations(), 5);
    assert_eq!(s.base_path(), "/api");
}

#[test]
fn paths_and_methods() {
    let s = spec();
    assert_eq!(check(&s, Method::GET, "/api/devices/cam-01/telemetry", None, &[]).unwrap(), "listTelemetry");
    let v = check(&s, Method::GET, "/api/nothing", None, &[]).unwrap_err();
    assert_eq!((v.status, v.reason), (StatusCode::NOT_FOUND, "no_operation"));
    let v = check(&s, Method::GET, "/devices/cam-01/telemetry", None, &[]).unwrap_err();
    assert_eq!(v.status, StatusCode::NOT_FOUND, "paths are under the servers base");
    let v = check(&s, Method::DELETE, "/api/devices/cam-01/telemetry", None, &[]).unwrap_err();
    assert_eq!(v.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(v.allow.as_deref(), Some("GET, POST"));
}

#[test]
fn path_parameters_are_typed_and_bound() {
    let s = spec();
    // Authorization comes first: a value that is not the caller is 403 whatever its shape.
    let v = check(&s, Method::GET, "/api/devices/Bad_Name/telemetry", None, &[]).unwrap_err();
    assert_eq!(v.status, StatusCode::FORBIDDEN);
    assert_eq!(v.detail, "path/device must name the calling device (cam-01)");
    let v = check(&s, Method::GET, "/api/devices/cam-02/telemetry", None, &[]).unwrap_err();
    assert_eq!((v.status, v.reason), (StatusCode::FORBIDDEN, "binding_mismatch"));
    assert!(v.always_enforced);
    assert_eq!(check(&s, Method::GET, "/api/firmware/1.2.3", None, &[]).unwrap(), "getFirmware");
    let v = check(&s, Method::GET, "/api/firmware/1.2", None, &[]).unwrap_err();
    assert!(v.detail.starts_with("path/version: "), "{}", v.detail);
}

#[test]
fn operation_groups() {
    let s = spec();
    let h = HeaderMap::new();
    let other = Caller { device: "t-1", group: "thermostats" };
    let (_, v) = s.check(&Method::GET, "/api/firmware/1.2.3", None, &h, other).unwrap_err();
    assert_eq!((v.status, v.reason), (StatusCode::FORBIDDEN, "group_denied"));
}

#[test]
fn query_header_cookie_parameters() {
    let s = spec();
    let p = "/api/devices/cam-01/telemetry";
    assert!(check(&s, Method::GET, p, Some("limit=10&fields=temperature&fields=humidity"), &[]).is_ok());
    assert!(check(&s, Method::GET, p, Some("since=2026-11-25T10%3A00%3A00Z&unknown=1"), &[]).is_ok());
    let v = check(&s, Method::GET, p, Some("limit=1000"), &[]).unwrap_err();
    assert_eq!(v.detail, "query/limit: 1000 is greater than the maximum of 100");
    let v = check(&s, Method::GET, p, Some("limit=ten"), &[]).unwrap_err();
    assert!(v.detail.starts_with("query/limit: \"ten\" is not of type \"integer\""), "{}", v.detail);
    let v = check(&s, Method::GET, p, Some("limit=1&limit=2"), &[]).unwrap_err();
    assert!(v.detail.contains("given 2 times"), "{}", v.detail);
    let v = check(&s, Method::GET, p, Some("fields=pressure"), &[]).unwrap_err();
    assert!(v.detail.starts_with("query/fields/0: "), "{}", v.detail);
    let v = check(&s, Method::GET, p, Some("since=yesterday"), &[]).unwrap_err();
    assert!(v.detail.contains("date-time"), "{}", v.detail);
    let v = check(&s, Method::GET, p, Some("limit=0&since=x"), &[]).unwrap_err();
    assert_eq!(v.params.len(), 2);
    assert!(v.detail.ends_with("(and 1 more)"), "{}", v.detail);
    assert!(check(&s, Method::GET, p, None, &[("cookie", "a=b; locale=de")]).is_ok());
    let v = check(&s, Method::GET, p, None, &[("cookie", "locale=fr")]).unwrap_err();
    assert!(v.detail.starts_with("cookie/locale: "), "{}", v.detail);
    assert!(!v.detail.contains("fr"), "cookie values are not echoed: {}", v.detail);
    let v = check(&s, Method::POST, p, None, &[("x-trace-id", "not-a-uuid")]).unwrap_err();
    assert!(v.detail.starts_with("header/X-Trace-Id: "), "{}", v.detail);
    assert!(!v.detail.contains("not-a-uuid"), "header values are not echoed: {}", v.detail);
    assert!(
        check(&s, Method::POST, p, None, &[("x-trace-id", "0b6f3c1e-8a4d-4f7a-9a57-3f0e2d1c4b5a")]).is_ok()
    );
}

#[test]
fn strict_query() {
    let opts = SpecOptions { strict_query: true, ..SpecOptions::default() };
    let s = Spec::load(TELEMETRY.as_bytes(), &opts).unwrap();
    let v =
        check(&s, Method::GET, "/api/devices/cam-01/telemetry", Some("limit=1&debug=1"), &[]).unwrap_err();
    assert_eq!(v.detail, "query/debug: not a parameter of this operation");
}

#[test]
fn json_bodies() {
    let s = spec();
    let p = "/api/devices/cam-01/telemetry";
    let ok = r#"{"temperature": 21.5, "humidity": null, "taken_at": "2026-11-25T10:00:00Z", "battery": "external"}"#;
    assert!(body(&s, p, Method::POST, "application/json", ok).is_ok());
    assert!(body(&s, p, Method::POST, "application/json; charset=utf-8", ok).is_ok());
    let v = body(
        &s,
        p,
        Method::POST,
        "application/json",
        r#"{"temperature": 1000, "taken_at": "2026-11-25T10:00:00Z"}"#,
    )
    .unwrap_err();
    assert_eq!(v.detail, "body/temperature: 1000 is greater than the maximum of 150");
    let v =
        body(&s, p, Method::POST, "application/json", r#"{"temperature": 1, "taken_at": "x", "extra": 1}"#)
            .unwrap_err();
    assert_eq!(v.params.len(), 2, "{:?}", v.params);
    let v = body(&s, p, Method::POST, "application/json", r#"{"temperature": 1}"#).unwrap_err();
    assert!(v.detail.contains("\"taken_at\" is a required property"), "{}", v.detail);
    let v = body(
        &s,
        p,
        Method::POST,
        "application/json",
        r#"{"temperature": 1, "taken_at": "2026-11-25T10:00:00Z", "sequence": 9223372036854775808}"#,
    )
    .unwrap_err();
    assert!(v.detail.starts_with("body/sequence: "), "int64 bound: {}", v.detail);
    let v = body(
        &s,
        p,
        Method::POST,
        "application/json",
        r#"{"temperature": 1, "taken_at": "2026-11-25T10:00:00Z", "battery": 101}"#,
    )
    .unwrap_err();
    assert!(v.detail.starts_with("body/battery: "), "oneOf: {}", v.detail);
    let v = body(
        &s,
        p,
        Method::POST,
        "application/json",
        r#"{"temperature": 1, "taken_at": "2026-11-25T10:00:00Z", "source": "300.1.1.1"}"#,
    )
    .unwrap_err();
    assert!(v.detail.starts_with("body/source: "), "ipv4: {}", v.detail);
    let v = body(&s, p, Method::POST, "application/json", "{not json").unwrap_err();
    assert!(v.detail.starts_with("body: not valid JSON"), "{}", v.detail);
    let v = body(&s, p, Method::POST, "text/plain", ok).unwrap_err();
    assert_eq!(v.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let v = body(&s, p, Method::POST, "application/json", "").unwrap_err();
    assert_eq!(v.detail, "body: request body is required");
    let v = body(&s, p, Method::GET, "application/json", "{}").unwrap_err();
    assert_eq!(v.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "GET declares no body");
}

#[test]
fn form_bodies() {
    let s = spec();
    let p = "/api/devices/cam-01/config";
    let ct = "application/x-www-form-urlencoded";
    assert!(body(&s, p, Method::PUT, ct, "interval=60&mode=eco").is_ok());
    let v = body(&s, p, Method::PUT, ct, "interval=5").unwrap_err();
    assert_eq!(v.detail, "body/interval: 5 is less than the minimum of 10");
    let v = body(&s, p, Method::PUT, ct, "mode=eco").unwrap_err();
    assert!(v.detail.contains("\"interval\" is a required property"), "{}", v.detail);
}

#[test]
fn openapi_31_and_json() {
    let doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "paths": {"/items/{id}": {"put": {
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer", "format": "int32"}}],
            "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/$defs/Item"}}}},
            "x-portcullis-action": "log"
        }}},
        "$defs": {"Item": {"type": "object", "properties": {
            "name": {"type": ["string", "null"], "minLength": 1},
            "id": {"type": "string", "format": "uuid"}
        }, "additionalProperties": false}}
    });
    let s = Spec::load(doc.to_string().as_bytes(), &SpecOptions::default()).unwrap();
    let op = s.check(&Method::PUT, "/items/7", None, &HeaderMap::new(), ME).unwrap();
    assert_eq!(op.id(), "PUT /items/{id}");
    assert_eq!(op.action(), Some(Action::Log));
    let plan = s.body_plan(op, Some("application/json"), true).unwrap();
    assert!(plan.check(br#"{"name": null}"#).is_ok());
    assert!(plan.check(br#"{"name": ""}"#).is_err());
    assert!(plan.check(br#"{"id": "nope"}"#).is_err());
    assert!(plan.check(br#"{"other": 1}"#).is_err());
    let (_, v) = s.check(&Method::PUT, "/items/4294967296", None, &HeaderMap::new(), ME).unwrap_err();
    assert!(v.detail.starts_with("path/id: "), "{}", v.detail);
}

#[test]
fn secret_values_are_never_echoed() {
    let doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "paths": {"/login": {"post": {
            "parameters": [{"name": "pin", "in": "query", "schema": {"type": "string", "format": "password", "maxLength": 4}}],
            "requestBody": {"content": {"application/json": {"schema": {"type": "object", "properties": {
                "user": {"type": "string", "maxLength": 3},
                "password": {"type": "string", "format": "password", "minLength": 30},
                "api_key": {"type": "string", "writeOnly": true, "pattern": "^k_"}
            }}}}}
        }}}
    });
    let s = Spec::load(doc.to_string().as_bytes(), &SpecOptions::default()).unwrap();
    let h = HeaderMap::new();
    let (_, v) = s.check(&Method::POST, "/login", Some("pin=hunter22"), &h, ME).unwrap_err();
    assert!(v.detail.starts_with("query/pin: ") && !v.detail.contains("hunter22"), "{}", v.detail);
    let op = s.check(&Method::POST, "/login", None, &h, ME).unwrap();
    let plan = s.body_plan(op, Some("application/json"), true).unwrap();
    let v = plan.check(br#"{"user": "alice", "password": "hunter2", "api_key": "sk-live-123"}"#).unwrap_err();
    assert_eq!(v.params.len(), 3, "{:?}", v.params);
    let all = format!("{:?}", v.params);
    assert!(all.contains("alice"), "ordinary values are echoed: {all}");
    assert!(!all.contains("hunter2") && !all.contains("sk-live-123"), "secret echoed: {all}");
}

#[test]
fn refuses_what_it_cannot_check() {
    let load =
        |y: &str| Spec::load(y.as_bytes(), &SpecOptions::default()).map(|_| ()).unwrap_err().to_string();
    assert!(load("swagger: '2.0'\npaths: {}\n").contains("Swagger 2.0"));
    assert!(load("openapi: 3.2.0\npaths: {}\n").contains("unsupported OpenAPI version"));
    assert!(
        load("openapi: 3.0.0\npaths:\n  /a:\n    get:\n      parameters: [{$ref: 'other.yaml#/p'}]\n")
            .contains("external $ref")
    );
    assert!(load("openapi: 3.0.0\npaths:\n  /a/{id}:\n    get: {}\n").contains("not declared"));
    assert!(load("openapi: 3.0.0\npaths:\n  /a:\n    get:\n      parameters: [{name: f, in: query, style: deepObject, schema: {type: object}}]\n").contains("not supported"));
    assert!(
        load("openapi: 3.0.0\npaths:\n  /a:\n    get:\n      x-portcullis-action: maybe\n")
            .contains("x-portcullis-action")
    );
    assert!(load("openapi: 3.0.0\n: [").contains("YAML"));
    assert!(
        load("openapi: 3.0.0\npaths:\n  /a:\n    get:\n      parameters: [{$ref: '#/nowhere'}]\n")
            .contains("points nowhere")
    );
    assert!(load("openapi: 3.0.0\ncomponents: {parameters: {a: {$ref: '#/components/parameters/a'}}}\npaths:\n  /a:\n    get:\n      parameters: [{$ref: '#/components/parameters/a'}]\n").contains("cycle"));
}
