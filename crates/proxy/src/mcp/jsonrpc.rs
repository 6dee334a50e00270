//! Just enough JSON-RPC to route messages without re-encoding them: the id,
//! the method, and whether a message is a response.

use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(default)]
    method: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

/// The routing view of one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Peek {
    /// The id's JSON text, used as the key that matches a response to its request.
    pub id: Option<String>,
    pub method: Option<String>,
    pub is_error: bool,
}

impl Peek {
    pub fn is_request(&self) -> bool {
        self.method.is_some() && self.id.is_some()
    }
    pub fn is_response(&self) -> bool {
        self.method.is_none() && self.id.is_some()
    }
}

pub fn peek(msg: &[u8]) -> Result<Peek, String> {
    let raw: Raw<'_> = serde_json::from_slice(msg).map_err(|e| e.to_string())?;
    if raw.method.is_none() && raw.id.is_none() {
        return Err("not a JSON-RPC message: it has neither a method nor an id".into());
    }
    if raw.method.is_none() && raw.result.is_none() && raw.error.is_none() {
        return Err("a JSON-RPC response needs a result or an error".into());
    }
    let id = raw.id.map(|r| r.get().to_string()).filter(|s| s != "null");
    Ok(Peek {
        id,
        method: raw.method.map(|m| m.into_owned()),
        is_error: raw.error.is_some(),
    })
}

/// An error response for `id` (the id's JSON text, or `null`).
pub fn error(id: Option<&str>, code: i64, message: &str) -> String {
    let msg = serde_json::to_string(message).unwrap_or_else(|_| "\"error\"".into());
    format!(
        r#"{{"jsonrpc":"2.0","id":{},"error":{{"code":{code},"message":{msg}}}}}"#,
        id.unwrap_or("null")
    )
}

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const INVALID_PARAMS: i64 = -32602;
/// Server errors: the session ended, no agent, and the like.
pub const SERVER_ERROR: i64 = -32000;

/// Splits a POST body into single messages, compacted to one line each.
pub fn split_body(body: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8".to_string())?;
    let trimmed = text.trim();
    if trimmed.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(trimmed).map_err(|e| e.to_string())?;
        if items.is_empty() {
            return Err("an empty batch".into());
        }
        return items.into_iter().map(|r| compact(r.get())).collect();
    }
    let _: &RawValue = serde_json::from_str(trimmed).map_err(|e| e.to_string())?;
    compact(trimmed).map(|m| vec![m])
}

fn compact(json: &str) -> Result<Vec<u8>, String> {
    if json.contains(['\n', '\r']) {
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        serde_json::to_vec(&v).map_err(|e| e.to_string())
    } else {
        Ok(json.as_bytes().to_vec())
    }
}

/// The `params.name` of a `tools/call` request.
pub fn tool_name(msg: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Call {
        params: Option<Params>,
    }
    #[derive(Deserialize)]
    struct Params {
        name: Option<String>,
    }
    serde_json::from_slice::<Call>(msg).ok()?.params?.name
}

/// `params.clientInfo` and `params.protocolVersion` of an `initialize` request.
pub fn client_info(msg: &[u8]) -> (String, String, String) {
    let v: serde_json::Value = serde_json::from_slice(msg).unwrap_or_default();
    let p = &v["params"];
    (
        p["clientInfo"]["name"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(128)
            .collect(),
        p["clientInfo"]["version"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(64)
            .collect(),
        p["protocolVersion"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(32)
            .collect(),
    )
}

/// Removes the tools a predicate rejects from a `tools/list` result.
pub fn filter_tools(msg: &[u8], allowed: impl Fn(&str) -> bool) -> Option<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(msg).ok()?;
    let tools = v.get_mut("result")?.get_mut("tools")?.as_array_mut()?;
    tools.retain(|t| t.get("name").and_then(|n| n.as_str()).is_some_and(&allowed));
    serde_json::to_vec(&v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peeks() {
        let p = peek(br#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#).expect("request");
        assert!(p.is_request());
        assert_eq!(p.id.as_deref(), Some("7"));
        let p = peek(br#"{"jsonrpc":"2.0","id":"a","result":{}}"#).expect("response");
        assert!(p.is_response());
        assert_eq!(p.id.as_deref(), Some("\"a\""));
        let p = peek(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .expect("notification");
        assert!(!p.is_request() && !p.is_response());
        assert!(peek(b"{}").is_err());
        assert!(peek(b"not json").is_err());
    }

    #[test]
    fn bodies() {
        let one = split_body(b"{\n \"jsonrpc\": \"2.0\", \"method\": \"x\"\n}\n").expect("one");
        assert_eq!(one.len(), 1);
        assert!(!one[0].contains(&b'\n'));
        let two = split_body(
            br#"[{"jsonrpc":"2.0","method":"a"},{"jsonrpc":"2.0","id":1,"method":"b"}]"#,
        )
        .expect("batch");
        assert_eq!(two.len(), 2);
        assert!(split_body(b"[]").is_err());
        assert!(split_body(b"{").is_err());
    }

    #[test]
    fn filters_tools() {
        let msg = br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"echo"},{"name":"delete_all"}]}}"#;
        let out = filter_tools(msg, |n| n == "echo").expect("filtered");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["result"]["tools"].as_array().map(|a| a.len()), Some(1));
        assert_eq!(
            error(Some("3"), -32602, "no \"x\""),
            r#"{"jsonrpc":"2.0","id":3,"error":{"code":-32602,"message":"no \"x\""}}"#
        );
    }
}
