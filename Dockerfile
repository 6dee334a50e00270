# Builds portico, pctl and psh. Two images: `portico` (auth-service and
# proxy) and `agent` (adds Node and the Everything MCP server, pinned, so
# that examples/everything-*.yaml apps run out of the box). Both run as the
# unprivileged user mcp.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p portico -p portico-cli --bins

FROM debian:bookworm-slim AS portico
# curl serves the health checks. /var/lib/portico belongs to mcp so that a
# fresh named volume does too.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home mcp \
 && mkdir -p /var/lib/portico \
 && chown mcp:mcp /var/lib/portico
COPY --from=build /src/target/release/portico /src/target/release/pctl /src/target/release/psh /usr/local/bin/
VOLUME /var/lib/portico
WORKDIR /var/lib/portico
USER mcp
EXPOSE 3080 3024 3025
ENTRYPOINT []
CMD ["portico", "start"]

# The agent: stdio MCP servers run as mcp (the only account it can switch
# to). Node 20 and @modelcontextprotocol/server-everything at the version
# the tests pin; npx finds it without a download.
FROM node:20-bookworm-slim AS agent
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && npm install -g --no-audit --no-fund @modelcontextprotocol/server-everything@2026.8.31 \
 && useradd --system --create-home mcp \
 && mkdir -p /var/lib/portico \
 && chown mcp:mcp /var/lib/portico
COPY --from=build /src/target/release/portico /src/target/release/pctl /src/target/release/psh /usr/local/bin/
VOLUME /var/lib/portico
WORKDIR /var/lib/portico
USER mcp
ENTRYPOINT []
CMD ["portico", "start"]
