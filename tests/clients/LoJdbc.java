/*
 * pgjdbc large objects through the Blob API (pgjdbc's LargeObjectManager, whose lo_* calls
 * travel as FunctionCall messages). Expects a table docs (id int primary key, data oid).
 * Autocommit off: inserts a row with setBlob(InputStream) of 100000 bytes, commits, reads it
 * back with getBlob and compares, then deletes the row and unlinks the LO, commits.
 * Prints "ok <bytes>".
 * Usage: java -cp /usr/share/java/postgresql.jar LoJdbc.java JDBC_URL USER PASSWORD
 *   e.g. jdbc:postgresql://127.0.0.1:5432/db?sslmode=disable
 */
import java.io.ByteArrayInputStream;
import java.io.InputStream;
import java.sql.Blob;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.util.Arrays;

import org.postgresql.PGConnection;

public class LoJdbc {
    static void check(boolean ok, String what) {
        if (!ok) {
            System.err.println("LoJdbc: " + what);
            System.exit(1);
        }
    }

    public static void main(String[] args) throws Exception {
        int size = 100000;
        byte[] pattern = new byte[size];
        for (int i = 0; i < size; i++) {
            pattern[i] = (byte) (i * 7 + i / 251);
        }
        // The process id keeps concurrent or leftover runs from colliding on the key.
        int id = (int) (ProcessHandle.current().pid() % 1000000000L);

        try (Connection conn = DriverManager.getConnection(args[0], args[1], args[2])) {
            conn.setAutoCommit(false);
            try (PreparedStatement ins = conn.prepareStatement("INSERT INTO docs (id, data) VALUES (?, ?)")) {
                ins.setInt(1, id);
                ins.setBlob(2, new ByteArrayInputStream(pattern));
                check(ins.executeUpdate() == 1, "insert did not insert one row");
            }
            conn.commit();

            long oid;
            try (PreparedStatement sel = conn.prepareStatement("SELECT data FROM docs WHERE id = ?")) {
                sel.setInt(1, id);
                try (ResultSet rs = sel.executeQuery()) {
                    check(rs.next(), "row " + id + " not found");
                    oid = rs.getLong(1);
                    Blob blob = rs.getBlob(1);
                    check(blob.length() == size, "blob length " + blob.length() + ", expected " + size);
                    byte[] got;
                    try (InputStream in = blob.getBinaryStream()) {
                        got = in.readAllBytes();
                    }
                    check(got.length == size, "read " + got.length + " bytes, expected " + size);
                    check(Arrays.equals(got, pattern), "blob contents differ");
                    blob.free();
                }
            }
            conn.commit();

            try (PreparedStatement del = conn.prepareStatement("DELETE FROM docs WHERE id = ?")) {
                del.setInt(1, id);
                check(del.executeUpdate() == 1, "delete did not delete one row");
            }
            conn.unwrap(PGConnection.class).getLargeObjectAPI().delete(oid);
            conn.commit();
            System.out.println("ok " + size);
        }
    }
}
