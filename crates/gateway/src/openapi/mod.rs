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
//!
//! `load` reads the document and rewrites it (3.0 to draft 4, formats to bounds),
//! `compile` turns operations into matchers and validators, `check` runs them per
//! request; the string formats shared with the fast body path are in `crate::formats`.

use std::collections::HashMap;
use std::fmt::Write as _;

use http::{Method, StatusCode};
use jsonschema::Validator;
use portcullis_http::InvalidParam;
use serde_json::Value;

mod check;
mod compile;
mod load;
#[cfg(test)]
mod tests;

use compile::*;
use load::*;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
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

/// A body over the route's limit.
pub fn too_large(limit: u64, route: &str) -> Violation {
    Violation::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body-too-large",
        "body_too_large",
        format!("request body exceeds the {limit} bytes allowed on {route}"),
    )
}
