//! Status from memory, kept fresh by a background probe.
//!
//! The probe runs at two depths: a cheap one every `probe_interval` (the backend's key identity, no
//! cryptographic operation where the backend offers such a call) and a deep one (wrap and unwrap a
//! random secret) at start and every `deep_probe_interval`, so a lost decrypt permission is noticed.
//! Status never calls the backend.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::{key_id_for, BackendOp, Engine, EngineError};

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

#[derive(Default)]
pub(super) struct Snapshot {
    pub key_id: Option<Arc<str>>,
    /// Why the last probe failed, if it did.
    pub failure: Option<String>,
    pub last_ok: Option<Instant>,
    /// Set while the backend reports the key revoked (disabled, deleted, access denied).
    pub revoked: Option<String>,
}

pub(super) struct HealthState {
    snapshot: ArcSwap<Snapshot>,
    seen_key_ids: Mutex<HashSet<Arc<str>>>,
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
            seen_key_ids: Mutex::new(HashSet::new()),
            healthy_tx: watch::channel(false).0,
            staleness,
        }
    }

    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.healthy_tx.subscribe()
    }

    pub fn check_not_revoked(&self) -> Result<(), EngineError> {
        match &self.snapshot.load().revoked {
            Some(reason) => Err(EngineError::Revoked(reason.clone())),
            None => Ok(()),
        }
    }

    pub fn status(&self) -> Status {
        let snap = self.snapshot.load();
        let key_id = snap.key_id.as_deref().unwrap_or_default().to_string();
        let healthz = if let Some(reason) = &snap.revoked {
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

    fn update(&self, f: impl FnOnce(&Snapshot) -> Snapshot) {
        let next = f(&self.snapshot.load());
        let healthy = next.failure.is_none() && next.revoked.is_none() && next.last_ok.is_some();
        self.snapshot.store(Arc::new(next));
        self.healthy_tx
            .send_if_modified(|h| std::mem::replace(h, healthy) != healthy);
    }

    fn set_ok(&self, key_id: Arc<str>) {
        self.update(|_| Snapshot {
            key_id: Some(key_id),
            failure: None,
            last_ok: Some(Instant::now()),
            revoked: None,
        });
    }

    fn set_failure(&self, failure: String, revoked: bool) {
        self.update(|old| Snapshot {
            key_id: old.key_id.clone(),
            failure: Some(failure.clone()),
            last_ok: old.last_ok,
            revoked: revoked.then_some(failure),
        });
    }

    /// Accepts a new key_id unless it was used before in this process: reporting an old key_id again
    /// would make the apiserver treat newer data as stale (A → B → A).
    fn check_key_id(&self, key_id: &str) -> Result<Option<Arc<str>>, String> {
        let snap = self.snapshot.load();
        if snap.key_id.as_deref() == Some(key_id) {
            return Ok(None);
        }
        let mut seen = self.seen_key_ids.lock().unwrap();
        if seen.contains(key_id) {
            return Err(format!(
                "the backend reports key {key_id} again after {}; refusing to reuse a key_id (roll forward to a new key instead)",
                snap.key_id.as_deref().unwrap_or("none")
            ));
        }
        let fresh: Arc<str> = Arc::from(key_id);
        seen.insert(fresh.clone());
        Ok(Some(fresh))
    }
}

impl Engine {
    /// One probe. `deep` adds a wrap/unwrap round trip. Updates Status and, on a key change or a
    /// revocation, the local KEKs.
    pub async fn probe(&self, deep: bool) -> Result<(), EngineError> {
        let result = self.probe_inner(deep).await;
        match &result {
            Ok(()) => self.observer.probe(deep, Ok(())),
            Err(e) => self.observer.probe(deep, Err(&e.to_string())),
        }
        result
    }

    async fn probe_inner(&self, deep: bool) -> Result<(), EngineError> {
        let identity = match self
            .call_backend(BackendOp::Probe, self.backend.current_key())
            .await
        {
            Ok(identity) => identity,
            Err(e) => return Err(self.record_failure(e)),
        };
        let key_id = key_id_for(self.backend.kind(), &identity.key_id);
        let changed = match self.health.check_key_id(&key_id) {
            Ok(changed) => changed,
            Err(msg) => {
                tracing::error!("{msg}");
                self.health.set_failure(msg.clone(), false);
                return Err(EngineError::NotReady(msg));
            }
        };
        if deep {
            if let Err(e) = self.round_trip().await {
                return Err(self.record_failure(e));
            }
        }
        let old = self.health.snapshot().key_id.clone();
        let new_key_id = changed
            .clone()
            .or(old.clone())
            .expect("key_id known after a successful probe");
        self.health.set_ok(new_key_id.clone());
        if changed.is_some() {
            tracing::info!(old = old.as_deref().unwrap_or("none"), new = %new_key_id, "key_id changed");
            self.observer.key_id_changed(old.as_deref(), &new_key_id);
        }
        // Have the next Encrypt find a ready local KEK for the current key_id.
        if let Err(e) = self.ensure_current_kek().await {
            tracing::warn!(error = %e, "could not prepare a local KEK for the current key; Encrypt will retry");
        }
        Ok(())
    }

    fn record_failure(&self, e: EngineError) -> EngineError {
        let revoked = matches!(&e, EngineError::Backend(b) if b.is_revocation());
        let msg = e.to_string();
        if revoked {
            if self.health.snapshot().revoked.is_none() {
                tracing::error!(error = %msg, "backend reports the key revoked; dropping every cached local KEK");
            }
            self.purge();
        } else {
            tracing::warn!(error = %msg, "backend probe failed; cached keys stay in use");
        }
        self.health.set_failure(msg, revoked);
        e
    }

    async fn round_trip(&self) -> Result<(), EngineError> {
        let secret = super::LocalKek::generate_secret();
        let wrapped = self
            .call_backend(BackendOp::Wrap, self.backend.wrap(&secret[..]))
            .await?;
        let back = self
            .call_backend(
                BackendOp::Unwrap,
                self.backend.unwrap(&wrapped.key_ref, &wrapped.ciphertext),
            )
            .await?;
        if back[..] != secret[..] {
            return Err(EngineError::Internal(
                "backend round trip returned different bytes than were wrapped".into(),
            ));
        }
        Ok(())
    }

    async fn ensure_current_kek(&self) -> Result<(), EngineError> {
        let want = self.health.snapshot().key_id.clone();
        if let Some(kek) = self.current.load_full() {
            if self.usable(&kek, want.as_deref()).is_ok() && kek.uses() < self.config.kek_max_uses {
                return Ok(());
            }
        }
        let _guard = self.rotate_lock.lock().await;
        if let Some(kek) = self.current.load_full() {
            match self.usable(&kek, want.as_deref()) {
                Ok(()) if kek.uses() < self.config.kek_max_uses => return Ok(()),
                Ok(()) => self.observer.kek_retired(super::RetireReason::MaxUses),
                Err(reason) => self.observer.kek_retired(reason),
            }
        }
        self.new_kek(want.map(|k| k.to_string())).await.map(|_| ())
    }

    /// Probes until `shutdown` flips to true: cheap every `probe_interval`, deep every
    /// `deep_probe_interval` (and after a failed deep probe, at the next tick).
    pub async fn run_probes(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut last_deep = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.config.probe_interval) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            let deep = last_deep.elapsed() >= self.config.deep_probe_interval;
            if self.probe(deep).await.is_ok() && deep {
                last_deep = Instant::now();
            }
        }
    }
}
