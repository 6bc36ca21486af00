"""Python drivers through rolegate in transaction mode, many more connections than the
pool has backend sessions, all at once:
- psycopg 3 (async) with prepare_threshold=0 (every query a server-side prepared
  statement) and pipeline mode, each connection with its own TimeZone and search_path;
- asyncpg connections with their statement cache (named statements, binary types);
- psycopg2 in threads, with its own application_name.
Every query checks it sees its own connection's settings. Prints "ok".
Usage: pooled_drivers.py DSN CONNECTIONS"""
import asyncio
import datetime
import sys
import threading

import asyncpg
import psycopg
import psycopg2

dsn, count = sys.argv[1], int(sys.argv[2])
failures = []


def check(got, want, what):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, expected {want!r}")


async def psycopg_connection(i):
    zone = f"Etc/GMT-{i % 12}"
    async with await psycopg.AsyncConnection.connect(dsn, prepare_threshold=0, autocommit=True) as con:
        await con.execute(f"SET TimeZone = '{zone}'")
        await con.execute("SET search_path = public, pg_catalog")
        for round in range(10):
            cur = await con.execute(
                "SELECT current_setting('TimeZone'), current_setting('search_path'), %s::int * 2", (round,))
            check(tuple(await cur.fetchone()), (zone, "public, pg_catalog", round * 2),
                  f"psycopg {i} round {round}")
            async with con.pipeline():
                curs = [await con.execute("SELECT %s::int + 1, current_setting('TimeZone')", (n,))
                        for n in range(5)]
            for n, cur in enumerate(curs):
                check(tuple(await cur.fetchone()), (n + 1, zone), f"psycopg {i} pipeline")
            async with con.transaction():
                await con.execute("SET LOCAL TimeZone = 'UTC'")
                cur = await con.execute("SELECT current_setting('TimeZone')")
                check((await cur.fetchone())[0], "UTC", "SET LOCAL inside the transaction")
            cur = await con.execute("SELECT current_setting('TimeZone')")
            check((await cur.fetchone())[0], zone, f"psycopg {i}: SET LOCAL leaked")


async def asyncpg_connection(i):
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(f"SET application_name = 'asyncpg{i}'")
        ts = datetime.datetime(2024, 2, 29, 12, 30, tzinfo=datetime.timezone.utc)
        for round in range(10):
            row = await con.fetchrow(
                "SELECT $1::int + 1, $2::timestamptz, current_setting('application_name')", round, ts)
            check(tuple(row), (round + 1, ts, f"asyncpg{i}"), f"asyncpg {i} round {round}")
            async with con.transaction():
                check(await con.fetchval("SELECT $1::text", "in tx"), "in tx", "asyncpg transaction")
            await asyncio.sleep(0)
    finally:
        await con.close()


def psycopg2_connection(i):
    try:
        con = psycopg2.connect(dsn)
        con.autocommit = True
        cur = con.cursor()
        cur.execute("SET application_name = %s", (f"pg2_{i}",))
        for round in range(10):
            cur.execute("SELECT current_setting('application_name'), %s", (round,))
            check(cur.fetchone(), (f"pg2_{i}", round), f"psycopg2 {i}")
        con.close()
    except Exception as e:  # reported by the main thread
        failures.append(f"psycopg2 {i}: {e!r}")


async def main():
    threads = [threading.Thread(target=psycopg2_connection, args=(i,)) for i in range(count // 2)]
    for t in threads:
        t.start()
    results = await asyncio.gather(
        *[psycopg_connection(i) for i in range(count)],
        *[asyncpg_connection(i) for i in range(count)],
        return_exceptions=True)
    for t in threads:
        t.join()
    failures.extend(repr(r) for r in results if isinstance(r, BaseException))
    if failures:
        print("\n".join(failures), file=sys.stderr)
        sys.exit(1)
    print("ok")


asyncio.run(main())
