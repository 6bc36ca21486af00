#!/usr/bin/env bash
# One command for the whole-path comparison: builds rolegate and the bare relay (release),
# then benches/pgbench_compare.py starts a private cluster, rolegate, PgBouncer and the bare
# relay, and runs pgbench against all four in alternation. See that file for the knobs
# (DURATION, ROUNDS, SCALE, IDLE_CLIENTS, SCENARIOS).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin rolegate --example bare_relay
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
python3 -c 'import psycopg' 2>/dev/null || python3 -m pip install -q 'psycopg[binary]>=3.1'
exec python3 benches/pgbench_compare.py "$@"
