//! Reading resource files: multi-document YAML (or JSON) into validated
//! resources, with errors that name the file, the line and the field.

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::invalid::Invalid;
use crate::kind::Kind;
use crate::resource::{Object, Resource};

/// Resource files larger than this are refused before parsing.
pub const MAX_FILE_BYTES: usize = 1024 * 1024;

#[derive(Deserialize)]
struct Header {
    kind: Option<String>,
}

/// One document of a multi-document file and the line it starts on (1-based).
struct Chunk {
    text: String,
    first_line: usize,
}

fn split_documents(text: &str) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut cur = String::new();
    let mut first_line = 1;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_end();
        let is_sep = t == "---" || t.starts_with("--- ") || t.starts_with("---\t");
        if is_sep || t == "..." {
            chunks.push(Chunk {
                text: std::mem::take(&mut cur),
                first_line,
            });
            first_line = i + 2;
            // Content after `--- ` on the same line belongs to the next document.
            if let Some(rest) = t.strip_prefix("---").map(str::trim_start)
                && !rest.is_empty()
                && !rest.starts_with('#')
            {
                cur.push_str(rest);
                cur.push('\n');
                first_line = i + 1;
            }
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    chunks.push(Chunk {
        text: cur,
        first_line,
    });
    chunks
        .into_iter()
        .filter(|c| {
            c.text
                .lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

fn yaml_error(file: &str, base: usize, e: &yaml_serde::Error, path: &str) -> Error {
    let mut msg = e.to_string();
    if let Some(i) = msg.find(" at line ") {
        msg.truncate(i);
    }
    let field = if path == "." { "" } else { path };
    let invalid = Invalid::field(field, msg);
    Error::from(match e.location() {
        Some(loc) => invalid.at(file, base + loc.line() - 1, Some(loc.column())),
        None => invalid.at(file, base, None),
    })
}

fn typed<S: DeserializeOwned>(file: &str, chunk: &Chunk) -> Result<Object<S>, Error> {
    let de = yaml_serde::Deserializer::from_str(&chunk.text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        yaml_error(file, chunk.first_line, e.inner(), &path)
    })
}

/// Parses every document of a file. Any error fails the whole file.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Resource>, Error> {
    if text.len() > MAX_FILE_BYTES {
        return Err(Error::bad_request(format!(
            "{file}: the file is {} bytes; resource files may be at most {} bytes",
            text.len(),
            MAX_FILE_BYTES
        )));
    }
    let mut out = Vec::new();
    for chunk in split_documents(text) {
        let header: Header = yaml_serde::from_str(&chunk.text)
            .map_err(|e| yaml_error(file, chunk.first_line, &e, ""))?;
        let Some(kind_name) = header.kind else {
            return Err(Error::bad_request(format!(
                "{file}:{}: missing field `kind` (one of app, role, user)",
                chunk.first_line
            )));
        };
        let kind = match Kind::parse(&kind_name) {
            Some(k) if k != Kind::Event && kind_name == k.as_str() => k,
            _ => {
                return Err(Error::bad_request(format!(
                    "{file}:{}: unknown kind {kind_name:?}; expected one of app, role, user, token, app_server",
                    chunk.first_line
                )));
            }
        };
        let res = match kind {
            Kind::App => Resource::App(typed(file, &chunk)?),
            Kind::Role => Resource::Role(typed(file, &chunk)?),
            Kind::User => Resource::User(typed(file, &chunk)?),
            Kind::Token => Resource::Token(typed(file, &chunk)?),
            Kind::AppServer => Resource::AppServer(typed(file, &chunk)?),
            // Refused above: events are not resources.
            Kind::Event => return Err(Error::bad_request("events are not resources")),
        };
        res.validate()
            .map_err(|e| Error::from(e.at(file, chunk.first_line, None)))?;
        out.push(res);
    }
    if out.is_empty() {
        return Err(Error::bad_request(format!(
            "{file}: the file holds no resource"
        )));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should say where
mod tests {
    use super::*;

    const SEED: &str = include_str!("../testdata/mcp_server.yaml");

    #[test]
    fn seed_is_accepted() {
        let rs = parse_documents("mcp_server.yaml", SEED).expect("the seed parses");
        let Resource::App(app) = &rs[0] else {
            panic!("not an app")
        };
        assert_eq!(app.metadata.name, "everything");
        assert_eq!(
            app.metadata.labels.get("env").map(String::as_str),
            Some("dev")
        );
        let mcp = app.spec.mcp.as_ref().expect("mcp spec");
        assert_eq!(mcp.command, "docker");
        assert_eq!(mcp.args, ["run", "-i", "--rm", "mcp/everything"]);
        assert_eq!(mcp.run_as_host_user, "docker");
    }

    fn err(text: &str) -> String {
        parse_documents("f.yaml", text).unwrap_err().message
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let e = err("kind: app\nversion: v3\nmetadata:\n  name: a\nspec:\n  mcp:\n    comand: x\n");
        assert!(e.starts_with("f.yaml:7:"), "{e}");
        assert!(e.contains("spec.mcp"), "{e}");
        assert!(e.contains("comand"), "{e}");
    }

    #[test]
    fn wrong_type() {
        let e = err("kind: app\nversion: v3\nmetadata:\n  name: a\nspec:\n  mcp:\n    args: 5\n");
        assert!(e.contains("f.yaml:7"), "{e}");
        assert!(e.contains("args"), "{e}");
    }

    #[test]
    fn missing_run_as_host_user() {
        let e =
            err("kind: app\nversion: v3\nmetadata:\n  name: a\nspec:\n  mcp:\n    command: x\n");
        assert!(e.contains("run_as_host_user"), "{e}");
        assert!(e.starts_with("f.yaml:1:"), "{e}");
    }

    #[test]
    fn bad_kind_version_and_name() {
        assert!(err("kind: gadget\nversion: v1\n").contains("unknown kind \"gadget\""));
        let e = err("kind: app\nversion: v9\nmetadata: {name: a}\nspec: {uri: 'mcp+http://x'}\n");
        assert!(e.contains("version"), "{e}");
        let long = "a".repeat(300);
        let e = err(&format!(
            "kind: app\nversion: v3\nmetadata: {{name: {long}}}\nspec: {{uri: 'mcp+http://x'}}\n"
        ));
        assert!(
            e.contains("metadata.name") && e.contains("300 characters"),
            "{e}"
        );
    }

    #[test]
    fn multi_document_line_numbers() {
        let text = "kind: role\nversion: v8\nmetadata: {name: r}\nspec: {}\n---\nkind: app\nversion: v3\nmetadata:\n  name: b\n  bogus: 1\nspec: {}\n";
        let e = err(text);
        assert!(e.starts_with("f.yaml:10:"), "{e}");
        let ok = "# leading comment\n---\nkind: role\nversion: v8\nmetadata: {name: r}\nspec: {}\n---\nkind: role\nversion: v8\nmetadata: {name: s}\nspec: {}\n";
        assert_eq!(parse_documents("f.yaml", ok).map(|v| v.len()), Ok(2));
    }

    #[test]
    fn invalid_yaml_and_size() {
        let e = err("kind: app\nmetadata: [unclosed\n");
        assert!(e.starts_with("f.yaml:"), "{e}");
        let big = "#".repeat(MAX_FILE_BYTES + 1);
        assert!(err(&big).contains("at most"));
        assert!(err("# only a comment\n").contains("no resource"));
    }
}
