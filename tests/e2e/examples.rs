//! The repository's example files parse, and the seed's `mcp_server.yaml` is
//! kept byte for byte (its text is written out here, not read from elsewhere).

use portico_tests::util::example;

/// The seed document's MCP server resource, exactly as the source gives it.
const SEED: &str = r#"kind: app
version: v3
metadata:
  name: everything
  description: The Everything MCP server
  labels:
    env: dev
spec:
  mcp:
    # stdio 기반 MCP 서버를 실행하는 명령어.
    command: "docker"
    # 명령어와 함께 실행할 인수.
    args: ["run", "-i", "--rm", "mcp/everything"]
    # 명령어가 실행될 호스트 사용자 계정 이름.
    # stdio 기반 MCP 서버에는 필수입니다.
    run_as_host_user: "docker"
"#;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    app_service: portico_agent::AgentConfig,
}

#[test]
fn examples_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let (mut resources, mut agents) = (0, 0);
    for e in std::fs::read_dir(&dir).expect("examples dir") {
        let p = e.expect("entry").path();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        if !name.ends_with(".yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&p).expect("read");
        if name.starts_with("agent-") {
            let cfg: AgentFile =
                yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(
                !cfg.app_service.resources.is_empty(),
                "{name} has selectors"
            );
            agents += 1;
        } else {
            portico_core::parse::parse_documents(&p.display().to_string(), &text)
                .unwrap_or_else(|e| panic!("{e}"));
            resources += 1;
        }
    }
    assert!(
        resources >= 4 && agents >= 2,
        "{resources} resources, {agents} agent configs"
    );
    let ours = std::fs::read_to_string(example("mcp_server.yaml")).expect("ours");
    assert_eq!(ours, SEED);
}
