"""A client whose client_encoding is not UTF8: a LATIN9 client's statements are judged as
the server reads them (a DDL with non-ASCII letters is refused as DDL, reads with them
work and come back right); an encoding whose characters can hide ASCII bytes (SJIS) is
refused where it is set, at SET and at startup, with SQLSTATE 0A000.
Usage: encodings.py CONNINFO   (an app client)"""
import sys

import psycopg

conninfo = sys.argv[1]


def check(got, want, what):
    if got != want:
        sys.exit(f"encodings: {what}: got {got!r}, expected {want!r}")


with psycopg.connect(conninfo, autocommit=True) as conn:
    conn.execute("SET client_encoding TO 'LATIN9'")
    check(conn.info.encoding, "iso8859-15", "psycopg's encoding after SET")
    # Both protocols: psycopg sends the text in LATIN9 bytes (é is one byte, 0xE9).
    check(conn.execute("SELECT 'café €' AS \"naïve\"").fetchone()[0], "café €", "simple")
    check(conn.execute("SELECT %s::text || 'é'", ("ça",)).fetchone()[0], "çaé", "extended")
    for sql in ("CREATE TABLE café (a int)", "SELECT 'é'; DROP TABLE IF EXISTS t"):
        try:
            conn.execute(sql)
            sys.exit(f"encodings: {sql!r} was not refused")
        except psycopg.errors.InsufficientPrivilege as e:
            if "rolegate:" not in str(e):
                sys.exit(f"encodings: {sql!r} refused by the server, not rolegate: {e}")
    check(conn.execute("SELECT current_setting('client_encoding')").fetchone()[0], "LATIN9",
          "client_encoding")
    try:
        conn.execute("SET client_encoding TO 'SJIS'")
        sys.exit("encodings: SET client_encoding TO 'SJIS' was accepted")
    except psycopg.errors.FeatureNotSupported as e:
        check("client_encoding" in str(e), True, f"the refusal names the setting: {e}")
    check(conn.execute("SELECT current_setting('client_encoding')").fetchone()[0], "LATIN9",
          "client_encoding after the refused SET")
    conn.execute("RESET client_encoding")

try:
    psycopg.connect(conninfo + " client_encoding=SJIS").close()
    sys.exit("encodings: a startup client_encoding=SJIS was accepted")
except psycopg.OperationalError as e:
    check("client_encoding" in str(e) and "SJIS" in str(e), True, f"startup refusal: {e}")
print("ok")
