//! The client side of connection setup: SSLRequest/GSSENCRequest/CancelRequest, the
//! StartupMessage, and SCRAM-SHA-256 against the verifier stored in the config.

use bytes::{Buf, Bytes, BytesMut};
use pgwire::api::auth::sasl::scram::ScramServerAuth;
use pgwire::messages::startup::Authentication;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::{Allowance, ClientClass, ClientTlsMode};
use crate::proxy::Proxy;
use crate::scram::ScramVerifier;
use crate::tls::MaybeTls;
use crate::wire::{self, WireError};

/// Who a client proved to be.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub user: String,
    pub class: ClientClass,
    pub allow: Vec<Allowance>,
    pub database: String,
}

/// What a new connection turned out to be.
pub enum Opening {
    /// A CancelRequest for one of rolegate's own keys.
    Cancel { pid: i32, secret: i32 },
    /// An authenticated client, with the parameters to pass on to the server and the
    /// SCRAM server-final message still to send.
    Session {
        stream: MaybeTls,
        identity: ClientIdentity,
        params: Vec<(String, String)>,
        scram_final: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    /// Refused with an error the client is told (SQLSTATE, message).
    #[error("{1} ({0})")]
    Refused(&'static str, String),
}

impl StartupError {
    fn refused(code: &'static str, message: impl Into<String>) -> StartupError {
        StartupError::Refused(code, message.into())
    }
}

/// Runs the connection from its first byte to a proven identity (or a cancel request).
/// On `Err(Refused)` the caller sends the FATAL error on `stream_for_error`.
pub async fn open(
    proxy: &Proxy,
    tcp: TcpStream,
) -> Result<Opening, (StartupError, Option<MaybeTls>)> {
    let mut stream = MaybeTls::Plain(tcp);
    let (minor, body) = loop {
        let mut body = match wire::read_startup_packet(&mut stream).await {
            Ok(body) => body,
            Err(e) => return Err((e.into(), None)),
        };
        let code = body.get_i32();
        match code {
            wire::SSL_REQUEST_CODE if !stream.is_tls() => {
                let (acceptor, tcp) = match (proxy.tls_acceptor(), stream) {
                    (Some(acceptor), MaybeTls::Plain(tcp)) => (acceptor, tcp),
                    (_, mut other) => {
                        if let Err(e) = other.write_all(b"N").await {
                            return Err((WireError::Io(e).into(), None));
                        }
                        stream = other;
                        continue;
                    }
                };
                let mut tcp = tcp;
                if let Err(e) = tcp.write_all(b"S").await {
                    return Err((WireError::Io(e).into(), None));
                }
                match acceptor.accept(tcp).await {
                    Ok(tls) => stream = MaybeTls::Accepted(Box::new(tls)),
                    Err(e) => return Err((StartupError::Tls(e), None)),
                }
            }
            wire::GSSENC_REQUEST_CODE if !stream.is_tls() => {
                if let Err(e) = stream.write_all(b"N").await {
                    return Err((WireError::Io(e).into(), None));
                }
            }
            wire::CANCEL_REQUEST_CODE if body.len() == 8 => {
                return Ok(Opening::Cancel {
                    pid: body.get_i32(),
                    secret: body.get_i32(),
                })
            }
            code if code >> 16 == 3 => break (code & 0xffff, body),
            _ => {
                return Err((
                    StartupError::refused("08P01", "unsupported frontend protocol or request"),
                    Some(stream),
                ))
            }
        }
    };
    match authenticate(proxy, &mut stream, minor, body.freeze()).await {
        Ok((identity, params, scram_final)) => Ok(Opening::Session {
            stream,
            identity,
            params,
            scram_final,
        }),
        Err(e) => Err((e, Some(stream))),
    }
}

async fn authenticate(
    proxy: &Proxy,
    stream: &mut MaybeTls,
    minor: i32,
    body: Bytes,
) -> Result<(ClientIdentity, Vec<(String, String)>, String), StartupError> {
    let config = proxy.config();
    if config.tls.mode == ClientTlsMode::Require && !stream.is_tls() {
        return Err(StartupError::refused(
            "28000",
            "rolegate: this server requires TLS (connect with sslmode=require)",
        ));
    }
    let mut params = wire::startup_parameters(body)?;
    let take = |params: &mut Vec<(String, String)>, name: &str| {
        params
            .iter()
            .position(|(k, _)| k == name)
            .map(|i| params.remove(i).1)
    };
    let user = take(&mut params, "user")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            StartupError::refused(
                "28000",
                "no PostgreSQL user name specified in startup packet",
            )
        })?;
    let database = take(&mut params, "database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    if let Some(mode) = take(&mut params, "replication") {
        if !matches!(mode.as_str(), "false" | "off" | "no" | "0") {
            return Err(StartupError::refused(
                "28000",
                "rolegate: replication connections are not allowed",
            ));
        }
    }
    // Protocol extensions (`_pq_.*`) and minor versions above 3.0 are declined the way
    // PostgreSQL declines them, with NegotiateProtocolVersion.
    let unsupported: Vec<String> = params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.clone())
        .collect();
    params.retain(|(k, _)| !k.starts_with("_pq_."));
    if minor > 0 || !unsupported.is_empty() {
        let mut body = BytesMut::new();
        bytes::BufMut::put_i32(&mut body, 0);
        bytes::BufMut::put_i32(&mut body, unsupported.len() as i32);
        for name in &unsupported {
            body.extend_from_slice(name.as_bytes());
            body.extend_from_slice(&[0]);
        }
        let mut out = BytesMut::new();
        wire::put_message(&mut out, b'v', &body);
        stream.write_all(&out).await.map_err(WireError::Io)?;
        stream.flush().await.map_err(WireError::Io)?;
    }

    let client = config.client(&user);
    let verifier = match client {
        Some(c) => ScramVerifier::parse(&c.password)
            .unwrap_or_else(|_| ScramVerifier::mock(proxy.instance_secret(), &user)),
        None => ScramVerifier::mock(proxy.instance_secret(), &user),
    };
    let scram_final = scram_exchange(stream, &verifier).await;
    let (client, scram_final) = match (client, scram_final) {
        (Some(client), Ok(scram_final)) => (client, scram_final),
        (_, Err(StartupError::Refused("28P01", _))) | (None, Ok(_)) => {
            tracing::info!(user = user.as_str(), "client authentication failed");
            return Err(StartupError::refused(
                "28P01",
                format!("password authentication failed for user \"{user}\""),
            ));
        }
        (_, Err(e)) => return Err(e),
    };
    if database != config.backend.database {
        return Err(StartupError::refused(
            "3D000",
            format!("database \"{database}\" does not exist"),
        ));
    }
    check_settings(&params, client.class)?;
    Ok((
        ClientIdentity {
            user,
            class: client.class,
            allow: client.allow.clone(),
            database,
        },
        params,
        scram_final,
    ))
}

/// SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL runs it; returns the server-final message.
async fn scram_exchange(
    stream: &mut MaybeTls,
    verifier: &ScramVerifier,
) -> Result<String, StartupError> {
    let mut out = BytesMut::new();
    wire::put_authentication(
        &mut out,
        &Authentication::SASL(vec!["SCRAM-SHA-256".to_owned()]),
    );
    stream.write_all(&out).await.map_err(WireError::Io)?;
    stream.flush().await.map_err(WireError::Io)?;

    let mut body = read_sasl_response(stream).await?.freeze();
    let mechanism = wire::take_cstr(&mut body)?;
    if &mechanism[..] != b"SCRAM-SHA-256" {
        return Err(StartupError::refused(
            "28000",
            "client selected an invalid SASL authentication mechanism",
        ));
    }
    if body.len() < 4 {
        return Err(WireError::Malformed("SASLInitialResponse").into());
    }
    let len = body.get_i32();
    if len < 0 || len as usize != body.len() {
        return Err(WireError::Malformed("SASLInitialResponse").into());
    }
    let malformed = |_| StartupError::refused("08P01", "malformed SCRAM message");
    let (server_first, waiting) = ScramServerAuth::new()
        .on_client_first_message_with_secret(&body, verifier.to_secret())
        .map_err(malformed)?;
    out.clear();
    wire::put_authentication(
        &mut out,
        &Authentication::SASLContinue(Bytes::from(server_first)),
    );
    stream.write_all(&out).await.map_err(WireError::Io)?;
    stream.flush().await.map_err(WireError::Io)?;

    let body = read_sasl_response(stream).await?;
    waiting.on_client_final_message(&body).map_err(|e| match e {
        pgwire::error::PgWireError::InvalidPassword(_) => {
            StartupError::refused("28P01", "password authentication failed")
        }
        _ => StartupError::refused("08P01", "malformed SCRAM message"),
    })
}

/// The client's next SASL message ('p'), or a protocol violation.
async fn read_sasl_response(stream: &mut MaybeTls) -> Result<BytesMut, StartupError> {
    let (tag, body) = wire::read_message(stream, wire::MAX_AUTH_MESSAGE).await?;
    if tag != b'p' {
        return Err(StartupError::refused(
            "08P01",
            format!("expected SASL response, got message type {:?}", tag as char),
        ));
    }
    Ok(body)
}

/// Startup parameters are settings the server applies at login; the ones that would
/// change the role (or leave read-only mode, for readonly clients) are refused here,
/// including those hidden in `options=-c name=value`.
fn check_settings(params: &[(String, String)], class: ClientClass) -> Result<(), StartupError> {
    for (name, value) in params {
        if name == "options" {
            for (setting, value) in option_settings(value)? {
                check_setting(&setting, &value, class)?;
            }
        } else if name != "application_name" {
            check_setting(name, value, class)?;
        }
    }
    Ok(())
}

fn check_setting(name: &str, value: &str, class: ClientClass) -> Result<(), StartupError> {
    let name = name.to_ascii_lowercase().replace('-', "_");
    if name == "client_encoding" {
        if let Some(refusal) = crate::policy::unsupported_client_encoding(value) {
            return Err(StartupError::refused(refusal.code, refusal.message));
        }
    }
    let forbidden = matches!(name.as_str(), "role" | "session_authorization")
        || (class == ClientClass::Readonly
            && matches!(
                name.as_str(),
                "default_transaction_read_only" | "transaction_read_only"
            ));
    if forbidden {
        return Err(StartupError::refused(
            "42501",
            format!("rolegate: the startup setting \"{name}\" is not allowed"),
        ));
    }
    Ok(())
}

/// The settings (name, value) in an `options` value: `-c name=value`, `-cname=value` or
/// `--name=value`, separated by unescaped spaces. Anything else is refused: other
/// switches change server behaviour that rolegate does not judge.
pub(crate) fn option_settings(options: &str) -> Result<Vec<(String, String)>, StartupError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' => word.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let refuse = || {
        StartupError::refused(
            "42501",
            "rolegate: only -c name=value settings are allowed in startup options",
        )
    };
    let mut names = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let setting = if word == "-c" {
            words.next().ok_or_else(refuse)?
        } else if let Some(rest) = word.strip_prefix("-c").or_else(|| word.strip_prefix("--")) {
            rest.to_owned()
        } else {
            return Err(refuse());
        };
        let (name, value) = setting.split_once('=').ok_or_else(refuse)?;
        names.push((name.to_owned(), value.to_owned()));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_split_like_postgres_does() {
        assert_eq!(
            option_settings("-c statement_timeout=5s --search_path=a\\ b -cwork_mem=1MB")
                .unwrap()
                .into_iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect::<Vec<_>>(),
            vec!["statement_timeout=5s", "search_path=a b", "work_mem=1MB"]
        );
        assert!(option_settings("-e").is_err());
        assert!(option_settings("-c").is_err());
    }

    #[test]
    fn role_settings_are_refused_at_startup() {
        let params = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        assert!(check_settings(
            &params("options", "-c role=postgres"),
            ClientClass::Migrator
        )
        .is_err());
        assert!(check_settings(&params("options", "--ROLE=postgres"), ClientClass::App).is_err());
        assert!(check_settings(&params("session_authorization", "x"), ClientClass::App).is_err());
        assert!(check_settings(
            &params("default_transaction_read_only", "off"),
            ClientClass::Readonly
        )
        .is_err());
        assert!(check_settings(
            &params("default_transaction_read_only", "off"),
            ClientClass::App
        )
        .is_ok());
        assert!(check_settings(&params("application_name", "role"), ClientClass::App).is_ok());
    }

    #[test]
    fn encodings_that_hide_ascii_bytes_are_refused_at_startup() {
        let params = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        for ok in ["UTF8", "LATIN9", "win1252", "EUC_JP"] {
            assert!(check_settings(&params("client_encoding", ok), ClientClass::App).is_ok());
        }
        for refused in ["SJIS", "Shift-JIS", "big5", "GB18030"] {
            let Err(StartupError::Refused(code, message)) =
                check_settings(&params("client_encoding", refused), ClientClass::App)
            else {
                panic!("{refused} was accepted");
            };
            assert_eq!(code, "0A000");
            assert!(message.contains(refused), "{message}");
        }
        assert!(check_settings(
            &params("options", "-c client_encoding=SJIS"),
            ClientClass::Migrator
        )
        .is_err());
    }
}
