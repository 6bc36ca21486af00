"""Whole-path benchmark: pgbench against direct PostgreSQL, rolegate (app class, policy
enforcing), PgBouncer (session mode) and a bare tokio byte relay, in alternation.

Run through benches/pgbench.sh, which builds the binaries first. Everything runs on a
private cluster in a temp dir; nothing is left behind.

Environment: DURATION (seconds per run, default 10), ROUNDS (default 3), SCALE (default 10),
IDLE_CLIENTS (default 1000), SCENARIOS and TARGETS (comma lists, default all), BASELINE (path to another
rolegate binary, e.g. one built from main before a change: it joins the alternation as
"baseline" with the same config, so a change is measured against its parent in one run),
CALLGRIND (transactions per client: instead of the timed runs, count each proxy's user-space
instructions per transaction under valgrind's callgrind; see count_instructions).

POOL=transaction: transaction pooling instead. PostgreSQL gets max_connections = 100, rolegate
`[pool] mode = "transaction"` and PgBouncer `pool_mode = transaction`, both with 20 backend
connections; CLIENTS (default 400) pgbench clients run against both. Direct PostgreSQL cannot
take that many clients and the bare relay is 1:1, so both sit out; PgBouncer 1.18 (Debian's)
cannot pool protocol-level prepared statements, so the prepared scenario is rolegate's alone.
The most backend connections rolegate's login had open during its runs is reported.
"""
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DURATION = int(os.environ.get("DURATION", "10"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
SCALE = int(os.environ.get("SCALE", "10"))
IDLE_CLIENTS = int(os.environ.get("IDLE_CLIENTS", "1000"))
BASELINE = os.environ.get("BASELINE")
CALLGRIND = int(os.environ.get("CALLGRIND", "0"))
POOLED = os.environ.get("POOL") == "transaction"
CLIENTS = int(os.environ.get("CLIENTS", "400"))
POOL_SIZE = 20
AS_ROOT = os.geteuid() == 0
TICKS = os.sysconf("SC_CLK_TCK")


def pg_bin():
    for version in sorted(os.listdir("/usr/lib/postgresql"), key=int, reverse=True):
        path = f"/usr/lib/postgresql/{version}/bin"
        if os.path.exists(f"{path}/initdb"):
            return path
    sys.exit("PostgreSQL server programs not found under /usr/lib/postgresql/*/bin")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(cmd):
    return ["runuser", "-u", "postgres", "--"] + cmd if AS_ROOT else cmd


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on {port}")


def cpu_seconds(pid):
    """(user, system) CPU seconds the process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def context_switches(pid):
    """Voluntary + involuntary context switches of all the process's threads so far."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass  # a thread that ended between listdir and open
    return total


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def stop_all(procs, timeout):
    """SIGTERM to every process, then wait for each; kill what does not end in time."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def callgrind_dump(pid, work, name):
    """Has callgrind write the counts since its last dump; returns their instruction total."""
    before = set(os.listdir(work))
    control = ["callgrind_control", "--dump", str(pid)]
    # vgdb finds a process by its user: ask as the user PgBouncer runs as.
    run(as_postgres(control) if name == "pgbouncer" else control)
    for _ in range(100):
        new = [f for f in set(os.listdir(work)) - before if f.startswith(f"cg.{name}")]
        if new:
            time.sleep(0.5)  # let the dump finish
            with open(f"{work}/{new[0]}") as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        return int(line.split()[1])
        time.sleep(0.2)
    sys.exit(f"callgrind wrote no dump for {name}")


def count_instructions(bindir, work, rg_config, pg_port, login_password, rg_listen):
    """User-space instructions per transaction of rolegate, PgBouncer and the bare relay.

    Each runs under callgrind, whose counts are the same for the same binaries and
    inputs however busy the machine is (the timed runs are not). pgbench runs a short and
    a long run against each; the difference of their counts over the difference of their
    transactions is the cost of a transaction, without connection setup. Kernel time
    (most of a proxy's CPU on loopback) is not in these numbers.
    """
    rg_port, pb_port, bare_port = (free_port() for _ in range(3))
    with open(f"{work}/callgrind.toml", "w") as f:
        f.write(rg_config.replace(rg_listen, f'listen = "127.0.0.1:{rg_port}"'))
    with open(f"{work}/pgbouncer.ini") as f:
        ini = f.read()
    with open(f"{work}/callgrind-pgbouncer.ini", "w") as f:
        f.write("\n".join(f"listen_port = {pb_port}" if l.startswith("listen_port") else l
                          for l in ini.splitlines()) + "\n")
    if AS_ROOT:
        run(["chown", "-R", "postgres:postgres", work])
    grind = lambda name: ["valgrind", "--tool=callgrind", "--dump-instr=no",
                          f"--callgrind-out-file={work}/cg.{name}.%p"]
    procs = [
        subprocess.Popen(grind("rolegate") + [f"{ROOT}/target/release/rolegate", "serve", "--config",
                                              f"{work}/callgrind.toml"],
                         stderr=subprocess.DEVNULL, env=dict(os.environ, ROLEGATE_LOG="warn")),
        subprocess.Popen(as_postgres(grind("pgbouncer") + ["pgbouncer", f"{work}/callgrind-pgbouncer.ini"]),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen(grind("bare") + [f"{ROOT}/target/release/examples/bare_relay",
                                          f"127.0.0.1:{bare_port}", f"127.0.0.1:{pg_port}"],
                         stderr=subprocess.DEVNULL),
    ]
    try:
        for port in (rg_port, pb_port, bare_port):
            wait_port(port, timeout=120)
        pb_pid = int(run(["pgrep", "-f", f"callgrind-pgbouncer.ini"]).stdout.split()[-1])
        targets = {
            "rolegate": (rg_port, "bench", "bench", procs[0].pid, "rolegate"),
            "pgbouncer": (pb_port, "bench", "bench", pb_pid, "pgbouncer"),
            "bare relay": (bare_port, "bench_login_0001", login_password, procs[2].pid, "bare"),
        }
        short, long = max(CALLGRIND // 10, 1), CALLGRIND
        print(f"\nuser-space instructions per transaction (callgrind; 20 clients, "
              f"{20 * (long - short):,} transactions counted)\n")
        print("| scenario | target | instructions / tx | vs PgBouncer | vs bare relay |")
        print("|" + "---|" * 5)
        for mode in ("simple", "extended", "prepared"):
            counts = {}
            for target, (port, user, password, pid, name) in targets.items():
                # PgBouncer 1.18 cannot pool protocol-level prepared statements.
                if POOLED and mode == "prepared" and target == "pgbouncer":
                    continue
                runs = []
                # The first run is a warm-up, as long as the long one: first-time work
                # (parsing a new statement, PgBouncer filling its pool) must not land in only
                # one of the two runs counted.
                callgrind_dump(pid, work, name)  # start from zero
                for txs in (long, short, long):
                    run([f"{bindir}/pgbench", "-n", "-S", "-M", mode, "-c", "20", "-j", "2", "-t", str(txs),
                         "-h", "127.0.0.1", "-p", str(port), "-U", user, "bench"],
                        env=dict(os.environ, PGPASSWORD=password))
                    runs.append(callgrind_dump(pid, work, name))
                counts[target] = (runs[2] - runs[1]) / (20 * (long - short))
            for target, n in counts.items():
                pb, bare = counts.get("pgbouncer"), counts.get("bare relay")
                vs_pb = f"{n / pb:.2f}x" if target == "rolegate" and pb else ""
                vs_bare = f"{n / bare:.2f}x" if target == "rolegate" and bare else ""
                print(f"| select {mode} c20 | {target} | {n:,.0f} | {vs_pb} | {vs_bare} |")
    finally:
        stop_all(procs, timeout=30)  # valgrind writes its last dump on the way out


class BackendWatcher:
    """Samples how many backend connections a login has open, every 50 ms, until stopped."""

    def __init__(self, pg_port, password, login):
        import threading
        import psycopg
        self.conn = psycopg.connect(f"host=127.0.0.1 port={pg_port} user=postgres "
                                    f"password={password} dbname=postgres", autocommit=True)
        self.login, self.most, self.done = login, 0, threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self):
        while not self.done.wait(0.05):
            n = self.conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                                  (self.login,)).fetchone()[0]
            self.most = max(self.most, n)

    def stop(self):
        self.done.set()
        self.thread.join()
        self.conn.close()
        return self.most


def main():
    bindir = pg_bin()
    if shutil.which("pgbouncer") is None:
        print("installing pgbouncer from the distribution", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq", "pgbouncer"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    work = tempfile.mkdtemp(prefix="rolegate-bench-")
    os.chmod(work, 0o755)
    procs = []
    try:
        pg_port, rg_port, pb_port, bare_port, base_port = (free_port() for _ in range(5))
        admin_password = "bench-admin"
        with open(f"{work}/pw", "w") as f:
            f.write(admin_password)
        if AS_ROOT:
            run(["chown", "-R", "postgres:postgres", work])
        run(as_postgres([f"{bindir}/initdb", "-D", f"{work}/data", "-U", "postgres",
                         "--auth=scram-sha-256", f"--pwfile={work}/pw", "-E", "UTF8", "--locale=C"]))
        run(as_postgres([f"{bindir}/pg_ctl", "-D", f"{work}/data", "-l", f"{work}/pg.log", "-w", "-o",
                         f"-p {pg_port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={work} "
                         f"-c max_connections={100 if POOLED else IDLE_CLIENTS + 100} -c shared_buffers=256MB "
                         "-c fsync=off -c synchronous_commit=off", "start"]))
        rolegate = f"{ROOT}/target/release/rolegate"
        verifier = lambda pw: run([rolegate, "hash-password"], input=pw).stdout.strip()
        config = f"""listen = "127.0.0.1:{rg_port}"
[tls]
mode = "disable"
[backend]
host = "127.0.0.1"
port = {pg_port}
database = "bench"
owner_role = "bench_owner"
login_user = "bench_login_0001"
login_password_file = "login.secret"
[[clients]]
user = "bench"
password = "{verifier('bench')}"
class = "app"
[[clients]]
user = "migrator"
password = "{verifier('migrator')}"
class = "migrator"
[limits]
max_client_connections = {max(IDLE_CLIENTS, CLIENTS) + 100}
"""
        if POOLED:
            config += f'[pool]\nmode = "transaction"\nsize = {POOL_SIZE}\n'

        with open(f"{work}/rolegate.toml", "w") as f:
            f.write(config)
        admin_url = f"host=127.0.0.1 port={pg_port} user=postgres password={admin_password} dbname=postgres"
        run([rolegate, "setup", "--config", f"{work}/rolegate.toml", "--admin-url", admin_url])
        login_password = open(f"{work}/login.secret").read().strip()

        rg = subprocess.Popen([rolegate, "serve", "--config", f"{work}/rolegate.toml"],
                              stderr=open(f"{work}/rolegate.log", "w"), env=dict(os.environ, ROLEGATE_LOG="warn"))
        procs.append(rg)
        wait_port(rg_port)
        # The schema is made the way rolegate intends: by the migrator, through rolegate.
        env = dict(os.environ, PGPASSWORD="migrator")
        run([f"{bindir}/pgbench", "-i", "-q", "-s", str(SCALE), "-h", "127.0.0.1", "-p", str(rg_port),
             "-U", "migrator", "bench"], env=env)

        # PgBouncer logs in as a login of its own, so that the backend connections of
        # each proxy can be told apart in pg_stat_activity.
        import psycopg
        with psycopg.connect(admin_url.replace("dbname=postgres", "dbname=bench"), autocommit=True) as c:
            c.execute("DROP ROLE IF EXISTS bench_pgbouncer")
            c.execute(f"CREATE ROLE bench_pgbouncer LOGIN PASSWORD '{login_password}' IN ROLE bench_owner")
            c.execute("ALTER ROLE bench_pgbouncer SET role = bench_owner")
        with open(f"{work}/userlist.txt", "w") as f:
            f.write('"bench" "bench"\n')
        with open(f"{work}/pgbouncer.ini", "w") as f:
            f.write(f"""[databases]
bench = host=127.0.0.1 port={pg_port} dbname=bench user=bench_pgbouncer password={login_password}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {pb_port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {work}/userlist.txt
pool_mode = {"transaction" if POOLED else "session"}
max_client_conn = {max(IDLE_CLIENTS, CLIENTS) + 100}
default_pool_size = {POOL_SIZE if POOLED else 100}
logfile = {work}/pgbouncer.log
""")
        if AS_ROOT:
            run(["chown", "-R", "postgres:postgres", work])
        pb = subprocess.Popen(as_postgres(["pgbouncer", f"{work}/pgbouncer.ini"]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(pb)
        wait_port(pb_port)
        pb_pid = int(run(["pgrep", "-f", f"pgbouncer {work}/pgbouncer.ini"]).stdout.split()[-1])
        bare = subprocess.Popen([f"{ROOT}/target/release/examples/bare_relay",
                                 f"127.0.0.1:{bare_port}", f"127.0.0.1:{pg_port}"])
        procs.append(bare)
        wait_port(bare_port)
        if BASELINE:
            with open(f"{work}/baseline.toml", "w") as f:
                f.write(config.replace(f'listen = "127.0.0.1:{rg_port}"',
                                       f'listen = "127.0.0.1:{base_port}"'))
            base = subprocess.Popen([BASELINE, "serve", "--config", f"{work}/baseline.toml"],
                                    stderr=open(f"{work}/baseline.log", "w"),
                                    env=dict(os.environ, ROLEGATE_LOG="warn"))
            procs.append(base)
            wait_port(base_port)

        targets = {
            "direct": (pg_port, "bench_login_0001", login_password, None),
            "rolegate": (rg_port, "bench", "bench", rg.pid),
            "pgbouncer": (pb_port, "bench", "bench", pb_pid),
            "bare relay": (bare_port, "bench_login_0001", login_password, bare.pid),
        }
        if BASELINE:
            targets["baseline"] = (base_port, "bench", "bench", base.pid)
        if CALLGRIND:
            count_instructions(bindir, work, config, pg_port, login_password,
                               f'listen = "127.0.0.1:{rg_port}"')
            return
        scenarios = [
            ("select simple c1", ["-S", "-M", "simple", "-c", "1", "-j", "1"]),
            ("select simple c20", ["-S", "-M", "simple", "-c", "20", "-j", "2"]),
            ("select extended c1", ["-S", "-M", "extended", "-c", "1", "-j", "1"]),
            ("select extended c20", ["-S", "-M", "extended", "-c", "20", "-j", "2"]),
            ("select prepared c1", ["-S", "-M", "prepared", "-c", "1", "-j", "1"]),
            ("select prepared c20", ["-S", "-M", "prepared", "-c", "20", "-j", "2"]),
            ("tpcb-like c1", ["-b", "tpcb-like", "-c", "1", "-j", "1"]),
            ("tpcb-like c20", ["-b", "tpcb-like", "-c", "20", "-j", "2"]),
            ("select simple c20 -C", ["-S", "-M", "simple", "-c", "20", "-j", "2", "-C"]),
        ]
        if POOLED:
            c = ["-c", str(CLIENTS), "-j", "2"]
            scenarios = [
                (f"select simple c{CLIENTS}", ["-S", "-M", "simple", *c]),
                (f"select extended c{CLIENTS}", ["-S", "-M", "extended", *c]),
                (f"select prepared c{CLIENTS}", ["-S", "-M", "prepared", *c]),
                (f"tpcb-like extended c{CLIENTS}", ["-b", "tpcb-like", "-M", "extended", *c]),
            ]
            targets = {t: v for t, v in targets.items() if t in ("rolegate", "pgbouncer", "baseline")}
        wanted = os.environ.get("SCENARIOS")
        if wanted:
            scenarios = [s for s in scenarios if s[0] in wanted.split(",")]
        wanted = os.environ.get("TARGETS")
        if wanted:
            targets = {t: v for t, v in targets.items() if t in wanted.split(",")}

        results = {}
        most_backends = 0
        for name, args in scenarios:
            for _ in range(ROUNDS):
                for target, (port, user, password, pid) in targets.items():
                    if POOLED and target == "pgbouncer" and "-M prepared" in " ".join(args):
                        continue  # PgBouncer 1.18 cannot pool prepared statements
                    watcher = None
                    if POOLED and target == "rolegate":
                        watcher = BackendWatcher(pg_port, admin_password, "bench_login_0001")
                    before = cpu_seconds(pid) if pid else None
                    switches_before = context_switches(pid) if pid else None
                    out = run([f"{bindir}/pgbench", "-n", "-T", str(DURATION), "-h", "127.0.0.1",
                               "-p", str(port), "-U", user, *args, "bench"],
                              env=dict(os.environ, PGPASSWORD=password)).stdout
                    if watcher:
                        most_backends = max(most_backends, watcher.stop())
                    tps = float(next(l for l in out.splitlines() if l.startswith("tps")).split()[2])
                    lat = float(next(l for l in out.splitlines() if "latency average" in l).split()[3])
                    txs = int(next(l for l in out.splitlines() if "transactions actually processed" in l)
                              .split(":")[1].split("/")[0])
                    if pid:
                        after = cpu_seconds(pid)
                        user = (after[0] - before[0]) / txs * 1000
                        cpu = user + (after[1] - before[1]) / txs * 1000
                        switches = (context_switches(pid) - switches_before) / txs * 1000
                    else:
                        user = cpu = switches = None
                    results.setdefault((name, target), []).append((tps, lat, cpu, user, switches))

        print(f"\npgbench, {DURATION}s x {ROUNDS} rounds per cell (median), scale {SCALE}, "
              f"{os.cpu_count()} cores, PostgreSQL {os.path.basename(os.path.dirname(bindir))}\n")
        header = ("| scenario | target | TPS | latency ms | proxy CPU s / 1k tx | of which user "
                  "| proxy context switches / 1k tx | vs PgBouncer | vs direct |")
        print(header)
        print("|" + "---|" * 9)
        for name, _ in scenarios:
            med = {t: tuple(statistics.median(x[i] for x in results[(name, t)] if x[i] is not None)
                            if any(x[i] is not None for x in results[(name, t)]) else None
                            for i in range(5)) for t in targets if (name, t) in results}
            for t in med:
                tps, lat, cpu, user, switches = med[t]
                vs_pb = (f"{tps / med['pgbouncer'][0]:.2f}x"
                         if t in ("rolegate", "baseline") and "pgbouncer" in med else "")
                vs_direct = f"{tps / med['direct'][0]:.2f}x" if t != "direct" and "direct" in med else ""
                cpu_text = f"{cpu:.4f}" if cpu is not None else "-"
                user_text = f"{user:.4f}" if user is not None else "-"
                switches_text = f"{switches:,.0f}" if switches is not None else "-"
                print(f"| {name} | {t} | {tps:,.0f} | {lat:.3f} | {cpu_text} | {user_text} | {switches_text} "
                      f"| {vs_pb} | {vs_direct} |")

        if POOLED:
            print(f"\nmost backend connections of rolegate's login during its runs: {most_backends} "
                  f"(pool size {POOL_SIZE}; PostgreSQL max_connections 100, {CLIENTS} clients)")
        # Memory of idle authenticated clients.
        print()
        import psycopg
        base = rss_kib(rg.pid)
        conns = []
        for n in (1, IDLE_CLIENTS):
            while len(conns) < n:
                conns.append(psycopg.connect(f"host=127.0.0.1 port={rg_port} user=bench password=bench dbname=bench"))
            time.sleep(1)
            rss = rss_kib(rg.pid)
            print(f"rolegate RSS with {n} idle clients: {rss} KiB "
                  f"({(rss - base) / n:.1f} KiB per client over the {base} KiB at rest)")
        for c in conns:
            c.close()
    finally:
        stop_all(procs, timeout=10)
        subprocess.run(as_postgres([f"{bindir}/pg_ctl", "-D", f"{work}/data", "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


main()
