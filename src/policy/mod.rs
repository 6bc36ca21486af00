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
        let classification = Arc::new(classify(sql, scs));
        if sql.len() <= MAX_CACHED_STATEMENT && self.capacity > 0 {
            if self.entries.load(Ordering::Relaxed) >= self.capacity {
                self.evict();
            }
            if map.insert(sql.into(), classification.clone()).is_none() {
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

#[cfg(test)]
mod tests {
    use super::*;

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
