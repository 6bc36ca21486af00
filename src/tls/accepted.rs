//! The clients' side of TLS: rustls' unbuffered server connection over the client's TCP
//! stream, with buffers that exist only while bytes are in them.
//!
//! Why not tokio-rustls here (backend connections stay on it): its buffered connection
//! keeps a 4 KiB receive buffer (rustls' deframer) for as long as the connection lives,
//! as much as an idle client's whole state in transaction mode. This stream reads records
//! into a buffer it frees as soon as every record in it is processed, and encrypts into
//! one it frees as soon as it is written, so an idle TLS client holds rustls' keys and
//! state and nothing more.
//!
//! The contract is tokio-rustls': `poll_write` encrypts and writes what the socket takes
//! at once, keeping the rest for `poll_flush`; a TCP end without `close_notify` reads as
//! end of stream (PostgreSQL's protocol ends with its own Terminate message).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, ReadTraffic, UnbufferedStatus,
    WriteTraffic,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The largest TLS record on the wire: 2^14 bytes of plaintext, TLS 1.2's 2,048 bytes of
/// expansion, the 5-byte header.
const MAX_RECORD: usize = 5 + 16_384 + 2_048;
/// The most received bytes held unprocessed: rustls joins a handshake message of up to
/// 64 KiB from several records in place, and one record may follow it.
const MAX_INCOMING: usize = 0xffff + 2 * MAX_RECORD;
/// The least room made for a read from the socket while a record is incomplete.
const READ_SIZE: usize = 4096;
/// The first read after all received bytes were consumed goes to the stack, this much.
const SMALL_READ: usize = 1024;
/// The most plaintext one `poll_write` takes.
const MAX_WRITE: usize = 64 * 1024;
/// Encrypted bytes not yet written above which `poll_write` first waits for the socket.
const MAX_OUTGOING: usize = 64 * 1024;
/// Bytes a record adds to its plaintext (header, nonce, tag, content type), rounded up:
/// a first guess at the room encryption needs (rustls says if it needs more).
const RECORD_OVERHEAD: usize = 64;

/// The acceptor for client connections.
#[derive(Clone)]
pub struct Acceptor(Arc<rustls::ServerConfig>);

impl Acceptor {
    pub fn new(config: Arc<rustls::ServerConfig>) -> Acceptor {
        Acceptor(config)
    }

    /// Runs the handshake on `tcp`; the stream it returns carries application data.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<AcceptedTls> {
        let conn = UnbufferedServerConnection::new(self.0.clone()).map_err(tls_error)?;
        let mut tls = AcceptedTls {
            tcp,
            conn,
            incoming: Vec::new(),
            incoming_start: 0,
            plaintext: Vec::new(),
            plaintext_read: 0,
            outgoing: Vec::new(),
            outgoing_sent: 0,
            peer_closed: false,
            close_notify_sent: false,
            failed: false,
        };
        std::future::poll_fn(|cx| tls.poll_handshake(cx)).await?;
        Ok(tls)
    }
}

/// A client's TLS connection after its handshake.
pub struct AcceptedTls {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Bytes read from the socket; from `incoming_start` on, those rustls has not consumed
    /// yet (a record's beginning, or records behind one a read could not take whole).
    /// Unallocated once all are consumed, which is the rule between reads. (Consumed bytes
    /// are cut off before the next read, not after each record: a buffer of many small
    /// records is moved once, not once per record.)
    incoming: Vec<u8>,
    incoming_start: usize,
    /// Plaintext of a record the reader's buffer could not take whole; `plaintext_read`
    /// bytes of it have been handed out.
    plaintext: Vec<u8>,
    plaintext_read: usize,
    /// Encrypted bytes the socket has not taken yet; `outgoing_sent` of them it has.
    outgoing: Vec<u8>,
    outgoing_sent: usize,
    /// The client sent `close_notify`: reads end once `plaintext` is handed out.
    peer_closed: bool,
    close_notify_sent: bool,
    /// A TLS error ended the connection (rustls would go on encrypting).
    failed: bool,
}

/// What one look at the connection's state asks for next.
enum Next {
    Again,
    ReadMore,
    Done,
}

impl AcceptedTls {
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let UnbufferedStatus { mut discard, state } = self
                .conn
                .process_tls_records(&mut self.incoming[self.incoming_start..]);
            let next = match state {
                Err(e) => {
                    self.consumed(discard);
                    return Poll::Ready(Err(self.fail(e)));
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    append_tls_data(&mut encode, &mut self.outgoing)?;
                    Next::Again
                }
                // rustls' part is done once the bytes are in `outgoing`: they go out, in
                // order, before anything written after them.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    Next::Again
                }
                Ok(ConnectionState::BlockedHandshake) => Next::ReadMore,
                // Application data may flow: the client's Finished is in (rustls sends
                // no data before it), the tickets after it are encoded.
                Ok(ConnectionState::WriteTraffic(_)) => Next::Done,
                Ok(ConnectionState::ReadTraffic(records)) => {
                    match keep_records(records, &mut self.plaintext) {
                        Ok(more) => discard += more,
                        Err(e) => {
                            self.consumed(discard);
                            return Poll::Ready(Err(self.fail(e)));
                        }
                    }
                    Next::Again
                }
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()))
                }
                Ok(_) => return Poll::Ready(Err(unexpected_state())),
            };
            self.consumed(discard);
            match next {
                Next::Again => {}
                Next::ReadMore => {
                    ready!(self.poll_write_outgoing(cx))?;
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
                Next::Done => return self.poll_write_outgoing(cx),
            }
        }
    }

    /// Reads what the socket has into `incoming`: 0 at the end of the stream. An idle
    /// client, whose read is pending, holds no receive buffer.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming_start > 0 {
            self.incoming.drain(..self.incoming_start);
            self.incoming_start = 0;
        }
        if self.incoming.len() >= MAX_INCOMING {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS: a record or handshake message larger than TLS allows",
            )));
        }
        // (Through `poll_read`, not `try_read`: a read that fills less than its buffer
        // clears the socket's readiness, so the next read waits for epoll instead of
        // making a system call that finds nothing.)
        if self.incoming.is_empty() {
            // The common case, a statement or two in one record: read on the stack and
            // keep exactly what came (a small block malloc serves from its per-thread
            // cache, where a 4 KiB one goes through its bins).
            let mut small = [0u8; SMALL_READ];
            let mut read = ReadBuf::new(&mut small);
            ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut read))?;
            self.incoming = read.filled().to_vec();
            return Poll::Ready(Ok(self.incoming.len()));
        }
        // Room for the rest of the record at the front, as its header says (a bulk COPY
        // sends 16 KiB records: one read each, not one per 4 KiB), at least READ_SIZE.
        // (Mid-handshake the front may be a message rustls is joining: then this is only
        // a guess at the room, never more than a record.)
        let len = self.incoming.len();
        let record_rest = match self.incoming.get(3..5) {
            Some(&[high, low]) => {
                (5 + usize::from(u16::from_be_bytes([high, low]))).saturating_sub(len)
            }
            _ => 0,
        };
        self.incoming
            .resize(len + record_rest.clamp(READ_SIZE, MAX_RECORD), 0);
        let mut read = ReadBuf::new(&mut self.incoming[len..]);
        let polled = Pin::new(&mut self.tcp).poll_read(cx, &mut read);
        let n = read.filled().len();
        self.incoming.truncate(len + n);
        ready!(polled)?;
        Poll::Ready(Ok(n))
    }

    /// Writes `outgoing` until the socket has all of it, then lets its room go.
    fn poll_write_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.outgoing_sent < self.outgoing.len() {
            let n = ready!(
                Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.outgoing_sent..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing_sent += n;
        }
        self.outgoing = Vec::new();
        self.outgoing_sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes what of `outgoing` the socket takes now, without waiting.
    fn write_outgoing_now(&mut self) -> io::Result<()> {
        while self.outgoing_sent < self.outgoing.len() {
            match self.tcp.try_write(&self.outgoing[self.outgoing_sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.outgoing_sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.outgoing = Vec::new();
        self.outgoing_sent = 0;
        Ok(())
    }

    /// What was consumed of the received bytes: `discard` more of them.
    fn consumed(&mut self, discard: usize) {
        self.incoming_start += discard;
        if self.incoming_start >= self.incoming.len() {
            self.incoming = Vec::new();
            self.incoming_start = 0;
        }
    }

    /// A TLS error ends the connection: rustls may have an alert for the client, which
    /// gets one try; nothing is read or written after it.
    fn fail(&mut self, e: rustls::Error) -> io::Error {
        self.failed = true;
        let UnbufferedStatus { discard, state } = self
            .conn
            .process_tls_records(&mut self.incoming[self.incoming_start..]);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = state {
            if append_tls_data(&mut encode, &mut self.outgoing).is_ok() {
                let _ = self.write_outgoing_now();
            }
        }
        self.consumed(discard);
        tls_error(e)
    }

    fn check_failed(&self) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS: the connection failed",
            ));
        }
        Ok(())
    }

    /// Brings the connection to where application data may be encrypted (encoding what
    /// rustls has to send first) and encrypts with `encrypt` into `outgoing`.
    fn encrypt_with(
        &mut self,
        guess: usize,
        mut encrypt: impl FnMut(
            &mut WriteTraffic<'_, ServerConnectionData>,
            &mut [u8],
        ) -> Result<usize, EncryptError>,
    ) -> io::Result<()> {
        self.check_failed()?;
        loop {
            // rustls is given the received bytes as they are (it may hold offsets into
            // them): records it decrypts here wait in `plaintext` for the reader, in order.
            // (A reader waits for the socket only when no whole record is left in them.)
            let UnbufferedStatus { mut discard, state } = self
                .conn
                .process_tls_records(&mut self.incoming[self.incoming_start..]);
            let encrypted = match state {
                Err(e) => {
                    self.consumed(discard);
                    return Err(self.fail(e));
                }
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    Some(append_encoded(&mut self.outgoing, guess, |out| {
                        encrypt(&mut traffic, out).map_err(|e| match e {
                            EncryptError::InsufficientSize(s) => Some(s.required_size),
                            _ => None,
                        })
                    }))
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    append_tls_data(&mut encode, &mut self.outgoing)?;
                    None
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    None
                }
                Ok(ConnectionState::ReadTraffic(records)) => {
                    match keep_records(records, &mut self.plaintext) {
                        Ok(more) => discard += more,
                        Err(e) => {
                            self.consumed(discard);
                            return Err(self.fail(e));
                        }
                    }
                    None
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    None
                }
                Ok(ConnectionState::Closed) => return Err(io::ErrorKind::BrokenPipe.into()),
                Ok(_) => return Err(unexpected_state()),
            };
            self.consumed(discard);
            if let Some(encrypted) = encrypted {
                return encrypted;
            }
        }
    }
}

impl AsyncRead for AcceptedTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.plaintext_read < this.plaintext.len() {
                let rest = &this.plaintext[this.plaintext_read..];
                let n = rest.len().min(buf.remaining());
                buf.put_slice(&rest[..n]);
                this.plaintext_read += n;
                if this.plaintext_read == this.plaintext.len() {
                    this.plaintext = Vec::new();
                    this.plaintext_read = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            this.check_failed()?;
            let mut read_more = this.incoming_start == this.incoming.len();
            if !read_more {
                let UnbufferedStatus { mut discard, state } = this
                    .conn
                    .process_tls_records(&mut this.incoming[this.incoming_start..]);
                let filled_before = buf.filled().len();
                match state {
                    Err(e) => {
                        this.consumed(discard);
                        return Poll::Ready(Err(this.fail(e)));
                    }
                    Ok(ConnectionState::ReadTraffic(mut records)) => {
                        // Straight into the reader's buffer; what does not fit waits in
                        // `plaintext` (rustls decrypts one record per call).
                        while buf.remaining() > 0 {
                            let Some(record) = records.next_record() else {
                                break;
                            };
                            let record = match record {
                                Ok(record) => record,
                                Err(e) => {
                                    drop(records);
                                    this.consumed(discard);
                                    return Poll::Ready(Err(this.fail(e)));
                                }
                            };
                            discard += record.discard;
                            let n = record.payload.len().min(buf.remaining());
                            buf.put_slice(&record.payload[..n]);
                            this.plaintext.extend_from_slice(&record.payload[n..]);
                        }
                    }
                    Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                        append_tls_data(&mut encode, &mut this.outgoing)?;
                    }
                    // After the handshake: session tickets, sent without waiting (the
                    // next write or flush sends what the socket did not take).
                    Ok(ConnectionState::TransmitTlsData(transmit)) => {
                        transmit.done();
                        this.write_outgoing_now()?;
                    }
                    Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                        this.peer_closed = true;
                    }
                    Ok(ConnectionState::WriteTraffic(_) | ConnectionState::BlockedHandshake) => {
                        read_more = true;
                    }
                    Ok(_) => return Poll::Ready(Err(unexpected_state())),
                }
                this.consumed(discard);
                // A record of no bytes is no end of stream: only bytes are an answer.
                if buf.filled().len() > filled_before {
                    return Poll::Ready(Ok(()));
                }
            }
            if read_more && ready!(this.poll_fill(cx))? == 0 {
                // The TCP stream ended; whatever `incoming` holds is an unfinished record.
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for AcceptedTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.outgoing.len() - this.outgoing_sent >= MAX_OUTGOING {
            ready!(this.poll_write_outgoing(cx))?;
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        let guess = data.len() + RECORD_OVERHEAD * (1 + data.len() / 16_384);
        this.encrypt_with(guess, |traffic, out| traffic.encrypt(data, out))?;
        this.write_outgoing_now()?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_write_outgoing(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_notify_sent && !this.failed {
            this.close_notify_sent = true;
            this.encrypt_with(RECORD_OVERHEAD, |traffic, out| {
                traffic.queue_close_notify(out)
            })?;
        }
        ready!(this.poll_write_outgoing(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// Appends what `write` puts into a slice to `out`, giving it the room it asks for
/// (`Err(Some(n))`: n bytes are needed; `Err(None)`: it cannot).
fn append_encoded(
    out: &mut Vec<u8>,
    guess: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> io::Result<()> {
    let start = out.len();
    let mut room = guess;
    loop {
        out.resize(start + room, 0);
        match write(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(Some(needed)) if needed > room => room = needed,
            Err(_) => {
                out.truncate(start);
                return Err(io::Error::other("TLS: cannot encode a record"));
            }
        }
    }
}

/// Appends a record rustls has ready (handshake, alert, ticket) to `out`.
fn append_tls_data(
    encode: &mut EncodeTlsData<'_, ServerConnectionData>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    append_encoded(out, 0, |room| {
        encode.encode(room).map_err(|e| match e {
            EncodeError::InsufficientSize(s) => Some(s.required_size),
            _ => None,
        })
    })
}

/// Moves decrypted records that nobody asked for yet into `plaintext`; returns the bytes
/// the records add to the status' `discard`.
fn keep_records(
    mut records: ReadTraffic<'_, '_, ServerConnectionData>,
    plaintext: &mut Vec<u8>,
) -> Result<usize, rustls::Error> {
    let mut discard = 0;
    while let Some(record) = records.next_record() {
        let record = record?;
        discard += record.discard;
        plaintext.extend_from_slice(record.payload);
    }
    Ok(discard)
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn unexpected_state() -> io::Error {
    io::Error::other("TLS: a connection state rolegate does not handle (early data)")
}
