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
pub mod lifecycle;
mod probe;
pub mod recover;

use std::sync::{Arc, Weak};
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
pub use lifecycle::KeyHealth;
use lifecycle::{Lifecycle, Transition};

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
    /// Treat a confirmed authentication failure (credentials revoked) like a key revocation. Off by
    /// default: a lost credential then stops new remote calls, but cached local KEKs keep serving.
    pub revoke_on_auth_failure: bool,
    /// Write KMS v1 ciphertexts in the format of the plugin the backend replaces (drop-in
    /// rollback preparation); one backend call per write.
    pub legacy_v1_writes: bool,
    /// How long a local KEK that an escrow backend could not wrap serves Encrypt before the engine
    /// makes a new one (and so tries the escrow again).
    pub escrow_retry: Duration,
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
            revoke_on_auth_failure: false,
            legacy_v1_writes: false,
            escrow_retry: Duration::from_secs(60),
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
    /// An operator asked for it (`kms-plugin rotate-local`).
    Operator,
    /// An escrow backend could not wrap it; replaced after `escrow_retry`.
    EscrowIncomplete,
}

impl RetireReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RetireReason::MaxUses => "max_uses",
            RetireReason::MaxAge => "max_age",
            RetireReason::KeyIdChanged => "key_id_changed",
            RetireReason::Revoked => "revoked",
            RetireReason::Operator => "operator",
            RetireReason::EscrowIncomplete => "escrow_incomplete",
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
    /// A remote key changed state (see [`lifecycle`]); `reason` is the key manager's answer.
    fn key_health_changed(&self, _key_ref: &str, _health: &KeyHealth) {}
    /// A v1 ciphertext in the format of the plugin this one replaced was decrypted (or failed to).
    fn legacy_decrypt(&self, _ok: bool) {}
    /// An escrow backend wrapped (or failed to wrap) a new local KEK.
    fn escrow_wrap(&self, _escrow: &str, _outcome: Result<(), &BackendError>) {}
    /// A local KEK the primary could not unwrap was unwrapped (or not) by an escrow backend.
    /// `primary_error` is why the primary did not (never secret).
    fn escrow_unwrap(
        &self,
        _escrow: &str,
        _kek_ref: &str,
        _primary_error: &str,
        _outcome: Result<(), &BackendError>,
    ) {
    }
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
    /// Escrow backends: each new local KEK is also wrapped by every one of them (format version 2),
    /// and a Decrypt the primary cannot serve is tried with them (docs/escrow.md).
    escrow: Vec<Arc<dyn Backend>>,
    /// Last outcome per escrow backend (wrap or probe), for health reporting.
    escrow_health: std::sync::Mutex<Vec<(&'static str, Result<(), String>)>>,
    config: EngineConfig,
    observer: Arc<dyn Observer>,
    cache: cache::KekCache,
    current: ArcSwapOption<LocalKek>,
    rotate_lock: Mutex<()>,
    backend_slots: Arc<Semaphore>,
    health: HealthState,
    lifecycle: Lifecycle,
    /// For detached work (confirming a revocation seen by a request).
    me: Weak<Engine>,
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
        Self::with_escrow(backend, Vec::new(), config, observer)
    }

    /// An engine whose local KEKs are also wrapped by each of `escrow` (backends of kinds other than
    /// the primary's).
    pub fn with_escrow(
        backend: Arc<dyn Backend>,
        escrow: Vec<Arc<dyn Backend>>,
        config: EngineConfig,
        observer: Arc<dyn Observer>,
    ) -> Arc<Self> {
        let escrow_health = escrow
            .iter()
            .map(|b| (b.kind(), Err("not used yet".to_string())))
            .collect();
        Arc::new_cyclic(|me| Engine {
            escrow,
            escrow_health: std::sync::Mutex::new(escrow_health),
            cache: cache::KekCache::new(config.kek_cache_size),
            backend_slots: Arc::new(Semaphore::new(config.backend_concurrency.max(1))),
            health: HealthState::new(config.status_staleness),
            lifecycle: Lifecycle::default(),
            current: ArcSwapOption::empty(),
            rotate_lock: Mutex::new(()),
            me: me.clone(),
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

    /// Each escrow backend's kind and its last outcome (`Err` holds the error, never secret).
    pub fn escrow_health(&self) -> Vec<(&'static str, Result<(), String>)> {
        self.escrow_health.lock().unwrap().clone()
    }

    pub(super) fn note_escrow(&self, kind: &'static str, outcome: Result<(), String>) {
        let mut health = self.escrow_health.lock().unwrap();
        if let Some(entry) = health.iter_mut().find(|(k, _)| *k == kind) {
            entry.1 = outcome;
        }
    }

    pub fn cached_keks(&self) -> usize {
        self.cache.len()
    }

    /// Unwraps still in flight (none are left behind by requests that gave up).
    pub fn unwraps_in_flight(&self) -> usize {
        self.cache.inflight()
    }

    /// What the engine believes about the remote key `key_ref` (see [`lifecycle`]).
    pub fn key_health(&self, key_ref: &str) -> KeyHealth {
        self.lifecycle.health(key_ref)
    }

    /// Remote keys by state: (active, suspect, revoked).
    pub fn key_counts(&self) -> (usize, usize, usize) {
        self.lifecycle.counts()
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
        if api == Api::V1 && self.config.legacy_v1_writes {
            return self.encrypt_legacy_v1(plaintext).await;
        }
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
        let parsed = match format::parse(ciphertext) {
            Ok(parsed) => parsed,
            Err(e) if matches!(binding, Binding::V1) => {
                return self.decrypt_legacy_v1(ciphertext, e).await
            }
            Err(e) => return Err(e),
        };
        let (kek, lookup) = match self.cache.get(parsed.header) {
            Some(kek) => (kek, Lookup::Hit),
            None => {
                // A confirmed revocation is re-checked by the probe; until then, no backend call
                // to the primary (an escrow backend may still serve it: see `load`).
                let escrowed = !self.escrow.is_empty() && !parsed.escrows().is_empty();
                if let Some(reason) = self.lifecycle.revoked_with_sample(parsed.key_ref) {
                    if !escrowed {
                        return Err(EngineError::Revoked(reason));
                    }
                }
                let digest = kek::digest_of(parsed.key_ref, parsed.wrapped);
                let me = self
                    .me
                    .upgrade()
                    .ok_or_else(|| EngineError::Internal("the engine is shutting down".into()))?;
                let request = LoadRequest::from(&parsed);
                self.cache
                    .get_or_load(parsed.header, digest, async move { me.load(request).await })
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

    /// A v1 ciphertext that is not in this plugin's format: the backend may know it as the data of
    /// the plugin it replaced (drop-in mode). Each one is a backend call; the apiserver's own v1
    /// DEK cache keeps them rare, and [`Observer::legacy_decrypt`] counts them so operators can see
    /// when the last one has been rewritten.
    async fn decrypt_legacy_v1(
        &self,
        ciphertext: &[u8],
        not_ours: EngineError,
    ) -> Result<Opened, EngineError> {
        let started = Instant::now();
        let backend = self.backend.clone();
        let legacy = tokio::time::timeout(self.config.backend_timeout, async {
            let _permit = self.backend_slots.acquire().await;
            backend.decrypt_legacy_v1(ciphertext).await
        })
        .await
        .unwrap_or(Some(Err(BackendError::Timeout(
            self.config.backend_timeout,
        ))));
        let Some(result) = legacy else {
            return Err(not_ours);
        };
        self.observer.backend_call(
            BackendOp::Unwrap,
            result.as_ref().map(|_| ()),
            started.elapsed(),
        );
        self.observer.legacy_decrypt(result.is_ok());
        match result {
            Ok((key_ref, dek)) => {
                if !matches!(dek.len(), 16 | 24 | 32) {
                    return Err(EngineError::InvalidInput(format!(
                        "a legacy v1 ciphertext decrypted to {} bytes, which is not an AES key (16, 24 or 32 bytes);                          it was not written by the original plugin with this key",
                        dek.len()
                    )));
                }
                if let Some(reason) = self.lifecycle.revoked(&key_ref) {
                    return Err(EngineError::Revoked(reason));
                }
                Ok(Opened {
                    plaintext: dek,
                    kek_ref: "legacy".into(),
                    backend_call: true,
                })
            }
            Err(e) => Err(match e {
                BackendError::InvalidCiphertext(why) => EngineError::InvalidInput(format!(
                    "ciphertext is neither in kms-plugin's format ({not_ours}) nor a ciphertext of the                      original plugin that the key manager can decrypt ({why})"
                )),
                other => EngineError::Backend(other),
            }),
        }
    }

    async fn encrypt_legacy_v1(&self, plaintext: &[u8]) -> Result<Sealed, EngineError> {
        let snap = self.health.snapshot_full();
        if let Some(reason) = snap
            .key_ref
            .as_deref()
            .and_then(|k| self.lifecycle.revoked(k))
        {
            return Err(EngineError::Revoked(reason));
        }
        let backend = self.backend.clone();
        let result = self
            .call_backend(BackendOp::Wrap, async move {
                backend.encrypt_legacy_v1(plaintext).await.unwrap_or_else(|| {
                    Err(BackendError::Config(
                        "--legacy-v1-writes: this backend has no legacy format (only akeyless has)".into(),
                    ))
                })
            })
            .await?;
        Ok(Sealed {
            ciphertext: result,
            key_id: snap.key_id.as_deref().unwrap_or_default().to_string(),
            kek_ref: "legacy".into(),
            backend_call: true,
        })
    }

    /// Unwraps a local KEK met by Decrypt and installs it, unless its key was purged meanwhile.
    /// When the primary cannot (down, revoked, lost the key) and the ciphertext carries escrow
    /// wrappings, the escrow backends are tried in order; that is loud (warning, audit, metric).
    /// Runs detached (see [`cache`]), so it finishes even when the request gave up.
    async fn load(&self, request: LoadRequest) -> Result<Arc<LocalKek>, EngineError> {
        let key_ref = request.key_ref.as_str();
        let escrowed = !self.escrow.is_empty() && !request.escrows.is_empty();
        let primary_error = match self.lifecycle.revoked(key_ref).filter(|_| escrowed) {
            Some(reason) => EngineError::Revoked(reason),
            None => {
                let generation = self.lifecycle.generation(key_ref);
                let result = self
                    .call_backend(
                        BackendOp::Unwrap,
                        self.backend.unwrap(key_ref, &request.wrapped),
                    )
                    .await;
                match result {
                    Ok(secret) => {
                        let kek = Arc::new(request.kek(&secret)?);
                        if !self.install(key_ref, generation, &kek, true) {
                            return Err(EngineError::Revoked(format!(
                                "remote key {key_ref} was revoked while this local KEK was being unwrapped"
                            )));
                        }
                        return Ok(kek);
                    }
                    Err(e) => {
                        self.answer(key_ref, &e).await;
                        e
                    }
                }
            }
        };
        if !escrowed {
            return Err(primary_error);
        }
        let kek_ref = kek::short_ref(&kek::digest_of(key_ref, &request.wrapped));
        let why = primary_error.to_string();
        for (kind, escrow_ref, wrapped) in &request.escrows {
            let Some(backend) = self.escrow.iter().find(|b| b.kind() == kind) else {
                continue;
            };
            let result = self
                .call_backend(BackendOp::Unwrap, backend.unwrap(escrow_ref, wrapped))
                .await;
            match result {
                Ok(secret) => {
                    self.observer.escrow_unwrap(kind, &kek_ref, &why, Ok(()));
                    self.note_escrow(backend.kind(), Ok(()));
                    tracing::warn!(
                        kek = %kek_ref,
                        escrow = %kind,
                        primary_error = %why,
                        "decrypted through an ESCROW backend: the primary backend could not unwrap this local KEK; \
                         fix the primary (docs/escrow.md) and rewrite the data"
                    );
                    // Cached without the lifecycle: the primary's state is not changed by this.
                    let kek = Arc::new(request.kek(&secret)?);
                    self.cache.insert(kek.clone());
                    return Ok(kek);
                }
                Err(e) => {
                    if let Some(b) = as_backend_error(&e) {
                        self.observer.escrow_unwrap(kind, &kek_ref, &why, Err(&b));
                    }
                    self.note_escrow(backend.kind(), Err(e.to_string()));
                    tracing::warn!(kek = %kek_ref, escrow = %kind, error = %e, primary_error = %why, "escrow backend could not unwrap either");
                }
            }
        }
        Err(primary_error)
    }

    /// Wraps a new local KEK's secret with every escrow backend, concurrently. Returns the
    /// wrappings that succeeded (with their kinds) and whether any failed. Never fails Encrypt.
    async fn wrap_escrow(
        &self,
        secret: &[u8],
        primary: &crate::backend::WrappedKey,
    ) -> (Vec<crate::backend::WrappedKey>, Vec<&'static str>, bool) {
        // After an escrow takeover the primary is one of the escrow backends: no second wrapping.
        let calls = self
            .escrow
            .iter()
            .filter(|b| Arc::as_ptr(b).cast::<()>() != Arc::as_ptr(&self.backend).cast::<()>())
            .map(|b| async move {
                let r = self.call_backend(BackendOp::Wrap, b.wrap(secret)).await;
                (b.kind(), r)
            });
        let mut wrapped = Vec::new();
        let mut kinds = Vec::new();
        let mut incomplete = false;
        for (kind, result) in futures_util::future::join_all(calls).await {
            match result {
                Ok(w) => {
                    self.observer.escrow_wrap(kind, Ok(()));
                    self.note_escrow(kind, Ok(()));
                    wrapped.push(w);
                    kinds.push(kind);
                }
                Err(e) => {
                    if let Some(b) = as_backend_error(&e) {
                        self.observer.escrow_wrap(kind, Err(&b));
                    }
                    self.note_escrow(kind, Err(e.to_string()));
                    tracing::error!(escrow = kind, error = %e, retry_in = ?self.config.escrow_retry,
                        "escrow backend could not wrap the new local KEK; Encrypt goes on without it and a new KEK is made later");
                    incomplete = true;
                }
            }
        }
        // Keep a v2 ciphertext of a 32-byte seed within the apiserver's 1024 bytes.
        while !wrapped.is_empty() && header_len(primary, &wrapped, &kinds) > MAX_HEADER {
            let dropped = kinds.pop().unwrap_or_default();
            wrapped.pop();
            incomplete = true;
            tracing::error!(escrow = dropped, "escrow wrapping left out: the ciphertext would exceed the KMS v2 limit of 1024 bytes (docs/escrow.md, size)");
        }
        (wrapped, kinds, incomplete)
    }

    /// Installs a KEK in the cache through the lifecycle (see [`Lifecycle::install`]).
    fn install(
        &self,
        key_ref: &str,
        generation: u64,
        kek: &Arc<LocalKek>,
        unwrapped: bool,
    ) -> bool {
        let restored =
            self.lifecycle
                .install(key_ref, generation, kek.wrapped(), unwrapped, || {
                    self.cache.insert(kek.clone())
                });
        match restored {
            Some(Some(old)) => {
                tracing::info!(
                    key = key_ref,
                    was = old.as_str(),
                    "the backend unwrapped with the key again; it is usable"
                );
                self.observer
                    .key_health_changed(key_ref, &KeyHealth::Active);
                true
            }
            Some(None) => true,
            None => false,
        }
    }

    /// True when `e` is an answer that can revoke a key.
    fn revokes(&self, e: &EngineError) -> bool {
        match e {
            EngineError::Backend(b) => {
                b.is_revocation()
                    || (self.config.revoke_on_auth_failure
                        && matches!(b, BackendError::Authentication(_)))
            }
            _ => false,
        }
    }

    /// Feeds one backend answer about `key_ref` to the lifecycle. A first revocation answer is
    /// confirmed at once by a re-check of that key; a second one purges its local KEKs.
    async fn answer(&self, key_ref: &str, e: &EngineError) {
        if !self.revokes(e) {
            return;
        }
        if self.revocation_answer(key_ref, &e.to_string()) == Some(Transition::Suspect) {
            self.confirm(key_ref).await;
        }
    }

    fn revocation_answer(&self, key_ref: &str, reason: &str) -> Option<Transition> {
        let transition = self.lifecycle.revocation_answer(key_ref, reason, |k| {
            self.cache.remove_key_ref(k);
            let current = self.current.load();
            if current.as_ref().is_some_and(|kek| kek.key_ref == k) {
                self.current.store(None);
                self.observer.kek_retired(RetireReason::Revoked);
            }
        });
        match &transition {
            Some(Transition::Suspect) => {
                tracing::warn!(key = key_ref, answer = reason, "the backend reports the key revoked; checking again before dropping its cached keys");
                self.observer
                    .key_health_changed(key_ref, &KeyHealth::Suspect(reason.to_string()));
            }
            Some(Transition::Revoked) => {
                tracing::error!(key = key_ref, answer = reason, "revocation confirmed; dropped every cached local KEK of this key (data under other keys is unaffected)");
                self.observer
                    .key_health_changed(key_ref, &KeyHealth::Revoked(reason.to_string()));
            }
            _ => {}
        }
        self.publish_health();
        transition
    }

    /// Confirms a suspected revocation from a request path without holding the request up.
    fn confirm_later(&self, key_ref: &str, e: &EngineError) {
        if !self.revokes(e) {
            return;
        }
        if let Some(me) = self.me.upgrade() {
            let key_ref = key_ref.to_string();
            let e = e.clone();
            tokio::spawn(async move { me.answer(&key_ref, &e).await });
        }
    }

    /// Stops using the current local KEK for Encrypt now (e.g. after a suspected node compromise):
    /// the next Encrypt wraps a fresh one. Data under the old KEK still decrypts; a storage migration
    /// moves it. Returns the retired KEK's short reference, `None` if there was none.
    pub async fn retire_current_kek(&self) -> Option<String> {
        let _guard = self.rotate_lock.lock().await;
        let old = self.current.swap(None)?;
        self.observer.kek_retired(RetireReason::Operator);
        tracing::warn!(kek = %old.reference(), "local KEK retired on request; the next Encrypt creates a new one");
        Some(old.reference())
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
        let kek = self.new_kek().await?;
        kek.try_use(self.config.kek_max_uses);
        Ok((kek, true))
    }

    fn usable(&self, kek: &LocalKek, want_key_id: Option<&str>) -> Result<(), RetireReason> {
        if kek.created.elapsed() >= self.config.kek_max_age {
            return Err(RetireReason::MaxAge);
        }
        if kek.escrow_incomplete && kek.created.elapsed() >= self.config.escrow_retry {
            return Err(RetireReason::EscrowIncomplete);
        }
        match want_key_id {
            Some(want) if want != kek.key_id => Err(RetireReason::KeyIdChanged),
            _ => Ok(()),
        }
    }

    /// Generates, wraps and installs a new local KEK for the current key. Caller holds
    /// `rotate_lock`. The KEK is labelled with the key that actually wrapped it; when that is not
    /// the current key (a rotation between probe and wrap), it is thrown away, the current key is
    /// looked up again, and the wrap is tried once more.
    async fn new_kek(&self) -> Result<Arc<LocalKek>, EngineError> {
        for attempt in 0..2 {
            let snap = self.health.snapshot_full();
            let (want, key_ref) = match (&snap.key_id, &snap.key_ref) {
                (Some(id), Some(r)) => (id.clone(), r.clone()),
                // No successful probe yet: ask the backend now rather than fail the first Encrypt.
                _ => {
                    let identity = self.look_up_current().await?;
                    (identity.0, identity.1)
                }
            };
            if let Some(reason) = self.lifecycle.revoked(&key_ref) {
                return Err(EngineError::Revoked(reason));
            }
            let generation = self.lifecycle.generation(&key_ref);
            let secret = LocalKek::generate_secret();
            let wrapped = match self
                .call_backend(BackendOp::Wrap, self.backend.wrap(&secret[..]))
                .await
            {
                Ok(w) => w,
                Err(e) => {
                    self.confirm_later(&key_ref, &e);
                    return Err(e);
                }
            };
            match self.health.label_for(&wrapped.key_id) {
                Some(label) if label == want && wrapped.key_ref == key_ref => {
                    let kek = if self.escrow.is_empty() {
                        LocalKek::new(&secret[..], &wrapped, label.to_string())?
                    } else {
                        let (escrows, kinds, incomplete) =
                            self.wrap_escrow(&secret[..], &wrapped).await;
                        let mut kek = LocalKek::with_escrow(
                            &secret[..],
                            &wrapped,
                            &escrows,
                            &kinds,
                            label.to_string(),
                        )?;
                        kek.escrow_incomplete = incomplete;
                        kek
                    };
                    let kek = Arc::new(kek);
                    if !self.install(&key_ref, generation, &kek, false) {
                        return Err(EngineError::Revoked(format!(
                            "remote key {key_ref} was revoked while a local KEK was being wrapped"
                        )));
                    }
                    self.current.store(Some(kek.clone()));
                    self.observer.kek_created(&kek.reference(), &kek.key_id);
                    tracing::info!(kek = %kek.reference(), key_id = %kek.key_id, "created a new local KEK");
                    return Ok(kek);
                }
                _ if attempt == 0 => {
                    tracing::warn!(
                        wrapped_by = %wrapped.key_id,
                        current = %want,
                        "the backend wrapped a new local KEK with a key other than the current one; discarding it and looking the current key up again"
                    );
                    self.look_up_current().await?;
                }
                _ => break,
            }
        }
        Err(EngineError::Backend(BackendError::Unavailable(
            "the backend's current key changed twice while a local KEK was being wrapped; retry"
                .into(),
        )))
    }

    /// The Status answer, from memory.
    pub fn status(&self) -> health::Status {
        self.health.status(self.current_revoked())
    }

    fn current_revoked(&self) -> Option<String> {
        let snap = self.health.snapshot();
        snap.key_ref
            .as_deref()
            .and_then(|k| self.lifecycle.revoked(k))
    }

    fn publish_health(&self) {
        self.health.publish(self.current_revoked().is_some());
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

/// Largest header that keeps the KMS v2 ciphertext of a 32-byte seed within the apiserver's 1024
/// bytes; escrow wrappings that do not fit are left out (docs/escrow.md, size).
pub const MAX_HEADER: usize = 1024 - format::NONCE_LEN - format::TAG_LEN - 32;

/// Length of the format-2 header of a local KEK with these wrappings.
/// The backend outcome an escrow call counts as in metrics and audit lines: the engine's own
/// deadline is the backend's timeout.
fn as_backend_error(e: &EngineError) -> Option<BackendError> {
    match e {
        EngineError::Backend(b) => Some(b.clone()),
        EngineError::DeadlineExceeded(d) => Some(BackendError::Timeout(*d)),
        _ => None,
    }
}

fn header_len(
    primary: &crate::backend::WrappedKey,
    escrows: &[crate::backend::WrappedKey],
    kinds: &[&str],
) -> usize {
    let escrow: usize = escrows
        .iter()
        .zip(kinds)
        .map(|(w, k)| 1 + k.len() + 1 + w.key_ref.len() + 2 + w.ciphertext.len())
        .sum();
    5 + primary.key_ref.len()
        + primary.ciphertext.len()
        + if escrows.is_empty() { 0 } else { 1 + escrow }
}

/// What a detached unwrap needs from a ciphertext header (owned: the request may go away).
struct LoadRequest {
    key_ref: String,
    wrapped: Vec<u8>,
    header: Vec<u8>,
    /// (escrow backend kind, its key reference, its wrapping), in header order.
    escrows: Vec<(String, String, Vec<u8>)>,
}

impl LoadRequest {
    fn from(parsed: &format::Parsed<'_>) -> Self {
        LoadRequest {
            key_ref: parsed.key_ref.to_string(),
            wrapped: parsed.wrapped.to_vec(),
            header: parsed.header.to_vec(),
            escrows: parsed
                .escrows()
                .iter()
                .map(|e| {
                    (
                        e.kind.to_string(),
                        e.key_ref.to_string(),
                        e.wrapped.to_vec(),
                    )
                })
                .collect(),
        }
    }

    fn kek(&self, secret: &[u8]) -> Result<LocalKek, EngineError> {
        LocalKek::loaded(secret, &self.key_ref, &self.wrapped, self.header.clone())
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
