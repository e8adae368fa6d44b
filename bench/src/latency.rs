//! A backend wrapper that adds a fixed latency to every call and counts calls, standing in for a remote
//! key manager. It lives here, not in the shipped binary: the cold-start scenario runs the engine
//! in-process behind it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kms_plugin::backend::{Backend, BackendError, KeyIdentity, SecretBytes, WrappedKey};

#[derive(Debug)]
pub struct LatencyBackend {
    inner: Arc<dyn Backend>,
    delay: Duration,
    probes: AtomicU64,
    wraps: AtomicU64,
    unwraps: AtomicU64,
    busy: Mutex<Busy>,
}

/// Wall time during which at least one backend call was in flight.
#[derive(Debug, Default)]
struct Busy {
    in_flight: u32,
    since: Option<Instant>,
    total: Duration,
}

struct BusyGuard<'a>(&'a Mutex<Busy>);

impl<'a> BusyGuard<'a> {
    fn enter(m: &'a Mutex<Busy>) -> Self {
        let mut b = m.lock().unwrap();
        if b.in_flight == 0 {
            b.since = Some(Instant::now());
        }
        b.in_flight += 1;
        BusyGuard(m)
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut b = self.0.lock().unwrap();
        b.in_flight -= 1;
        if b.in_flight == 0 {
            if let Some(t) = b.since.take() {
                b.total += t.elapsed();
            }
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Calls {
    pub probes: u64,
    pub wraps: u64,
    pub unwraps: u64,
}

impl LatencyBackend {
    pub fn new(inner: Arc<dyn Backend>, delay: Duration) -> Arc<Self> {
        Arc::new(LatencyBackend {
            inner,
            delay,
            probes: AtomicU64::new(0),
            wraps: AtomicU64::new(0),
            unwraps: AtomicU64::new(0),
            busy: Mutex::new(Busy::default()),
        })
    }

    /// Wall time so far with at least one backend call in flight.
    pub fn busy(&self) -> Duration {
        self.busy.lock().unwrap().total
    }

    pub fn calls(&self) -> Calls {
        Calls {
            probes: self.probes.load(Ordering::SeqCst),
            wraps: self.wraps.load(Ordering::SeqCst),
            unwraps: self.unwraps.load(Ordering::SeqCst),
        }
    }
}

#[async_trait]
impl Backend for LatencyBackend {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn current_key(&self) -> Result<KeyIdentity, BackendError> {
        self.probes.fetch_add(1, Ordering::SeqCst);
        let _busy = BusyGuard::enter(&self.busy);
        tokio::time::sleep(self.delay).await;
        self.inner.current_key().await
    }

    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        self.wraps.fetch_add(1, Ordering::SeqCst);
        let _busy = BusyGuard::enter(&self.busy);
        tokio::time::sleep(self.delay).await;
        self.inner.wrap(plaintext).await
    }

    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        let _busy = BusyGuard::enter(&self.busy);
        tokio::time::sleep(self.delay).await;
        self.inner.unwrap(key_ref, ciphertext).await
    }
}
