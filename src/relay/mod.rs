//! The two-way copy between a client and its backend, judging what the client sends.
//!
//! Frames are cut by their length and forwarded as the bytes they arrived as; only
//! `Query`, `Parse` and `FunctionCall` are read (by the policy), and on the way back only
//! the tag of each message is looked at, plus the few small messages that matter:
//! `ReadyForQuery`, `ParameterStatus` and (while a refusal is pending) `ErrorResponse`.
//! Every complete frame in a read goes out in one write.
//!
//! A refused statement never reaches the server. In its place rolegate sends a statement
//! that fails in the parser (`rolegate_refused_<n>`), so the server itself puts the
//! transaction into the failed state and skips the rest of an extended-protocol batch up
//! to `Sync`, exactly as it would have for a statement it refused. On the way back the
//! syntax error that carries the marker is replaced by rolegate's own error; everything
//! else (ReadyForQuery and its transaction status) comes from the server.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::metrics::{DirectionLabel, Metrics, RefusalLabels};
use crate::policy::fastpath::LargeObjectFunctions;
use crate::policy::{PassActions, Policy, Refusal, Requester, SessionVerdicts};
use crate::tls::MaybeTls;
use crate::wire::{self, ErrorFields, WireError};

mod checks;
pub mod pooled;

use checks::{StatementCheck, StatementChecks};

/// Size of the read buffers; a read fills at most what is free in them.
const READ_CHUNK: usize = 16 * 1024;

/// Size of the buffer an idle client in transaction mode is read into: the first message
/// of a transaction (most fit: pgbench's, a driver's Bind/Execute/Sync or a short
/// Parse/Bind/Describe/Execute/Sync), which then moves into the large buffer its backend
/// session lends it; a longer one takes one more read.
const IDLE_READ: usize = 256;

/// What a session's relay needs to know.
pub struct RelayContext<'a> {
    pub policy: &'a Policy,
    pub requester: Requester<'a>,
    /// The server's `standard_conforming_strings` when the session started.
    pub standard_conforming_strings: bool,
    /// Largest message accepted from the client.
    pub max_message_bytes: usize,
    /// End the session when the client was idle this long (outside a transaction).
    pub idle_timeout: Option<Duration>,
    /// Becomes true when rolegate shuts down: the session ends at its next idle moment.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub metrics: &'a Metrics,
    /// The server's large-object functions: the only ones FunctionCall may call.
    pub large_objects: &'a LargeObjectFunctions,
    /// Puts the session back into its role (and read-only mode) after DISCARD ALL.
    pub restore_sql: &'a str,
    /// Transaction pooling: the pool the backend sessions are borrowed from.
    pub pooling: Option<&'a std::sync::Arc<crate::pool::Pool>>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    pub client_bytes: u64,
    pub server_bytes: u64,
    pub refused: u64,
}

/// How a relay ended.
#[derive(Debug, thiserror::Error)]
pub enum RelayEnd {
    #[error("client closed the session")]
    ClientClosed,
    #[error("server closed the session")]
    ServerClosed,
    #[error("client i/o error: {0}")]
    ClientIo(std::io::Error),
    #[error("server i/o error: {0}")]
    ServerIo(std::io::Error),
    #[error("client protocol violation: {0}")]
    ClientProtocol(WireError),
    #[error("server protocol violation: {0}")]
    ServerProtocol(WireError),
    #[error("ended at shutdown")]
    Shutdown,
    #[error("ended after idle_client_timeout")]
    IdleTimeout,
    #[error("the session's role could not be set again after DISCARD ALL")]
    RoleLost,
    #[error("the server reported a client_encoding rolegate cannot judge statements in")]
    UnsupportedEncoding,
    /// Transaction pooling: the backend session is idle and goes back to the pool.
    #[error("backend connection given back")]
    Released,
    #[error("the backend connection was lost while the client was using it")]
    BackendLost,
    /// Transaction pooling: the settings the client's last transaction changed could
    /// not be read back (why: the string), so its next transaction could not run with
    /// them.
    #[error(
        "the settings this session changed could not be read back from its backend connection ({0}); its next transaction cannot run without them"
    )]
    SettingsLost(String),
}

/// A refusal waiting for the server's syntax error that carries its marker.
struct PendingRefusal {
    marker: Bytes,
    /// The number of ReadyForQuery messages after which the marker can no longer come.
    until_ready: u64,
    error: Bytes,
}

/// State the two directions share. Both run in one task, so nothing here is contended.
struct Shared {
    standard_conforming_strings: AtomicBool,
    pending: Mutex<VecDeque<PendingRefusal>>,
    /// Messages sent that the server answers with ReadyForQuery, and answers received.
    sync_points_sent: AtomicU64,
    ready_received: AtomicU64,
    /// The transaction status of the last ReadyForQuery.
    status: AtomicU8,
    /// Milliseconds since `started` of the last bytes from the client.
    last_client_activity_ms: AtomicU64,
    started: Instant,
    /// The ReadyForQuery numbers that answer rolegate's own queries (the role set again
    /// after DISCARD ALL): everything the server sends for them stays with rolegate.
    own_queries: Mutex<VecDeque<u64>>,
    /// Whether `own_queries` may be non-empty: read per message, so no lock then.
    has_own_queries: AtomicBool,
    /// The client's side, waiting for the answer to the role set again (see
    /// `Upstream::restore_at`): woken when a reply to an own query is complete.
    upstream_waiting: Mutex<Option<std::task::Waker>>,
    /// Transaction pooling: what the current lease of a backend session carries.
    lease: Option<Mutex<pooled::LeaseState>>,
    /// Whether the lease has replies to fix up (read per message, so no lock then).
    has_fixups: AtomicBool,
    /// Extended-protocol messages were sent after the last Sync: the backend session is
    /// in the middle of something even when every Sync was answered.
    unsynced: AtomicBool,
    /// CopyInResponses the server sent (COPY FROM STDIN began).
    copy_ins: AtomicU64,
    /// Bytes judged for the server are not all written yet: the backend session is in the
    /// middle of a message.
    unsent: AtomicBool,
    /// Transaction pooling: what the server owes can no longer be known exactly (see
    /// `Upstream::note_order`); the backend session is never lent to anyone else.
    ambiguous: AtomicBool,
}

impl Shared {
    fn new(standard_conforming_strings: bool, pooled: bool) -> Shared {
        Shared {
            standard_conforming_strings: AtomicBool::new(standard_conforming_strings),
            pending: Mutex::new(VecDeque::new()),
            sync_points_sent: AtomicU64::new(0),
            ready_received: AtomicU64::new(0),
            status: AtomicU8::new(b'I'),
            last_client_activity_ms: AtomicU64::new(0),
            started: Instant::now(),
            own_queries: Mutex::new(VecDeque::new()),
            has_own_queries: AtomicBool::new(false),
            upstream_waiting: Mutex::new(None),
            lease: pooled.then(|| Mutex::new(pooled::LeaseState::default())),
            has_fixups: AtomicBool::new(false),
            unsynced: AtomicBool::new(false),
            copy_ins: AtomicU64::new(0),
            unsent: AtomicBool::new(false),
            ambiguous: AtomicBool::new(false),
        }
    }

    fn wake_upstream(&self) {
        let waiting = self
            .upstream_waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(waker) = waiting {
            waker.wake();
        }
    }

    fn own_queries(&self) -> std::sync::MutexGuard<'_, VecDeque<u64>> {
        self.own_queries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Nothing in flight and no transaction open: ending the session now loses nothing.
    fn is_idle(&self) -> bool {
        self.status.load(Ordering::Relaxed) == b'I'
            && self.sync_points_sent.load(Ordering::Relaxed)
                == self.ready_received.load(Ordering::Relaxed)
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_client_activity_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Resolves when the session should be closed for rolegate's own reasons.
    async fn closing(
        &self,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        idle_timeout: Option<Duration>,
    ) -> RelayEnd {
        let tick = Duration::from_millis(50);
        loop {
            let shutting_down = *shutdown.borrow();
            if shutting_down && self.is_idle() {
                return RelayEnd::Shutdown;
            }
            if let Some(limit) = idle_timeout {
                if self.is_idle() && self.idle_for() >= limit {
                    return RelayEnd::IdleTimeout;
                }
            }
            match (shutting_down, idle_timeout) {
                (true, _) => tokio::time::sleep(tick).await,
                (false, Some(limit)) => {
                    tokio::select! {
                        _ = tokio::time::sleep((limit / 4).max(tick)) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                (false, None) => {
                    if shutdown.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, VecDeque<PendingRefusal>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Polls its future only when that future's own waker fired (and on the first poll).
///
/// `select!` polls every branch whenever the task wakes, which is twice per round trip.
/// The closing future waits on the one shutdown channel all sessions share, and polling
/// that takes a lock that every session on every worker thread takes too; gated, it is
/// polled only when shutdown or its idle timer actually wakes it.
struct PollWhenWoken<F> {
    inner: std::pin::Pin<Box<F>>,
    gate: std::sync::Arc<Gate>,
    waker: std::task::Waker,
    /// The task's waker as last registered with the gate.
    registered: Option<std::task::Waker>,
}

struct Gate {
    woken: AtomicBool,
    /// The waker of the task that polls the gate. Kept, not taken, by a wake: the task
    /// registers it once, and the gate may fire many times (shutdown's ticks, the idle
    /// timer).
    task: Mutex<Option<std::task::Waker>>,
}

impl std::task::Wake for Gate {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

impl<F: std::future::Future> PollWhenWoken<F> {
    fn new(inner: F) -> Self {
        let gate = std::sync::Arc::new(Gate {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        PollWhenWoken {
            inner: Box::pin(inner),
            waker: std::task::Waker::from(gate.clone()),
            gate,
            registered: None,
        }
    }
}

impl<F: std::future::Future> std::future::Future for PollWhenWoken<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        // Register first: a wake after the check below then wakes this task again. A
        // task's waker rarely changes; comparing it is cheaper than registering it.
        if !self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            *self.gate.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
            self.registered = Some(cx.waker().clone());
        }
        if !self.gate.woken.load(Ordering::Relaxed)
            || !self.gate.woken.swap(false, Ordering::Acquire)
        {
            return std::task::Poll::Pending;
        }
        let this = &mut *self;
        this.inner
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&this.waker))
    }
}

/// Relays until either side ends; returns the byte counts and how it ended.
pub async fn run(
    client: MaybeTls,
    server: MaybeTls,
    ctx: &RelayContext<'_>,
) -> (RelayStats, RelayEnd) {
    match (client, server) {
        (MaybeTls::Plain(mut c), MaybeTls::Plain(mut s)) => {
            let (cr, cw) = c.split();
            let (sr, sw) = s.split();
            pump(cr, cw, sr, sw, ctx).await
        }
        (c, s) => {
            let (cr, cw) = tokio::io::split(c);
            let (sr, sw) = tokio::io::split(s);
            pump(cr, cw, sr, sw, ctx).await
        }
    }
}

/// Relays between any two byte streams (used by the benches with in-memory pipes).
pub async fn run_io<C, S>(client: C, server: S, ctx: &RelayContext<'_>) -> (RelayStats, RelayEnd)
where
    C: AsyncRead + AsyncWrite,
    S: AsyncRead + AsyncWrite,
{
    let (cr, cw) = tokio::io::split(client);
    let (sr, sw) = tokio::io::split(server);
    pump(cr, cw, sr, sw, ctx).await
}

async fn pump<CR, CW, SR, SW>(
    mut client_r: CR,
    mut client_w: CW,
    mut server_r: SR,
    mut server_w: SW,
    ctx: &RelayContext<'_>,
) -> (RelayStats, RelayEnd)
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    let shared = Shared::new(ctx.standard_conforming_strings, false);
    let mut up = Upstream::new(ctx);
    let mut down = Downstream::new(ctx.metrics);
    let end = {
        let c2s = up.run(&mut client_r, &mut server_w, &shared);
        let s2c = down.run(&mut server_r, &mut client_w, &shared);
        let closing = PollWhenWoken::new(shared.closing(ctx.shutdown.clone(), ctx.idle_timeout));
        // (biased: a fixed order costs no random number per wake.)
        tokio::select! {
            biased;
            end = c2s => end,
            end = s2c => end,
            end = closing => end,
        }
    };
    say_goodbye(&end, &mut down, &mut client_w).await;
    // Tell a server that is still there that the session is over rather than just dropping
    // the socket. (After a client Terminate the server has it already; a second one is
    // harmless.)
    if matches!(
        end,
        RelayEnd::Shutdown | RelayEnd::IdleTimeout | RelayEnd::ClientClosed | RelayEnd::ClientIo(_)
    ) {
        let mut terminate = BytesMut::new();
        wire::put_message(&mut terminate, b'X', &[]);
        let _ = server_w.write_all(&terminate).await;
    }
    close_client(&mut client_w).await;
    let _ = server_w.shutdown().await;
    let stats = RelayStats {
        client_bytes: up.bytes,
        server_bytes: down.bytes,
        refused: up.refused,
    };
    (stats, end)
}

/// Writes what is judged and waiting: `out` first, then the first `*judged` bytes of
/// `buf`, then flushes. Each write advances past what it wrote, so when `select!` drops
/// this future halfway the next call goes on from there: nothing is sent twice, nothing
/// is lost. `unflushed` stays set until the flush is done: a TLS stream may still hold
/// written bytes (plain TCP holds none).
async fn send_judged<W: AsyncWrite + Unpin>(
    w: &mut W,
    out: &mut BytesMut,
    buf: &mut BytesMut,
    judged: &mut usize,
    unflushed: &mut bool,
) -> std::io::Result<()> {
    *unflushed = true;
    while !out.is_empty() {
        let n = w.write(out).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        out.advance(n);
    }
    while *judged > 0 {
        let n = w.write(&buf[..*judged]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf.advance(n);
        *judged -= n;
    }
    w.flush().await?;
    *unflushed = false;
    Ok(())
}

/// How much of what a client sends while its frames are held (see `restored`) is read
/// ahead.
const READ_AHEAD_WHILE_HELD: usize = 64 * 1024;

/// Resolves once the server has sent ReadyForQuery number `restore_at` (that of the query
/// that set the role again after DISCARD ALL); `Downstream::own_reply` wakes it.
fn restored(restore_at: u64, shared: &Shared) -> impl std::future::Future<Output = ()> + '_ {
    let came = move || shared.ready_received.load(Ordering::Relaxed) >= restore_at;
    std::future::poll_fn(move |cx| {
        if !came() {
            *shared
                .upstream_waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
            // (Checked again: the answer may have come in between.)
            if !came() {
                return std::task::Poll::Pending;
            }
        }
        std::task::Poll::Ready(())
    })
}

/// How long each of a client's last words (why its session ends, then the end of the
/// stream) may take: they fit any socket buffer, so only a client that does not read is
/// waited for, and it cannot keep its session (or, in session mode, a backend session)
/// past its end.
const GOODBYE_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// The client hears why rolegate ended its session, as PostgreSQL's own FATALs do,
/// after what it is owed (the rest of a write the end cut partway, replies already
/// judged): a FATAL written in the middle of a frame would be read as part of it. A frame
/// whose rest the server never sent cannot be finished, so then the client reads just
/// the end of the stream.
async fn say_goodbye<W: AsyncWrite + Unpin>(
    end: &RelayEnd,
    down: &mut Downstream,
    client_w: &mut W,
) {
    let Some((code, message)) = why_it_ended(end) else {
        return;
    };
    if down.passthrough > 0 {
        return;
    }
    let goodbye = async {
        down.send_owed(client_w).await?;
        let mut out = BytesMut::new();
        wire::put_error(&mut out, &ErrorFields::fatal(code, &message));
        client_w.write_all(&out).await?;
        client_w.flush().await
    };
    let _ = tokio::time::timeout(GOODBYE_WITHIN, goodbye).await;
}

/// The end of the client's stream (over TLS a close_notify, written like any record).
async fn close_client<W: AsyncWrite + Unpin>(client_w: &mut W) {
    let _ = tokio::time::timeout(GOODBYE_WITHIN, client_w.shutdown()).await;
}

/// The FATAL (SQLSTATE, message) a client hears when its session ends so; None for the
/// ends it caused or saw already.
fn why_it_ended(end: &RelayEnd) -> Option<(&'static str, String)> {
    match end {
        RelayEnd::Shutdown => Some((
            "57P01",
            "rolegate: terminating connection because rolegate is shutting down".to_owned(),
        )),
        RelayEnd::IdleTimeout => Some((
            "57P05",
            "rolegate: terminating connection due to idle_client_timeout".to_owned(),
        )),
        RelayEnd::ClientProtocol(e) => Some((
            "08P01",
            format!("rolegate: invalid message from client: {e}"),
        )),
        RelayEnd::RoleLost
        | RelayEnd::UnsupportedEncoding
        | RelayEnd::BackendLost
        | RelayEnd::SettingsLost(_) => {
            Some(("08006", format!("rolegate: terminating connection: {end}")))
        }
        _ => None,
    }
}

/// Client → server.
struct Upstream<'a> {
    ctx: &'a RelayContext<'a>,
    buf: BytesMut,
    out: BytesMut,
    /// Bytes of a forwarded frame that have not arrived yet; they pass unexamined.
    passthrough: usize,
    /// Bytes of an oversized, refused frame that have not arrived yet; they are dropped.
    discard: usize,
    /// Messages sent to the server that it answers with one ReadyForQuery each.
    sync_points: u64,
    next_marker: u64,
    bytes: u64,
    bytes_counter: crate::metrics::ShardedCounter,
    refused: u64,
    verdicts: SessionVerdicts,
    /// Prepared statements whose Bind needs a look (rare; empty for most sessions).
    statement_checks: StatementChecks,
    /// A DISCARD ALL was bound in the current extended-protocol batch.
    discard_all_in_batch: bool,
    /// Transaction pooling: the client's prepared statements (`None` in session mode).
    pooled: Option<Box<pooled::ClientStatements>>,
    /// What the last statement the policy let through leaves in the session.
    last_effects: crate::policy::SessionEffects,
    /// Extended-protocol messages sent since the last Sync (kept for transaction pooling).
    unsynced: bool,
    /// Syncs sent since the last Execute or Query (see the `c` / `f` frames in `scan`).
    syncs_since_execute: u64,
    /// COPY FROM STDIN operations the client ended (CopyDone or CopyFail).
    copy_ins_ended: u64,
    /// How many bytes at the front of `buf` are judged and wait to be written (after
    /// `out`, which holds rewritten frames and everything before them).
    judged: usize,
    /// A write to the server was not flushed yet (see `send_judged`).
    unflushed: bool,
    /// The client sent Terminate: the session ends once the judged bytes are written.
    terminate: bool,
    /// Bytes read before a backend session was leased wait in `buf` to be judged.
    resume: bool,
    /// CopyData was sent and no CopyDone or CopyFail yet.
    copy_data_open: bool,
    /// Transaction pooling: the frame at the front of `buf` names a statement whose
    /// meaning an earlier batch still decides (see `pooled::waits_for_earlier_batch`).
    held: bool,
    /// The ReadyForQuery number of the query that set the role again after DISCARD
    /// ALL, until it came (0: none waited for). Nothing the client sent after DISCARD
    /// ALL goes to the server before it: if the role could not be set, none of it may
    /// run without it.
    restore_at: u64,
}

impl<'a> Upstream<'a> {
    fn new(ctx: &'a RelayContext<'a>) -> Self {
        Upstream {
            ctx,
            buf: BytesMut::new(),
            out: BytesMut::new(),
            passthrough: 0,
            discard: 0,
            sync_points: 0,
            next_marker: 0,
            bytes: 0,
            bytes_counter: ctx
                .metrics
                .bytes
                .get_or_create(&DirectionLabel {
                    direction: "client_to_server",
                })
                .clone(),
            refused: 0,
            verdicts: SessionVerdicts::default(),
            statement_checks: Default::default(),
            discard_all_in_batch: false,
            pooled: ctx
                .pooling
                .map(|pool| Box::new(pooled::ClientStatements::new(pool))),
            last_effects: Default::default(),
            unsynced: false,
            syncs_since_execute: 0,
            copy_ins_ended: 0,
            judged: 0,
            unflushed: false,
            terminate: false,
            resume: false,
            copy_data_open: false,
            held: false,
            restore_at: 0,
        }
    }

    async fn run<R, W>(&mut self, client: &mut R, server: &mut W, shared: &Shared) -> RelayEnd
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if let Some(end) = self.step(client, server, shared).await {
                return end;
            }
        }
    }

    /// Reads from the client and forwards; or, if a cancelled step left judged bytes
    /// unsent (or `resume` says bytes read earlier wait to be judged), finishes that
    /// first. Cancellation-safe at every await.
    async fn step<R, W>(
        &mut self,
        client: &mut R,
        server: &mut W,
        shared: &Shared,
    ) -> Option<RelayEnd>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // (Once what went before, the role's query included, is all written.)
        if self.restore_at != 0 && !self.has_unsent() {
            loop {
                let restored = restored(self.restore_at, shared);
                // While it waits, a client that leaves is still noticed (a little is read
                // ahead, to be judged later; no more).
                if self.buf.len() >= READ_AHEAD_WHILE_HELD {
                    restored.await;
                    break;
                }
                tokio::select! {
                    biased;
                    () = restored => break,
                    read = self.read(client, shared) => if let Err(end) = read {
                        return Some(end);
                    },
                }
            }
            self.restore_at = 0;
            self.resume = true;
        }
        if self.held {
            if self.held_frame_waits(shared) {
                // The server's answers to the earlier batch wake the relay again.
                return std::future::pending().await;
            }
            self.held = false;
            self.resume = true;
        }
        if !std::mem::take(&mut self.resume) && !self.has_unsent() {
            if let Err(end) = self.read(client, shared).await {
                return Some(end);
            }
        }
        self.forward(server, shared).await
    }

    /// Something went to the server that is not complete yet: frames before a Sync, or
    /// part of a frame whose rest is still to come (forwarded or dropped unexamined).
    fn mid_batch(&self) -> bool {
        self.unsynced || self.passthrough > 0 || self.discard > 0
    }

    /// Reads what the client sent next into `buf`.
    async fn read<R: AsyncRead + Unpin>(
        &mut self,
        client: &mut R,
        shared: &Shared,
    ) -> Result<(), RelayEnd> {
        self.read_chunk(client, shared, READ_CHUNK).await
    }

    /// Reads into `buf`, first growing it by `chunk` if less than a quarter of that is
    /// free.
    async fn read_chunk<R: AsyncRead + Unpin>(
        &mut self,
        client: &mut R,
        shared: &Shared,
        chunk: usize,
    ) -> Result<(), RelayEnd> {
        if self.buf.capacity() - self.buf.len() < chunk / 4 {
            self.buf.reserve(chunk);
        }
        match client.read_buf(&mut self.buf).await {
            Ok(0) => Err(RelayEnd::ClientClosed),
            Ok(n) => {
                self.bytes += n as u64;
                self.bytes_counter.inc_by(n as u64);
                // Only the idle timeout reads it: no clock read per message without one.
                if self.ctx.idle_timeout.is_some() {
                    let now = shared.started.elapsed().as_millis() as u64;
                    shared.last_client_activity_ms.store(now, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(e) => Err(RelayEnd::ClientIo(e)),
        }
    }

    /// Judges the complete frames in `buf` and sends what passes to the server, in one
    /// write. Cancellation-safe: what was judged stays in `out` / the first `judged` bytes
    /// of `buf` until it is written, and a call after a cancelled one finishes it first.
    async fn forward<W: AsyncWrite + Unpin>(
        &mut self,
        server: &mut W,
        shared: &Shared,
    ) -> Option<RelayEnd> {
        loop {
            if self.has_unsent() {
                if let Err(e) = send_judged(
                    server,
                    &mut self.out,
                    &mut self.buf,
                    &mut self.judged,
                    &mut self.unflushed,
                )
                .await
                {
                    return Some(RelayEnd::ServerIo(e));
                }
                shared.unsent.store(false, Ordering::Relaxed);
                if std::mem::take(&mut self.terminate) {
                    return Some(RelayEnd::ClientClosed);
                }
                if self.buf.is_empty() {
                    return None;
                }
            }
            let syncs_before = self.sync_points;
            let (end, terminate) = match self.scan(shared) {
                Ok(scanned) => scanned,
                Err(e) => return Some(RelayEnd::ClientProtocol(e)),
            };
            if self.sync_points != syncs_before {
                self.ctx
                    .metrics
                    .queries
                    .inc_by(self.sync_points.saturating_sub(syncs_before));
                shared
                    .sync_points_sent
                    .store(self.sync_points, Ordering::Relaxed);
            }
            if shared.lease.is_some() {
                shared.unsynced.store(self.mid_batch(), Ordering::Relaxed);
            }
            if self.out.is_empty() {
                self.judged = end;
            } else {
                self.out.extend_from_slice(&self.buf[..end]);
                self.buf.advance(end);
            }
            self.terminate = terminate;
            if !self.has_unsent() {
                return std::mem::take(&mut self.terminate).then_some(RelayEnd::ClientClosed);
            }
            shared.unsent.store(true, Ordering::Relaxed);
        }
    }

    /// Transaction pooling: notes a client message whose replies cannot be known in
    /// advance. PostgreSQL ignores Sync and Flush during COPY FROM STDIN, ends the COPY
    /// with an error on any other message, and may end it with an error on any CopyData;
    /// after an error in an extended-protocol batch it skips everything, a Query too, up
    /// to Sync. So after CopyData, a Sync may or may not be answered; a Query or
    /// FunctionCall after unsynced extended messages may or may not run. Such a backend
    /// session can never be known at rest again: it stays with the client and is closed
    /// when the client leaves.
    fn note_order(&mut self, tag: u8, shared: &Shared) {
        let copy_running = self.copy_running(shared);
        if matches!(tag, b'd' | b'c' | b'f') && self.server_at_rest(shared) {
            // The server drops these outside COPY: nothing changes.
            return;
        }
        match tag {
            b'd' => self.copy_data_open = true,
            b'c' | b'f' => self.copy_data_open = false,
            b'S' | b'H' if self.copy_data_open => {
                self.make_ambiguous(shared, "Sync or Flush between CopyData messages");
            }
            b'S' | b'H' => {}
            _ if copy_running => self.make_ambiguous(shared, "a message inside COPY FROM STDIN"),
            b'Q' | b'F' if self.unsynced => {
                self.make_ambiguous(shared, "a Query or FunctionCall inside an extended batch");
            }
            _ => {}
        }
    }

    /// Transaction pooling: a Bind too large to hold whose head (portal and statement
    /// names) has arrived, and that needs no look at its parameters: how many bytes of it
    /// (from `pos`) to judge it by.
    fn large_bind_head(&self, tag: u8, pos: usize, size: usize, available: usize) -> Option<usize> {
        const LARGE_BIND: usize = 64 * 1024;
        if tag != b'B' || size < LARGE_BIND || self.pooled.is_none() || self.discard_all_in_batch {
            return None;
        }
        let body = &self.buf[pos + 5..pos + available];
        let portal_end = body.iter().position(|&b| b == 0)?;
        let name_len = body[portal_end + 1..].iter().position(|&b| b == 0)?;
        let name = &body[portal_end + 1..portal_end + 1 + name_len];
        if self.statement_checks.get(name).is_some() {
            return None;
        }
        Some(5 + portal_end + 1 + name_len + 1)
    }

    /// Whether the held frame (at the front of `buf`) must still wait.
    fn held_frame_waits(&self, shared: &Shared) -> bool {
        let Some((tag, len)) = wire::peek_header(&self.buf) else {
            return false;
        };
        let Ok(size) = wire::frame_size(len, self.ctx.max_message_bytes) else {
            return false;
        };
        self.buf
            .get(5..size.min(self.buf.len()))
            .is_some_and(|body| self.frame_waits(tag, body, self.buf.len() >= size, shared))
    }

    /// Transaction pooling: whether a frame (`body`: what has arrived of it) must wait
    /// for an earlier batch's answers: a simple Query (it may be DEALLOCATE ALL), or a
    /// Parse, Bind, Describe or Close of a statement that batch decides (see
    /// `pooled::waits_for_earlier_batch`). Judged when complete, but a large Bind (judged
    /// by its head, see `large_bind_head`) as soon as its name is there.
    fn frame_waits(&self, tag: u8, body: &[u8], complete: bool, shared: &Shared) -> bool {
        match tag {
            b'Q' => self.waits_for_earlier_batch(None, shared),
            b'P' | b'D' | b'C' if !complete => false,
            b'P' | b'B' | b'D' | b'C' => statement_name_of(tag, body)
                .is_some_and(|name| self.waits_for_earlier_batch(Some(name), shared)),
            _ => false,
        }
    }

    /// Everything sent was answered, no COPY runs or may be starting: a CopyData,
    /// CopyDone or CopyFail now is one the server drops.
    fn server_at_rest(&self, shared: &Shared) -> bool {
        !self.unsynced
            && !self.copy_running(shared)
            && shared.ready_received.load(Ordering::Relaxed) == self.sync_points
    }

    /// CopyData was sent without its end, or a COPY FROM STDIN the server began has not
    /// been ended by the client.
    fn copy_running(&self, shared: &Shared) -> bool {
        self.copy_data_open || shared.copy_ins.load(Ordering::Relaxed) > self.copy_ins_ended
    }

    /// The frame being judged runs whatever the server answered before it: nothing of
    /// an extended batch (whose error would skip it) or of a COPY (which it would end
    /// with an error) is in front of it.
    fn runs_for_certain(&self, shared: &Shared) -> bool {
        !self.unsynced && !self.copy_running(shared) && !shared.ambiguous.load(Ordering::Relaxed)
    }

    fn make_ambiguous(&self, shared: &Shared, why: &str) {
        if !shared.ambiguous.swap(true, Ordering::Relaxed) {
            tracing::info!(
                why,
                "the client sent messages whose replies cannot be predicted; its backend \
                 connection is never lent to anyone else (transaction mode) and DISCARD ALL \
                 is refused"
            );
        }
    }

    /// Judged bytes not yet written to the server.
    fn has_unsent(&self) -> bool {
        self.judged > 0 || !self.out.is_empty() || self.unflushed
    }

    /// Walks the complete frames in `buf`. Returns how many bytes at the front of `buf`
    /// are done (to forward, after whatever was put in `out`), and whether the client
    /// sent Terminate. A rewritten frame moves everything before it into `out`.
    fn scan(&mut self, shared: &Shared) -> Result<(usize, bool), WireError> {
        if self.restore_at != 0 {
            return Ok((0, false));
        }
        if self.discard > 0 {
            let n = self.discard.min(self.buf.len());
            self.buf.advance(n);
            self.discard -= n;
        }
        let mut pos = self.passthrough.min(self.buf.len());
        self.passthrough -= pos;
        while let Some((tag, len)) = wire::peek_header(&self.buf[pos..]) {
            let size = wire::frame_size(len, self.ctx.max_message_bytes)?;
            let available = self.buf.len() - pos;
            // (A Query may be DEALLOCATE ALL or DISCARD ALL.)
            if self.pooled.is_some()
                && self.frame_waits(
                    tag,
                    &self.buf[pos + 5..pos + size.min(available)],
                    available >= size,
                    shared,
                )
            {
                self.held = true;
                break;
            }
            self.note_order(tag, shared);
            // Bind and Close are read only while a statement needs a look at its Bind
            // (rare): everything else of the extended protocol passes by its header.
            // (With transaction pooling, statement names are rolegate's own on the server.)
            let judged = matches!(tag, b'Q' | b'P' | b'F')
                || (matches!(tag, b'B' | b'C')
                    && (!self.statement_checks.is_empty() || self.discard_all_in_batch))
                || (self.pooled.is_some() && matches!(tag, b'B' | b'C' | b'D'));
            if !judged {
                if available < size {
                    self.passthrough = size - available;
                    pos = self.buf.len();
                    break;
                }
                pos += size;
                match tag {
                    // A pooled backend session stays open for the next client.
                    b'X' if self.pooled.is_some() => return Ok((pos - size, true)),
                    b'S' => {
                        self.unsynced = false;
                        self.statement_checks.end_batch();
                        self.sync_points += 1;
                        self.syncs_since_execute += 1;
                        if std::mem::take(&mut self.discard_all_in_batch) {
                            self.restore_role_after(pos, shared);
                            pos = 0;
                            break;
                        }
                    }
                    b'X' => return Ok((pos, true)),
                    b'E' => {
                        self.unsynced = true;
                        self.syncs_since_execute = 0;
                    }
                    // The server ignores every Sync it gets in COPY FROM STDIN, which
                    // starts at the last Execute or Query: they get no ReadyForQuery.
                    // Only after a real CopyInResponse: a CopyDone outside COPY (the
                    // server ignores it) must not make a Sync look answered.
                    // (Outside COPY the server drops it: see `note_order`.)
                    b'c' | b'f' if self.server_at_rest(shared) => {}
                    b'c' | b'f' => {
                        let ignored = std::mem::take(&mut self.syncs_since_execute);
                        if shared.copy_ins.load(Ordering::Relaxed) > self.copy_ins_ended {
                            self.copy_ins_ended += 1;
                            self.sync_points -= ignored;
                        } else {
                            // No COPY known to be running: this ends one whose
                            // CopyInResponse is still on its way, or it is a stray the
                            // server drops. Syncs before it then may or may not have been
                            // answered.
                            self.copy_ins_ended += 1;
                            if ignored > 0 {
                                self.make_ambiguous(shared, "CopyDone or CopyFail after Sync");
                            }
                        }
                    }
                    // Harmless on their own (partial frames are counted apart).
                    b'd' | b'H' => {}
                    _ => self.unsynced = true,
                }
                continue;
            }
            // A statement longer than the policy judges is refused without buffering it.
            let oversized = matches!(tag, b'Q' | b'P')
                && size - 5 > self.ctx.policy.max_statement_bytes() + 1024;
            let head = (available < size && !oversized)
                .then(|| self.large_bind_head(tag, pos, size, available))
                .flatten();
            if available < size && !oversized && head.is_none() {
                break;
            }
            let decision = if oversized {
                Decision::Refuse(Box::new(oversized_refusal(size - 5)))
            } else if head.is_some() {
                self.pooled_use(tag, pos, size, head, shared)
            } else {
                self.decide(tag, pos, size, shared)
            };
            // (A refused extended-protocol frame becomes a failing Parse: the server then
            // skips to Sync, so the backend session is mid-batch all the same.)
            self.unsynced = !matches!(tag, b'Q' | b'F');
            match decision {
                Decision::Forward { restore_role } => {
                    pos += size;
                    if matches!(tag, b'Q' | b'F') {
                        self.sync_points += 1;
                        self.syncs_since_execute = 0;
                        self.statement_checks.end_batch();
                    }
                    if restore_role {
                        self.restore_role_after(pos, shared);
                        pos = 0;
                        break;
                    }
                }
                Decision::Replace {
                    frame,
                    restore_role,
                } => {
                    self.out.extend_from_slice(&self.buf[..pos]);
                    self.out.extend_from_slice(&frame);
                    self.buf.advance(pos + size);
                    pos = 0;
                    if tag == b'Q' {
                        self.sync_points += 1;
                        self.syncs_since_execute = 0;
                        self.statement_checks.end_batch();
                    }
                    if restore_role {
                        self.restore_role_after(0, shared);
                        break;
                    }
                }
                Decision::ReplaceHead { frame, consumed } => {
                    self.out.extend_from_slice(&self.buf[..pos]);
                    self.out.extend_from_slice(&frame);
                    self.buf.advance(pos + consumed);
                    let rest = size - consumed;
                    let here = rest.min(self.buf.len());
                    self.passthrough = rest - here;
                    pos = here;
                    break;
                }
                Decision::Refuse(refusal) => {
                    // Everything before the refused frame goes out first, via `out`.
                    self.out.extend_from_slice(&self.buf[..pos]);
                    let stand_in = match tag {
                        b'P' => {
                            let name =
                                parse_statement_name(&self.buf[pos + 5..pos + size.min(available)])
                                    .unwrap_or_default();
                            // Pooled: the client's names are not the server's.
                            if self.pooled.is_some() && !name.is_empty() {
                                StandIn::OwnParse
                            } else {
                                StandIn::Parse(name)
                            }
                        }
                        b'B' | b'C' | b'D' => StandIn::OwnParse,
                        _ => StandIn::Query,
                    };
                    self.substitute(stand_in, &refusal, shared);
                    let consumed = size.min(available);
                    self.discard = size - consumed;
                    self.buf.advance(pos + consumed);
                    pos = 0;
                }
            }
        }
        Ok((pos, false))
    }

    /// The verdict on one complete Query, Parse, FunctionCall, Bind or Close frame at
    /// `pos`, and what it means for the session's bookkeeping.
    fn decide(&mut self, tag: u8, pos: usize, size: usize, shared: &Shared) -> Decision {
        let frame = &self.buf[pos..pos + size];
        let body = &frame[5..];
        // (Describe and Close of what is there already run nothing.)
        if self.discard_all_in_batch && !matches!(tag, b'C' | b'D') {
            // After DISCARD ALL nothing may run before the role is set again (at Sync).
            return Decision::Refuse(Box::new(Refusal {
                code: "25001",
                message: "DISCARD ALL cannot be executed within a pipeline".into(),
                hint: Some("Send Sync right after the Execute of DISCARD ALL.".into()),
                kind: "DISCARD ALL".into(),
                leaves_owner_role: true,
            }));
        }
        const FORWARD: Decision = Decision::Forward {
            restore_role: false,
        };
        match tag {
            b'F' => {
                let refusal = crate::policy::fastpath::judge(
                    self.ctx.requester.class,
                    self.ctx.large_objects,
                    body,
                )
                .err()
                .and_then(|r| self.ctx.policy.audit(&self.ctx.requester, b"", r));
                refusal.map_or(FORWARD, |r| Decision::Refuse(Box::new(r)))
            }
            b'C' => {
                if let Some(name) = body.strip_prefix(b"S").and_then(|n| n.strip_suffix(&[0])) {
                    if !self.statement_checks.is_empty() {
                        let name = name.to_vec();
                        // (A name in bytes the client encoding does not allow fails.)
                        let certain = name.is_ascii() && self.runs_for_certain(shared);
                        self.statement_checks.replace(&name, None, certain);
                    }
                }
                if self.pooled.is_some() {
                    return self.pooled_close(pos, size, shared);
                }
                FORWARD
            }
            b'D' => self.pooled_use(tag, pos, size, None, shared),
            b'B' => {
                let Some(BindParts { statement, params }) = bind_parts(body) else {
                    return Decision::Refuse(Box::new(malformed_refusal("Bind")));
                };
                let refusal = match self.statement_checks.get(statement) {
                    Some(check)
                        if check.discard_all && shared.ambiguous.load(Ordering::Relaxed) =>
                    {
                        Some(ambiguous_discard_refusal())
                    }
                    Some(check) => {
                        self.discard_all_in_batch |= check.discard_all;
                        // NULL or missing: the server refuses it itself ("SET requires
                        // parameter name", or a parameter count mismatch).
                        let bound = |n: &u16| params.get(usize::from(*n) - 1).copied().flatten();
                        let policy = self.ctx.policy;
                        let who = &self.ctx.requester;
                        check
                            .setting_names
                            .iter()
                            .filter_map(bound)
                            .find_map(|name| policy.check_bound_setting(who, name))
                            .or_else(|| {
                                check
                                    .encodings
                                    .iter()
                                    .filter_map(bound)
                                    .find_map(|value| policy.check_bound_encoding(who, value))
                            })
                    }
                    None => None,
                };
                match refusal {
                    Some(r) => Decision::Refuse(Box::new(r)),
                    None if self.pooled.is_some() => self.pooled_use(tag, pos, size, None, shared),
                    None => FORWARD,
                }
            }
            _ => {
                let decision = self.decide_statement(tag, pos, size, shared);
                if self.pooled.is_none() {
                    return decision;
                }
                match tag {
                    b'P' => self.pooled_parse(pos, size, decision, shared),
                    b'Q' if !matches!(decision, Decision::Refuse(_)) => {
                        self.pooled_query(shared);
                        decision
                    }
                    _ => decision,
                }
            }
        }
    }

    /// A Query or Parse: the policy's verdict on its text.
    fn decide_statement(&mut self, tag: u8, pos: usize, size: usize, shared: &Shared) -> Decision {
        let body = &self.buf[pos + 5..pos + size];
        let (name, sql, tail): (&[u8], &[u8], &[u8]) = match tag {
            // A simple Query replaces the unnamed statement, as a Parse does.
            b'Q' => (b"", body.strip_suffix(&[0]).unwrap_or(body), b""),
            _ => match parse_parts(body) {
                Some(parts) => parts,
                None => return Decision::Refuse(Box::new(malformed_refusal("Parse"))),
            },
        };
        if sql.contains(&0) {
            return Decision::Refuse(Box::new(malformed_refusal(
                "statement text with a NUL byte",
            )));
        }
        let scs = shared.standard_conforming_strings.load(Ordering::Relaxed);
        let pass =
            match self
                .ctx
                .policy
                .check(&self.ctx.requester, sql, scs, Some(&mut self.verdicts))
            {
                Ok(pass) => pass,
                Err(refusal) => return Decision::Refuse(Box::new(refusal)),
            };
        // Whether the server certainly carries it out (see `runs_for_certain`): a Query,
        // or a Parse of the unnamed statement (PostgreSQL drops that first thing, even if
        // the new text then fails), in front of which nothing can fail, and whose text is
        // ASCII (bytes the client encoding does not allow fail before anything is
        // dropped). A Parse of a named statement may fail (a name in use, a syntax error,
        // a failed transaction).
        let certain =
            (tag == b'Q' || name.is_empty()) && sql.is_ascii() && self.runs_for_certain(shared);
        let Some(pass) = pass.actions() else {
            self.last_effects = Default::default();
            if !self.statement_checks.is_empty() {
                self.statement_checks.replace(name, None, certain);
            }
            return Decision::Forward {
                restore_role: false,
            };
        };
        let PassActions {
            rewritten,
            discard_all,
            bound_setting_names,
            bound_encodings,
            session_effects,
        } = *pass;
        self.last_effects = session_effects;
        if session_effects.settings {
            if let Some(statements) = self.pooled.as_mut() {
                // Custom settings are read back by name (PostgreSQL lists them nowhere);
                // a text whose names cannot be read off counts as unseen.
                let sql = String::from_utf8_lossy(sql);
                if !statements.note_custom_settings(&sql, scs) {
                    self.last_effects.unseen = true;
                }
            }
        }
        // (A Query's DISCARD ALL sets the role again itself, see `restore_role`.)
        let check = (tag == b'P'
            && (discard_all || !bound_setting_names.is_empty() || !bound_encodings.is_empty()))
        .then_some(StatementCheck {
            discard_all,
            setting_names: bound_setting_names,
            encodings: bound_encodings,
        });
        // (A Parse of a name the pooled client has already fails: the check stays as is.)
        let duplicate = tag == b'P'
            && !name.is_empty()
            && self
                .pooled
                .as_ref()
                .is_some_and(|statements| statements.has_named(name));
        if !duplicate {
            self.statement_checks.replace(name, check, certain);
        }
        let restore_role = tag == b'Q' && discard_all;
        if discard_all && shared.ambiguous.load(Ordering::Relaxed) {
            return Decision::Refuse(Box::new(ambiguous_discard_refusal()));
        }
        let Some(text) = rewritten else {
            return Decision::Forward { restore_role };
        };
        let mut body = BytesMut::with_capacity(name.len() + text.len() + tail.len() + 2);
        if tag == b'P' {
            body.put_slice(name);
            body.put_u8(0);
        }
        body.put_slice(&text);
        body.put_u8(0);
        body.put_slice(tail);
        let mut frame = BytesMut::with_capacity(body.len() + 5);
        wire::put_message(&mut frame, tag, &body);
        Decision::Replace {
            frame,
            restore_role,
        }
    }

    /// After DISCARD ALL (the frame that ends at `end`): the session's role is set again
    /// by a query of rolegate's own, whose answer the client never sees.
    /// Sends a query of rolegate's own before whatever the client sends next; its
    /// answers stay with rolegate, and its failure ends the session (see `own_reply`).
    fn queue_own_query(&mut self, sql: &str, shared: &Shared) {
        wire::put_query(&mut self.out, sql);
        self.sync_points += 1;
        shared
            .sync_points_sent
            .store(self.sync_points, Ordering::Relaxed);
        shared.own_queries().push_back(self.sync_points);
        shared.has_own_queries.store(true, Ordering::Relaxed);
        shared.unsent.store(true, Ordering::Relaxed);
    }

    fn restore_role_after(&mut self, end: usize, shared: &Shared) {
        self.out.extend_from_slice(&self.buf[..end]);
        self.buf.advance(end);
        wire::put_query(&mut self.out, self.ctx.restore_sql);
        self.sync_points += 1;
        self.restore_at = self.sync_points;
        shared.own_queries().push_back(self.sync_points);
        shared.has_own_queries.store(true, Ordering::Relaxed);
    }

    /// Puts the stand-in for a refused frame into `out` and registers the refusal.
    fn substitute(&mut self, stand_in: StandIn, refusal: &Refusal, shared: &Shared) {
        self.next_marker += 1;
        self.refused += 1;
        self.ctx
            .metrics
            .refusals
            .get_or_create(&RefusalLabels {
                class: self.ctx.requester.class.as_str().to_owned(),
                kind: refusal.kind.clone(),
            })
            .inc();
        let marker = format!("rolegate_refused_{}", self.next_marker);
        let parse_name = match stand_in {
            StandIn::Parse(name) => Some(name),
            // A name of rolegate's own, so the client's unnamed statement stays as it is.
            StandIn::OwnParse => Some(marker.as_bytes().to_vec()),
            StandIn::Query => None,
        };
        let until_ready = match &parse_name {
            // The server answers the batch's Sync, whenever it comes.
            Some(name) => {
                let mut body = BytesMut::new();
                body.put_slice(name);
                body.put_u8(0);
                body.put_slice(marker.as_bytes());
                body.put_u8(0);
                body.put_i16(0);
                wire::put_message(&mut self.out, b'P', &body);
                self.sync_points + 1
            }
            None => {
                wire::put_query(&mut self.out, &marker);
                self.sync_points += 1;
                self.sync_points
            }
        };
        let mut error = BytesMut::new();
        let mut fields = ErrorFields::error(refusal.code, &refusal.message);
        fields.hint = refusal.hint.as_deref();
        wire::put_error(&mut error, &fields);
        shared.pending().push_back(PendingRefusal {
            marker: Bytes::from(marker),
            until_ready,
            error: error.freeze(),
        });
    }
}

/// What happens to one judged client frame.
enum Decision {
    Forward {
        restore_role: bool,
    },
    /// Send this frame instead (a statement rewritten to keep the role).
    Replace {
        frame: BytesMut,
        restore_role: bool,
    },
    /// Boxed: refusals are rare, and a small `Decision` keeps the common path cheap.
    Refuse(Box<Refusal>),
    /// Transaction pooling, a large Bind judged by its head: send `frame`, skip the first
    /// `consumed` bytes of the client's frame and pass the rest through.
    ReplaceHead {
        frame: BytesMut,
        consumed: usize,
    },
}

/// What goes to the server in place of a refused frame: a statement that fails in the
/// parser and carries the marker.
enum StandIn {
    /// A Parse under the client's statement name (the refused frame was that Parse).
    Parse(Vec<u8>),
    /// A Parse under a name of rolegate's own (the refused frame was a Bind or Close).
    OwnParse,
    /// A simple Query (the refused frame was a Query or FunctionCall).
    Query,
}

/// DISCARD ALL needs rolegate's own query right after it (the role set again), whose
/// answers are told apart by their place: after messages whose answers could not be
/// predicted (see `Upstream::note_order`) that place is not known, so it is refused.
fn ambiguous_discard_refusal() -> Refusal {
    Refusal {
        code: "25001",
        message: "rolegate: DISCARD ALL cannot run in this session after messages whose \
                  answers could not be predicted (a Sync or Query inside COPY data, a Query \
                  inside an extended-protocol batch)"
            .into(),
        hint: Some("Reconnect to get a fresh session.".into()),
        kind: "DISCARD ALL".into(),
        leaves_owner_role: true,
    }
}

fn oversized_refusal(len: usize) -> Refusal {
    Refusal {
        code: "42501",
        message: format!(
            "rolegate: a statement message of {len} bytes is longer than rolegate judges ([policy] max_statement_bytes)"
        ),
        hint: None,
        kind: "oversized statement".into(),
        leaves_owner_role: false,
    }
}

fn malformed_refusal(what: &str) -> Refusal {
    Refusal {
        code: "08P01",
        message: format!("rolegate: malformed {what}"),
        hint: None,
        kind: "malformed message".into(),
        leaves_owner_role: false,
    }
}

/// The statement name of a Parse body (`name\0query\0…`).
fn parse_statement_name(body: &[u8]) -> Option<Vec<u8>> {
    let end = body.iter().position(|&b| b == 0)?;
    Some(body[..end].to_vec())
}

/// The prepared statement a Parse, Bind, Describe or Close body names, if not the
/// unnamed one.
fn statement_name_of(tag: u8, body: &[u8]) -> Option<&[u8]> {
    let rest = match tag {
        b'P' => body,
        b'B' => &body[body.iter().position(|&b| b == 0)? + 1..],
        _ => body.strip_prefix(b"S")?,
    };
    let name = &rest[..rest.iter().position(|&b| b == 0)?];
    (!name.is_empty()).then_some(name)
}

/// The query text of a Parse body, if the body is well formed.
#[cfg(test)]
fn parse_query_text(body: &[u8]) -> Option<&[u8]> {
    parse_parts(body).map(|(_, sql, _)| sql)
}

/// A Parse body's statement name, query text and parameter-type tail, if well formed.
fn parse_parts(body: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let name_end = body.iter().position(|&b| b == 0)?;
    let rest = &body[name_end + 1..];
    let query_end = rest.iter().position(|&b| b == 0)?;
    let tail = &rest[query_end + 1..];
    // Int16 count of parameter types, then an Int32 OID for each.
    if tail.len() < 2 {
        return None;
    }
    let count = i16::from_be_bytes([tail[0], tail[1]]);
    if count < 0 || tail.len() != 2 + 4 * count as usize {
        return None;
    }
    Some((&body[..name_end], &rest[..query_end], tail))
}

/// A Bind body's statement name and parameter values (`None` for NULL).
struct BindParts<'a> {
    statement: &'a [u8],
    params: Vec<Option<&'a [u8]>>,
}

/// The parts of a Bind body, if it is well formed.
fn bind_parts(body: &[u8]) -> Option<BindParts<'_>> {
    let portal_end = body.iter().position(|&b| b == 0)?;
    let rest = &body[portal_end + 1..];
    let statement_end = rest.iter().position(|&b| b == 0)?;
    let statement = &rest[..statement_end];
    let mut rest = &rest[statement_end + 1..];
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
        rest = tail;
        Some(head)
    };
    let formats = i16::from_be_bytes(take(2)?.try_into().ok()?);
    take(2 * usize::try_from(formats).ok()?)?;
    let count = i16::from_be_bytes(take(2)?.try_into().ok()?);
    let mut params = Vec::with_capacity(usize::try_from(count).ok()?);
    for _ in 0..count {
        let len = i32::from_be_bytes(take(4)?.try_into().ok()?);
        params.push(match usize::try_from(len) {
            Ok(len) => Some(take(len)?),
            Err(_) => None,
        });
    }
    Some(BindParts { statement, params })
}

/// Server → client.
#[derive(Default)]
struct Downstream {
    buf: BytesMut,
    out: BytesMut,
    passthrough: usize,
    ready_count: u64,
    bytes: u64,
    /// An ErrorResponse came for rolegate's own query now being answered.
    own_query_failed: bool,
    /// Why the session must end, found while scanning.
    end: Option<RelayEnd>,
    /// How many bytes at the front of `buf` wait to be written to the client (after
    /// `out`).
    judged: usize,
    /// A write to the client was not flushed yet (see `send_judged`).
    pub(crate) unflushed: bool,
    bytes_counter: Option<crate::metrics::ShardedCounter>,
}

impl Downstream {
    fn new(metrics: &Metrics) -> Downstream {
        Downstream {
            bytes_counter: Some(
                metrics
                    .bytes
                    .get_or_create(&DirectionLabel {
                        direction: "server_to_client",
                    })
                    .clone(),
            ),
            ..Downstream::default()
        }
    }

    /// Bytes the client is owed and has not had.
    fn owes_client(&self) -> bool {
        !self.out.is_empty() || self.judged > 0 || self.passthrough > 0
    }

    /// Queues a frame of rolegate's own for the client, after everything it is owed.
    fn push_own(&mut self, frame: &[u8]) {
        if self.judged > 0 {
            // (`out` goes first when written: what was judged moves there, in order.)
            self.out.extend_from_slice(&self.buf[..self.judged]);
            self.buf.advance(self.judged);
            self.judged = 0;
        }
        self.out.extend_from_slice(frame);
    }

    /// Writes what the client is owed. Cancellation-safe like `step`: a write cut
    /// partway leaves the rest owed.
    async fn send_owed<W: AsyncWrite + Unpin>(&mut self, client: &mut W) -> std::io::Result<()> {
        send_judged(
            client,
            &mut self.out,
            &mut self.buf,
            &mut self.judged,
            &mut self.unflushed,
        )
        .await
    }

    async fn run<R, W>(&mut self, server: &mut R, client: &mut W, shared: &Shared) -> RelayEnd
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if let Some(end) = self.step(server, client, shared).await {
                return end;
            }
        }
    }

    /// Reads what the server sent next and passes it on; or first finishes a write a
    /// cancelled step left. Cancellation-safe at every await.
    async fn step<R, W>(
        &mut self,
        server: &mut R,
        client: &mut W,
        shared: &Shared,
    ) -> Option<RelayEnd>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.judged == 0 && self.out.is_empty() && !self.unflushed {
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            match server.read_buf(&mut self.buf).await {
                Ok(0) => return Some(RelayEnd::ServerClosed),
                Ok(n) => {
                    self.bytes += n as u64;
                    if let Some(counter) = &self.bytes_counter {
                        counter.inc_by(n as u64);
                    }
                }
                Err(e) => return Some(RelayEnd::ServerIo(e)),
            }
            let end = self.scan(shared);
            if let Some(reason) = self.end.take() {
                // What came before the frame that ends the session is the client's (the
                // rest of a frame it has the head of, too): owed, so a FATAL after it
                // lands between frames.
                self.out.extend_from_slice(&self.buf[..end]);
                self.buf.advance(end);
                return Some(reason);
            }
            if self.out.is_empty() {
                self.judged = end;
            } else {
                self.out.extend_from_slice(&self.buf[..end]);
                self.buf.advance(end);
            }
        }
        let sent = send_judged(
            client,
            &mut self.out,
            &mut self.buf,
            &mut self.judged,
            &mut self.unflushed,
        );
        if let Err(e) = sent.await {
            return Some(RelayEnd::ClientIo(e));
        }
        None
    }

    fn scan(&mut self, shared: &Shared) -> usize {
        let mut pos = self.passthrough.min(self.buf.len());
        self.passthrough -= pos;
        while let Some((tag, len)) = wire::peek_header(&self.buf[pos..]) {
            // The server is trusted to send sane lengths, but a bad one must not panic.
            let size = match wire::frame_size(len, i32::MAX as usize) {
                Ok(size) => size,
                Err(e) => {
                    self.end = Some(RelayEnd::ServerProtocol(e));
                    return pos;
                }
            };
            let available = self.buf.len() - pos;
            // Notifications, notices and setting reports are the client's whoever caused
            // them; everything else answering rolegate's own query is rolegate's.
            let own = shared.has_own_queries.load(Ordering::Relaxed)
                && !matches!(tag, b'A' | b'N' | b'S')
                && shared.own_queries().front() == Some(&(self.ready_count + 1));
            // (Transaction mode: every ParseComplete and CloseComplete must answer a
            // recorded Parse or Close.)
            let fixup = (matches!(tag, b'1' | b'3') && shared.lease.is_some())
                || (tag == b'C' && shared.has_fixups.load(Ordering::Relaxed));
            let inspected = own || fixup || matches!(tag, b'Z' | b'S' | b'E' | b'G');
            if available < size {
                if inspected {
                    break;
                }
                self.passthrough = size - available;
                return self.buf.len();
            }
            if own {
                self.own_reply(tag, pos, size, shared);
                self.out.extend_from_slice(&self.buf[..pos]);
                self.buf.advance(pos + size);
                pos = 0;
                if self.end.is_some() {
                    // The role was not restored: what follows ran without it and is
                    // never the client's (what came before may still be sent).
                    return 0;
                }
                continue;
            }
            // (Of CommandCompletes, only DEALLOCATE ALL's and DISCARD ALL's are recorded.)
            if fixup && (tag != b'C' || pooled::drops_all(&self.buf[pos..pos + size])) {
                let kept = match self.fix_up(tag, shared) {
                    pooled::Reply::Forward => None,
                    pooled::Reply::Drop => Some(&[][..]),
                    pooled::Reply::ParseComplete => Some(&b"1\0\0\0\x04"[..]),
                    pooled::Reply::Unexpected => {
                        shared.ambiguous.store(true, Ordering::Relaxed);
                        self.end =
                            Some(RelayEnd::ServerProtocol(WireError::Unexpected(tag as char)));
                        return pos;
                    }
                };
                if let Some(replacement) = kept {
                    self.out.extend_from_slice(&self.buf[..pos]);
                    self.out.extend_from_slice(replacement);
                    self.buf.advance(pos + size);
                    pos = 0;
                    continue;
                }
            }
            match tag {
                b'Z' => {
                    self.ready(pos, size, shared);
                }
                b'G' => {
                    shared.copy_ins.fetch_add(1, Ordering::Relaxed);
                }
                b'S' => {
                    let body = &self.buf[pos + 5..pos + size];
                    if let Some(lease) = &shared.lease {
                        pooled::record_parameter_status(lease, &self.buf[pos..pos + size]);
                    }
                    if let Some(value) = body.strip_prefix(b"standard_conforming_strings\0") {
                        shared
                            .standard_conforming_strings
                            .store(value.starts_with(b"on"), Ordering::Relaxed);
                    }
                    // SET is judged before it is sent; this catches a change made where
                    // rolegate does not look (inside a function).
                    if let Some(value) = body.strip_prefix(b"client_encoding\0") {
                        let value =
                            String::from_utf8_lossy(value.strip_suffix(&[0]).unwrap_or(value));
                        if crate::policy::unsupported_client_encoding(&value).is_some() {
                            self.end = Some(RelayEnd::UnsupportedEncoding);
                            return pos;
                        }
                    }
                }
                // Pooled: a backend session that ends (terminated, server shutdown) costs
                // the client its transaction, not its session; rolegate tells it so.
                b'E' if shared.lease.is_some() && is_fatal(&self.buf[pos..pos + size]) => {
                    self.out.extend_from_slice(&self.buf[..pos]);
                    self.buf.advance(pos + size);
                    pos = 0;
                    continue;
                }
                b'E' => {
                    let replacement = {
                        let mut pending = shared.pending();
                        let frame = &self.buf[pos..pos + size];
                        let hit = pending.iter().position(|p| contains(frame, &p.marker));
                        hit.and_then(|i| pending.remove(i)).map(|p| p.error)
                    };
                    // Transaction mode: the server names statements by rolegate's names.
                    let replacement = replacement.or_else(|| {
                        shared.lease.as_ref()?;
                        pooled::error_with_client_names(shared, &self.buf[pos..pos + size])
                            .map(BytesMut::freeze)
                    });
                    if let Some(error) = replacement {
                        self.out.extend_from_slice(&self.buf[..pos]);
                        self.out.extend_from_slice(&error);
                        self.buf.advance(pos + size);
                        pos = 0;
                        continue;
                    }
                }
                _ => {}
            }
            pos += size;
        }
        pos
    }

    /// Counts the ReadyForQuery at `pos` (the client's or rolegate's own query's), records
    /// its transaction status and drops the refusals whose markers can no longer come;
    /// returns the status.
    fn ready(&mut self, pos: usize, size: usize, shared: &Shared) -> u8 {
        self.ready_count += 1;
        let ready = self.ready_count;
        // More answers than questions: what rolegate believed the server owes was wrong.
        if ready > shared.sync_points_sent.load(Ordering::Relaxed)
            && !shared.ambiguous.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "a ReadyForQuery nobody asked for: what the server owes is not known any more"
            );
        }
        // (A ReadyForQuery without a status byte leaves the last one in place.)
        let status = if size == 6 {
            self.buf[pos + 5]
        } else {
            shared.status.load(Ordering::Relaxed)
        };
        shared.status.store(status, Ordering::Relaxed);
        shared.ready_received.store(ready, Ordering::Relaxed);
        let mut pending = shared.pending();
        while pending.front().is_some_and(|p| p.until_ready <= ready) {
            pending.pop_front();
        }
        if shared.has_fixups.load(Ordering::Relaxed) {
            pooled::batch_answered(shared, ready);
        }
        status
    }

    /// One message answering rolegate's own query (kept from the client). Its
    /// ReadyForQuery counts like any other; a failure outside a transaction means the
    /// role was not set again, and the session ends. (Inside a failed transaction it
    /// fails harmlessly: DISCARD ALL itself was refused there.)
    fn own_reply(&mut self, tag: u8, pos: usize, size: usize, shared: &Shared) {
        match tag {
            b'E' => self.own_query_failed = true,
            b'Z' => {
                let status = self.ready(pos, size, shared);
                let mut own = shared.own_queries();
                own.pop_front();
                shared
                    .has_own_queries
                    .store(!own.is_empty(), Ordering::Relaxed);
                if std::mem::take(&mut self.own_query_failed) && status != b'E' {
                    self.end = Some(RelayEnd::RoleLost);
                } else {
                    shared.wake_upstream();
                }
            }
            _ => {}
        }
    }
}

/// An ErrorResponse that ends the backend session.
fn is_fatal(frame: &[u8]) -> bool {
    contains(frame, b"VFATAL\0") || contains(frame, b"VPANIC\0")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::future::Future;

    fn with_upstream<T>(f: impl FnOnce(&mut Upstream<'_>, &Shared) -> T) -> T {
        let policy = Policy::new(&crate::config::PolicyConfig::default());
        let metrics = Metrics::default();
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let ctx = RelayContext {
            policy: &policy,
            requester: Requester {
                user: "prop",
                class: crate::config::ClientClass::App,
                allow: &[],
                role: "owner",
            },
            standard_conforming_strings: true,
            max_message_bytes: 1 << 16,
            idle_timeout: None,
            shutdown,
            metrics: &metrics,
            large_objects: &Default::default(),
            restore_sql: "SET ROLE owner",
            pooling: None,
        };
        let shared = Shared::new(true, false);
        let mut up = Upstream::new(&ctx);
        f(&mut up, &shared)
    }

    proptest! {
        /// Any byte stream, in any chunking: the scanner never panics, never claims more
        /// than it has, and stops at the first bad length.
        #[test]
        fn client_frames_scan_without_panicking(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..96), 1..8)
        ) {
            with_upstream(|up, shared| {
                for chunk in chunks {
                    up.buf.extend_from_slice(&chunk);
                    match up.scan(shared) {
                        Ok((end, _)) => {
                            prop_assert!(end <= up.buf.len());
                            up.buf.advance(end);
                            up.out.clear();
                        }
                        Err(_) => break,
                    }
                }
                Ok(())
            })?;
        }

        #[test]
        fn server_frames_scan_without_panicking(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..96), 1..8)
        ) {
            let shared = Shared::new(true, false);
            let mut down = Downstream::default();
            for chunk in chunks {
                down.buf.extend_from_slice(&chunk);
                let end = down.scan(&shared);
                prop_assert!(end <= down.buf.len());
                // (A length no frame can have: the relay stops reading here.)
                if matches!(down.end.take(), Some(RelayEnd::ServerProtocol(_))) {
                    break;
                }
                down.buf.advance(end);
                down.out.clear();
            }
        }

        #[test]
        fn parse_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_query_text(&body);
            let _ = parse_statement_name(&body);
        }
    }

    /// The gated future is polled once to start, then once per wake of its own, however
    /// often the task around it is polled; every such wake reaches the task.
    #[test]
    fn gated_future_is_polled_only_when_woken() {
        struct CountingWaker(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for CountingWaker {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let task = std::sync::Arc::new(CountingWaker(Default::default()));
        let task_waker = std::task::Waker::from(task.clone());
        let mut cx = std::task::Context::from_waker(&task_waker);
        let polls = std::sync::atomic::AtomicUsize::new(0);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u8>();
        // Ends when it receives 3; anything else it takes and waits on.
        let mut gated = std::pin::pin!(PollWhenWoken::new(std::future::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            while let std::task::Poll::Ready(got) = rx.poll_recv(cx) {
                if got == Some(3) {
                    return std::task::Poll::Ready(());
                }
            }
            std::task::Poll::Pending
        })));
        for _ in 0..5 {
            assert!(gated.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        for (round, value) in [1u8, 2].into_iter().enumerate() {
            assert!(tx.send(value).is_ok());
            assert_eq!(
                task.0.load(Ordering::Relaxed),
                round + 1,
                "the task was woken"
            );
            for _ in 0..3 {
                assert!(gated.as_mut().poll(&mut cx).is_pending());
            }
            assert_eq!(polls.load(Ordering::Relaxed), round + 2);
        }
        assert!(tx.send(3).is_ok());
        assert!(gated.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn parse_bodies_are_checked() {
        assert_eq!(
            parse_query_text(b"s1\0select 1\0\0\0"),
            Some(&b"select 1"[..])
        );
        assert_eq!(
            parse_query_text(b"\0select $1\0\0\x01\0\0\0\x17"),
            Some(&b"select $1"[..])
        );
        assert_eq!(parse_query_text(b"\0select 1\0\0\x05"), None);
        assert_eq!(parse_query_text(b"\0select 1"), None);
    }
}
