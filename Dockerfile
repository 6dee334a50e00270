# Builds portico, pctl and psh; the runtime image runs any Portico service.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p portico -p portico-cli --bins

FROM debian:bookworm-slim
# curl serves the health checks. Stdio MCP servers need their own runtimes:
# extend this image (nodejs, python3, docker-cli, ...) for the servers you run.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home mcp
COPY --from=build /src/target/release/portico /src/target/release/pctl /src/target/release/psh /usr/local/bin/
VOLUME /var/lib/portico
EXPOSE 3080 3024 3025
ENTRYPOINT []
CMD ["portico", "start"]
