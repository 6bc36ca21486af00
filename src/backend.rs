//! Connecting to PostgreSQL as the current login role, and putting the session into the
//! owner role before anyone else sees it.

use std::path::PathBuf;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{BackendConfig, BackendTlsMode};
use crate::credentials::LoginCredential;
use crate::scram::{SaltedPasswordCache, ScramClient};
use crate::sql::quote_ident;
use crate::tls::{self, MaybeTls};
use crate::wire::{self, WireError};

/// Backend messages during setup are small; a larger one means something is wrong.
const MAX_SETUP_MESSAGE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("could not connect to the server at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to the server at {0}")]
    Timeout(String),
    #[error("the server does not accept TLS, and [backend] tls requires it")]
    TlsRefused,
    #[error("TLS handshake with the server failed: {0}")]
    Tls(std::io::Error),
    #[error("the server asked for an authentication method rolegate does not support ({0})")]
    UnsupportedAuth(i32),
    #[error("SCRAM exchange with the server failed: {0}")]
    Scram(std::io::Error),
    /// The server sent an ErrorResponse; these are its fields, to pass on to the client.
    #[error("the server refused the session: {}", wire::field(.0, b'M').unwrap_or("(no message)"))]
    Server(Vec<(u8, String)>),
    #[error("protocol error talking to the server: {0}")]
    Protocol(#[from] WireError),
    /// rolegate's own query got an answer it did not ask for: the session's protocol
    /// state is not what rolegate believed, and it is closed.
    #[error("unexpected answer to rolegate's own query: {0}")]
    Unexpected(String),
}

impl BackendError {
    /// The ErrorResponse fields a client should see for this failure.
    pub fn client_fields(&self) -> Vec<(u8, String)> {
        match self {
            BackendError::Server(fields) => {
                let mut fields = fields.clone();
                // Whatever the server called it, the client's session is over.
                for (code, value) in fields.iter_mut() {
                    if *code == b'S' || *code == b'V' {
                        *value = "FATAL".into();
                    }
                }
                fields
            }
            other => vec![
                (b'S', "FATAL".into()),
                (b'V', "FATAL".into()),
                (b'C', "08006".into()),
                (b'M', format!("rolegate: {other}")),
            ],
        }
    }
}

/// Where and how to reach PostgreSQL; built once from the config.
pub struct BackendTarget {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub connect_timeout: Duration,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    salted_passwords: SaltedPasswordCache,
}

impl BackendTarget {
    pub fn from_config(config: &BackendConfig) -> Result<BackendTarget, tls::TlsSetupError> {
        let tls = match config.tls {
            BackendTlsMode::Disable => None,
            mode => {
                let ca: Option<&PathBuf> = if mode == BackendTlsMode::VerifyFull {
                    config.ca_file.as_ref()
                } else {
                    None
                };
                let name = ServerName::try_from(config.host.clone()).map_err(|e| {
                    tls::TlsSetupError::Pem {
                        what: "a server name",
                        path: config.host.clone(),
                        message: e.to_string(),
                    }
                })?;
                Some((tls::connector(ca.map(|p| p.as_path()))?, name))
            }
        };
        Ok(BackendTarget {
            host: config.host.clone(),
            port: config.port,
            database: config.database.clone(),
            connect_timeout: config.connect_timeout,
            tls,
            salted_passwords: SaltedPasswordCache::default(),
        })
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A backend session that is authenticated and in the owner role, ready for the client.
pub struct BackendSession {
    pub stream: MaybeTls,
    pub pid: i32,
    pub secret: i32,
    /// The ParameterStatus messages the client must see, as the server sent them, last
    /// value per name.
    pub parameter_status: Vec<(String, Bytes)>,
    /// NotificationResponses that arrived while rolegate's own query ran: the client's,
    /// to pass on.
    pub notifications: Vec<Bytes>,
}

/// Where a backend session must stay for its client: the role, and read-only mode for
/// readonly clients.
#[derive(Debug, Clone, Copy)]
pub struct SessionRole<'a> {
    pub role: &'a str,
    pub read_only: bool,
}

impl SessionRole<'_> {
    /// Startup settings: what the server starts the session with is also what every
    /// reset returns to (`RESET ROLE`, `RESET ALL`, `DISCARD ALL`), so a driver's session
    /// reset cannot take the session out of its role or out of read-only mode.
    fn startup_settings(&self) -> Vec<(&str, &str)> {
        let mut settings = vec![("role", self.role)];
        if self.read_only {
            settings.push(("default_transaction_read_only", "on"));
        }
        settings
    }

    /// Run before the client sees the session: the role again, explicitly, so that the
    /// session is proved to be in it whatever the server did with the startup settings.
    pub fn setup_sql(&self) -> String {
        let mut sql = format!("SET ROLE {}", quote_ident(self.role));
        if self.read_only {
            sql.push_str("; SET default_transaction_read_only = on");
        }
        sql
    }
}

/// Connects as `login`, forwards the client's startup `params`, starts the session in
/// `session`'s role (startup settings, then `SET ROLE …`) and returns only if all of it
/// succeeded.
pub async fn connect(
    target: &BackendTarget,
    login: &LoginCredential,
    params: &[(String, String)],
    session_role: SessionRole<'_>,
) -> Result<BackendSession, BackendError> {
    let addr = target.addr();
    let mut stream = tokio::time::timeout(target.connect_timeout, async {
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|source| BackendError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        negotiate_tls(target, tcp).await
    })
    .await
    .map_err(|_| BackendError::Timeout(addr.clone()))??;

    let mut startup: Vec<(&str, &str)> = vec![
        ("user", login.user.as_str()),
        ("database", target.database.as_str()),
    ];
    startup.extend(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    startup.extend(session_role.startup_settings());
    let mut out = BytesMut::new();
    wire::put_startup(&mut out, &startup);
    stream.write_all(&out).await.map_err(WireError::Io)?;

    authenticate(&mut stream, login, &target.salted_passwords).await?;

    let mut session = BackendSession {
        stream,
        pid: 0,
        secret: 0,
        parameter_status: Vec::new(),
        notifications: Vec::new(),
    };
    read_until_ready(&mut session).await?;

    session.query(&session_role.setup_sql()).await?;
    Ok(session)
}

impl BackendSession {
    /// Records the server's latest ParameterStatus for `name` (the whole frame).
    pub fn set_parameter_status(&mut self, name: String, frame: Bytes) {
        match self.parameter_status.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = frame,
            None => self.parameter_status.push((name, frame)),
        }
    }

    /// Runs `sql` (simple protocol) before the session is handed to a client; returns
    /// the text values of its rows.
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, BackendError> {
        let mut query = BytesMut::new();
        wire::put_query(&mut query, sql);
        self.stream.write_all(&query).await.map_err(WireError::Io)?;
        read_until_ready(self).await
    }
}

impl BackendSession {
    /// Remembers a ParameterStatus the server sent (its body), for the client's greeting.
    fn parameter_status_body(&mut self, body: &[u8]) {
        let name_end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
        let name = String::from_utf8_lossy(&body[..name_end]).into_owned();
        let mut frame = BytesMut::with_capacity(body.len() + 5);
        wire::put_message(&mut frame, b'S', body);
        self.set_parameter_status(name, frame.freeze());
    }

    /// Keeps a NotificationResponse (its body) for the client.
    fn keep_notification(&mut self, body: &[u8]) {
        let mut frame = BytesMut::with_capacity(body.len() + 5);
        wire::put_message(&mut frame, b'A', body);
        self.notifications.push(frame.freeze());
    }

    /// Runs rolegate's own query and checks its answer strictly: exactly one result set
    /// per entry of `columns`, each with exactly those column names, and nothing else but
    /// CommandComplete, notices, setting reports and notifications. Returns the rows of
    /// each result set.
    pub async fn query_expecting(
        &mut self,
        sql: &str,
        columns: &[&[&str]],
    ) -> Result<Vec<Vec<Vec<Option<String>>>>, BackendError> {
        let mut query = BytesMut::new();
        wire::put_query(&mut query, sql);
        self.stream.write_all(&query).await.map_err(WireError::Io)?;
        let mut sets: Vec<Vec<Vec<Option<String>>>> = Vec::new();
        let mut error = None;
        let unexpected = |what: String| Err(BackendError::Unexpected(what));
        loop {
            let (tag, body) = wire::read_message(&mut self.stream, MAX_SETUP_MESSAGE).await?;
            match tag {
                b'T' => {
                    let Some(expected) = columns.get(sets.len()) else {
                        return unexpected("a result set too many".into());
                    };
                    let names = row_description_names(&body)
                        .ok_or(WireError::Malformed("RowDescription"))?;
                    if names
                        .iter()
                        .map(String::as_str)
                        .ne(expected.iter().copied())
                    {
                        return unexpected(format!("columns {names:?}"));
                    }
                    sets.push(Vec::new());
                }
                b'D' => {
                    let row = data_row(&body).ok_or(WireError::Malformed("DataRow"))?;
                    let width = sets.len().checked_sub(1).and_then(|i| columns.get(i));
                    match (sets.last_mut(), width) {
                        (Some(set), Some(width)) if row.len() == width.len() => set.push(row),
                        _ => return unexpected("a row outside its result set".into()),
                    }
                }
                b'S' => self.parameter_status_body(&body),
                b'E' => error = Some(wire::error_fields(&body)),
                b'A' => self.keep_notification(&body),
                b'C' | b'N' => {}
                b'Z' => {
                    return match error {
                        Some(fields) => Err(BackendError::Server(fields)),
                        None if sets.len() == columns.len() => Ok(sets),
                        None => unexpected(format!("{} result sets", sets.len())),
                    };
                }
                other => return unexpected(format!("message type {:?}", other as char)),
            }
        }
    }
}

/// The column names of a RowDescription.
fn row_description_names(mut body: &[u8]) -> Option<Vec<String>> {
    let count = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    body = &body[2..];
    let mut names = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count {
        let end = body.iter().position(|&b| b == 0)?;
        names.push(String::from_utf8_lossy(&body[..end]).into_owned());
        // name \0, table oid, column, type oid, size, modifier, format
        body = body.get(end + 1 + 18..)?;
    }
    Some(names)
}

/// Proves that `login` opens a session and can take `owner_role`: the check a new
/// credential passes before it is used (rotation, file mode), and /healthz's.
pub async fn prove_login(
    target: &BackendTarget,
    login: &LoginCredential,
    owner_role: &str,
) -> Result<(), BackendError> {
    let role = SessionRole {
        role: owner_role,
        read_only: false,
    };
    connect(target, login, &[], role).await.map(drop)
}

async fn negotiate_tls(
    target: &BackendTarget,
    mut tcp: TcpStream,
) -> Result<MaybeTls, BackendError> {
    let Some((connector, name)) = &target.tls else {
        return Ok(MaybeTls::Plain(tcp));
    };
    let mut request = BytesMut::new();
    request.put_i32(8);
    request.put_i32(wire::SSL_REQUEST_CODE);
    tcp.write_all(&request).await.map_err(WireError::Io)?;
    match tcp.read_u8().await.map_err(WireError::Io)? {
        b'S' => {
            let tls = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(BackendError::Tls)?;
            Ok(MaybeTls::Tls(Box::new(tls)))
        }
        _ => Err(BackendError::TlsRefused),
    }
}

async fn authenticate(
    stream: &mut MaybeTls,
    login: &LoginCredential,
    salted_passwords: &SaltedPasswordCache,
) -> Result<(), BackendError> {
    let mut scram: Option<ScramClient> = None;
    loop {
        let (tag, mut body) = wire::read_message(stream, MAX_SETUP_MESSAGE).await?;
        match tag {
            b'R' => {
                if body.len() < 4 {
                    return Err(WireError::Malformed("Authentication").into());
                }
                let code = body.get_i32();
                let mut reply = BytesMut::new();
                match code {
                    0 => return Ok(()),
                    3 => {
                        // Cleartext: only ever sent because the server asked for it.
                        let mut password = login.password.as_bytes().to_vec();
                        password.push(0);
                        wire::put_message(&mut reply, b'p', &password);
                    }
                    5 => {
                        if body.len() != 4 {
                            return Err(WireError::Malformed("AuthenticationMD5Password").into());
                        }
                        let salt = [body[0], body[1], body[2], body[3]];
                        let hash = postgres_protocol::authentication::md5_hash(
                            login.user.as_bytes(),
                            login.password.as_bytes(),
                            salt,
                        );
                        let mut payload = hash.into_bytes();
                        payload.push(0);
                        wire::put_message(&mut reply, b'p', &payload);
                    }
                    10 => {
                        let mechanisms = body[..].split(|&b| b == 0).collect::<Vec<_>>();
                        if !mechanisms.contains(&&b"SCRAM-SHA-256"[..]) {
                            return Err(BackendError::UnsupportedAuth(code));
                        }
                        let client = ScramClient::new();
                        let first = client.first_message();
                        let mut payload = BytesMut::new();
                        payload.put_slice(b"SCRAM-SHA-256\0");
                        payload.put_i32(first.len() as i32);
                        payload.put_slice(first.as_bytes());
                        wire::put_message(&mut reply, b'p', &payload);
                        scram = Some(client);
                    }
                    11 => {
                        let client = scram.as_mut().ok_or(WireError::Unexpected('R'))?;
                        let message = client
                            .final_message(&body, &login.password, salted_passwords)
                            .map_err(BackendError::Scram)?;
                        wire::put_message(&mut reply, b'p', message.as_bytes());
                    }
                    12 => {
                        let client = scram.as_mut().ok_or(WireError::Unexpected('R'))?;
                        client
                            .verify_server_final(&body)
                            .map_err(BackendError::Scram)?;
                    }
                    other => return Err(BackendError::UnsupportedAuth(other)),
                }
                if !reply.is_empty() {
                    stream.write_all(&reply).await.map_err(WireError::Io)?;
                }
            }
            b'E' => return Err(BackendError::Server(wire::error_fields(&body))),
            // NegotiateProtocolVersion and notices carry nothing rolegate needs here.
            b'v' | b'N' => {}
            other => return Err(WireError::Unexpected(other as char).into()),
        }
    }
}

/// Reads the server's messages up to ReadyForQuery, keeping ParameterStatus and
/// BackendKeyData and the text values of DataRows, failing on any ErrorResponse.
async fn read_until_ready(
    session: &mut BackendSession,
) -> Result<Vec<Vec<Option<String>>>, BackendError> {
    let mut error = None;
    let mut rows = Vec::new();
    loop {
        let (tag, body) = wire::read_message(&mut session.stream, MAX_SETUP_MESSAGE).await?;
        match tag {
            b'S' => session.parameter_status_body(&body),
            b'K' => {
                if body.len() < 8 {
                    return Err(WireError::Malformed("BackendKeyData").into());
                }
                let mut body = body;
                session.pid = body.get_i32();
                session.secret = body.get_i32();
            }
            b'E' => error = Some(wire::error_fields(&body)),
            b'A' => session.keep_notification(&body),
            b'D' => rows.push(data_row(&body).ok_or(WireError::Malformed("DataRow"))?),
            b'Z' => {
                return match error {
                    Some(fields) => Err(BackendError::Server(fields)),
                    None => Ok(rows),
                }
            }
            // CommandComplete of the setup SQL, notices.
            _ => {}
        }
    }
}

/// The values of a DataRow in text format.
fn data_row(mut body: &[u8]) -> Option<Vec<Option<String>>> {
    let count = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    body = &body[2..];
    let mut values = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count {
        let len = i32::from_be_bytes(body.get(..4)?.try_into().ok()?);
        body = &body[4..];
        if len < 0 {
            values.push(None);
        } else {
            let value = body.get(..len as usize)?;
            values.push(Some(String::from_utf8_lossy(value).into_owned()));
            body = &body[len as usize..];
        }
    }
    Some(values)
}

/// Sends a CancelRequest for backend `pid`/`secret` on a fresh connection, as PostgreSQL
/// expects; the server answers nothing and closes.
pub async fn send_cancel(addr: &str, pid: i32, secret: i32) -> std::io::Result<()> {
    let mut tcp = TcpStream::connect(addr).await?;
    let mut request = BytesMut::with_capacity(16);
    request.put_i32(16);
    request.put_i32(wire::CANCEL_REQUEST_CODE);
    request.put_i32(pid);
    request.put_i32(secret);
    tcp.write_all(&request).await?;
    // Wait for the server to close, so the cancel is delivered before we return.
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut sink)).await;
    Ok(())
}
