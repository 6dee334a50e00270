//! An emitted audit event's fields as they are stored: the sender's JSON
//! object, with `actor` set to the service that sent it whatever the sender
//! wrote there.
//!
//! Portico's services send objects without `actor` and without repeated
//! keys. Such an object is checked in one pass that builds nothing (valid
//! JSON, an object, nothing after it, no object in it repeating a key) and
//! stored as sent with the actor written in front of its keys. Anything
//! else (an `actor` of the sender's own, a repeated key at any depth) is
//! read into a value, where the last of a repeated key wins and the actor
//! replaces the sender's, and stored as that value prints: what is stored
//! never holds a key twice.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Why fields cannot be stored.
#[derive(Debug, PartialEq)]
pub enum Invalid {
    NotAnObject,
    Json(String),
}

/// The fields `json` with `actor` set (an empty text is an empty object).
pub fn with_actor(json: &str, actor: &str) -> Result<String, Invalid> {
    let text = json.trim_matches([' ', '\t', '\n', '\r']);
    let quoted = serde_json::Value::from(actor).to_string();
    if text.is_empty() {
        return Ok(format!("{{\"actor\":{quoted}}}"));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let top = de
        .deserialize_map(TopVisitor)
        .and_then(|top| de.end().map(|()| top))
        .map_err(|e| match e.classify() {
            serde_json::error::Category::Data => Invalid::NotAnObject,
            _ => Invalid::Json(e.to_string()),
        })?;
    if !top.actor && !top.repeated {
        // `text` is an object: it opens with `{`.
        let rest = &text[1..];
        let sep = if top.empty { "" } else { "," };
        return Ok(format!("{{\"actor\":{quoted}{sep}{rest}"));
    }
    let mut fields = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(m)) => m,
        Ok(_) => return Err(Invalid::NotAnObject),
        Err(e) => return Err(Invalid::Json(e.to_string())),
    };
    fields.insert("actor".into(), serde_json::Value::String(actor.into()));
    Ok(serde_json::Value::Object(fields).to_string())
}

/// What the pass saw of the top-level object.
struct Top {
    actor: bool,
    empty: bool,
    /// Some object, at any depth, holds a key twice.
    repeated: bool,
}

struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Top;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Top, A::Error> {
        let mut top = Top {
            actor: false,
            empty: true,
            repeated: false,
        };
        top.repeated = keys(map, |key| {
            top.empty = false;
            top.actor |= key == "actor";
        })?;
        Ok(top)
    }
}

/// Reads an object's entries; true if a key comes twice here or in a value.
fn keys<'de, A: MapAccess<'de>>(mut map: A, mut each: impl FnMut(&str)) -> Result<bool, A::Error> {
    // Few keys are compared in a list; many in a set.
    let mut seen: Vec<Cow<'de, str>> = Vec::new();
    let mut many: Option<HashSet<Cow<'de, str>>> = None;
    let mut repeated = false;
    while let Some(key) = map.next_key_seed(Key)? {
        each(&key);
        let again = match &mut many {
            Some(set) => !set.insert(key),
            None if seen.len() < 16 => {
                let again = seen.contains(&key);
                seen.push(key);
                again
            }
            None => {
                let mut set: HashSet<Cow<'de, str>> = seen.drain(..).collect();
                let again = !set.insert(key);
                many = Some(set);
                again
            }
        };
        repeated |= again;
        repeated |= map.next_value_seed(Any)?;
    }
    Ok(repeated)
}

/// A key, borrowed from the text when it has no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// Any JSON value, read without being built; true if some object in it
/// holds a key twice.
struct Any;

impl<'de> DeserializeSeed<'de> for Any {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(AnyVisitor)
    }
}

struct AnyVisitor;

impl<'de> Visitor<'de> for AnyVisitor {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
        if v.is_finite() {
            Ok(false)
        } else {
            Err(E::custom("a number that is not finite"))
        }
    }
    fn visit_str<E>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        let mut repeated = false;
        while let Some(r) = seq.next_element_seed(Any)? {
            repeated |= r;
        }
        Ok(repeated)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<bool, A::Error> {
        keys(map, |_| {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn stored(json: &str) -> Value {
        let s = with_actor(json, "proxy-1").expect("stored");
        assert_no_key_twice(&s);
        serde_json::from_str(&s).expect("stored fields are JSON")
    }

    /// What is stored never holds a key twice, at any depth.
    fn assert_no_key_twice(s: &str) {
        let mut de = serde_json::Deserializer::from_str(s);
        let top = de.deserialize_map(TopVisitor).expect("an object");
        assert!(!top.repeated, "{s}");
    }

    #[test]
    fn the_actor_is_the_sender_whatever_the_fields_say() {
        assert_eq!(stored(""), json!({"actor": "proxy-1"}));
        assert_eq!(stored(" {} "), json!({"actor": "proxy-1"}));
        assert_eq!(
            stored(r#"{"user":"alice","n":{"a":[1,2.5,null,true]}}"#),
            json!({"actor": "proxy-1", "user": "alice", "n": {"a": [1, 2.5, null, true]}})
        );
        // The fast path keeps the sender's text after the actor.
        assert_eq!(
            with_actor(r#"{"user":"alice"}"#, "p\"q").expect("stored"),
            r#"{"actor":"p\"q","user":"alice"}"#
        );
        for claimed in [
            r#"{"actor":"admin","user":"alice"}"#,
            r#"{"user":"alice","actor":"admin"}"#,
            r#"{"act\u006fr":"admin","user":"alice"}"#,
            r#"{"actor":"a","actor":"b"}"#,
        ] {
            let v = stored(claimed);
            assert_eq!(v["actor"], "proxy-1", "{claimed}");
            assert_eq!(
                v.as_object().map(|m| m.len()),
                Some(if claimed.contains("user") { 2 } else { 1 })
            );
        }
    }

    #[test]
    fn repeated_keys_are_stored_once_at_any_depth() {
        assert_eq!(stored(r#"{"user":"a","user":"b"}"#)["user"], "b");
        assert_eq!(stored(r#"{"x":{"k":1,"k":2}}"#)["x"], json!({"k": 2}));
        assert_eq!(stored(r#"{"x":[{"k":1,"k":2}]}"#)["x"], json!([{"k": 2}]));
        assert_eq!(stored(r#"{"user":"a","us\u0065r":"b"}"#)["user"], "b");
        // Past the list, in the set.
        let many: Vec<String> = (0..40).map(|i| format!("\"k{i}\":{i}")).collect();
        let text = format!("{{{},\"k3\":99}}", many.join(","));
        assert_eq!(stored(&text)["k3"], 99);
        let text = format!("{{{}}}", many.join(","));
        assert_eq!(stored(&text).as_object().map(|m| m.len()), Some(41));
    }

    #[test]
    fn only_one_json_object_is_taken() {
        for bad in ["[1]", "\"s\"", "3", "null"] {
            assert_eq!(with_actor(bad, "p"), Err(Invalid::NotAnObject), "{bad}");
        }
        for bad in [
            "{",
            "{\"a\":}",
            "{} {}",
            "{\"a\":1}x",
            "{\"a\":1e999}",
            "{\"a\":\"\\ud800\"}x",
        ] {
            assert!(
                matches!(with_actor(bad, "p"), Err(Invalid::Json(_))),
                "{bad}"
            );
        }
    }
}
