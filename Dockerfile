# Builds portico, pctl and psh; the runtime image runs any Portico service.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p portico -p portico-cli --bins

FROM debian:bookworm-slim
# curl serves the health checks. Stdio MCP servers need their own runtimes:
# extend this image (nodejs, python3, docker-cli, ...) for the servers you run.
# Every service runs as the unprivileged user mcp, so an agent in this image
# runs stdio MCP servers as mcp only (`run_as_host_user: mcp`); /var/lib/portico
# belongs to mcp so that a fresh named volume does too.
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
