//! Crash-safe file writes for key files and state (tokens): never a half-written file.
//!
//! The temporary file comes from `tempfile`: a random name in the target's directory, opened with
//! `O_CREAT|O_EXCL`, so a symlink or file planted at that name is never followed or reused.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename over
/// the target, fsync the directory. On any error the old file is untouched. A new file gets `mode`;
/// an existing file keeps its mode and owner (the operator's choice survives a rewrite).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    place(path, bytes, mode, Placement::Replace, RANDOM_NAME_LEN)
}

/// Like [`write_atomic`] but fails with `AlreadyExists` instead of replacing an existing file. The
/// file appears complete or not at all: a full disk or a crash never leaves an empty or truncated
/// file at `path` (a no-replace rename of the finished temporary file is the atomic step).
pub fn create_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    place(path, bytes, mode, Placement::CreateNew, RANDOM_NAME_LEN)
}

/// An exclusive `flock` on a directory, held until dropped. Read-modify-write cycles on files in
/// that directory (`keygen --add`) take it so two concurrent writers both land instead of the
/// second rename silently discarding the first one's change. Locking the directory rather than
/// the file matters: the file's inode is replaced by every atomic rename.
#[derive(Debug)]
pub struct DirLock {
    _lock: nix::fcntl::Flock<fs::File>,
}

/// Blocks until the exclusive lock on `dir` is held.
pub fn lock_dir(dir: &Path) -> io::Result<DirLock> {
    let file = fs::File::open(dir)?;
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| io::Error::from(errno))?;
    Ok(DirLock { _lock: lock })
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

const RANDOM_NAME_LEN: usize = 12;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Placement {
    Replace,
    CreateNew,
}

fn place(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    placement: Placement,
    random_len: usize,
) -> io::Result<()> {
    let dir = parent_dir(path);
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    // Mode and owner of the file being replaced, if any (a dangling or absent target has none).
    let existing = match placement {
        Placement::Replace => fs::metadata(path).ok(),
        Placement::CreateNew => None,
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", file_name.to_string_lossy()))
        .suffix(".tmp")
        .rand_bytes(random_len)
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(&dir)?;
    let file = tmp.as_file_mut();
    match &existing {
        Some(meta) => {
            if meta.uid() != file.metadata()?.uid() || meta.gid() != file.metadata()?.gid() {
                std::os::unix::fs::fchown(&*file, Some(meta.uid()), Some(meta.gid())).map_err(
                    |e| {
                        io::Error::new(
                            e.kind(),
                            format!(
                                "cannot keep owner {}:{} of {}: {e}; run as that user or root",
                                meta.uid(),
                                meta.gid(),
                                path.display()
                            ),
                        )
                    },
                )?;
            }
            file.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        }
        // Explicit: the umask must not change the requested mode.
        None => file.set_permissions(fs::Permissions::from_mode(mode))?,
    }
    file.write_all(bytes)?;
    file.sync_all()?;
    // On error the temporary file is removed when `tmp` (inside the error) is dropped.
    match placement {
        Placement::Replace => tmp.persist(path).map_err(|e| e.error)?,
        Placement::CreateNew => tmp.persist_noclobber(path).map_err(|e| e.error)?,
    };
    fs::File::open(&dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn create_atomic_never_overwrites_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        create_atomic(&path, b"one", 0o600).unwrap();
        let err = create_atomic(&path, b"two", 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(mode_of(&path), 0o600);
        write_atomic(&path, b"three", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"three");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temporary files left behind");
    }

    #[test]
    fn rewrite_keeps_the_operators_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        create_atomic(&path, b"one", 0o600).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(mode_of(&path), 0o640);
        // A new file gets exactly the requested mode, whatever the umask.
        let fresh = dir.path().join("g");
        write_atomic(&fresh, b"x", 0o600).unwrap();
        assert_eq!(mode_of(&fresh), 0o600);
    }

    #[test]
    fn planted_symlinks_at_temporary_names_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let path = dir.path().join("kek.json");
        create_atomic(&path, b"one", 0o600).unwrap();

        // The name the previous implementation used (pid-based, predictable).
        let old_name = dir
            .path()
            .join(format!(".kek.json.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &old_name).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(fs::symlink_metadata(&old_name)
            .unwrap()
            .file_type()
            .is_symlink());

        // Even a symlink at the exact temporary name (forced here by a name without random part)
        // is refused, not followed: the open is O_EXCL.
        for (placement, name) in [
            (Placement::Replace, "kek.json"),
            (Placement::CreateNew, "new.json"),
        ] {
            let exact = dir.path().join(format!(".{name}..tmp"));
            std::os::unix::fs::symlink(&victim, &exact).unwrap();
            let target = dir.path().join(name);
            let err = place(&target, b"three", 0o600, placement, 0).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        }
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert!(!dir.path().join("new.json").exists());
    }

    #[test]
    fn directory_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_dir(dir.path()).unwrap();
        let file = fs::File::open(dir.path()).unwrap();
        let busy =
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err();
        assert!(
            busy,
            "a second exclusive lock was granted while one is held"
        );
        drop(held);
        let file = fs::File::open(dir.path()).unwrap();
        assert!(nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok());
    }
}
