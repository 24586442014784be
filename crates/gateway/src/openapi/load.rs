//! Reading a document: YAML or JSON, the base path, OpenAPI 3.0 rewritten to the JSON
//! Schema draft it extends, integer formats to bounds.

use std::collections::HashMap;

use jsonschema::{Draft, Registry};
use serde_json::{Map, Value, json};

use super::*;

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

pub(super) fn normalise_base(b: &str) -> Result<String, SpecError> {
    if !b.starts_with('/') {
        return err(format!("base path {b:?} must start with '/'"));
    }
    Ok(b.trim_end_matches('/').to_owned())
}

pub(super) fn base_from_servers(doc: &Value) -> Result<String, SpecError> {
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

pub(super) fn same_shape(a: &[PathSeg], b: &[PathSeg]) -> bool {
    a.iter().zip(b).all(|(x, y)| match (x, y) {
        (PathSeg::Lit(l), PathSeg::Lit(m)) => l == m,
        (PathSeg::Param { prefix: p, suffix: s, .. }, PathSeg::Param { prefix: q, suffix: t, .. }) => {
            p == q && s == t
        }
        _ => false,
    })
}

/// JSON pointer escaping (RFC 6901) of one reference token.
pub(super) fn escape_pointer(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// A pointer as a URI fragment: everything outside the unreserved set percent-encoded.
pub(super) fn fragment(ptr: &str) -> String {
    const SET: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'/').remove(b'~').remove(b'-').remove(b'.').remove(b'_');
    percent_encoding::utf8_percent_encode(ptr, SET).to_string()
}

/// OpenAPI 3.0 schema objects into draft 4: `nullable`, then the integer formats.
pub(super) fn rewrite_30(v: &mut Value) {
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

pub(super) fn rewrite_formats(v: &mut Value) {
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
pub(super) fn int_format_bounds(obj: &mut Map<String, Value>) {
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
