//! The UNIX socket: address parsing, safe binding, permissions, and clean removal.
//!
//! Binding never steals a live plugin's socket: if the path exists and something answers on it, we
//! refuse; if nothing answers it is a stale leftover (crash, kill -9) and is replaced. The socket is
//! bound at its configured path (the name peers see), given its mode and group, and only then put
//! into listening state, so it is never reachable with looser permissions. A lock file next to it stops two instances racing for one path.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A socket file.
    Path(PathBuf),
    /// A Linux abstract socket (`unix:///@name`), which has no file and no permissions.
    Abstract(String),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = if let Some(r) = s.strip_prefix("unix://") {
            r
        } else if let Some(r) = s.strip_prefix("unix:") {
            r
        } else if s.contains("://") {
            return Err(format!(
                "{s:?} is not a unix:// address; use unix:///path/kms.sock or unix:///@name"
            ));
        } else {
            s
        };
        // unix:///@name and unix://@name both mean the abstract socket `name`.
        let rest = rest
            .strip_prefix("/@")
            .map(|n| format!("@{n}"))
            .unwrap_or_else(|| rest.to_string());
        if let Some(name) = rest.strip_prefix('@') {
            if name.is_empty() || name.len() > 100 {
                return Err(format!("abstract socket name in {s:?} must be 1-100 bytes"));
            }
            return Ok(ListenAddr::Abstract(name.to_string()));
        }
        if !rest.starts_with('/') {
            return Err(format!(
                "socket path in {s:?} must be absolute, e.g. unix:///var/run/kms-plugin/kms.sock"
            ));
        }
        if rest.len() > 100 {
            return Err(format!(
                "socket path in {s:?} is {} bytes; UNIX socket paths are limited to about 100",
                rest.len()
            ));
        }
        Ok(ListenAddr::Path(PathBuf::from(rest)))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Path(p) => write!(f, "unix://{}", p.display()),
            ListenAddr::Abstract(n) => write!(f, "unix:///@{n}"),
        }
    }
}

/// Permissions of a socket file.
#[derive(Clone, Debug)]
pub struct SocketOptions {
    pub mode: u32,
    /// Group name or numeric id to own the socket (so a non-root apiserver group can connect).
    pub group: Option<String>,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            mode: 0o600,
            group: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another process is serving on {0}; refusing to take over a live socket (stop the other instance first)")]
    InUse(String),
    #[error("{path} exists and is not a socket; refusing to remove it (check --listen)")]
    NotASocket { path: String },
    #[error("another kms-plugin instance holds the lock {0}; stop it first")]
    Locked(String),
    #[error("unknown group {0:?} for --socket-group")]
    UnknownGroup(String),
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SocketError + 'a {
    move |source| SocketError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

/// A bound listener. Dropping it removes the socket file (if it is still ours) and the lock file.
pub struct BoundSocket {
    pub listener: tokio::net::UnixListener,
    pub addr: ListenAddr,
    cleanup: Option<Cleanup>,
}

struct Cleanup {
    socket: PathBuf,
    inode: u64,
    lock_path: PathBuf,
    _lock: nix::fcntl::Flock<fs::File>,
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if let Some(c) = self.cleanup.take() {
            // Only remove the path if it is still the socket we created.
            if fs::symlink_metadata(&c.socket)
                .map(|m| m.ino() == c.inode)
                .unwrap_or(false)
            {
                let _ = fs::remove_file(&c.socket);
            }
            let _ = fs::remove_file(&c.lock_path);
        }
    }
}

fn resolve_gid(group: &str) -> Result<u32, SocketError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(SocketError::UnknownGroup(group.to_string())),
    }
}

/// Binds the listener. Must be called inside a tokio runtime.
pub fn bind(addr: &ListenAddr, options: &SocketOptions) -> Result<BoundSocket, SocketError> {
    match addr {
        ListenAddr::Abstract(name) => bind_abstract(name).map(|listener| BoundSocket {
            listener,
            addr: addr.clone(),
            cleanup: None,
        }),
        ListenAddr::Path(path) => bind_path(path, options).map(|(listener, cleanup)| BoundSocket {
            listener,
            addr: addr.clone(),
            cleanup: Some(cleanup),
        }),
    }
}

fn bind_abstract(name: &str) -> Result<tokio::net::UnixListener, SocketError> {
    use std::os::linux::net::SocketAddrExt;
    let sa = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(io_err("use abstract socket name", Path::new(name)))?;
    let std_listener = std::os::unix::net::UnixListener::bind_addr(&sa).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            SocketError::InUse(format!("unix:///@{name}"))
        } else {
            SocketError::Io {
                action: "bind abstract socket",
                path: format!("@{name}"),
                source: e,
            }
        }
    })?;
    std_listener
        .set_nonblocking(true)
        .map_err(io_err("configure", Path::new(name)))?;
    tokio::net::UnixListener::from_std(std_listener).map_err(io_err("register", Path::new(name)))
}

fn bind_path(
    path: &Path,
    options: &SocketOptions,
) -> Result<(tokio::net::UnixListener, Cleanup), SocketError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let gid = options.group.as_deref().map(resolve_gid).transpose()?;

    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let lock_file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err("open lock file", &lock_path))?;
    let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| SocketError::Locked(lock_path.display().to_string()))?;

    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket {
                path: path.display().to_string(),
            })
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse(path.display().to_string())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::warn!(path = %path.display(), "removing stale socket left by a previous process");
                fs::remove_file(path).map_err(io_err("remove stale socket", path))?;
            }
            Err(e) => {
                return Err(SocketError::Io {
                    action: "probe existing socket",
                    path: path.display().to_string(),
                    source: e,
                })
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(SocketError::Io {
                action: "inspect",
                path: path.display().to_string(),
                source: e,
            })
        }
    }

    // Bind at the configured path (peers, and so apiserver errors, see the name a socket was bound
    // under), fix mode and group, and only then listen: until listen() a connect() is refused, so the
    // socket is never reachable with looser permissions.
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
        .map_err(io_err("create socket for", path))?;
    let addr = socket2::SockAddr::unix(path).map_err(io_err("bind", path))?;
    socket.bind(&addr).map_err(io_err("bind", path))?;
    let finish = || -> Result<u64, SocketError> {
        fs::set_permissions(path, fs::Permissions::from_mode(options.mode))
            .map_err(io_err("set mode of", path))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(path, None, Some(gid))
                .map_err(io_err("change group of", path))?;
        }
        socket.listen(1024).map_err(io_err("listen on", path))?;
        Ok(fs::symlink_metadata(path)
            .map_err(io_err("inspect", path))?
            .ino())
    };
    let inode = match finish() {
        Ok(inode) => inode,
        Err(e) => {
            let _ = fs::remove_file(path);
            return Err(e);
        }
    };
    let std_listener = std::os::unix::net::UnixListener::from(socket);
    std_listener
        .set_nonblocking(true)
        .map_err(io_err("configure", path))?;
    let listener =
        tokio::net::UnixListener::from_std(std_listener).map_err(io_err("register", path))?;
    Ok((
        listener,
        Cleanup {
            socket: path.to_path_buf(),
            inode,
            lock_path,
            _lock: lock,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "unix:///var/run/kms.sock".parse(),
            Ok(ListenAddr::Path("/var/run/kms.sock".into()))
        );
        assert_eq!(
            "/var/run/kms.sock".parse(),
            Ok(ListenAddr::Path("/var/run/kms.sock".into()))
        );
        assert_eq!(
            "unix:///@kms".parse(),
            Ok(ListenAddr::Abstract("kms".into()))
        );
        assert_eq!(
            "unix://@kms".parse(),
            Ok(ListenAddr::Abstract("kms".into()))
        );
        assert_eq!("@kms".parse(), Ok(ListenAddr::Abstract("kms".into())));
        assert!("tcp://127.0.0.1:1".parse::<ListenAddr>().is_err());
        assert!("unix://relative/kms.sock".parse::<ListenAddr>().is_err());
        assert!("unix:///@".parse::<ListenAddr>().is_err());
        assert_eq!(ListenAddr::Abstract("a".into()).to_string(), "unix:///@a");
    }

    #[tokio::test]
    async fn binds_with_mode_refuses_live_and_replaces_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/kms.sock");
        let addr = ListenAddr::Path(path.clone());
        let bound = bind(&addr, &SocketOptions::default()).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second instance is refused by the lock.
        assert!(matches!(
            bind(&addr, &SocketOptions::default()),
            Err(SocketError::Locked(_))
        ));
        drop(bound);
        assert!(!path.exists(), "socket removed on drop");

        // A stale socket (nobody listening) is replaced.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let bound = bind(
            &addr,
            &SocketOptions {
                mode: 0o660,
                group: None,
            },
        )
        .unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o660
        );
        drop(bound);

        // A live socket of another process (no lock file) is refused.
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = bind(&addr, &SocketOptions::default()).err().unwrap();
        assert!(matches!(err, SocketError::InUse(_)), "{err}");
        drop(live);

        // A regular file is never removed.
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            bind(&addr, &SocketOptions::default()),
            Err(SocketError::NotASocket { .. })
        ));
        assert!(path.exists());
    }

    #[tokio::test]
    async fn abstract_socket_in_use_is_refused() {
        let name = format!("kms-plugin-test-{}", std::process::id());
        let addr = ListenAddr::Abstract(name);
        let _first = bind(&addr, &SocketOptions::default()).unwrap();
        assert!(matches!(
            bind(&addr, &SocketOptions::default()),
            Err(SocketError::InUse(_))
        ));
    }
}
