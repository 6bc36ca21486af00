// pgjdbc in transaction mode: THREADS connections at once with prepareThreshold=1, so
// every PreparedStatement becomes a named server-side statement after its first use;
// each connection keeps its own TimeZone. Prints "ok".
// Usage: java -cp postgresql.jar PooledJdbc.java JDBC_URL USER PASSWORD THREADS
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;

public class PooledJdbc {
    public static void main(String[] args) throws Exception {
        String url = args[0] + (args[0].contains("?") ? "&" : "?") + "prepareThreshold=1";
        int threads = Integer.parseInt(args[3]);
        ExecutorService pool = Executors.newFixedThreadPool(threads);
        List<Future<?>> done = new ArrayList<>();
        for (int t = 0; t < threads; t++) {
            final int i = t;
            done.add(pool.submit(() -> {
                try (Connection c = DriverManager.getConnection(url, args[1], args[2])) {
                    String zone = "Etc/GMT+" + (i % 12);
                    try (Statement s = c.createStatement()) {
                        s.execute("SET TimeZone = '" + zone + "'");
                    }
                    try (PreparedStatement ps = c.prepareStatement(
                            "SELECT ?::int + 10, current_setting('TimeZone')")) {
                        for (int round = 0; round < 20; round++) {
                            ps.setInt(1, round);
                            try (ResultSet rs = ps.executeQuery()) {
                                rs.next();
                                if (rs.getInt(1) != round + 10 || !rs.getString(2).equals(zone)) {
                                    throw new IllegalStateException("connection " + i + " round " + round
                                        + ": got " + rs.getInt(1) + " " + rs.getString(2));
                                }
                            }
                        }
                    }
                    return null;
                }
            }));
        }
        for (Future<?> f : done) {
            f.get();
        }
        pool.shutdown();
        System.out.println("ok");
    }
}
