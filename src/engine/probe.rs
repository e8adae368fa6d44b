//! The background probe: keeps Status fresh and every remote key's state checked.
//!
//! A cheap probe every `probe_interval` looks the current key up (no cryptographic operation where
//! the backend offers such a call); a deep one at start and every `deep_probe_interval` adds a
//! wrap/unwrap round trip, so a lost decrypt permission is noticed, and re-checks every other key
//! with cached local KEKs by unwrapping one of them. Suspect and revoked keys are re-checked at
//! every probe. What the answers mean is decided in [`super::lifecycle`].

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{BackendOp, Engine, EngineError, KeyHealth, RetireReason};

impl Engine {
    /// One probe. `deep` adds a wrap/unwrap round trip and the re-check of every other cached key.
    pub async fn probe(&self, deep: bool) -> Result<(), EngineError> {
        let result = self.probe_inner(deep).await;
        match &result {
            Ok(()) => self.observer.probe(deep, Ok(())),
            Err(e) => self.observer.probe(deep, Err(&e.to_string())),
        }
        result
    }

    async fn probe_inner(&self, deep: bool) -> Result<(), EngineError> {
        let current = self.probe_current(deep).await;
        let except = self.health.snapshot().key_ref.clone();
        for key in self.lifecycle.rechecks(deep, except.as_deref()) {
            if let Some(sample) = &key.sample {
                self.check_by_unwrap(&key.key_ref, sample).await;
            }
        }
        self.publish_health();
        if deep {
            self.check_escrow().await;
        }
        if current.is_ok() {
            // Have the next Encrypt find a ready local KEK for the current key_id.
            if let Err(e) = self.ensure_current_kek().await {
                tracing::warn!(error = %e, "could not prepare a local KEK for the current key; Encrypt will retry");
            }
        }
        current
    }

    /// Looks up each escrow backend's key (cheap probe), so its health is known between the rare
    /// wraps of new local KEKs. An escrow outage is reported, never acted upon.
    async fn check_escrow(&self) {
        for backend in &self.escrow {
            let result = self
                .call_backend(BackendOp::Probe, backend.current_key())
                .await;
            if let Err(e) = &result {
                tracing::warn!(escrow = backend.kind(), error = %e, "escrow backend check failed; new local KEKs may lack its wrapping");
            }
            self.note_escrow(
                backend.kind(),
                result.map(|_| ()).map_err(|e| e.to_string()),
            );
        }
    }

    /// Looks the current key up and records it; returns its key_id and key reference.
    pub(super) async fn look_up_current(&self) -> Result<(Arc<str>, String), EngineError> {
        let identity = self
            .call_backend(BackendOp::Probe, self.backend.current_key())
            .await?;
        let (key_id, changed) =
            self.health
                .set_current(self.backend.kind(), &identity.key_id, &identity.key_ref);
        self.lifecycle.know(&identity.key_ref);
        if let Some(old) = changed {
            tracing::info!(old = old.as_deref().unwrap_or("none"), new = %key_id, "key_id changed");
            self.observer.key_id_changed(old.as_deref(), &key_id);
        }
        Ok((key_id, identity.key_ref))
    }

    /// Checks the current key: look-up, and the round trip when `deep` or when the key is not
    /// known to be healthy. A revocation answer is confirmed at once.
    async fn probe_current(&self, deep: bool) -> Result<(), EngineError> {
        let result = self.check_current(deep).await;
        match &result {
            Ok(key_ref) => {
                self.checked_ok(key_ref);
                self.health.set_ok();
            }
            Err(e) => {
                let key_ref = self.health.snapshot().key_ref.clone();
                if let Some(key_ref) = key_ref {
                    self.answer(&key_ref, e).await;
                }
                if self.revokes(e) {
                    tracing::error!(error = %e, "backend probe: the key manager refuses the current key");
                } else {
                    tracing::warn!(error = %e, "backend probe failed; cached keys stay in use");
                }
                self.health.set_failure(e.to_string());
            }
        }
        result.map(|_| ())
    }

    /// The look-up and, when needed, the round trip; returns the current key reference.
    async fn check_current(&self, deep: bool) -> Result<String, EngineError> {
        let (_, key_ref) = self.look_up_current().await?;
        if deep || self.lifecycle.health(&key_ref) != KeyHealth::Active {
            self.round_trip().await?;
        }
        Ok(key_ref)
    }

    /// Re-checks one key after a first revocation answer: the current key by look-up and round
    /// trip, any other by unwrapping its sample.
    pub(super) async fn confirm(&self, key_ref: &str) {
        let current = self.health.snapshot().key_ref.clone();
        let result = if current.as_deref() == Some(key_ref) {
            match self.check_current(true).await {
                Ok(now) if now == key_ref => Ok(()),
                // The current key changed meanwhile: check the old one by unwrap below.
                Ok(_) => return self.confirm_by_sample(key_ref).await,
                Err(e) => Err(e),
            }
        } else {
            return self.confirm_by_sample(key_ref).await;
        };
        self.settle(key_ref, result);
    }

    async fn confirm_by_sample(&self, key_ref: &str) {
        let sample = self
            .lifecycle
            .rechecks(false, None)
            .into_iter()
            .find(|r| r.key_ref == key_ref)
            .and_then(|r| r.sample);
        if let Some(sample) = sample {
            let result = self.unwrap_sample(key_ref, &sample).await;
            self.settle(key_ref, result);
        }
    }

    /// The outcome of a confirming check: a second revocation answer revokes, a success clears.
    fn settle(&self, key_ref: &str, result: Result<(), EngineError>) {
        match result {
            Ok(()) => self.checked_ok(key_ref),
            Err(e) if self.revokes(&e) => {
                self.revocation_answer(key_ref, &e.to_string());
            }
            Err(e) => {
                tracing::warn!(key = key_ref, error = %e, "could not re-check the key; it stays suspect until a check gets an answer")
            }
        }
    }

    /// Periodic re-check of a key other than the current one.
    async fn check_by_unwrap(&self, key_ref: &str, sample: &[u8]) {
        match self.unwrap_sample(key_ref, sample).await {
            Ok(()) => self.checked_ok(key_ref),
            Err(e) => {
                self.answer(key_ref, &e).await;
                if !self.revokes(&e) {
                    tracing::warn!(key = key_ref, error = %e, "re-check of an older key failed; its cached keys stay in use");
                }
            }
        }
    }

    async fn unwrap_sample(&self, key_ref: &str, sample: &[u8]) -> Result<(), EngineError> {
        self.call_backend(BackendOp::Unwrap, self.backend.unwrap(key_ref, sample))
            .await
            .map(|_secret| ())
    }

    fn checked_ok(&self, key_ref: &str) {
        if let Some(was) = self.lifecycle.check_succeeded(key_ref) {
            tracing::info!(
                key = key_ref,
                was = was.as_str(),
                "the key manager accepts the key again"
            );
            self.observer
                .key_health_changed(key_ref, &KeyHealth::Active);
            self.publish_health();
        }
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
                Ok(()) => self.observer.kek_retired(RetireReason::MaxUses),
                Err(reason) => self.observer.kek_retired(reason),
            }
        }
        self.new_kek().await.map(|_| ())
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
