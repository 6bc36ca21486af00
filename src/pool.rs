//! Transaction pooling: backend sessions shared by many clients, one transaction at a
//! time.
//!
//! A [`Pool`] holds the backend sessions of one kind (the role they are kept in and
//! whether they are read-only); a client checks one out when it sends something and
//! gives it back at ReadyForQuery outside a transaction. What a backend session carries
//! from one client to the next is tracked here: the settings rolegate applied to it, the
//! prepared statements it has under rolegate's names, and which login opened it (a
//! rotation retires sessions of older logins as they come back).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncWriteExt;

use crate::backend::{self, BackendError, BackendSession, BackendTarget, SessionRole};
use crate::config::PoolConfig;
use crate::credentials::{CredentialStore, LoginCredential};
use crate::metrics::{LatencyHistogram, Metrics, PoolLabel};
use crate::sql::quote_literal;
use crate::wire;

/// What a backend session is: a backend never serves a client of another key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub role: String,
    pub read_only: bool,
}

impl PoolKey {
    pub fn label(&self) -> String {
        if self.read_only {
            format!("{}/readonly", self.role)
        } else {
            self.role.clone()
        }
    }
}

/// Every pool of this process.
pub struct Pools {
    /// A key's pools, one per shard: one per thread with `runtime = "per_thread"`.
    pools: DashMap<PoolKey, Arc<[Arc<Pool>]>>,
    shards: usize,
    target: Arc<BackendTarget>,
    config: PoolConfig,
    metrics: Arc<Metrics>,
}

thread_local! {
    /// The shard of the pools this thread's clients borrow from (`runtime = "per_thread"`
    /// sets it on each thread; 0 elsewhere).
    static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Makes this thread's clients borrow from shard `shard` of every pool.
pub fn set_thread_shard(shard: usize) {
    SHARD.with(|s| s.set(shard));
}

/// `total` split into `shards` parts as even as can be, the larger ones first.
fn share(total: usize, shards: usize, shard: usize) -> usize {
    total / shards + usize::from(shard < total % shards)
}

impl Pools {
    pub fn new(
        config: PoolConfig,
        shards: usize,
        target: Arc<BackendTarget>,
        metrics: Arc<Metrics>,
    ) -> Pools {
        Pools {
            pools: DashMap::new(),
            shards: shards.max(1),
            target,
            config,
            metrics,
        }
    }

    /// The pool for backend sessions kept in `role`, opened with the logins of
    /// `credentials` (the class's store: a role is one class's, or in the one-login layout
    /// every store is the same): this thread's shard of it.
    pub fn get(&self, role: SessionRole<'_>, credentials: &Arc<CredentialStore>) -> Arc<Pool> {
        let shard = SHARD.with(std::cell::Cell::get) % self.shards;
        let key = PoolKey {
            role: role.role.to_owned(),
            read_only: role.read_only,
        };
        if let Some(pools) = self.pools.get(&key) {
            return pools[shard].clone();
        }
        let pools = self
            .pools
            .entry(key.clone())
            .or_insert_with(|| {
                (0..self.shards)
                    .map(|shard| {
                        Arc::new(Pool::new(
                            key.clone(),
                            shard,
                            share(self.config.size, self.shards, shard),
                            share(self.config.min_idle, self.shards, shard),
                            &self.config,
                            self.target.clone(),
                            credentials.clone(),
                            &self.metrics,
                        ))
                    })
                    .collect()
            })
            .clone();
        pools[shard].clone()
    }

    /// The shards every key has: with `runtime = "per_thread"` the threads that serve.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Once a second, for shard `shard` of every pool (run on the thread that serves it,
    /// so the sessions it opens belong to that thread): closes backend sessions of retired
    /// logins, idle too long or too old, or closed by the server, and opens sessions up to
    /// `min_idle`.
    pub async fn maintain(self: Arc<Self>, shard: usize) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let pools: Vec<_> = self
                .pools
                .iter()
                .filter_map(|p| p.value().get(shard).cloned())
                .collect();
            for pool in pools {
                pool.prune();
                pool.fill_min_idle().await;
            }
            if shard == 0 {
                self.publish_longest_waits();
            }
        }
    }

    /// `GET /status`'s `pools`: per key its numbers (the metrics, one set for all its
    /// threads) and login; with a runtime per thread also each thread's share.
    pub fn status(&self) -> Vec<serde_json::Value> {
        let mut all = Vec::new();
        for pools in self.pools.iter() {
            let Some(first) = pools.first() else { continue };
            let mut status = first.stats.json();
            status["pool"] = first.key.label().into();
            status["login"] = first.credentials.current().user.clone().into();
            status["size"] = pools.iter().map(|p| p.size).sum::<usize>().into();
            let longest = pools.iter().map(|p| p.longest_wait()).max();
            status["longest_wait_seconds"] = longest.unwrap_or_default().as_secs_f64().into();
            if self.shards > 1 {
                status["threads"] = pools.iter().map(|p| p.thread_status()).collect();
            }
            all.push(status);
        }
        all
    }

    /// Sets each key's `longest_wait_seconds` gauge (one for all its shards: the
    /// longest of theirs).
    pub fn publish_longest_waits(&self) {
        for pools in self.pools.iter() {
            let longest = pools.iter().map(|p| p.longest_wait()).max();
            if let (Some(pool), Some(longest)) = (pools.first(), longest) {
                pool.stats.longest_wait_seconds.set(longest.as_secs_f64());
            }
        }
    }
}

/// The server-side name of a statement: `rolegate_s` and 128 bits of the SHA-256 of its
/// text and parameter types (`key`) and of the settings it is parsed under (`context`:
/// `'01/02/2024'::date` means one day under DateStyle MDY and another under DMY), so the
/// same statement has the same name on every backend session, with nothing to remember
/// (a map of every text a client ever sent would grow without bound).
pub fn statement_name(key: &[u8], context: u64) -> Bytes {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(key)
        .chain_update(context.to_le_bytes())
        .finalize();
    let mut name = String::with_capacity(48);
    name.push_str(crate::policy::RESERVED_STATEMENT_PREFIX);
    name.push('s');
    for byte in &digest[..16] {
        name.push_str(&format!("{byte:02x}"));
    }
    Bytes::from(name)
}

/// The numbers an operator looks at (PgBouncer's SHOW POOLS), as metrics.
pub struct PoolStats {
    pub clients_active: Gauge,
    pub clients_waiting: Gauge,
    pub clients_pinned: Gauge,
    pub backends_active: Gauge,
    pub backends_idle: Gauge,
    pub backends_opening: Gauge,
    pub longest_wait_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub checkouts: Counter,
    pub checkout_timeouts: Counter,
    pub prepares: Counter,
    pub resets: Counter,
    pub client_statement_bytes: Gauge,
    pub transaction_seconds: LatencyHistogram,
    pub checkout_wait_seconds: LatencyHistogram,
    pub backend_connect_seconds: LatencyHistogram,
    /// `rolegate_backend_connections`, shared with session mode.
    backends_open: Gauge,
}

impl PoolStats {
    fn new(metrics: &Metrics, label: &PoolLabel) -> PoolStats {
        let p = &metrics.pool;
        PoolStats {
            clients_active: p.clients_active.get_or_create(label).clone(),
            clients_waiting: p.clients_waiting.get_or_create(label).clone(),
            clients_pinned: p.clients_pinned.get_or_create(label).clone(),
            backends_active: p.backends_active.get_or_create(label).clone(),
            backends_idle: p.backends_idle.get_or_create(label).clone(),
            backends_opening: p.backends_opening.get_or_create(label).clone(),
            longest_wait_seconds: p.longest_wait_seconds.get_or_create(label).clone(),
            checkouts: p.checkouts.get_or_create(label).clone(),
            checkout_timeouts: p.checkout_timeouts.get_or_create(label).clone(),
            prepares: p.prepares.get_or_create(label).clone(),
            resets: p.resets.get_or_create(label).clone(),
            client_statement_bytes: p.client_statement_bytes.get_or_create(label).clone(),
            transaction_seconds: p.transaction_seconds.get_or_create(label).clone(),
            checkout_wait_seconds: p.checkout_wait_seconds.get_or_create(label).clone(),
            backend_connect_seconds: p.backend_connect_seconds.get_or_create(label).clone(),
            backends_open: metrics.backend_connections.clone(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "clients_active": self.clients_active.get(),
            "clients_waiting": self.clients_waiting.get(),
            "clients_pinned": self.clients_pinned.get(),
            "backends_active": self.backends_active.get(),
            "backends_idle": self.backends_idle.get(),
            "backends_opening": self.backends_opening.get(),
            "longest_wait_seconds": self.longest_wait_seconds.get(),
            "checkouts": self.checkouts.get(),
            "checkout_timeouts": self.checkout_timeouts.get(),
            "prepares": self.prepares.get(),
            "resets": self.resets.get(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("no backend connection became free within checkout_timeout ({0:?})")]
    Timeout(Duration),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

pub struct Pool {
    pub key: PoolKey,
    /// Which of the key's pools this is (with `runtime = "per_thread"`, its thread's;
    /// else 0).
    pub shard: usize,
    /// The permits, the idle sessions and the waiting clients, under one lock: a
    /// checkout and a release each take it once.
    state: Mutex<PoolState>,
    /// Backend sessions open (idle, lent or being opened for min_idle).
    open: std::sync::atomic::AtomicUsize,
    pub stats: PoolStats,
    target: Arc<BackendTarget>,
    credentials: Arc<CredentialStore>,
    size: usize,
    min_idle: usize,
    checkout_timeout: Duration,
    idle_timeout: Duration,
    lifetime: Duration,
    pub max_prepared: usize,
    /// What one client may hold in prepared statements: how many, how many bytes.
    pub max_client_prepared: (usize, usize),
}

impl Pool {
    #[allow(clippy::too_many_arguments)]
    fn new(
        key: PoolKey,
        shard: usize,
        size: usize,
        min_idle: usize,
        config: &PoolConfig,
        target: Arc<BackendTarget>,
        credentials: Arc<CredentialStore>,
        metrics: &Metrics,
    ) -> Pool {
        let label = PoolLabel { pool: key.label() };
        Pool {
            stats: PoolStats::new(metrics, &label),
            key,
            shard,
            state: Mutex::new(PoolState {
                free: size,
                idle: Vec::new(),
                queue: WaitQueue::default(),
            }),
            open: std::sync::atomic::AtomicUsize::new(0),
            target,
            credentials,
            size,
            min_idle,
            checkout_timeout: config.checkout_timeout,
            idle_timeout: config.server_idle_timeout,
            lifetime: config.server_lifetime,
            max_prepared: config.max_prepared_statements,
            max_client_prepared: (
                config.max_client_prepared_statements,
                config.max_client_prepared_bytes,
            ),
        }
    }

    fn role(&self) -> SessionRole<'_> {
        SessionRole {
            role: &self.key.role,
            read_only: self.key.read_only,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A backend session for one transaction: an idle one of the current login, or a
    /// new one. Waits (first come, first served) at most `checkout_timeout`.
    pub async fn checkout(self: &Arc<Self>) -> Result<Lease, CheckoutError> {
        self.checkout_since(Instant::now()).await
    }

    /// [`Pool::checkout`] for a client that has waited since `started` already.
    pub async fn checkout_since(
        self: &Arc<Self>,
        started: Instant,
    ) -> Result<Lease, CheckoutError> {
        let (permit, mut popped) = self.wait_for_permit().await?;
        self.stats.checkouts.inc();
        let login = self.credentials.current();
        loop {
            let conn = popped.take().or_else(|| self.state().idle.pop());
            let Some(mut conn) = conn else { break };
            self.stats.backends_idle.dec();
            if conn.login.as_ref() == login.user && conn.is_alive() {
                self.stats.backends_active.inc();
                self.stats.checkout_wait_seconds.observe(started.elapsed());
                return Ok(Lease {
                    conn: Some(conn),
                    permit,
                    reusable: false,
                });
            }
            // A retired login's, or closed by the server: replaced under the same permit,
            // so a rotation never needs more than `size` connections.
            self.close(conn);
        }
        let opening = GaugeGuard::inc(&self.stats.backends_opening);
        // Boxed: a login's future is large, and a checkout's (inside every transaction's,
        // which is itself boxed per transaction) would carry its size on every checkout.
        let opened = Box::pin(self.connect(&login)).await;
        drop(opening);
        let session = opened?;
        self.stats.backends_active.inc();
        self.stats.checkout_wait_seconds.observe(started.elapsed());
        Ok(Lease {
            conn: Some(self.open(session, &login.user)),
            permit,
            reusable: false,
        })
    }

    async fn connect(&self, login: &LoginCredential) -> Result<BackendSession, BackendError> {
        let started = Instant::now();
        let opened = backend::connect(&self.target, login, &[], self.role()).await;
        if opened.is_ok() {
            self.stats
                .backend_connect_seconds
                .observe(started.elapsed());
        }
        opened
    }

    /// A permit, and an idle session if there is one: at once when one is free (then no
    /// client waits), else in turn (first come, first served), at most `checkout_timeout`.
    async fn wait_for_permit(
        self: &Arc<Self>,
    ) -> Result<(Permit, Option<Box<ServerConn>>), CheckoutError> {
        let (id, start_timer) = {
            let mut state = self.state();
            if state.reserve() {
                let conn = state.idle.pop();
                return Ok((Permit(Some(self.clone())), conn));
            }
            state.queue.join(Instant::now())
        };
        // Also undone when the wait is abandoned (the client left, shutdown); a permit
        // handed to it and not taken then goes on to the next. (Made before anything
        // else can fail, so the queue entry never outlives the wait.)
        self.stats.clients_waiting.inc();
        let mut waiting = Waiting {
            pool: self,
            id,
            served: false,
        };
        if start_timer {
            tokio::spawn(self.clone().expire_waiters());
        }
        let served = std::future::poll_fn(|cx| {
            let mut state = self.state();
            std::task::Poll::Ready(match state.queue.poll_turn(id, cx.waker()) {
                Turn::Waiting => return std::task::Poll::Pending,
                Turn::Served => {
                    waiting.served = true;
                    Some((Permit(Some(self.clone())), state.idle.pop()))
                }
                Turn::TimedOut => None,
            })
        })
        .await;
        drop(waiting);
        match served {
            Some(served) => Ok(served),
            None => {
                self.stats.checkout_timeouts.inc();
                Err(CheckoutError::Timeout(self.checkout_timeout))
            }
        }
    }

    /// The pool's one checkout timer: times out the clients that have waited
    /// `checkout_timeout`, while anyone waits (see [`WaitQueue`]).
    async fn expire_waiters(self: Arc<Self>) {
        loop {
            let next = self
                .state()
                .queue
                .time_out(Instant::now(), self.checkout_timeout);
            let Some(deadline) = next else { return };
            tokio::time::sleep_until(deadline.into()).await;
        }
    }

    /// How long the client that has waited longest has been waiting.
    pub fn longest_wait(&self) -> Duration {
        self.state()
            .queue
            .longest()
            .map(|since| since.elapsed())
            .unwrap_or_default()
    }

    fn open(&self, session: BackendSession, login: &str) -> Box<ServerConn> {
        self.stats.backends_open.inc();
        self.open.fetch_add(1, Ordering::Relaxed);
        Box::new(ServerConn::new(session, login))
    }

    fn close(&self, conn: Box<ServerConn>) {
        self.stats.backends_open.dec();
        self.open.fetch_sub(1, Ordering::Relaxed);
        conn.close();
    }

    /// A lease's end: its session back to the idle ones (or closed) and its permit to
    /// the client that has waited longest (or to the free ones), under one lock.
    fn give_back(&self, conn: Option<Box<ServerConn>>, reusable: bool) {
        let mut closing = None;
        let mut keeping = None;
        if let Some(mut conn) = conn {
            // (Notifications kept during rolegate's own queries were its last client's.)
            conn.session.notifications.clear();
            self.stats.backends_active.dec();
            let login = self.credentials.current();
            let now = Instant::now();
            if reusable
                && conn.login.as_ref() == login.user
                && now.duration_since(conn.opened) < self.lifetime
            {
                conn.idle_since = now;
                self.stats.backends_idle.inc();
                keeping = Some(conn);
            } else {
                closing = Some(conn);
            }
        }
        self.settle(keeping);
        if let Some(conn) = closing {
            self.close(conn);
        }
    }

    /// A permit handed on, and a session made idle with it.
    fn settle(&self, idle: Option<Box<ServerConn>>) {
        let waker = {
            let mut state = self.state();
            if let Some(conn) = idle {
                state.idle.push(conn);
            }
            state.hand_on_permit()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn prune(&self) {
        let login = self.credentials.current();
        let mut closing = Vec::new();
        {
            let mut state = self.state();
            let idle = &mut state.idle;
            let mut kept = 0;
            // Oldest-idle first, so the ones kept for min_idle are the freshest.
            idle.sort_by_key(|c| std::cmp::Reverse(c.idle_since));
            let mut i = 0;
            while i < idle.len() {
                let c = &mut idle[i];
                let expired = c.opened.elapsed() >= self.lifetime
                    || (kept >= self.min_idle && c.idle_since.elapsed() >= self.idle_timeout);
                if c.login.as_ref() != login.user || expired || !c.is_alive() {
                    closing.push(idle.swap_remove(i));
                } else {
                    kept += 1;
                    i += 1;
                }
            }
            idle.sort_by_key(|c| c.idle_since);
        }
        for conn in closing {
            self.stats.backends_idle.dec();
            self.close(conn);
        }
    }

    async fn fill_min_idle(self: &Arc<Self>) {
        // Only while fewer than `size` are open: idle sessions hold no permit.
        while self.state().idle.len() < self.min_idle
            && self.open.load(Ordering::Relaxed) < self.size
        {
            let permit = {
                let mut state = self.state();
                // Idle sessions hold no permit, and a checkout may be opening a session
                // with one: a new idle session only while the permits no one holds
                // outnumber the idle sessions, so open ones never exceed `size`.
                if state.idle.len() >= state.free || !state.reserve() {
                    return;
                }
                Permit(Some(self.clone()))
            };
            let login = self.credentials.current();
            match self.connect(&login).await {
                Ok(session) => {
                    let conn = self.open(session, &login.user);
                    self.stats.backends_idle.inc();
                    // (Idle, and the permit handed on, in one step.)
                    let mut permit = permit;
                    permit.0 = None;
                    self.settle(Some(conn));
                }
                Err(e) => {
                    tracing::warn!(pool = self.key.label(), error = %e, "could not open an idle backend connection");
                    return;
                }
            }
        }
    }

    /// What this one pool holds: with `runtime = "per_thread"`, one thread's share.
    fn thread_status(&self) -> serde_json::Value {
        serde_json::json!({
            "thread": self.shard,
            "size": self.size,
            "backends_open": self.open.load(Ordering::Relaxed),
            "longest_wait_seconds": self.longest_wait().as_secs_f64(),
        })
    }
}

/// Counts a client as waiting for as long as it waits.
struct Waiting<'a> {
    pool: &'a Pool,
    id: u64,
    /// Served: it has left the queue already, with its permit.
    served: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.pool.stats.clients_waiting.dec();
        if self.served {
            return;
        }
        let waker = {
            let mut state = self.pool.state();
            // A permit handed to it and not taken (it went away at that moment) is not
            // lost: it goes on.
            if state.queue.leave(self.id) {
                state.hand_on_permit()
            } else {
                None
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// What the pool's lock guards.
struct PoolState {
    /// Permits no one holds: one per backend session that may exist, held while a
    /// session is lent or being opened (idle sessions hold none).
    free: usize,
    /// Boxed: a backend connection moves between the pool and its lease on every
    /// transaction, and a box moves as one pointer (the lease holds the same box, so
    /// clippy's `vec_box` advice would add a copy each way).
    #[allow(clippy::vec_box)]
    idle: Vec<Box<ServerConn>>,
    /// The clients waiting for a permit, in the order they came.
    queue: WaitQueue,
}

impl PoolState {
    /// Takes a free permit. Never while a client waits: a permit that comes back goes to
    /// the front waiter, so free permits and waiters are never there at once.
    fn reserve(&mut self) -> bool {
        if self.free == 0 {
            return false;
        }
        self.free -= 1;
        true
    }

    /// A permit given back: to the client that has waited longest (returned: its waker,
    /// to be woken once the lock is let go), or to the free ones.
    fn hand_on_permit(&mut self) -> Option<std::task::Waker> {
        match self.queue.serve_next() {
            Some(waker) => waker,
            None => {
                self.free += 1;
                None
            }
        }
    }
}

/// The right to hold one backend session (lent or being opened): taken from the pool's
/// `free` count or handed over by [`PoolState::hand_on_permit`], and handed on when
/// dropped, so none is lost on any path out of a checkout.
struct Permit(Option<Arc<Pool>>);

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            pool.give_back(None, false);
        }
    }
}

/// The clients waiting for a backend connection, in the order they came, and since when.
/// The semaphore serves them in that order, so a client that gets its connection almost
/// always leaves from the front (no allocation once the queue has grown to the most
/// waiters there were; a `BTreeMap` cost ~450 instructions per wait in a transaction at
/// 400 clients), the front is the one that has waited longest, and the next to time out.
/// So one timer per pool (`Pool::expire_waiters`, running while anyone waits) times them
/// all out, instead of a timer per wait (~650 instructions each).
#[derive(Default)]
struct WaitQueue {
    /// In the order they joined, numbered so. The front has not left.
    waiters: VecDeque<Waiter>,
    next: u64,
    /// How many entries behind the front have left out of turn: once they are most of
    /// the queue they are dropped, so that clients that come and go while the front
    /// waits do not grow it.
    left_out_of_turn: usize,
    /// Whether `Pool::expire_waiters` is running (it stops when nobody waits).
    timer_running: bool,
}

struct Waiter {
    id: u64,
    /// `None`: left out of turn (timed out, or went away while waiting).
    since: Option<Instant>,
    timed_out: bool,
    /// Handed a permit it has not taken yet.
    served: bool,
    /// To wake the waiter when it is served or times out.
    waker: Option<std::task::Waker>,
}

/// Where a waiter stands (see [`WaitQueue::poll_turn`]).
enum Turn {
    Waiting,
    /// A permit is the waiter's; it has left the queue.
    Served,
    TimedOut,
}

impl WaitQueue {
    /// Adds a waiter; returns its number, and whether the caller must start the timer.
    fn join(&mut self, since: Instant) -> (u64, bool) {
        let id = self.next;
        self.next += 1;
        self.waiters.push_back(Waiter {
            id,
            since: Some(since),
            timed_out: false,
            served: false,
            waker: None,
        });
        let start_timer = !self.timer_running;
        self.timer_running = true;
        (id, start_timer)
    }

    fn find(&mut self, id: u64) -> Option<&mut Waiter> {
        // Numbers are consecutive until entries that left out of turn are dropped, so
        // the place the number says is almost always right; else a search.
        let guess = self
            .waiters
            .front()
            .and_then(|front| usize::try_from(id.checked_sub(front.id)?).ok())
            .filter(|&at| self.waiters.get(at).is_some_and(|w| w.id == id));
        let at = match guess {
            Some(at) => at,
            None => self.waiters.binary_search_by_key(&id, |w| w.id).ok()?,
        };
        self.waiters.get_mut(at)
    }

    /// Takes waiter `id` out of the queue; returns whether it had been served (its
    /// permit is the caller's to hand on, or to take).
    fn leave(&mut self, id: u64) -> bool {
        let mut served = false;
        if self.waiters.front().is_some_and(|w| w.id == id) {
            served = self.waiters.pop_front().is_some_and(|w| w.served);
            while self.waiters.front().is_some_and(|w| w.since.is_none()) {
                self.waiters.pop_front();
                self.left_out_of_turn = self.left_out_of_turn.saturating_sub(1);
            }
        } else if let Some(waiter) = self.find(id) {
            if waiter.since.is_none() {
                return false;
            }
            served = std::mem::take(&mut waiter.served);
            waiter.since = None;
            waiter.waker = None;
            self.left_out_of_turn += 1;
            // (The order stays, and with it the front and the search by number.)
            if self.left_out_of_turn * 2 > self.waiters.len() {
                self.waiters.retain(|w| w.since.is_some());
                self.left_out_of_turn = 0;
            }
        }
        served
    }

    /// Whether waiter `id` has been served (it then leaves the queue, its permit in
    /// hand) or has timed out; if neither, `waker` wakes it when it is.
    fn poll_turn(&mut self, id: u64, waker: &std::task::Waker) -> Turn {
        let Some(waiter) = self.find(id).filter(|w| w.since.is_some()) else {
            return Turn::TimedOut;
        };
        // (A permit that came with the timeout is taken: the client is served.)
        if waiter.served {
            self.leave(id);
            return Turn::Served;
        }
        if waiter.timed_out {
            return Turn::TimedOut;
        }
        if !waiter.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            waiter.waker = Some(waker.clone());
        }
        Turn::Waiting
    }

    /// Hands a permit to the client that has waited longest and is still waiting;
    /// `None` if there is none, else its waker (`None` inside if it has not been polled
    /// yet: it finds the permit when it is).
    fn serve_next(&mut self) -> Option<Option<std::task::Waker>> {
        let waiter = self
            .waiters
            .iter_mut()
            .find(|w| w.since.is_some() && !w.timed_out && !w.served)?;
        waiter.served = true;
        Some(waiter.waker.take())
    }

    /// Times out every waiter that has waited `timeout` by `now`; returns when the next
    /// one will have, or `None` (and the timer stops) when no one left waiting will.
    fn time_out(&mut self, now: Instant, timeout: Duration) -> Option<Instant> {
        for waiter in self.waiters.iter_mut() {
            let Some(since) = waiter.since else { continue };
            // (A served waiter is not timed out: its permit is in hand.)
            if waiter.timed_out || waiter.served {
                continue;
            }
            // (A timeout too long to add to a clock reading never comes; the next waiter
            // starts a timer again, which finds the same.)
            let Some(deadline) = since.checked_add(timeout) else {
                break;
            };
            if deadline > now {
                return Some(deadline);
            }
            waiter.timed_out = true;
            if let Some(waker) = waiter.waker.take() {
                waker.wake();
            }
        }
        self.timer_running = false;
        None
    }

    /// Since when the longest-waiting client has waited.
    fn longest(&self) -> Option<Instant> {
        self.waiters.front().and_then(|w| w.since)
    }
}

/// A gauge raised for as long as the guard lives.
struct GaugeGuard<'a>(&'a Gauge);

impl<'a> GaugeGuard<'a> {
    fn inc(gauge: &'a Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A backend session checked out for one client; given back with [`Lease::release`] or,
/// when dropped without it, closed (its state is unknown).
pub struct Lease {
    conn: Option<Box<ServerConn>>,
    permit: Permit,
    /// Set by [`Lease::release`]: the session goes back to the idle ones.
    reusable: bool,
}

impl Lease {
    pub fn conn(&mut self) -> &mut ServerConn {
        // Present from creation until release/drop, which take the lease by value.
        self.conn.as_mut().unwrap_or_else(|| unreachable!())
    }

    /// Back to the pool for the next client.
    pub fn release(mut self) {
        self.reusable = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // The session and the permit in one step (the permit's own drop then has
        // nothing left to do).
        if let Some(pool) = self.permit.0.take() {
            pool.give_back(self.conn.take(), self.reusable);
        }
    }
}

/// One pooled backend session and what rolegate knows it carries.
pub struct ServerConn {
    pub session: BackendSession,
    /// The login role that opened it.
    pub login: Arc<str>,
    opened: Instant,
    idle_since: Instant,
    /// Settings applied for clients (lower-case name → value), as the server holds them.
    pub settings: BTreeMap<String, String>,
    /// The shared settings of the client `settings` were last made equal to: a client
    /// with the same settings as the last one (the usual case) needs no comparison.
    settings_of: Option<ClientSettings>,
    /// rolegate's prepared statements on this session.
    pub prepared: PreparedOnServer,
    /// The client that used it last, and what it left that others must not see.
    last_client: u64,
    left_sequences: bool,
    left_seed: bool,
    /// The relay's large read buffers (client side, server side), lent with the session:
    /// a pool has few backend sessions and may have many idle clients, which then hold
    /// only a small buffer each (see `relay::pooled::lend_buffers`).
    pub buffers: (BytesMut, BytesMut),
}

/// A number for each client, to know when a backend session changes hands.
/// A client's session settings (lower-case name → value), shared between clients that
/// have the same: most clients of an application start with the same few, and an idle
/// client then costs a pointer instead of a map of its own.
pub type ClientSettings = Arc<BTreeMap<String, String>>;

/// The one shared copy of `settings` (made now if no live client has it).
pub fn shared_settings(settings: BTreeMap<String, String>) -> ClientSettings {
    use std::hash::{Hash, Hasher};
    type Interned = HashMap<u64, Vec<std::sync::Weak<BTreeMap<String, String>>>>;
    static INTERNED: Mutex<Option<Interned>> = Mutex::new(None);
    let mut hasher = std::hash::DefaultHasher::new();
    settings.hash(&mut hasher);
    let hash = hasher.finish();
    let mut interned = INTERNED.lock().unwrap_or_else(|p| p.into_inner());
    let interned = interned.get_or_insert_with(HashMap::new);
    let same = interned.entry(hash).or_default();
    same.retain(|weak| weak.strong_count() > 0);
    if let Some(shared) = same
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .find(|shared| **shared == settings)
    {
        return shared;
    }
    let shared = Arc::new(settings);
    same.push(Arc::downgrade(&shared));
    // (Maps no client has any more go now and then.)
    if interned.len() > 1024 && interned.len().is_power_of_two() {
        interned.retain(|_, same| {
            same.retain(|weak| weak.strong_count() > 0);
            !same.is_empty()
        });
    }
    shared
}

pub fn next_client_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl ServerConn {
    fn new(session: BackendSession, login: &str) -> ServerConn {
        ServerConn {
            session,
            login: login.into(),
            opened: Instant::now(),
            idle_since: Instant::now(),
            settings: BTreeMap::new(),
            settings_of: None,
            prepared: PreparedOnServer::default(),
            last_client: 0,
            left_sequences: false,
            left_seed: false,
            buffers: (BytesMut::new(), BytesMut::new()),
        }
    }

    /// An idle backend session has nothing to say: readable means the server closed it
    /// (or sent something it should not have). Costs no system call while the socket
    /// is known not to be readable.
    fn is_alive(&mut self) -> bool {
        use tokio::io::AsyncRead;
        if let crate::tls::MaybeTls::Plain(tcp) = &self.session.stream {
            // The socket's readiness alone, with no waker registered: no system call
            // unless it has something (an end, or bytes no one asked for).
            return matches!(
                tcp.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            );
        }
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        matches!(
            std::pin::Pin::new(&mut self.session.stream).poll_read(&mut cx, &mut buf),
            std::task::Poll::Pending
        )
    }

    /// Ends the session politely (Terminate), in the background.
    fn close(self) {
        let mut stream = self.session.stream;
        tokio::spawn(async move {
            let mut terminate = bytes::BytesMut::new();
            wire::put_message(&mut terminate, b'X', &[]);
            let _ = stream.write_all(&terminate).await;
            let _ = stream.shutdown().await;
        });
    }

    /// Whether the session's settings were last made those of `wanted` (the same shared
    /// map): then [`ServerConn::apply_client_settings`] has nothing to do.
    pub fn has_settings_of(&self, wanted: &ClientSettings) -> bool {
        self.settings_of
            .as_ref()
            .is_some_and(|applied| Arc::ptr_eq(applied, wanted))
    }

    /// [`ServerConn::apply_settings`] for a pooled client's shared settings.
    pub async fn apply_client_settings(
        &mut self,
        wanted: &ClientSettings,
    ) -> Result<bool, BackendError> {
        if self.has_settings_of(wanted) {
            return Ok(false);
        }
        let sent = self.apply_settings(wanted).await?;
        self.settings_of = Some(wanted.clone());
        Ok(sent)
    }

    /// Makes the session's settings `wanted`: one query with the difference, nothing when
    /// there is none. Returns whether a query was sent.
    ///
    /// Values go as ASCII (non-ASCII ones through `convert_from`): the server reads the
    /// whole query in the `client_encoding` in force when it arrives, whoever set it, and
    /// `client_encoding` itself is set last.
    pub async fn apply_settings(
        &mut self,
        wanted: &BTreeMap<String, String>,
    ) -> Result<bool, BackendError> {
        self.settings_of = None;
        let mut sql = String::new();
        let wanted = wanted.iter().filter(|(name, _)| !never_followed(name));
        for name in self.settings.keys() {
            if !wanted.clone().any(|(n, _)| n == name) {
                sql.push_str(&format!("RESET {};", crate::sql::quote_ident(name)));
            }
        }
        let mut sets = Vec::new();
        let mut encoding = None;
        for (name, value) in wanted.clone() {
            if self.settings.get(name) == Some(value) {
                continue;
            }
            let set = format!(
                "pg_catalog.set_config({}, {}, false)",
                text_literal(name),
                text_literal(value)
            );
            if name == "client_encoding" {
                encoding = Some(set);
            } else {
                sets.push(set);
            }
        }
        sets.extend(encoding);
        if !sets.is_empty() {
            sql.push_str("SELECT ");
            sql.push_str(&sets.join(", "));
        }
        if sql.is_empty() {
            return Ok(false);
        }
        self.settings = wanted.map(|(n, v)| (n.clone(), v.clone())).collect();
        self.session.query(&sql).await?;
        Ok(true)
    }

    /// What a client left that only the next client could see (`currval`/`lastval`
    /// values, a seed it set): cleared before another client's first query here.
    pub fn note_leftovers(&mut self, client: u64, sequences: bool, seed: bool) {
        if client != self.last_client {
            self.left_sequences = false;
            self.left_seed = false;
            self.last_client = client;
        }
        self.left_sequences |= sequences;
        self.left_seed |= seed;
    }

    /// For `client`, about to use this session: the query that clears what another
    /// client left, if anything (sent by the relay ahead of the client's own messages,
    /// in the same write, so it costs no round trip).
    pub fn take_leftovers(&mut self, client: u64) -> Option<String> {
        if client == self.last_client {
            return None;
        }
        let mut sql = String::new();
        if std::mem::take(&mut self.left_sequences) {
            sql.push_str("DISCARD SEQUENCES;");
        }
        if std::mem::take(&mut self.left_seed) {
            sql.push_str(&random_seed_sql());
        }
        (!sql.is_empty()).then_some(sql)
    }

    /// Reads the session-level settings the server holds now (after a client changed
    /// some): they are the client's from here on. Custom settings (`app.tenant`) are
    /// listed nowhere by PostgreSQL, so those in `custom` are read by name. With
    /// `reset_all` (a function rolegate cannot look into ran, so settings it cannot name
    /// may have changed) the session is then reset to its startup settings.
    /// The answer is checked strictly, the role is proved on the way (a second line of
    /// defence: nothing a client may send changes it), and a read-back never carries the
    /// role, the session authorization or, for read-only pools, the read-only settings.
    pub async fn read_settings(
        &mut self,
        key: &PoolKey,
        custom: &std::collections::BTreeSet<String>,
        reset_all: bool,
    ) -> Result<BTreeMap<String, String>, BackendError> {
        const NAME_SETTING: &[&str] = &["name", "setting"];
        // (Values as hex of their UTF-8: the rows come in the client's encoding.)
        let mut sql = String::from(
            "SELECT name, pg_catalog.encode(pg_catalog.convert_to(setting, 'UTF8'), 'hex') \
             AS setting FROM pg_catalog.pg_settings \
             WHERE source OPERATOR(pg_catalog.=) 'session' \
             AND name OPERATOR(pg_catalog.<>) 'role' \
             AND name OPERATOR(pg_catalog.<>) 'session_authorization';",
        );
        let mut shapes: Vec<&[&str]> = vec![NAME_SETTING];
        if !custom.is_empty() {
            let names: Vec<String> = custom.iter().map(|n| text_literal(n)).collect();
            sql.push_str(&format!(
                "SELECT n AS name, pg_catalog.encode(pg_catalog.convert_to(\
                 pg_catalog.current_setting(n, true), 'UTF8'), 'hex') AS setting \
                 FROM pg_catalog.unnest(ARRAY[{}]::pg_catalog.text[]) AS n;",
                names.join(", ")
            ));
            shapes.push(NAME_SETTING);
        }
        sql.push_str("SELECT current_user;");
        shapes.push(&["current_user"]);
        if reset_all {
            sql.push_str("RESET ALL;");
        }
        let mut sets = self.session.query_expecting(&sql, &shapes).await?;
        let user = sets.pop().unwrap_or_default();
        if !matches!(user.as_slice(), [row] if matches!(row.as_slice(), [Some(u)] if *u == key.role))
        {
            return Err(role_lost());
        }
        let read_only = key.read_only;
        let settings: BTreeMap<String, String> = sets
            .into_iter()
            .flatten()
            .filter_map(|row| match row.as_slice() {
                [Some(name), Some(hex)] => Some((name.to_ascii_lowercase(), from_hex(hex)?)),
                _ => None,
            })
            .filter(|(name, _)| {
                !(never_followed(name)
                    || read_only
                        && matches!(
                            name.as_str(),
                            "default_transaction_read_only" | "transaction_read_only"
                        ))
            })
            .collect();
        self.settings_of = None;
        self.settings = if reset_all {
            BTreeMap::new()
        } else {
            settings.clone()
        };
        Ok(settings)
    }

    /// Resets the session to its startup settings (the client left) and proves the role.
    pub async fn reset_settings(&mut self, key: &PoolKey) -> Result<(), BackendError> {
        let sets = self
            .session
            .query_expecting("RESET ALL; SELECT current_user", &[&["current_user"]])
            .await?;
        self.settings.clear();
        self.settings_of = None;
        match sets.as_slice() {
            [rows] if matches!(rows.as_slice(), [row] if matches!(row.as_slice(), [Some(u)] if *u == key.role)) => {
                Ok(())
            }
            _ => Err(role_lost()),
        }
    }
}

/// Settings that never follow a client: the role and session authorization are
/// rolegate's own; a seed would let one client decide another's `random()`.
fn never_followed(name: &str) -> bool {
    matches!(name, "role" | "session_authorization" | "seed")
}

/// A string literal the server reads the same in any `client_encoding`.
fn text_literal(value: &str) -> String {
    if value.is_ascii() {
        return quote_literal(value);
    }
    let hex: String = value.bytes().map(|b| format!("{b:02x}")).collect();
    format!("pg_catalog.convert_from(pg_catalog.decode('{hex}', 'hex'), 'UTF8')")
}

/// The text whose UTF-8 bytes `hex` spells; None if it does not.
fn from_hex(hex: &str) -> Option<String> {
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// Sets the random seed to a value nobody else knows (`setseed` needs -1..1).
fn random_seed_sql() -> String {
    use rand::Rng;
    let seed: f64 = rand::thread_rng().gen_range(-1.0..1.0);
    format!("SELECT pg_catalog.setseed({seed:.17});")
}

impl ServerConn {
    /// Whether nothing lives in this backend session that only it has: no LISTEN, no
    /// session advisory lock, no SQL-level prepared statement, no WITH HOLD cursor, no
    /// temporary table.
    pub async fn nothing_pinned(&mut self) -> bool {
        // (Every operator and aggregate named in pg_catalog, here and in the other
        // queries rolegate runs in a client's session: they run with the client's
        // search_path, which may put a schema with its own `+` or `count` first.)
        const PINNED_STATE_SQL: &str = "SELECT \
            (SELECT pg_catalog.count(*) FROM pg_catalog.pg_listening_channels()) \
          OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks \
             WHERE locktype OPERATOR(pg_catalog.=) 'advisory' \
             AND pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()) \
          OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) \
             FROM pg_catalog.pg_prepared_statements WHERE from_sql) \
          OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) \
             FROM pg_catalog.pg_cursors WHERE is_holdable) \
          OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_class \
             WHERE relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema())";
        matches!(
            self.session.query(PINNED_STATE_SQL).await.as_deref(),
            Ok([row]) if matches!(row.as_slice(), [Some(n)] if n == "0")
        )
    }

    /// After a function rolegate cannot look into (which may have run `DEALLOCATE`):
    /// whether the backend session still has every statement rolegate prepared on it.
    /// If not (or the server cannot say), none is counted on: each is closed and
    /// prepared again before use.
    pub async fn check_prepared(&mut self) {
        if self.prepared.doubtful() {
            return;
        }
        const PREPARED_SQL: &str =
            "SELECT pg_catalog.count(*) FROM pg_catalog.pg_prepared_statements \
            WHERE NOT from_sql AND pg_catalog.starts_with(name, 'rolegate_s')";
        let expected = self.prepared.len().to_string();
        let intact = matches!(
            self.session.query(PREPARED_SQL).await.as_deref(),
            Ok([row]) if matches!(row.as_slice(), [Some(n)] if *n == expected)
        );
        if !intact {
            self.prepared.forget_all();
        }
    }

    /// Undoes what a pinned client left behind (cursors, LISTEN, advisory locks,
    /// prepared statements, temporary tables, settings) without touching the role, and
    /// proves the session is still in it.
    pub async fn reset_session(&mut self, key: &PoolKey) -> Result<(), BackendError> {
        let sql = format!(
            "CLOSE ALL; UNLISTEN *; SELECT pg_catalog.pg_advisory_unlock_all(); \
             DEALLOCATE ALL; DISCARD TEMP; DISCARD SEQUENCES; RESET ALL; {} SELECT current_user",
            random_seed_sql()
        );
        let sets = self
            .session
            .query_expecting(
                &sql,
                &[&["pg_advisory_unlock_all"], &["setseed"], &["current_user"]],
            )
            .await?;
        self.prepared = PreparedOnServer::default();
        self.settings.clear();
        self.settings_of = None;
        match sets.last().map(Vec::as_slice) {
            Some([row]) if matches!(row.as_slice(), [Some(user)] if *user == key.role) => Ok(()),
            _ => Err(role_lost()),
        }
    }
}

fn role_lost() -> BackendError {
    BackendError::Server(vec![
        (b'S', "ERROR".into()),
        (b'C', "42501".into()),
        (b'M', "the backend session left its role".into()),
    ])
}

/// rolegate's prepared statements on one backend session, least recently used first out.
#[derive(Default)]
pub struct PreparedOnServer {
    /// Name → when it was last used (a tick of `clock`).
    names: HashMap<Bytes, u64, ProcessKeys>,
    clock: u64,
    /// A DEALLOCATE ALL or DISCARD ALL was sent: whether it ran is not known, so no name
    /// is known to be there or not.
    doubtful: bool,
}

/// ahash with keys drawn once per process: an empty map is made on every transaction
/// (a lease moves its backend connection's list out and back), and
/// `ahash::RandomState::new` costs more than the rest of that.
#[derive(Clone)]
pub struct ProcessKeys(ahash::RandomState);

impl Default for ProcessKeys {
    fn default() -> Self {
        static KEYS: std::sync::OnceLock<ahash::RandomState> = std::sync::OnceLock::new();
        ProcessKeys(KEYS.get_or_init(ahash::RandomState::new).clone())
    }
}

impl std::hash::BuildHasher for ProcessKeys {
    type Hasher = ahash::AHasher;
    fn build_hasher(&self) -> ahash::AHasher {
        self.0.build_hasher()
    }
}

impl PreparedOnServer {
    pub fn doubtful(&self) -> bool {
        self.doubtful
    }

    /// Every statement may be gone (see `doubtful`).
    pub fn forget_all(&mut self) {
        self.names.clear();
        self.doubtful = true;
    }

    pub fn contains(&mut self, name: &[u8]) -> bool {
        if self.doubtful {
            return false;
        }
        self.clock += 1;
        match self.names.get_mut(name) {
            Some(used) => {
                *used = self.clock;
                true
            }
            None => false,
        }
    }

    pub fn insert(&mut self, name: Bytes) {
        self.clock += 1;
        self.names.insert(name, self.clock);
    }

    pub fn remove(&mut self, name: &[u8]) {
        self.names.remove(name);
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The least recently used name, to close on the server when over the limit.
    pub fn least_recently_used(&self, except: &[u8]) -> Option<Bytes> {
        self.names
            .iter()
            .filter(|(name, _)| name.as_ref() != except)
            .min_by_key(|(_, used)| **used)
            .map(|(name, _)| name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_wait_is_the_oldest_client_still_waiting() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut queue = WaitQueue::default();
        assert_eq!(queue.longest(), None);
        let [a, b, c, d] = [0, 1, 2, 3].map(|ms| queue.join(at(ms)).0);
        // Out of turn (a timeout): the front stays.
        queue.leave(c);
        assert_eq!(queue.longest(), Some(at(0)));
        queue.leave(a);
        assert_eq!(queue.longest(), Some(at(1)));
        // The one that left out of turn is skipped once it would be the front.
        queue.leave(b);
        assert_eq!(queue.longest(), Some(at(3)));
        queue.leave(c);
        queue.leave(d);
        assert_eq!(queue.longest(), None);
        assert!(queue.waiters.is_empty());
        let (e, _) = queue.join(at(4));
        assert!(e > d);
        assert_eq!(queue.longest(), Some(at(4)));
    }

    #[test]
    fn one_timer_times_out_the_waiters_in_the_order_they_came() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let timeout = Duration::from_millis(10);
        let waker = std::task::Waker::noop();
        let mut queue = WaitQueue::default();
        let (a, start_timer) = queue.join(at(0));
        assert!(start_timer);
        let [(b, again), (c, _)] = [1, 5].map(|ms| queue.join(at(ms)));
        assert!(!again, "one timer per pool");
        assert_eq!(queue.time_out(at(9), timeout), Some(at(10)));
        assert!(matches!(queue.poll_turn(a, waker), Turn::Waiting));
        // The timer wakes at a's deadline: a is out, b's is next.
        assert_eq!(queue.time_out(at(10), timeout), Some(at(11)));
        assert!(matches!(queue.poll_turn(a, waker), Turn::TimedOut));
        assert!(matches!(queue.poll_turn(b, waker), Turn::Waiting));
        // b was served; a left after its timeout; c's deadline is next.
        queue.leave(b);
        queue.leave(a);
        assert_eq!(queue.time_out(at(11), timeout), Some(at(15)));
        queue.leave(c);
        // Nobody waits: the timer stops, and the next waiter starts one.
        assert_eq!(queue.time_out(at(12), timeout), None);
        assert!(queue.join(at(20)).1);
    }

    #[test]
    fn a_permit_goes_to_the_longest_waiting_client_and_is_never_lost() {
        let start = Instant::now();
        let waker = std::task::Waker::noop();
        let mut state = PoolState {
            free: 0,
            idle: Vec::new(),
            queue: WaitQueue::default(),
        };
        let [a, b, c] = [0, 1, 2].map(|ms| state.queue.join(start + Duration::from_millis(ms)).0);
        for id in [a, b, c] {
            assert!(matches!(state.queue.poll_turn(id, waker), Turn::Waiting));
        }
        // a times out; the permit that comes back is b's, with b's waker.
        state
            .queue
            .time_out(start + Duration::from_millis(10), Duration::from_millis(10));
        assert!(state.hand_on_permit().is_some());
        assert_eq!(state.free, 0);
        assert!(matches!(state.queue.poll_turn(a, waker), Turn::TimedOut));
        assert!(!state.queue.leave(a));
        // b goes away before taking it: the permit goes on to c.
        assert!(state.queue.leave(b));
        assert!(state.hand_on_permit().is_some());
        // A served client is not timed out; it takes its permit and leaves.
        state
            .queue
            .time_out(start + Duration::from_millis(60), Duration::from_millis(10));
        assert!(matches!(state.queue.poll_turn(c, waker), Turn::Served));
        assert!(!state.queue.leave(c), "taken, so not handed on again");
        assert!(state.queue.waiters.is_empty());
        // With no one waiting, a permit given back is free, and taken by the next.
        assert!(state.hand_on_permit().is_none());
        assert!(state.reserve());
        assert!(!state.reserve());
    }

    #[test]
    fn clients_that_leave_while_the_front_waits_do_not_grow_the_queue() {
        let start = Instant::now();
        let mut queue = WaitQueue::default();
        let (front, _) = queue.join(start);
        for _ in 0..10_000 {
            let (id, _) = queue.join(start);
            queue.leave(id);
        }
        assert!(queue.waiters.len() <= 3, "{} entries", queue.waiters.len());
        let [a, b] = [0, 1].map(|_| queue.join(start).0);
        queue.leave(a);
        assert_eq!(queue.longest(), Some(start));
        queue.leave(front);
        assert_eq!(queue.waiters.front().map(|w| w.id), Some(b));
        queue.leave(b);
        assert!(queue.waiters.is_empty());
        assert_eq!(queue.left_out_of_turn, 0);
    }

    #[test]
    fn clients_with_the_same_settings_share_one_map() {
        let map = |value: &str| {
            BTreeMap::from([
                ("client_encoding".to_owned(), "UTF8".to_owned()),
                ("application_name".to_owned(), value.to_owned()),
            ])
        };
        let a = shared_settings(map("web"));
        let b = shared_settings(map("web"));
        let c = shared_settings(map("worker"));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(*c, map("worker"));
        // Once no client has it, the next one gets a map of its own.
        let weak = Arc::downgrade(&a);
        drop((a, b));
        assert_eq!(weak.strong_count(), 0);
        assert_eq!(*shared_settings(map("web")), map("web"));
    }

    #[test]
    fn least_recently_used_statement_goes_first() {
        let mut prepared = PreparedOnServer::default();
        for name in ["a", "b", "c"] {
            prepared.insert(Bytes::from(name));
        }
        assert!(prepared.contains(b"a"));
        assert_eq!(prepared.least_recently_used(b""), Some(Bytes::from("b")));
        assert_eq!(prepared.least_recently_used(b"b"), Some(Bytes::from("c")));
        prepared.remove(b"b");
        assert_eq!(prepared.len(), 2);
    }
}
