//! Transaction pooling's side of the relay: a client borrows a backend session when it
//! sends something and gives it back at ReadyForQuery outside a transaction.
//!
//! The client's prepared statements live here, in its view; on the server they exist
//! under rolegate's names (`rolegate_s` + a hash of the text), prepared on each backend
//! session the first time a client needs them there. What that changes in the replies
//! is fixed up by position: every Parse and Close rolegate sends is recorded with the
//! Sync that ends its batch, and the n-th ParseComplete / CloseComplete of a batch
//! answers the n-th Parse / Close. PostgreSQL skips to Sync after an error, so a
//! recorded message that got no reply by the batch's ReadyForQuery did not run.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Instant;

use super::*;
use crate::policy::SessionEffects;
use crate::pool::{Lease, Pool, PreparedOnServer, ServerConn};
use crate::proxy::{CancelSlot, CancelTarget};

const LOST: &str = "rolegate: the backend connection was lost; the transaction did not complete";

/// A name no statement has on the server (the prefix is reserved): closing it costs
/// nothing and answers CloseComplete.
const NO_STATEMENT: &[u8] = b"rolegate_none";

/// What one lease of a backend session carries; both directions reach it through
/// [`Shared`].
#[derive(Default)]
pub struct LeaseState {
    fixups: VecDeque<Fixup>,
    /// rolegate's statements on the leased backend session (moved in from it).
    prepared: PreparedOnServer,
    /// ParameterStatus messages the server sent during the lease.
    reported: Vec<(String, Bytes)>,
    /// A statement may have changed session-level settings.
    settings_dirty: bool,
    /// The parse context of statements prepared after that (shared with nobody).
    dirty_context: u64,
    /// Something lives only in this backend session: the client keeps it.
    pinned: bool,
    /// A statement that may have undone the pins was sent: when the session is idle,
    /// the server is asked whether anything is left.
    unpin_candidate: bool,
    /// A function rolegate cannot look into ran: settings are read back and then reset
    /// (names may be unknown), and pins, sequences and the seed are checked or cleared.
    unseen: bool,
    /// An unseen function ran since the server was last asked about pins.
    pin_check: bool,
    /// Sequence functions ran: `currval`/`lastval` state is cleared before lending.
    sequences: bool,
    /// The random seed was set: it is set again to a value of rolegate's before lending.
    seed: bool,
    /// The client's name for each server-side statement name it used, so that the
    /// server's errors name the client's statement (kept from lease to lease).
    client_names: HashMap<Bytes, Vec<u8>, crate::pool::ProcessKeys>,
    /// What the server did not do of what the client's view already shows, oldest
    /// first: undone newest first (a skipped Parse and Close of one name leave it as it
    /// was, in either order).
    undo: Vec<Undo>,
}

/// One change to the client's view of its statements that did not happen on the server.
enum Undo {
    /// A Parse did not run: the name was never the server's.
    Unparse(Vec<u8>),
    /// A Close, DEALLOCATE ALL or DISCARD ALL did not run: the statements are back.
    Reopen(Vec<(Vec<u8>, ClientStatement)>),
}

impl LeaseState {
    /// A DEALLOCATE ALL / DISCARD ALL was sent and not answered: until it is, no
    /// statement is known to be on the backend session.
    fn drop_pending(&self) -> bool {
        self.fixups
            .iter()
            .any(|f| matches!(f.action, FixupAction::DropsAll))
    }

    /// Whether the backend session has statement `name` prepared (as far as known).
    fn has_prepared(&mut self, name: &[u8]) -> bool {
        !self.drop_pending() && self.prepared.contains(name)
    }

    /// What a recorded message that got no reply did not do.
    fn skipped(&mut self, fixup: Fixup) {
        if let Some(name) = fixup.client_name {
            self.undo.push(Undo::Unparse(name));
        }
        if !fixup.reopens.is_empty() {
            self.undo.push(Undo::Reopen(fixup.reopens));
        }
    }
}

struct Fixup {
    /// The sync point whose ReadyForQuery ends the batch this message is in.
    batch: u64,
    /// `1` (ParseComplete) or `3` (CloseComplete).
    reply: u8,
    action: FixupAction,
    /// The client's statement this Parse (or stand-in) creates.
    client_name: Option<Vec<u8>>,
    /// The client's statements this Close (or DEALLOCATE ALL, DISCARD ALL) removes from
    /// its view: back in the view if the server skipped it (an error earlier in the
    /// batch, a failed transaction), as it keeps them then.
    reopens: Vec<(Vec<u8>, ClientStatement)>,
    /// The server-side statement this Parse prepares (or this eviction closes).
    server_name: Option<Bytes>,
}

impl Fixup {
    /// Whether a frame of a later batch must wait for this message's answer: one naming
    /// client statement `name` (`None`: a simple Query, which may be DEALLOCATE ALL).
    /// The answer decides what that name holds, or what the backend session has
    /// prepared (which any statement's Bind or Parse may rely on).
    fn decides(&self, name: Option<&[u8]>) -> bool {
        let holds = |n: &[u8]| {
            self.client_name.as_deref() == Some(n) || self.reopens.iter().any(|(r, _)| r == n)
        };
        match name {
            _ if matches!(self.action, FixupAction::DropsAll) => true,
            None => self.client_name.is_some() || !self.reopens.is_empty(),
            Some(name) => {
                holds(name)
                    || matches!(
                        self.action,
                        FixupAction::Forward { prepares: true }
                            | FixupAction::Swallow { prepares: true }
                            | FixupAction::Evicted
                    )
            }
        }
    }
}

enum FixupAction {
    /// The client's own message: its reply goes through. `prepares`: it is a Parse of
    /// a named statement (see `batch_answered` for when no reply comes).
    Forward { prepares: bool },
    /// A Parse of rolegate's own before a Bind or Describe: its reply stays here.
    Swallow { prepares: bool },
    /// A Close standing in for the client's Parse of a statement the server has: the
    /// client hears ParseComplete.
    AsParseComplete,
    /// Closing the least recently used statement (if it did not run, see
    /// `batch_answered`).
    Evicted,
    /// A Close of rolegate's own whose reply stays here, whatever happened.
    Drop,
    /// The client's DEALLOCATE ALL or DISCARD ALL: answered by its CommandComplete.
    DropsAll,
    /// The client's Parse of a name it has already, sent under the server name of the
    /// statement that name has, which the backend session has: the server fails it as
    /// it would have failed the client's (a syntax error, 25P02 in a failed
    /// transaction, 42P05), or skips it. A ParseComplete would mean the shared
    /// statement now has the client's text: the backend session is closed.
    Duplicate,
}

/// What becomes of one ParseComplete / CloseComplete.
pub(super) enum Reply {
    Forward,
    Drop,
    ParseComplete,
    /// A reply that cannot be right: the backend session's state is not known.
    Unexpected,
}

/// The client's prepared statements, as it sees them.
#[derive(Default)]
pub struct ClientStatements {
    named: HashMap<Vec<u8>, ClientStatement>,
    /// Bytes of text the named statements hold (bounded per client).
    bytes: usize,
    /// The pool's gauge of that memory, for /metrics.
    bytes_gauge: Option<prometheus_client::metrics::gauge::Gauge>,
    /// (Boxed: an idle client need not hold its room; the box is reused.)
    unnamed: Option<Box<ClientStatement>>,
    /// Custom settings (`app.tenant`) the client may have set: read back by name.
    custom_settings: BTreeSet<String>,
    /// A hash of the client's settings that change what a statement text means when
    /// it is parsed (`DateStyle`, `TimeZone`, `search_path`…): statements are shared on
    /// a backend session only between clients that parse them alike.
    context: u64,
    /// The batch (its Sync's number) in which the unnamed statement was last parsed on
    /// the server. In any other batch it is parsed again before a Bind or Describe:
    /// an error can make the server skip a Parse, and what the backend session then
    /// has under the empty name may be another client's.
    unnamed_batch: u64,
}

struct ClientStatement {
    /// Its name on the server (empty for the unnamed statement): a hash of its text,
    /// its parameter types and the settings that decide what the text means.
    server_name: Bytes,
    /// The parse context `server_name` was made for (see `ClientStatements::context`).
    context: u64,
    /// Mixed into the context for a second name of one text: each of the client's names
    /// then has a server name of its own, and an error names the right one.
    salt: u64,
    /// The Parse body after the name: text (as judged and maybe rewritten), types.
    text_and_tail: Bytes,
    /// What running it leaves in the session.
    effects: SessionEffects,
}

impl ClientStatement {
    /// A statement as the client's Parse gave it, before it has a server name.
    fn parsed(text_and_tail: &[u8], effects: SessionEffects) -> ClientStatement {
        ClientStatement {
            server_name: Bytes::new(),
            context: 0,
            salt: 0,
            text_and_tail: Bytes::copy_from_slice(text_and_tail),
            effects,
        }
    }

    /// Its server name in parse context `context` (settings changed since its Parse:
    /// prepared again as they are now).
    fn server_name_in(&self, context: u64) -> Bytes {
        if self.context == context {
            self.server_name.clone()
        } else {
            crate::pool::statement_name(&self.text_and_tail, context ^ self.salt)
        }
    }
}

/// The salt for a client statement name (never 0: 0 means none).
fn salt_for(name: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    name.hash(&mut hasher);
    hasher.finish() | 1
}

/// At most this many custom setting names are followed per client.
const MAX_CUSTOM_SETTINGS: usize = 64;

impl Drop for ClientStatements {
    fn drop(&mut self) {
        self.take_all();
    }
}

impl ClientStatements {
    pub(super) fn new(pool: &Pool) -> ClientStatements {
        let mut statements = ClientStatements::default();
        statements.bytes_gauge = Some(pool.stats.client_statement_bytes.clone());
        statements
    }

    pub(super) fn has_named(&self, name: &[u8]) -> bool {
        self.named.contains_key(name)
    }

    fn insert(&mut self, name: Vec<u8>, statement: ClientStatement) {
        let added = name.len() + statement.text_and_tail.len();
        if let Some(old) = self.named.insert(name, statement) {
            self.account(-((old.text_and_tail.len()) as i64));
        }
        self.account(added as i64);
    }

    fn remove(&mut self, name: &[u8]) {
        self.take(name);
    }

    /// Removes a statement from the view and gives it back.
    fn take(&mut self, name: &[u8]) -> Option<ClientStatement> {
        let old = self.named.remove(name)?;
        self.account(-((name.len() + old.text_and_tail.len()) as i64));
        Some(old)
    }

    /// Takes every named statement out of the view.
    fn take_all(&mut self) -> Vec<(Vec<u8>, ClientStatement)> {
        let all: Vec<_> = self.named.drain().collect();
        self.account(-(self.bytes as i64));
        all
    }

    fn account(&mut self, delta: i64) {
        self.bytes = (self.bytes as i64 + delta).max(0) as usize;
        if let Some(gauge) = &self.bytes_gauge {
            gauge.inc_by(delta);
        }
    }

    /// Notes the custom settings a statement may set; false when it may set some whose
    /// names cannot be known (or the client already has too many to follow).
    pub(super) fn note_custom_settings(
        &mut self,
        sql: &str,
        standard_conforming_strings: bool,
    ) -> bool {
        let found =
            crate::policy::setting_names::custom_setting_names(sql, standard_conforming_strings);
        let mut complete = found.complete;
        for name in found.names {
            if self.custom_settings.len() < MAX_CUSTOM_SETTINGS {
                self.custom_settings.insert(name);
            } else if !self.custom_settings.contains(&name) {
                complete = false;
            }
        }
        complete
    }
}

fn lease_state(shared: &Shared) -> std::sync::MutexGuard<'_, LeaseState> {
    match &shared.lease {
        Some(lease) => lease.lock().unwrap_or_else(|p| p.into_inner()),
        // Only called on pooled relays, which always have one.
        None => unreachable!("a pooled relay without lease state"),
    }
}

fn put_parse(out: &mut BytesMut, name: &[u8], text_and_tail: &[u8]) {
    out.put_u8(b'P');
    out.put_i32((4 + name.len() + 1 + text_and_tail.len()) as i32);
    out.put_slice(name);
    out.put_u8(0);
    out.put_slice(text_and_tail);
}

fn put_close_statement(out: &mut BytesMut, name: &[u8]) {
    out.put_u8(b'C');
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(b'S');
    out.put_slice(name);
    out.put_u8(0);
}

fn refusal(code: &'static str, message: String) -> Decision {
    Decision::Refuse(Box::new(Refusal {
        code,
        message,
        hint: None,
        kind: "prepared statement".into(),
        leaves_owner_role: true,
    }))
}

/// Remembers a ParameterStatus for the backend session's next client's greeting.
pub(super) fn record_parameter_status(lease: &std::sync::Mutex<LeaseState>, frame: &[u8]) {
    let body = &frame[5..];
    let name_end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let name = String::from_utf8_lossy(&body[..name_end]).into_owned();
    let mut lease = lease.lock().unwrap_or_else(|p| p.into_inner());
    lease.reported.push((name, Bytes::copy_from_slice(frame)));
    // A setting changed, maybe where rolegate does not look (inside a function): the
    // server says which settings the client has now when the lease ends.
    lease.settings_dirty = true;
}

/// Remembers the client's name for a server-side name (no allocation when known).
fn note_client_name(lease: &mut LeaseState, server_name: &Bytes, name: &[u8]) {
    if lease
        .client_names
        .get(server_name.as_ref())
        .map(Vec::as_slice)
        == Some(name)
    {
        return;
    }
    // (Bounded: stale names of earlier settings contexts go now and then.)
    if lease.client_names.len() >= 4096 {
        lease.client_names.clear();
    }
    lease
        .client_names
        .insert(server_name.clone(), name.to_vec());
}

/// An ErrorResponse that names a statement by rolegate's server-side name (`prepared
/// statement "rolegate_s…" does not exist`, `bind message supplies 2 parameters, but
/// prepared statement "rolegate_s…" requires 0`), rewritten to name the client's.
pub(super) fn error_with_client_names(shared: &Shared, frame: &[u8]) -> Option<BytesMut> {
    const PREFIX: &[u8] = b"rolegate_s";
    const NAME_LEN: usize = 10 + 32;
    if !super::contains(frame, PREFIX) {
        return None;
    }
    let lease = lease_state(shared);
    let mut body = Vec::with_capacity(frame.len());
    let mut rest = &frame[5..];
    let mut changed = false;
    while let Some(at) = rest.windows(PREFIX.len()).position(|w| w == PREFIX) {
        let name = rest.get(at..at + NAME_LEN);
        match name.and_then(|name| lease.client_names.get(name)) {
            Some(client) => {
                body.extend_from_slice(&rest[..at]);
                body.extend_from_slice(client);
                rest = &rest[at + NAME_LEN..];
                changed = true;
            }
            None => {
                body.extend_from_slice(&rest[..at + PREFIX.len()]);
                rest = &rest[at + PREFIX.len()..];
            }
        }
    }
    if !changed {
        return None;
    }
    body.extend_from_slice(rest);
    let mut out = BytesMut::with_capacity(body.len() + 5);
    wire::put_message(&mut out, b'E', &body);
    Some(out)
}

/// The batch ending at ReadyForQuery number `ready` is answered: what got no reply
/// did not run.
pub(super) fn batch_answered(shared: &Shared, ready: u64) {
    let mut lease = lease_state(shared);
    while lease.fixups.front().is_some_and(|f| f.batch <= ready) {
        let Some(fixup) = lease.fixups.pop_front() else {
            break;
        };
        // Skipped, or failed: the backend session is as it was. (What was sent after it
        // believing otherwise was skipped too: frames of later batches that name a
        // statement wait for this answer, see `waits_for_earlier_batch`.)
        match (&fixup.action, &fixup.server_name) {
            (
                FixupAction::Forward { prepares: true } | FixupAction::Swallow { prepares: true },
                Some(name),
            ) => lease.prepared.remove(name),
            (FixupAction::Evicted, Some(name)) => lease.prepared.insert(name.clone()),
            _ => {}
        }
        lease.skipped(fixup);
    }
    shared
        .has_fixups
        .store(!lease.fixups.is_empty(), Ordering::Relaxed);
}

/// Whether a CommandComplete is that of DEALLOCATE ALL or DISCARD ALL.
pub(super) fn drops_all(frame: &[u8]) -> bool {
    let body = &frame[5..];
    body == b"DISCARD ALL\0" || body == b"DEALLOCATE ALL\0"
}

impl Downstream {
    /// A ParseComplete or CloseComplete: the reply to the first recorded message of its
    /// kind in the batch being answered.
    pub(super) fn fix_up(&mut self, tag: u8, shared: &Shared) -> Reply {
        let batch = self.ready_count + 1;
        let mut lease = lease_state(shared);
        let Some(i) = lease
            .fixups
            .iter()
            .position(|f| f.batch == batch && f.reply == tag)
        else {
            // Every Parse and Close sent on a leased backend session is recorded (a
            // refusal's stand-in always fails): one more answer than that is not the
            // server rolegate believes it talks to. (Unless the replies could not be
            // predicted anyway, see `Upstream::note_order`: that session is never lent
            // to anyone else, and its batches may be numbered off by one.)
            return if tag == b'C' || shared.ambiguous.load(Ordering::Relaxed) {
                Reply::Forward
            } else {
                Reply::Unexpected
            };
        };
        let Some(fixup) = lease.fixups.remove(i) else {
            return Reply::Forward;
        };
        shared
            .has_fixups
            .store(!lease.fixups.is_empty(), Ordering::Relaxed);
        if matches!(fixup.action, FixupAction::DropsAll) {
            // It ran: what was prepared before it is gone.
            lease.prepared.forget_all();
        }
        match fixup.action {
            FixupAction::Forward { .. } | FixupAction::DropsAll => Reply::Forward,
            FixupAction::Swallow { .. } | FixupAction::Evicted | FixupAction::Drop => Reply::Drop,
            FixupAction::AsParseComplete => Reply::ParseComplete,
            FixupAction::Duplicate => Reply::Unexpected,
        }
    }

    /// Every Sync answered, no transaction open, nothing pinned, nothing half sent:
    /// the backend session can serve another client.
    pub(super) fn may_release(&self, shared: &Shared) -> bool {
        self.may_release_after_end(shared) && {
            let lease = lease_state(shared);
            (!lease.pinned || lease.unpin_candidate) && lease.fixups.is_empty()
        }
    }
}

impl Upstream<'_> {
    fn pool(&self) -> &Pool {
        match self.ctx.pooling {
            Some(pool) => pool,
            None => unreachable!("a pooled relay without a pool"),
        }
    }

    fn record(&self, shared: &Shared, lease: &mut LeaseState, reply: u8, action: FixupAction) {
        lease.fixups.push_back(Fixup {
            batch: self.sync_points + 1,
            reply,
            action,
            client_name: None,
            reopens: Vec::new(),
            server_name: None,
        });
        shared.has_fixups.store(true, Ordering::Relaxed);
    }

    /// The parse context statements are prepared in now: the client's settings, or,
    /// once this lease may have changed them, one of this lease's own.
    fn parse_context(&self, lease: &LeaseState) -> u64 {
        if lease.settings_dirty {
            lease.dirty_context
        } else {
            self.pooled
                .as_ref()
                .map_or(0, |statements| statements.context)
        }
    }

    /// Sets the parse context from the client's settings (lower-case name → value).
    /// Every built-in setting counts except those known not to change what a statement
    /// returns: parsing reads many (`DateStyle`, `TimeZone`, `timezone_abbreviations`,
    /// `search_path`…), and constant folding at planning time reads more (`bytea_output`
    /// and `extra_float_digits` decide the text of a folded cast), so an allow-list would
    /// miss some. Custom settings are read by functions at run time, not folded.
    pub(super) fn set_parse_context(&mut self, settings: &BTreeMap<String, String>) {
        use std::hash::{Hash, Hasher};
        fn irrelevant(name: &str) -> bool {
            name.contains('.')
                || matches!(
                    name,
                    "application_name"
                        | "client_min_messages"
                        | "statement_timeout"
                        | "lock_timeout"
                        | "idle_in_transaction_session_timeout"
                        | "idle_session_timeout"
                        | "transaction_timeout"
                        | "work_mem"
                        | "maintenance_work_mem"
                        | "temp_buffers"
                        | "hash_mem_multiplier"
                        | "plan_cache_mode"
                )
                || ["log_", "enable_", "jit", "cpu_", "track_"]
                    .iter()
                    .any(|prefix| name.starts_with(prefix))
        }
        let mut hasher = std::hash::DefaultHasher::new();
        for (name, value) in settings {
            if !irrelevant(name) {
                name.hash(&mut hasher);
                value.hash(&mut hasher);
            }
        }
        if let Some(statements) = self.pooled.as_mut() {
            statements.context = hasher.finish();
        }
    }

    /// The custom settings the client may have set (none in session mode).
    fn custom_settings(&self) -> &BTreeSet<String> {
        static NONE: BTreeSet<String> = BTreeSet::new();
        self.pooled
            .as_ref()
            .map_or(&NONE, |statements| &statements.custom_settings)
    }

    /// Whether a frame naming a prepared statement must wait for the server's answers to
    /// an earlier batch: a Parse or Close in it may not have run (an error before it
    /// skips to Sync), and until that is known neither the client's view of its names
    /// nor the list of what the backend session has prepared can be trusted. Not while
    /// a COPY runs or the replies are not known anyway: the server may then wait for the
    /// client.
    pub(super) fn waits_for_earlier_batch(&self, name: Option<&[u8]>, shared: &Shared) -> bool {
        if !shared.has_fixups.load(Ordering::Relaxed)
            || self.copy_running(shared)
            || shared.ambiguous.load(Ordering::Relaxed)
        {
            return false;
        }
        let batch = self.sync_points + 1;
        lease_state(shared)
            .fixups
            .iter()
            .any(|f| f.batch < batch && f.decides(name))
    }

    /// Undoes in the client's view what the server did not do.
    fn undo_skipped(&mut self, shared: &Shared) {
        let undo = std::mem::take(&mut lease_state(shared).undo);
        self.undo_in_view(undo);
    }

    /// Undoes `undo` (oldest first) in the client's view, newest first.
    fn undo_in_view(&mut self, undo: Vec<Undo>) {
        if undo.is_empty() {
            return;
        }
        let Some(statements) = self.pooled.as_mut() else {
            return;
        };
        for step in undo.into_iter().rev() {
            match step {
                Undo::Unparse(name) => statements.remove(&name),
                Undo::Reopen(reopened) => {
                    for (name, statement) in reopened {
                        statements.insert(name, statement);
                    }
                }
            }
        }
    }

    /// A Parse the policy let through (`decision` says how it goes): a named statement
    /// goes under its server name, or becomes a Close of nothing when the backend
    /// session has it already (the client still hears ParseComplete).
    pub(super) fn pooled_parse(
        &mut self,
        pos: usize,
        size: usize,
        decision: Decision,
        shared: &Shared,
    ) -> Decision {
        self.undo_skipped(shared);
        let frame: &[u8] = match &decision {
            Decision::Forward { .. } => &self.buf[pos..pos + size],
            Decision::Replace { frame, .. } => frame,
            Decision::Refuse(_) | Decision::ReplaceHead { .. } => return decision,
        };
        let Some((name, _, _)) = parse_parts(&frame[5..]) else {
            return decision;
        };
        let text_and_tail = &frame[5 + name.len() + 1..];
        let effects = self.last_effects;
        if name.is_empty() {
            self.record(
                shared,
                &mut lease_state(shared),
                b'1',
                FixupAction::Forward { prepares: false },
            );
            let batch = self.sync_points + 1;
            if let Some(statements) = self.pooled.as_mut() {
                match &mut statements.unnamed {
                    // (Drivers send the same text again and again: kept, not copied.)
                    Some(unnamed) if unnamed.text_and_tail == text_and_tail => {
                        unnamed.effects = effects;
                    }
                    unnamed => {
                        *unnamed = Some(Box::new(ClientStatement::parsed(text_and_tail, effects)));
                    }
                }
                statements.unnamed_batch = batch;
            }
            return decision;
        }
        let name = name.to_vec();
        let statement = ClientStatement::parsed(text_and_tail, effects);
        let mut lease = lease_state(shared);
        let (max_count, max_bytes) = self.pool().max_client_prepared;
        if let Some(statements) = self.pooled.as_ref() {
            let bytes = statements.bytes + name.len() + statement.text_and_tail.len();
            if !statements.named.contains_key(&name)
                && (statements.named.len() >= max_count || bytes > max_bytes)
            {
                return refusal(
                    "54000",
                    format!(
                        "rolegate: too many prepared statements for one client ({} of at most \
                         {max_count}, {bytes} bytes of at most {max_bytes}); deallocate some \
                         ([pool] max_client_prepared_statements, max_client_prepared_bytes)",
                        statements.named.len(),
                    ),
                );
            }
        }
        if let Some(existing) = self.pooled.as_ref().and_then(|s| s.named.get(&name)) {
            // PostgreSQL parses and analyses the new text before it finds the name taken:
            // the server is asked the same, under the name the statement has there.
            let context = self.parse_context(&lease);
            let server_name = existing.server_name_in(context);
            note_client_name(&mut lease, &server_name, &name);
            let mut out = BytesMut::new();
            if !lease.has_prepared(&server_name) {
                let existing_text = existing.text_and_tail.clone();
                self.prepare_on_server(
                    shared,
                    &mut lease,
                    &mut out,
                    &server_name,
                    &existing_text,
                    true,
                );
            }
            put_parse(&mut out, &server_name, &statement.text_and_tail);
            self.record(shared, &mut lease, b'1', FixupAction::Duplicate);
            return Decision::Replace {
                frame: out,
                restore_role: false,
            };
        }
        let context = self.parse_context(&lease);
        // A second name for one text gets a server name of its own (errors name it).
        let unsalted = crate::pool::statement_name(&statement.text_and_tail, context);
        // (Only while the other name still holds it: drivers such as tokio-postgres
        // prepare a text under a new name for each query and close it after.)
        let taken = lease.client_names.get(&unsalted).is_some_and(|other| {
            *other != name
                && self.pooled.as_ref().is_some_and(|statements| {
                    statements
                        .named
                        .get(other)
                        .is_some_and(|held| held.server_name == unsalted)
                })
        });
        let salt = if taken { salt_for(&name) } else { 0 };
        let server_name = if salt == 0 {
            unsalted
        } else {
            crate::pool::statement_name(&statement.text_and_tail, context ^ salt)
        };
        note_client_name(&mut lease, &server_name, &name);
        let mut out = BytesMut::new();
        if lease.has_prepared(&server_name) {
            put_close_statement(&mut out, NO_STATEMENT);
            self.record(shared, &mut lease, b'3', FixupAction::AsParseComplete);
        } else {
            self.prepare_on_server(
                shared,
                &mut lease,
                &mut out,
                &server_name,
                &statement.text_and_tail,
                false,
            );
        }
        // If this Parse (or the Close standing in for it) does not run, neither did the
        // client's.
        if let Some(last) = lease.fixups.back_mut() {
            last.client_name = Some(name.clone());
        }
        drop(lease);
        if let Some(statements) = self.pooled.as_mut() {
            statements.insert(
                name,
                ClientStatement {
                    server_name,
                    context,
                    salt,
                    ..statement
                },
            );
        }
        Decision::Replace {
            frame: out,
            restore_role: false,
        }
    }

    /// Puts a Parse of `server_name` into `out`, closing the least recently used
    /// statement first when the backend session has as many as it may keep.
    fn prepare_on_server(
        &self,
        shared: &Shared,
        lease: &mut LeaseState,
        out: &mut BytesMut,
        server_name: &Bytes,
        text_and_tail: &[u8],
        own: bool,
    ) {
        let pool = self.pool();
        if lease.prepared.doubtful() || lease.drop_pending() {
            // After DEALLOCATE ALL / DISCARD ALL (which may or may not have run) the
            // statement may or may not exist: close it first, whichever it is.
            put_close_statement(out, server_name);
            self.record(shared, lease, b'3', FixupAction::Drop);
        }
        if lease.prepared.len() >= pool.max_prepared {
            if let Some(old) = lease.prepared.least_recently_used(server_name) {
                lease.prepared.remove(&old);
                put_close_statement(out, &old);
                self.record(shared, lease, b'3', FixupAction::Evicted);
                if let Some(last) = lease.fixups.back_mut() {
                    last.server_name = Some(old);
                }
            }
        }
        put_parse(out, server_name, text_and_tail);
        lease.prepared.insert(server_name.clone());
        let action = if own {
            FixupAction::Swallow { prepares: true }
        } else {
            FixupAction::Forward { prepares: true }
        };
        self.record(shared, lease, b'1', action);
        if let Some(last) = lease.fixups.back_mut() {
            last.server_name = Some(server_name.clone());
        }
        pool.stats.prepares.inc();
    }

    /// A Bind or Describe: the statement under its server name, prepared first on a
    /// backend session that lacks it.
    ///
    /// `head`: when only the first `head` bytes of a large Bind are read, the decision is
    /// made on them ([`Decision::ReplaceHead`]) and the rest of the frame passes through
    /// unread: a large parameter is never held whole.
    pub(super) fn pooled_use(
        &mut self,
        tag: u8,
        pos: usize,
        size: usize,
        head: Option<usize>,
        shared: &Shared,
    ) -> Decision {
        const FORWARD: Decision = Decision::Forward {
            restore_role: false,
        };
        self.undo_skipped(shared);
        let body = &self.buf[pos + 5..pos + head.unwrap_or(size)];
        // Bind: portal \0 statement \0 rest. Describe: 'S' statement \0 (a portal: as is).
        let prefix_len = match tag {
            b'B' => match body.iter().position(|&b| b == 0) {
                Some(end) => end + 1,
                None => return Decision::Refuse(Box::new(malformed_refusal("Bind"))),
            },
            _ if body.first() == Some(&b'S') => 1,
            _ => return FORWARD,
        };
        let rest = &body[prefix_len..];
        let Some(name_end) = rest.iter().position(|&b| b == 0) else {
            return Decision::Refuse(Box::new(malformed_refusal("statement name")));
        };
        let name = &rest[..name_end];
        let unnamed = name.is_empty();
        let Some(statements) = self.pooled.as_ref() else {
            return FORWARD;
        };
        let statement = if name.is_empty() {
            statements.unnamed.as_deref()
        } else {
            match statements.named.get(name) {
                Some(statement) => Some(statement),
                None => {
                    return refusal(
                        "26000",
                        format!(
                            "prepared statement \"{}\" does not exist",
                            String::from_utf8_lossy(name)
                        ),
                    )
                }
            }
        };
        // Never parsed by this client: whatever the backend session has under the empty
        // name is another client's.
        let Some(statement) = statement else {
            return refusal("26000", "unnamed prepared statement does not exist".into());
        };
        let effects = statement.effects;
        let batch = self.sync_points + 1;
        let reparse = unnamed && statements.unnamed_batch != batch;
        let mut out = BytesMut::new();
        let mut lease = lease_state(shared);
        if unnamed {
            if reparse {
                put_parse(&mut out, b"", &statement.text_and_tail);
                self.record(
                    shared,
                    &mut lease,
                    b'1',
                    FixupAction::Swallow { prepares: false },
                );
            }
            // (Without a Parse before it, the frame goes as it is: see the end.)
            if head.is_none() && reparse {
                out.extend_from_slice(&self.buf[pos..pos + size]);
            }
        } else {
            // (Settings changed since the client's Parse: prepared again as they are now;
            // but not in a failed transaction, where no Parse runs, when the backend
            // session has it as it was.)
            let aborted = shared.status.load(Ordering::Relaxed) == b'E';
            let server_name = if aborted && lease.has_prepared(&statement.server_name) {
                statement.server_name.clone()
            } else {
                statement.server_name_in(self.parse_context(&lease))
            };
            note_client_name(&mut lease, &server_name, name);
            if !lease.has_prepared(&server_name) {
                self.prepare_on_server(
                    shared,
                    &mut lease,
                    &mut out,
                    &server_name,
                    &statement.text_and_tail,
                    true,
                );
            }
            let body = &self.buf[pos + 5..pos + head.unwrap_or(size)];
            // The frame with the server's name and its new length. Of a large Bind only
            // the head: the rest follows as it comes.
            let rest = size - 5 - prefix_len - name_end;
            let len = 4 + prefix_len + server_name.len() + rest;
            // (What is written now: never the large rest.)
            out.reserve(1 + len - if head.is_some() { rest } else { 0 });
            out.put_u8(tag);
            out.put_i32(len as i32);
            out.put_slice(&body[..prefix_len]);
            out.put_slice(&server_name);
            if head.is_none() {
                out.put_slice(&body[prefix_len + name_end..]);
            }
        }
        drop(lease);
        if reparse {
            if let Some(statements) = self.pooled.as_mut() {
                statements.unnamed_batch = batch;
            }
        }
        if tag == b'B' {
            self.apply_effects(effects, shared);
        }
        if head.is_some() {
            let consumed = if unnamed {
                0
            } else {
                5 + prefix_len + name_end
            };
            return Decision::ReplaceHead {
                frame: out,
                consumed,
            };
        }
        if unnamed && !reparse {
            return FORWARD;
        }
        Decision::Replace {
            frame: out,
            restore_role: false,
        }
    }

    /// A Close: a statement leaves the client's view only; the server keeps its copy
    /// for other clients (the client hears CloseComplete from closing nothing).
    pub(super) fn pooled_close(&mut self, pos: usize, size: usize, shared: &Shared) -> Decision {
        self.undo_skipped(shared);
        let body = &self.buf[pos + 5..pos + size];
        let statement = body
            .strip_prefix(b"S")
            .and_then(|n| n.strip_suffix(&[0]))
            .map(<[u8]>::to_vec);
        let mut lease = lease_state(shared);
        self.record(
            shared,
            &mut lease,
            b'3',
            FixupAction::Forward { prepares: false },
        );
        drop(lease);
        let Some(statements) = self.pooled.as_mut() else {
            return Decision::Forward {
                restore_role: false,
            };
        };
        match statement {
            Some(name) if !name.is_empty() => {
                if let Some(closed) = statements.take(&name) {
                    if let Some(last) = lease_state(shared).fixups.back_mut() {
                        last.reopens = vec![(name, closed)];
                    }
                }
                let mut out = BytesMut::new();
                put_close_statement(&mut out, NO_STATEMENT);
                Decision::Replace {
                    frame: out,
                    restore_role: false,
                }
            }
            Some(_) => {
                statements.unnamed = None;
                Decision::Forward {
                    restore_role: false,
                }
            }
            None => Decision::Forward {
                restore_role: false,
            },
        }
    }

    /// A simple Query that goes to the server: it replaces the unnamed statement.
    pub(super) fn pooled_query(&mut self, shared: &Shared) {
        if let Some(statements) = self.pooled.as_mut() {
            statements.unnamed = None;
        }
        self.apply_effects(self.last_effects, shared);
    }

    fn apply_effects(&mut self, effects: SessionEffects, shared: &Shared) {
        if !effects.any() {
            return;
        }
        let pool = self.pool();
        let mut lease = lease_state(shared);
        if (effects.settings || effects.unseen) && !lease.settings_dirty {
            lease.settings_dirty = true;
            lease.dirty_context = rand::random();
        }
        lease.unseen |= effects.unseen;
        lease.pin_check |= effects.unseen;
        lease.sequences |= effects.sequences;
        lease.seed |= effects.seed;
        // A pin lasts until the client leaves: whether DISCARD ALL (or UNLISTEN, or an
        // unlock) undid everything is not known when it is sent.
        if effects.pins && !lease.pinned {
            lease.pinned = true;
            pool.stats.clients_pinned.inc();
        }
        lease.unpin_candidate |= effects.unpins && lease.pinned;
        if effects.drops_prepared {
            // Out of the client's view now (what follows in the batch runs only if it
            // ran); back when its batch is answered without its CommandComplete.
            self.record(shared, &mut lease, b'C', FixupAction::DropsAll);
            if let (Some(statements), Some(last)) = (self.pooled.as_mut(), lease.fixups.back_mut())
            {
                last.reopens = statements.take_all();
            }
        }
    }

    /// Between transactions the client holds no backend session, and the server it had
    /// is in its normal state: CopyData, CopyDone and CopyFail (of a COPY that ended) are
    /// dropped and Flush does nothing, as the server would do; Sync is answered
    /// ReadyForQuery (idle) as the server would answer it. None of them reaches a backend
    /// session the client does not hold.
    /// (The answers are queued in `down`, for the client.)
    fn answer_stray(&mut self, down: &mut Downstream) -> Result<(), RelayEnd> {
        let mut answers = BytesMut::new();
        loop {
            if self.discard > 0 {
                let n = self.discard.min(self.buf.len());
                self.buf.advance(n);
                self.discard -= n;
                if self.discard > 0 {
                    break;
                }
            }
            let Some((tag, len)) = wire::peek_header(&self.buf) else {
                break;
            };
            if !matches!(tag, b'd' | b'c' | b'f' | b'H' | b'S') {
                break;
            }
            let size = wire::frame_size(len, self.ctx.max_message_bytes)
                .map_err(RelayEnd::ClientProtocol)?;
            if tag == b'S' && self.buf.len() < size {
                break;
            }
            let here = size.min(self.buf.len());
            self.buf.advance(here);
            self.discard = size - here;
            if tag == b'S' {
                wire::put_ready_for_query(&mut answers, b'I');
            }
        }
        down.push_own(&answers);
        Ok(())
    }

    /// No backend session could be had: the client's next batch (up to its Sync or
    /// Query) is answered with `message` and not run; the session goes on.
    async fn answer_without_backend<R, W>(
        &mut self,
        down: &mut Downstream,
        client_r: &mut R,
        client_w: &mut W,
        shared: &Shared,
        code: &str,
        message: &str,
    ) -> Result<(), RelayEnd>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // A client that sent Flush waits for the error before it sends Sync.
        let mut told = false;
        loop {
            while let Some((tag, len)) = wire::peek_header(&self.buf) {
                let size = wire::frame_size(len, self.ctx.max_message_bytes)
                    .map_err(RelayEnd::ClientProtocol)?;
                if self.buf.len() < size {
                    break;
                }
                self.buf.advance(size);
                let mut out = BytesMut::new();
                if !told && matches!(tag, b'S' | b'Q' | b'F' | b'H') {
                    wire::put_error(&mut out, &ErrorFields::error(code, message));
                    told = true;
                }
                match tag {
                    b'X' => return Err(RelayEnd::ClientClosed),
                    b'S' | b'Q' | b'F' => wire::put_ready_for_query(&mut out, b'I'),
                    _ => {}
                }
                if !out.is_empty() {
                    down.push_own(&out);
                    down.send_owed(client_w).await.map_err(RelayEnd::ClientIo)?;
                }
                if matches!(tag, b'S' | b'Q' | b'F') {
                    return Ok(());
                }
            }
            self.read(client_r, shared).await?;
        }
    }
}

/// A client in transaction mode: how to reach it and what it carries between leases.
pub struct PooledClient<'a> {
    pub stream: MaybeTls,
    /// Its session-level settings (lower-case name → value), applied to each backend
    /// session it borrows.
    pub settings: crate::pool::ClientSettings,
    /// Its cancel key's target, set while it holds a backend session.
    pub cancel: &'a CancelSlot,
    pub backend_addr: std::sync::Arc<str>,
    /// Tells backend sessions apart the clients that use them (`pool::next_client_id`).
    pub client_id: u64,
}

/// The large read buffers go with the backend session (a pool has few, it may have many
/// idle clients): a lease starts with the bytes the client's small idle buffer holds moved
/// into the session's client-side buffer, and with its server-side one.
fn lend_buffers(up: &mut Upstream<'_>, down: &mut Downstream, conn: &mut ServerConn) {
    let (client_side, server_side) = &mut conn.buffers;
    if client_side.capacity() > up.buf.len() {
        client_side.clear();
        client_side.extend_from_slice(&up.buf);
        up.buf.clear();
        std::mem::swap(&mut up.buf, client_side);
    }
    if down.buf.is_empty() {
        std::mem::swap(&mut down.buf, server_side);
    }
}

/// At the end of a lease the large buffers go back with the backend session, unless one
/// still holds bytes (of the client's next transaction): that one stays with the client.
fn return_buffers(up: &mut Upstream<'_>, down: &mut Downstream, conn: &mut ServerConn) {
    let (client_side, server_side) = &mut conn.buffers;
    if up.buf.is_empty() {
        std::mem::swap(&mut up.buf, client_side);
    }
    if down.buf.is_empty() {
        std::mem::swap(&mut down.buf, server_side);
    }
}

/// What an idle client holds: a read buffer of `IDLE_READ` bytes, no more (a large one
/// stays with it only when its lease ended without giving it back).
fn keep_idle_buffers_small(up: &mut Upstream<'_>, down: &mut Downstream) {
    if up.buf.is_empty() && up.buf.capacity() > IDLE_READ {
        up.buf = BytesMut::new();
    }
    if down.buf.is_empty() && down.buf.capacity() > 0 {
        down.buf = BytesMut::new();
    }
    for out in [&mut up.out, &mut down.out] {
        if out.is_empty() && out.capacity() > IDLE_READ {
            *out = BytesMut::new();
        }
    }
}

/// Relays one client in transaction mode until it leaves.
pub async fn run(client: PooledClient<'_>, ctx: &RelayContext<'_>) -> (RelayStats, RelayEnd) {
    let PooledClient {
        stream,
        mut settings,
        cancel,
        backend_addr,
        client_id,
    } = client;
    let Some(pool) = ctx.pooling else {
        return (RelayStats::default(), RelayEnd::ClientClosed);
    };
    let (mut client_r, mut client_w) = tokio::io::split(stream);
    let shared = Shared::new(ctx.standard_conforming_strings, true);
    let mut up = Upstream::new(ctx);
    up.set_parse_context(&settings);
    let mut down = Downstream::new(ctx.metrics);
    let mut closing = PollWhenWoken::new(shared.closing(ctx.shutdown.clone(), ctx.idle_timeout));
    let end = 'session: loop {
        // No backend session: wait for the client. What needs none is answered here.
        keep_idle_buffers_small(&mut up, &mut down);
        loop {
            while up.buf.is_empty() {
                tokio::select! {
                    biased;
                    read = up.read_chunk(&mut client_r, &shared, IDLE_READ) => {
                        if let Err(end) = read {
                            break 'session end;
                        }
                    }
                    end = &mut closing => break 'session end,
                }
            }
            if let Err(end) = up.answer_stray(&mut down) {
                break 'session end;
            }
            // (A client that does not read its answers is still bound by the idle
            // timeout and shutdown.)
            if down.owes_client() {
                let sent = tokio::select! {
                    biased;
                    sent = down.send_owed(&mut client_w) => sent.map_err(RelayEnd::ClientIo),
                    end = &mut closing => Err(end),
                };
                if let Err(end) = sent {
                    break 'session end;
                }
            }
            if !up.buf.is_empty() {
                break;
            }
        }
        if up.buf.first() == Some(&b'X') {
            break RelayEnd::ClientClosed;
        }
        // The transaction starts, as the client sees it, with its first message. It
        // waits for a backend session here, in the client's own future: only clients
        // that hold one need the larger one of a lease, boxed.
        let started = Instant::now();
        let checkout = tokio::select! {
            biased;
            lease = pool.checkout_since(started) => lease,
            end = &mut closing => break end,
        };
        let outcome = match checkout {
            Ok(lease) => {
                let turn = LeaseTurn {
                    pool,
                    up: &mut up,
                    down: &mut down,
                    client_r: &mut client_r,
                    client_w: &mut client_w,
                    shared: &shared,
                    closing: &mut closing,
                    settings: &mut settings,
                    cancel,
                    backend_addr: &backend_addr,
                    client_id,
                };
                // (Boxed in a statement of its own: a future built in the awaiting
                // statement would still take room in this one's.)
                let leased = Box::pin(one_lease(turn, lease, started));
                leased.await
            }
            Err(e) => {
                tracing::warn!(pool = pool.key.label(), error = %e, "no backend connection for a client");
                let (code, message) = match e {
                    crate::pool::CheckoutError::Timeout(_) => {
                        ("53300", format!("rolegate: {e}; nothing was run"))
                    }
                    crate::pool::CheckoutError::Backend(_) => ("08006", format!("rolegate: {e}")),
                };
                let answer = up.answer_without_backend(
                    &mut down,
                    &mut client_r,
                    &mut client_w,
                    &shared,
                    code,
                    &message,
                );
                answered_or_closing(answer, &mut closing).await
            }
        };
        if let Some(end) = outcome {
            break end;
        }
        // A reply whose flush a cancelled step left (a TLS stream holds written bytes
        // until flushed) reaches the client before it is waited for; a client that does
        // not read it is still bound by the idle timeout and shutdown.
        if down.unflushed {
            tokio::select! {
                biased;
                flushed = client_w.flush() => match flushed {
                    Ok(()) => down.unflushed = false,
                    Err(e) => break RelayEnd::ClientIo(e),
                },
                end = &mut closing => break end,
            }
        }
    };
    say_goodbye(&end, &mut down, &mut client_w).await;
    close_client(&mut client_w).await;
    let stats = RelayStats {
        client_bytes: up.bytes,
        server_bytes: down.bytes,
        refused: up.refused,
    };
    (stats, end)
}

/// What one lease of a client's needs from its session (see `one_lease`).
struct LeaseTurn<'a, 'c, F> {
    pool: &'a std::sync::Arc<Pool>,
    up: &'a mut Upstream<'c>,
    down: &'a mut Downstream,
    client_r: &'a mut tokio::io::ReadHalf<MaybeTls>,
    client_w: &'a mut tokio::io::WriteHalf<MaybeTls>,
    shared: &'a Shared,
    closing: &'a mut F,
    settings: &'a mut crate::pool::ClientSettings,
    cancel: &'a CancelSlot,
    backend_addr: &'a std::sync::Arc<str>,
    client_id: u64,
}

/// One transaction (or a pinned client's run of them) on a leased backend session,
/// until the session's return. Boxed by its caller: its future is the largest part of
/// a client's, and only clients that hold a backend session need it, not the many idle
/// or waiting ones. `None`: the client goes on; `Some`: its session ends so.
///
/// Its three phases are futures of their own, awaited in turn: a coroutine keeps every
/// local that lives across more than one await in a slot of its own, but the futures of
/// different awaits share one. As one body (with the checkout) it was 1,280 bytes, above
/// the 1,032 that glibc's per-thread cache serves, so each box took malloc's slow path.
///
/// (An async block rather than an async fn: an async fn's future keeps its arguments
/// twice, as given and moved into its body: 104 bytes more here.)
#[allow(clippy::manual_async_fn)]
fn one_lease<'t, 'c, F>(
    mut turn: LeaseTurn<'t, 'c, F>,
    lease: Lease,
    started: Instant,
) -> impl std::future::Future<Output = Option<RelayEnd>> + use<'t, 'c, F>
where
    F: std::future::Future<Output = RelayEnd> + Unpin,
{
    async move {
        let mut lease = match take_lease(&mut turn, lease).await {
            Ok(lease) => lease,
            Err(end) => return end,
        };
        let outcome = relay_while_pinned(&mut turn, &mut lease).await;
        finish_lease(&mut turn, lease, outcome, started).await
    }
}

/// The backend session, given the client's settings and its own state for the lease;
/// `Err` when it cannot be (the client heard why, or its session ends so).
async fn take_lease<F>(
    turn: &mut LeaseTurn<'_, '_, F>,
    mut lease: Lease,
) -> Result<Lease, Option<RelayEnd>>
where
    F: std::future::Future<Output = RelayEnd> + Unpin,
{
    let pool = turn.pool;
    // The rare paths below are boxed where they are awaited: this future is part of the
    // one boxed per transaction, so its size is copied and touched on every one.
    let applied = if lease.conn().has_settings_of(turn.settings) {
        Ok(false)
    } else {
        Box::pin(lease.conn().apply_client_settings(turn.settings)).await
    };
    match applied {
        Ok(true) => {
            pool.stats.resets.inc();
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %e, "could not give a backend connection the client's settings");
            drop(lease);
            let message = format!("rolegate: could not apply the session's settings: {e}");
            return Err(turn.answer_without_backend("08006", &message).await);
        }
    }
    let shared = turn.shared;
    {
        let mut state = lease_state(shared);
        *state = LeaseState {
            prepared: std::mem::take(&mut lease.conn().prepared),
            client_names: std::mem::take(&mut state.client_names),
            ..LeaseState::default()
        };
    }
    lend_buffers(turn.up, turn.down, lease.conn());
    if let Some(sql) = lease.conn().take_leftovers(turn.client_id) {
        turn.up.queue_own_query(&sql, shared);
    }
    let conn = lease.conn();
    turn.cancel.set(Some(CancelTarget {
        addr: turn.backend_addr.clone(),
        pid: conn.session.pid,
        secret: conn.session.secret,
    }));
    pool.stats.clients_active.inc();
    Ok(lease)
}

impl<F> LeaseTurn<'_, '_, F>
where
    F: std::future::Future<Output = RelayEnd> + Unpin,
{
    /// The client's batch answered with an error and nothing run: `None` when the
    /// client goes on.
    async fn answer_without_backend(&mut self, code: &str, message: &str) -> Option<RelayEnd> {
        let answer = self.up.answer_without_backend(
            self.down,
            self.client_r,
            self.client_w,
            self.shared,
            code,
            message,
        );
        answered_or_closing(answer, self.closing).await
    }
}

/// `answer` (boxed: only clients without a backend session need its room), or the end
/// `closing` brings first: a client that does not read its answer, or does not send the
/// rest of its batch, is still bound by the idle timeout and shutdown. `None` when the
/// client goes on.
async fn answered_or_closing<A, F>(answer: A, closing: &mut F) -> Option<RelayEnd>
where
    A: std::future::Future<Output = Result<(), RelayEnd>>,
    F: std::future::Future<Output = RelayEnd> + Unpin,
{
    tokio::select! {
        biased;
        answered = Box::pin(answer) => answered.err(),
        end = closing => Some(end),
    }
}

/// Relays the leased session's transactions, and a pinned client's run of them, until
/// it can go back (or either side ends).
async fn relay_while_pinned<F>(turn: &mut LeaseTurn<'_, '_, F>, lease: &mut Lease) -> RelayEnd
where
    F: std::future::Future<Output = RelayEnd> + Unpin,
{
    let shared = turn.shared;
    loop {
        let outcome = relay_lease(
            turn.up,
            turn.down,
            turn.client_r,
            turn.client_w,
            lease,
            shared,
            turn.closing,
        )
        .await;
        let released = matches!(outcome, RelayEnd::Released);
        // A function rolegate cannot look into may have LISTENed or taken a lock:
        // the server says whether the client now holds something only this backend
        // session has. (Marked before the client is written to: a lease that ends on
        // that write is still known to be pinned, and its session is reset.)
        let check_pins = released && std::mem::take(&mut lease_state(shared).pin_check);
        let still_pinned = check_pins && !Box::pin(lease.conn().nothing_pinned()).await;
        if still_pinned {
            let mut state = lease_state(shared);
            if !state.pinned {
                state.pinned = true;
                turn.pool.stats.clients_pinned.inc();
            }
        }
        // (`closing` is raced only while it has not resolved: a lease it ended has its
        // result already.)
        let closing = released.then_some(&mut *turn.closing);
        if let Err(end) = pass_notifications(lease.conn(), turn.down, turn.client_w, closing).await
        {
            return end;
        }
        if still_pinned {
            continue;
        }
        if !released || !lease_state(shared).pinned {
            return outcome;
        }
        // Idle, pinned, and the client sent something that may have undone its pins:
        // the server says whether anything is left.
        lease_state(shared).unpin_candidate = false;
        let unpinned = Box::pin(lease.conn().nothing_pinned()).await;
        let closing = Some(&mut *turn.closing);
        if let Err(end) = pass_notifications(lease.conn(), turn.down, turn.client_w, closing).await
        {
            return end;
        }
        if unpinned {
            lease_state(shared).pinned = false;
            turn.pool.stats.clients_pinned.dec();
            return outcome;
        }
    }
}

/// The relay of a lease ended: the backend session goes back clean, or is closed, and
/// the client learns what it lost with it.
async fn finish_lease<F>(
    turn: &mut LeaseTurn<'_, '_, F>,
    mut lease: Lease,
    outcome: RelayEnd,
    started: Instant,
) -> Option<RelayEnd>
where
    F: std::future::Future<Output = RelayEnd> + Unpin,
{
    let (pool, shared, cancel, client_id) = (turn.pool, turn.shared, turn.cancel, turn.client_id);
    let (up, down) = (&mut *turn.up, &mut *turn.down);
    let (client_r, client_w) = (&mut *turn.client_r, &mut *turn.client_w);
    let settings = &mut *turn.settings;
    pool.stats.clients_active.dec();
    pool.stats.transaction_seconds.observe(started.elapsed());
    // No cancel of this client's may reach the backend session's next client.
    if cancel.clear() {
        Box::pin(cancel.carried_out()).await;
    }
    let mut state = std::mem::take(&mut *lease_state(shared));
    lease_state(shared).client_names = std::mem::take(&mut state.client_names);
    // (Parses and Closes still unanswered when the backend session was lost never
    // ran either.)
    while let Some(fixup) = state.fixups.pop_front() {
        // (Whether it ran is not known: the connection is not kept then anyway.)
        if matches!(fixup.action, FixupAction::DropsAll) {
            state.prepared.forget_all();
        }
        state.skipped(fixup);
    }
    up.undo_in_view(std::mem::take(&mut state.undo));
    shared.has_fixups.store(false, Ordering::Relaxed);
    let conn = lease.conn();
    conn.prepared = state.prepared;
    for (name, frame) in state.reported {
        conn.session.set_parameter_status(name, frame);
    }
    if state.pinned {
        pool.stats.clients_pinned.dec();
    }
    let idle = down.may_release_after_end(shared);
    if idle && state.unseen {
        Box::pin(conn.check_prepared()).await;
    }
    if idle && conn.prepared.doubtful() {
        // What DEALLOCATE ALL / DISCARD ALL left is made certain before anyone else
        // borrows the session.
        if Box::pin(conn.session.query("DEALLOCATE ALL"))
            .await
            .is_err()
        {
            drop(lease);
            if matches!(outcome, RelayEnd::Released) {
                return None;
            }
            return Some(outcome);
        }
        conn.prepared = PreparedOnServer::default();
    }
    match outcome {
        RelayEnd::Released => {
            if state.settings_dirty {
                let read = conn.read_settings(&pool.key, up.custom_settings(), state.unseen);
                match Box::pin(read).await {
                    Ok(now) => {
                        up.set_parse_context(&now);
                        *settings = crate::pool::shared_settings(now);
                    }
                    Err(e) => {
                        // The client already has its ReadyForQuery; going on would run
                        // its next transaction without what it SET, silently. (Its own
                        // statement_timeout applies to the read, too.)
                        tracing::warn!(error = %e, "could not read a backend connection's settings; closed, and the client's session with it");
                        let why = match &e {
                            crate::backend::BackendError::Server(fields) => {
                                wire::field(fields, b'M')
                                    .unwrap_or("the server's error")
                                    .to_owned()
                            }
                            other => other.to_string(),
                        };
                        return Some(RelayEnd::SettingsLost(why));
                    }
                }
            }
            conn.note_leftovers(
                client_id,
                state.sequences || state.unseen,
                state.seed || state.unseen,
            );
            return_buffers(up, down, conn);
            lease.release();
        }
        RelayEnd::ClientClosed if idle => {
            // Pinned state (LISTEN, locks, temporary tables…) is undone before the
            // backend session serves anyone else.
            // (So is what an unseen function may have left when the client left before
            // the server was asked: `pin_check`.)
            let ready = if state.pinned || state.pin_check {
                Box::pin(conn.reset_session(&pool.key)).await
            } else {
                conn.note_leftovers(
                    client_id,
                    state.sequences || state.unseen,
                    state.seed || state.unseen,
                );
                if state.settings_dirty {
                    Box::pin(conn.reset_settings(&pool.key)).await
                } else {
                    Ok(())
                }
            };
            if ready.is_ok() {
                return_buffers(up, down, lease.conn());
                lease.release();
            }
            return Some(RelayEnd::ClientClosed);
        }
        RelayEnd::ServerClosed | RelayEnd::ServerIo(_) | RelayEnd::ServerProtocol(_) => {
            drop(lease);
            // (rolegate's own role-restoring query is not the client's to hear about.)
            let own = shared.own_queries().len() as u64;
            let outstanding = up
                .sync_points
                .saturating_sub(down.ready_count)
                .saturating_sub(own);
            let in_transaction = shared.status.load(Ordering::Relaxed) != b'I';
            if state.pinned || up.mid_batch() || up.has_unsent() || down.passthrough > 0 {
                return Some(RelayEnd::BackendLost);
            }
            // Only the transaction in flight is lost: the client hears an error for
            // each Sync or Query it is waiting on, then goes on with a new backend.
            down.forget_backend(shared, up.sync_points);
            let mut out = BytesMut::new();
            for _ in 0..outstanding {
                wire::put_error(&mut out, &ErrorFields::error("08006", LOST));
                wire::put_ready_for_query(&mut out, b'I');
            }
            down.push_own(&out);
            // (A client that does not read them, or sends nothing more, is still bound
            // by the idle timeout and shutdown.)
            let closing = &mut *turn.closing;
            tokio::select! {
                biased;
                sent = down.send_owed(client_w) => if sent.is_err() {
                    return Some(RelayEnd::ClientClosed);
                },
                end = &mut *closing => return Some(end),
            }
            up.discard_all_in_batch = false;
            // Lost between two statements of a transaction: the client's next batch
            // learns it, and runs nothing.
            if outstanding == 0 && in_transaction {
                if up.buf.is_empty() {
                    let read = tokio::select! {
                        biased;
                        read = Box::pin(up.read(client_r, shared)) => read,
                        end = &mut *closing => Err(end),
                    };
                    if let Err(end) = read {
                        return Some(end);
                    }
                }
                if let Some(end) = turn.answer_without_backend("08006", LOST).await {
                    return Some(end);
                }
            }
        }
        other => return Some(other),
    }
    None
}

impl Downstream {
    /// The relay ended while the backend session was leased: whether it is idle and
    /// clean (pinned state aside) for the next client.
    fn may_release_after_end(&self, shared: &Shared) -> bool {
        !shared.ambiguous.load(Ordering::Relaxed)
            && self.buf.is_empty()
            && self.judged == 0
            && self.out.is_empty()
            && !shared.unsent.load(Ordering::Relaxed)
            && self.passthrough == 0
            && shared.is_idle()
            && !shared.unsynced.load(Ordering::Relaxed)
            && !shared.has_own_queries.load(Ordering::Relaxed)
    }

    /// The backend session is gone: everything it owed is accounted for.
    fn forget_backend(&mut self, shared: &Shared, sync_points: u64) {
        // (What the client is owed stays owed: whole frames, or the rest of one it has
        // the head of.)
        if self.judged > 0 {
            self.out.extend_from_slice(&self.buf[..self.judged]);
            self.judged = 0;
        }
        self.buf.clear();
        self.ready_count = sync_points;
        self.own_query_failed = false;
        shared.ready_received.store(sync_points, Ordering::Relaxed);
        shared.status.store(b'I', Ordering::Relaxed);
        shared.pending().clear();
        shared.own_queries().clear();
        shared.has_own_queries.store(false, Ordering::Relaxed);
        shared.unsynced.store(false, Ordering::Relaxed);
        shared.ambiguous.store(false, Ordering::Relaxed);
    }
}

/// Notifications that came while rolegate asked the server something are the client's.
/// (Raced with `closing`, the idle timeout and shutdown, when given: a client that does
/// not read cannot hold the backend session past them.)
async fn pass_notifications<W, F>(
    conn: &mut ServerConn,
    down: &mut Downstream,
    client_w: &mut W,
    closing: Option<&mut F>,
) -> Result<(), RelayEnd>
where
    W: AsyncWrite + Unpin,
    F: std::future::Future<Output = RelayEnd> + Unpin,
{
    if conn.session.notifications.is_empty() {
        return Ok(());
    }
    let frames = std::mem::take(&mut conn.session.notifications);
    if down.passthrough > 0 {
        // (They would land inside the server's unfinished frame; a session left so
        // ends before the client reads anything else.)
        return Ok(());
    }
    for frame in frames {
        down.push_own(&frame);
    }
    // A lease that did not end in release has its end already: what is queued goes
    // with the rest of what the client is owed, within the goodbye's time.
    let Some(closing) = closing else {
        return Ok(());
    };
    tokio::select! {
        biased;
        written = down.send_owed(client_w) => written.map_err(|_| RelayEnd::ClientClosed),
        end = closing => Err(end),
    }
}

/// Relays between the client and its leased backend session until the session can go
/// back (or either side ends).
async fn relay_lease<CR, CW, F>(
    up: &mut Upstream<'_>,
    down: &mut Downstream,
    client_r: &mut CR,
    client_w: &mut CW,
    lease: &mut Lease,
    shared: &Shared,
    closing: &mut F,
) -> RelayEnd
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    F: std::future::Future<Output = RelayEnd> + Unpin,
{
    match &mut lease.conn().session.stream {
        MaybeTls::Plain(tcp) => {
            let (server_r, server_w) = tcp.split();
            lease_pump(
                up, down, client_r, client_w, server_r, server_w, shared, closing,
            )
            .await
        }
        other => {
            let (server_r, server_w) = tokio::io::split(other);
            lease_pump(
                up, down, client_r, client_w, server_r, server_w, shared, closing,
            )
            .await
        }
    }
}

/// The client's bytes that were waiting go first; then both directions at once.
#[allow(clippy::too_many_arguments)]
async fn lease_pump<CR, CW, SR, SW, F>(
    up: &mut Upstream<'_>,
    down: &mut Downstream,
    client_r: &mut CR,
    client_w: &mut CW,
    mut server_r: SR,
    mut server_w: SW,
    shared: &Shared,
    closing: &mut F,
) -> RelayEnd
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
    F: std::future::Future<Output = RelayEnd> + Unpin,
{
    up.resume = true;
    loop {
        // biased (a fixed order costs no random number per wake): the server's replies
        // first, so a client that keeps sending cannot starve them.
        tokio::select! {
            biased;
            end = down.step(&mut server_r, client_w, shared) => if let Some(end) = end {
                return end;
            },
            end = up.step(client_r, &mut server_w, shared) => if let Some(end) = end {
                return end;
            },
            end = &mut *closing => return end,
        }
        // Both steps are cancellation-safe, so whichever finished, nothing is half done
        // but what `may_release` checks. (Bytes of a frame whose rest is still to come
        // keep the backend session: the client is in the middle of a message.)
        if up.buf.is_empty() && down.may_release(shared) {
            return RelayEnd::Released;
        }
    }
}
