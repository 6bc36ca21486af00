//! Hostile and broken input: every case gets a clean close or a clear error, never a
//! panic or a hang, and rolegate keeps serving everyone else.

mod support;

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn quick_login_timeout(db: &TestDb) -> Rolegate {
    Rolegate::start_with(
        db,
        Options {
            extra: "[limits]\nclient_login_timeout = \"1s\"\nmax_message_bytes = 1048576\n".into(),
            ..Options::default()
        },
    )
    .await
}

/// Reads until the peer closes; panics if that takes longer than `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> Vec<u8> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return seen,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => panic!("rolegate kept the connection open past {within:?}"),
        }
    }
}

async fn still_serves(rg: &Rolegate, db: &TestDb) {
    let client = rg.client("web", db).await;
    client
        .query_one("SELECT 1", &[])
        .await
        .expect("rolegate still serves");
    assert!(!rg.log_text().contains("panicked"), "{}", rg.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_startup_packets_are_closed_cleanly() {
    let db = TestDb::create("hostile").await;
    let rg = quick_login_timeout(&db).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a 2 GB startup packet",
            vec![0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0],
        ),
        (
            "a negative length",
            vec![0xff, 0xff, 0xff, 0xf0, 0, 3, 0, 0],
        ),
        ("a length below the minimum", vec![0, 0, 0, 4]),
        (
            "garbage before startup",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("an unknown protocol", vec![0, 0, 0, 8, 0, 9, 0, 0]),
        ("a startup without its terminator", {
            let mut v = vec![0, 0, 0, 17, 0, 3, 0, 0];
            v.extend_from_slice(b"user\0web");
            v
        }),
        (
            "a truncated startup packet",
            vec![0, 0, 0, 100, 0, 3, 0, 0, b'u'],
        ),
        ("nothing at all", vec![]),
    ];
    for (what, bytes) in cases {
        let mut raw = RawClient::connect(rg.port).await;
        raw.send(&bytes).await;
        let seen = closed_within(&mut raw.stream, Duration::from_secs(5)).await;
        // Either closed silently or with an ErrorResponse, never anything else.
        assert!(seen.is_empty() || seen[0] == b'E', "{what}: got {seen:?}");
    }
    still_serves(&rg, &db).await;
}

/// A connection that sent SSLRequest and was answered `S`: the TLS handshake is next.
async fn tls_requested(port: u16) -> RawClient {
    let mut raw = RawClient::connect(port).await;
    raw.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await;
    let mut answer = [0u8; 1];
    raw.stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_that_stops_halfway_is_closed_at_the_login_timeout() {
    let db = TestDb::create("halftls").await;
    let rg = Rolegate::start_with(
        &db,
        Options {
            tls_mode: Some("prefer"),
            extra: "[limits]\nclient_login_timeout = \"1s\"\n".into(),
            ..Options::default()
        },
    )
    .await;
    let mut raw = tls_requested(rg.port).await;
    // The first bytes of a ClientHello, then silence.
    raw.send(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await;
    let started = Instant::now();
    closed_within(&mut raw.stream, Duration::from_secs(5)).await;
    assert!(started.elapsed() >= Duration::from_millis(500));
    still_serves(&rg, &db).await;
}

/// rustls keeps offsets into the received bytes while a handshake message is split over
/// records: a broken handshake that stops in such a message (here a ClientHello's first
/// bytes, then a ChangeCipherSpec) is refused with an alert, not a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_broken_inside_a_split_message_is_refused_without_a_panic() {
    let db = TestDb::create("splittls").await;
    let rg = Rolegate::start_tls(&db, "prefer").await;
    let mut raw = tls_requested(rg.port).await;
    raw.send(&[
        0x16, 0x03, 0x01, 0x00, 0x08, 0x01, 0x00, 0x00, 0x40, 0x03, 0x03, 0x00, 0x00,
    ])
    .await;
    raw.send(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01]).await;
    let seen = closed_within(&mut raw.stream, Duration::from_secs(5)).await;
    // A TLS alert record, or nothing.
    assert!(seen.is_empty() || seen[0] == 0x15, "got {seen:?}");
    let log = rg.log_text();
    assert!(!log.contains("panicked"), "{log}");
    still_serves(&rg, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_silent_sockets_are_closed_and_a_real_client_gets_in() {
    let db = TestDb::create("silent").await;
    let rg = quick_login_timeout(&db).await;
    let mut silent = Vec::new();
    for _ in 0..500 {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", rg.port))
                .await
                .unwrap(),
        );
    }
    still_serves(&rg, &db).await;
    for stream in silent.iter_mut() {
        closed_within(stream, Duration::from_secs(10)).await;
    }
    still_serves(&rg, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_after_login_end_the_session_with_a_clear_error() {
    let db = TestDb::create("badframes").await;
    let rg = quick_login_timeout(&db).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a length of 3", vec![b'Q', 0, 0, 0, 3]),
        ("a negative length", vec![b'Q', 0xff, 0xff, 0xff, 0xff]),
        ("a length over max_message_bytes", vec![b'd', 0x7f, 0, 0, 0]),
    ];
    for (what, bytes) in cases {
        let mut raw = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
        raw.send(&bytes).await;
        let (tag, body) = raw
            .read()
            .await
            .unwrap_or_else(|| panic!("{what}: closed without an error"));
        assert_eq!(tag, b'E', "{what}");
        let fields = rolegate::wire::error_fields(&body);
        assert_eq!(
            rolegate::wire::field(&fields, b'C'),
            Some("08P01"),
            "{what}: {fields:?}"
        );
        assert!(raw.read().await.is_none(), "{what}: the session must end");
    }
    // A truncated frame, then the client goes away: nothing hangs, nothing leaks.
    let mut raw = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
    raw.send(&[b'Q', 0, 0, 0, 100, b'S', b'E']).await;
    drop(raw);
    still_serves(&rg, &db).await;
}

/// A bounded fuzz run through a live rolegate: random frames (valid tags, random lengths
/// and bodies) after login. Each connection must end in an answer or a clean close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_frames_after_login_never_crash_rolegate() {
    let db = TestDb::create("fuzz").await;
    let rg = quick_login_timeout(&db).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x70_6c_65);
    let tags = b"QPBEDSHCXFdcfp?\0";
    for _case in 0..150 {
        let mut raw = RawClient::login(rg.port, "web", "web-pw", &db.name).await;
        let mut bytes = Vec::new();
        for _ in 0..rng.gen_range(1..6) {
            let tag = tags[rng.gen_range(0..tags.len())];
            let body_len = rng.gen_range(0..64usize);
            let claimed: i32 = match rng.gen_range(0..4) {
                0 => rng.gen(),
                _ => body_len as i32 + 4,
            };
            bytes.push(tag);
            bytes.extend_from_slice(&claimed.to_be_bytes());
            bytes.extend((0..body_len).map(|_| rng.gen::<u8>()));
        }
        // A Sync and a Query at the end, so a well-formed stream gets an answer.
        bytes.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        let _ = raw.stream.write_all(&bytes).await;
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_millis(300), raw.stream.read(&mut buf)).await
            {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) => {}
            }
        }
    }
    still_serves(&rg, &db).await;
}

/// The startup and authentication state machine fed random (but well-framed) packets:
/// random protocol codes and parameter bytes, then random SASL messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_startup_and_auth_messages_never_crash_rolegate() {
    let db = TestDb::create("fuzzstart").await;
    let rg = quick_login_timeout(&db).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for case in 0..150 {
        let mut raw = RawClient::connect(rg.port).await;
        let mut bytes = Vec::new();
        let body_len = rng.gen_range(0..200usize);
        let code: i32 = match case % 3 {
            0 => 196_608,
            1 => 80_877_103,
            _ => rng.gen(),
        };
        bytes.extend_from_slice(&((body_len + 8) as i32).to_be_bytes());
        bytes.extend_from_slice(&code.to_be_bytes());
        if case % 2 == 0 {
            bytes.extend_from_slice(b"user\0web\0database\0");
            bytes.extend_from_slice(db.name.as_bytes());
            bytes.push(0);
            let filler = body_len.saturating_sub(bytes.len() - 8);
            bytes.extend((0..filler).map(|_| rng.gen::<u8>()));
        } else {
            bytes.extend((0..body_len).map(|_| rng.gen::<u8>()));
        }
        // A random SASL answer after it.
        bytes.push(b'p');
        let sasl_len = rng.gen_range(0..80usize);
        bytes.extend_from_slice(&((sasl_len + 4) as i32).to_be_bytes());
        bytes.extend((0..sasl_len).map(|_| rng.gen::<u8>()));
        raw.send(&bytes).await;
        closed_within(&mut raw.stream, Duration::from_secs(5)).await;
    }
    still_serves(&rg, &db).await;
}
