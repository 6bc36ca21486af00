//! What an on-call engineer relies on: the admin endpoint, SIGHUP, SIGTERM, timeouts.

mod support;

use std::time::Duration;

use support::*;

async fn with_admin(db: &TestDb, extra: &str) -> (Rolegate, u16) {
    with_admin_and(db, "", extra).await
}

/// [`with_admin`] with more top-level keys.
async fn with_admin_and(db: &TestDb, top: &str, extra: &str) -> (Rolegate, u16) {
    let admin_port = free_port();
    let rg = Rolegate::start_with(
        db,
        Options {
            top: format!("admin_listen = \"127.0.0.1:{admin_port}\"\n{top}"),
            extra: extra.to_owned(),
            ..Options::default()
        },
    )
    .await;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", admin_port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (rg, admin_port)
}

fn signal(rg: &Rolegate, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &rg.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_status_move_with_the_traffic() {
    let db = TestDb::create("metrics").await;
    let (rg, admin_port) = with_admin(&db, "").await;
    let (status, body) = http_get(admin_port, "/healthz").await;
    assert!(status.contains("200"), "{status} {body}");

    let web = rg.client("web", &db).await;
    for _ in 0..5 {
        web.query_one("SELECT 1", &[]).await.unwrap();
    }
    assert!(web.batch_execute("CREATE TABLE t (id int)").await.is_err());
    assert!(connect_url(&rg.url("web", "wrong", &db.name))
        .await
        .is_err());

    let (status, text) = http_get(admin_port, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    assert!(metric(&text, "rolegate_queries_total") >= 5.0);
    assert_eq!(
        metric(
            &text,
            "rolegate_refusals_total{class=\"app\",kind=\"CREATE TABLE\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "rolegate_auth_failures_total"), 1.0);
    assert_eq!(
        metric(&text, "rolegate_client_sessions{class=\"app\"}"),
        1.0
    );
    assert!(
        metric(
            &text,
            "rolegate_bytes_total{direction=\"server_to_client\"}"
        ) > 0.0
    );

    // Session mode times its backend logins too, labelled like a transaction-mode pool.
    let connects: f64 = text
        .lines()
        .filter(|l| l.starts_with("rolegate_pool_backend_connect_seconds_count{pool="))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(connects, 1.0, "{text}");

    let (_, status_json) = http_get(admin_port, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status_json).unwrap();
    assert_eq!(status["login_role"], db.login.as_str());
    assert!(!status_json.contains(LOGIN_PASSWORD));
    drop(web);
}

/// The series names a Prometheus query can use for each family rolegate exports, read
/// off `# TYPE` lines: a counter's samples end in `_total`, a histogram's in `_bucket`,
/// `_sum` and `_count`.
fn exported_series(text: &str) -> std::collections::BTreeMap<String, String> {
    let mut series = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (family, kind) = rest.split_once(' ').unwrap();
        let names: Vec<String> = match kind {
            "counter" => vec![format!("{family}_total")],
            "histogram" => ["bucket", "sum", "count"]
                .iter()
                .map(|suffix| format!("{family}_{suffix}"))
                .collect(),
            _ => vec![family.to_owned()],
        };
        for name in names {
            series.insert(name, family.to_owned());
        }
    }
    series
}

/// Every `rolegate_…` name in a PromQL text.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("rolegate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// deploy/grafana/rolegate.json: every query (panels and variables) names a series a
/// transaction-mode rolegate really exports, and every family it exports has a panel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_metrics_rolegate_exports() {
    let db = TestDb::create("dashboard").await;
    let (rg, admin_port) = with_admin(&db, "[pool]\nmode = \"transaction\"\nsize = 2\n").await;
    let web = rg.client("web", &db).await;
    web.query_one("SELECT 1", &[]).await.unwrap();
    let (_, text) = http_get(admin_port, "/metrics").await;
    let exported = exported_series(&text);
    // The histograms are there with samples, not only declared.
    for histogram in [
        "transaction_seconds",
        "checkout_wait_seconds",
        "backend_connect_seconds",
    ] {
        let count = format!("rolegate_pool_{histogram}_count{{pool=");
        assert!(
            text.lines().any(|l| l.starts_with(&count)),
            "{count}\n{text}"
        );
    }

    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/rolegate.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id {panel}"
        );
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{target}");
            queries.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"]["query"].as_str() {
            queries.push(query.to_owned());
        }
    }
    let mut shown = std::collections::BTreeSet::new();
    for query in &queries {
        let names = metric_names(query);
        assert!(
            !names.is_empty(),
            "a query without a rolegate metric: {query}"
        );
        for name in names {
            let family = exported
                .get(&name)
                .unwrap_or_else(|| panic!("{name} (in {query}) is not exported:\n{text}"));
            shown.insert(family.clone());
        }
    }
    let families: std::collections::BTreeSet<_> = exported.values().cloned().collect();
    let missing: Vec<_> = families.difference(&shown).collect();
    assert!(missing.is_empty(), "no panel shows {missing:?}");
    drop(web);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_client_without_dropping_a_session_and_refuses_a_bad_config() {
    let db = TestDb::create("sighup").await;
    let rg = Rolegate::start(&db).await;
    let open = rg.client("web", &db).await;
    let config_path = rg.config_path();
    let config = std::fs::read_to_string(&config_path).unwrap();
    let added = format!(
        "{config}\n[[clients]]\nuser = \"newcomer\"\npassword = \"{}\"\nclass = \"app\"\n",
        rolegate::scram::make_verifier("newcomer-pw")
    );
    std::fs::write(&config_path, &added).unwrap();
    signal(&rg, "HUP");
    let url = rg.url("newcomer", "newcomer-pw", &db.name);
    let mut admitted = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if connect_url(&url).await.is_ok() {
            admitted = true;
            break;
        }
    }
    assert!(admitted, "the new client was not let in: {}", rg.log_text());
    open.query_one("SELECT 1", &[])
        .await
        .expect("the open session survives SIGHUP");

    // A broken config is refused; the old one stays in force.
    std::fs::write(&config_path, "this is not toml [").unwrap();
    signal(&rg, "HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        rg.log_text().contains("new config refused"),
        "{}",
        rg.log_text()
    );
    connect_url(&url)
        .await
        .expect("the old config stays in force");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_transaction_commit() {
    sigterm_lets_running_transactions_commit("sigterm", "", "", 1).await;
}

/// The same with a runtime per thread in transaction mode: the transactions are spread
/// over both threads (8 clients all on one listener: once in 128 runs), and every one
/// commits before rolegate exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_transactions_commit_on_every_thread() {
    sigterm_lets_running_transactions_commit(
        "sigterm_per_thread",
        "threads = 2\nruntime = \"per_thread\"\n",
        "[pool]\nmode = \"transaction\"\nsize = 16\n",
        8,
    )
    .await;
}

async fn sigterm_lets_running_transactions_commit(
    db_name: &str,
    top: &str,
    pool: &str,
    clients: i32,
) {
    let db = TestDb::create(db_name).await;
    let (mut rg, admin_port) = with_admin_and(
        &db,
        top,
        &format!("{pool}[limits]\nshutdown_timeout = \"20s\"\n"),
    )
    .await;
    rg.client("migrate", &db)
        .await
        .batch_execute("CREATE TABLE done (id int)")
        .await
        .unwrap();
    let mut open = Vec::new();
    for i in 0..clients {
        let web = rg.client("web", &db).await;
        web.batch_execute(&format!("BEGIN; INSERT INTO done VALUES ({i})"))
            .await
            .unwrap();
        open.push(web);
    }
    signal(&rg, "TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New clients are no longer accepted…
    assert!(connect_url(&rg.url("web", "web-pw", &db.name))
        .await
        .is_err());
    // While it drains it is alive but no longer ready for new traffic.
    let (status, body) = http_get(admin_port, "/readyz").await;
    assert!(
        status.contains("503") && body.contains("shutting down"),
        "{status} {body}"
    );
    let (status, _) = http_get(admin_port, "/livez").await;
    assert!(status.contains("200"), "{status}");
    // …but the open transactions finish.
    for (i, web) in (0..).zip(&open) {
        web.batch_execute(&format!("INSERT INTO done VALUES ({}); COMMIT", i + 100))
            .await
            .unwrap();
    }
    let n: i64 = admin(&db.name)
        .await
        .query_one("SELECT count(*) FROM done", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2 * i64::from(clients));
    // Then the sessions end and rolegate exits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for web in &open {
        assert!(web.query_one("SELECT 1", &[]).await.is_err());
    }
    let mut exited = false;
    for _ in 0..50 {
        if rg.has_exited() {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(exited, "rolegate did not exit after SIGTERM");
}

/// A client that stops reading while notifications stream to it, then reads again
/// after SIGTERM, gets whole frames and then the FATAL that says why (or, when the
/// server's own frame was still coming, the end of the stream), never the FATAL in the
/// middle of a notification that shutdown cut off (session and transaction mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_a_cut_frame_before_its_fatal() {
    for (name, extra) in [
        ("sigterm_cut_session", ""),
        (
            "sigterm_cut_pooled",
            "[pool]\nmode = \"transaction\"\nsize = 2\n",
        ),
    ] {
        let db = TestDb::create(name).await;
        let rg = Rolegate::start_with(
            &db,
            Options {
                extra: extra.to_owned(),
                ..Options::default()
            },
        )
        .await;
        // (A receive buffer of its own size: the kernel would grow it to hold all.)
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 * 1024).unwrap();
        let mut stream = socket
            .connect(([127, 0, 0, 1], rg.port).into())
            .await
            .unwrap();
        login_over(&mut stream, "web", password_of("web"), &db.name).await;
        let mut client = RawClient { stream };
        let mut out = bytes::BytesMut::new();
        rolegate::wire::put_query(&mut out, "LISTEN cut");
        client.send(&out).await;
        let (_, errors) = client.until_ready().await;
        assert!(errors.is_empty(), "{errors:?}");
        // ~16 MB of notifications (each its own: PostgreSQL folds equal ones): more than the sockets between here and rolegate
        // hold, so rolegate is in the middle of a write when it shuts down.
        admin(&db.name)
            .await
            .batch_execute(
                "SELECT pg_notify('cut', lpad(g::text, 7900, 'x')) FROM generate_series(1, 2000) g",
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        signal(&rg, "TERM");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut stream = Vec::new();
        let read = tokio::io::AsyncReadExt::read_to_end(&mut client.stream, &mut stream);
        tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .expect("rolegate closed the connection")
            .expect("the stream ended cleanly");
        // (A notification's body: the process id, the channel, the payload.)
        let is_notification = |body: &[u8], whole: bool| {
            let channel = body.get(4..).unwrap_or_default();
            let payload = channel.get(4..).unwrap_or_default();
            let text = payload
                .strip_suffix(b"\0")
                .filter(|_| whole)
                .unwrap_or(payload);
            b"cut\0".starts_with(&channel[..channel.len().min(4)])
                && text.iter().all(|&b| b == b'x' || b.is_ascii_digit())
                && (!whole || text.len() == 7900)
        };
        let mut rest = &stream[..];
        let mut notifications = 0;
        let mut last = None;
        while !rest.is_empty() {
            assert!(last.is_none(), "{name}: bytes after the FATAL");
            let (tag, len) = match rest {
                [tag, a, b, c, d, ..] => (*tag, i32::from_be_bytes([*a, *b, *c, *d]) as usize),
                // (The server's frame ended in its header.)
                [b'A', ..] => break,
                _ => panic!("{name}: {rest:?} at the end"),
            };
            let whole = len < rest.len();
            let body = &rest[5.min(rest.len())..(len + 1).min(rest.len())];
            match tag {
                b'A' if len == 4 + 4 + 7900 + 1 + 4 && is_notification(body, whole) => {
                    if !whole {
                        // The server's frame, forwarded as it came, ends partway: then
                        // the stream just ends (the client reads a lost connection).
                        last = Some(None);
                        break;
                    }
                    notifications += 1;
                }
                b'E' if whole => last = Some(Some(rolegate::wire::error_fields(body))),
                _ => panic!(
                    "{name}: not a frame after {notifications} notifications: tag {tag}, length {len}, {} bytes left: {:?}",
                    rest.len(),
                    String::from_utf8_lossy(&rest[..rest.len().min(64)])
                ),
            }
            rest = &rest[(len + 1).min(rest.len())..];
        }
        assert!(notifications > 0, "{name}");
        if let Some(Some(fatal)) = last {
            assert_eq!(rolegate::wire::field(&fatal, b'C'), Some("57P01"), "{name}");
        }
    }
}

/// With a runtime per thread the listeners share their port (`SO_REUSEPORT`); a second
/// rolegate started on the same address must still fail as a plain bind does, not
/// silently take a share of the clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_rolegate_on_the_same_address_is_refused_with_a_runtime_per_thread() {
    let db = TestDb::create("per_thread_twice").await;
    let options = Options {
        top: "threads = 2\nruntime = \"per_thread\"\n".into(),
        ..Options::default()
    };
    let rg = Rolegate::start_with(&db, options).await;
    let config = rg.config_path();
    let args = ["serve", "--config", config.to_str().unwrap()];
    let second = rolegate_command(&args, &[("TEST_LOGIN_PASSWORD", LOGIN_PASSWORD)]);
    let (ok, _, err) = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .expect("the second rolegate is serving on the first one's port");
    assert!(!ok && err.contains("cannot listen on"), "{err}");
    // The first one serves on.
    rg.client("web", &db)
        .await
        .query_one("SELECT 1", &[])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_closed_after_idle_client_timeout() {
    let db = TestDb::create("idle").await;
    let rg = Rolegate::start_with(
        &db,
        Options {
            extra: "[limits]\nidle_client_timeout = \"1s\"\n".into(),
            ..Options::default()
        },
    )
    .await;
    let mut raw = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    let (tag, body) = raw.read().await.expect("an error before the close");
    assert_eq!(tag, b'E');
    let fields = rolegate::wire::error_fields(&body);
    assert_eq!(rolegate::wire::field(&fields, b'C'), Some("57P05"));
    assert!(raw.read().await.is_none());
    // A client inside a transaction is not idle.
    let web = rg.client("web", &db).await;
    web.batch_execute("BEGIN").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    web.batch_execute("SELECT 1; COMMIT")
        .await
        .expect("a transaction is not idle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_cheap_and_liveness_is_apart_from_readiness() {
    let db = TestDb::create("probes").await;
    let (_rg, admin_port) = with_admin(&db, "").await;
    let (status, _) = http_get(admin_port, "/livez").await;
    assert!(status.contains("200"), "{status}");
    let checks = || async {
        let (_, text) = http_get(admin_port, "/metrics").await;
        metric(&text, "rolegate_readiness_checks_total")
    };
    let before = checks().await;
    // 200 probes at once share one backend login (two if they straddle its second).
    let probes: Vec<_> = (0..200)
        .map(|n| {
            let path = if n % 2 == 0 { "/readyz" } else { "/healthz" };
            tokio::spawn(async move { http_get(admin_port, path).await })
        })
        .collect();
    for probe in probes {
        let (status, body) = probe.await.unwrap();
        assert!(status.contains("200"), "{status} {body}");
        assert!(body.contains("\"checked_ms_ago\""), "{body}");
    }
    let made = checks().await - before;
    assert!(
        (1.0..=2.0).contains(&made),
        "{made} backend logins for 200 probes"
    );
    // The actions are open on a loopback endpoint without a token.
    let (status, _) = http_get(admin_port, "/status").await;
    assert!(status.contains("200"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_endpoint_open_to_the_network_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "listen = \"127.0.0.1:{}\"\nadmin_listen = \"0.0.0.0:{}\"\n[tls]\nmode = \"disable\"\n\
         [backend]\nport = {}\ndatabase = \"open\"\nowner_role = \"open_owner\"\n\
         [rotation]\nmode = \"managed\"\n\n{}",
        free_port(),
        free_port(),
        cluster().port,
        clients_toml()
    );
    let path = dir.path().join("rolegate.toml");
    std::fs::write(&path, &config).unwrap();
    let args = ["serve", "--config", path.to_str().unwrap()];
    let serve = rolegate_command(&args, &[]);
    let (ok, _, err) = tokio::time::timeout(Duration::from_secs(20), serve)
        .await
        .expect("serve with an open admin endpoint and no token must not start");
    assert!(!ok);
    assert!(err.contains("[admin] token_env or token_file"), "{err}");
}

/// The config inside the Kubernetes example is one rolegate accepts.
#[test]
fn the_kubernetes_example_config_is_valid() {
    let manifest = include_str!("../deploy/kubernetes/rolegate.yaml");
    let block: String = manifest
        .split("rolegate.toml: |\n")
        .nth(1)
        .expect("the ConfigMap holds rolegate.toml")
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let verifier = rolegate::scram::make_verifier("example");
    let text = block.replace(
        "SCRAM-SHA-256$4096:REPLACE-WITH-rolegate-hash-password-OUTPUT",
        &verifier,
    );
    let config = rolegate::config::Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(config.clients.len(), 2);
    assert_eq!(config.rotation.instance_id_env.as_deref(), Some("POD_NAME"));
    assert!(config.class_logins(), "the example runs a login per class");
    // A Deployment pod's name as the instance id still leaves login names within 63 bytes.
    let pod = text.replace(
        "instance_id_env = \"POD_NAME\"",
        "instance_id = \"rolegate-7d9f8b6c5d-x2k4q\"",
    );
    rolegate::config::Config::parse(&pod).unwrap_or_else(|e| panic!("{e}"));
    // Without its token setting the open admin port is refused.
    let open = text.replace("token_env = \"ROLEGATE_ADMIN_TOKEN\"\n", "");
    assert!(rolegate::config::Config::parse(&open).is_err());
}

/// SIGHUP does not move the admin endpoint, so a reload may not drop the token while it
/// still listens on a non-loopback address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_cannot_drop_the_token_of_an_open_admin_endpoint() {
    let db = TestDb::create("reloadtoken").await;
    let admin_port = free_port();
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), "reload-token-for-tests\n").unwrap();
    let rg = Rolegate::start_with(
        &db,
        Options {
            top: format!("admin_listen = \"0.0.0.0:{admin_port}\"\n"),
            extra: format!(
                "[admin]\ntoken_file = {:?}\n",
                token_file.path().display().to_string()
            ),
            ..Options::default()
        },
    )
    .await;
    let (status, _) = http_get(admin_port, "/status").await;
    assert!(status.contains("401"), "{status}");
    let config_path = rg.config_path();
    let config = std::fs::read_to_string(&config_path).unwrap();
    let start = config.find("[admin]").unwrap();
    let without_token = format!(
        "{}{}",
        &config[..start],
        &config[start..].replacen("[admin]\n", "", 1).replacen(
            &format!(
                "token_file = {:?}\n",
                token_file.path().display().to_string()
            ),
            "",
            1
        )
    )
    .replace(
        &format!("0.0.0.0:{admin_port}"),
        &format!("127.0.0.1:{admin_port}"),
    );
    assert!(!without_token.contains("token_file"), "{without_token}");
    std::fs::write(&config_path, &without_token).unwrap();
    signal(&rg, "HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !rg.log_text().contains("new config refused") {
        assert!(std::time::Instant::now() < deadline, "{}", rg.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rg
        .log_text()
        .contains("token_env or token_file must stay set"));
    let (status, _) = http_get(admin_port, "/status").await;
    assert!(status.contains("401"), "{status}");
}
