//! The local key-file backend (the embedded default).
//!
//! The file holds one or more named 256-bit keys. The last key is primary (it wraps); every key in the
//! file unwraps, so rotating is appending a key (`kms-plugin keygen --add FILE`). The file is re-read
//! when it changes (device, inode, size, mtime or ctime), which the engine's probe triggers, so a
//! rotation is picked up without a restart.
//!
//! A reload never loses or silently replaces a loaded key: a key removed from the file stays usable
//! until the process restarts (warned about, and exported as a metric), and a file that gives a
//! loaded key name other bytes is refused as a whole (the loaded keys stay; the conflict is logged
//! and exported). Writers (`keygen`, `keygen --add`) hold a lock on the directory and replace the
//! file atomically, so concurrent rotations both land.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
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

/// Identifies one version of the key file. mtime and size alone miss a same-size replacement
/// (within the timestamp granularity, or with the mtime set back); a rename into place changes the
/// inode, and every write or rename changes the ctime, which cannot be set back.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn file_stamp(path: &Path) -> Option<FileStamp> {
    let meta = fs::metadata(path).ok()?;
    Some(FileStamp {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        ctime: (meta.ctime(), meta.ctime_nsec()),
    })
}

type KeyMap = HashMap<String, Zeroizing<[u8; 32]>>;

/// The keys of one read of the file.
struct ParsedFile {
    /// Name of the primary (newest) key.
    primary: String,
    keys: KeyMap,
}

struct LoadedKeys {
    /// Name of the primary (newest) key.
    primary: String,
    /// Every key loaded since start-up, including those no longer in the file.
    keys: KeyMap,
    /// The file version last looked at, whether it was loaded or refused.
    stamp: Option<FileStamp>,
    /// Loaded keys the file no longer holds.
    missing: BTreeSet<String>,
    /// The file on disk gives a loaded key other bytes, so it was not loaded.
    refused: bool,
}

/// How the key file relates to the loaded keys, for metrics and alerts. Names only, never bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyFileReport {
    /// Keys still usable from memory but no longer in the file: lost at the next restart.
    pub missing: Vec<String>,
    /// The last reload was refused because it changed a loaded key's bytes.
    pub reload_refused: bool,
    /// Key names that Decrypts asked for and the file still lacks (at most [`MAX_UNKNOWN`] tracked):
    /// typically another node already writes with a key not yet copied here.
    pub unknown_keys: usize,
    /// Unwraps refused because the file lacked the key they name, since start-up.
    pub unknown_key_unwraps: u64,
}

/// Bound on the unknown key names remembered: the name comes from a ciphertext, before any check.
const MAX_UNKNOWN: usize = 64;

/// Keys that Decrypts asked for and the file lacks (the lagging-node signal).
#[derive(Default)]
struct UnknownKeys {
    names: BTreeSet<String>,
    unwraps: u64,
}

/// See the module documentation.
pub struct LocalBackend {
    path: PathBuf,
    state: Mutex<LoadedKeys>,
    unknown: Mutex<UnknownKeys>,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn read_key_text(path: &Path) -> Result<Zeroizing<String>, BackendError> {
    Ok(Zeroizing::new(fs::read_to_string(path).map_err(|e| {
        BackendError::Config(format!(
            "cannot read local key file {}: {e}; create one with `kms-plugin keygen {}`",
            path.display(),
            path.display()
        ))
    })?))
}

fn parse_key_file(path: &Path) -> Result<(ParsedFile, Option<FileStamp>), BackendError> {
    // Stamp first: a change racing the read is seen again at the next refresh.
    let stamp = file_stamp(path);
    let text = read_key_text(path)?;
    let (_, parsed) = parse_key_text(&text, path)?;
    Ok((parsed, stamp))
}

/// Parses and validates a key file's text; returns the document (for rewriting) and its keys.
fn parse_key_text(text: &str, path: &Path) -> Result<(KeyFile, ParsedFile), BackendError> {
    let file: KeyFile = serde_json::from_str(text).map_err(|e| {
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
    Ok((file, ParsedFile { primary, keys }))
}

impl LocalBackend {
    /// Opens an existing key file. A missing file is an error: silently creating a new key would
    /// orphan every Secret encrypted under the old one.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, BackendError> {
        let path = path.into();
        let (parsed, stamp) = parse_key_file(&path)?;
        Ok(LocalBackend {
            path,
            state: Mutex::new(LoadedKeys {
                primary: parsed.primary,
                keys: parsed.keys,
                stamp,
                missing: BTreeSet::new(),
                refused: false,
            }),
            unknown: Mutex::new(UnknownKeys::default()),
        })
    }

    /// Names of keys that left the file and whether the file on disk was refused.
    pub fn key_file_report(&self) -> KeyFileReport {
        let state = self.lock();
        let mut unknown = self.lock_unknown();
        // A key that arrived since is no longer unknown, even before the next Decrypt asks for it.
        unknown.names.retain(|name| !state.keys.contains_key(name));
        KeyFileReport {
            missing: state.missing.iter().cloned().collect(),
            reload_refused: state.refused,
            unknown_keys: unknown.names.len(),
            unknown_key_unwraps: unknown.unwraps,
        }
    }

    fn lock_unknown(&self) -> std::sync::MutexGuard<'_, UnknownKeys> {
        self.unknown.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an unwrap refused for a key the file lacks; warns once per key name.
    fn note_unknown(&self, key_ref: &str) {
        let mut unknown = self.lock_unknown();
        unknown.unwraps += 1;
        if unknown.names.contains(key_ref) || unknown.names.len() >= MAX_UNKNOWN {
            return;
        }
        unknown.names.insert(key_ref.to_string());
        tracing::warn!(
            path = %self.path.display(),
            key = ?key_ref,
            "a Decrypt needs a local key that this node's key file does not hold: most likely another \
             control-plane node already encrypts with a key added there (keygen --add) and this file is \
             behind. Copy the newest key file to every node before any node writes with a new key \
             (docs/rotation.md); this node decrypts that data as soon as the file has the key."
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LoadedKeys> {
        // The state is replaced whole under the lock, so a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-reads the file if it changed. A file that became unreadable or invalid keeps the keys already
    /// loaded and reports the problem (an error, retried at every probe). A file that changes a
    /// loaded key's bytes is refused: the loaded keys stay in use and the conflict is reported once
    /// per file version (log) and for as long as it lasts (metric).
    fn refresh(&self) -> Result<(), BackendError> {
        let stamp = file_stamp(&self.path);
        let mut state = self.lock();
        if stamp.is_some() && stamp == state.stamp {
            return Ok(());
        }
        let (fresh, stamp) = parse_key_file(&self.path)?;
        let mut changed: Vec<&str> = fresh
            .keys
            .iter()
            .filter(|(name, key)| state.keys.get(*name).is_some_and(|old| old[..] != key[..]))
            .map(|(name, _)| name.as_str())
            .collect();
        if !changed.is_empty() {
            changed.sort_unstable();
            tracing::error!(
                path = %self.path.display(),
                keys = ?changed,
                "key file reload REFUSED: the file gives these already loaded key names different key bytes. \
                 Still using the keys loaded before. Data wrapped by the loaded keys needs their original bytes: \
                 restore them in the file from backup (a new key must get a new name: `kms-plugin keygen --add`). \
                 Until then a restart would load the changed bytes and lose that data."
            );
            state.stamp = stamp;
            state.refused = true;
            return Ok(());
        }
        // Keep keys that disappeared from the file: data wrapped by them may still be in use.
        let missing: BTreeSet<String> = state
            .keys
            .keys()
            .filter(|name| !fresh.keys.contains_key(*name))
            .cloned()
            .collect();
        let newly: Vec<&String> = missing.difference(&state.missing).collect();
        if !newly.is_empty() {
            tracing::warn!(
                path = %self.path.display(),
                keys = ?newly,
                "keys REMOVED from the key file are still used from memory, but only until this process \
                 restarts: after that, data wrapped by them cannot be decrypted. Put them back in the file \
                 unless every Secret has been re-encrypted under a newer key."
            );
        }
        let mut keys = std::mem::take(&mut state.keys);
        keys.extend(fresh.keys);
        *state = LoadedKeys {
            primary: fresh.primary,
            keys,
            stamp,
            missing,
            refused: false,
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
        Ok(Self::identity(&self.lock().primary))
    }

    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        let state = self.lock();
        let key = &state.keys[&state.primary];
        Ok(WrappedKey {
            key_ref: state.primary.clone(),
            key_id: state.primary.clone(),
            ciphertext: aead::seal(key, state.primary.as_bytes(), plaintext),
        })
    }

    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError> {
        if !self.lock().keys.contains_key(key_ref) {
            // The key may have been added by another replica's operator moments ago.
            self.refresh()?;
        }
        let state = self.lock();
        let Some(key) = state.keys.get(key_ref) else {
            drop(state);
            self.note_unknown(key_ref);
            return Err(BackendError::KeyNotFound(format!(
                "local key {key_ref:?} is not in {}; if another node added it, copy that node's key file \
                 here (docs/rotation.md), else restore the key from backup",
                self.path.display()
            )));
        };
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

/// Takes the writers' lock on the key file's directory (see [`crate::fsutil::DirLock`]).
fn lock_key_dir(path: &Path) -> Result<crate::fsutil::DirLock, BackendError> {
    let dir = crate::fsutil::parent_dir(path);
    crate::fsutil::lock_dir(&dir).map_err(|e| {
        BackendError::Config(format!(
            "cannot lock directory {} to write {}: {e}",
            dir.display(),
            path.display()
        ))
    })
}

/// Creates a new key file holding one key. Refuses to overwrite an existing file.
pub fn create_key_file(path: &Path) -> Result<String, BackendError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| {
            BackendError::Config(format!("cannot create directory {}: {e}", parent.display()))
        })?;
    }
    let _lock = lock_key_dir(path)?;
    let entry = new_entry();
    let name = entry.name.clone();
    let bytes = serialize(&KeyFile {
        version: FILE_FORMAT_VERSION,
        keys: vec![entry],
    });
    // Written complete or not at all: an empty key file left by a full disk would stop every later
    // start (and the development mode would never recreate it).
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
/// rename) and under the directory lock, so concurrent additions all land. The file keeps its
/// mode and owner. Returns the new key's name.
pub fn add_key(path: &Path) -> Result<String, BackendError> {
    let _lock = lock_key_dir(path)?;
    let text = read_key_text(path)?;
    // Validate before touching anything.
    let (mut file, parsed) = parse_key_text(&text, path)?;
    let entry = loop {
        let entry = new_entry();
        if !parsed.keys.contains_key(&entry.name) {
            break entry;
        }
    };
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

    /// Replaces the file by a rename after editing its JSON; returns the new text.
    fn rewrite(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
        edit(&mut v);
        let text = serde_json::to_vec_pretty(&v).unwrap();
        let tmp = path.with_extension("edited");
        fs::write(&tmp, &text).unwrap();
        fs::rename(&tmp, path).unwrap();
        text
    }

    fn restore(path: &Path, text: &[u8]) {
        let tmp = path.with_extension("restored");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, path).unwrap();
    }

    /// A node whose file is behind: data under a key added on another node is refused and counted
    /// until the file arrives, then decrypts without a restart and the signal clears.
    #[tokio::test]
    async fn a_key_added_on_another_node_is_reported_until_the_file_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let ahead = dir.path().join("ahead.json");
        let behind = dir.path().join("behind.json");
        create_key_file(&ahead).unwrap();
        fs::copy(&ahead, &behind).unwrap();
        let lagging = LocalBackend::open(&behind).unwrap();
        let new = add_key(&ahead).unwrap();
        let w = LocalBackend::open(&ahead)
            .unwrap()
            .wrap(b"new")
            .await
            .unwrap();
        assert_eq!(w.key_ref, new);
        for _ in 0..2 {
            let err = lagging.unwrap(&w.key_ref, &w.ciphertext).await.unwrap_err();
            assert!(matches!(err, BackendError::KeyNotFound(_)));
            assert!(
                err.to_string().contains("copy that node's key file"),
                "{err}"
            );
        }
        let report = lagging.key_file_report();
        assert_eq!((report.unknown_keys, report.unknown_key_unwraps), (1, 2));

        // The file arrives: the probe's reload (or the next unwrap) loads it and the gauge clears.
        fs::copy(&ahead, &behind).unwrap();
        assert_eq!(lagging.current_key().await.unwrap().key_id, new);
        let report = lagging.key_file_report();
        assert_eq!((report.unknown_keys, report.unknown_key_unwraps), (0, 2));
        assert_eq!(
            &*lagging.unwrap(&w.key_ref, &w.ciphertext).await.unwrap(),
            b"new"
        );
    }

    #[tokio::test]
    async fn unknown_key_names_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.json");
        create_key_file(&path).unwrap();
        let b = LocalBackend::open(&path).unwrap();
        for i in 0..(MAX_UNKNOWN + 10) {
            b.unwrap(&format!("junk-{i}"), b"x").await.unwrap_err();
        }
        let report = b.key_file_report();
        assert_eq!(report.unknown_keys, MAX_UNKNOWN);
        assert_eq!(report.unknown_key_unwraps, (MAX_UNKNOWN + 10) as u64);
    }

    #[tokio::test]
    async fn a_removed_key_stays_usable_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.json");
        let first = create_key_file(&path).unwrap();
        let b = LocalBackend::open(&path).unwrap();
        let w1 = b.wrap(b"one").await.unwrap();
        let second = add_key(&path).unwrap();
        assert_eq!(b.current_key().await.unwrap().key_id, second);
        assert_eq!(b.key_file_report(), KeyFileReport::default());
        let both = fs::read(&path).unwrap();

        rewrite(&path, |v| {
            v["keys"].as_array_mut().unwrap().remove(0);
        });
        assert_eq!(b.current_key().await.unwrap().key_id, second);
        assert_eq!(
            b.key_file_report(),
            KeyFileReport {
                missing: vec![first.clone()],
                ..KeyFileReport::default()
            }
        );
        assert_eq!(
            &*b.unwrap(&w1.key_ref, &w1.ciphertext).await.unwrap(),
            b"one"
        );

        // Put back: no longer reported.
        restore(&path, &both);
        b.current_key().await.unwrap();
        assert_eq!(b.key_file_report(), KeyFileReport::default());
    }

    #[tokio::test]
    async fn a_reload_that_changes_a_keys_bytes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.json");
        let first = create_key_file(&path).unwrap();
        let original = fs::read(&path).unwrap();
        let b = LocalBackend::open(&path).unwrap();
        let w1 = b.wrap(b"one").await.unwrap();

        // Same name, other bytes, plus a new key that would become primary.
        rewrite(&path, |v| {
            let keys = v["keys"].as_array_mut().unwrap();
            keys[0]["key"] = serde_json::Value::String(B64.encode([7u8; 32]));
            let mut extra = keys[0].clone();
            extra["name"] = serde_json::Value::String("k-new".into());
            keys.push(extra);
        });
        assert_eq!(
            b.current_key().await.unwrap().key_id,
            first,
            "reload not refused"
        );
        assert!(b.key_file_report().reload_refused);
        // The loaded bytes are still the ones in use, for unwrap and for wrap.
        assert_eq!(
            &*b.unwrap(&w1.key_ref, &w1.ciphertext).await.unwrap(),
            b"one"
        );
        let w2 = b.wrap(b"two").await.unwrap();
        assert!(b.unwrap("k-new", &w2.ciphertext).await.is_err());
        // Asking again changes nothing (the refused version is remembered, not re-applied).
        assert_eq!(b.current_key().await.unwrap().key_id, first);

        // The operator restores the original bytes and keeps the new key: accepted.
        rewrite(&path, |v| {
            let orig: serde_json::Value = serde_json::from_slice(&original).unwrap();
            v["keys"][0]["key"] = orig["keys"][0]["key"].clone();
        });
        assert_eq!(b.current_key().await.unwrap().key_id, "k-new");
        // The refused unwrap of k-new above stays counted; k-new itself is no longer unknown.
        assert_eq!(
            b.key_file_report(),
            KeyFileReport {
                unknown_key_unwraps: 1,
                ..KeyFileReport::default()
            }
        );
        assert_eq!(
            &*b.unwrap(&w2.key_ref, &w2.ciphertext).await.unwrap(),
            b"two"
        );
    }

    #[tokio::test]
    async fn a_same_size_replacement_with_the_same_mtime_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.json");
        let first = create_key_file(&path).unwrap();
        let b = LocalBackend::open(&path).unwrap();
        let before = fs::metadata(&path).unwrap();

        // Another key whose name has the same length: the file size does not change.
        let mut other = first.clone().into_bytes();
        let last = other.last_mut().unwrap();
        *last = if *last == b'0' { b'1' } else { b'0' };
        let other = String::from_utf8(other).unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        v["keys"][0]["name"] = serde_json::Value::String(other.clone());
        v["keys"][0]["key"] = serde_json::Value::String(B64.encode([9u8; 32]));
        let text = serialize(&serde_json::from_value(v).unwrap());
        let tmp = dir.path().join("replacement");
        fs::write(&tmp, &*text).unwrap();
        let f = fs::File::options().write(true).open(&tmp).unwrap();
        f.set_modified(before.modified().unwrap()).unwrap();
        drop(f);
        fs::rename(&tmp, &path).unwrap();
        let after = fs::metadata(&path).unwrap();
        assert_eq!(after.len(), before.len());
        assert_eq!(after.modified().unwrap(), before.modified().unwrap());

        assert_eq!(b.current_key().await.unwrap().key_id, other);
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
