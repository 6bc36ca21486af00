"""Memory of idle authenticated clients, each proxy in a FRESH process, transaction pooling.

Run through benches/idle_memory.sh, which builds rolegate (release) first. A private cluster
in a temp dir (nothing is left behind); then, one after the other, each in a process of its
own started for this measurement alone:

  rolegate       [pool] mode = "transaction", size 20, plaintext clients
  rolegate tls   the same with [tls] mode = "require" (a throwaway self-signed RSA-2048
                 certificate made here with openssl)
  pgbouncer      PgBouncer (the distribution's) with pool_mode = transaction, pool 20
  pgbouncer tls  the same with client_tls_sslmode = require and that certificate
  pgdog, pg_doorman  the peer poolers, when PEERS_DIR has them (see pgbench_compare.py; plaintext)

For each: RSS at rest (nothing connected yet), RSS with IDLE_CLIENTS (default 10,000) idle
clients that have logged in (SCRAM-SHA-256; asyncpg, which sends no statement at login), KiB
per client, and RSS IDLE_SETTLE (default 5) seconds after every client left and the proxy's
open files are back to what they were. The backend connections each proxy's login held while
the clients sat idle show whether logging in touches PostgreSQL.

Environment: IDLE_CLIENTS, IDLE_SETTLE, IDLE_CONCURRENCY (logins in flight at once, default
50), IDLE_WAVES (default 1; 2 or more let the clients come back to the same process, which tells
memory kept for reuse from memory lost), ROLEGATE (another rolegate binary to measure, e.g. one
built from another commit; default target/release/rolegate), TARGETS (comma list of the names above, default all), PEERS_DIR. The clients and each
proxy need IDLE_CLIENTS open files: the soft limit is raised to the hard one (at most 65,536).
"""
import asyncio
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pgbench_compare as pc  # noqa: E402  (helpers only; its main() runs only as a script)

N = int(os.environ.get("IDLE_CLIENTS", "10000"))
SETTLE = float(os.environ.get("IDLE_SETTLE", "5"))
CONCURRENCY = int(os.environ.get("IDLE_CONCURRENCY", "50"))
WAVES = int(os.environ.get("IDLE_WAVES", "1"))
ALL_TARGETS = ("rolegate", "rolegate tls", "pgbouncer", "pgbouncer tls", *pc.PEERS)


def open_files(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def backend_connections(admin_url, login):
    import psycopg
    with psycopg.connect(admin_url, autocommit=True) as c:
        return c.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (login,)).fetchone()[0]


async def measure(name, pid, port, user, password, tls, admin_url, login):
    import asyncpg
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    await asyncio.sleep(1)
    rest, files_at_rest = pc.rss_kib(pid), open_files(pid)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def login_one():
        async with gate:
            return await asyncpg.connect(host="127.0.0.1", port=port, user=user, password=password,
                                         database="bench", ssl=context if tls else False, timeout=60)

    waves = []
    for wave in range(WAVES):
        started = time.monotonic()
        outcomes = await asyncio.gather(*(login_one() for _ in range(N)), return_exceptions=True)
        login_seconds = time.monotonic() - started
        conns = [c for c in outcomes if not isinstance(c, BaseException)]
        failures = [c for c in outcomes if isinstance(c, BaseException)]
        if failures:
            print(f"{name}: {len(failures)} of {N} logins failed, first: {failures[0]!r}", file=sys.stderr)
        await asyncio.sleep(2)
        held = pc.rss_kib(pid)
        backends = backend_connections(admin_url, login)
        started = time.monotonic()
        await asyncio.gather(*(c.close(timeout=10) for c in conns), return_exceptions=True)
        closed = time.monotonic()
        deadline = closed + 60
        while open_files(pid) > files_at_rest + pc.POOL_SIZE and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        print(f"{name}: closing took {closed - started:.1f} s, then {time.monotonic() - closed:.1f} s until "
              f"the proxy's open files were back ({open_files(pid)}, {files_at_rest} at rest)", file=sys.stderr)
        await asyncio.sleep(SETTLE)
        after = pc.rss_kib(pid)
        waves.append(dict(held=held, clients=len(conns), after=after, backends=backends))
        print(f"{name}: at rest {rest:,} KiB, wave {wave + 1}: with {len(conns):,} idle clients {held:,} KiB "
              f"({(held - rest) / max(len(conns), 1):.1f} KiB per client over rest), {SETTLE:g} s after they "
              f"left {after:,} KiB; backend connections while idle {backends}; logins took "
              f"{login_seconds:.1f} s; open files limit {pc.open_files_limit(pid)}", file=sys.stderr)
    first = waves[0]
    return dict(name=name, rest=rest, waves=waves, held=first["held"], clients=first["clients"],
                after=first["after"], backends=max(w["backends"] for w in waves),
                per_client=(first["held"] - rest) / first["clients"] if first["clients"] else float("nan"))


def stop(proc):
    pc.stop_all([proc], timeout=10)


def main():
    import asyncpg  # noqa: F401  (fail early when missing; benches/idle_memory.sh installs it)
    bindir = pc.pg_bin()
    wanted = os.environ.get("TARGETS")
    targets = [t for t in ALL_TARGETS if not wanted or t in wanted.split(",")]
    peers = [p for p in pc.peers_available() if p in targets]
    targets = [t for t in targets if t not in pc.PEERS or t in peers]
    if any(t.startswith("pgbouncer") for t in targets) and shutil.which("pgbouncer") is None:
        sys.exit("pgbouncer is not installed (apt-get install pgbouncer)")
    pc.raise_nofile()
    work = tempfile.mkdtemp(prefix="rolegate-idle-")
    os.chmod(work, 0o755)
    peer_dir = f"{work}/peers"
    started_peers, rows = [], []
    proc = None
    try:
        pg_port = pc.free_port()
        admin_password = "bench-admin"
        pc.start_cluster(bindir, work, pg_port, admin_password, 100)
        admin_url = f"host=127.0.0.1 port={pg_port} user=postgres password={admin_password} dbname=postgres"
        rolegate = os.environ.get("ROLEGATE", f"{pc.ROOT}/target/release/rolegate")
        max_clients = N + 100
        rg_port = pc.free_port()
        plain_config = pc.rolegate_config(rolegate, rg_port, pg_port, max_clients, pooled=True)
        with open(f"{work}/rolegate.toml", "w") as f:
            f.write(plain_config)
        pc.run([rolegate, "setup", "--config", f"{work}/rolegate.toml", "--admin-url", admin_url])
        login_password = open(f"{work}/login.secret").read().strip()
        pc.create_login(admin_url, "bench_pgbouncer", login_password)
        cert, key = pc.make_certificate(f"{work}/tls")
        if pc.AS_ROOT:
            pc.run(["chown", "-R", "postgres:postgres", work])

        def run_measure(*args):
            rows.append(asyncio.run(measure(*args)))

        for name in targets:
            tls = name.endswith(" tls")
            port = pc.free_port()
            if name.startswith("rolegate"):
                config = pc.rolegate_config(rolegate, port, pg_port, max_clients, pooled=True,
                                            tls=(cert, key) if tls else None)
                with open(f"{work}/rolegate.toml", "w") as f:
                    f.write(config)
                proc = subprocess.Popen([rolegate, "serve", "--config", f"{work}/rolegate.toml"],
                                        stderr=open(f"{work}/rolegate.log", "a"),
                                        env=dict(os.environ, ROLEGATE_LOG="warn"))
                pc.wait_port(port)
                run_measure(name, proc.pid, port, "bench", "bench", tls, admin_url, "bench_login_0001")
                stop(proc)
            elif name.startswith("pgbouncer"):
                extra = (f"client_tls_sslmode = require\nclient_tls_cert_file = {cert}\n"
                         f"client_tls_key_file = {key}\n" if tls else "")
                ini = pc.pgbouncer_ini(work, name.replace(" ", "-"), pg_port, port, login_password,
                                       "transaction", max_clients, pc.POOL_SIZE, extra)
                if pc.AS_ROOT:
                    pc.run(["chown", "-R", "postgres:postgres", work])
                proc = subprocess.Popen(pc.pgbouncer_command(ini), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                pc.wait_port(port)
                run_measure(name, pc.pgbouncer_pid(ini), port, "bench", "bench", tls, admin_url,
                            "bench_pgbouncer")
                stop(proc)
            else:
                login = f"bench_{name}"
                pc.create_login(admin_url, login, login_password)
                started_peers.append(name)
                pid = pc.start_peer(name, bindir, pg_port, port, login, login_password, peer_dir,
                                    admin_password, max_clients)
                run_measure(name, pid, port, login, login_password, False, admin_url, login)
                pc.stop_peer(name, peer_dir)
            proc = None

        print(f"\nidle clients, each proxy in a fresh process, transaction pooling (pool {pc.POOL_SIZE}), "
              f"{N:,} clients, {os.cpu_count()} cores\n")
        again = "".join(f" | wave {w + 1}: with clients KiB | wave {w + 1}: after KiB" for w in range(1, WAVES))
        print(f"| target | RSS at rest KiB | RSS with {N:,} idle clients KiB | KiB per client "
              f"| RSS {SETTLE:g} s after they left KiB{again} | backend connections while idle |")
        print("|---" * (6 + 2 * (WAVES - 1)) + "|")
        for r in rows:
            clients = "" if r["clients"] == N else f" ({r['clients']:,} logged in)"
            again = "".join(f" | {w['held']:,} | {w['after']:,}" for w in r["waves"][1:])
            print(f"| {r['name']} | {r['rest']:,} | {r['held']:,}{clients} | {r['per_client']:.1f} "
                  f"| {r['after']:,}{again} | {r['backends']} |")
    finally:
        if proc:
            stop(proc)
        for peer in started_peers:
            pc.stop_peer(peer, peer_dir)
        pc.stop_cluster(bindir, work)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
