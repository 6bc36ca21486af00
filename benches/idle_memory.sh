#!/usr/bin/env bash
# Memory of idle authenticated clients, each proxy in a fresh process (rolegate plain and TLS,
# PgBouncer plain and TLS, PgDog and pg_doorman when the peers are there): builds rolegate
# (release), then benches/idle_memory.py. IDLE_CLIENTS (default 10000), IDLE_SETTLE, TARGETS.
set -euo pipefail
cd "$(dirname "$0")/.."
# The same build as pgbench.sh's: building the binary alone unifies other dependency
# features and would recompile them (and pgbench.sh would recompile them back).
cargo build --release --bin rolegate --example bare_relay
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
python3 -c 'import psycopg' 2>/dev/null || python3 -m pip install -q 'psycopg[binary]>=3.1'
python3 -c 'import asyncpg' 2>/dev/null || python3 -m pip install -q 'asyncpg>=0.29'
exec python3 benches/idle_memory.py "$@"
