//! Status from memory: the last probe's outcome and the current key_id. Status never calls the
//! backend; [`super::probe`] keeps this fresh.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::key_id_for;

/// What Status reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// `ok`, or a short reason.
    pub healthz: String,
    /// The current key_id; empty before the first successful probe.
    pub key_id: String,
}

impl Status {
    pub fn is_ok(&self) -> bool {
        self.healthz == "ok"
    }
}

#[derive(Clone, Default)]
pub(super) struct Snapshot {
    /// The key_id Encrypt reports (see [`KeyIds`]).
    pub key_id: Option<Arc<str>>,
    /// The backend's own identity of the current key ([`crate::backend::KeyIdentity::key_id`]).
    pub backend_key_id: Option<String>,
    /// Reference of the current key ([`crate::backend::KeyIdentity::key_ref`]).
    pub key_ref: Option<String>,
    /// Why the last probe failed, if it did.
    pub failure: Option<String>,
    pub last_ok: Option<Instant>,
}

/// Assigns key_ids so that none is ever reported twice in a process (KEP-3299): a backend key that
/// becomes current again after another one (A → B → A) gets an epoch suffix, `…#2`, instead of
/// its old key_id, so the apiserver sees a new key and Status stays healthy.
#[derive(Default)]
struct KeyIds {
    epochs: HashMap<String, u32>,
    issued: HashSet<Arc<str>>,
}

impl KeyIds {
    fn assign(&mut self, kind: &str, backend_key_id: &str) -> Arc<str> {
        let epoch = self.epochs.entry(backend_key_id.to_string()).or_insert(0);
        loop {
            *epoch += 1;
            let candidate: Arc<str> = if *epoch == 1 {
                key_id_for(kind, backend_key_id).into()
            } else {
                key_id_for(kind, &format!("{backend_key_id}#{epoch}")).into()
            };
            if self.issued.insert(candidate.clone()) {
                return candidate;
            }
        }
    }
}

pub(super) struct HealthState {
    snapshot: ArcSwap<Snapshot>,
    ids: Mutex<KeyIds>,
    healthy_tx: watch::Sender<bool>,
    staleness: Duration,
}

impl HealthState {
    pub fn new(staleness: Duration) -> Self {
        HealthState {
            snapshot: ArcSwap::from_pointee(Snapshot {
                failure: Some("no backend check has completed yet".into()),
                ..Snapshot::default()
            }),
            ids: Mutex::new(KeyIds::default()),
            healthy_tx: watch::channel(false).0,
            staleness,
        }
    }

    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    pub fn snapshot_full(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.healthy_tx.subscribe()
    }

    /// Status; `revoked` is the confirmed revocation of the current key, if any.
    pub fn status(&self, revoked: Option<String>) -> Status {
        let snap = self.snapshot.load();
        let key_id = snap.key_id.as_deref().unwrap_or_default().to_string();
        let healthz = if let Some(reason) = revoked {
            format!("key revoked: {reason}")
        } else if let Some(failure) = &snap.failure {
            failure.clone()
        } else {
            match snap.last_ok {
                Some(t) if t.elapsed() <= self.staleness => "ok".to_string(),
                Some(t) => format!("no successful backend check for {}s", t.elapsed().as_secs()),
                None => "no backend check has completed yet".to_string(),
            }
        };
        Status { healthz, key_id }
    }

    /// Tells subscribers whether Status is healthy now.
    pub fn publish(&self, current_revoked: bool) {
        let snap = self.snapshot.load();
        let healthy = snap.failure.is_none() && snap.last_ok.is_some() && !current_revoked;
        self.healthy_tx
            .send_if_modified(|h| std::mem::replace(h, healthy) != healthy);
    }

    /// A successful look-up of the current key. Returns the previous key_id when it changed.
    pub fn set_current(
        &self,
        kind: &str,
        backend_key_id: &str,
        key_ref: &str,
    ) -> (Arc<str>, Option<Option<Arc<str>>>) {
        let old = self.snapshot.load_full();
        if old.backend_key_id.as_deref() == Some(backend_key_id) {
            if let Some(id) = &old.key_id {
                return (id.clone(), None);
            }
        }
        let key_id = self.ids.lock().unwrap().assign(kind, backend_key_id);
        self.snapshot.store(Arc::new(Snapshot {
            key_id: Some(key_id.clone()),
            backend_key_id: Some(backend_key_id.to_string()),
            key_ref: Some(key_ref.to_string()),
            ..(*old).clone()
        }));
        (key_id, Some(old.key_id.clone()))
    }

    /// The key_id under which a KEK wrapped by `backend_key_id` may be used for Encrypt: the
    /// current key_id when that is the current key, else `None`.
    pub fn label_for(&self, backend_key_id: &str) -> Option<Arc<str>> {
        let snap = self.snapshot.load();
        if snap.backend_key_id.as_deref() == Some(backend_key_id) {
            snap.key_id.clone()
        } else {
            None
        }
    }

    pub fn set_ok(&self) {
        let old = self.snapshot.load_full();
        self.snapshot.store(Arc::new(Snapshot {
            failure: None,
            last_ok: Some(Instant::now()),
            ..(*old).clone()
        }));
    }

    pub fn set_failure(&self, failure: String) {
        let old = self.snapshot.load_full();
        self.snapshot.store(Arc::new(Snapshot {
            failure: Some(failure),
            ..(*old).clone()
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_that_comes_back_gets_a_new_epoch() {
        let mut ids = KeyIds::default();
        assert_eq!(&*ids.assign("local", "a"), "local:a");
        assert_eq!(&*ids.assign("local", "b"), "local:b");
        assert_eq!(&*ids.assign("local", "a"), "local:a#2");
        assert_eq!(&*ids.assign("local", "b"), "local:b#2");
        assert_eq!(&*ids.assign("local", "a"), "local:a#3");
        // A backend key literally named like an epoch never collides with an issued key_id.
        assert_eq!(&*ids.assign("local", "a#3"), "local:a#3#2");
    }
}
