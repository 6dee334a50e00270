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
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
      say "installing PostgreSQL with apt-get"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
      installed=1
    fi
    ver=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    if [ ! -d "/etc/postgresql/$ver/main" ]; then
      pg_createcluster "$ver" main >/dev/null
      installed=1
    fi
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
  # The tests connect as postgres over TCP with no password.
  if command -v psql >/dev/null 2>&1 &&
    ! PGCONNECT_TIMEOUT=5 psql "postgres://postgres@127.0.0.1:5432/postgres" -w -Atqc 'select 1' >/dev/null 2>&1; then
    echo "error: PostgreSQL on 127.0.0.1:5432 does not let user postgres in without a password;" >&2
    echo "       set 'trust' for host 127.0.0.1/32 in pg_hba.conf, or set DATABASE_URL" >&2
    exit 1
  fi
  export DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
fi

# One fault test crashes and restarts a PostgreSQL server of its own: it
# needs the server binaries and the postgres account even when the
# database the tests use runs elsewhere.
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || ! id postgres >/dev/null 2>&1; then
  say "installing the PostgreSQL server binaries with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

clients=$root/tests/clients
# Each install is redone only when its lock file changed since the last one
# (a hash of the lock is kept inside what it installed).
lock_hash() { sha256sum "$1" | cut -d' ' -f1; }
if command -v npm >/dev/null 2>&1; then
  want=$(lock_hash "$clients/package-lock.json")
  if [ "$(cat "$clients/node_modules/.portico-lock" 2>/dev/null)" != "$want" ]; then
    say "installing the npm test clients (pinned in tests/clients/package-lock.json)"
    (cd "$clients" && timeout 600 npm ci --no-audit --no-fund --loglevel=error)
    echo "$want" >"$clients/node_modules/.portico-lock"
  fi
  export PORTICO_NODE_CLIENTS=$clients/node_modules
else
  echo "warning: npm is missing; the tests that run Node MCP clients and servers will fail" >&2
fi
if command -v python3 >/dev/null 2>&1; then
  want=$(lock_hash "$clients/requirements.lock")
  if [ "$(cat "$clients/.venv/.portico-lock" 2>/dev/null)" != "$want" ] ||
    ! "$clients/.venv/bin/python" -c 'import mcp' 2>/dev/null; then
    say "installing the Python MCP SDK (pinned in tests/clients/requirements.lock)"
    python3 -m venv --clear "$clients/.venv"
    timeout 600 "$clients/.venv/bin/pip" install -q --disable-pip-version-check -r "$clients/requirements.lock"
    echo "$want" >"$clients/.venv/.portico-lock"
  fi
  export PORTICO_PY=$clients/.venv/bin/python
else
  echo "warning: python3 is missing; the Python MCP SDK test will fail" >&2
fi

# The web UI's browser test drives Debian's chromium (with playwright-core
# from the npm clients above).
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    say "installing chromium with apt-get (for the web UI's browser test)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: chromium is missing; the web UI's browser test will fail" >&2
  fi
fi

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
awk '/^test result:/ {
       for (i = 1; i < NF; i++) {
         if ($(i + 1) ~ /^passed/) p += $i
         if ($(i + 1) ~ /^failed/) f += $i
       }
     }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
