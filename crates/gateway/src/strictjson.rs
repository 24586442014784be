//! JSON parsed into a [`Value`] the way serde_json does, except that an object naming
//! the same key twice is an error.
//!
//! `{"interval": 999999, "interval": 60}` is valid to serde_json (the last value wins)
//! but a first-wins backend reads 999999: a body validated one way and acted on another.
//! RFC 8259 leaves duplicate names to the implementation, so the gateway refuses them.
//! The nesting limit is serde_json's own (128).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Parses one JSON document; duplicate object keys are an error naming the key.
pub fn from_slice(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// [`from_slice`] for text.
pub fn from_str(text: &str) -> Result<Value, serde_json::Error> {
    from_slice(text.as_bytes())
}

#[derive(Clone, Copy)]
struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                let shown: String = key.chars().take(64).collect();
                return Err(de::Error::custom(format_args!("duplicate object key {shown:?}")));
            }
            let value = map.next_value_seed(self)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_values_as_serde_json_without_duplicates() {
        for doc in [
            r#"{"a": [1, -2, 3.5, 1e400, 18446744073709551615, -9223372036854775808], "b": {"c": null}}"#,
            r#""text with \u00e9 and \" escapes""#,
            "[true, false, null, {}, []]",
            r#"{"a": {"x": 1}, "b": {"x": 2}}"#,
        ] {
            let ours = from_str(doc).map_err(|e| e.to_string());
            let theirs = serde_json::from_str::<Value>(doc).map_err(|e| e.to_string());
            assert_eq!(ours, theirs, "{doc}");
        }
    }

    #[test]
    fn duplicate_keys_are_refused_at_every_depth() {
        for doc in [
            r#"{"interval": 999999, "interval": 60}"#,
            r#"{"a": {"x": 1, "x": 2}}"#,
            r#"[{"k": 1, "k": 1}]"#,
            r#"{"\u0069nterval": 1, "interval": 2}"#,
        ] {
            let e = from_str(doc).unwrap_err().to_string();
            assert!(e.contains("duplicate object key"), "{doc}: {e}");
        }
        assert!(from_str("{} {}").is_err(), "trailing data");
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(from_str(&deep).is_err(), "nesting beyond serde_json's limit");
    }
}
