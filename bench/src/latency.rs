//! A backend wrapper that adds a fixed latency to every call and counts calls, standing in for a remote
//! key manager. It lives here, not in the shipped binary: the cold-start scenario runs the engine
//! in-process behind it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kms_plugin::backend::{Backend, BackendError, KeyIdentity, SecretBytes, WrappedKey};

#[derive(Debug)]
pub struct LatencyBackend {
    inner: Arc<dyn Backend>,
    delay: Duration,
    probes: AtomicU64,
    wraps: AtomicU64,
    unwraps: AtomicU64,
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
        })
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
        tokio::time::sleep(self.delay).await;
        self.inner.current_key().await
    }

    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        self.wraps.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.inner.wrap(plaintext).await
    }

    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.inner.unwrap(key_ref, ciphertext).await
    }
}
