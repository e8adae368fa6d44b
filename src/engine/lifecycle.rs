//! Key lifecycle: what the engine believes about each remote key, and the only place that changes it.
//!
//! Backends report facts (an error in the key manager's own typed shape, or anything else); this
//! module decides. Every remote key the engine has used is tracked by its key reference (the one
//! stored in each ciphertext), so a revocation drops only the local KEKs of that key and data under
//! other keys keeps decrypting.
//!
//! | state   | entered on                                          | Decrypt under the key       | left on |
//! |---------|-----------------------------------------------------|-----------------------------|---------|
//! | Active  | first successful use, or a successful check         | served (cache, then backend)| an authoritative revocation answer → Suspect |
//! | Suspect | one authoritative revocation answer                 | served from cached KEKs     | a second authoritative answer (re-checked at once) → Revoked; a successful check → Active |
//! | Revoked | a confirmed revocation; its KEKs are purged         | refused without a backend call | a successful check of *that* key → Active |
//!
//! Transient failures (outage, timeout, throttling, anything not in the key manager's own error
//! shape) never change a state: a revoked key stays revoked through an outage and a suspect key is
//! neither confirmed nor cleared by one. A purge bumps the key's generation, and a KEK unwrapped by a
//! load that started before the purge is never installed (see [`Lifecycle::install`]).
//!
//! A *check* of a key is: for the current key, the backend's key lookup plus a wrap/unwrap round
//! trip; for any other key, an unwrap of one of its wrapped local KEKs kept as a sample. Suspect and
//! revoked keys are checked at every probe; active non-current keys with a sample at every deep
//! probe, so revoking an old key is honoured within one deep-probe interval.

use std::collections::HashMap;
use std::sync::Mutex;

/// What the engine believes about one remote key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyHealth {
    Active,
    /// One authoritative revocation answer, not yet confirmed.
    Suspect(String),
    /// Confirmed revocation; the reason is the key manager's answer.
    Revoked(String),
}

impl KeyHealth {
    /// Bounded label for metrics and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyHealth::Active => "active",
            KeyHealth::Suspect(_) => "suspect",
            KeyHealth::Revoked(_) => "revoked",
        }
    }
}

struct KeyRecord {
    health: KeyHealth,
    /// Bumped by every purge of this key.
    generation: u64,
    /// Wrapped bytes of one local KEK under this key, for re-checks by unwrap.
    sample: Option<Vec<u8>>,
}

impl KeyRecord {
    fn new() -> Self {
        KeyRecord {
            health: KeyHealth::Active,
            generation: 0,
            sample: None,
        }
    }
}

/// The result of one authoritative revocation answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// First answer: re-check the key before acting on it.
    Suspect,
    /// Confirmed: the caller purged the key's local KEKs (inside [`Lifecycle::revocation_answer`]).
    Revoked,
    /// The key was already revoked.
    Unchanged,
}

/// A key to re-check and how.
#[derive(Clone, Debug)]
pub struct Recheck {
    pub key_ref: String,
    /// A wrapped local KEK under the key, when one is known.
    pub sample: Option<Vec<u8>>,
    pub health: KeyHealth,
}

#[derive(Default)]
pub struct Lifecycle {
    keys: Mutex<HashMap<String, KeyRecord>>,
}

impl Lifecycle {
    /// The generation a load of `key_ref` must still see when it finishes.
    pub fn generation(&self, key_ref: &str) -> u64 {
        self.keys
            .lock()
            .unwrap()
            .get(key_ref)
            .map_or(0, |r| r.generation)
    }

    /// The health of a key; unknown keys are active.
    pub fn health(&self, key_ref: &str) -> KeyHealth {
        self.keys
            .lock()
            .unwrap()
            .get(key_ref)
            .map_or(KeyHealth::Active, |r| r.health.clone())
    }

    /// The reason a key is revoked, if it is.
    pub fn revoked(&self, key_ref: &str) -> Option<String> {
        match self.health(key_ref) {
            KeyHealth::Revoked(reason) => Some(reason),
            _ => None,
        }
    }

    /// Installs a freshly unwrapped or wrapped KEK of `key_ref` through `insert`, unless the key was
    /// purged since `generation` was read. Runs `insert` under the lifecycle lock, so a purge cannot
    /// slip between the check and the insert. `unwrapped` says the backend has just unwrapped with
    /// the key: that is a successful check, which makes a suspect or revoked key active again (a
    /// wrap proves less, and is refused for a revoked key). Returns `None` when refused, else the
    /// health the key had when that was not active.
    pub fn install(
        &self,
        key_ref: &str,
        generation: u64,
        wrapped: &[u8],
        unwrapped: bool,
        insert: impl FnOnce(),
    ) -> Option<Option<KeyHealth>> {
        let mut keys = self.keys.lock().unwrap();
        let record = keys
            .entry(key_ref.to_string())
            .or_insert_with(KeyRecord::new);
        if record.generation != generation {
            return None;
        }
        let was = match (&record.health, unwrapped) {
            (KeyHealth::Active, _) => None,
            (KeyHealth::Revoked(_), false) => return None,
            (_, false) => None,
            (_, true) => Some(std::mem::replace(&mut record.health, KeyHealth::Active)),
        };
        if record.sample.is_none() {
            record.sample = Some(wrapped.to_vec());
        }
        insert();
        Some(was)
    }

    /// The reason a key is revoked, when it is and a sample lets the probe re-check it (then
    /// Decrypt need not ask the backend; without a sample, a Decrypt's unwrap is the check).
    pub fn revoked_with_sample(&self, key_ref: &str) -> Option<String> {
        let keys = self.keys.lock().unwrap();
        match keys.get(key_ref) {
            Some(KeyRecord {
                health: KeyHealth::Revoked(reason),
                sample: Some(_),
                ..
            }) => Some(reason.clone()),
            _ => None,
        }
    }

    /// Records that the key is known (the current key after a successful probe).
    pub fn know(&self, key_ref: &str) {
        self.keys
            .lock()
            .unwrap()
            .entry(key_ref.to_string())
            .or_insert_with(KeyRecord::new);
    }

    /// One authoritative revocation answer about `key_ref`. The first one makes the key suspect; a
    /// second (before any successful check) revokes it: `purge` runs under the lifecycle lock and
    /// the key's generation is bumped, so no load started earlier can refill the cache. Answers
    /// about keys never used in this process change nothing: there is nothing of theirs to drop.
    pub fn revocation_answer(
        &self,
        key_ref: &str,
        reason: &str,
        purge: impl FnOnce(&str),
    ) -> Option<Transition> {
        let mut keys = self.keys.lock().unwrap();
        let record = keys.get_mut(key_ref)?;
        Some(match &record.health {
            KeyHealth::Active => {
                record.health = KeyHealth::Suspect(reason.to_string());
                Transition::Suspect
            }
            KeyHealth::Suspect(_) => {
                record.health = KeyHealth::Revoked(reason.to_string());
                record.generation += 1;
                purge(key_ref);
                Transition::Revoked
            }
            KeyHealth::Revoked(_) => Transition::Unchanged,
        })
    }

    /// A successful check of `key_ref`. Returns the health it had, when that was not active.
    pub fn check_succeeded(&self, key_ref: &str) -> Option<KeyHealth> {
        let mut keys = self.keys.lock().unwrap();
        let record = keys
            .entry(key_ref.to_string())
            .or_insert_with(KeyRecord::new);
        match std::mem::replace(&mut record.health, KeyHealth::Active) {
            KeyHealth::Active => None,
            old => Some(old),
        }
    }

    /// Keys to re-check now: every suspect or revoked key, and with `all` every key with a sample.
    /// `except` (the current key) is checked by the probe itself.
    pub fn rechecks(&self, all: bool, except: Option<&str>) -> Vec<Recheck> {
        let keys = self.keys.lock().unwrap();
        let mut out: Vec<Recheck> = keys
            .iter()
            .filter(|(k, _)| Some(k.as_str()) != except)
            .filter(|(_, r)| r.health != KeyHealth::Active || (all && r.sample.is_some()))
            .map(|(k, r)| Recheck {
                key_ref: k.clone(),
                sample: r.sample.clone(),
                health: r.health.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.key_ref.cmp(&b.key_ref));
        out
    }

    /// Number of keys in each state, for metrics: (active, suspect, revoked).
    pub fn counts(&self) -> (usize, usize, usize) {
        let keys = self.keys.lock().unwrap();
        keys.values()
            .fold((0, 0, 0), |(a, s, r), rec| match rec.health {
                KeyHealth::Active => (a + 1, s, r),
                KeyHealth::Suspect(_) => (a, s + 1, r),
                KeyHealth::Revoked(_) => (a, s, r + 1),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_answers_revoke_and_a_check_restores() {
        let l = Lifecycle::default();
        assert_eq!(l.revocation_answer("k", "gone", |_| panic!()), None);
        assert_eq!(l.install("k", 0, b"w", true, || {}), Some(None));
        assert_eq!(
            l.revocation_answer("k", "disabled", |_| panic!("no purge on one answer")),
            Some(Transition::Suspect)
        );
        assert_eq!(l.health("k"), KeyHealth::Suspect("disabled".into()));
        let mut purged = None;
        assert_eq!(
            l.revocation_answer("k", "disabled", |k| purged = Some(k.to_string())),
            Some(Transition::Revoked)
        );
        assert_eq!(purged.as_deref(), Some("k"));
        assert_eq!(l.revoked("k").as_deref(), Some("disabled"));
        assert_eq!(l.revoked_with_sample("k").as_deref(), Some("disabled"));
        // A load that started before the purge cannot install; nor can a wrap while revoked.
        assert_eq!(
            l.install("k", 0, b"w", true, || panic!("stale load installed")),
            None
        );
        assert_eq!(
            l.install("k", 1, b"w", false, || panic!(
                "wrap installed while revoked"
            )),
            None
        );
        assert_eq!(
            l.check_succeeded("k"),
            Some(KeyHealth::Revoked("disabled".into()))
        );
        assert_eq!(l.install("k", 1, b"w", false, || {}), Some(None));
        assert_eq!(l.counts(), (1, 0, 0));
        // An unwrap that succeeds under the current generation is a successful check.
        l.revocation_answer("k", "x", |_| {});
        l.revocation_answer("k", "x", |_| {});
        assert_eq!(
            l.install("k", 2, b"w", true, || {}),
            Some(Some(KeyHealth::Revoked("x".into())))
        );
    }

    #[test]
    fn a_success_clears_a_suspicion_and_rechecks_list_what_needs_checking() {
        let l = Lifecycle::default();
        l.install("a", 0, b"wa", true, || {});
        l.install("b", 0, b"wb", true, || {});
        l.know("c");
        assert!(l.rechecks(false, None).is_empty());
        let all: Vec<_> = l
            .rechecks(true, Some("a"))
            .into_iter()
            .map(|r| r.key_ref)
            .collect();
        assert_eq!(
            all,
            ["b"],
            "keys without a sample and the current key are not re-checked"
        );
        l.revocation_answer("a", "denied", |_| {});
        assert_eq!(l.rechecks(false, None)[0].key_ref, "a");
        assert_eq!(
            l.check_succeeded("a"),
            Some(KeyHealth::Suspect("denied".into()))
        );
        assert_eq!(
            l.revocation_answer("a", "denied", |_| panic!()),
            Some(Transition::Suspect)
        );
    }
}
