"""A refused statement in the middle of a psycopg pipeline (extended protocol, one Sync for
the batch): psycopg must see the error where PostgreSQL would put it, the statements of the
batch must not commit, and the connection must stay usable. Usage: psycopg_pipeline.py CONNINFO"""
import sys

import psycopg

conninfo = sys.argv[1]
with psycopg.connect(conninfo, autocommit=True) as conn:
    try:
        with conn.pipeline():
            conn.execute("INSERT INTO items VALUES (%s, %s, %s)", (500, "p", 1))
            conn.execute("CREATE TABLE pipelined (id int)")
            conn.execute("INSERT INTO items VALUES (%s, %s, %s)", (501, "p", 1))
        raise AssertionError("the pipeline did not fail")
    except psycopg.errors.InsufficientPrivilege as e:
        assert "rolegate: DDL is not allowed for app clients (CREATE TABLE)" in str(e), str(e)

    # Neither insert committed: the batch was one implicit transaction that failed.
    n = conn.execute("SELECT count(*) FROM items WHERE id IN (500, 501)").fetchone()[0]
    assert n == 0, n
    # Parameters through the extended protocol still work afterwards.
    assert conn.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)
    with conn.pipeline():
        cur = conn.execute("SELECT %s::text", ("after",))
    assert cur.fetchone() == ("after",)
print("pipeline ok")
