//! The cache of unwrapped local KEKs, with one backend unwrap in flight per KEK.
//!
//! A Decrypt whose local KEK is not cached starts a *detached* unwrap task and waits for it. If the
//! request is cancelled (the apiserver's deadline), the task still finishes and fills the cache, so the
//! retry is a cache hit instead of another slow backend call. Concurrent Decrypts of the same KEK wait
//! for the same task.
//!
//! Entries are keyed by the ciphertext header (key reference and wrapped local KEK, as bytes), so a
//! cache hit costs one hash of a short slice; the SHA-256 digest of the wrapped KEK is computed only
//! on a miss (it keys the in-flight unwraps and names the KEK in logs).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::kek::{KekDigest, LocalKek};
use super::EngineError;

type Outcome = Option<Result<Arc<LocalKek>, EngineError>>;

pub struct KekCache {
    entries: Arc<quick_cache::sync::Cache<Box<[u8]>, Arc<LocalKek>>>,
    inflight: Arc<Mutex<HashMap<KekDigest, watch::Receiver<Outcome>>>>,
}

/// Whether a lookup was served from memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Miss,
}

impl KekCache {
    pub fn new(capacity: usize) -> Self {
        KekCache {
            entries: Arc::new(quick_cache::sync::Cache::new(capacity.max(1))),
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Looks a local KEK up by the header of a ciphertext made under it.
    pub fn get(&self, header: &[u8]) -> Option<Arc<LocalKek>> {
        self.entries.get(header)
    }

    pub fn insert(&self, kek: Arc<LocalKek>) {
        self.entries.insert(kek.header().into(), kek);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn clear(&self) {
        self.entries.clear();
    }

    /// Drops every cached local KEK wrapped by the remote key `key_ref` (a confirmed revocation).
    pub fn remove_key_ref(&self, key_ref: &str) {
        self.entries.retain(|_, kek| kek.key_ref != key_ref);
    }

    /// Returns the cached KEK, or runs `load` once (detached) for all concurrent callers. `load`
    /// installs what it unwrapped itself (through the key lifecycle, which may refuse it); the task
    /// removes its in-flight entry when it ends, so nothing is left behind when every waiter gave up.
    pub async fn get_or_load<F>(
        &self,
        header: &[u8],
        digest: KekDigest,
        load: F,
    ) -> Result<(Arc<LocalKek>, Lookup), EngineError>
    where
        F: std::future::Future<Output = Result<Arc<LocalKek>, EngineError>> + Send + 'static,
    {
        if let Some(kek) = self.entries.get(header) {
            return Ok((kek, Lookup::Hit));
        }
        let mut rx = {
            let mut inflight = self.inflight.lock().unwrap();
            // Re-check under the lock: a task may have finished between the lookup and here.
            if let Some(kek) = self.entries.get(header) {
                return Ok((kek, Lookup::Hit));
            }
            match inflight.get(&digest) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(digest, rx.clone());
                    let inflight = self.inflight.clone();
                    tokio::spawn(async move {
                        let outcome = load.await;
                        inflight.lock().unwrap().remove(&digest);
                        let _ = tx.send(Some(outcome));
                    });
                    rx
                }
            }
        };
        let outcome = loop {
            if let Some(outcome) = rx.borrow_and_update().clone() {
                break outcome;
            }
            if rx.changed().await.is_err() {
                break Err(EngineError::Internal(
                    "local KEK unwrap task ended without a result".into(),
                ));
            }
        };
        outcome.map(|k| (k, Lookup::Miss))
    }

    /// Number of unwraps in flight (for tests: none may be left behind).
    pub fn inflight(&self) -> usize {
        self.inflight.lock().unwrap().len()
    }
}
