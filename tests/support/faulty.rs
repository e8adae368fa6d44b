//! A backend wrapper that injects faults: outages, latency, throttling, flapping, and a settable
//! key identity. Used to test the engine and the server against a misbehaving key manager.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kms_plugin::backend::{Backend, BackendError, KeyIdentity, SecretBytes, WrappedKey};

#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Every call fails with this error.
    pub fail_with: Option<BackendError>,
    /// Every call waits this long first.
    pub delay: Option<Duration>,
    /// Fail every n-th call (1 = all, 2 = every second one) with `Unavailable`.
    pub flap_every: Option<u64>,
    /// Report this key_id instead of the inner backend's.
    pub key_id_override: Option<String>,
    /// Answer `Throttled` (HTTP 429) when more than this many calls are in flight at once.
    pub throttle_above: Option<u64>,
    /// The next call fails with this error, then the fault clears itself.
    pub fail_once_with: Option<BackendError>,
    /// Unwraps wait for a permit of this semaphore before reaching the inner backend.
    pub hold_unwraps: Option<Arc<tokio::sync::Semaphore>>,
}

#[derive(Debug)]
pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    faults: Mutex<Faults>,
    calls: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

impl FaultyBackend {
    pub fn new(inner: Arc<dyn Backend>) -> Arc<Self> {
        Arc::new(FaultyBackend {
            inner,
            faults: Mutex::new(Faults::default()),
            calls: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
        })
    }

    pub fn set(&self, faults: Faults) {
        *self.faults.lock().unwrap() = faults;
    }

    pub fn heal(&self) {
        self.set(Faults::default());
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> u64 {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Starts a new measurement of the concurrency peak.
    pub fn reset_max_in_flight(&self) {
        self.max_in_flight
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    async fn before(&self) -> Result<Option<String>, BackendError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let faults = {
            let mut f = self.faults.lock().unwrap();
            let snapshot = f.clone();
            f.fail_once_with = None;
            snapshot
        };
        let _guard = InFlight(&self.in_flight);
        if faults.throttle_above.is_some_and(|limit| now > limit) {
            return Err(BackendError::Throttled(
                "injected 429 Too Many Requests".into(),
            ));
        }
        if let Some(d) = faults.delay {
            tokio::time::sleep(d).await;
        }
        if let Some(e) = faults.fail_once_with.or(faults.fail_with) {
            return Err(e);
        }
        if let Some(every) = faults.flap_every {
            if n.is_multiple_of(every) {
                return Err(BackendError::Unavailable("injected flap".into()));
            }
        }
        Ok(faults.key_id_override)
    }
}

struct InFlight<'a>(&'a AtomicU64);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Backend for FaultyBackend {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn current_key(&self) -> Result<KeyIdentity, BackendError> {
        let key_override = self.before().await?;
        let mut id = self.inner.current_key().await?;
        if let Some(k) = key_override {
            id.key_id = k;
        }
        Ok(id)
    }

    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        let key_override = self.before().await?;
        let mut wrapped = self.inner.wrap(plaintext).await?;
        if let Some(k) = key_override {
            wrapped.key_id = k;
        }
        Ok(wrapped)
    }

    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError> {
        self.before().await?;
        let hold = self.faults.lock().unwrap().hold_unwraps.clone();
        if let Some(gate) = hold {
            let _permit = gate.acquire().await;
        }
        self.inner.unwrap(key_ref, ciphertext).await
    }
}
