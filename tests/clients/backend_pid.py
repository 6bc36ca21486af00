"""The process id a driver reports is the backend's own: pg_backend_pid() agrees, a
notification carries the notifier's, and pg_terminate_backend of it ends that very
session. Usage: backend_pid.py VICTIM_CONNINFO KILLER_CONNINFO
(the killer's role needs pg_signal_backend)"""
import sys

import psycopg

victim_info, killer_info = sys.argv[1:3]


def check(got, want, what):
    if got != want:
        sys.exit(f"backend_pid: {what}: got {got!r}, expected {want!r}")


with psycopg.connect(victim_info, autocommit=True) as listener, \
        psycopg.connect(killer_info, autocommit=True) as killer:
    reported = listener.info.backend_pid
    check(listener.execute("SELECT pg_backend_pid()").fetchone()[0], reported,
          "pg_backend_pid() of the listener")
    check(killer.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                         (reported,)).fetchone()[0], 1, "pg_stat_activity rows for it")

    listener.execute("LISTEN pid_check")
    killer.execute("NOTIFY pid_check, 'hello'")
    notification = next(listener.notifies(timeout=10, stop_after=1), None)
    if notification is None:
        sys.exit("backend_pid: no notification arrived")
    check(notification.pid, killer.info.backend_pid, "the notification's pid")
    check(notification.payload, "hello", "the notification's payload")

    check(killer.execute("SELECT pg_terminate_backend(%s)", (reported,)).fetchone()[0],
          True, "pg_terminate_backend")
    try:
        listener.execute("SELECT 1")
        sys.exit("backend_pid: the terminated session still answers")
    except psycopg.OperationalError:
        pass
    check(killer.execute("SELECT 1").fetchone()[0], 1, "the killer's own session")
print("ok")
