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

/// Schemes a WHATWG URL parser (browsers, Node's `URL`, and the MCP SDKs
/// built on them) treats as special, with their default ports: it reads
/// them with or without `//`, lower-cases and IDNA-maps their host,
/// decodes escapes in it, reads a numeric host as IPv4 in any of its
/// spellings, drops the default port and `file://localhost`.
const SPECIAL: [(&str, Option<u16>); 6] = [
    ("http", Some(80)),
    ("https", Some(443)),
    ("ws", Some(80)),
    ("wss", Some(443)),
    ("ftp", Some(21)),
    ("file", None),
];

/// A resource URI in the one spelling rules are written against: ASCII, a
/// lower-case scheme, no `.` or `..` path segments, no empty ones, escapes
/// only for what needs them (in upper-case hex), no backslashes, spaces or
/// control characters; for the special schemes (`http`, `https`, `ws`,
/// `wss`, `ftp`, `file`) `//` after the scheme, a host in lower case with
/// no escapes, user name or trailing dot, an IP address only in its
/// canonical form, no default port, no host at all for `file`, and a path.
/// Others are refused rather than normalised, so that what was checked is
/// what the server receives, whatever normalisation the server applies.
pub fn normal_uri(uri: String) -> Result<String, String> {
    let refuse = |why: &str| {
        Err(format!(
            "resource URI {uri:?} is refused: {why}; send it in normal form"
        ))
    };
    if !uri.is_ascii() {
        return refuse("it holds a character outside ASCII (percent-encode it)");
    }
    if uri
        .bytes()
        .any(|b| b.is_ascii_control() || b" \\\"<>`{}|^".contains(&b))
    {
        return refuse(
            "it holds a space, a backslash, a control character or another character a URI cannot hold unencoded",
        );
    }
    let scheme = uri.split_once(':').map(|(s, _)| s).filter(|s| {
        s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    });
    if scheme.is_some_and(|s| s.bytes().any(|b| b.is_ascii_uppercase())) {
        return refuse("its scheme is not lower case");
    }
    // Percent-encoding is for characters that could not appear otherwise:
    // an encoded letter, digit, `-._~`, `/` or `\` is another spelling, and
    // so is an escape in lower-case hex.
    let bytes = uri.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| {
                    h.iter()
                        .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
                })
                .and_then(|h| std::str::from_utf8(h).ok());
            let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                return refuse("it has a % that starts no escape in upper-case hex");
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
    let special = scheme.and_then(|s| SPECIAL.iter().find(|(name, _)| *name == s));
    let after_scheme = match scheme {
        Some(s) => &uri[s.len() + 1..],
        None => uri.as_str(),
    };
    let (authority, path) = match after_scheme.strip_prefix("//") {
        Some(rest) => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            (Some(&rest[..end]), &rest[end..])
        }
        None => (None, after_scheme),
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    if path.contains("//") {
        return refuse("its path has an empty segment");
    }
    if let Some(why) = authority.and_then(|a| authority_problem(a, special)) {
        return refuse(why);
    }
    if let Some((name, _)) = special {
        if authority.is_none() {
            return refuse(&format!("a {name} URI is written {name}://"));
        }
        if !path.starts_with('/') {
            return refuse("its path is empty (write /)");
        }
    }
    Ok(uri)
}

/// What makes an authority (between `//` and the path) another spelling.
fn authority_problem(
    authority: &str,
    special: Option<&(&str, Option<u16>)>,
) -> Option<&'static str> {
    // The port: digits without a leading zero (parsers read `:080` and `:`
    // as `:80` and no port).
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (&authority[..i], Some(&authority[i + 1..])),
        _ => (authority, None),
    };
    if let Some(port) = port {
        let value = port.parse::<u16>().ok().filter(|_| {
            !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !port.starts_with('0')
        });
        let Some(value) = value else {
            return Some("its port is empty, out of range or has a leading zero");
        };
        if special.is_some_and(|(_, default)| *default == Some(value)) {
            return Some("it names its scheme's default port");
        }
    }
    let (name, _) = special?;
    if *name == "file" {
        return (!authority.is_empty()).then_some("a file URI names no host (write file:///path)");
    }
    if host.is_empty() {
        return Some("it names no host");
    }
    if host.contains(['@', '%']) || host.bytes().any(|b| b.is_ascii_uppercase()) {
        return Some("its host has a user name, an escape or an upper-case letter");
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let canonical = inner
            .parse::<std::net::Ipv6Addr>()
            .is_ok_and(|a| ipv6_text(a) == inner);
        return (!canonical).then_some("its IPv6 address is not in canonical form");
    }
    if host.ends_with('.') {
        return Some("its host ends with a dot");
    }
    // A host whose last label is a number is an IPv4 address to these
    // parsers, in decimal, octal or hex, in one to four parts.
    let last = host.rsplit('.').next().unwrap_or("");
    let numeric =
        last.starts_with("0x") || (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()));
    if numeric {
        let canonical = host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.to_string() == host);
        return (!canonical).then_some("its IPv4 address is not in canonical dotted-decimal form");
    }
    None
}

/// An IPv6 address as a WHATWG URL parser writes it: hex groups in lower
/// case without leading zeros, the first longest run of two or more zero
/// groups as `::`, and no dotted IPv4 part (where Rust's `Display` writes
/// `::ffff:127.0.0.1`, such a parser writes `::ffff:7f00:1`).
fn ipv6_text(a: std::net::Ipv6Addr) -> String {
    let groups = a.segments();
    let (mut best, mut run) = ((0, 0), (0, 0));
    for (i, g) in groups.iter().enumerate() {
        if *g == 0 {
            run = if run.1 == 0 {
                (i, 1)
            } else {
                (run.0, run.1 + 1)
            };
            if run.1 > best.1 {
                best = run;
            }
        } else {
            run = (0, 0);
        }
    }
    let hex = |gs: &[u16]| {
        gs.iter()
            .map(|g| format!("{g:x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    if best.1 < 2 {
        return hex(&groups);
    }
    format!(
        "{}::{}",
        hex(&groups[..best.0]),
        hex(&groups[best.0 + best.1..])
    )
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

    /// Every spelling here reaches `file:///secret/key`,
    /// `https://internal.example/x` or `http://127.0.0.1/x` through a
    /// WHATWG URL parser (Node's `URL`, as the TypeScript SDK looks
    /// resources up), so a rule written against those must not be passed
    /// by it: each is refused.
    #[test]
    fn other_spellings_of_special_urls_are_refused() {
        for bad in [
            "file://localhost/secret/key",
            "file://server/secret/key",
            "file:/secret/key",
            "file:secret/key",
            "https:/internal.example/x",
            "https:internal.example/x",
            "https:///internal.example/x",
            "https://INTERNAL.example/x",
            "https://internal.example:443/x",
            "https://internal.example:0443/x",
            "https://internal.example:/x",
            "https://internal.example./x",
            "https://user@internal.example/x",
            "https://inter%C2%ADnal.example/x",
            "https://\u{ff49}nternal.example/x",
            "https://internal.example",
            "https://internal.example?x",
            "http://2130706433/x",
            "http://127.1/x",
            "http://0x7f.0.0.1/x",
            "http://0177.0.0.1/x",
            "http://[0:0::1]/x",
            "http://[::FFFF:127.0.0.1]/x",
            "http://[::ffff:127.0.0.1]/x",
            "http://[1:0:0:2:0:0:0:3]/x",
            "http://[1::2:0:0:0:3]/x",
            "http://[0001::1]/x",
            "ws://internal.example:80/x",
            " https://internal.example/x",
            "https://internal.example/x y",
            "file:///secret/%c3%a4",
            "file:///secret/\u{e4}",
            "file:///docs/%+2",
            "test://host:/x",
            "test://host:080/x",
        ] {
            assert!(normal_uri(bad.into()).is_err(), "{bad}");
        }
        for good in [
            "file:///secret/key",
            "file:///secret/%C3%A4",
            "https://internal.example/x",
            "https://internal.example:8443/x?q=1#f",
            "http://127.0.0.1/x",
            "http://[::1]:8080/x",
            "http://[::ffff:7f00:1]/x",
            "http://[1:0:0:2::3]/x",
            "ws://internal.example:443/x",
            "test://Host/x",
            "test://host:80/x",
            "test:opaque",
            "urn:isbn:0451450523",
        ] {
            assert_eq!(normal_uri(good.into()), Ok(good.to_string()), "{good}");
        }
    }
}
