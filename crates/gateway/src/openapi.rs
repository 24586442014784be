//! OpenAPI 3.0 / 3.1 request validation, compiled once per load.
//!
//! A [`Spec`] is built from the document (YAML or JSON) when a route loads: every path
//! template is split into segments, every operation's parameters get a shape (scalar,
//! array, JSON content) and a compiled JSON Schema validator, and every request body
//! media type gets a validator. Per request the work is a segment match, a handful of
//! string-to-JSON coercions and the schema checks; nothing is parsed from the document
//! again.
//!
//! Schemas are validated with the `jsonschema` crate against the whole document held in
//! one registry, so internal `$ref`s resolve anywhere. OpenAPI 3.0 documents are
//! rewritten first into the JSON Schema draft 4 they extend (`nullable: true` becomes a
//! `"null"` type); 3.1 documents are draft 2020-12 as they stand. `int32`/`int64`
//! formats become numeric bounds.
//!
//! What the validator cannot check is refused when the document loads (an external
//! `$ref`, a `deepObject` parameter, a path segment with two templates): fail closed.

use std::collections::HashMap;
use std::fmt::Write as _;

use http::{HeaderMap, Method, StatusCode};
use jsonschema::{Draft, Registry, Validator};
use percent_encoding::percent_decode_str;
use portcullis_pki::InvalidParam;
use serde_json::{Map, Value, json};

/// The registry URI of the document; schemas are compiled as `$ref`s into it.
const SPEC_URI: &str = "urn:portcullis:openapi";
/// Longest chain of `$ref`s followed by hand (parameters, request bodies, path items).
const MAX_REF_HOPS: usize = 32;
/// Most violations listed in one problem document.
const MAX_REPORTED: usize = 10;
/// Longest message kept for one violation; instance values can be long.
const MAX_MESSAGE: usize = 240;

/// Why a document could not be compiled.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(String);

fn err<T>(msg: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError(msg.into()))
}

/// What happens to a request that violates the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Refuse it with a problem document (the default).
    #[default]
    Block,
    /// Forward it and record the violation: shadow mode for rolling out a document.
    Log,
}

impl Action {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "block" => Some(Self::Block),
            "log" => Some(Self::Log),
            _ => None,
        }
    }
}

/// How a document is applied to a route.
#[derive(Debug, Clone, Default)]
pub struct SpecOptions {
    /// Path the document's paths are relative to; `None` = the path of the first
    /// `servers` URL, or `/` without one.
    pub base_path: Option<String>,
    /// Refuse query parameters the operation does not declare.
    pub strict_query: bool,
}

/// A request the document does not allow.
#[derive(Debug)]
pub struct Violation {
    /// 400, 403, 404, 405, 413 or 415.
    pub status: StatusCode,
    /// Problem type slug.
    pub kind: &'static str,
    /// Metric/log reason.
    pub reason: &'static str,
    /// The first violation, with where it is.
    pub detail: String,
    /// Every violation found (at most ten).
    pub params: Vec<InvalidParam>,
    /// For 405: the methods the path has.
    pub allow: Option<String>,
    /// Authorization failures (identity binding, groups) are enforced in log mode too.
    pub always_enforced: bool,
}

impl Violation {
    fn new(status: StatusCode, kind: &'static str, reason: &'static str, detail: String) -> Self {
        Self { status, kind, reason, detail, params: Vec::new(), allow: None, always_enforced: false }
    }

    fn invalid(reason: &'static str, mut params: Vec<InvalidParam>, total: usize) -> Self {
        params.truncate(MAX_REPORTED);
        let mut detail = params.first().map(|p| format!("{}: {}", p.name, p.reason)).unwrap_or_default();
        if total > 1 {
            let _ = write!(detail, " (and {} more)", total - 1);
        }
        Self { params, ..Self::new(StatusCode::BAD_REQUEST, "invalid-request", reason, detail) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loc {
    Path,
    Query,
    Header,
    Cookie,
}

impl Loc {
    fn as_str(self) -> &'static str {
        match self {
            Self::Path => "path",
            Self::Query => "query",
            Self::Header => "header",
            Self::Cookie => "cookie",
        }
    }
}

/// The JSON type a string parameter value is read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prim {
    String,
    Integer,
    Number,
    Boolean,
    /// No single type declared: the value passes if any reading of it does.
    Any,
}

#[derive(Debug, Clone, Copy)]
enum Shape {
    Scalar(Prim),
    Array {
        item: Prim,
        explode: bool,
        delim: char,
    },
    /// `content: {application/json: …}`: the value is a JSON document.
    Json,
}

/// What a parameter is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bind {
    DeviceId,
    Group,
}

#[derive(Debug)]
struct Param {
    /// Unique among all parameters ever compiled in this process (the key of the
    /// valid-value memo; never reused, so a reload cannot inherit another's entries).
    id: u64,
    loc: Loc,
    name: String,
    /// `query/limit`, for messages.
    label: String,
    required: bool,
    shape: Shape,
    validator: Validator,
    bind: Option<Bind>,
    /// Header and cookie values are never echoed (they carry credentials).
    secret: bool,
}

#[derive(Debug)]
enum Media {
    /// The schema's validator, its secret properties, and its fast accept path when the
    /// schema is simple enough to have one.
    Json(Validator, Secrets, Option<crate::fastbody::FastSchema>),
    Form {
        validator: Validator,
        fields: HashMap<String, Shape>,
        secrets: Secrets,
    },
    /// Declared, not validated beyond its content type; streams through.
    Opaque,
}

/// Names of properties whose values are never echoed in an error: every property the
/// document marks `format: password` or `writeOnly: true`.
type Secrets = std::sync::Arc<std::collections::HashSet<String>>;

fn secret_properties(v: &Value, out: &mut std::collections::HashSet<String>) {
    match v {
        Value::Object(o) => {
            if let Some(Value::Object(props)) = o.get("properties") {
                for (name, schema) in props {
                    if schema.get("format").and_then(Value::as_str) == Some("password")
                        || schema.get("writeOnly") == Some(&Value::Bool(true))
                    {
                        out.insert(name.clone());
                    }
                }
            }
            o.values().for_each(|x| secret_properties(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| secret_properties(x, out)),
        _ => {}
    }
}

fn is_secret_schema(v: Option<&Value>) -> bool {
    v.is_some_and(|s| {
        s.get("format").and_then(Value::as_str) == Some("password")
            || s.get("writeOnly") == Some(&Value::Bool(true))
    })
}

#[derive(Debug)]
struct RequestBody {
    required: bool,
    /// Media ranges as declared (lower case), most specific first.
    media: Vec<(String, Media)>,
}

/// One operation of the document.
#[derive(Debug)]
pub struct Operation {
    id: String,
    params: Vec<Param>,
    body: Option<RequestBody>,
    action: Option<Action>,
    groups: Option<Vec<String>>,
}

impl Operation {
    /// `operationId`, or `METHOD /template` when the document gives none.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The operation's own `x-portcullis-action`, if any.
    pub fn action(&self) -> Option<Action> {
        self.action
    }
}

#[derive(Debug)]
enum PathSeg {
    Lit(String),
    /// `prefix{name}suffix`.
    Param {
        prefix: String,
        name: String,
        suffix: String,
    },
}

#[derive(Debug)]
struct PathItem {
    template: String,
    segs: Vec<PathSeg>,
    /// Literal segments count first: `/devices/me` beats `/devices/{id}`.
    literals: usize,
    ops: Vec<(Method, Operation)>,
    allow: String,
}

/// A compiled document.
#[derive(Debug)]
pub struct Spec {
    base: String,
    /// Path items by number of segments.
    by_len: HashMap<usize, Vec<PathItem>>,
    strict_query: bool,
    version: String,
    operations: usize,
}

/// What the body of a matched request needs.
#[derive(Debug)]
pub struct BodyPlan<'s>(Plan<'s>);

#[derive(Debug)]
enum Plan<'s> {
    /// Nothing to read: no body, or a declared type that is not validated (streams).
    Forward,
    /// Buffer (within the route's limit) and validate as JSON.
    Json(&'s Validator, &'s Secrets, Option<&'s crate::fastbody::FastSchema>),
    /// Buffer and validate as `application/x-www-form-urlencoded`.
    Form(&'s Validator, &'s HashMap<String, Shape>, &'s Secrets),
}

/// The caller, for identity binding and group checks.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// Device id.
    pub device: &'a str,
    /// Its group.
    pub group: &'a str,
}

// ---------------------------------------------------------------------------------------
// Loading

impl Spec {
    /// Parses and compiles a document. YAML or JSON (detected by content).
    pub fn load(bytes: &[u8], opts: &SpecOptions) -> Result<Self, SpecError> {
        let text = std::str::from_utf8(bytes).map_err(|_| SpecError("document is not UTF-8".into()))?;
        let doc: Value = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| SpecError(format!("not valid JSON: {e}")))?
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| SpecError(format!("not valid YAML: {e}")))?
        };
        Self::from_value(doc, opts)
    }

    /// Compiles a parsed document.
    pub fn from_value(mut doc: Value, opts: &SpecOptions) -> Result<Self, SpecError> {
        if doc.get("swagger").is_some() {
            return err("Swagger 2.0 is not supported; convert the document to OpenAPI 3");
        }
        let version = doc.get("openapi").and_then(Value::as_str).unwrap_or_default().to_owned();
        let draft = if version.starts_with("3.0.") {
            rewrite_30(&mut doc);
            Draft::Draft4
        } else if version.starts_with("3.1.") {
            rewrite_formats(&mut doc);
            Draft::Draft202012
        } else {
            return err(format!("unsupported OpenAPI version {version:?}: 3.0.x and 3.1.x are supported"));
        };
        let base = match &opts.base_path {
            Some(b) => normalise_base(b)?,
            None => base_from_servers(&doc)?,
        };
        let registry = Registry::new()
            .draft(draft)
            .add(SPEC_URI, draft.create_resource(doc.clone()))
            .and_then(|r| r.prepare())
            .map_err(|e| SpecError(format!("document cannot be used as a schema registry: {e}")))?;
        let mut secrets = std::collections::HashSet::new();
        secret_properties(&doc, &mut secrets);
        let mut c =
            Compiler { doc: &doc, draft, registry: &registry, operations: 0, secrets: Secrets::new(secrets) };
        let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
            return err("document has no `paths` object");
        };
        let mut by_len: HashMap<usize, Vec<PathItem>> = HashMap::new();
        for (template, item) in paths {
            let ptr = format!("/paths/{}", escape_pointer(template));
            let item = c.path_item(template, &ptr, item)?;
            let same_len = by_len.entry(item.segs.len()).or_default();
            if same_len.iter().any(|other| same_shape(&other.segs, &item.segs)) {
                return err(format!(
                    "path {template:?} is ambiguous with another template of the same shape"
                ));
            }
            same_len.push(item);
        }
        for items in by_len.values_mut() {
            items.sort_by_key(|i| std::cmp::Reverse(i.literals));
        }
        let operations = c.operations;
        Ok(Self { base, by_len, strict_query: opts.strict_query, version, operations })
    }

    /// The document's `openapi` version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Number of operations compiled.
    pub fn operations(&self) -> usize {
        self.operations
    }

    /// The base path the document's paths are under.
    pub fn base_path(&self) -> &str {
        if self.base.is_empty() { "/" } else { &self.base }
    }
}

fn normalise_base(b: &str) -> Result<String, SpecError> {
    if !b.starts_with('/') {
        return err(format!("base path {b:?} must start with '/'"));
    }
    Ok(b.trim_end_matches('/').to_owned())
}

fn base_from_servers(doc: &Value) -> Result<String, SpecError> {
    let Some(url) = doc.pointer("/servers/0/url").and_then(Value::as_str) else { return Ok(String::new()) };
    if url.contains('{') {
        return err(format!(
            "servers[0].url {url:?} has variables; set `openapi_base` on the route to say which path the API is under"
        ));
    }
    let path = match url.split_once("://") {
        Some((_, rest)) => rest.find('/').map(|i| &rest[i..]).unwrap_or("/"),
        None if url.starts_with('/') => url,
        None => return err(format!("servers[0].url {url:?} is neither absolute nor a path")),
    };
    normalise_base(path)
}

fn same_shape(a: &[PathSeg], b: &[PathSeg]) -> bool {
    a.iter().zip(b).all(|(x, y)| match (x, y) {
        (PathSeg::Lit(l), PathSeg::Lit(m)) => l == m,
        (PathSeg::Param { prefix: p, suffix: s, .. }, PathSeg::Param { prefix: q, suffix: t, .. }) => {
            p == q && s == t
        }
        _ => false,
    })
}

/// JSON pointer escaping (RFC 6901) of one reference token.
fn escape_pointer(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// A pointer as a URI fragment: everything outside the unreserved set percent-encoded.
fn fragment(ptr: &str) -> String {
    const SET: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'/').remove(b'~').remove(b'-').remove(b'.').remove(b'_');
    percent_encoding::utf8_percent_encode(ptr, SET).to_string()
}

/// OpenAPI 3.0 schema objects into draft 4: `nullable`, then the integer formats.
fn rewrite_30(v: &mut Value) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(rewrite_30),
        Value::Object(obj) => {
            obj.values_mut().for_each(rewrite_30);
            if obj.get("nullable") == Some(&Value::Bool(true)) {
                obj.remove("nullable");
                let composite = ["$ref", "allOf", "anyOf", "oneOf"].iter().any(|k| obj.contains_key(*k));
                if let Some(Value::String(t)) = obj.get_mut("type") {
                    let t = std::mem::take(t);
                    obj.insert("type".into(), json!([t, "null"]));
                    if let Some(Value::Array(e)) = obj.get_mut("enum")
                        && !e.contains(&Value::Null)
                    {
                        e.push(Value::Null);
                    }
                } else if composite {
                    let inner = std::mem::take(obj);
                    obj.insert("anyOf".into(), json!([{"type": "null"}, Value::Object(inner)]));
                }
            }
            int_format_bounds(obj);
        }
        _ => {}
    }
}

fn rewrite_formats(v: &mut Value) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(rewrite_formats),
        Value::Object(obj) => {
            obj.values_mut().for_each(rewrite_formats);
            int_format_bounds(obj);
        }
        _ => {}
    }
}

/// `format: int32|int64` is a range; JSON Schema formats only check strings, so the
/// range is added as bounds (beside any the schema has).
fn int_format_bounds(obj: &mut Map<String, Value>) {
    let (lo, hi) = match obj.get("format").and_then(Value::as_str) {
        Some("int32") => (json!(i32::MIN), json!(i32::MAX)),
        Some("int64") => (json!(i64::MIN), json!(i64::MAX)),
        _ => return,
    };
    let bound = json!({"minimum": lo, "maximum": hi});
    match obj.get_mut("allOf") {
        Some(Value::Array(all)) => all.push(bound),
        _ => {
            obj.insert("allOf".into(), json!([bound]));
        }
    }
}

pub(crate) fn uuid_format(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// RFC 3339 `full-date`: `YYYY-MM-DD`, ASCII digits only, a day that exists.
pub(crate) fn date_format(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter().try_fold(0u32, |a, c| c.is_ascii_digit().then(|| a * 10 + u32::from(c - b'0')))
    };
    let (Some(y), Some(m), Some(d)) = (num(0..4), num(5..7), num(8..10)) else { return false };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&d)
}

fn byte_format(s: &str) -> bool {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).is_ok()
}

struct Compiler<'d> {
    doc: &'d Value,
    draft: Draft,
    registry: &'d Registry<'d>,
    operations: usize,
    secrets: Secrets,
}

const METHODS: [(&str, Method); 8] = [
    ("get", Method::GET),
    ("put", Method::PUT),
    ("post", Method::POST),
    ("delete", Method::DELETE),
    ("options", Method::OPTIONS),
    ("head", Method::HEAD),
    ("patch", Method::PATCH),
    ("trace", Method::TRACE),
];

impl<'d> Compiler<'d> {
    /// Follows internal `$ref`s; returns the object and its pointer.
    fn deref(&self, mut ptr: String, mut v: &'d Value) -> Result<(String, &'d Value), SpecError> {
        for _ in 0..MAX_REF_HOPS {
            let Some(r) = v.get("$ref").and_then(Value::as_str) else { return Ok((ptr, v)) };
            let Some(target) = r.strip_prefix('#') else {
                return err(format!(
                    "{ptr}: external $ref {r:?} is not supported; inline it or bundle the document"
                ));
            };
            let decoded = percent_decode_str(target).decode_utf8_lossy().into_owned();
            v = self
                .doc
                .pointer(&decoded)
                .ok_or_else(|| SpecError(format!("{ptr}: $ref {r:?} points nowhere")))?;
            ptr = decoded;
        }
        err(format!("{ptr}: $ref chain longer than {MAX_REF_HOPS} (a cycle?)"))
    }

    /// The fast accept path of the schema at `ptr`, if it has one.
    fn fast(&self, ptr: &str) -> Option<crate::fastbody::FastSchema> {
        let schema = self.doc.pointer(ptr)?;
        match crate::fastbody::compile(self.doc, schema, self.draft == Draft::Draft4) {
            Ok(f) => Some(f),
            Err(why) => {
                tracing::debug!(schema = %ptr, %why, "no fast path for this schema; the general validator checks it");
                None
            }
        }
    }

    fn validator(&self, ptr: &str) -> Result<Validator, SpecError> {
        let wrapper = json!({"$ref": format!("{SPEC_URI}#{}", fragment(ptr))});
        jsonschema::options()
            .with_draft(self.draft)
            .with_registry(self.registry)
            .should_validate_formats(true)
            .with_format("uuid", uuid_format)
            .with_format("date", date_format)
            .with_format("byte", byte_format)
            .build(&wrapper)
            .map_err(|e| SpecError(format!("{ptr}: schema does not compile: {e}")))
    }

    /// The JSON type a string value of the schema at `ptr` should be read as.
    fn prim(&self, ptr: &str) -> Result<Prim, SpecError> {
        let Some(v) = self.doc.pointer(ptr) else { return Ok(Prim::Any) };
        let (_, s) = self.deref(ptr.to_owned(), v)?;
        let one = |t: &str| match t {
            "integer" => Prim::Integer,
            "number" => Prim::Number,
            "boolean" => Prim::Boolean,
            "string" => Prim::String,
            _ => Prim::Any,
        };
        Ok(match s.get("type") {
            Some(Value::String(t)) => one(t),
            Some(Value::Array(ts)) => {
                let ts: Vec<&str> = ts.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect();
                if ts.len() == 1 { one(ts[0]) } else { Prim::Any }
            }
            _ => Prim::Any,
        })
    }

    fn schema_type(&self, ptr: &str) -> Result<Option<String>, SpecError> {
        let Some(v) = self.doc.pointer(ptr) else { return Ok(None) };
        let (_, s) = self.deref(ptr.to_owned(), v)?;
        Ok(match s.get("type") {
            Some(Value::String(t)) => Some(t.clone()),
            Some(Value::Array(ts)) => {
                ts.iter().filter_map(Value::as_str).find(|t| *t != "null").map(str::to_owned)
            }
            _ => None,
        })
    }

    fn path_item(&mut self, template: &str, ptr: &str, item: &'d Value) -> Result<PathItem, SpecError> {
        let (ptr, item) = self.deref(ptr.to_owned(), item)?;
        let Some(rest) = template.strip_prefix('/') else {
            return err(format!("path {template:?} must start with '/'"));
        };
        let mut segs = Vec::new();
        let mut names = Vec::new();
        for s in rest.split('/') {
            match s.find('{') {
                None if s.contains('}') => return err(format!("path {template:?}: stray '}}' in {s:?}")),
                None => segs.push(PathSeg::Lit(s.to_owned())),
                Some(open) => {
                    // The first '}' after the '{' (one before it, as in `s}{x}`, is a
                    // stray caught below; found by the openapi_load fuzz target).
                    let Some(close) = s[open..].find('}').map(|c| open + c) else {
                        return err(format!("path {template:?}: unclosed '{{' in {s:?}"));
                    };
                    let (prefix, name, suffix) = (&s[..open], &s[open + 1..close], &s[close + 1..]);
                    if name.is_empty() || suffix.contains(['{', '}']) || prefix.contains('}') {
                        return err(format!(
                            "path {template:?}: segment {s:?} must hold exactly one {{name}} template"
                        ));
                    }
                    names.push(name.to_owned());
                    segs.push(PathSeg::Param {
                        prefix: prefix.to_owned(),
                        name: name.to_owned(),
                        suffix: suffix.to_owned(),
                    });
                }
            }
        }
        let literals = segs.iter().filter(|s| matches!(s, PathSeg::Lit(_))).count();
        let shared = self.params(&ptr, item.get("parameters"))?;
        let mut ops = Vec::new();
        for (key, method) in METHODS {
            let Some(op) = item.get(key) else { continue };
            let op_ptr = format!("{ptr}/{key}");
            let op = self.operation(template, &method, &op_ptr, op, &shared, &names)?;
            ops.push((method, op));
        }
        let allow = ops.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>().join(", ");
        Ok(PathItem { template: template.to_owned(), segs, literals, ops, allow })
    }

    /// Parameter objects (resolved) with their pointers.
    fn params(&self, ptr: &str, list: Option<&'d Value>) -> Result<Vec<(String, &'d Value)>, SpecError> {
        let Some(list) = list else { return Ok(Vec::new()) };
        let Some(list) = list.as_array() else { return err(format!("{ptr}/parameters must be a list")) };
        list.iter().enumerate().map(|(i, p)| self.deref(format!("{ptr}/parameters/{i}"), p)).collect()
    }

    fn operation(
        &mut self,
        template: &str,
        method: &Method,
        ptr: &str,
        op: &'d Value,
        shared: &[(String, &'d Value)],
        path_names: &[String],
    ) -> Result<Operation, SpecError> {
        self.operations += 1;
        let id = op
            .get("operationId")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{method} {template}"));
        let own = self.params(ptr, op.get("parameters"))?;
        // Operation parameters override path-item ones with the same name and location.
        let key = |p: &Value| {
            (
                p.get("name").and_then(Value::as_str).unwrap_or_default().to_owned(),
                p.get("in").and_then(Value::as_str).unwrap_or_default().to_owned(),
            )
        };
        let mut merged: Vec<(String, &'d Value)> =
            shared.iter().filter(|(_, s)| !own.iter().any(|(_, o)| key(o) == key(s))).cloned().collect();
        merged.extend(own);
        let mut params = Vec::new();
        for (pptr, p) in &merged {
            if let Some(param) = self.param(pptr, p)? {
                params.push(param);
            }
        }
        for name in path_names {
            if !params.iter().any(|p| p.loc == Loc::Path && &p.name == name) {
                return err(format!("{ptr}: path parameter {name:?} of {template:?} is not declared"));
            }
        }
        let body = match op.get("requestBody") {
            Some(b) => Some(self.request_body(&format!("{ptr}/requestBody"), b)?),
            None => None,
        };
        let action = match op.get("x-portcullis-action") {
            None => None,
            Some(a) => Some(a.as_str().and_then(Action::parse).ok_or_else(|| {
                SpecError(format!("{ptr}: x-portcullis-action must be \"block\" or \"log\""))
            })?),
        };
        let groups = match op.get("x-portcullis-groups") {
            None => None,
            Some(Value::Array(g)) if g.iter().all(Value::is_string) => {
                Some(g.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            }
            Some(_) => return err(format!("{ptr}: x-portcullis-groups must be a list of group names")),
        };
        Ok(Operation { id, params, body, action, groups })
    }

    fn param(&self, ptr: &str, p: &'d Value) -> Result<Option<Param>, SpecError> {
        let name =
            p.get("name").and_then(Value::as_str).ok_or_else(|| SpecError(format!("{ptr}: no name")))?;
        let loc = match p.get("in").and_then(Value::as_str) {
            Some("path") => Loc::Path,
            Some("query") => Loc::Query,
            Some("header") => Loc::Header,
            Some("cookie") => Loc::Cookie,
            other => return err(format!("{ptr}: parameter {name:?} has unknown location {other:?}")),
        };
        // OpenAPI: header parameters named Accept, Content-Type or Authorization are ignored.
        if loc == Loc::Header
            && ["accept", "content-type", "authorization"].contains(&name.to_ascii_lowercase().as_str())
        {
            return Ok(None);
        }
        let required = loc == Loc::Path || p.get("required").and_then(Value::as_bool).unwrap_or(false);
        let bind = match p.get("x-portcullis-bind").and_then(Value::as_str) {
            None if p.get("x-portcullis-bind").is_some() => {
                return err(format!("{ptr}: x-portcullis-bind must be \"device-id\" or \"group\""));
            }
            None => None,
            Some("device-id") => Some(Bind::DeviceId),
            Some("group") => Some(Bind::Group),
            Some(other) => {
                return err(format!("{ptr}: x-portcullis-bind {other:?} must be \"device-id\" or \"group\""));
            }
        };
        let (schema_ptr, shape) = if let Some(content) = p.get("content").and_then(Value::as_object) {
            let Some((mt, _)) = content.iter().next() else { return err(format!("{ptr}: empty content")) };
            if !is_json(mt) {
                return err(format!("{ptr}: parameter content {mt:?} is not supported (JSON only)"));
            }
            (format!("{ptr}/content/{}/schema", escape_pointer(mt)), Shape::Json)
        } else {
            let sptr = format!("{ptr}/schema");
            let default_style = match loc {
                Loc::Query | Loc::Cookie => "form",
                Loc::Path | Loc::Header => "simple",
            };
            let style = p.get("style").and_then(Value::as_str).unwrap_or(default_style);
            let explode = p.get("explode").and_then(Value::as_bool).unwrap_or(style == "form");
            let ty = self.schema_type(&sptr)?;
            let shape = match (ty.as_deref(), style) {
                (Some("object"), _) => {
                    return err(format!(
                        "{ptr}: object-valued parameter {name:?} is not supported by the validator"
                    ));
                }
                (Some("array"), "form" | "simple") => Shape::Array {
                    item: self.prim(&format!("{sptr}/items"))?,
                    explode: explode && style == "form",
                    delim: ',',
                },
                (Some("array"), "spaceDelimited") if !explode => {
                    Shape::Array { item: self.prim(&format!("{sptr}/items"))?, explode: false, delim: ' ' }
                }
                (Some("array"), "pipeDelimited") if !explode => {
                    Shape::Array { item: self.prim(&format!("{sptr}/items"))?, explode: false, delim: '|' }
                }
                (_, "form" | "simple") => Shape::Scalar(self.prim(&sptr)?),
                (_, other) => {
                    return err(format!(
                        "{ptr}: parameter {name:?} style {other:?} is not supported by the validator"
                    ));
                }
            };
            (sptr, shape)
        };
        let validator = if self.doc.pointer(&schema_ptr).is_some() {
            self.validator(&schema_ptr)?
        } else {
            self.validator_for_any()?
        };
        let label = format!("{}/{}", loc.as_str(), name);
        let name = if loc == Loc::Header { name.to_ascii_lowercase() } else { name.to_owned() };
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(Some(Param {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            loc,
            name,
            label,
            required,
            shape,
            validator,
            bind,
            secret: matches!(loc, Loc::Header | Loc::Cookie)
                || is_secret_schema(self.doc.pointer(&schema_ptr))
                || is_secret_schema(Some(p)),
        }))
    }

    fn validator_for_any(&self) -> Result<Validator, SpecError> {
        jsonschema::options()
            .with_draft(self.draft)
            .build(&json!({}))
            .map_err(|e| SpecError(format!("empty schema does not compile: {e}")))
    }

    fn request_body(&self, ptr: &str, b: &'d Value) -> Result<RequestBody, SpecError> {
        let (ptr, b) = self.deref(ptr.to_owned(), b)?;
        let required = b.get("required").and_then(Value::as_bool).unwrap_or(false);
        let Some(content) = b.get("content").and_then(Value::as_object) else {
            return err(format!("{ptr}: request body without content"));
        };
        let mut media = Vec::new();
        for (range, m) in content {
            let range = range.to_ascii_lowercase();
            let sptr = format!("{ptr}/content/{}/schema", escape_pointer(&range));
            let has_schema = m.get("schema").is_some();
            let compiled = if is_json(&range) && has_schema {
                Media::Json(self.validator(&sptr)?, self.secrets.clone(), self.fast(&sptr))
            } else if range == "application/x-www-form-urlencoded" && has_schema {
                let mut fields = HashMap::new();
                let (props_ptr, schema) = self.deref(sptr.clone(), &m["schema"])?;
                if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                    for k in props.keys() {
                        let fptr = format!("{props_ptr}/properties/{}", escape_pointer(k));
                        let shape = match self.schema_type(&fptr)?.as_deref() {
                            Some("array") => Shape::Array {
                                item: self.prim(&format!("{fptr}/items"))?,
                                explode: true,
                                delim: ',',
                            },
                            Some("object") => Shape::Json,
                            _ => Shape::Scalar(self.prim(&fptr)?),
                        };
                        fields.insert(k.clone(), shape);
                    }
                }
                Media::Form { validator: self.validator(&sptr)?, fields, secrets: self.secrets.clone() }
            } else {
                Media::Opaque
            };
            media.push((range, compiled));
        }
        // Exact types before `type/*` before `*/*`.
        media.sort_by_key(|(r, _)| (r.matches('*').count(), r.clone()));
        Ok(RequestBody { required, media })
    }
}

fn is_json(media_type: &str) -> bool {
    is_json_type(&media_type_of(media_type))
}

/// Whether a media type as `media_type_of` returns it is JSON.
fn is_json_type(mt: &str) -> bool {
    mt == "application/json" || mt.ends_with("+json")
}

/// The media type of a Content-Type value, lowercased, without parameters; borrowed when
/// it already is (`application/json`, the usual case).
fn media_type_of(ct: &str) -> std::borrow::Cow<'_, str> {
    let mt = ct.as_bytes().iter().position(|&b| b == b';').map_or(ct, |i| &ct[..i]).trim();
    if mt.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(mt.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(mt)
    }
}

// ---------------------------------------------------------------------------------------
// Checking

fn trunc(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

fn coerce(prim: Prim, s: &str) -> Value {
    let num = || {
        if let Ok(i) = s.parse::<i64>() {
            Some(Value::from(i))
        } else if let Ok(u) = s.parse::<u64>() {
            Some(Value::from(u))
        } else {
            s.parse::<f64>()
                .ok()
                .filter(|f| f.is_finite() && !s.contains(['i', 'I', 'n', 'N']))
                .map(Value::from)
        }
    };
    match prim {
        Prim::String | Prim::Any => Value::String(s.to_owned()),
        Prim::Integer | Prim::Number => num().unwrap_or_else(|| Value::String(s.to_owned())),
        Prim::Boolean => match s {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => Value::String(s.to_owned()),
        },
    }
}

/// Readings of an untyped value other than as a string.
fn alternatives(s: &str) -> Vec<Value> {
    let mut out = Vec::new();
    if let Value::Number(n) = coerce(Prim::Number, s) {
        out.push(Value::Number(n));
    }
    match s {
        "true" => out.push(Value::Bool(true)),
        "false" => out.push(Value::Bool(false)),
        "null" => out.push(Value::Null),
        _ => {}
    }
    out
}

/// Collects violations for one request.
struct Report {
    found: Vec<InvalidParam>,
    total: usize,
}

impl Report {
    fn push(&mut self, name: String, reason: String) {
        self.total += 1;
        if self.found.len() < MAX_REPORTED {
            self.found.push(InvalidParam { name, reason: trunc(reason) });
        }
    }

    fn validate(&mut self, label: &str, v: &Validator, value: &Value, secret: bool) {
        self.validate_masking(label, v, value, secret, None);
    }

    /// Like `validate`; values at a property named in `secrets` are never echoed.
    fn validate_masking(
        &mut self,
        label: &str,
        v: &Validator,
        value: &Value,
        secret: bool,
        secrets: Option<&Secrets>,
    ) {
        // The common case, valid, without building error reports.
        if v.is_valid(value) {
            return;
        }
        for e in v.iter_errors(value).take(MAX_REPORTED) {
            let at = e.instance_path().to_string();
            let name = if at.is_empty() { label.to_owned() } else { format!("{label}{at}") };
            let hidden = secret || secrets.is_some_and(|set| at.split('/').any(|seg| set.contains(seg)));
            let reason = if hidden { e.masked().to_string() } else { e.to_string() };
            self.push(name, reason);
        }
    }

    fn check_value(&mut self, p: &Param, raw: &[&str]) {
        let value = match p.shape {
            Shape::Json => {
                let Some(s) = raw.first() else { return };
                match crate::strictjson::from_str(s) {
                    Ok(v) => v,
                    Err(e) => return self.push(p.label.clone(), format!("not valid JSON: {e}")),
                }
            }
            Shape::Scalar(prim) => {
                if raw.len() > 1 {
                    return self.push(p.label.clone(), format!("given {} times; expected once", raw.len()));
                }
                let Some(s) = raw.first() else { return };
                // A device sends the same few values again and again (its own id in a
                // bound path parameter, above all): remember the ones that passed.
                if memo::known_valid(p.id, s) {
                    return;
                }
                let before = self.total;
                self.check_scalar(p, prim, s);
                if self.total == before {
                    memo::remember(p.id, s);
                }
                return;
            }
            Shape::Array { item, explode, delim } => {
                let parts: Vec<&str> = if explode && p.loc == Loc::Query {
                    raw.to_vec()
                } else {
                    if raw.len() > 1 {
                        return self.push(
                            p.label.clone(),
                            format!("given {} times; expected one delimited list", raw.len()),
                        );
                    }
                    match raw.first() {
                        Some(&"") => Vec::new(),
                        Some(s) => {
                            s.split(delim).map(|x| if p.loc == Loc::Header { x.trim() } else { x }).collect()
                        }
                        None => return,
                    }
                };
                Value::Array(parts.iter().map(|x| coerce(item, x)).collect())
            }
        };
        self.validate(&p.label, &p.validator, &value, p.secret);
    }

    fn check_scalar(&mut self, p: &Param, prim: Prim, s: &str) {
        if prim == Prim::Any {
            let as_string = Value::String(s.to_owned());
            if p.validator.is_valid(&as_string) || alternatives(s).iter().any(|a| p.validator.is_valid(a)) {
                return;
            }
            return self.validate(&p.label, &p.validator, &as_string, p.secret);
        }
        self.validate(&p.label, &p.validator, &coerce(prim, s), p.secret);
    }
}

/// Per worker thread: scalar parameter values that passed their parameter's validation,
/// by parameter id. Validation is a pure function of (parameter, value), so a remembered
/// value needs no second look. Bounded: short values only, and cleared when full.
mod memo {
    use std::cell::RefCell;
    use std::collections::{HashMap, HashSet};

    const MAX_VALUE: usize = 128;
    const MAX_ENTRIES: usize = 4096;

    /// How many values are held, and the values by parameter id.
    type Memo = (usize, HashMap<u64, HashSet<Box<str>>>);

    thread_local! {
        static VALID: RefCell<Memo> = RefCell::new((0, HashMap::new()));
    }

    pub(super) fn known_valid(param: u64, value: &str) -> bool {
        value.len() <= MAX_VALUE
            && VALID.with(|v| v.borrow().1.get(&param).is_some_and(|set| set.contains(value)))
    }

    pub(super) fn remember(param: u64, value: &str) {
        if value.len() > MAX_VALUE {
            return;
        }
        VALID.with(|v| {
            let mut v = v.borrow_mut();
            if v.0 >= MAX_ENTRIES {
                v.1.clear();
                v.0 = 0;
            }
            if v.1.entry(param).or_default().insert(value.into()) {
                v.0 += 1;
            }
        });
    }
}

/// The `/`-separated segments of a path (without its leading `/`), percent-decoded;
/// borrowed unless a segment has escapes. `None` if a decoded segment is not UTF-8.
/// One pass over the bytes: a path is split on every request.
fn path_segments(path: &str) -> Option<Vec<std::borrow::Cow<'_, str>>> {
    let bytes = path.as_bytes();
    let mut segments = Vec::with_capacity(8);
    let (mut start, mut escaped) = (0, false);
    for i in 0..=bytes.len() {
        match bytes.get(i) {
            Some(b'%') => escaped = true,
            Some(b'/') | None => {
                let seg = &path[start..i];
                segments.push(if escaped {
                    percent_decode_str(seg).decode_utf8().ok()?
                } else {
                    std::borrow::Cow::Borrowed(seg)
                });
                (start, escaped) = (i + 1, false);
            }
            Some(_) => {}
        }
    }
    Some(segments)
}

impl Spec {
    /// Matches a request to its operation and checks its path, query, header and cookie
    /// parameters, the operation's groups and identity bindings. `path` is the raw
    /// (percent-encoded) request path.
    pub fn check(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        caller: Caller<'_>,
    ) -> Result<&Operation, (Option<&Operation>, Violation)> {
        let not_found = || {
            let shown: String = path.chars().take(200).collect();
            (
                None,
                Violation::new(
                    StatusCode::NOT_FOUND,
                    "no-operation",
                    "no_operation",
                    format!("no operation of the API matches path {shown}"),
                ),
            )
        };
        let rel = if self.base.is_empty() {
            path
        } else {
            match path.strip_prefix(self.base.as_str()) {
                Some(r) if r.starts_with('/') => r,
                Some("") => "/",
                _ => return Err(not_found()),
            }
        };
        let Some(decoded) = path_segments(&rel[1..]) else {
            return Err((
                None,
                Violation::new(
                    StatusCode::BAD_REQUEST,
                    "invalid-request",
                    "invalid_params",
                    "path: a segment is not valid UTF-8 after percent-decoding".into(),
                ),
            ));
        };
        let Some(candidates) = self.by_len.get(&decoded.len()) else { return Err(not_found()) };
        let mut path_values: Vec<(&str, &str)> = Vec::new();
        let item = candidates.iter().find(|item| {
            path_values.clear();
            item.segs.iter().zip(&decoded).all(|(seg, got)| match seg {
                PathSeg::Lit(l) => l == got.as_ref(),
                PathSeg::Param { prefix, name, suffix } => {
                    match got.strip_prefix(prefix.as_str()).and_then(|r| r.strip_suffix(suffix.as_str())) {
                        Some(v) if !v.is_empty() || !prefix.is_empty() || !suffix.is_empty() => {
                            path_values.push((name, v));
                            true
                        }
                        _ => false,
                    }
                }
            })
        });
        let Some(item) = item else { return Err(not_found()) };
        let Some((_, op)) = item.ops.iter().find(|(m, _)| m == method) else {
            let mut v = Violation::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "method_not_allowed",
                format!("{} does not allow {method}; allowed: {}", item.template, item.allow),
            );
            v.allow = Some(item.allow.clone());
            return Err((None, v));
        };

        if let Some(groups) = &op.groups
            && !groups.iter().any(|g| g == caller.group)
        {
            let mut v = Violation::new(
                StatusCode::FORBIDDEN,
                "group-denied",
                "group_denied",
                format!("group {} may not call {}", caller.group, op.id),
            );
            v.always_enforced = true;
            return Err((Some(op), v));
        }

        // Decoded only when something reads them.
        let query_pairs: Vec<(std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)> = match query {
            Some(q) if self.strict_query || op.params.iter().any(|p| p.loc == Loc::Query) => {
                form_urlencoded::parse(q.as_bytes()).collect()
            }
            _ => Vec::new(),
        };
        let cookies: Vec<(&str, &str)> = if op.params.iter().any(|p| p.loc == Loc::Cookie) {
            headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().split_once('='))
                .collect()
        } else {
            Vec::new()
        };

        let mut report = Report { found: Vec::new(), total: 0 };
        let mut binding: Option<Violation> = None;
        for p in &op.params {
            let raw: Vec<&str> = match p.loc {
                Loc::Path => path_values.iter().filter(|(n, _)| *n == p.name).map(|(_, v)| *v).collect(),
                Loc::Query => {
                    query_pairs.iter().filter(|(k, _)| *k == p.name).map(|(_, v)| v.as_ref()).collect()
                }
                Loc::Header => {
                    headers.get_all(p.name.as_str()).iter().filter_map(|v| v.to_str().ok()).collect()
                }
                Loc::Cookie => cookies.iter().filter(|(k, _)| *k == p.name).map(|(_, v)| *v).collect(),
            };
            if raw.is_empty() {
                if p.loc == Loc::Header && headers.contains_key(p.name.as_str()) {
                    report.push(p.label.clone(), "value is not visible ASCII".into());
                } else if p.required {
                    report.push(p.label.clone(), "required parameter is missing".into());
                }
                continue;
            }
            report.check_value(p, &raw);
            if let Some(b) = p.bind
                && binding.is_none()
            {
                let want = match b {
                    Bind::DeviceId => caller.device,
                    Bind::Group => caller.group,
                };
                if raw.iter().any(|v| *v != want) {
                    let what = if b == Bind::DeviceId { "device" } else { "group" };
                    let mut v = Violation::new(
                        StatusCode::FORBIDDEN,
                        "identity-binding",
                        "binding_mismatch",
                        format!("{} must name the calling {what} ({want})", p.label),
                    );
                    v.always_enforced = true;
                    binding = Some(v);
                }
            }
        }
        if let Some(v) = binding {
            return Err((Some(op), v));
        }
        if self.strict_query {
            for (k, _) in &query_pairs {
                if !op.params.iter().any(|p| p.loc == Loc::Query && p.name == *k) {
                    report.push(
                        format!("query/{}", trunc(k.clone().into_owned())),
                        "not a parameter of this operation".into(),
                    );
                }
            }
        }
        if report.total > 0 {
            return Err((Some(op), Violation::invalid("invalid_params", report.found, report.total)));
        }
        Ok(op)
    }

    /// Decides what the body of a request to `op` needs, from its Content-Type and
    /// whether it has a body at all.
    pub fn body_plan<'s>(
        &self,
        op: &'s Operation,
        content_type: Option<&str>,
        has_body: bool,
    ) -> Result<BodyPlan<'s>, Violation> {
        let Some(rb) = &op.body else {
            if has_body {
                return Err(Violation::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported-media-type",
                    "unsupported_media_type",
                    format!("body: {} takes no request body", op.id),
                ));
            }
            return Ok(BodyPlan(Plan::Forward));
        };
        if !has_body {
            if rb.required {
                return Err(Violation::invalid(
                    "invalid_body",
                    vec![InvalidParam { name: "body".into(), reason: "request body is required".into() }],
                    1,
                ));
            }
            return Ok(BodyPlan(Plan::Forward));
        }
        let declared = || rb.media.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>().join(", ");
        let Some(ct) = content_type else {
            return Err(Violation::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "unsupported_media_type",
                format!("body: Content-Type is missing; {} accepts {}", op.id, declared()),
            ));
        };
        let mt = media_type_of(ct);
        let (major, _) = mt.split_once('/').unwrap_or((&*mt, ""));
        let found = rb.media.iter().find(|(range, _)| {
            range.as_str() == mt || range.strip_suffix("/*").is_some_and(|m| m == major) || range == "*/*"
        });
        match found {
            None => {
                let shown: String = mt.chars().take(100).collect();
                Err(Violation::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported-media-type",
                    "unsupported_media_type",
                    format!(
                        "body: Content-Type {shown} is not accepted by {}; it accepts {}",
                        op.id,
                        declared()
                    ),
                ))
            }
            // A wildcard range with a JSON schema validates JSON content only.
            Some((_, Media::Json(v, secrets, fast))) if is_json_type(&mt) => {
                Ok(BodyPlan(Plan::Json(v, secrets, fast.as_ref())))
            }
            Some((_, Media::Json(..))) => Ok(BodyPlan(Plan::Forward)),
            Some((_, Media::Form { validator, fields, secrets })) => {
                Ok(BodyPlan(Plan::Form(validator, fields, secrets)))
            }
            Some((_, Media::Opaque)) => Ok(BodyPlan(Plan::Forward)),
        }
    }
}

impl BodyPlan<'_> {
    /// True when the body has to be read before forwarding.
    pub fn needs_body(&self) -> bool {
        !matches!(self.0, Plan::Forward)
    }

    /// For JSON bodies with a fast path: `(fast path accepts, general validator accepts)`.
    /// The first must imply the second; the fuzz target `openapi_request` asserts it.
    #[doc(hidden)]
    pub fn fast_path_verdicts(&self, bytes: &[u8]) -> Option<(bool, bool)> {
        let Plan::Json(v, _, Some(fast)) = &self.0 else { return None };
        let full = crate::strictjson::from_slice(bytes).is_ok_and(|value| v.is_valid(&value));
        Some((fast.accepts(bytes), full))
    }

    /// Validates a buffered body.
    pub fn check(&self, bytes: &[u8]) -> Result<(), Violation> {
        let mut report = Report { found: Vec::new(), total: 0 };
        match &self.0 {
            Plan::Forward => return Ok(()),
            // Certainly valid: no tree, no walk.
            Plan::Json(_, _, Some(fast)) if fast.accepts(bytes) => return Ok(()),
            Plan::Json(v, secrets, _) => match crate::strictjson::from_slice(bytes) {
                Ok(value) => report.validate_masking("body", v, &value, false, Some(secrets)),
                Err(e) => report.push("body".into(), format!("not valid JSON: {e}")),
            },
            Plan::Form(v, fields, secrets) => {
                // Values grouped by field in one pass (a field's position by hash: a body of
                // many distinct fields must not cost a scan per field).
                let mut grouped: Vec<(String, Vec<String>)> = Vec::new();
                let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
                for (k, val) in form_urlencoded::parse(bytes) {
                    match at.get(k.as_ref()) {
                        Some(&i) => grouped[i].1.push(val.into_owned()),
                        None => {
                            at.insert(k.clone().into_owned(), grouped.len());
                            grouped.push((k.into_owned(), vec![val.into_owned()]));
                        }
                    }
                }
                let mut obj = Map::new();
                for (k, vals) in grouped {
                    let value = match fields.get(&k) {
                        Some(Shape::Array { item, .. }) => {
                            Value::Array(vals.iter().map(|x| coerce(*item, x)).collect())
                        }
                        Some(Shape::Json) => match crate::strictjson::from_str(&vals[0]) {
                            Ok(v) => v,
                            Err(_) => Value::String(vals[0].clone()),
                        },
                        Some(Shape::Scalar(p)) if vals.len() == 1 => coerce(*p, &vals[0]),
                        None if vals.len() == 1 => Value::String(vals[0].clone()),
                        _ => Value::Array(vals.into_iter().map(Value::String).collect()),
                    };
                    obj.insert(k, value);
                }
                report.validate_masking("body", v, &Value::Object(obj), false, Some(secrets));
            }
        }
        if report.total > 0 {
            return Err(Violation::invalid("invalid_body", report.found, report.total));
        }
        Ok(())
    }
}

/// A body over the route's limit.
pub fn too_large(limit: u64, route: &str) -> Violation {
    Violation::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body-too-large",
        "body_too_large",
        format!("request body exceeds the {limit} bytes allowed on {route}"),
    )
}

#[cfg(test)]
mod tests {
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

    const TELEMETRY: &str = include_str!("../../../examples/telemetry.openapi.yaml");
    const ME: Caller<'static> = Caller { device: "cam-01", group: "cameras" };

    /// Found by the openapi_load fuzz target: a '}' before the '{' in one segment sliced
    /// the template backwards and panicked. Every malformed template is an error.
    #[test]
    fn malformed_path_templates_are_errors_not_panics() {
        for template in ["/sites/s}{tei/devices", "/a/}{", "/a/{x", "/a/x}", "/a/{}", "/a/{x}{y}", "/a/}{x}"]
        {
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
        let op =
            s.check(&Method::POST, "/api/devices/cam-01/telemetry", None, &HeaderMap::new(), ME).unwrap();
        let plan = s.body_plan(op, Some("application/json"), true).unwrap();
        let Plan::Json(validator, _, Some(fast)) = plan.0 else {
            panic!("the telemetry schema has a fast path")
        };
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
            (
                "source",
                vec!["\"10.20.30.40\"", "\"010.2.3.4\"", "\"256.1.1.1\"", "\"1.2.3\"", "\"::1\"", "null"],
            ),
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
        assert!(
            valid > 100 && accepted * 4 >= valid,
            "fast path accepted {accepted} of {valid} valid bodies"
        );
        let reading = br#"{"temperature": 21.5, "humidity": 40.25, "taken_at": "2026-11-25T10:00:00Z", "sequence": 184467, "battery": 87, "tags": ["lobby", "north", "floor-2", "door-east", "ceiling"], "source": "10.20.30.40"}"#;
        assert!(fast.accepts(reading), "the benchmark's reading takes the fast path");
    }

    #[test]
    fn remembered_parameter_values_are_only_the_valid_ones() {
        let s = spec();
        for _ in 0..3 {
            assert!(check(&s, Method::GET, "/api/devices/cam-01/telemetry", Some("limit=5"), &[]).is_ok());
            let v =
                check(&s, Method::GET, "/api/devices/cam-01/telemetry", Some("limit=500"), &[]).unwrap_err();
            assert_eq!(v.status, StatusCode::BAD_REQUEST);
        }
        // A reloaded document's parameters start with nothing remembered.
        let again = spec();
        let v =
            check(&again, Method::GET, "/api/devices/cam-01/telemetry", Some("limit=0"), &[]).unwrap_err();
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
        assert_eq!(
            check(&s, Method::GET, "/api/devices/cam-01/telemetry", None, &[]).unwrap(),
            "listTelemetry"
        );
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
            check(&s, Method::POST, p, None, &[("x-trace-id", "0b6f3c1e-8a4d-4f7a-9a57-3f0e2d1c4b5a")])
                .is_ok()
        );
    }

    #[test]
    fn strict_query() {
        let opts = SpecOptions { strict_query: true, ..SpecOptions::default() };
        let s = Spec::load(TELEMETRY.as_bytes(), &opts).unwrap();
        let v = check(&s, Method::GET, "/api/devices/cam-01/telemetry", Some("limit=1&debug=1"), &[])
            .unwrap_err();
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
        let v = body(
            &s,
            p,
            Method::POST,
            "application/json",
            r#"{"temperature": 1, "taken_at": "x", "extra": 1}"#,
        )
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
        let v =
            plan.check(br#"{"user": "alice", "password": "hunter2", "api_key": "sk-live-123"}"#).unwrap_err();
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
}
