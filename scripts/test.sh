#!/usr/bin/env bash
# Runs every Portico test on a machine of the project's kind: makes sure
# PostgreSQL is up, installs the real MCP clients and servers the tests
# drive (npm and PyPI, pinned), builds the binaries, runs cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

say() { printf '==> %s\n' "$*"; }

pg_up() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -h 127.0.0.1 -p 5432 -q
  else
    (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null
  fi
}

if [ -z "${DATABASE_URL:-}" ]; then
  if ! pg_up; then
    say "PostgreSQL is not running on 127.0.0.1:5432; starting it"
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
      say "installing PostgreSQL with apt-get"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
      installed=1
    fi
    ver=$(ls /etc/postgresql | sort -V | tail -n 1)
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
    for _ in $(seq 1 60); do pg_up && break; sleep 1; done
    pg_up || { echo "error: PostgreSQL did not come up on 127.0.0.1:5432" >&2; exit 1; }
    if [ "${installed:-0}" = 1 ]; then
      # A fresh install asks for passwords on TCP; tests use trust on loopback.
      hba=/etc/postgresql/$ver/main/pg_hba.conf
      sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
      pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
    fi
  fi
  export DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
fi

clients=$root/tests/clients
if command -v npm >/dev/null 2>&1; then
  if [ ! -d "$clients/node_modules/@modelcontextprotocol/server-everything" ]; then
    say "installing the npm test clients (pinned in tests/clients/package-lock.json)"
    (cd "$clients" && timeout 900 npm ci --no-audit --no-fund --loglevel=error)
  fi
  export PORTICO_NODE_CLIENTS=$clients/node_modules
else
  echo "warning: npm is missing; the server-everything test will fail" >&2
fi
if [ ! -x "$clients/.venv/bin/python" ] || ! "$clients/.venv/bin/python" -c 'import mcp' 2>/dev/null; then
  say "installing the Python MCP SDK (pinned in tests/clients/requirements.lock)"
  python3 -m venv "$clients/.venv"
  timeout 900 "$clients/.venv/bin/pip" install -q -r "$clients/requirements.lock"
fi
export PORTICO_PY=$clients/.venv/bin/python

say "building"
cargo build --workspace --bins
say "testing"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run: the sum over every test binary.
passed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | paste -sd+ - | bc)
failed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | paste -sd+ - | bc)
echo
echo "tests: ${passed:-0} passed, ${failed:-0} failed"
exit "$status"
