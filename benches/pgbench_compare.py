"""Whole-path benchmark: pgbench against direct PostgreSQL, rolegate (app class, policy
enforcing), PgBouncer (session mode) and a bare tokio byte relay, in alternation (under
POOL=transaction: rolegate, PgBouncer, PgDog and pg_doorman, all pooling transactions).

Run through benches/pgbench.sh, which builds the binaries first. Everything runs on a
private cluster in a temp dir; nothing is left behind.

Environment: DURATION (seconds per run, default 10), ROUNDS (default 3), SCALE (default 10),
IDLE_CLIENTS (default 1000; 0 skips the idle RSS), SCENARIOS and TARGETS (comma lists, default all), BASELINE (path to another
rolegate binary, e.g. one built from main before a change: it joins the alternation as
"baseline" with the same config, so a change is measured against its parent in one run;
BASELINE_THREADS sets its `threads`, BASELINE_RUNTIME its `runtime`),
CALLGRIND (transactions per client: instead of the timed runs, count each proxy's user-space
instructions per transaction under valgrind's callgrind; see count_instructions; KEEP_CG, a
directory, keeps callgrind's dumps there for callgrind_annotate; CALLGRIND_CLIENTS, default 20,
the pgbench clients; CACHE_SIM=1 adds callgrind's simulated first-level data cache misses per
transaction; TARGETS filters them), SYSCALLS (transactions per
client: instead of the timed runs, count each pooler's system calls per transaction, by call,
with `perf stat` on the kernel's syscall tracepoints; see count_syscalls), CLIENT_TLS=1
(rolegate and the baseline reached over TLS, the others in plaintext), PEERS_DIR.

POOL=transaction: transaction pooling instead. PostgreSQL gets max_connections = 100 (plus 20
per peer pooler), rolegate `[pool] mode = "transaction"` and PgBouncer `pool_mode = transaction`,
all with 20 backend connections; CLIENTS (default 400; a comma list such as 100,400,1000 repeats
every scenario for each count) pgbench clients run against each. Direct PostgreSQL cannot take
that many clients and the bare relay is 1:1, so both sit out; PgBouncer 1.18 (Debian's) cannot
pool protocol-level prepared statements, so it skips the prepared scenario. When PEERS_DIR
(default <repo>/../shared/peers) holds peers.sh and the PgDog and pg_doorman binaries, both run
beside PgBouncer as targets "pgdog" and "pg_doorman" (transaction pooling, pool 20, prepared
statements pooled, each logging in as a login of its own). The most backend connections each
pooler's login had open during its runs is reported.

Every timed run writes pgbench's per-transaction log (-l) into the temp dir (deleted once
read). TPS, latency (mean, p50, p99) and the proxy's CPU and context switches per transaction
are taken over a window of about DURATION seconds that opens once pgbench has connected all its
clients (see timed_run): logging in is not in them, except in the -C scenario. Each cell is the
median over the rounds. The memory of idle clients in a fresh process (rolegate plain and TLS,
PgBouncer, the peers) is benches/idle_memory.py's.
"""
import glob
import math
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
# `threads` for the baseline's config (BASELINE=target/release/rolegate BASELINE_THREADS=0
# measures today's binary on one thread against one thread per core).
BASELINE_THREADS = os.environ.get("BASELINE_THREADS")
# and its `runtime` (BASELINE_RUNTIME=per_thread).
BASELINE_RUNTIME = os.environ.get("BASELINE_RUNTIME")
CALLGRIND = int(os.environ.get("CALLGRIND", "0"))
CALLGRIND_CLIENTS = int(os.environ.get("CALLGRIND_CLIENTS", "20"))
CACHE_SIM = os.environ.get("CACHE_SIM") == "1"
SYSCALLS = int(os.environ.get("SYSCALLS", "0"))
POOLED = os.environ.get("POOL") == "transaction"
# CLIENT_TLS=1: rolegate and the baseline require TLS of their clients (a certificate made
# here) and every pgbench runs with sslmode=prefer, so only they are reached over TLS; the
# ratios to PgBouncer then compare TLS with plaintext (TARGETS=rolegate,baseline for an A/B).
CLIENT_TLS = os.environ.get("CLIENT_TLS") == "1"
CLIENT_COUNTS = [int(c) for c in os.environ.get("CLIENTS", "400").split(",") if c.strip()]
POOL_SIZE = 20
PEERS_DIR = os.environ.get("PEERS_DIR", os.path.join(os.path.dirname(ROOT), "shared", "peers"))
PEERS = ("pgdog", "pg_doorman")
POOLERS = ("rolegate", "baseline", *PEERS)  # targets that get the ratios to PgBouncer
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
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        print(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}",
              file=sys.stderr)
        done.check_returncode()
    return done


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
    """Has callgrind write the counts since its last dump; returns their totals by event
    ("Ir", and with CACHE_SIM the simulated cache's misses: "D1mr", "DLmr"...)."""
    before = set(os.listdir(work))
    control = ["callgrind_control", "--dump", str(pid)]
    # vgdb finds a process by its user: ask as the user PgBouncer runs as.
    run(as_postgres(control) if name == "pgbouncer" else control)
    for _ in range(100):
        new = [f for f in set(os.listdir(work)) - before if f.startswith(f"cg.{name}")]
        if new:
            time.sleep(0.5)  # let the dump finish
            if os.environ.get("KEEP_CG"):
                shutil.copy(f"{work}/{new[0]}", os.environ["KEEP_CG"])
            events = ["Ir"]
            with open(f"{work}/{new[0]}") as f:
                for line in f:
                    if line.startswith("events:"):
                        events = line.split()[1:]
                    if line.startswith(("summary:", "totals:")):
                        return dict(zip(events, map(int, line.split()[1:])))
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
                          f"--cache-sim={'yes' if CACHE_SIM else 'no'}",
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
        clients = CALLGRIND_CLIENTS
        if POOLED and clients > 50:
            del targets["bare relay"]  # one PostgreSQL session per client: too many
        if os.environ.get("TARGETS"):
            targets = {t: v for t, v in targets.items() if t in os.environ["TARGETS"].split(",")}
        short, long = max(CALLGRIND // 10, 1), CALLGRIND
        per_tx = clients * (long - short)
        # With CACHE_SIM, callgrind's simulated first-level data cache: the misses say how
        # much memory a transaction touches that an earlier one has not left in the cache,
        # which grows with the client count (each client's own state is cold by its turn).
        misses = ["D1mr", "D1mw"] if CACHE_SIM else []
        print(f"\nuser-space instructions per transaction (callgrind; {clients} clients, "
              f"{per_tx:,} transactions counted)\n")
        print("| scenario | target | instructions / tx | vs PgBouncer | vs bare relay |"
              + (" D1 misses / tx | vs PgBouncer |" if CACHE_SIM else ""))
        print("|" + "---|" * (7 if CACHE_SIM else 5))
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
                    run([f"{bindir}/pgbench", "-n", "-S", "-M", mode, "-c", str(clients), "-j", "2",
                         "-t", str(txs), "-h", "127.0.0.1", "-p", str(port), "-U", user, "bench"],
                        env=dict(os.environ, PGPASSWORD=password))
                    runs.append(callgrind_dump(pid, work, name))
                counts[target] = tuple(
                    (sum(runs[2].get(e, 0) for e in events) - sum(runs[1].get(e, 0) for e in events))
                    / per_tx for events in (["Ir"], misses))
            for target, (n, missed) in counts.items():
                pb, bare = counts.get("pgbouncer", (0, 0)), counts.get("bare relay", (0, 0))
                vs_pb = f"{n / pb[0]:.2f}x" if target == "rolegate" and pb[0] else ""
                vs_bare = f"{n / bare[0]:.2f}x" if target == "rolegate" and bare[0] else ""
                cache = ""
                if CACHE_SIM:
                    vs = f"{missed / pb[1]:.2f}x" if target == "rolegate" and pb[1] else ""
                    cache = f" {missed:,.0f} | {vs} |"
                print(f"| select {mode} c{clients} | {target} | {n:,.0f} | {vs_pb} | {vs_bare} |{cache}",
                      flush=True)
    finally:
        stop_all(procs, timeout=30)  # valgrind writes its last dump on the way out


# The calls a proxy makes per transaction on Linux (tokio: recvfrom/sendto through std's
# sockets, epoll_wait; PgBouncer: recv/send through libevent), and the wake-ups.
SYSCALL_EVENTS = ["read", "recvfrom", "write", "sendto", "writev", "sendmsg", "epoll_wait",
                  "epoll_pwait", "epoll_ctl", "futex", "sched_yield", "getrandom"]


def perf_counts(pid, command, env):
    """Runs `command` (pgbench) while `perf stat` counts process `pid`'s system calls
    (every thread), by call; returns {event: count} with "all" and "context-switches"."""
    events = ["raw_syscalls:sys_enter", "context-switches",
              *(f"syscalls:sys_enter_{e}" for e in SYSCALL_EVENTS)]
    out = tempfile.mktemp(prefix="perf-")
    perf = subprocess.Popen(["perf", "stat", "-x", ",", "-o", out, "-e", ",".join(events),
                             "-p", str(pid)], stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # perf attaches to every thread before the run starts
    try:
        run(command, env=env)
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=30)
    counts = {}
    with open(out) as f:
        for line in f:
            fields = line.strip().split(",")
            if len(fields) > 2 and fields[0].isdigit():
                name = fields[2].removeprefix("syscalls:sys_enter_")
                counts["all" if name == "raw_syscalls:sys_enter" else name] = int(fields[0])
    os.unlink(out)
    return counts


def count_syscalls(bindir, targets, clients):
    """System calls per transaction of each pooler, by call (`SYSCALLS`).

    On loopback most of a proxy's CPU is the kernel's side of its calls, which callgrind
    does not see. Like count_instructions, pgbench runs a short and a long run (after a
    warm-up as long as the long one) against each; the difference of the counts over the
    difference of the transactions is the cost of one transaction without the logins. Unlike
    instructions, the counts depend on timing (how many messages one read finds, how many
    events one epoll_wait returns), so they move a little between runs.
    """
    if shutil.which("perf") is None:
        sys.exit("SYSCALLS needs perf (Debian: apt-get install linux-perf)")
    short, long = max(SYSCALLS // 10, 1), SYSCALLS
    shown = ["all", "context-switches", "read", "recvfrom", "write", "sendto", "writev",
             "epoll_wait", "epoll_ctl", "futex"]
    print(f"\nsystem calls per transaction (perf stat; {clients} clients, "
          f"{clients * (long - short):,} transactions counted; -j 2)\n")
    print("| scenario | target | " + " | ".join(shown) + " | other |")
    print("|" + "---|" * (len(shown) + 3))
    for mode in ("simple", "extended", "prepared"):
        for target, (port, user, password, pid) in targets.items():
            if pid is None or (POOLED and mode == "prepared" and target == "pgbouncer"):
                continue
            pgbench = lambda txs: [f"{bindir}/pgbench", "-n", "-S", "-M", mode, "-c", str(clients),
                                   "-j", "2", "-t", str(txs), "-h", "127.0.0.1", "-p", str(port),
                                   "-U", user, "bench"]
            env = dict(os.environ, PGPASSWORD=password)
            run(pgbench(long), env=env)  # warm-up
            small, big = perf_counts(pid, pgbench(short), env), perf_counts(pid, pgbench(long), env)
            per_tx = {e: (big.get(e, 0) - small.get(e, 0)) / (clients * (long - short))
                      for e in big}
            other = per_tx["all"] - sum(v for e, v in per_tx.items() if e not in ("all", "context-switches"))
            cells = " | ".join(f"{per_tx.get(e, 0):.2f}" for e in shown)
            print(f"| select {mode} c{clients} | {target} | {cells} | {other:.2f} |", flush=True)


def make_certificate(directory):
    """A self-signed certificate for localhost in a new `directory`: (cert, key) paths."""
    os.makedirs(directory)
    cert, key = f"{directory}/server.crt", f"{directory}/server.key"
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert])
    os.chmod(key, 0o600)
    return cert, key


class BackendWatcher:
    """Samples how many backend connections each of some logins has open, every 50 ms, until
    stopped."""

    def __init__(self, pg_port, password, logins):
        import threading
        import psycopg
        self.conn = psycopg.connect(f"host=127.0.0.1 port={pg_port} user=postgres "
                                    f"password={password} dbname=postgres", autocommit=True)
        self.logins, self.most, self.done = list(logins), {}, threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self):
        while not self.done.wait(0.05):
            for login, n in self.conn.execute(
                    "SELECT usename, count(*) FROM pg_stat_activity WHERE usename = ANY(%s) "
                    "GROUP BY usename", (self.logins,)).fetchall():
                self.most[login] = max(self.most.get(login, 0), n)

    def stop(self):
        self.done.set()
        self.thread.join()
        self.conn.close()
        return self.most


def nofile_limit():
    """The open-files limit to give the proxies: 65,536, or the hard limit if that is lower."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)


def raise_nofile():
    """Raises this process's soft open-files limit (children inherit it)."""
    import resource
    n = nofile_limit()
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))


def pgbouncer_command(ini):
    """PgBouncer as the postgres user with a high open-files limit. runuser's PAM session
    (pam_limits) sets the soft limit back to 1,024, too few for 1,000 clients, so the limit is
    raised by prlimit inside it, up to the hard limit, which runuser keeps."""
    n = nofile_limit()
    return as_postgres(["prlimit", f"--nofile={n}:{n}", "pgbouncer", ini])


def open_files_limit(pid):
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return line.split()[3]
    return "?"


def pgbouncer_pid(ini):
    for _ in range(50):
        out = subprocess.run(["pgrep", "-f", f"^pgbouncer {ini}"], capture_output=True, text=True).stdout
        if out.split():
            return int(out.split()[-1])
        time.sleep(0.1)
    sys.exit(f"no PgBouncer process for {ini}")


def start_cluster(bindir, work, pg_port, admin_password, max_connections):
    """initdb + start of a private cluster in work/data (SCRAM; superuser postgres)."""
    with open(f"{work}/pw", "w") as f:
        f.write(admin_password)
    if AS_ROOT:
        run(["chown", "-R", "postgres:postgres", work])
    run(as_postgres([f"{bindir}/initdb", "-D", f"{work}/data", "-U", "postgres",
                     "--auth=scram-sha-256", f"--pwfile={work}/pw", "-E", "UTF8", "--locale=C"]))
    run(as_postgres([f"{bindir}/pg_ctl", "-D", f"{work}/data", "-l", f"{work}/pg.log", "-w", "-o",
                     f"-p {pg_port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={work} "
                     f"-c max_connections={max_connections} -c shared_buffers=256MB "
                     "-c fsync=off -c synchronous_commit=off", "start"]))


def stop_cluster(bindir, work):
    subprocess.run(as_postgres([f"{bindir}/pg_ctl", "-D", f"{work}/data", "-m", "immediate", "stop"]),
                   capture_output=True)


def rolegate_config(rolegate, rg_port, pg_port, max_clients, pooled, tls=None):
    """rolegate's bench config: clients bench (app) and migrator, database bench. tls: None, or
    (cert, key) paths for `[tls] mode = "require"`."""
    verifier = lambda pw: run([rolegate, "hash-password"], input=pw).stdout.strip()
    tls_section = (f'mode = "require"\ncert = "{tls[0]}"\nkey = "{tls[1]}"' if tls else 'mode = "disable"')
    config = f"""listen = "127.0.0.1:{rg_port}"
[tls]
{tls_section}
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
max_client_connections = {max_clients}
"""
    if pooled:
        config += f'[pool]\nmode = "transaction"\nsize = {POOL_SIZE}\n'
    return config


def create_login(admin_url, login, password):
    """A login of its own for a proxy other than rolegate, so that each proxy's backend
    connections can be told apart in pg_stat_activity; it works as bench_owner."""
    import psycopg
    with psycopg.connect(admin_url.replace("dbname=postgres", "dbname=bench"), autocommit=True) as c:
        c.execute(f"DROP ROLE IF EXISTS {login}")
        c.execute(f"CREATE ROLE {login} LOGIN PASSWORD '{password}' IN ROLE bench_owner")
        c.execute(f"ALTER ROLE {login} SET role = bench_owner")


def pgbouncer_ini(work, name, pg_port, pb_port, login_password, pool_mode, max_client_conn, pool_size,
                  extra=""):
    """Writes work/name.ini (and work/userlist.txt: client bench, password bench)."""
    with open(f"{work}/userlist.txt", "w") as f:
        f.write('"bench" "bench"\n')
    path = f"{work}/{name}.ini"
    with open(path, "w") as f:
        f.write(f"""[databases]
bench = host=127.0.0.1 port={pg_port} dbname=bench user=bench_pgbouncer password={login_password}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {pb_port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {work}/userlist.txt
pool_mode = {pool_mode}
max_client_conn = {max_client_conn}
default_pool_size = {pool_size}
logfile = {work}/{name}.log
{extra}""")
    return path


def peers_available():
    """The peer poolers PEERS_DIR has (peers.sh and the binary)."""
    if not os.access(f"{PEERS_DIR}/peers.sh", os.X_OK):
        return []
    bin_dir = os.environ.get("PEERS_BIN", f"{PEERS_DIR}/bin")
    return [p for p in PEERS if os.access(f"{bin_dir}/{p}", os.X_OK)]


def start_peer(name, bindir, pg_port, port, login, password, peer_dir, admin_password, max_clients):
    """peers.sh start: the pooler in front of database bench, pool POOL_SIZE; returns its pid."""
    env = dict(os.environ, PG_BIN=bindir, PG_SUPERUSER="postgres", PG_SUPERPASS=admin_password,
               PEERS_MAX_CLIENTS=str(max_clients), PEERS_NOFILE=str(nofile_limit()),
               PEERS_LOG_LEVEL="warn")
    done = subprocess.run([f"{PEERS_DIR}/peers.sh", "start", name, str(pg_port), str(port), login, password,
                           "bench", str(POOL_SIZE), peer_dir], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{name} did not start:\n{done.stdout}{done.stderr}")
    print(done.stdout.strip(), file=sys.stderr)
    with open(f"{peer_dir}/{name}.pid") as f:
        return int(f.read().strip())


def stop_peer(name, peer_dir):
    subprocess.run([f"{PEERS_DIR}/peers.sh", "stop", name, peer_dir], capture_output=True)


def show_logs(work):
    """The last lines of every log in work (PostgreSQL's, the proxies'), to stderr: the temp
    dir is removed on the way out, so after a failure these are all that is left of it."""
    for path in sorted(glob.glob(f"{work}/*.log") + glob.glob(f"{work}/peers/*.log")):
        with open(path, errors="replace") as f:
            lines = f.readlines()[-15:]
        if lines:
            print(f"--- {path} (last {len(lines)} lines)\n{''.join(lines)}", file=sys.stderr)


def percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def log_transactions(prefix):
    """(completion time, latency ms) of every transaction in pgbench's per-transaction logs
    prefix.* (one per thread: client, transaction, latency in microseconds, script, then the
    completion time as epoch seconds and microseconds; failed or skipped transactions are
    left out); the files are deleted."""
    txs = []
    for path in glob.glob(f"{prefix}.*"):
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[2].isdigit():
                    txs.append((int(fields[4]) + int(fields[5]) / 1e6, int(fields[2]) / 1000))
        os.unlink(path)
    return txs


def open_sockets(pid):
    """How many sockets the process has open (0 once it is gone)."""
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
            except OSError:
                pass
    except OSError:
        pass
    return n


# Seconds pgbench took to connect its clients, by (target, clients): the next run's -T is
# DURATION plus that, so that every run measures about DURATION seconds.
CONNECT_SECONDS = {}


def timed_run(bindir, target, port, user, password, args, pid, log_prefix):
    """timed_run_once, run again (at most twice) when the logins took so long that the window
    was shorter than half of DURATION: the next -T allows for the time they took."""
    for attempt in range(3):
        measured = timed_run_once(bindir, target, port, user, password, args, pid, log_prefix,
                                  last=attempt == 2)
        if measured:
            return measured


def timed_run_once(bindir, target, port, user, password, args, pid, log_prefix, last):
    """One pgbench run; returns (TPS, mean latency ms, p50 ms, p99 ms, proxy CPU ms per tx, of
    which user, proxy context switches per 1,000 tx, the window's seconds, the seconds the
    logins took, the proxy's CPU ms per login).

    Everything is measured over a window that opens once pgbench has all its clients
    connected (it holds one socket per client) and closes 0.1 s before its -T ends: the
    transactions are those the per-transaction log says completed inside it, the proxy's CPU
    and context switches are read from /proc at both ends. Logging in (SCRAM, one PBKDF2 per
    login on each side unless a side keeps a verifier; 400 clients take seconds on a busy
    machine) is not in the numbers. With -C (a connection per transaction) the window is
    the whole run and the logins are in."""
    clients = int(args[args.index("-c") + 1])
    per_connection = "-C" in args
    # pgbench's -T is whole seconds and counts from before the logins.
    duration = DURATION if per_connection else \
        math.ceil(DURATION + CONNECT_SECONDS.get((target, clients), 0.5 + 0.01 * clients))
    cpu_launch = cpu_seconds(pid) if pid else None
    proc = subprocess.Popen([f"{bindir}/pgbench", "-n", "-T", str(duration),
                             "-h", "127.0.0.1", "-p", str(port), "-U", user, "-l", f"--log-prefix={log_prefix}",
                             *args, "bench"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PGPASSWORD=password))
    launched = time.time()
    if not per_connection:
        while proc.poll() is None and open_sockets(proc.pid) < clients:
            time.sleep(0.02)
    start = time.time()
    cpu_start = cpu_seconds(pid) if pid else None
    switches_start = context_switches(pid) if pid else None
    connect = start - launched
    if not per_connection:
        CONNECT_SECONDS[(target, clients)] = max(CONNECT_SECONDS.get((target, clients), 0), connect * 1.2 + 0.3)
    end = launched + duration - 0.1
    while proc.poll() is None and time.time() < end:
        time.sleep(min(0.1, max(0.0, end - time.time())))
    end = min(end, time.time())
    cpu_end = cpu_seconds(pid) if pid else None
    switches_end = context_switches(pid) if pid else None
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"pgbench against {target} ({' '.join(args)}) exited {proc.returncode}:\n{out}{err}")
    txs = log_transactions(log_prefix)
    latencies = sorted(lat for done, lat in txs if start <= done <= end)
    window = end - start
    if not latencies or window < DURATION / 2:
        print(f"{target} {' '.join(args)}: the window was {window:.2f} s after {connect:.2f} s of logins "
              f"({len(latencies)} transactions in it){'' if last else '; again'}", file=sys.stderr)
        if not last:
            return None
        if not latencies or window <= 0:
            sys.exit(f"pgbench against {target} ({' '.join(args)}): no transaction completed in the window")
    n = len(latencies)
    cpu = user = switches = None
    if pid:
        user = (cpu_end[0] - cpu_start[0]) / n * 1000
        cpu = user + (cpu_end[1] - cpu_start[1]) / n * 1000
        switches = (switches_end - switches_start) / n * 1000
    login_cpu = (sum(cpu_start) - sum(cpu_launch)) / clients * 1000 if pid and not per_connection else None
    return (n / window, sum(latencies) / n, percentile(latencies, 0.50), percentile(latencies, 0.99),
            cpu, user, switches, window, None if per_connection else connect, login_cpu)


def pgbench_scenarios():
    if not POOLED:
        return [
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
    scenarios = []
    for n in CLIENT_COUNTS:
        c = ["-c", str(n), "-j", "2"]
        scenarios += [
            (f"select simple c{n}", ["-S", "-M", "simple", *c]),
            (f"select extended c{n}", ["-S", "-M", "extended", *c]),
            (f"select prepared c{n}", ["-S", "-M", "prepared", *c]),
            (f"tpcb-like extended c{n}", ["-b", "tpcb-like", "-M", "extended", *c]),
        ]
    return scenarios


def main():
    bindir = pg_bin()
    if shutil.which("pgbouncer") is None:
        print("installing pgbouncer from the distribution", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq", "pgbouncer"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    raise_nofile()
    wanted_targets = os.environ.get("TARGETS")
    wanted_targets = wanted_targets.split(",") if wanted_targets else None
    peers = [p for p in peers_available() if wanted_targets is None or p in wanted_targets] \
        if POOLED and not CALLGRIND else []
    most_clients = max(IDLE_CLIENTS, *CLIENT_COUNTS) + 100
    work = tempfile.mkdtemp(prefix="rolegate-bench-")
    os.chmod(work, 0o755)
    peer_dir = f"{work}/peers"
    procs, started_peers = [], []
    try:
        pg_port, rg_port, pb_port, bare_port, base_port = (free_port() for _ in range(5))
        admin_password = "bench-admin"
        start_cluster(bindir, work, pg_port, admin_password,
                      100 + POOL_SIZE * len(peers) if POOLED else IDLE_CLIENTS + 100)
        rolegate = f"{ROOT}/target/release/rolegate"
        tls = None
        if CLIENT_TLS:
            tls = make_certificate(f"{work}/tls")
            os.environ["PGSSLMODE"] = "prefer"
        config = rolegate_config(rolegate, rg_port, pg_port, most_clients, POOLED, tls)
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

        # PgBouncer (and each peer) logs in as a login of its own, so that the backend
        # connections of each proxy can be told apart in pg_stat_activity.
        create_login(admin_url, "bench_pgbouncer", login_password)
        ini = pgbouncer_ini(work, "pgbouncer", pg_port, pb_port, login_password,
                            "transaction" if POOLED else "session", most_clients,
                            POOL_SIZE if POOLED else 100)
        if AS_ROOT:
            # Not the running cluster's data directory: its temporary WAL files can vanish
            # mid-walk (chown then fails), and initdb made it postgres's already.
            entries = [f"{work}/{e}" for e in os.listdir(work) if e != "data"]
            run(["chown", "postgres:postgres", work])
            run(["chown", "-R", "postgres:postgres", *entries])
        pb = subprocess.Popen(pgbouncer_command(ini), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(pb)
        wait_port(pb_port)
        pb_pid = pgbouncer_pid(ini)
        print(f"pgbouncer pid {pb_pid}: open files limit {open_files_limit(pb_pid)}", file=sys.stderr)
        bare = subprocess.Popen([f"{ROOT}/target/release/examples/bare_relay",
                                 f"127.0.0.1:{bare_port}", f"127.0.0.1:{pg_port}"])
        procs.append(bare)
        wait_port(bare_port)
        if BASELINE:
            base_listen = f'listen = "127.0.0.1:{base_port}"'
            if BASELINE_THREADS:
                base_listen += f"\nthreads = {BASELINE_THREADS}"
            if BASELINE_RUNTIME:
                base_listen += f'\nruntime = "{BASELINE_RUNTIME}"'
            with open(f"{work}/baseline.toml", "w") as f:
                f.write(config.replace(f'listen = "127.0.0.1:{rg_port}"', base_listen))
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
        # The backend login each pooler's connections use.
        logins = {"rolegate": "bench_login_0001", "baseline": "bench_login_0001",
                  "pgbouncer": "bench_pgbouncer"}
        for peer in peers:
            login = f"bench_{peer}"
            create_login(admin_url, login, login_password)
            port = free_port()
            started_peers.append(peer)
            pid = start_peer(peer, bindir, pg_port, port, login, login_password, peer_dir, admin_password,
                             most_clients)
            print(f"{peer} pid {pid}: open files limit {open_files_limit(pid)}", file=sys.stderr)
            targets[peer] = (port, login, login_password, pid)
            logins[peer] = login
        if CALLGRIND:
            count_instructions(bindir, work, config, pg_port, login_password,
                               f'listen = "127.0.0.1:{rg_port}"')
            return
        if SYSCALLS:
            counted = {t: v for t, v in targets.items() if t != "direct"
                       and (not POOLED or t != "bare relay")
                       and (wanted_targets is None or t in wanted_targets)}
            for clients in (CLIENT_COUNTS if POOLED else [20]):
                count_syscalls(bindir, counted, clients)
            return
        scenarios = pgbench_scenarios()
        if POOLED:
            targets = {t: v for t, v in targets.items() if t in ("rolegate", "pgbouncer", "baseline", *PEERS)}
        wanted = os.environ.get("SCENARIOS")
        if wanted:
            scenarios = [s for s in scenarios if s[0] in wanted.split(",")]
        if wanted_targets:
            targets = {t: v for t, v in targets.items() if t in wanted_targets}

        results = {}
        most_backends = {}
        log_prefix = f"{work}/txlog"
        for name, args in scenarios:
            for _ in range(ROUNDS):
                for target, (port, user, password, pid) in targets.items():
                    if POOLED and target == "pgbouncer" and "-M prepared" in " ".join(args):
                        continue  # PgBouncer 1.18 cannot pool prepared statements
                    watcher = None
                    if POOLED:
                        watcher = BackendWatcher(pg_port, admin_password, [logins[target]])
                    try:
                        measured = timed_run(bindir, target, port, user, password, args, pid, log_prefix)
                    finally:
                        if watcher:
                            seen = watcher.stop().get(logins[target], 0)
                            most_backends[target] = max(most_backends.get(target, 0), seen)
                    results.setdefault((name, target), []).append(measured)

        print(f"\npgbench, {DURATION}s x {ROUNDS} rounds per cell (median), scale {SCALE}, "
              f"{os.cpu_count()} cores, PostgreSQL {os.path.basename(os.path.dirname(bindir))}\n")
        header = ("| scenario | target | TPS | latency ms | p50 ms | p99 ms | proxy CPU s / 1k tx | of which user "
                  "| proxy context switches / 1k tx | vs PgBouncer | CPU vs PgBouncer | vs direct |")
        print(header)
        print("|" + "---|" * header.count(" | ") + "---|")
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"
        for name, _ in scenarios:
            med = {t: tuple(statistics.median(x[i] for x in results[(name, t)] if x[i] is not None)
                            if any(x[i] is not None for x in results[(name, t)]) else None
                            for i in range(10)) for t in targets if (name, t) in results}
            pb_med = med.get("pgbouncer")
            for t in med:
                tps, lat, p50, p99, cpu, user, switches = med[t][:7]
                vs_pb = f"{tps / pb_med[0]:.2f}x" if t in POOLERS and pb_med else ""
                cpu_vs_pb = (f"{cpu / pb_med[4]:.2f}x"
                             if t in POOLERS and pb_med and cpu is not None and pb_med[4] else "")
                vs_direct = f"{tps / med['direct'][0]:.2f}x" if t != "direct" and "direct" in med else ""
                print(f"| {name} | {t} | {tps:,.0f} | {lat:.3f} | {fmt(p50, '.3f')} | {fmt(p99, '.3f')} "
                      f"| {fmt(cpu, '.4f')} | {fmt(user, '.4f')} | {fmt(switches, ',.0f')} "
                      f"| {vs_pb} | {cpu_vs_pb} | {vs_direct} |")

        # What the logins cost, out of the window: per (client count, target), medians.
        logins = {}
        for (name, t), runs in results.items():
            count = name.rsplit(" c", 1)[-1].split()[0]
            if runs[0][8] is not None:
                logins.setdefault((count, t), []).extend(runs)
        if logins and POOLED:
            print("\nlogins before each window (medians over the runs): seconds pgbench took to connect "
                  "its clients, the proxy's CPU in that time per login (an upper bound: one pgbench "
                  "thread's clients may start their transactions while the other's still log in)\n")
            print("| clients | target | logins s | proxy CPU ms / login |")
            print("|---|---|---|---|")
            for (count, t), runs in logins.items():
                cpu = [r[9] for r in runs if r[9] is not None]
                print(f"| {count} | {t} | {statistics.median(r[8] for r in runs):.2f} "
                      f"| {fmt(statistics.median(cpu) if cpu else None, '.3f')} |")

        if POOLED:
            seen = ", ".join(f"{t} {n}" for t, n in most_backends.items())
            print(f"\nmost backend connections of each pooler's login during its runs: {seen} "
                  f"(pool size {POOL_SIZE}; clients {','.join(map(str, CLIENT_COUNTS))})")
            if "baseline" in targets:
                print("(rolegate and baseline log in as the same role: their count is both pools)")
        # Memory of idle authenticated clients, after the runs (benches/idle_memory.py
        # measures a fresh process).
        if "rolegate" not in targets or IDLE_CLIENTS <= 0:  # IDLE_CLIENTS=0: no idle measurement
            return
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
    except BaseException:
        show_logs(work)
        raise
    finally:
        for peer in started_peers:
            stop_peer(peer, peer_dir)
        stop_all(procs, timeout=10)
        stop_cluster(bindir, work)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
