//! The envelope engine: turns DEKs/seeds into self-describing ciphertexts under a local KEK hierarchy.
//!
//! - A *local KEK* (256-bit, generated here) is wrapped once by the backend's remote KEK and then
//!   encrypts many DEKs with AES-256-GCM. Its wrapped form travels inside every ciphertext, so any
//!   replica with access to the backend can decrypt.
//! - Unwrapped local KEKs are cached (bounded), so Decrypt calls the backend only the first time it
//!   meets a local KEK.
//! - The current local KEK is retired after `kek_max_uses` Encrypts, after `kek_max_age`, and whenever
//!   the remote key identity (key_id) changes.
//! - Status is answered from memory; a background probe ([`health`]) keeps it fresh.
//!
//! The engine knows nothing about gRPC; errors are [`EngineError`]s.

pub mod cache;
pub mod error;
pub mod format;
pub mod health;
pub mod kek;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio::sync::{Mutex, Semaphore};
use zeroize::Zeroizing;

use crate::backend::{Backend, BackendError};
pub use cache::Lookup;
pub use error::EngineError;
use health::HealthState;
pub use kek::Binding;
use kek::LocalKek;

/// Tunables of the engine. See `kms-plugin serve --help` for the user-facing description.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub kek_max_uses: u64,
    pub kek_max_age: Duration,
    pub kek_cache_size: usize,
    pub probe_interval: Duration,
    pub deep_probe_interval: Duration,
    /// Timeout of one backend call (probe, wrap or unwrap).
    pub backend_timeout: Duration,
    /// Status turns unhealthy when the last successful probe is older than this.
    pub status_staleness: Duration,
    /// Backend calls in flight at once; further calls wait (bounded by the request deadline).
    pub backend_concurrency: usize,
    /// Largest DEK/seed accepted by Encrypt.
    pub max_plaintext: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            kek_max_uses: 1 << 21,
            kek_max_age: Duration::from_secs(7 * 24 * 3600),
            kek_cache_size: 1000,
            probe_interval: Duration::from_secs(30),
            deep_probe_interval: Duration::from_secs(300),
            backend_timeout: Duration::from_secs(5),
            status_staleness: Duration::from_secs(90),
            backend_concurrency: 16,
            max_plaintext: 4096,
        }
    }
}

/// Backend operations, for observers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendOp {
    Probe,
    Wrap,
    Unwrap,
}

impl BackendOp {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendOp::Probe => "probe",
            BackendOp::Wrap => "wrap",
            BackendOp::Unwrap => "unwrap",
        }
    }
}

/// Why a local KEK stopped being used for Encrypt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetireReason {
    MaxUses,
    MaxAge,
    KeyIdChanged,
    Revoked,
}

impl RetireReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RetireReason::MaxUses => "max_uses",
            RetireReason::MaxAge => "max_age",
            RetireReason::KeyIdChanged => "key_id_changed",
            RetireReason::Revoked => "revoked",
        }
    }
}

/// Hooks for metrics and audit. Every method has a no-op default; implementations must be cheap.
pub trait Observer: Send + Sync + 'static {
    fn backend_call(
        &self,
        _op: BackendOp,
        _outcome: Result<(), &BackendError>,
        _elapsed: Duration,
    ) {
    }
    fn kek_cache(&self, _lookup: Lookup, _size: usize) {}
    fn kek_created(&self, _reference: &str, _key_id: &str) {}
    fn kek_retired(&self, _reason: RetireReason) {}
    fn key_id_changed(&self, _old: Option<&str>, _new: &str) {}
    fn probe(&self, _deep: bool, _result: Result<(), &str>) {}
}

struct NoObserver;
impl Observer for NoObserver {}

/// Result of an Encrypt.
#[derive(Debug)]
pub struct Sealed {
    pub ciphertext: Vec<u8>,
    pub key_id: String,
    /// Short public reference of the local KEK used.
    pub kek_ref: String,
    /// True when this call had to wrap a new local KEK with the backend.
    pub backend_call: bool,
}

/// Result of a Decrypt.
pub struct Opened {
    pub plaintext: Zeroizing<Vec<u8>>,
    pub kek_ref: String,
    /// True when this call had to unwrap the local KEK with the backend.
    pub backend_call: bool,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Opened(kek={}, {} bytes)",
            self.kek_ref,
            self.plaintext.len()
        )
    }
}

/// See the module documentation.
pub struct Engine {
    backend: Arc<dyn Backend>,
    config: EngineConfig,
    observer: Arc<dyn Observer>,
    cache: cache::KekCache,
    current: ArcSwapOption<LocalKek>,
    rotate_lock: Mutex<()>,
    backend_slots: Arc<Semaphore>,
    health: HealthState,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// Makes a backend key identity into a KMS key_id: `<kind>:<identity>`, hashed if it would exceed the
/// apiserver's 1024-byte limit.
pub fn key_id_for(kind: &str, backend_key_id: &str) -> String {
    let id = format!("{kind}:{backend_key_id}");
    if id.len() <= 1024 && !id.is_empty() {
        id
    } else {
        use sha2::Digest;
        format!(
            "{kind}:sha256:{}",
            hex::encode(sha2::Sha256::digest(backend_key_id.as_bytes()))
        )
    }
}

impl Engine {
    pub fn new(backend: Arc<dyn Backend>, config: EngineConfig) -> Arc<Self> {
        Self::with_observer(backend, config, Arc::new(NoObserver))
    }

    pub fn with_observer(
        backend: Arc<dyn Backend>,
        config: EngineConfig,
        observer: Arc<dyn Observer>,
    ) -> Arc<Self> {
        Arc::new(Engine {
            cache: cache::KekCache::new(config.kek_cache_size),
            backend_slots: Arc::new(Semaphore::new(config.backend_concurrency.max(1))),
            health: HealthState::new(config.status_staleness),
            current: ArcSwapOption::empty(),
            rotate_lock: Mutex::new(()),
            backend,
            config,
            observer,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn backend_kind(&self) -> &'static str {
        self.backend.kind()
    }

    pub fn cached_keks(&self) -> usize {
        self.cache.len()
    }

    /// Runs one backend call with the concurrency bound, the timeout, and the observer.
    async fn call_backend<T, F>(&self, op: BackendOp, fut: F) -> Result<T, EngineError>
    where
        F: std::future::Future<Output = Result<T, BackendError>>,
    {
        call_backend(
            &self.backend_slots,
            &*self.observer,
            self.config.backend_timeout,
            op,
            fut,
        )
        .await
    }

    /// Encrypts a DEK/seed under the current local KEK, creating (wrapping) a new one when needed.
    pub async fn encrypt(&self, plaintext: &[u8], api: Api) -> Result<Sealed, EngineError> {
        if plaintext.is_empty() {
            return Err(EngineError::InvalidInput("plaintext is empty".into()));
        }
        if plaintext.len() > self.config.max_plaintext {
            return Err(EngineError::InvalidInput(format!(
                "plaintext is {} bytes; the limit is {} (KMS plaintexts are data encryption keys)",
                plaintext.len(),
                self.config.max_plaintext
            )));
        }
        self.health.check_not_revoked()?;
        let (kek, backend_call) = self.encryption_kek().await?;
        let binding = match api {
            Api::V1 => Binding::V1,
            Api::V2 => Binding::V2 {
                key_id: &kek.key_id,
            },
        };
        let ciphertext = kek.seal(plaintext, binding);
        Ok(Sealed {
            ciphertext,
            key_id: kek.key_id.clone(),
            kek_ref: kek.reference(),
            backend_call,
        })
    }

    /// Decrypts a ciphertext produced by [`Engine::encrypt`].
    pub async fn decrypt(
        &self,
        ciphertext: &[u8],
        binding: Binding<'_>,
    ) -> Result<Opened, EngineError> {
        if let Binding::V2 { key_id } = binding {
            if key_id.is_empty() {
                return Err(EngineError::InvalidInput("key_id is empty".into()));
            }
        }
        let parsed = format::parse(ciphertext)?;
        self.health.check_not_revoked()?;
        let (kek, lookup) = match self.cache.get(parsed.header) {
            Some(kek) => (kek, Lookup::Hit),
            None => {
                let digest = kek::digest_of(parsed.key_ref, parsed.wrapped);
                let backend = self.backend.clone();
                let slots = self.backend_slots.clone();
                let observer = self.observer.clone();
                let timeout = self.config.backend_timeout;
                let key_ref = parsed.key_ref.to_string();
                let wrapped = parsed.wrapped.to_vec();
                // The key_id it reports for Encrypt is irrelevant for a decrypt-only KEK.
                let key_id = match binding {
                    Binding::V2 { key_id } => key_id.to_string(),
                    Binding::V1 => String::new(),
                };
                self.cache
                    .get_or_load(parsed.header, digest, async move {
                        let secret = call_backend(
                            &slots,
                            &*observer,
                            timeout,
                            BackendOp::Unwrap,
                            backend.unwrap(&key_ref, &wrapped),
                        )
                        .await?;
                        let wrapped = crate::backend::WrappedKey {
                            key_ref,
                            key_id: String::new(),
                            ciphertext: wrapped,
                        };
                        Ok(Arc::new(LocalKek::new(&secret, &wrapped, key_id)?))
                    })
                    .await?
            }
        };
        self.observer.kek_cache(lookup, self.cache.len());
        let plaintext = kek.open(&parsed, binding)?;
        Ok(Opened {
            plaintext,
            kek_ref: kek.reference(),
            backend_call: lookup == Lookup::Miss,
        })
    }

    /// The local KEK for the next Encrypt. Fast path: one atomic load and two comparisons.
    async fn encryption_kek(&self) -> Result<(Arc<LocalKek>, bool), EngineError> {
        let want = self.health.snapshot().key_id.clone();
        if let Some(kek) = self.current.load_full() {
            if self.usable(&kek, want.as_deref()).is_ok() && kek.try_use(self.config.kek_max_uses) {
                return Ok((kek, false));
            }
        }
        let _guard = self.rotate_lock.lock().await;
        if let Some(kek) = self.current.load_full() {
            match self.usable(&kek, want.as_deref()) {
                Ok(()) if kek.try_use(self.config.kek_max_uses) => return Ok((kek, false)),
                Ok(()) => self.observer.kek_retired(RetireReason::MaxUses),
                Err(reason) => self.observer.kek_retired(reason),
            }
        }
        let kek = self.new_kek(want.map(|k| k.to_string())).await?;
        kek.try_use(self.config.kek_max_uses);
        Ok((kek, true))
    }

    fn usable(&self, kek: &LocalKek, want_key_id: Option<&str>) -> Result<(), RetireReason> {
        if kek.created.elapsed() >= self.config.kek_max_age {
            return Err(RetireReason::MaxAge);
        }
        match want_key_id {
            Some(want) if want != kek.key_id => Err(RetireReason::KeyIdChanged),
            _ => Ok(()),
        }
    }

    /// Generates, wraps and installs a new local KEK. Caller holds `rotate_lock`.
    async fn new_kek(&self, key_id: Option<String>) -> Result<Arc<LocalKek>, EngineError> {
        let key_id = match key_id {
            Some(id) => id,
            // No successful probe yet: ask the backend now rather than fail the first Encrypt.
            None => {
                let identity = self
                    .call_backend(BackendOp::Probe, self.backend.current_key())
                    .await?;
                key_id_for(self.backend.kind(), &identity.key_id)
            }
        };
        let secret = LocalKek::generate_secret();
        let wrapped = self
            .call_backend(BackendOp::Wrap, self.backend.wrap(&secret[..]))
            .await?;
        let kek = Arc::new(LocalKek::new(&secret[..], &wrapped, key_id)?);
        self.cache.insert(kek.clone());
        self.current.store(Some(kek.clone()));
        self.observer.kek_created(&kek.reference(), &kek.key_id);
        tracing::info!(kek = %kek.reference(), key_id = %kek.key_id, "created a new local KEK");
        Ok(kek)
    }

    /// Drops every cached local KEK (revocation).
    fn purge(&self) {
        if self.current.swap(None).is_some() {
            self.observer.kek_retired(RetireReason::Revoked);
        }
        self.cache.clear();
    }

    /// The Status answer, from memory.
    pub fn status(&self) -> health::Status {
        self.health.status()
    }

    /// Changes whenever Status flips between healthy and unhealthy.
    pub fn subscribe_health(&self) -> tokio::sync::watch::Receiver<bool> {
        self.health.subscribe()
    }
}

/// Which KMS API a ciphertext is made for (part of its authenticated data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    V1,
    V2,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::V1 => "v1",
            Api::V2 => "v2",
        }
    }
}

async fn call_backend<T, F>(
    slots: &Semaphore,
    observer: &dyn Observer,
    timeout: Duration,
    op: BackendOp,
    fut: F,
) -> Result<T, EngineError>
where
    F: std::future::Future<Output = Result<T, BackendError>>,
{
    let started = Instant::now();
    let result = tokio::time::timeout(timeout, async {
        let _permit = slots
            .acquire()
            .await
            .map_err(|_| BackendError::Other("engine shut down".into()))?;
        fut.await
    })
    .await;
    let result = match result {
        Ok(r) => r,
        Err(_) => Err(BackendError::Timeout(timeout)),
    };
    observer.backend_call(op, result.as_ref().map(|_| ()), started.elapsed());
    result.map_err(EngineError::Backend)
}
