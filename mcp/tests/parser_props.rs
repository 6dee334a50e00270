//! Properties of the one JSON-RPC parser, whatever the input: a message it
//! accepts re-parses from its canonical form to the same message, and a
//! message holding a duplicate key is always refused.

use portico_mcp::jsonrpc::{Message, PARSE_ERROR};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Arbitrary JSON values, a few levels deep, with tricky strings.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z\\\\\"/\u{0}-\u{1f}\u{7f}-\u{3000}]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A valid id: a string, or an integer within 2^53 - 1 in size.
fn id() -> impl Strategy<Value = Value> {
    const MAX: i64 = portico_mcp::jsonrpc::MAX_SAFE_ID as i64;
    prop_oneof![
        (-MAX..=MAX).prop_map(Value::from),
        Just(Value::from(MAX)),
        Just(Value::from(-MAX)),
        "[ -~]{0,10}".prop_map(Value::String),
    ]
}

/// Valid requests, notifications and responses.
fn message() -> impl Strategy<Value = Value> {
    let params = || {
        prop::collection::btree_map("[a-z]{1,6}", value(), 0..5)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    };
    prop_oneof![
        (id(), "[a-z/]{1,16}", params())
            .prop_map(|(i, m, p)| json!({"jsonrpc": "2.0", "id": i, "method": m, "params": p})),
        ("[a-z/]{1,16}", params())
            .prop_map(|(m, p)| json!({"jsonrpc": "2.0", "method": m, "params": p})),
        (id(), value()).prop_map(|(i, r)| json!({"jsonrpc": "2.0", "id": i, "result": r})),
        (id(), any::<i32>(), "[ -~]{0,20}").prop_map(|(i, c, m)| {
            json!({"jsonrpc": "2.0", "id": i, "error": {"code": c, "message": m}})
        }),
    ]
}

/// The JSON text of an object with `key` written twice, at the top level
/// or inside `params`, the second time possibly with an escaped letter.
fn with_duplicate(msg: &Value, key: &str, escape: bool, nested: bool) -> String {
    let spelled = if escape {
        let mut cs = key.chars();
        let first = cs
            .next()
            .map(|c| format!("\\u{:04x}", c as u32))
            .unwrap_or_default();
        format!("{first}{}", cs.as_str())
    } else {
        key.to_string()
    };
    let text = msg.to_string();
    let body = text.strip_suffix('}').unwrap_or(&text);
    if nested {
        format!(r#"{body},"params":{{"{key}":1,"{spelled}":2}}}}"#)
    } else {
        format!(r#"{body},"{key}":1,"{spelled}":2}}"#)
    }
}

proptest! {
    #[test]
    fn ids_beyond_2_pow_53_are_refused(
        n in prop_oneof![
            (portico_mcp::jsonrpc::MAX_SAFE_ID as i64 + 1)..=i64::MAX,
            i64::MIN..=-(portico_mcp::jsonrpc::MAX_SAFE_ID as i64 + 1),
        ],
    ) {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{n},"method":"ping"}}"#);
        prop_assert!(Message::parse(body.as_bytes()).is_err());
    }

    #[test]
    fn canonical_form_reparses_to_the_same_message(v in message()) {
        let bytes = serde_json::to_vec(&v).expect("serialise");
        let m = Message::parse(&bytes).expect("a valid message parses");
        let again = Message::parse(&m.to_bytes()).expect("the canonical form parses");
        prop_assert_eq!(&again, &m);
        prop_assert_eq!(again.to_bytes(), m.to_bytes());
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_accepted_ones_are_stable(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(m) = Message::parse(&bytes) {
            prop_assert_eq!(Message::parse(&m.to_bytes()).expect("canonical parses"), m);
        }
    }

    #[test]
    fn duplicate_keys_are_always_refused(
        v in message(),
        key in "[a-z]{1,8}",
        escape in any::<bool>(),
        nested in any::<bool>(),
    ) {
        // `params` holds the nested duplicate, so the top level must not have one already.
        let mut v = v;
        if nested && let Some(o) = v.as_object_mut() {
            o.remove("params");
        }
        if !nested && let Some(o) = v.as_object_mut() {
            o.remove(&key);
        }
        let text = with_duplicate(&v, &key, escape, nested);
        let e = Message::parse(text.as_bytes()).expect_err("a duplicate key is refused");
        prop_assert_eq!(e.code, PARSE_ERROR);
        let e = Message::parse_body(format!("[{text}]").as_bytes()).expect_err("also inside a batch");
        prop_assert_eq!(e.code, PARSE_ERROR);
    }
}
