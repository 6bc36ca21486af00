//! PostgreSQL protocol framing and the few messages rolegate writes itself.
//!
//! Frames are always cut by their length here, before anything decodes them, so a
//! malformed message can never make a decoder read into the next one. The messages
//! rolegate composes are encoded with pgwire's message types.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use pgwire::messages::response::{ErrorResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{Authentication, BackendKeyData, SecretKey};
use pgwire::messages::Message;
use tokio::io::{AsyncRead, AsyncReadExt};

pub const PROTOCOL_3_0: i32 = 196_608;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
/// PostgreSQL's own limit for the untyped startup-phase packets.
pub const MAX_STARTUP_PACKET: usize = 10_000;
/// Limit for the typed messages of the authentication exchange.
pub const MAX_AUTH_MESSAGE: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("unexpected message type {0:?}")]
    Unexpected(char),
}

fn eof_as_closed(e: std::io::Error) -> WireError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        WireError::Closed
    } else {
        WireError::Io(e)
    }
}

/// Reads one untyped startup-phase packet (StartupMessage, SSLRequest, CancelRequest…)
/// and returns its body after the length word.
pub async fn read_startup_packet<R: AsyncRead + Unpin>(r: &mut R) -> Result<BytesMut, WireError> {
    let len = r.read_i32().await.map_err(eof_as_closed)?;
    if len < 8 || len as usize > MAX_STARTUP_PACKET {
        return Err(WireError::BadLength(len.into()));
    }
    let mut body = BytesMut::zeroed(len as usize - 4);
    r.read_exact(&mut body).await.map_err(eof_as_closed)?;
    Ok(body)
}

/// Reads one typed message whose body may be at most `max` bytes; returns tag and body.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<(u8, BytesMut), WireError> {
    let tag = r.read_u8().await.map_err(eof_as_closed)?;
    let len = r.read_i32().await.map_err(eof_as_closed)?;
    if len < 4 || (len - 4) as usize > max {
        return Err(WireError::BadLength(len.into()));
    }
    let mut body = BytesMut::zeroed(len as usize - 4);
    r.read_exact(&mut body).await.map_err(eof_as_closed)?;
    Ok((tag, body))
}

/// The header of the next typed message in `buf`: its tag and its total length (tag
/// included), or `None` while fewer than 5 bytes are buffered.
#[inline]
pub fn peek_header(buf: &[u8]) -> Option<(u8, i32)> {
    if buf.len() < 5 {
        return None;
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    Some((buf[0], len))
}

/// Validates a length word and returns the message's total size including its tag.
#[inline]
pub fn frame_size(len: i32, max_body: usize) -> Result<usize, WireError> {
    if len < 4 || (len as usize - 4) > max_body {
        return Err(WireError::BadLength(len.into()));
    }
    Ok(len as usize + 1)
}

/// Takes a NUL-terminated string off the front of `body`.
pub fn take_cstr(body: &mut Bytes) -> Result<Bytes, WireError> {
    let end = body
        .iter()
        .position(|&b| b == 0)
        .ok_or(WireError::Malformed("string field"))?;
    let s = body.split_to(end);
    body.advance(1);
    Ok(s)
}

/// Decodes the key/value pairs of a StartupMessage body (after the protocol word).
pub fn startup_parameters(mut body: Bytes) -> Result<Vec<(String, String)>, WireError> {
    let mut params = Vec::new();
    loop {
        let key = take_cstr(&mut body)?;
        if key.is_empty() {
            break;
        }
        let value = take_cstr(&mut body)?;
        let text = |b: Bytes| {
            String::from_utf8(b.to_vec()).map_err(|_| WireError::Malformed("startup parameter"))
        };
        params.push((text(key)?, text(value)?));
    }
    if !body.is_empty() {
        return Err(WireError::Malformed("startup"));
    }
    Ok(params)
}

/// Appends a StartupMessage (protocol 3.0) with these parameters.
pub fn put_startup(buf: &mut BytesMut, params: &[(&str, &str)]) {
    let len = 4
        + 4
        + params
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>()
        + 1;
    buf.put_i32(len as i32);
    buf.put_i32(PROTOCOL_3_0);
    for (k, v) in params {
        buf.put_slice(k.as_bytes());
        buf.put_u8(0);
        buf.put_slice(v.as_bytes());
        buf.put_u8(0);
    }
    buf.put_u8(0);
}

/// Appends a typed message with an arbitrary body.
pub fn put_message(buf: &mut BytesMut, tag: u8, body: &[u8]) {
    buf.put_u8(tag);
    buf.put_i32(body.len() as i32 + 4);
    buf.put_slice(body);
}

/// Appends a simple `Query` message.
pub fn put_query(buf: &mut BytesMut, sql: &str) {
    buf.put_u8(b'Q');
    buf.put_i32((sql.len() + 5) as i32);
    buf.put_slice(sql.as_bytes());
    buf.put_u8(0);
}

/// Encodes a pgwire message into `buf`. Encoding into a `BytesMut` cannot fail for the
/// messages rolegate builds (they are all far below pgwire's size limits).
fn put<M: Message>(buf: &mut BytesMut, message: &M) {
    if let Err(e) = message.encode(buf) {
        tracing::error!(error = %e, "could not encode a protocol message");
    }
}

pub fn put_authentication(buf: &mut BytesMut, auth: &Authentication) {
    put(buf, auth);
}

pub fn put_backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    put(buf, &BackendKeyData::new(pid, SecretKey::I32(secret)));
}

pub fn put_ready_for_query(buf: &mut BytesMut, status: u8) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    put(buf, &ReadyForQuery::new(status));
}

/// What an error says, in PostgreSQL's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    pub severity: &'a str,
    pub code: &'a str,
    pub message: &'a str,
    pub detail: Option<&'a str>,
    pub hint: Option<&'a str>,
}

impl<'a> ErrorFields<'a> {
    pub fn fatal(code: &'a str, message: &'a str) -> Self {
        ErrorFields {
            severity: "FATAL",
            code,
            message,
            detail: None,
            hint: None,
        }
    }

    pub fn error(code: &'a str, message: &'a str) -> Self {
        ErrorFields {
            severity: "ERROR",
            ..ErrorFields::fatal(code, message)
        }
    }

    pub fn with_hint(mut self, hint: &'a str) -> Self {
        self.hint = Some(hint);
        self
    }
}

pub fn put_error(buf: &mut BytesMut, e: &ErrorFields<'_>) {
    let mut fields = vec![
        (b'S', e.severity.to_owned()),
        (b'V', e.severity.to_owned()),
        (b'C', e.code.to_owned()),
        (b'M', e.message.to_owned()),
    ];
    if let Some(detail) = e.detail {
        fields.push((b'D', detail.to_owned()));
    }
    if let Some(hint) = e.hint {
        fields.push((b'H', hint.to_owned()));
    }
    put(buf, &ErrorResponse::new(fields));
}

/// The fields of an ErrorResponse/NoticeResponse body, for logging and for errors the
/// backend sends during connection setup.
pub fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut fields = Vec::new();
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        fields.push((code, String::from_utf8_lossy(&tail[..end]).into_owned()));
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    fields
}

/// Finds a field (`b'C'` for the SQLSTATE, `b'M'` for the message…) in error fields.
pub fn field(fields: &[(u8, String)], code: u8) -> Option<&str> {
    fields
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn startup_and_error_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = startup_parameters(Bytes::from(body.clone()));
            let _ = error_fields(&body);
            let mut b = Bytes::from(body);
            let _ = take_cstr(&mut b);
        }

        #[test]
        fn frame_sizes_are_within_bounds(len in any::<i32>()) {
            if let Ok(size) = frame_size(len, 1 << 20) {
                prop_assert!((5..=(1 << 20) + 5).contains(&size));
            }
        }
    }

    #[tokio::test]
    async fn startup_packet_lengths_are_bounded() {
        let mut huge: &[u8] = &[0x7f, 0xff, 0xff, 0xff, 0, 0];
        assert!(matches!(
            read_startup_packet(&mut huge).await,
            Err(WireError::BadLength(_))
        ));
        let mut negative: &[u8] = &[0xff, 0xff, 0xff, 0xf0];
        assert!(matches!(
            read_startup_packet(&mut negative).await,
            Err(WireError::BadLength(_))
        ));
        let mut truncated: &[u8] = &[0, 0, 0, 16, 0, 3];
        assert!(matches!(
            read_startup_packet(&mut truncated).await,
            Err(WireError::Closed)
        ));
    }

    #[test]
    fn startup_parameters_round_trip() {
        let mut buf = BytesMut::new();
        put_startup(&mut buf, &[("user", "web"), ("database", "db")]);
        let body = Bytes::copy_from_slice(&buf[8..]);
        assert_eq!(
            startup_parameters(body).unwrap(),
            vec![
                ("user".into(), "web".into()),
                ("database".into(), "db".into())
            ]
        );
        assert!(startup_parameters(Bytes::from_static(b"user\0web")).is_err());
    }

    #[test]
    fn error_fields_round_trip() {
        let mut buf = BytesMut::new();
        put_error(
            &mut buf,
            &ErrorFields::error("42501", "no").with_hint("ask a migrator"),
        );
        assert_eq!(buf[0], b'E');
        let fields = error_fields(&buf[5..]);
        assert_eq!(field(&fields, b'C'), Some("42501"));
        assert_eq!(field(&fields, b'H'), Some("ask a migrator"));
    }

    #[test]
    fn frame_size_rejects_bad_lengths() {
        assert!(frame_size(3, 100).is_err());
        assert!(frame_size(-1, 100).is_err());
        assert!(frame_size(105, 100).is_err());
        assert_eq!(frame_size(4, 100).unwrap(), 5);
    }
}
