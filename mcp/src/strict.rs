//! The one place where JSON is read strictly: a JSON value in which no
//! object holds the same key twice, at any depth. Keys are compared after
//! unescaping, so `"name"` and `"na\u006de"` are the same key, and also
//! under case folding, so `"name"`, `"NAME"` and `"nameſ"`-style spellings
//! that a case-insensitive decoder (Go's `encoding/json`, say) would merge
//! cannot both appear: whichever one a server picked, it would not be the
//! one that was checked.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// A JSON value read with duplicate object keys refused.
pub struct StrictValue(pub Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        // Folded keys, kept only once a key that folds to something else
        // (upper case, or not ASCII) meets another key: keys in lower-case
        // ASCII fold to themselves, and equal keys are caught above.
        let mut folded: HashSet<String> = HashSet::new();
        let mut folding = false;
        while let Some(key) = map.next_key::<String>()? {
            let shown = || key.chars().take(64).collect::<String>();
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key {:?}", shown())));
            }
            if !folding && key.bytes().any(|b| b.is_ascii_uppercase() || !b.is_ascii()) {
                folding = true;
                folded.extend(out.keys().map(|k| fold(k)));
            }
            if folding && !folded.insert(fold(&key)) {
                return Err(de::Error::custom(format!(
                    "key {:?} differs from another key only in case",
                    shown()
                )));
            }
            let StrictValue(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// A key folded for comparison: the dotted and dotless `i` to `i` (as a
/// Turkish-locale lower-casing does), then every character to lower, upper
/// and lower case again, which merges what simple case folding merges (`ſ`
/// and `s`, the Kelvin sign and `k`, `ς` and `σ`, `ß` and `ẞ`). It merges a
/// few more (`ß` and `ss`), which only refuses more.
fn fold(key: &str) -> String {
    if key.is_ascii() {
        return key.to_ascii_lowercase();
    }
    key.chars()
        .map(|c| {
            if matches!(c, '\u{130}' | '\u{131}') {
                'i'
            } else {
                c
            }
        })
        .flat_map(char::to_lowercase)
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
        .collect()
}

/// Parses JSON text strictly: one value, nothing after it, no duplicate keys.
pub fn from_slice(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let StrictValue(v) = StrictValue::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_duplicates_at_any_depth() {
        assert!(from_slice(br#"{"a":1,"a":2}"#).is_err());
        assert!(from_slice(br#"{"a":{"b":1,"b":1}}"#).is_err());
        assert!(from_slice(br#"[{"x":[{"k":1,"k":2}]}]"#).is_err());
        assert!(from_slice(br#"{"name":1,"na\u006de":2}"#).is_err());
        assert!(from_slice(br#"{"a":1} x"#).is_err());
        assert!(from_slice(br#"{"name":1,"NAME":2}"#).is_err());
        assert!(from_slice("{\"params\":1,\"param\u{17f}\":2}".as_bytes()).is_err());
        assert!(from_slice("{\"k\":1,\"\u{212a}\":2}".as_bytes()).is_err());
        assert!(from_slice(br#"{"a":{"x":1,"X":2}}"#).is_err());
        assert!(from_slice("{\"gr\u{f6}\u{df}e\":1,\"GR\u{d6}\u{1e9e}E\":2}".as_bytes()).is_err());
        assert!(from_slice("{\"uri\":1,\"UR\u{130}\":2}".as_bytes()).is_err());
        // Many keys stay cheap: each is folded and looked up once.
        let many: String = (0..200_000)
            .map(|i| format!("\"k{i}\":0"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(from_slice(format!("{{{many}}}").as_bytes()).is_ok());
        let v = from_slice(br#"{"a":[1,-2,3.5,"s",null,true,{"b":{}}]}"#).expect("valid");
        assert_eq!(v["a"][1], -2);
    }
}
