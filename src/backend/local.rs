//! The local key-file backend (the embedded default).
//!
//! The file holds one or more named 256-bit keys. The last key is primary (it wraps); every key in the
//! file unwraps, so rotating is appending a key (`kms-plugin keygen --add FILE`). The file is re-read
//! when its modification time or size changes, which the engine's probe triggers, so a rotation is
//! picked up without a restart. A key removed from the file stays usable until the process restarts.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::{aead, Backend, BackendError, KeyIdentity, SecretBytes, WrappedKey};

const FILE_FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct KeyFile {
    version: u32,
    keys: Vec<KeyEntry>,
}

#[derive(Serialize, Deserialize)]
struct KeyEntry {
    name: String,
    created: String,
    /// Base64 of 32 random bytes.
    key: String,
}

impl Drop for KeyEntry {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

struct LoadedKeys {
    /// Name of the primary (newest) key.
    primary: String,
    keys: HashMap<String, Zeroizing<[u8; 32]>>,
    stamp: Option<(SystemTime, u64)>,
}

/// See the module documentation.
pub struct LocalBackend {
    path: PathBuf,
    state: Mutex<LoadedKeys>,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn parse_key_file(path: &Path) -> Result<LoadedKeys, BackendError> {
    let stamp = file_stamp(path);
    let text = Zeroizing::new(fs::read_to_string(path).map_err(|e| {
        BackendError::Config(format!(
            "cannot read local key file {}: {e}; create one with `kms-plugin keygen {}`",
            path.display(),
            path.display()
        ))
    })?);
    let file: KeyFile = serde_json::from_str(&text).map_err(|e| {
        // serde_json errors carry a position, never the offending value.
        BackendError::Config(format!(
            "local key file {} is not a valid key file: {e}",
            path.display()
        ))
    })?;
    if file.version != FILE_FORMAT_VERSION {
        return Err(BackendError::Config(format!(
            "local key file {} has format version {}, this build reads version {FILE_FORMAT_VERSION}",
            path.display(),
            file.version
        )));
    }
    let mut keys = HashMap::new();
    for entry in &file.keys {
        let raw = Zeroizing::new(B64.decode(entry.key.trim()).map_err(|_| {
            BackendError::Config(format!(
                "key {:?} in {} is not valid base64",
                entry.name,
                path.display()
            ))
        })?);
        let bytes: [u8; 32] = raw.as_slice().try_into().map_err(|_| {
            BackendError::Config(format!(
                "key {:?} in {} is {} bytes long, expected 32",
                entry.name,
                path.display(),
                raw.len()
            ))
        })?;
        if entry.name.is_empty()
            || entry.name.len() > 128
            || !entry.name.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(BackendError::Config(format!(
                "a key in {} has an invalid name (1-128 printable ASCII characters required)",
                path.display()
            )));
        }
        if keys
            .insert(entry.name.clone(), Zeroizing::new(bytes))
            .is_some()
        {
            return Err(BackendError::Config(format!(
                "key name {:?} appears twice in {}",
                entry.name,
                path.display()
            )));
        }
    }
    let primary = file.keys.last().map(|k| k.name.clone()).ok_or_else(|| {
        BackendError::Config(format!("local key file {} holds no key", path.display()))
    })?;
    Ok(LoadedKeys {
        primary,
        keys,
        stamp,
    })
}

impl LocalBackend {
    /// Opens an existing key file. A missing file is an error: silently creating a new key would
    /// orphan every Secret encrypted under the old one.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, BackendError> {
        let path = path.into();
        let state = parse_key_file(&path)?;
        Ok(LocalBackend {
            path,
            state: Mutex::new(state),
        })
    }

    /// Re-reads the file if it changed. A file that became unreadable or invalid keeps the keys already
    /// loaded and reports the problem.
    fn refresh(&self) -> Result<(), BackendError> {
        let stamp = file_stamp(&self.path);
        let mut state = self.state.lock().unwrap();
        if stamp.is_some() && stamp == state.stamp {
            return Ok(());
        }
        let fresh = parse_key_file(&self.path)?;
        // Keep keys that disappeared from the file: data wrapped by them may still be in use.
        let mut keys = std::mem::take(&mut state.keys);
        keys.extend(fresh.keys);
        *state = LoadedKeys {
            primary: fresh.primary,
            keys,
            stamp: fresh.stamp,
        };
        Ok(())
    }

    fn identity(name: &str) -> KeyIdentity {
        KeyIdentity {
            key_id: name.to_string(),
            key_ref: name.to_string(),
        }
    }
}

#[async_trait]
impl Backend for LocalBackend {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn current_key(&self) -> Result<KeyIdentity, BackendError> {
        self.refresh()?;
        Ok(Self::identity(&self.state.lock().unwrap().primary))
    }

    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        let state = self.state.lock().unwrap();
        let key = &state.keys[&state.primary];
        Ok(WrappedKey {
            key_ref: state.primary.clone(),
            key_id: state.primary.clone(),
            ciphertext: aead::seal(key, state.primary.as_bytes(), plaintext),
        })
    }

    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError> {
        if !self.state.lock().unwrap().keys.contains_key(key_ref) {
            // The key may have been added by another replica's operator moments ago.
            self.refresh()?;
        }
        let state = self.state.lock().unwrap();
        let key = state.keys.get(key_ref).ok_or_else(|| {
            BackendError::KeyNotFound(format!(
                "local key {key_ref:?} is not in {}; restore it from backup",
                self.path.display()
            ))
        })?;
        aead::open(key, key_ref.as_bytes(), ciphertext)
    }
}

fn new_entry() -> KeyEntry {
    let mut raw = Zeroizing::new([0u8; 32]);
    rand::thread_rng().fill_bytes(&mut *raw);
    let now = SystemTime::now();
    let mut suffix = [0u8; 3];
    rand::thread_rng().fill_bytes(&mut suffix);
    let stamp = humantime::format_rfc3339_seconds(now).to_string();
    let compact: String = stamp
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    KeyEntry {
        name: format!("k{}-{}", compact.to_lowercase(), hex::encode(suffix)),
        created: stamp,
        key: B64.encode(*raw),
    }
}

fn serialize(file: &KeyFile) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(serde_json::to_vec_pretty(file).expect("key file serializes"));
    out.push(b'\n');
    out
}

/// Creates a new key file holding one key. Refuses to overwrite an existing file.
pub fn create_key_file(path: &Path) -> Result<String, BackendError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| {
            BackendError::Config(format!("cannot create directory {}: {e}", parent.display()))
        })?;
    }
    let entry = new_entry();
    let name = entry.name.clone();
    let bytes = serialize(&KeyFile {
        version: FILE_FORMAT_VERSION,
        keys: vec![entry],
    });
    // Written complete or not at all: an empty key file left by a full disk would stop every later
    // start (and zero-configuration mode would never recreate it).
    crate::fsutil::create_atomic(path, &bytes, 0o600).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            BackendError::Config(format!(
                "{} already exists; refusing to overwrite a key file (use `keygen --add` to rotate)",
                path.display()
            ))
        } else {
            BackendError::Config(format!("cannot create {}: {e}", path.display()))
        }
    })?;
    Ok(name)
}

/// Appends a new primary key to an existing key file, atomically (write a temporary file, fsync,
/// rename). Returns the new key's name.
pub fn add_key(path: &Path) -> Result<String, BackendError> {
    let text = Zeroizing::new(fs::read_to_string(path).map_err(|e| {
        BackendError::Config(format!("cannot read key file {}: {e}", path.display()))
    })?);
    let mut file: KeyFile = serde_json::from_str(&text).map_err(|e| {
        BackendError::Config(format!("{} is not a valid key file: {e}", path.display()))
    })?;
    // Validate before touching anything.
    parse_key_file(path)?;
    let entry = new_entry();
    let name = entry.name.clone();
    file.keys.push(entry);
    crate::fsutil::write_atomic(path, &serialize(&file), 0o600)
        .map_err(|e| BackendError::Config(format!("cannot update {}: {e}", path.display())))?;
    Ok(name)
}

/// Mode bits of a key file, for warnings about group/world access.
pub fn file_mode(path: &Path) -> Option<u32> {
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keygen_rotate_and_unwrap_old() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/kek.json");
        let first = create_key_file(&path).unwrap();
        assert_eq!(file_mode(&path), Some(0o600));
        assert!(create_key_file(&path)
            .unwrap_err()
            .to_string()
            .contains("refusing to overwrite"));
        let b = LocalBackend::open(&path).unwrap();
        assert_eq!(b.current_key().await.unwrap().key_id, first);
        let w1 = b.wrap(b"one").await.unwrap();
        let second = add_key(&path).unwrap();
        assert_ne!(first, second);
        assert_eq!(b.current_key().await.unwrap().key_id, second);
        assert_eq!(file_mode(&path), Some(0o600));
        let w2 = b.wrap(b"two").await.unwrap();
        assert_eq!(w2.key_ref, second);
        assert_eq!(
            &*b.unwrap(&w1.key_ref, &w1.ciphertext).await.unwrap(),
            b"one"
        );
        assert_eq!(
            &*b.unwrap(&w2.key_ref, &w2.ciphertext).await.unwrap(),
            b"two"
        );
        let err = b.unwrap("nope", &w2.ciphertext).await.unwrap_err();
        assert!(matches!(err, BackendError::KeyNotFound(_)));
    }

    #[test]
    fn missing_or_bad_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = LocalBackend::open(dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("kms-plugin keygen"), "{err}");
        let bad = dir.path().join("bad");
        fs::write(
            &bad,
            "{\"version\":1,\"keys\":[{\"name\":\"a\",\"created\":\"x\",\"key\":\"c2hvcnQ=\"}]}",
        )
        .unwrap();
        let err = LocalBackend::open(&bad).unwrap_err().to_string();
        assert!(err.contains("expected 32"), "{err}");
        assert!(
            !err.contains("c2hvcnQ"),
            "error must not echo key material: {err}"
        );
    }
}
