//! The statement policy: what each client class may send to the server.
//!
//! `classify` parses with PostgreSQL's grammar and says what each statement does;
//! `rules` turns that into a verdict for a class; the [`ClassificationCache`] makes
//! repeated statements (ORMs send the same few hundred) cost a hash lookup.

pub mod classify;
pub mod rules;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

pub use classify::{classify, Classification, Effect, StatementInfo};
pub use rules::Refusal;

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
            cache: ClassificationCache::new(config.cache_entries),
        }
    }

    pub fn max_statement_bytes(&self) -> usize {
        self.max_statement_bytes
    }

    /// Judges one statement string (a `Query` or a `Parse`). `None`: send it on.
    /// `Some`: refuse it with this error. Every refusal is logged as one audit line; in
    /// report mode it is logged and `None` is returned, unless it would leave the owner
    /// role.
    pub fn check(
        &self,
        who: &Requester<'_>,
        sql: &[u8],
        standard_conforming_strings: bool,
    ) -> Option<Refusal> {
        let refusal = self.judge(who, sql, standard_conforming_strings)?;
        let fingerprint = std::str::from_utf8(sql)
            .ok()
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

    fn judge(&self, who: &Requester<'_>, sql: &[u8], scs: bool) -> Option<Refusal> {
        let refuse = |message: &str, kind: &str| {
            Some(Refusal {
                code: "42501",
                message: format!("rolegate: {message}"),
                hint: None,
                kind: kind.into(),
                leaves_owner_role: false,
            })
        };
        if sql.len() > self.max_statement_bytes {
            return refuse(
                &format!(
                    "statement of {} bytes is longer than the {} bytes rolegate judges ([policy] max_statement_bytes)",
                    sql.len(),
                    self.max_statement_bytes
                ),
                "oversized statement",
            );
        }
        let Ok(text) = std::str::from_utf8(sql) else {
            return refuse(
                "statement is not valid UTF-8 (rolegate needs client_encoding UTF8)",
                "invalid UTF-8",
            );
        };
        let classification = self.cache.get_or_classify(text, scs);
        rules::judge(who.class, who.allow, &classification).err()
    }
}

/// Classifications keyed by exact statement text, one map per value of
/// `standard_conforming_strings` (it changes how a text splits into statements).
pub struct ClassificationCache {
    maps: [DashMap<Box<str>, Arc<Classification>, ahash::RandomState>; 2],
    entries: AtomicUsize,
    capacity: usize,
}

impl ClassificationCache {
    pub fn new(capacity: usize) -> ClassificationCache {
        ClassificationCache {
            maps: [DashMap::default(), DashMap::default()],
            entries: AtomicUsize::new(0),
            capacity,
        }
    }

    pub fn get_or_classify(&self, sql: &str, scs: bool) -> Arc<Classification> {
        let map = &self.maps[usize::from(scs)];
        if let Some(hit) = map.get(sql) {
            return hit.clone();
        }
        // Texts that differ only in numeric constants share a verdict, so they share an
        // entry: `... WHERE aid = 17` and `... WHERE aid = 42` are parsed once. Only with
        // standard_conforming_strings on, the one setting pg_query's scanner knows.
        let key = if scs { numeric_literal_key(sql) } else { None };
        if let Some(hit) = key.as_deref().and_then(|k| map.get(k)) {
            return hit.clone();
        }
        let classification = Arc::new(classify(sql, scs));
        let key = key.as_deref().unwrap_or(sql);
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
        };
        assert!(policy.check(&who, b"select 1", true).is_none());
        assert!(policy.check(&who, b"select 1234567890", true).is_some());
        assert!(policy.check(&who, b"select '\xff'", true).is_some());
    }
}
