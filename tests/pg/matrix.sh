#!/usr/bin/env bash
# Runs the integration tests (every tests/*.rs binary: setup and check, managed and file
# rotation, SET ROLE at session start, the policy corpus and escapes, readonly, psql,
# psycopg, tokio-postgres and the other drivers) against each PostgreSQL major version,
# one private cluster per test binary and version.
#
#   tests/pg/matrix.sh              # 13 14 15 16 17 18
#   tests/pg/matrix.sh 13 18        # just these
#
# The server binaries come from tests/pg/fetch-postgres.sh (cached after the first run).
set -euo pipefail
cd "$(dirname "$0")/../.."

versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(13 14 15 16 17 18)

failed=()
for major in "${versions[@]}"; do
  bin="$(tests/pg/fetch-postgres.sh "$major")"
  # The binaries must be what they say they are: the matrix never silently runs 15 six times.
  "$bin/postgres" --version | grep -q "PostgreSQL) $major\." || {
    echo "matrix: $bin/postgres is not PostgreSQL $major" >&2
    exit 1
  }
  echo "=== PostgreSQL $major ($("$bin/postgres" --version)) ==="
  if ! PG_BIN="$bin" cargo test --locked --no-fail-fast --test '*'; then
    failed+=("$major")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "matrix: failures on PostgreSQL ${failed[*]}" >&2
  exit 1
fi
echo "matrix: all tests passed on PostgreSQL ${versions[*]}"
