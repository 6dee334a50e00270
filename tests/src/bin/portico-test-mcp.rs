//! A small stdio MCP server for Portico's tests, built with the official
//! Rust SDK: tools (echo, add, slow, crash, big, roots, delete_everything,
//! touch), one resource and one prompt.
// Roots are deprecated in newer protocol revisions but still offered by clients.
#![allow(deprecated)]

use rmcp::handler::server::router::prompt::PromptRouter;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::*;
use rmcp::service::{NotificationContext, RequestContext};
use rmcp::{
    ErrorData, Peer, RoleServer, ServerHandler, ServiceExt, prompt, prompt_handler, prompt_router,
    schemars, tool, tool_handler, tool_router,
};

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct EchoArgs {
    /// The text to send back.
    message: String,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct AddArgs {
    a: i64,
    b: i64,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct FloodArgs {
    /// How many progress notifications to send.
    count: u64,
    /// The length of each one's message.
    bytes: u64,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct SlowArgs {
    /// How long to sleep, in milliseconds.
    ms: u64,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct BigArgs {
    /// How many bytes of text to return.
    bytes: usize,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct TouchArgs {
    /// The file to create (or overwrite) with the text "touched".
    path: String,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct GreetArgs {
    name: String,
}

#[derive(Clone)]
#[allow(dead_code)] // the handler macros read the routers
struct TestServer {
    tool_router: ToolRouter<Self>,
    prompt_router: PromptRouter<Self>,
}

#[tool_router]
impl TestServer {
    #[tool(description = "Send the message back")]
    fn echo(&self, Parameters(a): Parameters<EchoArgs>) -> String {
        a.message
    }

    #[tool(description = "Add two integers")]
    fn add(&self, Parameters(a): Parameters<AddArgs>) -> String {
        (a.a + a.b).to_string()
    }

    #[tool(description = "Sleep, reporting progress when asked to")]
    async fn slow(
        &self,
        Parameters(a): Parameters<SlowArgs>,
        meta: RequestMetaObject,
        client: Peer<RoleServer>,
    ) -> String {
        let steps = 10u64;
        let token = meta.get_progress_token();
        for step in 0..steps {
            if let Some(t) = &token {
                let _ = client
                    .notify_progress(
                        ProgressNotificationParam::new(t.clone(), step as f64)
                            .with_total(steps as f64),
                    )
                    .await;
            }
            tokio::time::sleep(std::time::Duration::from_millis(a.ms / steps)).await;
        }
        "done".to_string()
    }

    #[tool(
        description = "Send this many progress notifications of this many bytes each, then answer"
    )]
    async fn flood(
        &self,
        Parameters(a): Parameters<FloodArgs>,
        meta: RequestMetaObject,
        client: Peer<RoleServer>,
    ) -> String {
        let Some(token) = meta.get_progress_token() else {
            return "no progress token".to_string();
        };
        let filler = "x".repeat(a.bytes as usize);
        for step in 0..a.count {
            let note = ProgressNotificationParam::new(token.clone(), step as f64)
                .with_message(filler.clone());
            if client.notify_progress(note).await.is_err() {
                return "the client went away".to_string();
            }
        }
        "done".to_string()
    }

    #[tool(
        description = "Wait up to 30 s for this call to be cancelled; on cancellation write the text cancelled to the file at path"
    )]
    async fn await_cancel(
        &self,
        Parameters(a): Parameters<TouchArgs>,
        ct: tokio_util::sync::CancellationToken,
    ) -> String {
        tokio::select! {
            _ = ct.cancelled() => {
                let _ = std::fs::write(&a.path, "cancelled");
                "cancelled".to_string()
            }
            _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => "not cancelled".to_string(),
        }
    }

    #[tool(description = "Exit the process at once with status 3")]
    fn crash(&self) -> String {
        eprintln!("crashing on request");
        std::process::exit(3)
    }

    #[tool(description = "Return this many bytes of text")]
    fn big(&self, Parameters(a): Parameters<BigArgs>) -> String {
        "x".repeat(a.bytes)
    }

    #[tool(description = "Ask the client for its roots and return their URIs")]
    async fn roots(&self, client: Peer<RoleServer>) -> Result<CallToolResult, ErrorData> {
        match client.list_roots().await {
            Ok(r) => {
                let uris: Vec<String> = r.roots.iter().map(|r| r.uri.clone()).collect();
                Ok(CallToolResult::success(vec![ContentBlock::text(
                    uris.join("\n"),
                )]))
            }
            Err(e) => Ok(CallToolResult::error(vec![ContentBlock::text(format!(
                "roots/list failed: {e}"
            ))])),
        }
    }

    #[tool(description = "Pretend to delete everything (for deny rules)")]
    fn delete_everything(&self) -> String {
        "deleted".to_string()
    }

    #[tool(description = "Write the text touched to the file at path (a visible side effect)")]
    fn touch(&self, Parameters(a): Parameters<TouchArgs>) -> Result<CallToolResult, ErrorData> {
        match std::fs::write(&a.path, "touched") {
            Ok(()) => Ok(CallToolResult::success(vec![ContentBlock::text("ok")])),
            Err(e) => Ok(CallToolResult::error(vec![ContentBlock::text(format!(
                "cannot write {}: {e}",
                a.path
            ))])),
        }
    }
}

#[prompt_router]
impl TestServer {
    #[prompt(name = "greet", description = "Greet someone")]
    async fn greet(&self, Parameters(a): Parameters<GreetArgs>) -> Vec<PromptMessage> {
        vec![PromptMessage::new_text(
            Role::User,
            format!("Hello, {}!", a.name),
        )]
    }
}

#[tool_handler]
#[prompt_handler]
impl ServerHandler for TestServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .enable_prompts()
                .build(),
        )
        .with_server_info(Implementation::new(
            "portico-test-mcp",
            env!("CARGO_PKG_VERSION"),
        ))
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        Ok(ListResourcesResult::with_all_items(vec![
            Resource::new("test://hello", "hello").with_description("a greeting"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        if request.uri == "test://hello" {
            Ok(ReadResourceResult::new(vec![ResourceContents::text(
                "hello resource",
                "test://hello",
            )])
            .into())
        } else {
            Err(ErrorData::resource_not_found(
                format!("no resource {}", request.uri),
                None,
            ))
        }
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        if std::env::var("PORTICO_TEST_MCP_LIST_CHANGED").as_deref() == Ok("1") {
            let _ = context.peer.notify_tool_list_changed().await;
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let server = TestServer {
        tool_router: TestServer::tool_router(),
        prompt_router: TestServer::prompt_router(),
    };
    match server.serve(rmcp::transport::stdio()).await {
        Ok(running) => {
            let _ = running.waiting().await;
        }
        Err(e) => {
            eprintln!("portico-test-mcp: {e}");
            std::process::exit(1);
        }
    }
}
