//! A raw protocol client that runs a program and records every message it receives as a
//! line of stable text: its transcript.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::grammar::{End, Msg, Step};

/// How long a client waits for an answer it is owed before it records a hang and stops.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server must be silent before a cancel is sent, and before the end of a
/// program (answers nobody waited for still arrive within it).
const SILENCE: Duration = Duration::from_millis(300);

/// Where a client connects and as whom.
#[derive(Clone)]
pub struct Target {
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
    /// Startup parameters beyond user and database (the direct session's `role`).
    pub params: Vec<(String, String)>,
}

/// Everything the client received after login, as text; one entry per message with the
/// step that was running when it arrived.
#[derive(Default, Debug, Clone)]
pub struct Transcript {
    pub lines: Vec<(usize, String)>,
}

struct Conn {
    stream: TcpStream,
    pid: i32,
    secret: i32,
    /// The last value the server reported for each parameter: a ParameterStatus that
    /// repeats it tells the client nothing and is not recorded.
    reported: HashMap<String, String>,
}

enum Read {
    Message(u8, BytesMut),
    Closed,
    Silent,
}

async fn read(stream: &mut TcpStream, wait: Duration) -> Read {
    match tokio::time::timeout(wait, rolegate::wire::read_message(stream, 1 << 30)).await {
        Ok(Ok((tag, body))) => Read::Message(tag, body),
        Ok(Err(_)) => Read::Closed,
        Err(_) => Read::Silent,
    }
}

fn cstr(body: &[u8], at: &mut usize) -> String {
    let start = (*at).min(body.len());
    let end = body[start..]
        .iter()
        .position(|b| *b == 0)
        .map_or(body.len(), |p| start + p);
    *at = end + 1;
    String::from_utf8_lossy(&body[start..end]).into_owned()
}

fn i16_at(body: &[u8], at: &mut usize) -> i16 {
    let v = body
        .get(*at..*at + 2)
        .map_or(0, |b| i16::from_be_bytes([b[0], b[1]]));
    *at += 2;
    v
}

fn i32_at(body: &[u8], at: &mut usize) -> i32 {
    let v = body
        .get(*at..*at + 4)
        .map_or(0, |b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    *at += 4;
    v
}

/// Severity, SQLSTATE, message, detail and hint of an ErrorResponse or NoticeResponse:
/// the fields a user reads (position, context and source location are left out).
fn error_text(body: &[u8]) -> String {
    let fields = rolegate::wire::error_fields(body);
    let get = |code: u8| rolegate::wire::field(&fields, code).unwrap_or("");
    let mut text = format!("{} {} {}", get(b'V'), get(b'C'), get(b'M'));
    for (code, label) in [(b'D', "detail"), (b'H', "hint")] {
        if !get(code).is_empty() {
            text.push_str(&format!(" ({label}: {})", get(code)));
        }
    }
    text
}

/// A message as a line of text; None for what is not recorded (a ParameterStatus that
/// repeats the last reported value).
fn decode(tag: u8, body: &[u8], reported: &mut HashMap<String, String>) -> Option<String> {
    let mut at = 0;
    let line = match tag {
        b'C' => format!("CommandComplete {}", cstr(body, &mut at)),
        b'D' => {
            let count = i16_at(body, &mut at);
            let mut values = Vec::new();
            for _ in 0..count {
                let len = i32_at(body, &mut at);
                if len < 0 {
                    values.push("NULL".to_owned());
                } else {
                    let end = (at + len as usize).min(body.len());
                    values.push(format!(
                        "{:?}",
                        String::from_utf8_lossy(&body[at.min(end)..end])
                    ));
                    at = end;
                }
            }
            format!("DataRow {}", values.join(" "))
        }
        b'T' => {
            let count = i16_at(body, &mut at);
            let mut columns = Vec::new();
            for _ in 0..count {
                let name = cstr(body, &mut at);
                at += 6; // table oid, column number
                let oid = i32_at(body, &mut at);
                at += 2; // type size
                let modifier = i32_at(body, &mut at);
                let format = i16_at(body, &mut at);
                columns.push(format!("{name}:{oid}:{modifier}:{format}"));
            }
            format!("RowDescription {}", columns.join(" "))
        }
        b't' => {
            let count = i16_at(body, &mut at);
            let oids: Vec<String> = (0..count)
                .map(|_| i32_at(body, &mut at).to_string())
                .collect();
            format!("ParameterDescription {}", oids.join(" "))
        }
        b'E' => format!("Error {}", error_text(body)),
        b'N' => format!("Notice {}", error_text(body)),
        b'S' => {
            let name = cstr(body, &mut at);
            let value = cstr(body, &mut at);
            if reported.get(&name) == Some(&value) {
                return None;
            }
            reported.insert(name.clone(), value.clone());
            format!("ParameterStatus {name}={value}")
        }
        b'A' => {
            let _pid = i32_at(body, &mut at);
            let channel = cstr(body, &mut at);
            let payload = cstr(body, &mut at);
            format!("Notification {channel} {payload:?}")
        }
        b'G' | b'H' | b'W' => {
            let format = body.first().copied().unwrap_or(0);
            let name = match tag {
                b'G' => "CopyInResponse",
                b'H' => "CopyOutResponse",
                _ => "CopyBothResponse",
            };
            format!(
                "{name} format {format} columns {}",
                body.len().saturating_sub(3) / 2
            )
        }
        b'd' => format!("CopyData {:?}", String::from_utf8_lossy(body)),
        b'c' => "CopyDone".to_owned(),
        b'Z' => format!("ReadyForQuery {}", body.first().map_or('?', |b| *b as char)),
        b'1' => "ParseComplete".to_owned(),
        b'2' => "BindComplete".to_owned(),
        b'3' => "CloseComplete".to_owned(),
        b'n' => "NoData".to_owned(),
        b's' => "PortalSuspended".to_owned(),
        b'I' => "EmptyQueryResponse".to_owned(),
        b'K' => "BackendKeyData".to_owned(),
        other => format!("message {:?} {:?}", other as char, body),
    };
    Some(line)
}

fn encode(msg: &Msg, keys: &[i64; 4], out: &mut BytesMut) {
    let fill = |sql: &str| {
        let mut sql = sql.to_owned();
        for (i, key) in keys.iter().enumerate() {
            sql = sql.replace(&format!("{{K{i}}}"), &key.to_string());
        }
        sql
    };
    let mut body = BytesMut::new();
    let cstring = |body: &mut BytesMut, s: &str| {
        body.put_slice(s.as_bytes());
        body.put_u8(0);
    };
    let tag = match msg {
        Msg::Query(sql) => {
            cstring(&mut body, &fill(sql));
            b'Q'
        }
        Msg::Parse { name, sql } => {
            cstring(&mut body, name);
            cstring(&mut body, &fill(sql));
            body.put_i16(0);
            b'P'
        }
        Msg::Bind {
            portal,
            statement,
            params,
        } => {
            cstring(&mut body, portal);
            cstring(&mut body, statement);
            body.put_i16(0);
            body.put_i16(params.len() as i16);
            for value in params {
                body.put_i32(value.len() as i32);
                body.put_slice(value.as_bytes());
            }
            body.put_i16(0);
            b'B'
        }
        Msg::Describe { kind, name } => {
            body.put_u8(*kind);
            cstring(&mut body, name);
            b'D'
        }
        Msg::Execute { portal, max_rows } => {
            cstring(&mut body, portal);
            body.put_i32(*max_rows);
            b'E'
        }
        Msg::Close { kind, name } => {
            body.put_u8(*kind);
            cstring(&mut body, name);
            b'C'
        }
        Msg::Sync => b'S',
        Msg::Flush => b'H',
        Msg::CopyData(data) => {
            body.put_slice(data.as_bytes());
            b'd'
        }
        Msg::CopyDone => b'c',
        Msg::CopyFail(why) => {
            cstring(&mut body, why);
            b'f'
        }
    };
    rolegate::wire::put_message(out, tag, &body);
}

/// Logs in with SCRAM-SHA-256 and reads up to the first ReadyForQuery.
async fn login(target: &Target) -> Result<Conn, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", target.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let mut startup: Vec<(&str, &str)> =
        vec![("user", &target.user), ("database", &target.database)];
    startup.extend(target.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut out = BytesMut::new();
    rolegate::wire::put_startup(&mut out, &startup);
    stream
        .write_all(&out)
        .await
        .map_err(|e| format!("startup: {e}"))?;
    let mut scram = None;
    let mut conn = Conn {
        stream,
        pid: 0,
        secret: 0,
        reported: HashMap::new(),
    };
    loop {
        let (tag, body) = match read(&mut conn.stream, ANSWER_TIMEOUT).await {
            Read::Message(tag, body) => (tag, body),
            Read::Closed => return Err("closed during login".to_owned()),
            Read::Silent => return Err("no answer during login".to_owned()),
        };
        let mut out = BytesMut::new();
        match tag {
            b'R' => crate::support::answer_authentication(
                &body,
                &target.password,
                &mut scram,
                &mut out,
            )?,
            b'K' => {
                let mut at = 0;
                conn.pid = i32_at(&body, &mut at);
                conn.secret = i32_at(&body, &mut at);
            }
            b'S' => {
                decode(tag, &body, &mut conn.reported);
            }
            b'E' => return Err(format!("login failed: {}", error_text(&body))),
            b'Z' => return Ok(conn),
            _ => {}
        }
        if !out.is_empty() {
            conn.stream
                .write_all(&out)
                .await
                .map_err(|e| format!("login: {e}"))?;
        }
    }
}

/// Why a program stopped before its end.
struct Stopped;

struct Run<'a> {
    conn: Conn,
    target: &'a Target,
    keys: [i64; 4],
    transcript: Transcript,
    step: usize,
}

impl Run<'_> {
    fn record(&mut self, line: String) {
        self.transcript.lines.push((self.step, line));
    }

    async fn send(&mut self, msgs: &[Msg]) -> Result<(), Stopped> {
        let mut out = BytesMut::new();
        for msg in msgs {
            encode(msg, &self.keys, &mut out);
        }
        if out.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.conn.stream.write_all(&out).await {
            self.record(format!("<write failed: {}>", e.kind()));
            return Err(Stopped);
        }
        Ok(())
    }

    /// Reads one message within `wait` and records it; returns its tag, or None when
    /// the server was silent. A closed connection stops the program.
    async fn next(&mut self, wait: Duration) -> Result<Option<u8>, Stopped> {
        match read(&mut self.conn.stream, wait).await {
            Read::Message(tag, body) => {
                if let Some(line) = decode(tag, &body, &mut self.conn.reported) {
                    self.record(line);
                }
                Ok(Some(tag))
            }
            Read::Closed => {
                self.record("<connection closed>".to_owned());
                Err(Stopped)
            }
            Read::Silent => Ok(None),
        }
    }

    /// Reads an answer that is owed: silence past the timeout is a hang, recorded.
    async fn owed(&mut self) -> Result<u8, Stopped> {
        match self.next(ANSWER_TIMEOUT).await? {
            Some(tag) => Ok(tag),
            None => {
                self.record(format!("<no answer within {} s>", ANSWER_TIMEOUT.as_secs()));
                Err(Stopped)
            }
        }
    }

    async fn until_ready(&mut self, mut ready: usize) -> Result<(), Stopped> {
        while ready > 0 {
            if self.owed().await? == b'Z' {
                ready -= 1;
            }
        }
        Ok(())
    }

    async fn until_one_of(&mut self, tags: &[u8]) -> Result<(), Stopped> {
        while !tags.contains(&self.owed().await?) {}
        Ok(())
    }

    /// Reads whatever arrives until the server has been silent for `SILENCE`.
    async fn drain(&mut self) -> Result<(), Stopped> {
        while self.next(SILENCE).await?.is_some() {}
        Ok(())
    }

    /// Sends a CancelRequest with this session's key on a connection of its own and
    /// waits until the other side closes it (the server has then signalled the backend).
    async fn cancel(&mut self) {
        let mut request = BytesMut::new();
        request.put_i32(16);
        request.put_i32(80877102);
        request.put_i32(self.conn.pid);
        request.put_i32(self.conn.secret);
        let send = async {
            let mut stream = TcpStream::connect(("127.0.0.1", self.target.port)).await?;
            stream.write_all(&request).await?;
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).await?;
            Ok::<_, std::io::Error>(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), send).await;
    }

    async fn step(&mut self, step: &Step) -> Result<(), Stopped> {
        match step {
            Step::Send { msgs, ready } => {
                self.send(msgs).await?;
                self.until_ready(*ready).await
            }
            Step::FlushThen { first, rest, ready } => {
                self.send(first).await?;
                self.until_one_of(b"CsIE").await?;
                self.send(rest).await?;
                self.until_ready(*ready).await
            }
            Step::CopyIn {
                head,
                data,
                ready,
                settle,
            } => {
                self.send(head).await?;
                let mut ready = *ready;
                if !data.is_empty() {
                    loop {
                        match self.owed().await? {
                            b'G' | b'E' => break,
                            b'Z' => {
                                ready = ready.saturating_sub(1);
                                break;
                            }
                            _ => {}
                        }
                    }
                    self.send(data).await?;
                }
                self.until_ready(ready).await?;
                if *settle {
                    self.drain().await?;
                }
                Ok(())
            }
            Step::Cancel { msgs, ready } => {
                // Nothing else may be on its way: the first silence must be the sleep's.
                self.drain().await?;
                self.send(msgs).await?;
                // Cancel at every silence until the statement's outcome (a row, an
                // error) arrives: a RowDescription or ParseComplete is not one.
                let mut outcome = false;
                for _ in 0..40 {
                    match self.next(SILENCE).await? {
                        Some(b'Z') => return self.until_ready(*ready - 1).await,
                        Some(b'D' | b'E' | b'C') => outcome = true,
                        Some(_) => {}
                        None if !outcome => self.cancel().await,
                        None => {}
                    }
                }
                self.until_ready(*ready).await
            }
            Step::End(_) => Ok(()),
        }
    }

    async fn end(mut self, end: &End) -> Transcript {
        match end {
            End::Terminate => {
                if self.drain().await.is_ok() {
                    let mut out = BytesMut::new();
                    rolegate::wire::put_message(&mut out, b'X', &[]);
                    if self.conn.stream.write_all(&out).await.is_ok() {
                        // The server closes; anything before that is recorded.
                        while let Ok(Some(_)) = self.next(ANSWER_TIMEOUT).await {}
                    }
                }
            }
            End::Drop => {
                let _ = self.drain().await;
            }
            End::DropInFlight(msgs) => {
                if self.drain().await.is_ok() {
                    let _ = self.send(msgs).await;
                }
            }
        }
        self.transcript
    }
}

/// Connects, runs `program` and returns the transcript (a failed login is the whole
/// transcript). `keys` replace `{K0}`..`{K3}` (advisory lock keys of this run).
pub async fn run(target: &Target, program: &[Step], keys: [i64; 4]) -> Transcript {
    let conn = match login(target).await {
        Ok(conn) => conn,
        Err(e) => {
            return Transcript {
                lines: vec![(0, format!("<{e}>"))],
            }
        }
    };
    let mut run = Run {
        conn,
        target,
        keys,
        transcript: Transcript::default(),
        step: 0,
    };
    for (i, step) in program.iter().enumerate() {
        run.step = i;
        if let Step::End(end) = step {
            return run.end(end).await;
        }
        let started = std::time::Instant::now();
        let outcome = run.step(step).await;
        if std::env::var_os("ROLEGATE_FUZZ_VERBOSE").is_some()
            && started.elapsed() > Duration::from_secs(1)
        {
            eprintln!("fuzz: slow step ({:?}): {step}", started.elapsed());
        }
        if outcome.is_err() {
            return run.transcript;
        }
    }
    run.end(&End::Terminate).await
}
