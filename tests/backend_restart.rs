//! PostgreSQL restarted under load, then stopped. In a test binary of its own, and one
//! test: it restarts and stops the cluster that every test of its binary shares.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_restart_gives_clean_errors_and_everyone_reconnects() {
    let db = TestDb::create("restart").await;
    let admin_port = free_port();
    let rg = Rolegate::start_with(
        &db,
        Options {
            top: format!("admin_listen = \"127.0.0.1:{admin_port}\"\n"),
            ..Options::default()
        },
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let after_restart = Arc::new(AtomicBool::new(false));
    let ok_after = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let url = rg.url("web", "web-pw", &db.name);
        let (stop, after_restart, ok_after) =
            (stop.clone(), after_restart.clone(), ok_after.clone());
        workers.push(tokio::spawn(async move {
            let mut unclean = Vec::new();
            let mut client = None;
            while !stop.load(Ordering::Relaxed) {
                if client.is_none() {
                    match connect_url(&url).await {
                        Ok(c) => client = Some(c),
                        Err(e) => {
                            // While the server is down: a FATAL from rolegate, never a hang.
                            if e.as_db_error().is_none() && !e.is_closed() {
                                unclean.push(format!("connect: {e:?}"));
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                }
                let Some(c) = client.as_ref() else { continue };
                match c.query_one("SELECT 1", &[]).await {
                    Ok(_) => {
                        if after_restart.load(Ordering::Relaxed) {
                            ok_after.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        let clean = e.is_closed()
                            || matches!(
                                sqlstate(&e).as_deref(),
                                Some("57P01") | Some("57P02") | Some("57P03") | Some("08006")
                            );
                        if !clean {
                            unclean.push(format!("query: {e:?}"));
                        }
                        client = None;
                    }
                }
            }
            unclean
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster().restart();
    after_restart.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut unclean = Vec::new();
    for w in workers {
        let finished = tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("a client hung after the backend restart");
        unclean.extend(finished.unwrap());
    }
    assert!(unclean.is_empty(), "unclean errors: {unclean:?}");
    assert!(
        ok_after.load(Ordering::Relaxed) > 16,
        "clients did not get back in after the restart"
    );
    let log = rg.log_text();
    assert!(!log.contains("panicked"), "{log}");
    // New clients connect as usual.
    rg.client("web", &db)
        .await
        .query_one("SELECT 1", &[])
        .await
        .unwrap();

    // With PostgreSQL stopped rolegate is alive but not ready; ready again once it is back.
    let (status, _) = http_get(admin_port, "/readyz").await;
    assert!(status.contains("200"), "{status}");
    cluster().stop();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = http_get(admin_port, "/readyz").await;
    assert!(
        status.contains("503") && body.contains("backend login failed"),
        "{status} {body}"
    );
    let (status, _) = http_get(admin_port, "/livez").await;
    assert!(status.contains("200"), "{status}");
    cluster().start();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(admin_port, "/readyz").await;
        if status.contains("200") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not ready again: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
