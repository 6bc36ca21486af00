"""Runs tests/corpus/policy.txt through a live rolegate for every class and both protocols,
and checks each statement's verdict against the real server.

Usage: policy_corpus.py CORPUS ADMIN_CONNINFO ROLEGATE_PORT DBNAME OWNER
Prints one line per mismatch and exits 1 if there is any."""
import sys

import psycopg

corpus_path, admin_conninfo, port, dbname, owner = sys.argv[1:6]
CLASSES = [("app", "web", "web-pw"), ("readonly", "analyst", "analyst-pw"),
           ("migrator", "migrate", "migrate-pw")]

SNAPSHOT = """
SELECT md5(string_agg(x, ',' ORDER BY x)) FROM (
  SELECT 'c:' || oid || relname || relowner || relkind::text FROM pg_class
  UNION ALL SELECT 'n:' || oid || nspname || nspowner FROM pg_namespace
  UNION ALL SELECT 'p:' || oid || proname || proowner FROM pg_proc
  UNION ALL SELECT 'r:' || oid || rolname || rolsuper FROM pg_roles
    WHERE rolname NOT LIKE '%%\\_owner' AND rolname NOT LIKE '%%\\_login'
  UNION ALL SELECT 'd:' || count(*) || ':' || coalesce(sum(qty), 0) FROM items
) s(x)
"""


def load_corpus(path):
    entries = []
    for number, line in enumerate(open(path, encoding="utf-8"), 1):
        line = line.rstrip("\n")
        if not line.strip() or line.startswith("#"):
            continue
        verdicts, flags, sql = (part.strip() for part in line.split("|", 2))
        verdicts = dict(zip(["app", "readonly", "migrator"], verdicts.split()))
        sql = sql.replace("\\n", "\n").replace("{owner}", owner)
        entries.append((number, verdicts, set(flags.split(",")), sql))
    return entries


def run(conn, sql, extended):
    """Returns (sqlstate, message) of the error, or None if it worked."""
    try:
        with conn.cursor() as cur:
            # binary results force the extended protocol (Parse/Bind/Execute); without
            # them psycopg sends a simple Query.
            cur.execute(sql, binary=True) if extended else cur.execute(sql)
        return None
    except psycopg.Error as e:
        return (e.sqlstate, str(e).splitlines()[0] if str(e) else "")


def main():
    entries = load_corpus(corpus_path)
    admin = psycopg.connect(admin_conninfo, autocommit=True)
    snapshot = lambda: admin.execute(SNAPSHOT).fetchone()[0]
    server_major = admin.info.server_version // 10000
    failures = []
    checked = 0
    previous = None
    for cls, user, password in CLASSES:
        for extended in (False, True):
            proto = "extended" if extended else "simple"
            conninfo = (f"host=127.0.0.1 port={port} dbname={dbname} user={user} "
                        f"password={password} sslmode=disable")
            # No automatic server-side preparing: the corpus itself runs DEALLOCATE ALL.
            conn = psycopg.connect(conninfo, autocommit=True, prepare_threshold=None)
            for number, verdicts, flags, sql in entries:
                if extended and "simple" in flags:
                    continue
                # "pgNN": the statement needs PostgreSQL NN or later (older servers
                # answer it with a syntax error of their own).
                needs = [int(f[2:]) for f in flags if f.startswith("pg") and f[2:].isdigit()]
                if needs and server_major < max(needs):
                    continue
                expected = verdicts[cls]
                where = f"line {number} [{cls}/{proto}] {sql!r}"
                try:
                    before = snapshot() if expected == "R" else None
                except psycopg.Error:
                    print(f"snapshot failed before {where}; previous: {previous}")
                    raise
                previous = where
                if "tx" in flags:
                    run(conn, "BEGIN", False)
                error = run(conn, sql, extended)
                run(conn, "ROLLBACK", False)
                run(conn, "DEALLOCATE ALL", False)
                refused = error is not None and error[1].startswith("rolegate:")
                if expected == "A" and error is not None:
                    failures.append(f"{where}: expected to work, got {error}")
                elif expected == "S" and (error is None or refused):
                    failures.append(f"{where}: expected the server to refuse it, got {error}")
                elif expected == "R":
                    if not refused:
                        failures.append(f"{where}: expected a rolegate refusal, got {error}")
                    elif error[0] not in ("42501", "42601", "0A000"):
                        failures.append(f"{where}: refusal has SQLSTATE {error[0]}")
                    elif snapshot() != before:
                        failures.append(f"{where}: refused, but the catalog or data changed")
                try:
                    user_now = conn.execute("SELECT current_user").fetchone()[0]
                except psycopg.Error as e:
                    user_now = f"unknown ({e.sqlstate}: {e})"
                if user_now != owner:
                    failures.append(f"{where}: current_user is now {user_now}")
                    conn.close()
                    conn = psycopg.connect(conninfo, autocommit=True, prepare_threshold=None)
                checked += 1
            conn.close()
    for failure in failures:
        print(failure)
    print(f"{checked} statement runs checked, {len(failures)} failed")
    sys.exit(1 if failures else 0)


main()
