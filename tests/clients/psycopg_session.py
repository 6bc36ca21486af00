"""psycopg 3 through rolegate: the extended protocol with parameters, server-side
prepared statements, COPY, LISTEN/NOTIFY. Usage: psycopg_session.py CONNINFO OWNER LOGIN"""
import sys

import psycopg

conninfo, owner, login = sys.argv[1:4]

with psycopg.connect(conninfo, autocommit=True) as conn:
    row = conn.execute("SELECT current_user::text, session_user::text").fetchone()
    assert row == (owner, login), row

    # Parameters travel in Bind, so this is the extended protocol.
    assert conn.execute("SELECT %s::int + %s::int", (40, 2)).fetchone() == (42,)
    assert conn.execute("SELECT %s::text", ("o'quote\\",)).fetchone() == ("o'quote\\",)

    # prepare=True makes psycopg use a named server-side prepared statement.
    for i in range(10):
        got = conn.execute("SELECT %s::int * 2", (i,), prepare=True).fetchone()
        assert got == (i * 2,), got

    # A transaction with an error, then ROLLBACK: the session stays usable.
    conn.autocommit = False
    try:
        conn.execute("SELECT 1/0")
        raise AssertionError("division by zero did not fail")
    except psycopg.errors.DivisionByZero:
        conn.rollback()
    conn.autocommit = True

    # COPY TO STDOUT
    with conn.cursor() as cur:
        with cur.copy("COPY (SELECT generate_series(1, 1000)) TO STDOUT") as copy:
            values = [int(r[0]) for r in copy.rows()]
    assert values == list(range(1, 1001)), values[:5]

    # LISTEN/NOTIFY between two sessions through rolegate.
    conn.execute("LISTEN rolegate_test")
    with psycopg.connect(conninfo, autocommit=True) as other:
        other.execute("SELECT pg_notify('rolegate_test', 'hello')")
    got = [n.payload for n in conn.notifies(timeout=5, stop_after=1)]
    assert got == ["hello"], got

print("psycopg ok")
