//! A hostile client against the proxy's MCP endpoint, in raw HTTP: duplicate
//! keys, id and name spellings, denied calls hidden in notifications and
//! batches, reused ids, stolen session ids, oversize bodies, a race for
//! session slots, and resource and prompt rules. Whatever is refused must
//! never run: the test server's `touch` tool writes a file, and that file
//! must not exist afterwards. Every refusal is audited.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::StatusCode;
use portico_tests::cluster::text;
use portico_tests::mcp_http::{McpHttp, Reply};
use portico_tests::util::test_app_yaml;
use portico_tests::{Cluster, ClusterBuilder, TempDir, eventually};
use serde_json::{Value, json};

const PW: &str = "user-password-1";

/// Every tool but `touch` (mallory).
const NO_TOUCH: &str = "kind: role\nversion: v8\nmetadata: {name: no-touch}\nspec:\n  allow:\n    app_labels: {env: dev}\n    mcp: {tools: ['*']}\n  deny:\n    mcp: {tools: [touch]}\n";
/// Every tool, `touch` included (trent): what only the protocol rules stop.
const TOUCHER: &str = "kind: role\nversion: v8\nmetadata: {name: toucher}\nspec:\n  allow:\n    app_labels: {env: dev}\n    mcp: {tools: ['*']}\n";
/// Only `echo` (eve).
const ECHO_ONLY: &str = "kind: role\nversion: v8\nmetadata: {name: echo-only}\nspec:\n  allow:\n    app_labels: {env: dev}\n    mcp: {tools: [echo]}\n";

const JSON_HDRS: [(&str, &str); 2] = [
    ("content-type", "application/json"),
    ("accept", "application/json, text/event-stream"),
];

/// The app `tm` (the test MCP server) and the users mallory (no-touch),
/// trent (toucher) and eve (echo-only).
async fn cluster_with_app(b: ClusterBuilder) -> Cluster {
    let c = b.proxy().wildcard_agent("a1").start().await;
    c.create_yaml(&test_app_yaml("tm", "dev"), false)
        .await
        .expect("app");
    for role in [NO_TOUCH, TOUCHER, ECHO_ONLY] {
        c.create_yaml(role, false).await.expect("role");
    }
    c.add_user("mallory", &["no-touch"], PW).await;
    c.add_user("trent", &["toucher"], PW).await;
    c.add_user("eve", &["echo-only"], PW).await;
    c.wait_servers("tm", &["a1"]).await;
    c
}

/// Logs `user` in and waits until the proxy knows them and their roles: a
/// POST without a session is then refused for the missing session (400),
/// no longer for the caller (401, 403). Opens no session.
async fn token(c: &Cluster, user: &str) -> String {
    let t = c.login(user, PW).await;
    let probe = McpHttp::new(c.proxy_addr(), "tm", &t);
    eventually(
        Duration::from_secs(10),
        &format!("the proxy knows {user}"),
        || async {
            let r = raw(&probe, r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#).await;
            (r.status == StatusCode::BAD_REQUEST).then_some(())
        },
    )
    .await;
    t
}

/// An initialized session of `user` on `tm`.
async fn open(c: &Cluster, user: &str) -> McpHttp {
    let t = token(c, user).await;
    let mut s = McpHttp::new(c.proxy_addr(), "tm", &t);
    s.initialize().await.expect("initialize");
    s
}

/// POSTs a body exactly as written.
async fn raw(s: &McpHttp, body: &str) -> Reply {
    s.send(http::Method::POST, &JSON_HDRS, Some(body)).await
}

/// A JSON string literal.
fn js(p: &Path) -> String {
    Value::String(p.display().to_string()).to_string()
}

/// Where the `touch` tool would leave its mark.
struct Marks {
    target: PathBuf,
    decoy: PathBuf,
    control: PathBuf,
    _dir: TempDir,
}

impl Marks {
    fn new() -> Marks {
        let dir = TempDir::new("portico-hostile");
        Marks {
            target: dir.path().join("pwned"),
            decoy: dir.path().join("decoy"),
            control: dir.path().join("control"),
            _dir: dir,
        }
    }

    /// A raw body with `$PATH` and `$DECOY` replaced by JSON strings of the paths.
    fn fill(&self, template: &str) -> String {
        template
            .replace("$PATH", &js(&self.target))
            .replace("$DECOY", &js(&self.decoy))
    }
}

/// Proves the server handled everything sent before on this session (an
/// echo round trip), then checks that no refused `touch` wrote its file.
async fn assert_untouched(s: &mut McpHttp, marks: &Marks, what: &str) {
    let r = s.call("echo", json!({"message": "barrier"})).await;
    assert_eq!(r["result"]["content"][0]["text"], "barrier", "{what}: {r}");
    for f in [&marks.target, &marks.decoy] {
        assert!(
            !f.exists(),
            "{what}: a refused touch ran and wrote {}",
            f.display()
        );
    }
}

/// The positive control: an allowed `touch` does write its file, so the
/// absence checks mean something.
async fn assert_touch_runs(c: &Cluster, marks: &Marks) {
    let mut s = open(c, "trent").await;
    let r = s
        .call(
            "touch",
            json!({"path": marks.control.display().to_string()}),
        )
        .await;
    assert_eq!(r["result"]["content"][0]["text"], "ok", "control: {r}");
    assert_eq!(
        std::fs::read_to_string(&marks.control).expect("the control touch wrote its file"),
        "touched"
    );
}

/// The body was refused as a whole before any session work: 400 and one
/// JSON-RPC error with `code`.
fn assert_refused(r: &Reply, code: i64, what: &str) {
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {r:?}");
    let msgs = r.messages();
    assert_eq!(msgs.len(), 1, "{what}: one error answers the body: {r:?}");
    assert_eq!(msgs[0]["error"]["code"], code, "{what}: {r:?}");
}

/// The proxy answered the request itself with an RBAC denial.
fn assert_rbac_denied(m: &Value, what: &str) {
    assert_eq!(m["error"]["code"], -32602, "{what}: {m}");
    assert!(
        m["error"]["message"]
            .as_str()
            .is_some_and(|s| s.starts_with("RBAC denied")),
        "{what}: {m}"
    );
}

/// The call failed (a JSON-RPC error or a tool error): nothing ran.
fn assert_failed(m: &Value, what: &str) {
    assert!(
        m.get("error").is_some() || m["result"]["isError"] == true,
        "{what}: the call succeeded: {m}"
    );
}

/// The response to `id` (any JSON id) in a reply.
fn answer(r: &Reply, id: &Value) -> Value {
    assert_eq!(r.status, StatusCode::OK, "answer to {id}: {r:?}");
    r.messages()
        .into_iter()
        .find(|m| &m["id"] == id && m.get("method").is_none())
        .unwrap_or_else(|| panic!("no answer to id {id}: {r:?}"))
}

/// The `field` of each item of `result.<key>`.
fn listed(m: &Value, key: &str, field: &str) -> Vec<String> {
    m["result"][key]
        .as_array()
        .unwrap_or_else(|| panic!("no result.{key}: {m}"))
        .iter()
        .filter_map(|t| t[field].as_str().map(String::from))
        .collect()
}

/// Every `mcp.session.request` event, as `pctl events ls` prints them.
async fn request_events(c: &Cluster) -> Option<Vec<Value>> {
    let o = c
        .pctl(&[
            "events",
            "ls",
            "--type",
            "mcp.session.request",
            "--format",
            "json",
        ])
        .await;
    serde_json::from_str::<Value>(&text(&o).0)
        .ok()?
        .as_array()
        .cloned()
}

#[tokio::test]
async fn duplicate_keys_are_refused_before_anything_runs() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    let marks = Marks::new();
    let mut m = open(&c, "mallory").await;
    // A lax parser keeping the last key would see `touch` where the check saw `echo`.
    for (what, body) in [
        (
            "duplicate name",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"touch","arguments":{"message":"hi","path":$PATH}}}"#,
        ),
        (
            "duplicate name through an escaped key",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","na\u006de":"touch","arguments":{"message":"hi","path":$PATH}}}"#,
        ),
        (
            "duplicate method at the top level",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}}"#,
        ),
        (
            "duplicate params at the top level",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"message":"hi"}},"params":{"name":"touch","arguments":{"path":$PATH}}}"#,
        ),
        (
            "duplicate id at the top level",
            r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"tools/call","params":{"name":"echo","arguments":{"message":"hi"}}}"#,
        ),
        (
            "duplicate jsonrpc at the top level",
            r#"{"jsonrpc":"2.0","jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        ),
        (
            "duplicate name in a batch element",
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"message":"hi"}}},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","name":"touch","arguments":{"message":"hi","path":$PATH}}}]"#,
        ),
    ] {
        assert_refused(&raw(&m, &marks.fill(body)).await, -32700, what);
    }
    assert_untouched(&mut m, &marks, "duplicate keys (mallory)").await;

    // Trent may touch; duplicates are refused all the same, and a bad
    // element refuses its whole batch, the allowed touch with it.
    let mut t = open(&c, "trent").await;
    for (code, what, body) in [
        (
            -32700,
            "duplicate path inside arguments",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"touch","arguments":{"path":$DECOY,"path":$PATH}}}"#,
        ),
        (
            -32700,
            "duplicate escaped path inside arguments",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"touch","arguments":{"path":$DECOY,"\u0070ath":$PATH}}}"#,
        ),
        (
            -32700,
            "an allowed touch beside a duplicate key",
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}},{"jsonrpc":"2.0","id":2,"method":"tools/list","method":"ping"}]"#,
        ),
        (
            -32600,
            "an allowed touch beside a null id",
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}},{"jsonrpc":"2.0","id":null,"method":"ping"}]"#,
        ),
        (
            -32600,
            "an allowed touch beside a message without jsonrpc",
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}},{"id":2,"method":"ping"}]"#,
        ),
    ] {
        assert_refused(&raw(&t, &marks.fill(body)).await, code, what);
    }
    assert_untouched(&mut t, &marks, "duplicate keys (trent)").await;
    assert_touch_runs(&c, &marks).await;
    c.shutdown().await;
}

#[tokio::test]
async fn id_spellings() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    let marks = Marks::new();

    // An escaped string id is the string "7": answered, and the list is filtered.
    let list = r#"{"jsonrpc":"2.0","id":"\u0037","method":"tools/list"}"#;
    let mut e = open(&c, "eve").await;
    let r = answer(&raw(&e, list).await, &json!("7"));
    assert_eq!(listed(&r, "tools", "name"), vec!["echo"], "{r}");
    let mut m = open(&c, "mallory").await;
    let r = answer(&raw(&m, list).await, &json!("7"));
    let names = listed(&r, "tools", "name");
    assert!(
        names.contains(&"echo".to_string()) && !names.contains(&"touch".to_string()),
        "{names:?}"
    );
    // The integer 7 is another id, answered on its own.
    let r = answer(
        &raw(&m, r#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#).await,
        &json!(7),
    );
    assert!(!listed(&r, "tools", "name").contains(&"touch".to_string()));
    for (what, id) in [
        ("fraction", "7.0"),
        ("exponent", "7e0"),
        ("null", "null"),
        ("array", "[7]"),
    ] {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list"}}"#);
        assert_refused(
            &raw(&m, &body).await,
            -32600,
            &format!("tools/list, id {what}"),
        );
    }

    // Trent may touch: only the message rules stop these.
    let mut t = open(&c, "trent").await;
    let call = r#""method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}"#;
    for (what, head) in [
        ("fraction id", r#""jsonrpc":"2.0","id":7.0,"#),
        ("exponent id", r#""jsonrpc":"2.0","id":7e0,"#),
        ("negative zero id", r#""jsonrpc":"2.0","id":-0.0,"#),
        ("null id", r#""jsonrpc":"2.0","id":null,"#),
        ("array id", r#""jsonrpc":"2.0","id":[7],"#),
        ("object id", r#""jsonrpc":"2.0","id":{"n":7},"#),
        ("boolean id", r#""jsonrpc":"2.0","id":true,"#),
        (
            "id beyond 64 bits",
            r#""jsonrpc":"2.0","id":9223372036854775808,"#,
        ),
        (
            "id beyond 2^53 - 1",
            r#""jsonrpc":"2.0","id":9007199254740993,"#,
        ),
        (
            "negative id beyond 2^53 - 1",
            r#""jsonrpc":"2.0","id":-9007199254740992,"#,
        ),
        ("no jsonrpc", r#""id":7,"#),
        ("jsonrpc 1.0", r#""jsonrpc":"1.0","id":7,"#),
        ("numeric jsonrpc", r#""jsonrpc":2.0,"id":7,"#),
    ] {
        let body = marks.fill(&format!("{{{head}{call}}}"));
        assert_refused(&raw(&t, &body).await, -32600, what);
    }
    for (what, body) in [
        (
            "array method",
            r#"{"jsonrpc":"2.0","id":7,"method":["tools/call"],"params":{"name":"touch","arguments":{"path":$PATH}}}"#,
        ),
        (
            "numeric method",
            r#"{"jsonrpc":"2.0","id":7,"method":5,"params":{"name":"touch","arguments":{"path":$PATH}}}"#,
        ),
        (
            "params as a string",
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":"touch"}"#,
        ),
    ] {
        assert_refused(&raw(&t, &marks.fill(body)).await, -32600, what);
    }
    assert_untouched(&mut t, &marks, "id spellings (trent)").await;
    assert_untouched(&mut m, &marks, "id spellings (mallory)").await;
    assert_untouched(&mut e, &marks, "id spellings (eve)").await;
    assert_touch_runs(&c, &marks).await;
    c.shutdown().await;
}

#[tokio::test]
async fn escaped_and_lookalike_tool_names() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    let marks = Marks::new();
    let mut m = open(&c, "mallory").await;

    // Spelled differently, read once: still `touch`, still denied.
    for (id, what, body) in [
        (
            31,
            "escaped o",
            r#"{"jsonrpc":"2.0","id":31,"method":"tools/call","params":{"name":"t\u006fuch","arguments":{"path":$PATH}}}"#,
        ),
        (
            32,
            "every letter escaped",
            r#"{"jsonrpc":"2.0","id":32,"method":"tools/call","params":{"name":"\u0074\u006F\u0075\u0063\u0068","arguments":{"path":$PATH}}}"#,
        ),
        (
            33,
            "escaped method",
            r#"{"jsonrpc":"2.0","id":33,"method":"tools\/c\u0061ll","params":{"name":"touch","arguments":{"path":$PATH}}}"#,
        ),
        (
            34,
            "escaped params key",
            r#"{"jsonrpc":"2.0","id":34,"method":"tools/call","\u0070arams":{"name":"touch","arguments":{"path":$PATH}}}"#,
        ),
    ] {
        let r = raw(&m, &marks.fill(body)).await;
        assert_rbac_denied(&answer(&r, &json!(id)), what);
    }
    // A tools/call that names no tool as a string is refused, never forwarded.
    for (id, what, body) in [
        (
            35,
            "params as an array",
            r#"{"jsonrpc":"2.0","id":35,"method":"tools/call","params":["touch",{"path":$PATH}]}"#,
        ),
        (
            36,
            "numeric name",
            r#"{"jsonrpc":"2.0","id":36,"method":"tools/call","params":{"name":7,"arguments":{"path":$PATH}}}"#,
        ),
        (
            37,
            "name as an object",
            r#"{"jsonrpc":"2.0","id":37,"method":"tools/call","params":{"name":{"name":"touch"},"arguments":{"path":$PATH}}}"#,
        ),
        (
            38,
            "no params",
            r#"{"jsonrpc":"2.0","id":38,"method":"tools/call"}"#,
        ),
    ] {
        let r = answer(&raw(&m, &marks.fill(body)).await, &json!(id));
        assert_eq!(r["error"]["code"], -32602, "{what}: {r}");
    }
    // Other names are other tools: allowed by '*', forwarded, and the
    // server knows none of them.
    for (id, what, name) in [
        (41, "upper case", r#""TOUCH""#),
        (42, "capitalised", r#""Touch""#),
        (43, "trailing space", r#""touch ""#),
        (44, "trailing NUL", r#""touch\u0000""#),
        (45, "Cyrillic o", r#""t\u043euch""#),
        (
            46,
            "fullwidth letters",
            r#""\uff54\uff4f\uff55\uff43\uff48""#,
        ),
    ] {
        let body = marks.fill(&format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":{name},"arguments":{{"path":$PATH}}}}}}"#
        ));
        assert_failed(&answer(&raw(&m, &body).await, &json!(id)), what);
    }
    // A method in other case is not tools/call: the server refuses it.
    let r = raw(
        &m,
        &marks.fill(r#"{"jsonrpc":"2.0","id":47,"method":"TOOLS/CALL","params":{"name":"touch","arguments":{"path":$PATH}}}"#),
    )
    .await;
    assert_failed(&answer(&r, &json!(47)), "upper-case method");
    assert_untouched(&mut m, &marks, "escaped and lookalike names").await;
    assert_touch_runs(&c, &marks).await;
    c.shutdown().await;
}

#[tokio::test]
async fn denied_calls_in_notifications_and_batches() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    let marks = Marks::new();
    let mut m = open(&c, "mallory").await;

    // A denied notification is dropped: 202, nothing answers, nothing runs.
    for (what, body) in [
        (
            "touch as a notification",
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}}"#,
        ),
        (
            "escaped touch as a notification",
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"t\u006fuch","arguments":{"path":$PATH}}}"#,
        ),
        (
            "a batch of notifications",
            r#"[{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":1}},{"jsonrpc":"2.0","method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}}]"#,
        ),
    ] {
        let r = raw(&m, &marks.fill(body)).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{what}: {r:?}");
        assert!(r.messages().is_empty(), "{what}: {r:?}");
    }
    // A denied notification beside an allowed request: only the request is answered.
    let r = raw(
        &m,
        &marks.fill(r#"[{"jsonrpc":"2.0","method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}},{"jsonrpc":"2.0","id":51,"method":"tools/call","params":{"name":"echo","arguments":{"message":"hi"}}}]"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.messages().len(), 1, "{r:?}");
    assert_eq!(r.response(51)["result"]["content"][0]["text"], "hi");
    // An allowed and a denied request in one batch: each gets its own answer.
    let r = raw(
        &m,
        &marks.fill(r#"[{"jsonrpc":"2.0","id":52,"method":"tools/call","params":{"name":"echo","arguments":{"message":"hi"}}},{"jsonrpc":"2.0","id":53,"method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}}]"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.response(52)["result"]["content"][0]["text"], "hi");
    assert_rbac_denied(&r.response(53), "touch in a batch");
    // Only denied requests: all answered by the proxy, and the stream ends.
    let r = raw(
        &m,
        &marks.fill(r#"[{"jsonrpc":"2.0","id":54,"method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}},{"jsonrpc":"2.0","id":55,"method":"tools/call","params":{"name":"t\u006fuch","arguments":{"path":$DECOY}}}]"#),
    )
    .await;
    assert_rbac_denied(&answer(&r, &json!(54)), "first denied in a batch");
    assert_rbac_denied(&answer(&r, &json!(55)), "second denied in a batch");
    assert_untouched(&mut m, &marks, "notifications and batches").await;
    assert_touch_runs(&c, &marks).await;
    c.shutdown().await;
}

#[tokio::test]
async fn pipelined_requests_reusing_an_id() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    let marks = Marks::new();
    let mut m = open(&c, "mallory").await;

    let r = raw(
        &m,
        r#"[{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"echo","arguments":{"message":"first"}}},{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"echo","arguments":{"message":"second"}}}]"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let nine: Vec<Value> = r.messages().into_iter().filter(|x| x["id"] == 9).collect();
    assert_eq!(nine.len(), 2, "{r:?}");
    assert!(
        nine.iter()
            .any(|x| x["result"]["content"][0]["text"] == "first"),
        "{r:?}"
    );
    assert!(nine.iter().any(|x| x["error"]["code"] == -32600), "{r:?}");
    assert!(
        !String::from_utf8_lossy(&r.body).contains("second"),
        "the second request was not forwarded: {r:?}"
    );
    // The same string id, spelled two ways.
    let r = raw(
        &m,
        r#"[{"jsonrpc":"2.0","id":"k","method":"tools/call","params":{"name":"echo","arguments":{"message":"first"}}},{"jsonrpc":"2.0","id":"\u006b","method":"tools/call","params":{"name":"echo","arguments":{"message":"second"}}}]"#,
    )
    .await;
    let k: Vec<Value> = r
        .messages()
        .into_iter()
        .filter(|x| x["id"] == "k")
        .collect();
    assert_eq!(k.len(), 2, "{r:?}");
    assert!(k.iter().any(|x| x["error"]["code"] == -32600), "{r:?}");
    assert!(
        !String::from_utf8_lossy(&r.body).contains("second"),
        "{r:?}"
    );
    // Once answered, an id may be used again.
    let r = raw(
        &m,
        r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"echo","arguments":{"message":"again"}}}"#,
    )
    .await;
    assert_eq!(
        answer(&r, &json!(9))["result"]["content"][0]["text"],
        "again"
    );

    // Trent may touch: a touch reusing a pending id is refused, not run.
    let mut t = open(&c, "trent").await;
    let r = raw(
        &t,
        &marks.fill(r#"[{"jsonrpc":"2.0","id":11,"method":"tools/call","params":{"name":"echo","arguments":{"message":"first"}}},{"jsonrpc":"2.0","id":11,"method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}}]"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let eleven: Vec<Value> = r.messages().into_iter().filter(|x| x["id"] == 11).collect();
    assert_eq!(eleven.len(), 2, "{r:?}");
    assert!(
        eleven
            .iter()
            .any(|x| x["result"]["content"][0]["text"] == "first"),
        "{r:?}"
    );
    assert!(eleven.iter().any(|x| x["error"]["code"] == -32600), "{r:?}");
    assert_untouched(&mut t, &marks, "a touch reusing a pending id").await;
    assert_untouched(&mut m, &marks, "pipelined (mallory)").await;
    assert_touch_runs(&c, &marks).await;
    c.shutdown().await;
}

#[tokio::test]
async fn another_users_session_id_is_not_found() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    let marks = Marks::new();
    // The victim may touch; the thief may not, and tries through the victim's session.
    let mut victim = open(&c, "trent").await;
    let mut thief = McpHttp::new(c.proxy_addr(), "tm", &token(&c, "mallory").await);
    thief.session = victim.session.clone();
    let r = raw(
        &thief,
        &marks.fill(r#"{"jsonrpc":"2.0","id":61,"method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "POST: {r:?}");
    let r = raw(
        &thief,
        &marks.fill(r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "notification: {r:?}");
    let r = thief
        .send(http::Method::GET, &[("accept", "text/event-stream")], None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "GET: {r:?}");
    let r = thief.delete().await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "DELETE: {r:?}");
    // The victim's session is untouched and still theirs.
    assert_untouched(&mut victim, &marks, "a stolen session id").await;
    assert_touch_runs(&c, &marks).await;
    c.shutdown().await;
}

/// `/mcp/{app}` spelled other ways. A plain name goes from the connection
/// to the MCP handler and a percent-encoded one through the router, which
/// decodes it: both are the same app, under the same checks. Other shapes
/// of the path are not the endpoint, and nothing sent there runs.
#[tokio::test]
async fn app_names_spelled_other_ways_meet_the_same_checks() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    let marks = Marks::new();
    let t = token(&c, "mallory").await;
    let addr = c.proxy_addr();
    let touch = marks.fill(
        r#"{"jsonrpc":"2.0","id":81,"method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}}"#,
    );
    // An encoded name opens a session of `tm`, whose rules hold there...
    let mut enc = McpHttp::new(addr, "%74%6D", &t);
    enc.initialize()
        .await
        .expect("initialize through an encoded name");
    let r = raw(&enc, &touch).await;
    assert_rbac_denied(&answer(&r, &json!(81)), "touch through an encoded name");
    // ...and which the plain name reaches as the same session.
    let mut plain = McpHttp::new(addr, "tm", &t);
    plain.session = enc.session.clone();
    let r = raw(&plain, &touch).await;
    assert_rbac_denied(&answer(&r, &json!(81)), "touch through the plain name");
    assert_untouched(&mut plain, &marks, "an encoded app name").await;
    // A session of `tm` is not another app's, however that is spelled.
    for other in ["nope", "%6Eope", "TM"] {
        let mut s = McpHttp::new(addr, other, &t);
        s.session = enc.session.clone();
        let r = raw(&s, &touch).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{other}: {r:?}");
        let e = s.initialize().await.expect_err("no such app");
        assert_eq!(e.status, StatusCode::NOT_FOUND, "{other}: {e:?}");
    }
    // Without a token, either spelling is refused the same way.
    for name in ["tm", "%74m"] {
        let mut s = McpHttp::new(addr, name, "");
        let e = s.initialize().await.expect_err("no token");
        assert_eq!(e.status, StatusCode::UNAUTHORIZED, "{name}: {e:?}");
    }
    // Not the endpoint: a trailing slash, an empty name, a deeper path.
    for name in ["tm/", "", "tm/x", "/tm", "tm%2Fx"] {
        let mut s = McpHttp::new(addr, name, &t);
        s.session = enc.session.clone();
        let r = raw(&s, &touch).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "/mcp/{name}: {r:?}");
    }
    assert_untouched(&mut plain, &marks, "paths that are not the endpoint").await;
    assert_touch_runs(&c, &marks).await;
    c.shutdown().await;
}

/// A proxy that has not synced with the auth-service knows no app, role or
/// user: every spelling of an MCP path (the plain one served from the
/// connection, the encoded one through the router) and the API answer 503,
/// never a 404 or 403 from an empty cache. Its auth-service here accepts
/// connections and never answers, so the first sync never comes.
#[tokio::test]
async fn before_its_first_sync_the_proxy_answers_503_on_every_path() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    let t = token(&c, "trent").await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    // Holds what it accepts, open and unanswered.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let data = TempDir::new("unsynced-proxy");
    let cfg = portico_proxy::ProxyConfig {
        auth_servers: vec![silent_addr.to_string()],
        plain_http: true,
        ..Default::default()
    };
    let creds = portico_proxy::Credentials {
        issued: Some(c.proxy.as_ref().expect("proxy").identity.clone()),
        data_dir: data.path().to_path_buf(),
        local_audit: None,
    };
    let listeners = portico_tests::cluster::loopback_listeners().await;
    let p = portico_proxy::start(&cfg, creds, listeners)
        .await
        .expect("an unsynced proxy starts");
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "portico-hostile", "version": "1"}}});
    for name in ["tm", "%74m", "nope"] {
        for token in [t.as_str(), "", "not-a-token"] {
            let s = McpHttp::new(p.web_addr, name, token);
            let r = s.post(&init).await;
            assert_eq!(
                r.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "/mcp/{name}, token {:?}: {r:?}",
                !token.is_empty()
            );
            assert!(
                String::from_utf8_lossy(&r.body).contains("not synced"),
                "/mcp/{name}: {r:?}"
            );
            let g = s
                .send(http::Method::GET, &[("accept", "text/event-stream")], None)
                .await;
            assert_eq!(
                g.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "GET /mcp/{name}: {g:?}"
            );
        }
    }
    let mut api = McpHttp::new(p.web_addr, "tm", &t);
    api.url = format!("http://{}/v1/apps", p.web_addr);
    let r = api.send(http::Method::GET, &[], None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "/v1/apps: {r:?}");
    // Still not synced: the answers above were the unsynced proxy's.
    assert!(!p.state.cache.synced());
    // The same requests, to the synced proxy of the same cluster, are served.
    let s = McpHttp::new(c.proxy_addr(), "%74m", &t);
    assert_eq!(s.post(&init).await.status, StatusCode::OK);
    p.shutdown().await;
    holder.abort();
    c.shutdown().await;
}

/// A proxy on plain HTTP (behind a TLS terminator) tells HTTP/2 with prior
/// knowledge from HTTP/1.1 by the first bytes, however they are cut: an
/// h2c client is served, under the same checks, and an HTTP/1.1 request
/// whose first byte comes alone is answered as HTTP/1.1. A connection that
/// stops inside the preface is closed after the header timeout.
#[tokio::test]
async fn plain_http_serves_h2c_and_http1_cut_anywhere() {
    use tokio::io::AsyncWriteExt;
    let c = cluster_with_app(
        ClusterBuilder::new()
            .plain_http()
            .request_timeouts("1s", "1s"),
    )
    .await;
    let marks = Marks::new();
    let addr = c.proxy_addr();
    let t = token(&c, "mallory").await;
    let mut h2c = McpHttp::new(addr, "tm", &t).http2(addr);
    h2c.initialize().await.expect("initialize over h2c");
    let r = h2c.call("echo", json!({"message": "over h2c"})).await;
    assert!(r["result"].is_object(), "{r}");
    let touch = marks.fill(
        r#"{"jsonrpc":"2.0","id":91,"method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}}"#,
    );
    let r = raw(&h2c, &touch).await;
    assert_rbac_denied(&answer(&r, &json!(91)), "touch over h2c");
    assert_untouched(&mut h2c, &marks, "h2c").await;

    // HTTP/1.1, its first byte alone: not taken for a preface.
    let mut cut = send_in_two(addr, b"P", b"OST /mcp/tm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: 2\r\n\r\n{}").await;
    let r = read_reply(&mut cut, Duration::from_secs(10))
        .await
        .expect("an answer");
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");

    // The preface cut in two reaches the HTTP/2 server that keeps no HPACK
    // table for what clients send: its SETTINGS say a table size of 0.
    let mut pri = send_in_two(
        addr,
        b"PR",
        b"I * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0",
    )
    .await;
    let settings = read_h2_frame(&mut pri).await;
    assert_eq!(settings.0, 4, "the server's first frame is SETTINGS");
    let table_size = settings
        .1
        .chunks(6)
        .find(|e| e[..2] == [0, 1])
        .map(|e| u32::from_be_bytes([e[2], e[3], e[4], e[5]]));
    assert_eq!(table_size, Some(0), "SETTINGS_HEADER_TABLE_SIZE");

    // The preface's first bytes, then nothing: closed, nothing answered.
    let mut stalled = portico_tests::web::stream(addr).await;
    stalled.write_all(b"PRI").await.expect("part of a preface");
    let r = read_reply(&mut stalled, Duration::from_secs(10))
        .await
        .expect("closed after the header timeout");
    assert_eq!(r, "", "{r}");
    assert_touch_runs(&c, &marks).await;
    c.shutdown().await;
}

#[tokio::test]
async fn oversize_body_is_refused() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    let marks = Marks::new();
    let mut t = open(&c, "trent").await;
    // An allowed touch, padded past the 4 MiB default.
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":71,"method":"tools/call","params":{{"name":"touch","arguments":{{"path":{},"pad":"{}"}}}}}}"#,
        js(&marks.target),
        "a".repeat(4 * 1024 * 1024 + 1)
    );
    let r = raw(&t, &body).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{r:?}");
    assert_untouched(&mut t, &marks, "an oversize body").await;
    assert_touch_runs(&c, &marks).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cap_holds_under_parallel_initialize() {
    let c = cluster_with_app(ClusterBuilder::new().max_sessions_per_user(3)).await;
    let t = token(&c, "mallory").await;
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "portico-hostile", "version": "1"}}});
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let s = McpHttp::new(c.proxy_addr(), "tm", &t);
        let init = init.clone();
        set.spawn(async move { s.post(&init).await });
    }
    let mut opened: Vec<String> = Vec::new();
    let mut limited = 0;
    while let Some(r) = set.join_next().await {
        let r = r.expect("initialize task");
        match r.status {
            StatusCode::OK => opened.push(
                r.headers
                    .get("mcp-session-id")
                    .and_then(|v| v.to_str().ok())
                    .expect("a session id")
                    .to_string(),
            ),
            StatusCode::TOO_MANY_REQUESTS => limited += 1,
            _ => panic!("an initialize was answered neither 200 nor 429: {r:?}"),
        }
    }
    assert_eq!(
        (opened.len(), limited),
        (3, 9),
        "three sessions, nine refusals"
    );
    // A slot freed by DELETE can be taken again, and only that one.
    let mut first = McpHttp::new(c.proxy_addr(), "tm", &t);
    first.session = Some(opened[0].clone());
    assert_eq!(first.delete().await.status, StatusCode::OK);
    let mut again = McpHttp::new(c.proxy_addr(), "tm", &t);
    again.initialize().await.expect("the freed slot");
    let mut over = McpHttp::new(c.proxy_addr(), "tm", &t);
    let e = over.initialize().await.expect_err("the cap still holds");
    assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS, "{e:?}");
    // The cap is per user: another user still gets in.
    let mut other = McpHttp::new(c.proxy_addr(), "tm", &token(&c, "trent").await);
    other.initialize().await.expect("another user's session");
    c.shutdown().await;
}

#[tokio::test]
async fn resource_and_prompt_rbac() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    c.create_yaml("kind: role\nversion: v8\nmetadata: {name: res-only}\nspec:\n  allow:\n    app_labels: {env: dev}\n    mcp: {tools: ['*'], resources: ['test://allowed/*'], prompts: []}\n", false)
        .await
        .expect("role");
    c.create_yaml("kind: role\nversion: v8\nmetadata: {name: no-greet}\nspec:\n  allow:\n    app_labels: {env: dev}\n    mcp: {tools: ['*'], resources: ['test://hel*'], prompts: ['*']}\n  deny:\n    mcp: {prompts: [greet]}\n", false)
        .await
        .expect("role");
    c.add_user("ro", &["res-only"], PW).await;
    c.add_user("ng", &["no-greet"], PW).await;

    // A role that says nothing about resources and prompts allows them.
    let mut m = open(&c, "mallory").await;
    let r = m.request("resources/list", json!({})).await;
    assert_eq!(listed(&r, "resources", "uri"), vec!["test://hello"], "{r}");
    let r = m
        .request("resources/read", json!({"uri": "test://hello"}))
        .await;
    assert!(r.to_string().contains("hello resource"), "{r}");
    let r = m.request("prompts/list", json!({})).await;
    assert_eq!(listed(&r, "prompts", "name"), vec!["greet"], "{r}");
    let r = m
        .request(
            "prompts/get",
            json!({"name": "greet", "arguments": {"name": "mallory"}}),
        )
        .await;
    assert!(r.to_string().contains("Hello, mallory!"), "{r}");

    // Resources under test://allowed/ only, and no prompts.
    let mut ro = open(&c, "ro").await;
    let r = ro.request("resources/list", json!({})).await;
    assert!(listed(&r, "resources", "uri").is_empty(), "{r}");
    let r = ro
        .request("resources/read", json!({"uri": "test://hello"}))
        .await;
    assert_rbac_denied(&r, "resources/read test://hello");
    let r = raw(
        &ro,
        r#"{"jsonrpc":"2.0","id":81,"method":"resources/read","params":{"uri":"test://hel\u006co"}}"#,
    )
    .await;
    assert_rbac_denied(&answer(&r, &json!(81)), "resources/read, escaped URI");
    let r = ro
        .request("resources/subscribe", json!({"uri": "test://hello"}))
        .await;
    assert_rbac_denied(&r, "resources/subscribe test://hello");
    let r = ro
        .request(
            "completion/complete",
            json!({"ref": {"type": "ref/resource", "uri": "test://hello"}, "argument": {"name": "x", "value": ""}}),
        )
        .await;
    assert_rbac_denied(&r, "completion/complete on test://hello");
    // Matched by the pattern as written, but a server that normalises the
    // path would read test://hello: refused before it is forwarded, as are
    // other spellings of a URI.
    for uri in [
        "test://allowed/../hello",
        "test://allowed/%2e%2e/hello",
        "TEST://allowed/x",
        "test://allowed/.%2Fx",
        "test://allowed:/x",
        "test://allowed/x%2b",
        "test://allowed/\u{e9}",
    ] {
        let r = ro.request("resources/read", json!({"uri": uri})).await;
        assert_eq!(r["error"]["code"], -32602, "{uri}: {r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("normal form")),
            "{uri}: {r}"
        );
    }
    let r = ro.request("prompts/list", json!({})).await;
    assert!(listed(&r, "prompts", "name").is_empty(), "{r}");
    let r = ro
        .request(
            "prompts/get",
            json!({"name": "greet", "arguments": {"name": "ro"}}),
        )
        .await;
    assert_rbac_denied(&r, "prompts/get greet with prompts: []");
    let r = ro
        .request(
            "completion/complete",
            json!({"ref": {"type": "ref/prompt", "name": "greet"}, "argument": {"name": "name", "value": "a"}}),
        )
        .await;
    assert_rbac_denied(&r, "completion/complete on greet");

    // Deny wins over allow: prompts ['*'] but deny [greet].
    let mut ng = open(&c, "ng").await;
    let r = ng.request("resources/list", json!({})).await;
    assert_eq!(listed(&r, "resources", "uri"), vec!["test://hello"], "{r}");
    let r = ng
        .request("resources/read", json!({"uri": "test://hello"}))
        .await;
    assert!(r.to_string().contains("hello resource"), "{r}");
    let r = ng.request("prompts/list", json!({})).await;
    assert!(listed(&r, "prompts", "name").is_empty(), "{r}");
    let r = ng
        .request(
            "prompts/get",
            json!({"name": "greet", "arguments": {"name": "ng"}}),
        )
        .await;
    assert_rbac_denied(&r, "prompts/get greet, denied");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|s| s.contains("deny.mcp.prompts")),
        "the deny rule decided: {r}"
    );

    eventually(
        Duration::from_secs(10),
        "resource and prompt denials audited",
        || async {
            let evs = request_events(&c).await?;
            let denied = |user: &str, key: &str, name: &str| {
                evs.iter().any(|e| {
                    let f = &e["fields"];
                    f["user"] == user
                        && f[key] == name
                        && f["allowed"] == false
                        && f["phase"] == "decided"
                })
            };
            (denied("ro", "resource", "test://hello")
                && denied("ro", "prompt", "greet")
                && denied("ng", "prompt", "greet"))
            .then_some(())
        },
    )
    .await;
    c.shutdown().await;
}

/// A tool call's records carry the proxy's own name as actor, and the
/// same fields, whether the proxy hands them to the auth-service in its
/// process (as the all-in-one does) or sends them over gRPC (a proxy in a
/// process of its own).
#[tokio::test]
async fn tool_calls_are_audited_alike_in_process_and_over_grpc() {
    let mut seen = Vec::new();
    for (path, b) in [
        ("in process", ClusterBuilder::new()),
        ("over gRPC", ClusterBuilder::new().audit_over_grpc()),
    ] {
        let c = cluster_with_app(b).await;
        let proxy = c.proxy.as_ref().expect("proxy").identity.host_id.clone();
        let mut m = open(&c, "mallory").await;
        let r = m.call("echo", json!({"message": "audited"})).await;
        assert_eq!(r["result"]["content"][0]["text"], "audited", "{path}: {r}");
        let r = m.call("touch", json!({"path": "/nonexistent/x"})).await;
        assert_rbac_denied(&r, "touch");
        let evs = eventually(Duration::from_secs(10), "the calls audited", || async {
            let evs: Vec<Value> = request_events(&c)
                .await?
                .into_iter()
                .filter(|e| e["fields"]["user"] == "mallory" && e["fields"]["tool"].is_string())
                .collect();
            (evs.len() >= 2).then_some(evs)
        })
        .await;
        let mut records = Vec::new();
        for e in &evs {
            assert_eq!(e["actor"], proxy.as_str(), "{path}: {e}");
            assert_eq!(e["fields"]["actor"], proxy.as_str(), "{path}: {e}");
            let f = e["fields"].as_object().expect("fields");
            let mut keys: Vec<&str> = f.keys().map(String::as_str).collect();
            keys.sort();
            records.push(format!(
                "{} {} {} {} {}",
                f["tool"],
                f["phase"],
                f["allowed"],
                e["success"],
                keys.join(",")
            ));
        }
        records.sort();
        // The echo's one record (decided and completed), the touch's refusal.
        assert_eq!(records.len(), 2, "{path}: {records:?}");
        seen.push(records);
        c.shutdown().await;
    }
    assert_eq!(seen[0], seen[1], "the same records on both paths");
}

/// A proxy that stops has stored the records of what it ended by the time
/// it is gone (the end of every open session, with why), on both audit
/// paths: nothing it queued leaves with the process.
#[tokio::test]
async fn a_stopping_proxy_stores_its_audit_before_it_is_gone() {
    for (path, b) in [
        ("in process", ClusterBuilder::new()),
        ("over gRPC", ClusterBuilder::new().audit_over_grpc()),
    ] {
        let mut c = cluster_with_app(b).await;
        let mut ids = Vec::new();
        let mut sessions = Vec::new();
        for _ in 0..5 {
            let s = open(&c, "mallory").await;
            ids.push(s.session.clone().expect("session id"));
            sessions.push(s);
        }
        c.proxy.take().expect("proxy").shutdown().await;
        // Read at once, without waiting for anything.
        let ended: Vec<Value> = c
            .audit_events("mcp.session.end")
            .await
            .into_iter()
            .map(|(_, f)| f)
            .collect();
        for id in &ids {
            assert!(
                ended
                    .iter()
                    .any(|f| f["session"] == id.as_str()
                        && f["reason"] == "the proxy is shutting down"),
                "{path}: session {id} ended without a stored record: {ended:?}"
            );
        }
        c.shutdown().await;
    }
}

#[tokio::test]
async fn denials_are_audited() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    let marks = Marks::new();
    let mut m = open(&c, "mallory").await;
    let r = raw(
        &m,
        &marks.fill(r#"{"jsonrpc":"2.0","id":90,"method":"tools/call","params":{"name":"echo","name":"touch","arguments":{"path":$PATH}}}"#),
    )
    .await;
    assert_refused(&r, -32700, "duplicate name");
    let r = raw(
        &m,
        &marks.fill(r#"{"jsonrpc":"2.0","id":91,"method":"tools/call","params":{"name":"t\u006fuch","arguments":{"path":$PATH}}}"#),
    )
    .await;
    assert_rbac_denied(&answer(&r, &json!(91)), "escaped touch");
    let r = raw(
        &m,
        &marks.fill(r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let r = raw(
        &m,
        &marks.fill(r#"[{"jsonrpc":"2.0","id":92,"method":"tools/call","params":{"name":"echo","arguments":{"message":"hi"}}},{"jsonrpc":"2.0","id":93,"method":"tools/call","params":{"name":"touch","arguments":{"path":$PATH}}}]"#),
    )
    .await;
    assert_rbac_denied(&answer(&r, &json!(93)), "touch in a batch");
    let r = raw(
        &m,
        &marks.fill(r#"{"jsonrpc":"2.0","id":94,"method":"tools/call","params":{"name":"TOUCH","arguments":{"path":$PATH}}}"#),
    )
    .await;
    assert_failed(&answer(&r, &json!(94)), "TOUCH");
    assert_untouched(&mut m, &marks, "audited denials").await;

    let mine = eventually(
        Duration::from_secs(10),
        "the denials are audited",
        || async {
            let mine: Vec<Value> = request_events(&c)
                .await?
                .into_iter()
                .filter(|e| e["fields"]["user"] == "mallory")
                .collect();
            let denied_ids: Vec<Value> = mine
                .iter()
                .filter(|e| {
                    let f = &e["fields"];
                    f["tool"] == "touch" && f["allowed"] == false && f["phase"] == "decided"
                })
                .map(|e| e["fields"]["id"].clone())
                .collect();
            let parse_refusal = mine.iter().any(|e| {
                e["success"] == false
                    && e["fields"]["error"]
                        .as_str()
                        .is_some_and(|s| s.contains("duplicate key"))
            });
            let upper_completed = mine
                .iter()
                .any(|e| e["fields"]["tool"] == "TOUCH" && e["fields"]["phase"] == "completed");
            // The escaped request, the notification (no id) and the batch element.
            let all_denials = [json!(91), Value::Null, json!(93)]
                .iter()
                .all(|id| denied_ids.contains(id));
            (all_denials && parse_refusal && upper_completed).then_some(mine)
        },
    )
    .await;
    for e in &mine {
        let f = &e["fields"];
        if f["tool"] == "touch" {
            assert_eq!(f["allowed"], false, "a touch was allowed: {e}");
            assert_eq!(f["phase"], "decided", "a touch went further: {e}");
            assert_eq!(e["success"], false, "{e}");
            assert_eq!(f["method"], "tools/call", "{e}");
            assert_eq!(f["app"], "tm", "{e}");
            assert!(
                f["error"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("RBAC denied")),
                "{e}"
            );
        }
    }
    let upper = mine
        .iter()
        .find(|e| e["fields"]["tool"] == "TOUCH" && e["fields"]["phase"] == "completed")
        .expect("TOUCH completed");
    assert_ne!(
        upper["fields"]["outcome"], "ok",
        "the server refused TOUCH: {upper}"
    );
    c.shutdown().await;
}

/// A raw connection to the proxy at `addr` that has sent `first`, then,
/// 200 ms later, `rest`.
async fn send_in_two(
    addr: std::net::SocketAddr,
    first: &[u8],
    rest: &[u8],
) -> Box<dyn portico_tls::net::TokioStream> {
    use tokio::io::AsyncWriteExt;
    let mut s = portico_tests::web::stream(addr).await;
    s.write_all(first).await.expect("the first part");
    s.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(rest).await.expect("the rest");
    s
}

/// Reads one HTTP/2 frame (within 10 s): its type and payload.
async fn read_h2_frame(tcp: &mut (impl tokio::io::AsyncRead + Unpin)) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut head = [0u8; 9];
        tcp.read_exact(&mut head).await.expect("a frame header");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.expect("a frame payload");
        (head[3], payload)
    })
    .await
    .expect("a frame within 10 s")
}

/// Reads from a raw connection until the peer answers or closes, for at most `limit`.
async fn read_reply(
    tcp: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(limit, tcp.read(&mut buf)).await {
        Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Ok(Err(_)) => Some(String::new()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn slow_headers_and_bodies_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let c = cluster_with_app(ClusterBuilder::new().request_timeouts("1s", "1s")).await;
    let marks = Marks::new();
    let mut t = open(&c, "trent").await;
    let sid = t.session.clone().expect("session id");

    // Headers that never finish: the connection is closed, with nothing served.
    let mut slow = portico_tests::web::stream(c.proxy_addr()).await;
    slow.write_all(b"POST /mcp/tm HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("partial headers");
    let r = read_reply(&mut slow, Duration::from_secs(10))
        .await
        .expect("the proxy gives up on slow headers");
    assert!(!r.starts_with("HTTP/1.1 200"), "{r}");

    // An allowed touch whose body stops half way: 408, and it never runs.
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":81,"method":"tools/call","params":{{"name":"touch","arguments":{{"path":{}}}}}}}"#,
        js(&marks.target)
    );
    let head = format!(
        "POST /mcp/tm HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nMcp-Session-Id: {sid}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n",
        t.token,
        body.len()
    );
    let mut slow = portico_tests::web::stream(c.proxy_addr()).await;
    slow.write_all(head.as_bytes()).await.expect("headers");
    slow.write_all(&body.as_bytes()[..body.len() / 2])
        .await
        .expect("half the body");
    let r = read_reply(&mut slow, Duration::from_secs(10))
        .await
        .expect("the proxy gives up on a slow body");
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    assert_untouched(&mut t, &marks, "a slow body").await;
    assert_touch_runs(&c, &marks).await;
    c.shutdown().await;
}

/// The `mcp.session.request` records of `tool` in `phase`.
fn records_of(evs: &[Value], tool: &str, phase: &str) -> Vec<Value> {
    evs.iter()
        .filter(|e| e["fields"]["tool"] == tool && e["fields"]["phase"] == phase)
        .map(|e| e["fields"].clone())
        .collect()
}

/// Waits for a record of `tool` in `phase`: its fields, and every record then.
async fn record_of(c: &Cluster, tool: &str, phase: &str) -> (Value, Vec<Value>) {
    eventually(
        Duration::from_secs(10),
        &format!("a {phase} record of {tool}"),
        || async {
            let evs = request_events(c).await?;
            let one = records_of(&evs, tool, phase).pop()?;
            Some((one, evs))
        },
    )
    .await
}

/// An allowed call answered within `rbac::DECIDED_AFTER` is audited once,
/// its decision and outcome in one record; a longer one also while it
/// runs; one still waiting when its session ends, as unanswered.
#[tokio::test]
async fn tool_calls_are_audited_once_and_long_ones_while_they_run() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    let mut t = open(&c, "trent").await;
    let r = t.call("echo", json!({"message": "audited once"})).await;
    assert!(r["result"].is_object(), "{r}");
    let (done, evs) = record_of(&c, "echo", "completed").await;
    let fields = |f: &Value| json!([f["method"], f["allowed"], f["outcome"], f["user"]]);
    assert_eq!(
        fields(&done),
        json!(["tools/call", true, "ok", "trent"]),
        "{done}"
    );
    // No decision of its own: an answer before one second leaves none
    // (a slower one, on a loaded machine, would have one; its `ms` says so).
    if done["ms"].as_u64().is_some_and(|ms| ms < 1000) {
        assert!(records_of(&evs, "echo", "decided").is_empty(), "{evs:?}");
    }

    let slow = tokio::spawn(async move { t.call("slow", json!({"ms": 30000})).await });
    c.wait_pending(1).await;
    // Still running, and already in the audit log.
    let (decided, _) = record_of(&c, "slow", "decided").await;
    assert_eq!(
        fields(&decided),
        json!(["tools/call", true, null, "trent"]),
        "{decided}"
    );
    let state = c.proxy.as_ref().expect("proxy").state.clone();
    let waiting: usize = state.sessions.all().iter().map(|s| s.pending_count()).sum();
    assert_eq!(waiting, 1, "the slow call is still waiting");
    for s in state.sessions.all() {
        s.end(&state, "ended by the test").await;
    }
    let r = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the call ends with its session")
        .expect("task");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("ended by the test")),
        "{r}"
    );
    let (unanswered, evs) = record_of(&c, "slow", "completed").await;
    assert_eq!(
        fields(&unanswered),
        json!(["tools/call", true, "unanswered", "trent"]),
        "{unanswered}"
    );
    assert_eq!(
        records_of(&evs, "slow", "decided").len(),
        1,
        "decided once: {evs:?}"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn users_cannot_grant_roles_they_do_not_hold() {
    let c = ClusterBuilder::new().start().await;
    c.create_yaml(
        "kind: role\nversion: v8\nmetadata: {name: user-admin}\nspec:\n  allow:\n    rules:\n    - resources: [user]\n      verbs: [list, read, create, update]\n",
        false,
    )
    .await
    .expect("role");
    c.add_user("ursula", &["user-admin"], PW).await;
    let mut api = c.client(&c.login("ursula", PW).await).await;
    let add = |name: &str, roles: &[&str]| portico_proto::v1::AddUserRequest {
        name: name.into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        ..Default::default()
    };
    let e = api
        .add_user(add("mole", &["admin"]))
        .await
        .expect_err("admin is not ursula's to give");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("\"admin\""), "{}", e.message());
    // The same through a user resource, created and overwritten.
    let mole = |roles: &str| portico_proto::v1::Resource {
        kind: "user".into(),
        json: format!(
            r#"{{"kind":"user","version":"v2","metadata":{{"name":"mole2"}},"spec":{{"roles":{roles}}}}}"#
        ),
    };
    let e = api
        .create(portico_proto::v1::CreateRequest {
            resources: vec![mole(r#"["mcp-user"]"#)],
            overwrite: false,
        })
        .await
        .expect_err("mcp-user is not ursula's to give");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // Roles she holds are hers to give.
    api.add_user(add("helper", &["user-admin"]))
        .await
        .expect("her own role");
    // A role that denies is not hers to leave out: dora, kept from prod
    // apps, could otherwise make a user (or make herself) one who is not.
    c.create_yaml(
        "kind: role\nversion: v8\nmetadata: {name: no-prod}\nspec:\n  deny:\n    app_labels: {env: prod}\n",
        false,
    )
    .await
    .expect("role");
    c.add_user("dora", &["user-admin", "no-prod"], PW).await;
    let mut dora = c.client(&c.login("dora", PW).await).await;
    let e = dora
        .add_user(add("sock", &["user-admin"]))
        .await
        .expect_err("a user without no-prod reaches what dora may not");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("\"no-prod\""), "{}", e.message());
    let me = portico_proto::v1::Resource {
        kind: "user".into(),
        json: r#"{"kind":"user","version":"v2","metadata":{"name":"dora"},"spec":{"roles":["user-admin"]}}"#.into(),
    };
    let e = dora
        .create(portico_proto::v1::CreateRequest {
            resources: vec![me],
            overwrite: true,
        })
        .await
        .expect_err("nor may she drop it from herself");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    dora.add_user(add("sock", &["user-admin", "no-prod"]))
        .await
        .expect("with no-prod, sock reaches no more than dora");
    // Names the system uses are nobody's, the admin's included.
    let mut admin = c.admin().await;
    for reserved in ["admin", "system", "root", "portico"] {
        let e = admin
            .add_user(add(reserved, &["mcp-user"]))
            .await
            .expect_err("reserved");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{reserved}: {e:?}");
    }
    c.shutdown().await;
}

/// A proxy of the test's own, joined to the cluster, its web listener on `web`.
async fn own_proxy(
    c: &Cluster,
    web: &str,
    mut cfg: portico_proxy::ProxyConfig,
) -> portico_proxy::Proxy {
    cfg.auth_servers = vec![c.auth_addr.to_string()];
    cfg.join_token = Some(c.join_token("proxy").await);
    let listeners = portico_proxy::Listeners {
        web: tokio::net::TcpListener::bind(web).await.expect("bind"),
        tunnel: tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
    };
    let dir = c
        .data_dir()
        .join(format!("own-proxy-{}", rand::random::<u32>()));
    let p = portico_proxy::start(&cfg, portico_proxy::Credentials::join(dir), listeners)
        .await
        .expect("proxy");
    portico_tests::web::register(&p);
    p
}

/// A stdio app running a Python script, registered and served by `a1`.
async fn python_app(c: &Cluster, name: &str, script: &str) {
    let yaml = format!(
        "kind: app\nversion: v3\nmetadata: {{name: {name}}}\nspec:\n  mcp:\n    command: python3\n    args: [\"-c\", {}]\n    run_as_host_user: {}\n",
        serde_json::to_string(script).expect("json"),
        portico_tests::util::me()
    );
    c.create_yaml(&yaml, false).await.expect("app");
    c.wait_servers(name, &["a1"]).await;
}

/// A local address that is not loopback, when the machine has one.
fn outside_address() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test]
async fn metrics_answer_only_loopback() {
    let c = ClusterBuilder::new().start().await;
    let p = own_proxy(&c, "0.0.0.0:0", portico_proxy::ProxyConfig::default()).await;
    let port = p.web_addr.port();
    let status = |ip: std::net::IpAddr| async move {
        let addr = std::net::SocketAddr::new(ip, port).to_string();
        let code = portico_tests::web::probe(&addr, "/metrics")
            .await
            .expect("metrics answer");
        StatusCode::from_u16(code).expect("status")
    };
    assert_eq!(
        status("127.0.0.1".parse().expect("ip")).await,
        StatusCode::OK
    );
    match outside_address() {
        Some(ip) => assert_eq!(status(ip).await, StatusCode::FORBIDDEN, "from {ip}"),
        None => eprintln!("no non-loopback address on this machine; remote /metrics not tried"),
    }
    p.shutdown().await;
    c.shutdown().await;
}

#[tokio::test]
async fn role_patterns_that_do_not_compile_are_refused() {
    let c = ClusterBuilder::new().start().await;
    let dir = TempDir::new("portico-badrole");
    for (field, mcp) in [
        ("spec.deny.mcp.tools[1]", "tools: [echo, '^(unclosed$']"),
        ("spec.deny.mcp.resources[0]", "resources: ['^[z-a]$']"),
        ("spec.deny.mcp.prompts[0]", "prompts: ['^(?<$']"),
    ] {
        let file = dir.path().join("role.yaml");
        std::fs::write(
            &file,
            format!(
                "kind: role\nversion: v8\nmetadata: {{name: leaky}}\nspec:\n  allow:\n    app_labels: {{'*': '*'}}\n    mcp: {{tools: ['*']}}\n  deny:\n    mcp: {{{mcp}}}\n"
            ),
        )
        .expect("write");
        let o = c.pctl(&["create", &file.display().to_string()]).await;
        let (out, err) = text(&o);
        assert!(
            !o.status.success(),
            "a deny rule that denies nothing was stored: {out}"
        );
        assert!(
            err.contains(field) && err.contains("role.yaml:1"),
            "the error names the file and {field}: {err}"
        );
    }
    let o = c.pctl(&["get", "roles"]).await;
    assert!(!text(&o).0.contains("leaky"), "{:?}", text(&o));
    c.shutdown().await;
}

#[tokio::test]
async fn keys_a_case_insensitive_server_would_merge_are_refused() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    let marks = Marks::new();
    let mut m = open(&c, "mallory").await;
    // A Go server decoding into structs matches keys case-insensitively
    // (and folds ſ to s, K to k): whichever key it took, it would not be
    // the one the proxy checked.
    for (what, body, code) in [
        (
            "NAME beside name",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","NAME":"touch","arguments":{"path":$PATH}}}"#,
            -32700,
        ),
        (
            "long s in a top-level key",
            "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tools/call\",\"params\":{\"name\":\"echo\"},\"param\u{017f}\":{\"name\":\"touch\",\"arguments\":{\"path\":$PATH}}}",
            -32700,
        ),
        (
            "upper-case members of a response",
            r#"{"jsonrpc":"2.0","id":3,"METHOD":"tools/call","PARAMS":{"name":"touch","arguments":{"path":$PATH}},"error":{"code":1,"message":"x"}}"#,
            -32600,
        ),
        (
            "Kelvin sign",
            "{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"tools/call\",\"params\":{\"name\":\"echo\",\"arguments\":{\"path\":$PATH,\"\u{212a}\":1,\"k\":2}}}",
            -32700,
        ),
    ] {
        let r = raw(&m, &marks.fill(body)).await;
        assert_refused(&r, code, what);
    }
    assert_untouched(&mut m, &marks, "case-folded keys").await;
    c.shutdown().await;
}

#[tokio::test]
async fn batches_are_bounded() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    let m = open(&c, "mallory").await;
    let batch = |n: usize| {
        let items: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"jsonrpc":"2.0","id":{},"method":"ping"}}"#, 1000 + i))
            .collect();
        format!("[{}]", items.join(","))
    };
    let r = raw(&m, &batch(101)).await;
    assert_refused(&r, -32600, "101 messages");
    let r = raw(&m, &batch(100)).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.messages().len(), 100, "every ping is answered");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_ended_and_others_go_on() {
    use tokio::io::AsyncWriteExt;
    let c = cluster_with_app(ClusterBuilder::new()).await;
    let m = open(&c, "mallory").await;
    let sid = m.session.clone().expect("session id");
    let mut t = open(&c, "trent").await;
    // Mallory has her own stream flooded (4,000 notifications of 8 KiB,
    // far more than every buffer on the way) and never reads a byte.
    let body = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"flood","arguments":{"count":4000,"bytes":8192},"_meta":{"progressToken":"p"}}}"#;
    let request = format!(
        "POST /mcp/tm HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nMcp-Session-Id: {sid}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n{body}",
        m.token,
        body.len()
    );
    let mut stalled = portico_tests::web::stream(c.proxy_addr()).await;
    stalled
        .write_all(request.as_bytes())
        .await
        .expect("request");
    let state = c.proxy.as_ref().expect("proxy").state.clone();
    let started = std::time::Instant::now();
    // Trent, on the same agent, is answered all along; mallory's session ends.
    loop {
        let r = tokio::time::timeout(
            Duration::from_secs(3),
            t.call("echo", json!({"message": "alive"})),
        )
        .await
        .expect("another session is answered while one client stalls");
        assert_eq!(r["result"]["content"][0]["text"], "alive", "{r}");
        if state.sessions.get(&sid).is_none() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the stalled session was never ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually(Duration::from_secs(10), "the stall is audited", || async {
        let o = c
            .pctl(&[
                "events",
                "ls",
                "--type",
                "mcp.session.end",
                "--format",
                "json",
            ])
            .await;
        let v: Value = serde_json::from_str(&text(&o).0).ok()?;
        v.as_array()?
            .iter()
            .any(|e| {
                e["fields"]["session"] == sid.as_str()
                    && e["fields"]["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("stopped reading"))
            })
            .then_some(())
    })
    .await;
    drop(stalled);
    c.shutdown().await;
}

#[tokio::test]
async fn a_server_answer_that_cannot_be_read_is_an_error_not_a_hang() {
    let c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    // A server that answers initialize properly and every other request with
    // duplicate keys (its tools/list would otherwise go out unfiltered).
    let script = "import json,sys\nfor l in sys.stdin:\n    m = json.loads(l)\n    if 'id' not in m: continue\n    if m.get('method') == 'initialize':\n        print(json.dumps({'jsonrpc':'2.0','id':m['id'],'result':{'protocolVersion':m['params']['protocolVersion'],'capabilities':{'tools':{}},'serverInfo':{'name':'twofaced','version':'1'}}}), flush=True)\n    else:\n        i = json.dumps(m['id'])\n        print('{\"jsonrpc\":\"2.0\",\"id\":' + i + ',\"result\":{\"tools\":[]},\"result\":{\"tools\":[{\"name\":\"secret\"}]}}', flush=True)\n";
    python_app(&c, "twofaced", script).await;
    c.create_yaml(NO_TOUCH.replace("{env: dev}", "{'*': '*'}").as_str(), false)
        .await
        .expect("role");
    c.add_user("mallory", &["no-touch"], PW).await;
    let t = c.login("mallory", PW).await;
    let mut s = McpHttp::new(c.proxy_addr(), "twofaced", &t);
    eventually(Duration::from_secs(10), "a session opens", || async {
        let mut probe = McpHttp::new(c.proxy_addr(), "twofaced", &t);
        probe.initialize().await.ok().map(|_| ())
    })
    .await;
    s.initialize().await.expect("initialize");
    let r = tokio::time::timeout(Duration::from_secs(10), s.request("tools/list", json!({})))
        .await
        .expect("answered, not left waiting");
    assert_eq!(r["error"]["code"], -32603, "{r}");
    assert!(!r.to_string().contains("secret"), "{r}");
    c.shutdown().await;
}

/// Opens `cap` silent connections to `addr` and keeps them; one more is
/// closed at once (`what` says otherwise).
async fn held_to_the_cap(
    addr: std::net::SocketAddr,
    cap: usize,
    what: &str,
) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::new();
    for _ in 0..cap {
        held.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    let mut over = tokio::net::TcpStream::connect(addr).await.expect("connect");
    assert!(closed_at_once(&mut over).await, "{what}");
    held
}

/// Whether the proxy closes a fresh connection at once (read sees EOF or a reset).
async fn closed_at_once(tcp: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn connections_and_handshakes_are_capped_per_address() {
    let c = ClusterBuilder::new().start().await;
    let cfg = portico_proxy::ProxyConfig {
        max_connections_per_address: Some(3),
        ..Default::default()
    };
    let p = own_proxy(&c, "127.0.0.1:0", cfg).await;
    // Three idle web connections are held; a fourth from the same address is closed.
    let held = held_to_the_cap(p.web_addr, 3, "a fourth connection was kept").await;
    drop(held);
    // Once they are gone, a new one is served.
    eventually(
        Duration::from_secs(10),
        "a connection is served again",
        || async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut tcp = portico_tests::web::stream(p.web_addr).await;
            tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .ok()?;
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf))
                .await
                .ok()?
                .ok()?;
            buf[..n].starts_with(b"HTTP/1.1 200").then_some(())
        },
    )
    .await;

    // Eight silent tunnel handshakes from one address are waited on; a ninth is closed.
    let mut silent = held_to_the_cap(
        p.tunnel_addr,
        portico_tunnel::MAX_HANDSHAKES_PER_ADDRESS,
        "a ninth handshake was waited on",
    )
    .await;
    // Silence is not waited on for long: the held ones are closed within seconds.
    for s in &mut silent {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(_)) | Ok(Err(_))),
            "a silent handshake was kept"
        );
    }
    drop(silent);

    // The auth-service's listener, likewise: silent connections from one
    // address take at most their share of handshakes, and one beyond is
    // closed at once rather than left to wait on the accept loop.
    let silent = held_to_the_cap(
        c.auth_addr,
        portico_tls::net::MAX_HANDSHAKES_PER_ADDRESS,
        "a handshake beyond the address's share was waited on",
    )
    .await;
    drop(silent);
    eventually(
        Duration::from_secs(10),
        "the auth-service answers again",
        || async {
            let token = c.admin_token();
            let mut api = portico_proto::client::connect(&c.auth_dial(), Some(&token))
                .await
                .ok()?;
            api.who_am_i(portico_proto::v1::WhoAmIRequest::default())
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    p.shutdown().await;
    c.shutdown().await;
}

#[tokio::test]
async fn a_server_that_stops_reading_does_not_hang_its_clients() {
    let c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    // Answers initialize, then never reads its input again. The marker
    // finds its process.
    let marker = format!("deaf-{}", std::process::id());
    let script = "import json,sys,time\nfor l in sys.stdin:\n    m = json.loads(l)\n    if m.get('method') == 'initialize':\n        print(json.dumps({'jsonrpc':'2.0','id':m['id'],'result':{'protocolVersion':m['params']['protocolVersion'],'capabilities':{},'serverInfo':{'name':'deaf','version':'1'}}}), flush=True)\n    if m.get('method') == 'notifications/initialized':\n        time.sleep(600)\n";
    let script = format!("{script}# {marker}\n");
    python_app(&c, "deaf", &script).await;
    c.add_user("una", &["admin"], PW).await;
    let t = c.login("una", PW).await;
    let mut s = McpHttp::new(c.proxy_addr(), "deaf", &t);
    eventually(Duration::from_secs(10), "the session opens", || async {
        let mut probe = McpHttp::new(c.proxy_addr(), "deaf", &t);
        probe.initialize().await.ok().map(|_| ())
    })
    .await;
    s.initialize().await.expect("initialize");
    // Fill the pipe and the tunnel stream's window, then keep sending.
    let big = format!(
        r#"{{"jsonrpc":"2.0","method":"notifications/message","params":{{"level":"info","data":"{}"}}}}"#,
        "z".repeat(3 * 1024 * 1024)
    );
    let small: Vec<String> = (0..100)
        .map(|i| format!(r#"{{"jsonrpc":"2.0","method":"notifications/progress","params":{{"progressToken":"t","progress":{i}}}}}"#))
        .collect();
    let small = format!("[{}]", small.join(","));
    let outcome = tokio::time::timeout(Duration::from_secs(60), async {
        let r = raw(&s, &big).await;
        if r.status != StatusCode::ACCEPTED {
            return r;
        }
        loop {
            let r = raw(&s, &small).await;
            if r.status != StatusCode::ACCEPTED {
                return r;
            }
        }
    })
    .await
    .expect("the proxy gives up on a server that does not read, rather than hang");
    assert!(
        outcome.messages()[0]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not reading its input")),
        "{outcome:?}"
    );
    // The client gives up: the server goes, with the write it never took.
    let running = || {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker))
            })
            .count()
    };
    // This session's server and the probe's (which stays open).
    let before = running();
    assert!(before >= 2, "the deaf servers run: {before}");
    assert_eq!(s.delete().await.status, StatusCode::OK);
    eventually(Duration::from_secs(30), "the deaf server ended", || async {
        (running() < before).then_some(())
    })
    .await;
    c.shutdown().await;
}

#[tokio::test]
async fn failed_authentication_at_the_proxy_is_audited_with_its_source() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    for (what, token) in [("missing", ""), ("unknown", "not-a-token")] {
        let s = McpHttp::new(c.proxy_addr(), "tm", token);
        let hdrs: Vec<(&str, &str)> = JSON_HDRS.to_vec();
        let mut with_auth = hdrs.clone();
        let bearer = format!("Bearer {token}");
        if !token.is_empty() {
            with_auth.push(("authorization", bearer.as_str()));
        }
        let r = s
            .send(
                http::Method::POST,
                &with_auth,
                Some(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {r:?}");
    }
    eventually(Duration::from_secs(10), "refusals audited", || async {
        let o = c
            .pctl(&[
                "events",
                "ls",
                "--type",
                "proxy.auth.failed",
                "--format",
                "json",
            ])
            .await;
        let v: Value = serde_json::from_str(&text(&o).0).ok()?;
        let evs = v.as_array()?;
        (evs.len() >= 2
            && evs.iter().all(|e| {
                e["success"] == false
                    && e["fields"]["path"] == "/mcp/tm"
                    && e["fields"]["source"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("127.0.0.1:"))
            }))
        .then_some(())
    })
    .await;
    c.shutdown().await;
}

#[tokio::test]
async fn sessions_end_when_their_user_or_access_goes() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    // Mallory is deleted while a call is in flight.
    let mut m = open(&c, "mallory").await;
    let pending = tokio::spawn(async move { m.call("slow", json!({"ms": 30000})).await });
    c.wait_pending(1).await;
    let o = c.pctl(&["users", "rm", "mallory"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let r = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("the call ends with the session")
        .expect("task");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("your user was deleted")),
        "{r}"
    );
    // Eve's role stops reaching the app.
    let mut e = open(&c, "eve").await;
    let r = e.call("echo", json!({"message": "before"})).await;
    assert_eq!(r["result"]["content"][0]["text"], "before", "{r}");
    c.create_yaml(&ECHO_ONLY.replace("{env: dev}", "{env: prod}"), true)
        .await
        .expect("role narrowed");
    let state = c.proxy.as_ref().expect("proxy").state.clone();
    eventually(Duration::from_secs(5), "eve's session ended", || {
        let st = state.clone();
        async move {
            st.sessions
                .all()
                .iter()
                .all(|s| s.user != "eve")
                .then_some(())
        }
    })
    .await;
    let r = raw(
        &e,
        r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"echo","arguments":{"message":"after"}}}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{r:?}");
    c.shutdown().await;
}

#[tokio::test]
async fn a_locked_user_is_out_within_a_second() {
    let c = cluster_with_app(ClusterBuilder::new()).await;
    c.add_user("lou", &["toucher"], PW).await;
    let mut s = open(&c, "lou").await;
    let token = s.token.clone();
    let pending = tokio::spawn(async move { s.call("slow", json!({"ms": 30000})).await });
    c.wait_pending(1).await;
    let o = c.pctl(&["users", "lock", "lou"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let locked_at = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("the call ends with the session")
        .expect("task");
    eprintln!(
        "a locked user's session ended {:?} after the lock",
        locked_at.elapsed()
    );
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("your user was locked")),
        "{r}"
    );
    // The token no longer opens anything, and the password no longer logs in.
    let mut again = McpHttp::new(c.proxy_addr(), "tm", &token);
    assert!(
        again.initialize().await.is_err(),
        "a locked user's token still works"
    );
    let e = portico_proto::client::connect(&c.auth_dial(), None)
        .await
        .expect("connect")
        .login(portico_proto::v1::LoginRequest {
            user: "lou".into(),
            password: PW.into(),
        })
        .await
        .expect_err("a locked user cannot log in");
    assert!(e.message().contains("locked"), "{}", e.message());
    let e = c
        .client(&token)
        .await
        .who_am_i(portico_proto::v1::WhoAmIRequest {})
        .await
        .expect_err("a locked user's token is refused by the API");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    // Unlocked, lou logs in again.
    let o = c.pctl(&["users", "unlock", "lou"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let fresh = c.login("lou", PW).await;
    let mut s = McpHttp::new(c.proxy_addr(), "tm", &fresh);
    s.initialize().await.expect("unlocked");
    c.shutdown().await;
}

#[tokio::test]
async fn vanished_clients_and_cancelled_calls() {
    let c = cluster_with_app(ClusterBuilder::new().idle_timeout("1s")).await;
    let state = c.proxy.as_ref().expect("proxy").state.clone();
    let agent = c.agent("a1").state.clone();
    let live = || {
        agent
            .metrics
            .live
            .load(std::sync::atomic::Ordering::Relaxed)
    };

    // A client that goes away without DELETE: its session ends after the
    // idle timeout and its process is reaped.
    let before = live();
    let s = open(&c, "trent").await;
    let sid = s.session.clone().expect("sid");
    assert_eq!(live(), before + 1);
    drop(s);
    eventually(Duration::from_secs(10), "the idle session ended", || {
        let st = state.clone();
        let sid = sid.clone();
        async move { st.sessions.get(&sid).is_none().then_some(()) }
    })
    .await;
    eventually(Duration::from_secs(10), "its process reaped", || async {
        (live() == before).then_some(())
    })
    .await;

    // A call the client cancels: the server hears of it, and the proxy
    // stops waiting for an answer that will not come.
    let marks = Marks::new();
    let t = open(&c, "trent").await;
    let body = marks.fill(
        r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"await_cancel","arguments":{"path":$PATH}}}"#,
    );
    let call = tokio::spawn(async move {
        let r = raw(&t, &body).await;
        (r, t)
    });
    c.wait_pending(1).await;
    let t2 = McpHttp::new(c.proxy_addr(), "tm", &token(&c, "trent").await);
    let mut t2 = t2;
    t2.session = Some(sid_of(&state, "trent"));
    let r = raw(
        &t2,
        r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":7,"reason":"gave up"}}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    eventually(
        Duration::from_secs(10),
        "the server heard the cancellation",
        || async { (std::fs::read_to_string(&marks.target).ok()? == "cancelled").then_some(()) },
    )
    .await;
    let (r, _t) = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the cancelled call's stream closes")
        .expect("task");
    assert!(
        r.messages().iter().all(|m| m.get("id") != Some(&json!(7))),
        "no answer for a cancelled call: {:?}",
        r.messages()
    );
    assert_eq!(
        state
            .sessions
            .all()
            .iter()
            .map(|s| s.pending_count())
            .sum::<usize>(),
        0
    );
    c.shutdown().await;
}

/// A request the client cancels may still be answered by its server. Until
/// that late answer comes, its id is not taken again, nor its twin of the
/// other type (`5` and `"5"`): otherwise the late answer would pass for the
/// answer to the new request and be checked against the wrong method (here
/// an unfiltered `tools/list` as the answer to a `ping`). The late answer
/// is dropped, and the id is free again.
#[tokio::test]
async fn a_cancelled_requests_late_answer_answers_nothing_else() {
    let c = ClusterBuilder::new()
        .proxy()
        .wildcard_agent("a1")
        .start()
        .await;
    // Holds each tools/list, ignores cancellations, and answers what it
    // holds before it answers the next request: a cancelled list's answer
    // comes late, just before the answer to whatever is sent next.
    let script = "import json,sys\nheld=[]\ndef out(m):\n    print(json.dumps(m), flush=True)\nfor l in sys.stdin:\n    m = json.loads(l)\n    if 'id' not in m: continue\n    if m.get('method') == 'initialize':\n        out({'jsonrpc':'2.0','id':m['id'],'result':{'protocolVersion':m['params']['protocolVersion'],'capabilities':{'tools':{}},'serverInfo':{'name':'late','version':'1'}}})\n        continue\n    for i in held:\n        out({'jsonrpc':'2.0','id':i,'result':{'tools':[{'name':'echo','inputSchema':{'type':'object'}},{'name':'touch','inputSchema':{'type':'object'}}]}})\n    held.clear()\n    if m.get('method') == 'tools/list':\n        held.append(m['id'])\n    else:\n        out({'jsonrpc':'2.0','id':m['id'],'result':{}})\n";
    python_app(&c, "late", script).await;
    c.create_yaml(NO_TOUCH.replace("{env: dev}", "{'*': '*'}").as_str(), false)
        .await
        .expect("role");
    c.add_user("mallory", &["no-touch"], PW).await;
    let t = c.login("mallory", PW).await;
    eventually(Duration::from_secs(10), "a session opens", || async {
        let mut probe = McpHttp::new(c.proxy_addr(), "late", &t);
        probe.initialize().await.ok().map(|_| ())
    })
    .await;
    let mut s = McpHttp::new(c.proxy_addr(), "late", &t);
    s.initialize().await.expect("initialize");
    let mut t2 = McpHttp::new(c.proxy_addr(), "late", &t);
    t2.session = s.session.clone();
    let shows_touch = |r: &Reply| String::from_utf8_lossy(&r.body).contains("touch");
    let refused = |r: &Reply, id: &Value, what: &str| {
        let a = answer(r, id);
        assert_eq!(a["error"]["code"], -32600, "{what}: {a}");
        assert!(!shows_touch(r), "{what}: {r:?}");
    };
    let list =
        tokio::spawn(
            async move { raw(&s, r#"{"jsonrpc":"2.0","id":5,"method":"tools/list"}"#).await },
        );
    c.wait_pending(1).await;
    let ping = |id: &Value| format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#);
    let r = raw(&t2, &ping(&json!("5"))).await;
    refused(&r, &json!("5"), "ping \"5\" while 5 waits");
    let r = raw(
        &t2,
        r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":5,"reason":"gave up"}}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let r = tokio::time::timeout(Duration::from_secs(10), list)
        .await
        .expect("the cancelled list's stream closes")
        .expect("task");
    assert!(
        r.messages().iter().all(|m| m.get("id") != Some(&json!(5))),
        "no answer for a cancelled request: {r:?}"
    );
    // Cancelled, not answered: a ping with 5 or "5" now would be given the
    // list. Refused before it reaches the server.
    for id in [json!(5), json!("5")] {
        let r = raw(&t2, &ping(&id)).await;
        refused(&r, &id, &format!("ping {id} after the cancel"));
    }
    // The next request draws the late answer out first: it is dropped, and
    // 5 is free again.
    let r = raw(&t2, &ping(&json!(6))).await;
    assert_eq!(answer(&r, &json!(6))["result"], json!({}), "{r:?}");
    assert!(!shows_touch(&r), "{r:?}");
    let r = raw(&t2, &ping(&json!(5))).await;
    assert_eq!(answer(&r, &json!(5))["result"], json!({}), "{r:?}");
    assert!(!shows_touch(&r), "{r:?}");
    c.shutdown().await;
}

/// The id of `user`'s only live session.
fn sid_of(state: &portico_proxy::ProxyState, user: &str) -> String {
    let all = state.sessions.all();
    let mine: Vec<_> = all.iter().filter(|s| s.user == user).collect();
    assert_eq!(mine.len(), 1, "one session of {user}");
    mine[0].id.clone()
}
