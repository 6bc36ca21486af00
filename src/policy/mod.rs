//! The statement policy: what each client class may send to the server.
//!
//! `classify` parses with PostgreSQL's grammar and says what each statement does;
//! `rules` turns that into a verdict for a class; the [`ClassificationCache`] makes
//! repeated statements (ORMs send the same few hundred) cost a hash lookup.

mod builtins;
pub mod classify;
pub mod fastpath;
pub mod rules;
pub mod setting_names;
pub mod sql_text;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

pub use classify::{
    classify, Classification, Effect, RoleStatement, SessionEffects, StatementInfo,
    RESERVED_STATEMENT_PREFIX,
};
pub use rules::{unsupported_client_encoding, Allowed, Refusal};
pub use sql_text::SqlTextFunction;

use crate::config::{Allowance, ClientClass, PolicyConfig, PolicyMode};

/// Statements longer than this are judged but not cached: they are rare, and caching
/// them would let a few clients fill memory.
const MAX_CACHED_STATEMENT: usize = 16 * 1024;

/// Who is asking: enough to judge and to write an audit line.
#[derive(Debug, Clone)]
pub struct Requester<'a> {
    pub user: &'a str,
    pub class: ClientClass,
    pub allow: &'a [Allowance],
    /// The role the session is kept in: its class role (the owner for migrators; in the
    /// one-login layout the owner, or `app_role` for app clients).
    pub role: &'a str,
}

/// An allowed statement string. The default, and by far the most common case, is
/// "forward the client's bytes, nothing else": then it is one null pointer, so that the
/// verdict a session has in memory costs no more than a hash lookup.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass(Option<Box<PassActions>>);

/// What goes to the server instead of the client's bytes, and what the relay does
/// around it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassActions {
    /// Send this text instead of the client's (in the client's encoding).
    pub rewritten: Option<Vec<u8>>,
    /// It is DISCARD ALL: the relay sets the session's role again right after it.
    pub discard_all: bool,
    /// `set_config` takes its setting name from these parameters: judged at Bind.
    pub bound_setting_names: Vec<u16>,
    /// `set_config('client_encoding', …)` takes the encoding from these: judged at Bind.
    pub bound_encodings: Vec<u16>,
    /// What it leaves in the backend session (transaction pooling follows it).
    pub session_effects: SessionEffects,
}

static FORWARD_AS_IS: PassActions = PassActions {
    rewritten: None,
    discard_all: false,
    bound_setting_names: Vec::new(),
    bound_encodings: Vec::new(),
    session_effects: SessionEffects {
        settings: false,
        pins: false,
        drops_prepared: false,
        discards_all: false,
        unpins: false,
        unseen: false,
        sequences: false,
        seed: false,
    },
};

impl Pass {
    /// `None`: forward the client's bytes, nothing else.
    pub fn actions(self) -> Option<Box<PassActions>> {
        self.0
    }
}

impl std::ops::Deref for Pass {
    type Target = PassActions;
    fn deref(&self) -> &PassActions {
        self.0.as_deref().unwrap_or(&FORWARD_AS_IS)
    }
}

pub struct Policy {
    mode: PolicyMode,
    max_statement_bytes: usize,
    cache: ClassificationCache,
}

impl Policy {
    pub fn new(config: &PolicyConfig) -> Policy {
        Policy {
            mode: config.mode,
            max_statement_bytes: config.max_statement_bytes,
            cache: ClassificationCache::new(config.cache_entries)
                .with_sql_text_functions(config.sql_text_functions.clone()),
        }
    }

    pub fn max_statement_bytes(&self) -> usize {
        self.max_statement_bytes
    }

    /// Judges one statement string (a `Query` or a `Parse`). `Ok`: send it on, as the
    /// [`Pass`] says. `Err`: refuse it with this error. Every refusal is logged as one
    /// audit line; in report mode it is logged and let through, unless it would leave
    /// the owner role.
    ///
    /// `session`: what this client's session has had allowed so far (the relay keeps one
    /// per session); `None` judges from the shared cache alone.
    pub fn check(
        &self,
        who: &Requester<'_>,
        sql: &[u8],
        standard_conforming_strings: bool,
        session: Option<&mut SessionVerdicts>,
    ) -> Result<Pass, Refusal> {
        match self.judge(who, sql, standard_conforming_strings, session) {
            Ok(pass) => Ok(pass),
            // Let through in report mode: what it leaves in the session is not known, so
            // transaction pooling assumes the most (settings to re-read, a pin).
            Err(refusal) => self.audit(who, sql, refusal).map_or_else(
                || {
                    Ok(Pass(Some(Box::new(PassActions {
                        session_effects: SessionEffects {
                            settings: true,
                            pins: true,
                            unseen: true,
                            sequences: true,
                            seed: true,
                            ..SessionEffects::default()
                        },
                        ..PassActions::default()
                    }))))
                },
                Err,
            ),
        }
    }

    /// Judges the setting name `set_config` gets from a bound parameter, by the rules a
    /// literal name follows.
    pub fn check_bound_setting(&self, who: &Requester<'_>, name: &[u8]) -> Option<Refusal> {
        let name = String::from_utf8_lossy(name);
        let name = name.trim();
        let (kind, refused) = if classify::is_role_setting(name) {
            (
                "set_config('role')",
                "changing the session role is not allowed",
            )
        } else if name.eq_ignore_ascii_case("client_encoding") {
            (
                "set_config('client_encoding')",
                "client_encoding is set with SET client_encoding, where rolegate sees the value",
            )
        } else if who.class == ClientClass::Readonly && classify::is_read_only_setting(name) {
            (
                "set_config('transaction_read_only')",
                "readonly sessions cannot leave read-only mode",
            )
        } else {
            return None;
        };
        let refusal = Refusal {
            code: "42501",
            message: format!("rolegate: {refused} ({kind} with a bound setting name)"),
            hint: None,
            kind: kind.into(),
            leaves_owner_role: true,
        };
        self.audit(who, b"", refusal)
    }

    /// Judges the client_encoding `set_config('client_encoding', $n, …)` gets from a bound
    /// parameter, as a literal value would be.
    pub fn check_bound_encoding(&self, who: &Requester<'_>, value: &[u8]) -> Option<Refusal> {
        let refusal = unsupported_client_encoding(String::from_utf8_lossy(value).trim())?;
        self.audit(who, b"", refusal)
    }

    /// Logs a refusal as one audit line; returns it when it is enforced.
    pub fn audit(&self, who: &Requester<'_>, sql: &[u8], refusal: Refusal) -> Option<Refusal> {
        let fingerprint = std::str::from_utf8(sql)
            .ok()
            .filter(|text| !text.is_empty())
            .and_then(|text| pg_query::fingerprint(text, 0, 0).ok())
            .map(|f| f.hex)
            .unwrap_or_else(|| "-".into());
        // Report mode is for rolling out the class rules; leaving the owner role is never
        // let through.
        let enforced = self.mode == PolicyMode::Enforce || refusal.leaves_owner_role;
        tracing::warn!(
            target: "rolegate::audit",
            user = who.user,
            class = who.class.as_str(),
            kind = refusal.kind.as_str(),
            fingerprint = fingerprint.as_str(),
            enforced,
            "{}",
            if enforced { "statement refused" } else { "statement would be refused (report mode)" }
        );
        enforced.then_some(refusal)
    }

    fn judge(
        &self,
        who: &Requester<'_>,
        sql: &[u8],
        scs: bool,
        mut session: Option<&mut SessionVerdicts>,
    ) -> Result<Pass, Refusal> {
        if sql.len() > self.max_statement_bytes {
            return Err(Refusal {
                code: "42501",
                message: format!(
                    "rolegate: statement of {} bytes is longer than the {} bytes rolegate judges ([policy] max_statement_bytes)",
                    sql.len(),
                    self.max_statement_bytes
                ),
                hint: None,
                kind: "oversized statement".into(),
                leaves_owner_role: false,
            });
        }
        if let Some(session) = session.as_deref_mut() {
            if session.scs != scs {
                session.forget(scs);
            }
            if session.remembers(sql, scs) {
                return Ok(Pass::default());
            }
        }
        let latin1;
        let text: &str = match std::str::from_utf8(sql) {
            Ok(text) => text,
            Err(_) => {
                latin1 = latin1_text(sql);
                &latin1
            }
        };
        let Some(session) = session else {
            let classification = self.cache.get_or_classify(text, scs);
            let allowed = rules::judge(who.class, who.allow, who.role, &classification)?;
            self.same_under_other_scs(who, text, scs, &allowed)?;
            return Ok(pass(text, sql, allowed));
        };
        // (A text that was not UTF-8 is remembered as its conversion.)
        if text.len() != sql.len() && session.allowed.contains(text.as_bytes()) {
            return Ok(Pass::default());
        }
        // A text with a backslash is remembered only as itself: texts that share a
        // numeric key with scs on may differ where the numbers are with it off.
        let key = if scs && !text.contains('\\') {
            numeric_literal_key(text)
        } else {
            None
        };
        if key
            .as_deref()
            .is_some_and(|k| session.allowed.contains(k.as_bytes()))
        {
            return Ok(Pass::default());
        }
        let classification = self.cache.get_or_classify_keyed(text, scs, key.as_deref());
        let allowed = rules::judge(who.class, who.allow, who.role, &classification)?;
        self.same_under_other_scs(who, text, scs, &allowed)?;
        if allowed.is_plain() {
            session.remember(
                key.map_or_else(|| text.as_bytes().into(), |key| key.into_bytes().into()),
            );
        }
        Ok(pass(text, sql, allowed))
    }
}

impl Policy {
    /// `standard_conforming_strings` decides where a string with a backslash in it ends,
    /// and a client can change it in a message the server has not answered yet when its
    /// next statement arrives (or inside a function rolegate does not look into). So a
    /// text with a backslash must pass under the other value too, in the same way, or be
    /// a syntax error there (which the server would refuse as well): otherwise a string
    /// that hides `set_config('role', …)` under one value could expose it under the other.
    fn same_under_other_scs(
        &self,
        who: &Requester<'_>,
        text: &str,
        scs: bool,
        allowed: &Allowed,
    ) -> Result<(), Refusal> {
        if !text.contains('\\') {
            return Ok(());
        }
        let other = !scs;
        let setting = if other { "on" } else { "off" };
        let classification = self.cache.get_or_classify(text, other);
        match rules::judge(who.class, who.allow, who.role, &classification) {
            Ok(other_allowed) if other_allowed == *allowed => Ok(()),
            Ok(_) => Err(Refusal {
                code: "42501",
                message: format!(
                    "rolegate: this statement means something else with standard_conforming_strings = {setting}"
                ),
                hint: Some("Use E'' strings for backslash escapes, or send the statement once the SET that changes standard_conforming_strings has been answered.".into()),
                kind: "ambiguous backslash".into(),
                leaves_owner_role: true,
            }),
            Err(refusal) if refusal.code == "42601" => Ok(()),
            Err(mut refusal) => {
                refusal.message.push_str(&format!(
                    " (as the server reads it with standard_conforming_strings = {setting})"
                ));
                Err(refusal)
            }
        }
    }
}

/// The statement as text for the parser. UTF-8 is read as such. Anything else comes
/// from a client_encoding other than UTF8 (rolegate refuses those whose characters can
/// hide ASCII bytes), where only the ASCII bytes decide the statement's structure (where
/// strings, identifiers and statements end; every other byte is part of an identifier
/// or a string): reading each byte as one character (Latin-1) keeps that structure.
fn latin1_text(sql: &[u8]) -> String {
    sql.iter().map(|&b| char::from(b)).collect()
}

/// What goes to the server for an allowed `text` (read from the client's `sql`).
fn pass(text: &str, sql: &[u8], allowed: Allowed) -> Pass {
    if allowed.is_plain() {
        return Pass::default();
    }
    let rewritten = (!allowed.replacements.is_empty()).then(|| {
        let mut out = String::with_capacity(text.len() + 32);
        let mut copied = 0;
        for ((start, end), replacement) in &allowed.replacements {
            out.push_str(&text[copied..*start]);
            out.push_str(replacement);
            copied = *end;
        }
        out.push_str(&text[copied..]);
        if std::str::from_utf8(sql).is_ok() {
            out.into_bytes()
        } else {
            // Back to the client's bytes: every character came from one byte, and the
            // replacements are ASCII.
            out.chars().map(|c| c as u32 as u8).collect()
        }
    });
    Pass(Some(Box::new(PassActions {
        rewritten,
        discard_all: allowed.discard_all,
        bound_setting_names: allowed.bound_setting_names,
        bound_encodings: allowed.bound_encodings,
        session_effects: allowed.session_effects,
    })))
}

/// Largest total of statement text one session remembers as allowed.
const SESSION_VERDICT_BYTES: usize = 16 * 1024;

/// The statements (or their numeric-constant keys) one session has had allowed.
///
/// A statement the session sends again is let through from here, not from the shared
/// cache: a lookup there takes a shard lock and a reference count that every worker
/// thread touches, so their cache lines would travel between cores on every statement.
/// The verdict depends only on the text, `standard_conforming_strings` and who asks, and
/// a session's requester and policy never change, so what is remembered stays true.
#[derive(Default)]
pub struct SessionVerdicts {
    /// Statement texts, or their numeric-constant keys, as the client's bytes.
    allowed: std::collections::HashSet<Box<[u8]>, ahash::RandomState>,
    /// The `standard_conforming_strings` the entries were judged under.
    scs: bool,
    bytes: usize,
}

impl SessionVerdicts {
    fn forget(&mut self, scs: bool) {
        self.allowed.clear();
        self.bytes = 0;
        self.scs = scs;
    }

    /// Whether the text (as is, or by its numeric-constant key) was allowed before. Most
    /// statements a client repeats are plain ASCII with at most bare integers in them:
    /// those are answered from one scan that builds their key on the stack, without the
    /// UTF-8 check, an allocation, or a lookup of the text before its key. Anything else
    /// is answered by the full path in [`Policy::judge`].
    fn remembers(&self, sql: &[u8], scs: bool) -> bool {
        if self.allowed.contains(sql) {
            return true;
        }
        if !scs || sql.len() > FAST_KEY_BYTES {
            return false;
        }
        let mut key = [0u8; FAST_KEY_BYTES];
        match plain_integer_scan(sql, &mut key) {
            PlainScan::Key(len) => key.get(..len).is_some_and(|k| self.allowed.contains(k)),
            PlainScan::NoNumbers | PlainScan::NotPlain => false,
        }
    }

    fn remember(&mut self, text: Box<[u8]>) {
        if text.len() > SESSION_VERDICT_BYTES {
            return;
        }
        if self.bytes + text.len() > SESSION_VERDICT_BYTES {
            self.forget(self.scs);
        }
        self.bytes += text.len();
        self.allowed.insert(text);
    }
}

/// Classifications keyed by exact statement text, one map per value of
/// `standard_conforming_strings` (it changes how a text splits into statements).
pub struct ClassificationCache {
    maps: [DashMap<Box<str>, Arc<Classification>, ahash::RandomState>; 2],
    entries: AtomicUsize,
    capacity: usize,
    /// Installed extensions' functions that run SQL text (`[policy] sql_text_functions`).
    sql_text_functions: Vec<SqlTextFunction>,
}

impl ClassificationCache {
    pub fn new(capacity: usize) -> ClassificationCache {
        ClassificationCache {
            maps: [DashMap::default(), DashMap::default()],
            entries: AtomicUsize::new(0),
            capacity,
            sql_text_functions: Vec::new(),
        }
    }

    /// Classifies knowing these functions run SQL text too.
    pub fn with_sql_text_functions(mut self, functions: Vec<SqlTextFunction>) -> Self {
        self.sql_text_functions = functions;
        self
    }

    pub fn get_or_classify(&self, sql: &str, scs: bool) -> Arc<Classification> {
        // A text without numbers is stored as itself: found here without computing a key.
        if let Some(hit) = self.maps[usize::from(scs)].get(sql) {
            return hit.clone();
        }
        // Texts that differ only in numeric constants share a verdict, so they share an
        // entry: `... WHERE aid = 17` and `... WHERE aid = 42` are parsed once. Only with
        // standard_conforming_strings on, the one setting pg_query's scanner knows.
        let key = if scs { numeric_literal_key(sql) } else { None };
        self.get_or_classify_keyed(sql, scs, key.as_deref())
    }

    /// [`Self::get_or_classify`] for a caller that has the numeric-constant key already.
    /// The entry is stored under the key when there is one, else under the text.
    fn get_or_classify_keyed(
        &self,
        sql: &str,
        scs: bool,
        key: Option<&str>,
    ) -> Arc<Classification> {
        let map = &self.maps[usize::from(scs)];
        let key = key.unwrap_or(sql);
        if let Some(hit) = map.get(key) {
            return hit.clone();
        }
        let classification = Arc::new(classify::classify_with(sql, scs, &self.sql_text_functions));
        if key.len() <= MAX_CACHED_STATEMENT && self.capacity > 0 {
            if self.entries.load(Ordering::Relaxed) >= self.capacity {
                self.evict();
            }
            if map.insert(key.into(), classification.clone()).is_none() {
                self.entries.fetch_add(1, Ordering::Relaxed);
            }
        }
        classification
    }

    /// Drops about an eighth of the entries, chosen at random: cheap, and statements in
    /// steady use come straight back.
    fn evict(&self) {
        let mut kept = 0;
        for map in &self.maps {
            map.retain(|_, _| rand::random::<u8>() >= 32);
            kept += map.len();
        }
        self.entries.store(kept, Ordering::Relaxed);
    }

    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The text with every integer and numeric constant (as PostgreSQL's own scanner sees
/// them) replaced by `0` / `0.0`; `None` when it has none or does not scan. No verdict
/// depends on the value of a number: statement kinds, setting names and `set_config`'s
/// setting name are all words or strings, which stay as they are.
fn numeric_literal_key(sql: &str) -> Option<String> {
    match plain_integer_key(sql) {
        PlainKey::Key(key) => Some(key),
        PlainKey::NoNumbers => None,
        PlainKey::NotPlain => scanned_numeric_key(sql),
    }
}

enum PlainKey {
    Key(String),
    NoNumbers,
    /// The text has something only the real scanner may judge.
    NotPlain,
}

/// The fast path of [`numeric_literal_key`], as a `String` (see [`plain_integer_scan`]).
fn plain_integer_key(sql: &str) -> PlainKey {
    let mut key = vec![0u8; sql.len()];
    match plain_integer_scan(sql.as_bytes(), &mut key) {
        PlainScan::Key(len) => {
            key.truncate(len);
            // (Only ASCII passes the scan.)
            String::from_utf8(key).map_or(PlainKey::NotPlain, PlainKey::Key)
        }
        PlainScan::NoNumbers => PlainKey::NoNumbers,
        PlainScan::NotPlain => PlainKey::NotPlain,
    }
}

/// Texts longer than this take the full path for their key (it is built on the stack).
const FAST_KEY_BYTES: usize = 512;

/// What [`plain_integer_scan`] found.
enum PlainScan {
    /// The key is this many bytes at the start of the buffer.
    Key(usize),
    NoNumbers,
    /// The text has something only the real scanner may judge.
    NotPlain,
}

/// The fast path of [`numeric_literal_key`] for the texts ORMs and pgbench send most:
/// plain ASCII with no string, quoted identifier, dollar quote, parameter, comment or
/// escape, and integers written as bare digits. In such a text the scanner's rules come
/// down to one: a run of digits that does not continue an identifier is an integer
/// constant (the sign is never part of it; PostgreSQL's scanner leaves `-` to the
/// grammar). Anything else (a quote, `$`, `--`, `/*`, a digit run touching a letter,
/// `_` or `.` as in `1e5`, `0x1F`, `1_000`, `1.5`, any byte that is not ASCII) goes to
/// pg_query's scanner, which costs ~1 µs more. The key (never longer than the text) is
/// written to `key`; a `key` shorter than the text is answered `NotPlain`.
fn plain_integer_scan(sql: &[u8], key: &mut [u8]) -> PlainScan {
    if key.len() < sql.len() {
        return PlainScan::NotPlain;
    }
    // First what kinds of bytes the text has at all: most texts are then settled, or
    // need only their digit runs looked at.
    let seen = classes_in(sql);
    if seen & OTHER != 0
        || (seen & DASH != 0 && sql.windows(2).any(|pair| pair == b"--"))
        || (seen & SLASH != 0 && sql.windows(2).any(|pair| pair == b"/*"))
    {
        return PlainScan::NotPlain;
    }
    let continues_word = |b: u8| PLAIN_CLASS[usize::from(b)] & (WORD | DIGIT) != 0;
    let mut written = 0;
    let mut copied = 0;
    let mut from = 0;
    while let Some(start) = next_ascii_digit(sql, from) {
        let run = sql.get(start..).map_or(0, |run| {
            run.iter().take_while(|b| b.is_ascii_digit()).count()
        });
        // (Every step moves on by at least one digit; anything else fails closed.) An
        // integer of ten digits or more may not fit int4, and PostgreSQL's scanner then
        // calls it a numeric constant (`0.0` in the key): the real scanner judges it, or
        // `FETCH 3000000000` (a syntax error) would share `FETCH 5`'s key.
        if run == 0 || run > 9 {
            return PlainScan::NotPlain;
        }
        let end = start + run;
        let before = start.checked_sub(1).and_then(|at| sql.get(at)).copied();
        if before.is_some_and(continues_word) {
            // In a keyword or identifier (`t1`, `a1b2`): the rest of the word goes with it.
            from = end
                + sql.get(end..).map_or(0, |rest| {
                    rest.iter().take_while(|&&b| continues_word(b)).count()
                });
            continue;
        }
        // `1.5`, `.5`, `1e5`, `0x1F`, `1_000`: numbers only the real scanner may judge.
        let after = sql.get(end).copied();
        if before == Some(b'.') || after.is_some_and(|b| b == b'.' || continues_word(b)) {
            return PlainScan::NotPlain;
        }
        let Some(piece) = sql.get(copied..start) else {
            return PlainScan::NotPlain;
        };
        let Some(to) = key.get_mut(written..=written + piece.len()) else {
            return PlainScan::NotPlain;
        };
        let (text, zero) = to.split_at_mut(piece.len());
        text.copy_from_slice(piece);
        zero[0] = b'0';
        written += piece.len() + 1;
        copied = end;
        from = end;
    }
    if written == 0 {
        return PlainScan::NoNumbers;
    }
    let Some(rest) = sql.get(copied..) else {
        return PlainScan::NotPlain;
    };
    match key.get_mut(written..written + rest.len()) {
        Some(to) => {
            to.copy_from_slice(rest);
            PlainScan::Key(written + rest.len())
        }
        None => PlainScan::NotPlain,
    }
}

/// The [`PLAIN_CLASS`] bits of every byte of `sql`, OR-ed: eight bytes a step, whose
/// lookups the processor overlaps (~2 instructions a byte, against ~5 a byte at a time).
fn classes_in(sql: &[u8]) -> u8 {
    let class = |b: u8| PLAIN_CLASS[usize::from(b)];
    let mut chunks = sql.chunks_exact(8);
    let mut seen = 0;
    for c in &mut chunks {
        seen |= class(c[0])
            | class(c[1])
            | class(c[2])
            | class(c[3])
            | class(c[4])
            | class(c[5])
            | class(c[6])
            | class(c[7]);
    }
    chunks
        .remainder()
        .iter()
        .fold(seen, |seen, &b| seen | class(b))
}

/// Where the first digit at or after `from` is, in a text of ASCII bytes only (checked
/// by its caller): eight bytes a step, as one 64-bit word.
fn next_ascii_digit(sql: &[u8], from: usize) -> Option<usize> {
    const EACH: u64 = u64::from_le_bytes([1; 8]);
    let rest = sql.get(from..)?;
    let mut chunks = rest.chunks_exact(8);
    let mut at = from;
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(<[u8; 8]>::try_from(chunk).unwrap_or_default());
        // A byte below 0x80 plus 0x50 (or 0x46) stays below 0x100, so nothing carries
        // into the next byte; its top bit says whether it was at least b'0' (or b'9' + 1).
        let at_least_0 = word.wrapping_add(0x50 * EACH);
        let above_9 = word.wrapping_add(0x46 * EACH);
        let digits = at_least_0 & !above_9 & (0x80 * EACH);
        if digits != 0 {
            return Some(at + (digits.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(u8::is_ascii_digit)
        .map(|i| at + i)
}

// What each byte is to [`plain_integer_scan`], as bits: the text's bytes are OR-ed
// together in one tight loop (this runs on every simple-protocol statement with a
// number), and a digit run's neighbours are looked up.
const OTHER: u8 = 1;
const PUNCT: u8 = 0;
const DASH: u8 = 2;
const SLASH: u8 = 4;
const WORD: u8 = 8;
const DIGIT: u8 = 16;
static PLAIN_CLASS: [u8; 256] = {
    let mut table = [OTHER; 256];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        table[b] = match c {
            b'0'..=b'9' => DIGIT,
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => WORD,
            b'-' => DASH,
            b'/' => SLASH,
            b' ' | b'\t' | b'\n' | b'\r' => PUNCT,
            b'(' | b')' | b',' | b';' | b'.' | b'[' | b']' | b':' => PUNCT,
            b'+' | b'*' | b'<' | b'>' | b'=' | b'~' | b'!' | b'@' | b'#' | b'%' | b'^' | b'&'
            | b'|' | b'?' => PUNCT,
            _ => OTHER,
        };
        b += 1;
    }
    table
};

fn scanned_numeric_key(sql: &str) -> Option<String> {
    use pg_query::protobuf::Token;
    let tokens = pg_query::scan_tokens(sql).ok()?;
    let mut key = String::with_capacity(sql.len());
    let mut last = 0usize;
    for token in tokens {
        let placeholder = if token.token == Token::Iconst as i32 {
            "0"
        } else if token.token == Token::Fconst as i32 {
            "0.0"
        } else {
            continue;
        };
        let (start, end) = (
            usize::try_from(token.start).ok()?,
            usize::try_from(token.end).ok()?,
        );
        if start < last || end < start || !sql.is_char_boundary(start) || !sql.is_char_boundary(end)
        {
            return None;
        }
        key.push_str(sql.get(last..start)?);
        key.push_str(placeholder);
        last = end;
    }
    if last == 0 {
        return None;
    }
    key.push_str(sql.get(last..)?);
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_share_a_key_strings_and_names_do_not() {
        let key = |s| numeric_literal_key(s);
        assert_eq!(
            key("SELECT a FROM t WHERE id = 42 AND x > 1.5").as_deref(),
            Some("SELECT a FROM t WHERE id = 0 AND x > 0.0")
        );
        assert_eq!(
            key("SELECT a FROM t2 WHERE id = 7"),
            key("SELECT a FROM t2 WHERE id = 8")
        );
        assert_ne!(
            key("SELECT a FROM t1 WHERE id = 7"),
            key("SELECT a FROM t2 WHERE id = 7")
        );
        assert_eq!(key("SELECT '42', \"x1\" FROM t"), None);
        assert_eq!(
            key("SELECT set_config('role', '1', false), 3").as_deref(),
            Some("SELECT set_config('role', '1', false), 0")
        );
    }

    #[test]
    fn plain_texts_take_the_fast_path_and_the_rest_the_scanner() {
        let plain = |s| match plain_integer_key(s) {
            PlainKey::Key(k) => Some(k),
            PlainKey::NoNumbers => Some("no numbers".into()),
            PlainKey::NotPlain => None,
        };
        assert_eq!(
            plain("UPDATE t1 SET a = a + -12 WHERE aid = 5678;").as_deref(),
            Some("UPDATE t1 SET a = a + -0 WHERE aid = 0;")
        );
        assert_eq!(plain("SELECT x FROM t").as_deref(), Some("no numbers"));
        for not_plain in [
            "SELECT 1.5",
            "SELECT .5",
            "SELECT 1. FROM t",
            "SELECT t.1",
            "SELECT 1e5",
            "SELECT 0x1F",
            "SELECT 1_000",
            "SELECT 1 -- 2",
            "SELECT 1 /* 2 */",
            "SELECT '1'",
            "SELECT \"c1\" FROM t",
            "SELECT $1",
            "SELECT $$1$$",
            "SELECT é1",
            "SELECT E'\\x41'",
            // Ten digits may not fit int4: the scanner's numeric constant, not an integer.
            "FETCH 3000000000 FROM c",
            "SELECT 0000000001",
        ] {
            assert_eq!(plain(not_plain), None, "{not_plain}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]
        /// Wherever the fast path answers, it agrees with PostgreSQL's scanner: every
        /// digit run it replaced is a numeric constant there, and nothing else changed.
        #[test]
        fn the_fast_key_agrees_with_the_scanner(
            sql in "(SELECT|UPDATE|t1|_x|a_2|[0-9]{1,12}|[ .,;()=+*/:<>-]){1,24}",
            tail in "(e|x|--|/\\*|'|\\$|1)?",
        ) {
            let sql = format!("{sql}{tail}");
            if let PlainKey::Key(fast) = plain_integer_key(&sql) {
                // (Exactly: integers too big for int4, which the scanner calls numeric
                // constants, `0.0`, are left to it.)
                proptest::prop_assert_eq!(Some(fast), scanned_numeric_key(&sql), "{}", sql);
            }
        }
    }

    #[test]
    fn a_cached_number_does_not_leak_a_verdict() {
        let cache = ClassificationCache::new(100);
        let select = cache.get_or_classify("SELECT * FROM t WHERE id = 1", true);
        assert_eq!(
            cache.get_or_classify("SELECT * FROM t WHERE id = 2", true),
            select
        );
        let role =
            cache.get_or_classify("SELECT set_config('role', 'x', false) FROM t LIMIT 1", true);
        let Classification::Statements(s) = &*role else {
            panic!()
        };
        assert!(s[0].changes_role);
        let Classification::Statements(s) = &*cache.get_or_classify(
            "SELECT set_config('search_path', 'x', false) FROM t LIMIT 2",
            true,
        ) else {
            panic!()
        };
        assert!(!s[0].changes_role);
        // An integer too big for int4 is a syntax error where only int4 is taken; the
        // next client's small one is not.
        let too_big = cache.get_or_classify("FETCH 3000000000 FROM c", true);
        assert!(
            matches!(&*too_big, Classification::SyntaxError(_)),
            "{too_big:?}"
        );
        let fetch = cache.get_or_classify("FETCH 5 FROM c", true);
        assert!(
            matches!(&*fetch, Classification::Statements(_)),
            "{fetch:?}"
        );
    }

    #[test]
    fn cache_stays_bounded() {
        let cache = ClassificationCache::new(100);
        for i in 0..1000 {
            cache.get_or_classify(&format!("select {i}"), true);
        }
        assert!(cache.len() <= 100, "{}", cache.len());
        assert!(!cache.is_empty());
    }

    #[test]
    fn oversized_and_non_utf8_statements_are_refused() {
        let policy = Policy::new(&PolicyConfig {
            max_statement_bytes: 10,
            ..PolicyConfig::default()
        });
        let who = Requester {
            user: "u",
            class: ClientClass::Migrator,
            allow: &[],
            role: "owner",
        };
        assert!(policy.check(&who, b"select 1", true, None).is_ok());
        assert!(policy
            .check(&who, b"select 1234567890", true, None)
            .is_err());
    }

    fn requester(class: ClientClass) -> Requester<'static> {
        Requester {
            user: "u",
            class,
            allow: &[],
            role: "Owner Role",
        }
    }

    /// Statements that only reset the session, or name the role it is in, are carried
    /// out so that the role stays; any other target is refused.
    #[test]
    fn role_statements_keep_the_role() {
        let policy = Policy::new(&PolicyConfig::default());
        let who = requester(ClientClass::App);
        let sent = |sql: &str| {
            policy
                .check(&who, sql.as_bytes(), true, None)
                .map(|p| p.rewritten.clone().map(|t| String::from_utf8(t).unwrap()))
        };
        assert_eq!(
            sent("SET SESSION AUTHORIZATION DEFAULT;RESET ALL;CLOSE ALL;UNLISTEN *").unwrap(),
            Some(r#"SET ROLE "Owner Role";RESET ALL;CLOSE ALL;UNLISTEN *"#.into())
        );
        assert_eq!(
            sent("reset session authorization").unwrap(),
            Some("RESET ROLE".into())
        );
        assert_eq!(
            sent("SET LOCAL ROLE NONE").unwrap(),
            Some(r#"SET LOCAL ROLE "Owner Role""#.into())
        );
        for same in [
            "SET ROLE 'Owner Role'",
            r#"SET ROLE "Owner Role""#,
            r#"set role "Owner Role"; select 1"#,
            "RESET ROLE",
            "SET role TO DEFAULT",
        ] {
            assert_eq!(sent(same), Ok(None), "{same}");
        }
        for other in [
            "SET ROLE postgres",
            "SET ROLE owner_role",
            "SET ROLE 'owner role'",
            "SET SESSION AUTHORIZATION postgres",
            "SET ROLE FROM CURRENT",
            "SELECT set_config('role', 'Owner Role', false)",
            "SELECT 1; SET ROLE postgres",
        ] {
            let refusal = sent(other).unwrap_err();
            assert_eq!(refusal.code, "42501", "{other}");
            assert!(refusal.leaves_owner_role, "{other}");
        }
        let discard = policy.check(&who, b"DISCARD ALL", true, None).unwrap();
        assert!(discard.discard_all && discard.rewritten.is_none());
        assert_eq!(sent("SELECT 1; DISCARD ALL").unwrap_err().code, "25001");
    }

    #[test]
    fn report_mode_still_refuses_leaving_the_role() {
        let policy = Policy::new(&PolicyConfig {
            mode: PolicyMode::Report,
            ..PolicyConfig::default()
        });
        let who = requester(ClientClass::App);
        assert!(policy
            .check(&who, b"CREATE TABLE t (a int)", true, None)
            .is_ok());
        assert!(policy
            .check(&who, b"SET ROLE postgres", true, None)
            .is_err());
        assert!(policy.check_bound_setting(&who, b"role").is_some());
    }

    #[test]
    fn bound_setting_names_are_judged_at_bind() {
        let policy = Policy::new(&PolicyConfig::default());
        let app = requester(ClientClass::App);
        let readonly = requester(ClientClass::Readonly);
        let pass = policy
            .check(&app, b"SELECT set_config($1, $2, false)", true, None)
            .unwrap();
        assert_eq!(pass.bound_setting_names, vec![1]);
        let pass = policy
            .check(&app, b"SELECT set_config($2::text, $1, false)", true, None)
            .unwrap();
        assert_eq!(pass.bound_setting_names, vec![2]);
        let pass = policy
            .check(
                &app,
                b"SELECT set_config('client_encoding', $1::text, false)",
                true,
                None,
            )
            .unwrap();
        assert_eq!(pass.bound_encodings, vec![1]);
        assert!(policy.check_bound_encoding(&app, b"LATIN1").is_none());
        assert_eq!(
            policy.check_bound_encoding(&app, b" sjis").map(|r| r.code),
            Some("0A000")
        );
        // A SQL-level PREPARE is bound by EXECUTE, which rolegate does not look into.
        assert!(policy
            .check(
                &app,
                b"PREPARE p AS SELECT set_config($1, 'x', false)",
                true,
                None
            )
            .is_err());
        assert!(policy
            .check(
                &app,
                b"SELECT set_config($1 || 'x', 'y', false)",
                true,
                None
            )
            .is_err());
        assert!(policy.check_bound_setting(&app, b"TimeZone").is_none());
        assert!(policy.check_bound_setting(&app, b" ROLE").is_some());
        assert!(policy
            .check_bound_setting(&app, b"session_authorization")
            .is_some());
        assert!(policy
            .check_bound_setting(&app, b"default_transaction_read_only")
            .is_none());
        assert!(policy
            .check_bound_setting(&readonly, b"default_transaction_read_only")
            .is_some());
    }

    /// A client_encoding other than UTF8: the structure of a statement is in its ASCII
    /// bytes, so a LATIN9 text is judged as the server reads it, and a rewrite keeps the
    /// client's bytes.
    #[test]
    fn single_byte_encodings_are_judged_by_their_structure() {
        let policy = Policy::new(&PolicyConfig::default());
        let who = requester(ClientClass::App);
        // "CREATE TABLE café (a int)" in LATIN9: é is 0xE9, not valid UTF-8.
        let refusal = policy
            .check(&who, b"CREATE TABLE caf\xe9 (a int)", true, None)
            .unwrap_err();
        assert_eq!(
            refusal.message,
            "rolegate: DDL is not allowed for app clients (CREATE TABLE)"
        );
        assert!(policy
            .check(&who, b"SELECT '\xe9\xa4' AS caf\xe9", true, None)
            .is_ok());
        let pass = policy
            .check(&who, b"SELECT '\xe9'; SET ROLE NONE", true, None)
            .unwrap();
        assert_eq!(
            pass.rewritten.as_deref(),
            Some(&b"SELECT '\xe9'; SET ROLE \"Owner Role\""[..])
        );
        for encoding in ["LATIN9", "WIN1252", "EUC_JP", "UTF8"] {
            let sql = format!("SET client_encoding = '{encoding}'");
            assert!(
                policy.check(&who, sql.as_bytes(), true, None).is_ok(),
                "{sql}"
            );
        }
        for sql in [
            "SET client_encoding = 'SJIS'",
            "SET NAMES 'Shift_JIS'",
            "SET client_encoding TO big5",
            "SELECT set_config('client_encoding', 'GBK', false)",
            "SELECT set_config('client_encoding', current_setting('x'), false)",
        ] {
            let refusal = policy.check(&who, sql.as_bytes(), true, None).unwrap_err();
            assert!(refusal.leaves_owner_role, "{sql}");
        }
    }

    /// A session's remembered verdicts let through only what was judged allowed for it:
    /// a refused statement is refused (and audited) every time, and a text differing from
    /// an allowed one in more than its numbers is judged afresh.
    /// Texts that share a numeric key with standard_conforming_strings on may differ where
    /// the numbers are with it off: a text with a backslash is remembered as itself.
    #[test]
    fn backslash_texts_are_remembered_only_as_themselves() {
        let policy = Policy::new(&PolicyConfig::default());
        let who = requester(ClientClass::App);
        let mut session = SessionVerdicts::default();
        let with_number = r"SELECT '\', 1252 --'";
        assert!(policy
            .check(&who, with_number.as_bytes(), true, Some(&mut session))
            .is_ok());
        assert!(session.allowed.contains(with_number.as_bytes()));
        assert_eq!(session.allowed.len(), 1, "only the exact text");
    }

    #[test]
    fn session_verdicts_remember_only_what_was_allowed() {
        let policy = Policy::new(&PolicyConfig::default());
        let who = Requester {
            user: "u",
            class: ClientClass::Readonly,
            allow: &[],
            role: "owner",
        };
        let mut session = SessionVerdicts::default();
        let mut check = |sql: &str, scs: bool| {
            policy
                .check(&who, sql.as_bytes(), scs, Some(&mut session))
                .err()
                .map(|r| r.kind)
        };
        assert_eq!(check("SELECT * FROM t WHERE id = 1", true), None);
        assert_eq!(check("SELECT * FROM t WHERE id = 2", true), None);
        for _ in 0..2 {
            assert!(check("UPDATE t SET a = 1", true).is_some());
            assert!(check("SELECT * FROM t WHERE id = 1; DROP TABLE t", true).is_some());
        }
        // With the setting off, `\'` does not end the string: one SELECT. With it on, the
        // string ends there and a DROP follows. Either way it is refused: a text with a
        // backslash must pass under both values (a SET may be in flight).
        let text = r"SELECT 'a\' ; DROP TABLE t; --'";
        assert_eq!(check(text, false).as_deref(), Some("DROP TABLE"));
        assert_eq!(check(text, true).as_deref(), Some("DROP TABLE"));
        // A backslash that means the same under both (or breaks the other way) passes.
        assert_eq!(check(r"SELECT 'C:\temp\'", true), None);
        assert_eq!(check(r"SELECT E'a\'b'", false), None);
        assert_eq!(check("SELECT 2", false), None);
        // What was allowed under one standard_conforming_strings is not carried over to
        // the other: the memory was cleared when the setting changed.
        assert!(session.allowed.contains(&b"SELECT 2"[..]));
        assert!(
            !session
                .allowed
                .iter()
                .any(|t| t.starts_with(b"SELECT * FROM t")),
            "cleared when the setting changed"
        );
    }

    /// The session's fast lookup finds a text by its numeric key only where the full
    /// path would: same words, numbers anywhere a number was, the same setting.
    #[test]
    fn a_session_finds_a_new_number_by_its_key() {
        let policy = Policy::new(&PolicyConfig::default());
        let who = requester(ClientClass::App);
        let mut session = SessionVerdicts::default();
        assert!(policy
            .check(
                &who,
                b"SELECT * FROM t WHERE id = 1",
                true,
                Some(&mut session)
            )
            .is_ok());
        assert!(session.remembers(b"SELECT * FROM t WHERE id = 1", true));
        assert!(session.remembers(b"SELECT * FROM t WHERE id = 987654", true));
        for other in [
            &b"SELECT * FROM t WHERE id = 2 OR 1 = 1"[..],
            b"SELECT * FROM t1 WHERE id = 2",
            b"SELECT * FROM t WHERE id = 2.5",
            b"SELECT * FROM t WHERE id = '2'",
            b"SELECT * FROM t WHERE id = 2; DROP TABLE t",
        ] {
            assert!(
                !session.remembers(other, true),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
        // Keys hold only with standard_conforming_strings on.
        assert!(!session.remembers(b"SELECT * FROM t WHERE id = 2", false));
        // A key that would not fit the stack buffer is left to the full path, which
        // still answers from the session's memory.
        let long = format!("SELECT * FROM t WHERE id = 1{}", " ".repeat(FAST_KEY_BYTES));
        assert!(policy
            .check(&who, long.as_bytes(), true, Some(&mut session))
            .is_ok());
        let long_again = long.replacen("= 1", "= 2", 1);
        assert!(!session.remembers(long_again.as_bytes(), true));
        assert!(policy
            .check(&who, long_again.as_bytes(), true, Some(&mut session))
            .is_ok());
        assert!(matches!(
            plain_integer_scan(b"SELECT 1", &mut [0; 4]),
            PlainScan::NotPlain
        ));
    }

    #[test]
    fn the_word_at_a_time_digit_search_finds_every_digit_and_nothing_else() {
        // Every ASCII byte at every place of the word-sized steps and the tail.
        for byte in 0u8..128 {
            for at in 0..19 {
                let mut text = vec![b'a'; 19];
                text[at] = byte;
                for from in [0, 1, at, at + 1] {
                    let expected = text
                        .get(from..)
                        .and_then(|rest| rest.iter().position(u8::is_ascii_digit))
                        .map(|i| from + i);
                    assert_eq!(
                        next_ascii_digit(&text, from),
                        expected,
                        "{byte} at {at} from {from}"
                    );
                }
            }
        }
    }

    #[test]
    fn session_verdicts_stay_bounded() {
        let mut session = SessionVerdicts::default();
        for i in 0..10_000 {
            session.remember(format!("SELECT * FROM t{i}").into_bytes().into());
        }
        session.remember("x".repeat(SESSION_VERDICT_BYTES + 1).into_bytes().into());
        assert!(session.bytes <= SESSION_VERDICT_BYTES);
        assert!(session.allowed.iter().map(|t| t.len()).sum::<usize>() == session.bytes);
        assert!(!session.allowed.is_empty());
    }
}
