//! An in-memory backend: a versioned AES-256 key that lives only in this process.
//!
//! It makes every layer above the backend testable without a server: tests rotate it, disable it,
//! revoke access, and count calls. Data wrapped by it is lost with the process, so the CLI never
//! offers it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use rand::RngCore;
use zeroize::Zeroizing;

use super::{aead, Backend, BackendError, KeyIdentity, SecretBytes, WrappedKey};

/// What the in-memory key currently allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    Enabled,
    Disabled,
    AccessDenied,
    Deleted,
}

#[derive(Debug)]
struct Inner {
    versions: Vec<Zeroizing<[u8; 32]>>,
    /// State of each version (index = version - 1), on top of the key-wide `state`.
    version_states: Vec<KeyState>,
    /// The version that wraps (1-based); normally the newest.
    current: usize,
    state: KeyState,
}

/// See the module documentation.
#[derive(Debug)]
pub struct MemoryBackend {
    name: String,
    inner: Mutex<Inner>,
    wraps: AtomicU64,
    unwraps: AtomicU64,
    probes: AtomicU64,
}

fn random_key() -> Zeroizing<[u8; 32]> {
    let mut k = Zeroizing::new([0u8; 32]);
    rand::thread_rng().fill_bytes(&mut *k);
    k
}

impl MemoryBackend {
    pub fn new(name: impl Into<String>) -> Self {
        MemoryBackend {
            name: name.into(),
            inner: Mutex::new(Inner {
                versions: vec![random_key()],
                version_states: vec![KeyState::Enabled],
                current: 1,
                state: KeyState::Enabled,
            }),
            wraps: AtomicU64::new(0),
            unwraps: AtomicU64::new(0),
            probes: AtomicU64::new(0),
        }
    }

    /// Adds a new key version and makes it current; older versions keep unwrapping.
    pub fn rotate(&self) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        inner.versions.push(random_key());
        inner.version_states.push(KeyState::Enabled);
        inner.current = inner.versions.len();
        inner.current as u64
    }

    /// Makes an existing version current again, as rolling an alias back does (A → B → A).
    pub fn set_current(&self, version: u64) {
        let mut inner = self.inner.lock().unwrap();
        assert!((1..=inner.versions.len() as u64).contains(&version));
        inner.current = version as usize;
    }

    pub fn set_state(&self, state: KeyState) {
        self.inner.lock().unwrap().state = state;
    }

    /// Changes the state of one version only (e.g. disable an old version).
    pub fn set_version_state(&self, version: u64, state: KeyState) {
        self.inner.lock().unwrap().version_states[version as usize - 1] = state;
    }

    /// For tests: unwraps `ciphertext` with exactly `version`, bypassing states.
    pub fn unwrap_with_version(
        &self,
        version: u64,
        ciphertext: &[u8],
    ) -> Result<SecretBytes, BackendError> {
        let inner = self.inner.lock().unwrap();
        let key_ref = self.key_ref(version);
        aead::open(
            &inner.versions[version as usize - 1],
            key_ref.as_bytes(),
            ciphertext,
        )
    }

    pub fn wrap_calls(&self) -> u64 {
        self.wraps.load(Ordering::Relaxed)
    }

    pub fn unwrap_calls(&self) -> u64 {
        self.unwraps.load(Ordering::Relaxed)
    }

    pub fn probe_calls(&self) -> u64 {
        self.probes.load(Ordering::Relaxed)
    }

    fn check_state(&self, state: KeyState) -> Result<(), BackendError> {
        match state {
            KeyState::Enabled => Ok(()),
            KeyState::Disabled => Err(BackendError::KeyDisabled(format!(
                "in-memory key {}",
                self.name
            ))),
            KeyState::AccessDenied => Err(BackendError::PermissionDenied(format!(
                "in-memory key {}",
                self.name
            ))),
            KeyState::Deleted => Err(BackendError::KeyNotFound(format!(
                "in-memory key {}",
                self.name
            ))),
        }
    }

    fn key_ref(&self, version: u64) -> String {
        format!("{}/{}", self.name, version)
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn current_key(&self) -> Result<KeyIdentity, BackendError> {
        self.probes.fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.lock().unwrap();
        self.check_state(inner.state)?;
        let version = inner.current as u64;
        self.check_state(inner.version_states[inner.current - 1])?;
        Ok(KeyIdentity {
            key_id: format!("{}:v{}", self.name, version),
            key_ref: self.key_ref(version),
        })
    }

    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        self.wraps.fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.lock().unwrap();
        self.check_state(inner.state)?;
        self.check_state(inner.version_states[inner.current - 1])?;
        let version = inner.current as u64;
        let key_ref = self.key_ref(version);
        let key = &inner.versions[inner.current - 1];
        let ciphertext = aead::seal(key, key_ref.as_bytes(), plaintext);
        Ok(WrappedKey {
            key_ref,
            key_id: format!("{}:v{}", self.name, version),
            ciphertext,
        })
    }

    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError> {
        self.unwraps.fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.lock().unwrap();
        self.check_state(inner.state)?;
        let version = key_ref
            .strip_prefix(&self.name)
            .and_then(|rest| rest.strip_prefix('/'))
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|v| (1..=inner.versions.len()).contains(v))
            .ok_or_else(|| {
                BackendError::KeyNotFound(format!("no in-memory key version {key_ref:?}"))
            })?;
        self.check_state(inner.version_states[version - 1])?;
        aead::open(&inner.versions[version - 1], key_ref.as_bytes(), ciphertext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wraps_across_rotation_and_reports_state() {
        let b = MemoryBackend::new("m");
        let w1 = b.wrap(b"secret-one").await.unwrap();
        assert_eq!(b.current_key().await.unwrap().key_id, "m:v1");
        b.rotate();
        assert_eq!(b.current_key().await.unwrap().key_id, "m:v2");
        let w2 = b.wrap(b"secret-two").await.unwrap();
        assert_ne!(w1.key_ref, w2.key_ref);
        assert_eq!(
            &*b.unwrap(&w1.key_ref, &w1.ciphertext).await.unwrap(),
            b"secret-one"
        );
        assert_eq!(
            &*b.unwrap(&w2.key_ref, &w2.ciphertext).await.unwrap(),
            b"secret-two"
        );
        assert!(matches!(
            b.unwrap(&w2.key_ref, &w1.ciphertext).await,
            Err(BackendError::InvalidCiphertext(_))
        ));
        b.set_state(KeyState::Disabled);
        assert!(b.current_key().await.unwrap_err().is_revocation());
        b.set_state(KeyState::Enabled);
        assert_eq!(b.unwrap_calls(), 3);
    }
}
