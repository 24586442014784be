//! A fast accept path for JSON request bodies.
//!
//! Most requests are valid, and validating one the general way means parsing the body
//! into a `serde_json::Value` tree and walking it with the compiled JSON Schema. For
//! schemas built only from the common keywords (types, bounds, lengths, enums of strings,
//! required, `additionalProperties`, `items`, `oneOf`/`anyOf` over distinct types, a few
//! formats) this module checks the body straight off the parser's tokens: no tree, no
//! allocation for keys.
//!
//! It only ever *accepts*. Anything it does not understand when compiling means no fast
//! path for that schema; anything it doubts at request time (a violation, a float where
//! an integer is wanted, a huge integer) sends the body to the general validator, which
//! decides and writes the error. So the fast path's rules must be no more lenient than
//! JSON Schema's: `accepts(b)` implies the general validator accepts `b` (tested
//! differentially, and asserted by the `openapi_request` fuzz target).

use std::fmt;

use serde_json::{Map, Value};

/// JSON types as a bit set. `INTEGER` values are also numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Types(u8);

impl Types {
    const NULL: u8 = 1;
    const BOOL: u8 = 2;
    const INTEGER: u8 = 4;
    const NUMBER: u8 = 8;
    const STRING: u8 = 16;
    const ARRAY: u8 = 32;
    const OBJECT: u8 = 64;
    const ALL: u8 = 127;

    fn from_name(n: &str) -> Option<u8> {
        Some(match n {
            "null" => Self::NULL,
            "boolean" => Self::BOOL,
            "integer" => Self::INTEGER,
            "number" => Self::NUMBER | Self::INTEGER,
            "string" => Self::STRING,
            "array" => Self::ARRAY,
            "object" => Self::OBJECT,
            _ => return None,
        })
    }

    fn has(self, t: u8) -> bool {
        self.0 & t != 0
    }
}

#[derive(Debug, Clone, Copy)]
enum Format {
    DateTime,
    Date,
    Ipv4,
    Uuid,
}

#[derive(Debug, Clone, Copy)]
struct Bound {
    at: f64,
    exclusive: bool,
}

/// One compiled schema.
#[derive(Debug, Clone, Default)]
struct Node {
    types: Types,
    min: Vec<Bound>,
    max: Vec<Bound>,
    min_len: Option<usize>,
    max_len: Option<usize>,
    format: Option<Format>,
    /// Allowed values when the schema has an `enum` (strings, booleans, null only).
    enum_: Option<Vec<Value>>,
    props: Vec<(String, Node)>,
    required: Vec<String>,
    /// For each of `props`, its bit in the `required` mask (0 if it is optional).
    prop_bits: Vec<u64>,
    additional: bool,
    items: Option<Box<Node>>,
    min_items: Option<usize>,
    max_items: Option<usize>,
    /// `oneOf`/`anyOf` branches with pairwise disjoint types; the value's type picks one.
    branches: Vec<Node>,
}

/// A schema the fast path can check, compiled once per document load.
#[derive(Debug, Clone)]
pub struct FastSchema(Node);

/// Why a schema has no fast path.
#[derive(Debug)]
pub struct Unsupported(pub String);

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

type R<T> = Result<T, Unsupported>;

fn no<T>(why: impl Into<String>) -> R<T> {
    Err(Unsupported(why.into()))
}

/// Annotation keywords that never affect validity.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "example",
    "examples",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$comment",
    "externalDocs",
    "xml",
    "discriminator",
];

/// Compiles the schema `v` (its `$ref`s resolved against `doc`); `draft4` selects the
/// boolean form of `exclusiveMinimum`/`exclusiveMaximum` (OpenAPI 3.0).
pub fn compile(doc: &Value, v: &Value, draft4: bool) -> R<FastSchema> {
    compile_node(doc, v, draft4, 0).map(FastSchema)
}

fn resolve<'a>(doc: &'a Value, mut v: &'a Value) -> R<&'a Value> {
    for _ in 0..32 {
        let Some(obj) = v.as_object() else { return Ok(v) };
        let Some(r) = obj.get("$ref") else { return Ok(v) };
        if obj.len() > 1 {
            return no("$ref with sibling keywords");
        }
        let Some(ptr) = r.as_str().and_then(|r| r.strip_prefix('#')) else { return no("non-local $ref") };
        if ptr.contains('%') || ptr.contains('~') {
            return no("escaped $ref");
        }
        v = doc.pointer(ptr).ok_or_else(|| Unsupported(format!("$ref {ptr} points nowhere")))?;
    }
    no("$ref chain too long")
}

/// Adds a bound. Values the fast path accepts are within ±2^53 (see [`EXACT`]), so a
/// bound beyond that range is either always met (dropped) or never met (kept: every
/// value fails it and goes to the general validator).
fn bound(list: &mut Vec<Bound>, v: &Value, exclusive: bool, is_min: bool) -> R<()> {
    let f = v.as_f64().ok_or_else(|| Unsupported("bound is not a number".into()))?;
    if !f.is_finite() {
        return no("bound is not finite");
    }
    let limit = EXACT as f64;
    if f.abs() > limit {
        let always_met = if is_min { f < 0.0 } else { f > 0.0 };
        if !always_met {
            list.push(Bound { at: if is_min { f64::INFINITY } else { f64::NEG_INFINITY }, exclusive: true });
        }
        return Ok(());
    }
    list.push(Bound { at: f, exclusive });
    Ok(())
}

fn count(v: &Value) -> R<usize> {
    v.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| Unsupported("count is not a count".into()))
}

fn compile_node(doc: &Value, v: &Value, draft4: bool, depth: usize) -> R<Node> {
    if depth > 32 {
        return no("schema nested too deep");
    }
    let v = resolve(doc, v)?;
    let obj: &Map<String, Value> = match v {
        Value::Bool(true) => {
            return Ok(Node { types: Types(Types::ALL), additional: true, ..Node::default() });
        }
        Value::Object(o) => o,
        _ => return no("schema is not an object"),
    };
    let mut n = Node { types: Types(Types::ALL), additional: true, ..Node::default() };
    let mut excl_min_flag = false;
    let mut excl_max_flag = false;
    for (k, val) in obj {
        match k.as_str() {
            "type" => {
                n.types = Types(match val {
                    Value::String(t) => {
                        Types::from_name(t).ok_or_else(|| Unsupported(format!("type {t}")))?
                    }
                    Value::Array(ts) => {
                        let mut bits = 0;
                        for t in ts {
                            bits |= t
                                .as_str()
                                .and_then(Types::from_name)
                                .ok_or_else(|| Unsupported("type list".into()))?;
                        }
                        bits
                    }
                    _ => return no("type"),
                });
            }
            "minimum" => bound(&mut n.min, val, false, true)?,
            "maximum" => bound(&mut n.max, val, false, false)?,
            "exclusiveMinimum" => match val {
                Value::Bool(b) if draft4 => excl_min_flag = *b,
                Value::Number(_) if !draft4 => bound(&mut n.min, val, true, true)?,
                _ => return no("exclusiveMinimum form"),
            },
            "exclusiveMaximum" => match val {
                Value::Bool(b) if draft4 => excl_max_flag = *b,
                Value::Number(_) if !draft4 => bound(&mut n.max, val, true, false)?,
                _ => return no("exclusiveMaximum form"),
            },
            "minLength" => n.min_len = Some(count(val)?),
            "maxLength" => n.max_len = Some(count(val)?),
            "minItems" => n.min_items = Some(count(val)?),
            "maxItems" => n.max_items = Some(count(val)?),
            "format" => {
                n.format = match val.as_str() {
                    Some("date-time") => Some(Format::DateTime),
                    Some("date") => Some(Format::Date),
                    Some("ipv4") => Some(Format::Ipv4),
                    Some("uuid") => Some(Format::Uuid),
                    // Formats check strings only; on a schema that admits no strings
                    // (int32/int64 on integers: their bounds are rewritten in) they are inert.
                    Some(_) => None,
                    None => return no("format"),
                };
            }
            "enum" => {
                let vals = val.as_array().ok_or_else(|| Unsupported("enum".into()))?;
                if vals.iter().any(|e| e.is_number() || e.is_array() || e.is_object()) {
                    return no("enum with numbers or structures");
                }
                n.enum_ = Some(vals.clone());
            }
            "properties" => {
                let props = val.as_object().ok_or_else(|| Unsupported("properties".into()))?;
                for (name, s) in props {
                    n.props.push((name.clone(), compile_node(doc, s, draft4, depth + 1)?));
                }
            }
            "required" => {
                let req = val.as_array().ok_or_else(|| Unsupported("required".into()))?;
                for r in req {
                    n.required.push(r.as_str().ok_or_else(|| Unsupported("required".into()))?.to_owned());
                }
            }
            "additionalProperties" => match val {
                Value::Bool(b) => n.additional = *b,
                _ => return no("additionalProperties with a schema"),
            },
            "items" => match val {
                Value::Object(_) | Value::Bool(true) => {
                    n.items = Some(Box::new(compile_node(doc, val, draft4, depth + 1)?));
                }
                _ => return no("items form"),
            },
            "oneOf" | "anyOf" => {
                if !n.branches.is_empty() {
                    return no("both oneOf and anyOf");
                }
                let list = val.as_array().ok_or_else(|| Unsupported(k.clone()))?;
                let mut seen = 0u8;
                for b in list {
                    let node = compile_node(doc, b, draft4, depth + 1)?;
                    if node.types.0 & seen != 0 || node.types.0 == Types::ALL || !node.branches.is_empty() {
                        return no(format!("{k} branches whose types overlap"));
                    }
                    seen |= node.types.0;
                    n.branches.push(node);
                }
            }
            "allOf" => {
                // Only bounds (what the int32/int64 rewrite adds) merge into this node.
                for b in val.as_array().ok_or_else(|| Unsupported("allOf".into()))? {
                    let b = b.as_object().ok_or_else(|| Unsupported("allOf branch".into()))?;
                    for (bk, bv) in b {
                        match bk.as_str() {
                            "minimum" => bound(&mut n.min, bv, false, true)?,
                            "maximum" => bound(&mut n.max, bv, false, false)?,
                            _ => return no("allOf beyond bounds"),
                        }
                    }
                }
            }
            k if ANNOTATIONS.contains(&k) || k.starts_with("x-") => {}
            other => return no(format!("keyword {other}")),
        }
    }
    // Draft 4: the flags make `minimum`/`maximum` exclusive. Making every bound of the
    // node exclusive is stricter still (never more lenient), so it is safe.
    if excl_min_flag {
        n.min.iter_mut().for_each(|b| b.exclusive = true);
    }
    if excl_max_flag {
        n.max.iter_mut().for_each(|b| b.exclusive = true);
    }
    if let Some(f) = obj.get("format").and_then(Value::as_str)
        && n.format.is_none()
        && n.types.has(Types::STRING)
    {
        return no(format!("format {f} on strings"));
    }
    if !n.branches.is_empty() {
        // The branches decide the type; the node's own keywords must not add rules.
        let own = n.min.len() + n.max.len() + n.props.len() + n.required.len();
        if own > 0 || n.items.is_some() || n.enum_.is_some() || n.format.is_some() || !n.additional {
            return no("oneOf/anyOf beside other keywords");
        }
        let union = n.branches.iter().fold(0u8, |a, b| a | b.types.0);
        n.types = Types(n.types.0 & union);
    }
    n.prop_bits = n
        .props
        .iter()
        .map(|(name, _)| {
            n.required.iter().position(|r| r == name).filter(|&i| i < 64).map_or(0, |i| 1u64 << i)
        })
        .collect();
    Ok(n)
}

impl FastSchema {
    /// True if `body` is JSON that certainly satisfies the schema. False means "ask the
    /// general validator", not "invalid".
    pub fn accepts(&self, body: &[u8]) -> bool {
        // Strings are compared as raw slices below, so the whole body must be UTF-8 (as
        // JSON requires) first.
        let Ok(text) = std::str::from_utf8(body) else { return false };
        let mut p = Scan { b: body, s: text, i: 0 };
        p.ws();
        p.value(&self.0, 0).is_some() && {
            p.ws();
            p.i == body.len()
        }
    }
}

/// Bytes that end the fast scan of a string: the closing quote, an escape, a control
/// character.
static STOPS_STRING: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Integers beyond this are compared as floats by JSON Schema implementations; leave them
/// to the general validator.
const EXACT: u64 = 1 << 53;

/// Powers of ten a double holds exactly (Clinger's fast path).
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18,
    1e19, 1e20, 1e21, 1e22,
];

/// A strict RFC 8259 scanner that checks values against a [`Node`] as it goes. Every
/// `None` is a doubt: the general validator takes over. It declines escapes in strings,
/// numbers with more than 15 significant digits or a decimal exponent beyond ±22 (so
/// its one rounding equals any correct parser's), `-0`, and nesting beyond 64.
struct Scan<'a> {
    b: &'a [u8],
    /// The same bytes, known to be UTF-8.
    s: &'a str,
    i: usize,
}

impl<'a> Scan<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.b.get(self.i) == Some(&c)).then(|| self.i += 1)
    }

    fn lit(&mut self, word: &[u8]) -> Option<()> {
        self.b[self.i..].starts_with(word).then(|| self.i += word.len())
    }

    fn value(&mut self, n: &Node, depth: usize) -> Option<()> {
        if depth > 64 {
            return None;
        }
        match *self.b.get(self.i)? {
            b'{' => self.object(pick(n, Types::OBJECT)?, depth),
            b'[' => self.array(pick(n, Types::ARRAY)?, depth),
            b'"' => {
                let s = self.string()?;
                string_ok(pick(n, Types::STRING)?, s).then_some(())
            }
            b't' => {
                self.lit(b"true")?;
                scalar_enum_ok(pick(n, Types::BOOL)?, &Value::Bool(true)).then_some(())
            }
            b'f' => {
                self.lit(b"false")?;
                scalar_enum_ok(pick(n, Types::BOOL)?, &Value::Bool(false)).then_some(())
            }
            b'n' => {
                self.lit(b"null")?;
                scalar_enum_ok(pick(n, Types::NULL)?, &Value::Null).then_some(())
            }
            b'-' | b'0'..=b'9' => self.number(n),
            _ => None,
        }
    }

    /// A string without escapes or control characters; its contents.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        let len = self.b[start..].iter().position(|&c| STOPS_STRING[usize::from(c)])?;
        self.i = start + len;
        if self.b[self.i] != b'"' {
            return None;
        }
        // Both ends are ASCII quotes, so the slice falls on character boundaries.
        let s = self.s.get(start..self.i)?;
        self.i += 1;
        Some(s)
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.b.get(self.i).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self, n: &Node) -> Option<()> {
        let start = self.i;
        let negative = self.eat(b'-').is_some();
        let int_start = self.i;
        let int_len = self.digits();
        if int_len == 0 || (int_len > 1 && self.b[int_start] == b'0') {
            return None;
        }
        let (mut frac_start, mut frac_len) = (self.i, 0);
        let mut float = false;
        if self.eat(b'.').is_some() {
            float = true;
            frac_start = self.i;
            frac_len = self.digits();
            if frac_len == 0 {
                return None;
            }
        }
        let mut exp: i32 = 0;
        if let Some(b'e' | b'E') = self.b.get(self.i) {
            float = true;
            self.i += 1;
            let neg_exp = match self.b.get(self.i) {
                Some(b'-') => {
                    self.i += 1;
                    true
                }
                Some(b'+') => {
                    self.i += 1;
                    false
                }
                _ => false,
            };
            let e_start = self.i;
            let e_len = self.digits();
            if e_len == 0 || e_len > 3 {
                return None;
            }
            let e: i32 = std::str::from_utf8(&self.b[e_start..self.i]).ok()?.parse().ok()?;
            exp = if neg_exp { -e } else { e };
        }
        // The decimal significand: integer digits then fraction digits, leading zeros
        // dropped; at most 15 significant digits.
        let mut m: u64 = 0;
        let mut sig = 0;
        for &c in
            self.b[int_start..int_start + int_len].iter().chain(&self.b[frac_start..frac_start + frac_len])
        {
            if m == 0 && c == b'0' {
                continue;
            }
            sig += 1;
            if sig > 15 {
                return None;
            }
            m = m * 10 + u64::from(c - b'0');
        }
        let _ = start;
        if !float {
            // An integer literal: what serde_json reads as u64/i64.
            if negative && m == 0 {
                return None;
            }
            let node = pick(n, Types::INTEGER)?;
            let x = m as f64;
            let x = if negative { -x } else { x };
            return (m <= EXACT && node.enum_.is_none() && in_bounds(node, x)).then_some(());
        }
        let e10 = exp - frac_len as i32;
        if !(-22..=22).contains(&e10) {
            return None;
        }
        let mut x = m as f64;
        x = if e10 >= 0 { x * POW10[e10 as usize] } else { x / POW10[(-e10) as usize] };
        if negative {
            x = -x;
        }
        // A float literal satisfies `number`; whether `1.0` is an `integer` differs between
        // drafts, so only number-typed schemas take floats here.
        let node = if n.branches.is_empty() {
            Some(n).filter(|n| n.types.0 & Types::NUMBER != 0)
        } else {
            n.branches.iter().find(|b| b.types.0 & Types::NUMBER != 0)
        }?;
        (x.is_finite() && x.abs() <= EXACT as f64 && node.enum_.is_none() && in_bounds(node, x)).then_some(())
    }

    fn array(&mut self, n: &Node, depth: usize) -> Option<()> {
        if n.enum_.is_some() {
            return None;
        }
        self.eat(b'[')?;
        self.ws();
        let mut len = 0usize;
        if self.eat(b']').is_none() {
            loop {
                match &n.items {
                    Some(item) => self.value(item, depth + 1)?,
                    None => self.value(&ANY, depth + 1)?,
                }
                len += 1;
                self.ws();
                if self.eat(b',').is_some() {
                    self.ws();
                    continue;
                }
                self.eat(b']')?;
                break;
            }
        }
        (n.min_items.is_none_or(|m| len >= m) && n.max_items.is_none_or(|m| len <= m)).then_some(())
    }

    fn object(&mut self, n: &Node, depth: usize) -> Option<()> {
        if n.enum_.is_some() || n.required.len() > 64 {
            return None;
        }
        self.eat(b'{')?;
        self.ws();
        let mut seen = 0u64;
        // Keys met so far, to refuse duplicates (the general parser does, and a
        // first-wins backend would read another value than the one checked): one bit per
        // declared property, a short list of the others. Beyond what these hold, doubt.
        let mut props_met = 0u64;
        let mut others: [&str; 16] = [""; 16];
        let mut others_met = 0;
        if self.eat(b'}').is_none() {
            loop {
                let key = self.string()?;
                self.ws();
                self.eat(b':')?;
                self.ws();
                match n.props.iter().position(|(name, _)| name == key) {
                    Some(p) => {
                        let bit = 1u64.checked_shl(u32::try_from(p).ok()?)?;
                        if props_met & bit != 0 {
                            return None;
                        }
                        props_met |= bit;
                        seen |= n.prop_bits[p];
                        self.value(&n.props[p].1, depth + 1)?;
                    }
                    None if n.additional => {
                        if others_met == others.len() || others[..others_met].contains(&key) {
                            return None;
                        }
                        others[others_met] = key;
                        others_met += 1;
                        // A required key the schema gives no property schema for.
                        if let Some(i) = n.required.iter().position(|r| r == key) {
                            seen |= 1 << i;
                        }
                        self.value(&ANY, depth + 1)?;
                    }
                    None => return None,
                }
                self.ws();
                if self.eat(b',').is_some() {
                    self.ws();
                    continue;
                }
                self.eat(b'}')?;
                break;
            }
        }
        let all = if n.required.len() == 64 { u64::MAX } else { (1u64 << n.required.len()) - 1 };
        (seen == all).then_some(())
    }
}

/// The schema that accepts anything (what an unconstrained value is checked against, so
/// its JSON is still scanned strictly).
static ANY: Node = Node {
    types: Types(Types::ALL),
    min: Vec::new(),
    max: Vec::new(),
    min_len: None,
    max_len: None,
    format: None,
    enum_: None,
    props: Vec::new(),
    required: Vec::new(),
    prop_bits: Vec::new(),
    additional: true,
    items: None,
    min_items: None,
    max_items: None,
    branches: Vec::new(),
};

/// The node that applies to a value of JSON type `t`.
fn pick(n: &Node, t: u8) -> Option<&Node> {
    if !n.types.has(t) {
        return None;
    }
    if n.branches.is_empty() {
        return Some(n);
    }
    n.branches.iter().find(|b| b.types.has(t))
}

fn in_bounds(n: &Node, x: f64) -> bool {
    n.min.iter().all(|b| if b.exclusive { x > b.at } else { x >= b.at })
        && n.max.iter().all(|b| if b.exclusive { x < b.at } else { x <= b.at })
}

/// RFC 3339 `date-time`, the strict common form: upper-case `T` and `Z`, seconds 00-59.
fn date_time_ok(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 20 || !s.get(..10).is_some_and(crate::formats::date_format) || b[10] != b'T' {
        return false;
    }
    let two = |i: usize| -> Option<u32> {
        let (x, y) = (*b.get(i)?, *b.get(i + 1)?);
        (x.is_ascii_digit() && y.is_ascii_digit()).then(|| u32::from(x - b'0') * 10 + u32::from(y - b'0'))
    };
    let ok_time =
        matches!((two(11), two(14), two(17)), (Some(h), Some(m), Some(sec)) if h < 24 && m < 60 && sec < 60);
    if !ok_time || b[13] != b':' || b[16] != b':' {
        return false;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match b.get(i) {
        Some(b'Z') => i + 1 == b.len(),
        Some(b'+' | b'-') => {
            i + 6 == b.len()
                && b[i + 3] == b':'
                && matches!((two(i + 1), two(i + 4)), (Some(h), Some(m)) if h < 24 && m < 60)
        }
        _ => false,
    }
}

/// Dotted-quad IPv4 (what the general validator accepts for `format: ipv4`): four decimal
/// parts of 0–255, no leading zeros. One pass over the bytes.
fn ipv4_ok(s: &str) -> bool {
    let (mut parts, mut value, mut digits, mut first) = (0, 0u32, 0, 0u8);
    for &c in s.as_bytes().iter().chain(std::iter::once(&b'.')) {
        if c == b'.' {
            if digits == 0 || (digits > 1 && first == b'0') || value > 255 {
                return false;
            }
            parts += 1;
            (value, digits) = (0, 0);
        } else if c.is_ascii_digit() && digits < 3 {
            if digits == 0 {
                first = c;
            }
            value = value * 10 + u32::from(c - b'0');
            digits += 1;
        } else {
            return false;
        }
    }
    parts == 4
}

fn string_ok(n: &Node, s: &str) -> bool {
    // A string of at most `max` bytes has at most `max` characters: count only when needed.
    let bytes_fit = n.max_len.is_none_or(|m| s.len() <= m) && n.min_len.is_none_or(|m| m == 0);
    if !bytes_fit {
        let len = s.chars().count();
        if n.min_len.is_some_and(|m| len < m) || n.max_len.is_some_and(|m| len > m) {
            return false;
        }
    }
    if let Some(e) = &n.enum_
        && !e.iter().any(|v| v.as_str() == Some(s))
    {
        return false;
    }
    match n.format {
        None => true,
        Some(Format::DateTime) => date_time_ok(s),
        // The very functions the general validator registers for these formats.
        Some(Format::Date) => crate::formats::date_format(s),
        Some(Format::Ipv4) => ipv4_ok(s),
        Some(Format::Uuid) => crate::formats::uuid_format(s),
    }
}

fn scalar_enum_ok(n: &Node, v: &Value) -> bool {
    n.enum_.as_ref().is_none_or(|e| e.contains(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ipv4_matches_the_standard_parser() {
        let mut cases: Vec<String> = [
            "0.0.0.0",
            "255.255.255.255",
            "10.20.30.40",
            "1.2.3",
            "1.2.3.4.5",
            "1.2.3.4.",
            ".1.2.3.4",
            "1..2.3",
            "01.2.3.4",
            "1.2.3.00",
            "256.1.1.1",
            "1.2.3.1000",
            "",
            "a.b.c.d",
            "1.2.3.-4",
            "1.2.3.4 ",
            "१.2.3.4",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        for a in [0, 1, 9, 10, 99, 100, 199, 249, 250, 255, 256, 999] {
            cases.push(format!("{a}.{a}.1.{a}"));
            cases.push(format!("0{a}.1.1.1"));
        }
        for c in &cases {
            assert_eq!(ipv4_ok(c), c.parse::<std::net::Ipv4Addr>().is_ok(), "{c:?}");
        }
    }

    #[test]
    fn accepts_only_what_is_certainly_valid() {
        let doc = json!({});
        let schema = json!({
            "type": "object", "additionalProperties": false, "required": ["t", "at"],
            "properties": {
                "t": {"type": "number", "minimum": -50, "maximum": 150},
                "h": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
                "at": {"type": "string", "format": "date-time"},
                "seq": {"type": "integer", "minimum": 0, "allOf": [{"minimum": -9.0e15, "maximum": 9.0e15}]},
                "b": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 100}, {"type": "string", "enum": ["external"]}]},
                "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 3}},
                "ip": {"type": "string", "format": "ipv4"}
            }
        });
        let f = compile(&doc, &schema, true).unwrap();
        for ok in [
            r#"{"t": 21.5, "at": "2026-11-25T10:00:00Z"}"#,
            r#"{"t": 0, "at": "2026-11-25T10:00:00.123+01:00", "h": null, "seq": 5, "b": "external", "tags": ["a", "bcd"], "ip": "10.0.0.1"}"#,
            r#"{"t": 150, "at": "2024-02-29T23:59:59Z", "b": 100}"#,
        ] {
            assert!(f.accepts(ok.as_bytes()), "{ok}");
        }
        for doubtful in [
            r#"{"t": 151, "at": "2026-11-25T10:00:00Z"}"#,
            r#"{"t": 1}"#,
            r#"{"t": 1, "at": "2026-11-25T10:00:00Z", "extra": 1}"#,
            r#"{"t": 1, "at": "2026-11-25 10:00:00Z"}"#,
            r#"{"t": 1, "at": "2023-02-29T10:00:00Z"}"#,
            r#"{"t": 1, "at": "2026-11-25T10:00:00Z", "seq": 1.0}"#,
            r#"{"t": 1, "at": "2026-11-25T10:00:00Z", "b": "internal"}"#,
            r#"{"t": 1, "at": "2026-11-25T10:00:00Z", "tags": ["a", "b", "c"]}"#,
            r#"{"t": 1, "at": "2026-11-25T10:00:00Z", "tags": ["abcd"]}"#,
            r#"{"t": 1, "at": "2026-11-25T10:00:00Z", "ip": "010.0.0.1"}"#,
            r#"{"t": 1, "at": "2026-11-25T10:00:00Z", "seq": 18446744073709551615}"#,
            r#"{"t": 1, "at": "2026-11-25T10:00:00Z"} trailing"#,
            r#"[1]"#,
            r#"{"t": 1, "at": "#,
            r#"{"t": 1, "t": 2, "at": "2026-11-25T10:00:00Z"}"#,
        ] {
            assert!(!f.accepts(doubtful.as_bytes()), "{doubtful}");
        }
        // Free-form objects: duplicate keys are doubted at any depth.
        let free = compile(&doc, &json!({"type": "object"}), true).unwrap();
        assert!(free.accepts(br#"{"a": {"x": 1, "y": 2}, "b": 1}"#));
        assert!(!free.accepts(br#"{"a": 1, "b": 2, "a": 3}"#));
        assert!(!free.accepts(br#"{"a": {"x": 1, "x": 2}}"#));
    }

    #[test]
    fn unknown_keywords_mean_no_fast_path() {
        let doc = json!({});
        for s in [
            json!({"type": "string", "pattern": "^a"}),
            json!({"type": "string", "format": "email"}),
            json!({"oneOf": [{"type": "number"}, {"type": "integer"}]}),
            json!({"type": "object", "additionalProperties": {"type": "string"}}),
            json!({"enum": [1, 2]}),
            json!({"not": {}}),
        ] {
            assert!(compile(&doc, &s, false).is_err(), "{s}");
        }
    }
}
