//! The list results a gateway filters, and the names it checks in requests.

use serde_json::Value;

use crate::jsonrpc::Message;

/// A list method whose answer is filtered item by item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListKind {
    Tools,
    Prompts,
    Resources,
    ResourceTemplates,
}

impl ListKind {
    pub fn for_method(method: &str) -> Option<ListKind> {
        Some(match method {
            "tools/list" => ListKind::Tools,
            "prompts/list" => ListKind::Prompts,
            "resources/list" => ListKind::Resources,
            "resources/templates/list" => ListKind::ResourceTemplates,
            _ => return None,
        })
    }

    /// The notification a server sends when this list changes.
    pub fn changed_notification(self) -> &'static str {
        match self {
            ListKind::Tools => "notifications/tools/list_changed",
            ListKind::Prompts => "notifications/prompts/list_changed",
            ListKind::Resources | ListKind::ResourceTemplates => {
                "notifications/resources/list_changed"
            }
        }
    }

    /// The result's array, and the string field of each item that is checked.
    fn fields(self) -> (&'static str, &'static str) {
        match self {
            ListKind::Tools => ("tools", "name"),
            ListKind::Prompts => ("prompts", "name"),
            ListKind::Resources => ("resources", "uri"),
            ListKind::ResourceTemplates => ("resourceTemplates", "uriTemplate"),
        }
    }
}

/// Keeps only the items `allowed` accepts in a list result. An answer that
/// cannot be filtered (no result object, no array) is an error: the caller
/// must not pass it on. Items without the checked field are removed.
pub fn filter(
    msg: &mut Message,
    kind: ListKind,
    allowed: impl Fn(&str) -> bool,
) -> Result<usize, String> {
    let (array, field) = kind.fields();
    let items = msg
        .result_mut()
        .and_then(|r| r.get_mut(array))
        .and_then(Value::as_array_mut)
        .ok_or_else(|| format!("the MCP server's answer has no result.{array} list"))?;
    let before = items.len();
    items.retain(|t| t.get(field).and_then(Value::as_str).is_some_and(&allowed));
    Ok(before - items.len())
}

/// The methods whose requests name a tool, resource or prompt
/// ([`target`]) and are checked before they are forwarded.
pub const GATED: [&str; 6] = [
    "tools/call",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/get",
    "completion/complete",
];

/// What a request asks to use, for the checks that gate it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tool(String),
    Resource(String),
    Prompt(String),
}

/// The tool, resource or prompt a gated request names. `Ok(None)` for
/// methods that are not gated; an error when a gated request does not name
/// its target as a string (it is refused, never forwarded).
pub fn target(msg: &Message) -> Result<Option<Target>, String> {
    let need = |path: &[&str]| {
        msg.param_str(path).map(String::from).ok_or_else(|| {
            format!(
                "{} needs params.{} as a string",
                msg.method().unwrap_or(""),
                path.join(".")
            )
        })
    };
    Ok(Some(match msg.method().unwrap_or("") {
        "tools/call" => Target::Tool(need(&["name"])?),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            Target::Resource(normal_uri(need(&["uri"])?)?)
        }
        "prompts/get" => Target::Prompt(need(&["name"])?),
        "completion/complete" => match msg.param_str(&["ref", "type"]) {
            Some("ref/prompt") => Target::Prompt(need(&["ref", "name"])?),
            Some("ref/resource") => Target::Resource(normal_uri(need(&["ref", "uri"])?)?),
            _ => {
                return Err(
                    "completion/complete needs params.ref of type ref/prompt or ref/resource"
                        .into(),
                );
            }
        },
        _ => return Ok(None),
    }))
}

/// A resource URI in the one spelling rules are written against: a
/// lower-case scheme, no `.` or `..` path segments, no encoded dots,
/// slashes or backslashes, no backslashes and no control characters.
/// Others are refused rather than normalised, so that what was checked is
/// what the server receives, whatever normalisation the server applies.
pub fn normal_uri(uri: String) -> Result<String, String> {
    let refuse = |why: &str| {
        Err(format!(
            "resource URI {uri:?} is refused: {why}; send it in normal form"
        ))
    };
    if let Some((scheme, _)) = uri.split_once(':')
        && scheme.bytes().any(|b| b.is_ascii_uppercase())
    {
        return refuse("its scheme is not lower case");
    }
    if uri.chars().any(|c| c.is_control() || c == '\\') {
        return refuse("it holds a backslash or a control character");
    }
    // Percent-encoding is for characters that could not appear otherwise:
    // an encoded letter, digit, `-._~`, `/` or `\` is another spelling.
    let bytes = uri.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                return refuse("it has a % that starts no escape");
            };
            if v.is_ascii_alphanumeric() || b"-._~/\\".contains(&v) || v == 0 {
                return refuse("it encodes a character that needs no encoding");
            }
        }
    }
    // No `.` or `..` segment anywhere (servers may strip a prefix as text),
    // and no empty segment in the path (`//` is `/` to a file system).
    if uri
        .split(['/', '?', '#', '&', '='])
        .any(|seg| seg == "." || seg == "..")
    {
        return refuse("it has a . or .. segment");
    }
    let path = match uri.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("", |i| &rest[i..]),
        None => uri.split_once(':').map_or(uri.as_str(), |(_, p)| p),
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    if path.contains("//") {
        return refuse("its path has an empty segment");
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filters_and_fails_closed() {
        let mut m = Message::parse(br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"echo"},{"name":"delete_all"},{"x":1}]}}"#).expect("msg");
        assert_eq!(filter(&mut m, ListKind::Tools, |n| n == "echo"), Ok(2));
        assert_eq!(
            m.result().and_then(|r| r["tools"].as_array()).map(Vec::len),
            Some(1)
        );
        let mut bad =
            Message::parse(br#"{"jsonrpc":"2.0","id":1,"result":{"tools":{}}}"#).expect("msg");
        assert!(filter(&mut bad, ListKind::Tools, |_| true).is_err());
    }

    #[test]
    fn gated_names_every_method_target_checks() {
        let m = |method: &str| {
            Message::parse(format!(r#"{{"jsonrpc":"2.0","id":1,"method":"{method}"}}"#).as_bytes())
                .expect("msg")
        };
        // A gated method without its target is refused; any other is not gated.
        for method in GATED {
            assert!(target(&m(method)).is_err(), "{method}");
        }
        for method in [
            "tools/list",
            "ping",
            "resources/templates/list",
            "logging/setLevel",
        ] {
            assert_eq!(target(&m(method)), Ok(None), "{method}");
        }
    }

    #[test]
    fn targets() {
        let m = |s: &str| Message::parse(s.as_bytes()).expect("msg");
        assert_eq!(
            target(&m(
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#
            )),
            Ok(Some(Target::Tool("x".into())))
        );
        assert!(
            target(&m(
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":1}}"#
            ))
            .is_err()
        );
        assert!(target(&m(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#)).is_err());
        assert_eq!(
            target(&m(
                r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/resource","uri":"file:///a"}}}"#
            )),
            Ok(Some(Target::Resource("file:///a".into())))
        );
        assert_eq!(
            target(&m(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)),
            Ok(None)
        );
        for bad in [
            "FILE:///secret/x",
            "file:///pub/../secret/x",
            "file:///pub/./x",
            "file:///secret%2Fx",
            "file:///pub/%2e%2e/secret",
            "file:///a\\b",
            "file:///pub/..",
            "file:///docs//private/key",
            "file:////docs/private/key",
            "file:///docs/%70rivate/key",
            "file:///docs/x?a=..",
            "file:///docs/%zz",
        ] {
            let msg =
                json!({"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri": bad}});
            assert!(target(&m(&msg.to_string())).is_err(), "{bad}");
        }
        assert!(normal_uri("test://allowed/a.txt?x=1#y".into()).is_ok());
        assert!(normal_uri("file:///docs/a%20b.txt".into()).is_ok());
        assert!(normal_uri("https://example.com/".into()).is_ok());
    }
}
