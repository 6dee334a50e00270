//! The JSON-RPC 2.0 message model of MCP. Every message is read by one
//! strict function ([`Message::parse`]) and written back in one canonical
//! form ([`Message::to_bytes`]): a gateway checks the parsed message and
//! forwards exactly that, so no difference between two JSON parsers can
//! change what a message means after it was checked.

use std::fmt;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::strict;

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
/// Server errors: the session ended, no agent, and the like.
pub const SERVER_ERROR: i64 = -32000;

/// The members a JSON-RPC message may have; anything else is refused, so
/// nothing travels that was not checked.
const MEMBERS: [&str; 6] = ["jsonrpc", "id", "method", "params", "result", "error"];

/// The largest integer id taken, in size: 2^53 - 1, the largest integer a
/// double holds exactly (JavaScript's `Number.MAX_SAFE_INTEGER`). Beyond it
/// a server that parses ids as doubles would read `2^53 + 1` as `2^53` and
/// answer one request with another's id.
pub const MAX_SAFE_ID: u64 = (1 << 53) - 1;

/// A request id: MCP allows a string or an integer, never null.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Id {
    Int(i64),
    Str(String),
}

impl Id {
    pub fn from_value(v: &Value) -> Result<Id, &'static str> {
        match v {
            Value::String(s) => Ok(Id::Str(s.clone())),
            Value::Number(n) => n
                .as_i64()
                .filter(|i| i.unsigned_abs() <= MAX_SAFE_ID)
                .map(Id::Int)
                .ok_or("\"id\" must be a string or an integer of at most 2^53 - 1 in size (no fractions or exponents): a larger one reads as another in the many JSON parsers that hold numbers as doubles"),
            Value::Null => Err("\"id\" must not be null"),
            _ => Err("\"id\" must be an integer or a string"),
        }
    }

    /// The id of the other type with the same text (`7` and `"7"`): a
    /// server that reads ids loosely may take one for the other.
    pub fn twin(&self) -> Option<Id> {
        match self {
            Id::Int(i) => Some(Id::Str(i.to_string())),
            Id::Str(s) => s
                .parse::<i64>()
                .ok()
                .filter(|i| i.to_string() == *s)
                .map(Id::Int),
        }
    }

    pub fn to_value(&self) -> Value {
        match self {
            Id::Int(i) => Value::from(*i),
            Id::Str(s) => Value::String(s.clone()),
        }
    }
}

/// The id's canonical JSON text.
impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Int(i) => write!(f, "{i}"),
            Id::Str(s) => f.write_str(&Value::String(s.clone()).to_string()),
        }
    }
}

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Request,
    Notification,
    Response,
    ErrorResponse,
}

/// One checked JSON-RPC message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    obj: Map<String, Value>,
    id: Option<Id>,
    shape: Shape,
}

/// Why a message was refused, as a JSON-RPC error code and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub code: i64,
    pub message: String,
    /// The id, when the message had a valid one: the error answers it.
    pub id: Option<Id>,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ParseError {}

fn invalid(message: impl Into<String>, id: Option<Id>) -> ParseError {
    ParseError {
        code: INVALID_REQUEST,
        message: format!("invalid request: {}", message.into()),
        id,
    }
}

fn parse_error(e: impl fmt::Display) -> ParseError {
    ParseError {
        code: PARSE_ERROR,
        message: format!("parse error: {e}"),
        id: None,
    }
}

impl Message {
    /// Reads one message strictly: valid UTF-8 JSON, no duplicate keys at
    /// any depth, `"jsonrpc": "2.0"`, an id that is a string or an integer,
    /// a string method, and a response with exactly one of result or error.
    pub fn parse(bytes: &[u8]) -> Result<Message, ParseError> {
        let v = strict::from_slice(bytes).map_err(parse_error)?;
        Message::from_value(v)
    }

    /// Checks an already strictly parsed value (one element of a batch, say).
    fn from_value(v: Value) -> Result<Message, ParseError> {
        let Value::Object(obj) = v else {
            return Err(invalid("a message must be a JSON object", None));
        };
        let id = match obj.get("id") {
            None => None,
            Some(v) => Some(Id::from_value(v).map_err(|e| invalid(e, None))?),
        };
        if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Err(invalid("\"jsonrpc\" must be \"2.0\"", id));
        }
        if let Some(k) = obj.keys().find(|k| !MEMBERS.contains(&k.as_str())) {
            let shown: String = k.chars().take(64).collect();
            return Err(invalid(
                format!(
                    "{shown:?} is not a JSON-RPC member (jsonrpc, id, method, params, result, error)"
                ),
                id,
            ));
        }
        if obj.contains_key("method") && (obj.contains_key("result") || obj.contains_key("error")) {
            return Err(invalid(
                "a message is a request or a response, not both: it has \"method\" and a result or error",
                id,
            ));
        }
        let shape = match obj.get("method") {
            Some(Value::String(_)) if id.is_some() => Shape::Request,
            Some(Value::String(_)) => Shape::Notification,
            Some(_) => return Err(invalid("\"method\" must be a string", id)),
            None => {
                if id.is_none() {
                    return Err(invalid("a message needs a method or an id", None));
                }
                match (obj.contains_key("result"), obj.contains_key("error")) {
                    (true, false) => Shape::Response,
                    (false, true) => Shape::ErrorResponse,
                    _ => {
                        return Err(invalid(
                            "a response needs exactly one of \"result\" and \"error\"",
                            id,
                        ));
                    }
                }
            }
        };
        if let Some(p) = obj.get("params")
            && !matches!(p, Value::Object(_) | Value::Array(_) | Value::Null)
        {
            return Err(invalid("\"params\" must be an object or an array", id));
        }
        if shape == Shape::ErrorResponse && !obj.get("error").is_some_and(Value::is_object) {
            return Err(invalid("\"error\" must be an object", id));
        }
        Ok(Message { obj, id, shape })
    }

    /// Reads a POST body: one message, or a non-empty batch of them. Every
    /// element is checked as [`Message::parse`] checks a single message.
    pub fn parse_body(bytes: &[u8]) -> Result<Vec<Message>, ParseError> {
        let v = strict::from_slice(bytes).map_err(parse_error)?;
        match v {
            Value::Array(items) => {
                if items.is_empty() {
                    return Err(invalid("an empty batch", None));
                }
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| {
                        Message::from_value(item).map_err(|mut e| {
                            e.message = format!("batch element {i}: {}", e.message);
                            e
                        })
                    })
                    .collect()
            }
            v => Message::from_value(v).map(|m| vec![m]),
        }
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }
    pub fn id(&self) -> Option<&Id> {
        self.id.as_ref()
    }
    pub fn is_request(&self) -> bool {
        self.shape == Shape::Request
    }
    pub fn is_response(&self) -> bool {
        matches!(self.shape, Shape::Response | Shape::ErrorResponse)
    }
    pub fn is_error(&self) -> bool {
        self.shape == Shape::ErrorResponse
    }
    pub fn method(&self) -> Option<&str> {
        self.obj.get("method").and_then(Value::as_str)
    }
    pub fn params(&self) -> Option<&Value> {
        self.obj.get("params")
    }
    /// A string at `params.<path...>`, when it is one.
    pub fn param_str(&self, path: &[&str]) -> Option<&str> {
        let mut v = self.params()?;
        for p in path {
            v = v.get(p)?;
        }
        v.as_str()
    }
    pub fn result(&self) -> Option<&Value> {
        self.obj.get("result")
    }
    pub fn result_mut(&mut self) -> Option<&mut Value> {
        self.obj.get_mut("result")
    }
    /// `error.message` of an error response, cut to 300 characters.
    pub fn error_message(&self) -> Option<String> {
        let m = self.obj.get("error")?.get("message")?.as_str()?;
        Some(m.chars().take(300).collect())
    }

    /// The canonical serialisation: what is forwarded, never the input bytes.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(&self.obj).unwrap_or_default())
    }

    /// The canonical form followed by a newline: one line of a stdio
    /// stream, written in one buffer.
    pub fn to_line(&self) -> Bytes {
        let mut v = Vec::with_capacity(256);
        if serde_json::to_writer(&mut v, &self.obj).is_err() {
            v.clear();
        }
        v.push(b'\n');
        Bytes::from(v)
    }

    /// The message with another id (for a request replayed under a new id).
    pub fn with_id(&self, id: Id) -> Message {
        let mut obj = self.obj.clone();
        obj.insert("id".into(), id.to_value());
        Message {
            obj,
            id: Some(id),
            shape: self.shape,
        }
    }
}

/// An error response for `id` (or a null id when there is none).
pub fn error(id: Option<&Id>, code: i64, message: &str) -> Bytes {
    let id = id.map(Id::to_value).unwrap_or(Value::Null);
    let v = serde_json::json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}});
    Bytes::from(v.to_string())
}

/// `params.clientInfo.name`, `.version` and `params.protocolVersion` of an
/// `initialize` request, each cut short for the audit log.
pub fn client_info(init: &Message) -> (String, String, String) {
    let cut = |v: Option<&str>, n: usize| v.unwrap_or("").chars().take(n).collect::<String>();
    (
        cut(init.param_str(&["clientInfo", "name"]), 128),
        cut(init.param_str(&["clientInfo", "version"]), 64),
        cut(init.param_str(&["protocolVersion"]), 32),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(bytes: &[u8]) -> i64 {
        Message::parse(bytes).expect_err("refused").code
    }

    #[test]
    fn shapes() {
        let m = Message::parse(br#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#).expect("req");
        assert_eq!((m.shape(), m.id()), (Shape::Request, Some(&Id::Int(7))));
        let m = Message::parse(br#"{"jsonrpc":"2.0","id":"a","result":{}}"#).expect("resp");
        assert_eq!(m.shape(), Shape::Response);
        assert_eq!(m.id().map(ToString::to_string).as_deref(), Some("\"a\""));
        let m = Message::parse(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .expect("note");
        assert_eq!(m.shape(), Shape::Notification);
        let m = Message::parse(br#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m"}}"#)
            .expect("err");
        assert_eq!(m.error_message().as_deref(), Some("m"));
    }

    #[test]
    fn refusals() {
        assert_eq!(code(b"not json"), PARSE_ERROR);
        assert_eq!(
            code(br#"{"jsonrpc":"2.0","id":1,"method":"a","method":"b"}"#),
            PARSE_ERROR
        );
        for bad in [
            &br#"{"jsonrpc":"2.0","id":null,"method":"a"}"#[..],
            br#"{"jsonrpc":"2.0","id":7.0,"method":"a"}"#,
            br#"{"jsonrpc":"2.0","id":7e0,"method":"a"}"#,
            br#"{"jsonrpc":"2.0","id":[7],"method":"a"}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":5}"#,
            br#"{"jsonrpc":"1.0","id":1,"method":"a"}"#,
            br#"{"id":1,"method":"a"}"#,
            br#"{"jsonrpc":"2.0"}"#,
            br#"{"jsonrpc":"2.0","id":1}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":1,"error":{}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"a","params":"x"}"#,
            br#"[1]"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"a","extra":1}"#,
            br#"{"jsonrpc":"2.0","id":1,"METHOD":"a","error":{}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"a","result":{}}"#,
        ] {
            assert_eq!(
                code(bad),
                INVALID_REQUEST,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn escaped_strings_are_read_once() {
        let m = Message::parse(br#"{"jsonrpc":"2.0","id":"\u0037","method":"tools\/call","params":{"name":"get\u002dsum"}}"#)
            .expect("valid");
        assert_eq!(m.id(), Some(&Id::Str("7".into())));
        assert_eq!(m.method(), Some("tools/call"));
        assert_eq!(m.param_str(&["name"]), Some("get-sum"));
        let again = Message::parse(&m.to_bytes()).expect("canonical re-parses");
        assert_eq!(again, m);
        // A stdio line is the canonical form and a newline, nothing else.
        let line = m.to_line();
        assert_eq!(&line[..line.len() - 1], &m.to_bytes()[..]);
        assert_eq!(line.last(), Some(&b'\n'));
        assert!(!line[..line.len() - 1].contains(&b'\n'));
    }

    #[test]
    fn bodies() {
        let two = Message::parse_body(
            br#"[{"jsonrpc":"2.0","method":"a"},{"jsonrpc":"2.0","id":1,"method":"b"}]"#,
        )
        .expect("batch");
        assert_eq!(two.len(), 2);
        assert!(Message::parse_body(b"[]").is_err());
        let e = Message::parse_body(
            br#"[{"jsonrpc":"2.0","method":"a"},{"jsonrpc":"2.0","id":null,"method":"b"}]"#,
        )
        .expect_err("null id in a batch");
        assert!(e.message.contains("batch element 1"), "{e}");
        let e =
            Message::parse(&error(Some(&Id::Int(3)), INVALID_PARAMS, "no \"x\"")).expect("valid");
        assert_eq!((e.id(), e.is_error()), (Some(&Id::Int(3)), true));
        assert_eq!(e.error_message().as_deref(), Some("no \"x\""));
    }
}
