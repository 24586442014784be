//! Checking a request against its operation: path match, parameters, groups and
//! identity bindings, then the body.

use http::{HeaderMap, Method, StatusCode};
use jsonschema::Validator;
use percent_encoding::percent_decode_str;
use portcullis_http::InvalidParam;
use serde_json::{Map, Value};

use super::*;

// ---------------------------------------------------------------------------------------
// Checking

pub(super) fn trunc(mut s: String) -> String {
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

pub(super) fn coerce(prim: Prim, s: &str) -> Value {
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
pub(super) fn alternatives(s: &str) -> Vec<Value> {
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
pub(super) struct Report {
    pub(super) found: Vec<InvalidParam>,
    pub(super) total: usize,
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
pub(super) mod memo {
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
pub(super) fn path_segments(path: &str) -> Option<Vec<std::borrow::Cow<'_, str>>> {
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
