"""asyncpg Pool (min_size=1, max_size=1) through rolegate: session SETs, then release, whose
reset query (SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;) must undo
them; 5 more acquires each see EXPECTED_ROLE, default settings, the same backend, and a
parameterised binary query that works. MODE readonly also requires
default_transaction_read_only = on after every acquire and CREATE TEMP TABLE to fail.
Usage: asyncpg_pool.py DSN EXPECTED_ROLE MODE   (MODE: app | readonly)"""
import asyncio
import datetime
import sys

import asyncpg

dsn, role, mode = sys.argv[1:4]
if mode not in ("app", "readonly"):
    sys.exit("MODE must be app or readonly")


def check(got, want, what):
    if got != want:
        print(f"asyncpg_pool {mode}: {what}: got {got!r}, expected {want!r}", file=sys.stderr)
        sys.exit(1)


async def session_checks(con, defaults, pid):
    check(await con.fetchval("SELECT current_user::text"), role, "current_user")
    check(await con.fetchval("SELECT pg_backend_pid()"), pid, "backend pid (connection replaced?)")
    for name, value in defaults.items():
        check(await con.fetchval("SELECT current_setting($1)", name), value, name)
    ts = datetime.datetime(2024, 2, 29, 12, 30, tzinfo=datetime.timezone.utc)
    check(tuple(await con.fetchrow("SELECT $1::int + 1, $2::timestamptz", 41, ts)), (42, ts), "binary params")
    if mode == "readonly":
        check(await con.fetchval("SELECT current_setting('default_transaction_read_only')"), "on",
              "default_transaction_read_only")
        try:
            await con.execute("CREATE TEMP TABLE x(i int)")
            check("CREATE TEMP TABLE succeeded", "an error", "CREATE TEMP TABLE")
        except asyncpg.PostgresError:
            pass


async def main():
    async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as pool:
        async with pool.acquire() as con:
            pid = await con.fetchval("SELECT pg_backend_pid()")
            defaults = {name: await con.fetchval("SELECT current_setting($1)", name)
                        for name in ("application_name", "search_path")}
            check(defaults["application_name"] == "x", False, "application_name default is 'x'")
            await con.execute("SET application_name = 'x'")
            await con.execute("SET search_path = public")
            check(await con.fetchval("SELECT current_user::text"), role, "current_user")
            check(await con.fetchval("SELECT current_setting('application_name')"), "x", "SET application_name")
        for _ in range(5):
            async with pool.acquire() as con:
                await session_checks(con, defaults, pid)
                await con.execute("SET application_name = 'x'")  # the next release must reset it
    print("ok")


asyncio.run(main())
