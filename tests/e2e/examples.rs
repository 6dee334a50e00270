//! The repository's example files parse, and the seed example is the shared one byte for byte.

use portico_tests::util::shared_example;

#[test]
fn examples_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("examples dir") {
        let p = e.expect("entry").path();
        let text = std::fs::read_to_string(&p).expect("read");
        portico_core::parse::parse_documents(&p.display().to_string(), &text)
            .unwrap_or_else(|e| panic!("{}", e.message));
        n += 1;
    }
    assert!(n >= 3);
    let ours = std::fs::read(dir.join("mcp_server.yaml")).expect("ours");
    let shared = std::fs::read(shared_example("mcp_server.yaml")).expect("shared");
    assert_eq!(ours, shared);
}
