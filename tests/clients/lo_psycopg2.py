"""psycopg2 large objects (conn.lobject: libpq's lo_* calls, which travel as FunctionCall
messages). Usage: lo_psycopg2.py CONNINFO MODE [OID]
  rw                  create an LO, write/seek/tell/read 200000 bytes, commit, reopen 'rb'
                      and compare, unlink, commit, check it is gone; prints "ok <oid>"
  read OID            read LO OID with mode 'rb'; prints "ok <length>"
  write-refused OID   opening OID for writing and creating a new LO must both fail with
                      SQLSTATE 42501; prints "ok refused"

libpq's lo_* functions drop the error's PGresult, so psycopg2's pgcode is None for them;
the SQLSTATE is read from the message after switching libpq to verbose errors."""
import ctypes
import re
import sys

import psycopg2
import psycopg2._psycopg

conninfo, mode = sys.argv[1:3]
SIZE = 200000
PATTERN = bytes((i * 7 + i // 251) % 256 for i in range(SIZE))


def fail(msg):
    print(f"lo_psycopg2 {mode}: {msg}", file=sys.stderr)
    sys.exit(1)


def sqlstate(err):
    """The error's SQLSTATE: pgcode, or the code in a verbose libpq message."""
    if err.pgcode:
        return err.pgcode
    m = re.match(r"\w+:  ([0-9A-Z]{5}): ", str(err))
    return m.group(1) if m else None


def expect_error(code, what, action):
    try:
        action()
    except psycopg2.Error as e:
        got = sqlstate(e)
        if got != code:
            fail(f"{what}: expected SQLSTATE {code}, got {got}: {str(e).strip()!r}")
        conn.rollback()
        return
    fail(f"{what}: did not fail (expected SQLSTATE {code})")


conn = psycopg2.connect(conninfo)
# PQsetErrorVerbosity(conn, PQERRORS_VERBOSE): messages become "ERROR:  42501: ...".
# dlsym on the extension module also searches the libpq it links (bundled or system).
libpq = ctypes.CDLL(psycopg2._psycopg.__file__)
libpq.PQsetErrorVerbosity.argtypes = [ctypes.c_void_p, ctypes.c_int]
libpq.PQsetErrorVerbosity(conn.pgconn_ptr, 2)

if mode == "rw":
    lobj = conn.lobject(0, "rwb")
    oid = lobj.oid
    if lobj.write(PATTERN) != SIZE:
        fail("short write")
    if lobj.tell() != SIZE:
        fail(f"tell after write: {lobj.tell()}")
    if lobj.seek(1000) != 1000 or lobj.read(10) != PATTERN[1000:1010] or lobj.tell() != 1010:
        fail("seek(1000)/read(10)/tell mismatch")
    if lobj.seek(-10, 2) != SIZE - 10 or lobj.read() != PATTERN[-10:]:
        fail("seek from end mismatch")
    if lobj.seek(0) != 0:
        fail("seek(0)")
    if lobj.read() != PATTERN:
        fail("read back in the writing transaction differs")
    lobj.close()
    conn.commit()

    lobj = conn.lobject(oid, "rb")
    got = lobj.read()
    if got != PATTERN:
        fail(f"read back after commit differs ({len(got)} bytes)")
    lobj.close()
    conn.commit()

    conn.lobject(oid, "rb").unlink()
    conn.commit()
    expect_error("42704", f"opening unlinked LO {oid}", lambda: conn.lobject(oid, "rb"))
    print(f"ok {oid}")
elif mode == "read":
    oid = int(sys.argv[3])
    lobj = conn.lobject(oid, "rb")
    data = lobj.read()
    lobj.close()
    conn.rollback()
    print(f"ok {len(data)}")
elif mode == "write-refused":
    oid = int(sys.argv[3])

    def write_existing():
        conn.lobject(oid, "wb").write(b"rolegate")

    expect_error("42501", f"writing LO {oid}", write_existing)
    expect_error("42501", "creating a new LO", lambda: conn.lobject(0, "wb"))
    print("ok refused")
else:
    fail("MODE must be rw, read or write-refused")
conn.close()
