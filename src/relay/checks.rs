//! The prepared statements whose Bind rolegate looks at (rare: most sessions have none),
//! and what each name holds as far as rolegate can know it.
//!
//! A Parse or Close changes what a name holds only if the server carries it out: a
//! Parse of a name in use fails (42P05), any Parse can fail (a syntax error, a failed
//! transaction), and an error earlier in its batch makes the server skip it. Within a
//! batch the newest Parse or Close of a name decides (if it did not run, nothing after
//! it in the batch runs either); when the batch ends, what may not have run only adds to
//! the checks, so a name that may still hold DISCARD ALL is treated as DISCARD ALL.

/// What a Bind of one statement needs looked at.
#[derive(Clone, Default, PartialEq, Debug)]
pub(super) struct StatementCheck {
    /// DISCARD ALL: nothing may follow its Execute before Sync (the role is set again).
    pub discard_all: bool,
    /// `set_config`'s setting name comes from these parameters ($n).
    pub setting_names: Vec<u16>,
    /// The client_encoding it sets comes from these parameters ($n).
    pub encodings: Vec<u16>,
}

impl StatementCheck {
    /// Both checks at once.
    fn merge(&mut self, other: &StatementCheck) {
        self.discard_all |= other.discard_all;
        self.setting_names.extend(&other.setting_names);
        self.setting_names.sort_unstable();
        self.setting_names.dedup();
        self.encodings.extend(&other.encodings);
        self.encodings.sort_unstable();
        self.encodings.dedup();
    }

    /// What a replacement certain to have run leaves: its own check, and the bound-
    /// argument checks of before (at worst a bound value is judged that did not need it).
    fn replaced_by(&self, new: Option<&StatementCheck>) -> Option<StatementCheck> {
        let mut left = StatementCheck {
            discard_all: false,
            ..self.clone()
        };
        if let Some(new) = new {
            left.merge(new);
        }
        (left != StatementCheck::default()).then_some(left)
    }
}

/// At most this many changes are kept for one batch; past it they are settled as
/// uncertain (the checks only grow).
const MAX_BATCH_CHANGES: usize = 1024;

/// Boxed, and only once a statement needs a check: most sessions never have one.
#[derive(Default)]
pub(super) struct StatementChecks(Option<Box<Checks>>);

#[derive(Default)]
struct Checks {
    /// What each name holds as of the last batch's end.
    settled: std::collections::HashMap<Vec<u8>, StatementCheck>,
    /// Parses and Closes of checked names in the current batch, oldest first: the name,
    /// its new check, and whether the server certainly carries it out.
    batch: Vec<(Vec<u8>, Option<StatementCheck>, bool)>,
}

impl StatementChecks {
    pub fn is_empty(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(|checks| checks.settled.is_empty() && checks.batch.is_empty())
    }

    /// The check a Bind of `name` needs now.
    pub fn get(&self, name: &[u8]) -> Option<&StatementCheck> {
        self.0.as_ref()?.get(name)
    }

    /// A Parse (with the check its text needs), Query or Close of `name`; `certain`:
    /// nothing can make the server skip or fail it.
    pub fn replace(&mut self, name: &[u8], check: Option<StatementCheck>, certain: bool) {
        if check.is_none() && self.get(name).is_none() {
            return;
        }
        self.0
            .get_or_insert_with(Default::default)
            .replace(name, check, certain);
    }

    /// The batch ended (Sync, or a Query of its own).
    pub fn end_batch(&mut self) {
        if let Some(checks) = &mut self.0 {
            if !checks.batch.is_empty() {
                checks.settle_batch_as(true);
            }
        }
    }
}

impl Checks {
    fn get(&self, name: &[u8]) -> Option<&StatementCheck> {
        match self.batch.iter().rev().find(|(n, _, _)| n == name) {
            Some((_, check, _)) => check.as_ref(),
            None => self.settled.get(name),
        }
    }

    fn replace(&mut self, name: &[u8], check: Option<StatementCheck>, certain: bool) {
        if self.batch.len() >= MAX_BATCH_CHANGES {
            self.settle_batch_as(false);
        }
        // (Bound-argument checks stay even within the batch.)
        let check = match self.get(name) {
            Some(old) => old.replaced_by(check.as_ref()),
            None => check,
        };
        self.batch.push((name.to_vec(), check, certain));
    }

    /// Settles the batch's changes: those certain to have run replace the name's check
    /// (when `trust_certain`); the others only add to it.
    fn settle_batch_as(&mut self, trust_certain: bool) {
        for (name, check, certain) in std::mem::take(&mut self.batch) {
            if certain && trust_certain {
                match check {
                    Some(check) => self.settled.insert(name, check),
                    None => self.settled.remove(&name),
                };
            } else if let Some(check) = check {
                self.settled.entry(name).or_default().merge(&check);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discard() -> Option<StatementCheck> {
        Some(StatementCheck {
            discard_all: true,
            ..Default::default()
        })
    }

    #[test]
    fn an_uncertain_replacement_keeps_discard_all_after_its_batch() {
        let mut checks = StatementChecks::default();
        checks.replace(b"s", discard(), false);
        checks.end_batch();
        // A second Parse of the name (it may fail as a duplicate).
        checks.replace(b"s", None, false);
        assert_eq!(
            checks.get(b"s"),
            None,
            "within its batch the newest Parse decides"
        );
        checks.end_batch();
        assert_eq!(checks.get(b"s"), discard().as_ref());
    }

    #[test]
    fn a_certain_replacement_ends_the_check() {
        let mut checks = StatementChecks::default();
        checks.replace(b"", discard(), false);
        checks.end_batch();
        checks.replace(b"", None, true);
        checks.end_batch();
        assert!(checks.is_empty());
    }

    #[test]
    fn bound_checks_stay_and_add_up() {
        let mut checks = StatementChecks::default();
        let bound = |n: u16| {
            Some(StatementCheck {
                setting_names: vec![n],
                ..Default::default()
            })
        };
        checks.replace(b"s", bound(1), true);
        checks.replace(b"s", discard(), true);
        checks.end_batch();
        let check = checks.get(b"s").cloned().unwrap_or_default();
        assert!(check.discard_all);
        assert_eq!(check.setting_names, [1]);
        checks.replace(b"s", None, true);
        checks.end_batch();
        assert_eq!(checks.get(b"s"), bound(1).as_ref());
    }
}
