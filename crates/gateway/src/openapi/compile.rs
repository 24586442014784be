//! Compiling operations: path templates to segments, parameters to shapes and
//! validators, request bodies to validators (and a fast-path plan).

use std::collections::HashMap;

use http::Method;
use jsonschema::{Draft, Registry, Validator};
use percent_encoding::percent_decode_str;
use serde_json::{Value, json};

use super::*;
use crate::formats::{byte_format, date_format, uuid_format};

pub(super) struct Compiler<'d> {
    pub(super) doc: &'d Value,
    pub(super) draft: Draft,
    pub(super) registry: &'d Registry<'d>,
    pub(super) operations: usize,
    pub(super) secrets: Secrets,
}

pub(super) const METHODS: [(&str, Method); 8] = [
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

    pub(super) fn path_item(
        &mut self,
        template: &str,
        ptr: &str,
        item: &'d Value,
    ) -> Result<PathItem, SpecError> {
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

pub(super) fn is_json(media_type: &str) -> bool {
    is_json_type(&media_type_of(media_type))
}

/// Whether a media type as `media_type_of` returns it is JSON.
pub(super) fn is_json_type(mt: &str) -> bool {
    mt == "application/json" || mt.ends_with("+json")
}

/// The media type of a Content-Type value, lowercased, without parameters; borrowed when
/// it already is (`application/json`, the usual case).
pub(super) fn media_type_of(ct: &str) -> std::borrow::Cow<'_, str> {
    let mt = ct.as_bytes().iter().position(|&b| b == b';').map_or(ct, |i| &ct[..i]).trim();
    if mt.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(mt.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(mt)
    }
}
