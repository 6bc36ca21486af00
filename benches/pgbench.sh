#!/usr/bin/env bash
# One command for the whole-path comparison: builds rolegate and the bare relay (release),
# then benches/pgbench_compare.py starts a private cluster, rolegate, PgBouncer and the bare
# relay, and runs pgbench against all four in alternation. See that file for the knobs
# (DURATION, ROUNDS, SCALE, IDLE_CLIENTS, SCENARIOS, TARGETS, POOL, CLIENTS, PEERS_DIR).
# POOL=transaction CLIENTS=100,400,1000: rolegate, PgBouncer, PgDog and pg_doorman (when
# ../shared/peers has them) at each client count, with p50/p99 latency.
# Idle-client memory in fresh processes (10,000 clients, plain and TLS): benches/idle_memory.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin rolegate --example bare_relay
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
python3 -c 'import psycopg' 2>/dev/null || python3 -m pip install -q 'psycopg[binary]>=3.1'
exec python3 benches/pgbench_compare.py "$@"
