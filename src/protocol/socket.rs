//! The UNIX socket: address parsing, safe binding, permissions, and clean removal.
//!
//! Binding never steals a live plugin's socket: if the path exists and something answers on it, we
//! refuse; if nothing answers it is a stale leftover (crash, kill -9) and is replaced. The socket is
//! bound at its configured path (the name peers see), given its mode and group, and only then put
//! into listening state, so it is never reachable with looser permissions. A lock file next to it
//! stops two instances racing for one path.
//!
//! [`Incoming`] is the accept loop: connection cap, back-off when file descriptors run out, and
//! per-connection handshake and idle timeouts around the `:authority` shim.

use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::{Connected, UdsConnectInfo};

use super::authority::{AuthorityShim, Limits, ShimCounters};

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

/// A socket in a directory others can write to (e.g. /tmp, the original Akeyless plugin's default)
/// can be bound first by another local user, who then receives the apiserver's plaintext DEKs.
fn warn_if_shared_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(dir) {
        let mode = meta.permissions().mode();
        if mode & 0o022 != 0 {
            tracing::warn!(
                dir = %dir.display(),
                mode = format!("{:o}", mode & 0o7777),
                "SOCKET DIRECTORY IS WRITABLE BY GROUP OR OTHERS: another local user could bind the \
                 KMS socket before the plugin and receive the apiserver's plaintext keys; move the \
                 socket to a directory only the plugin's user can write (e.g. --listen \
                 unix:///var/run/kms-plugin/kms.sock, or AKEYLESS_UNIX_SOCKET in drop-in mode) and \
                 point the EncryptionConfiguration endpoint there"
            );
        }
    }
}

fn bind_path(
    path: &Path,
    options: &SocketOptions,
) -> Result<(tokio::net::UnixListener, Cleanup), SocketError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    warn_if_shared_dir(dir);
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

/// Connection-level counters of one server, read by the metrics.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    open: AtomicUsize,
    accepted: AtomicU64,
    refused: AtomicU64,
    accept_backoffs: AtomicU64,
    handshake_timeouts: AtomicU64,
    idle_closed: AtomicU64,
    /// Counters of the `:authority` shim on these connections.
    pub shim: Arc<ShimCounters>,
}

impl ConnectionStats {
    /// Connections currently open.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
    /// Connections closed right after accept because `max_connections` were open.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
    /// Pauses of the accept loop because the process or system ran out of file descriptors
    /// (EMFILE, ENFILE) or socket memory (ENOBUFS, ENOMEM).
    pub fn accept_backoffs(&self) -> u64 {
        self.accept_backoffs.load(Ordering::Relaxed)
    }
    /// Connections closed because no HTTP/2 preface arrived in time.
    pub fn handshake_timeouts(&self) -> u64 {
        self.handshake_timeouts.load(Ordering::Relaxed)
    }
    /// Connections closed after `idle_timeout` without a call.
    pub fn idle_closed(&self) -> u64 {
        self.idle_closed.load(Ordering::Relaxed)
    }
}

/// Limits applied to accepted connections before HTTP/2 sees them.
#[derive(Debug, Clone)]
pub struct AcceptOptions {
    /// Connections open at once; more are closed right after accept.
    pub max_connections: usize,
    /// Time a new connection has to send the 24-byte HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// A connection without a call in flight for this long is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Limits of the `:authority` shim, matching the HTTP/2 server's settings.
    pub shim: Limits,
}

/// First and longest pause after an accept error caused by resource exhaustion.
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The accept loop as a stream of connections for tonic. Never yields an error: transient accept
/// errors are skipped, and fd or memory exhaustion pauses accepting (doubling up to 1 s) instead
/// of spinning on a listener that stays readable; waiting clients stay in the kernel backlog.
pub struct Incoming {
    listener: tokio::net::UnixListener,
    options: AcceptOptions,
    stats: Arc<ConnectionStats>,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
    delay: Duration,
}

impl Incoming {
    pub fn new(
        listener: tokio::net::UnixListener,
        options: AcceptOptions,
        stats: Arc<ConnectionStats>,
    ) -> Self {
        Self {
            listener,
            options,
            stats,
            backoff: None,
            delay: BACKOFF_MIN,
        }
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    )
}

/// The errno values of resource exhaustion (from nix, to avoid a libc dependency).
mod libc_errno {
    use nix::errno::Errno;
    pub const EMFILE: i32 = Errno::EMFILE as i32;
    pub const ENFILE: i32 = Errno::ENFILE as i32;
    pub const ENOBUFS: i32 = Errno::ENOBUFS as i32;
    pub const ENOMEM: i32 = Errno::ENOMEM as i32;
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(sleep) = this.backoff.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                this.backoff = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, _)) => {
                    this.delay = BACKOFF_MIN;
                    let open = this.stats.open.load(Ordering::Relaxed);
                    if open >= this.options.max_connections {
                        let refused = this.stats.refused.fetch_add(1, Ordering::Relaxed);
                        // One line per thousand refusals: a flood must not flood the log too.
                        if refused.is_multiple_of(1000) {
                            tracing::warn!(
                                open,
                                limit = this.options.max_connections,
                                refused_so_far = refused + 1,
                                "connection refused: --max-connections reached (raise it if this is a legitimate client)"
                            );
                        }
                        drop(stream);
                        continue;
                    }
                    this.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    return Poll::Ready(Some(Ok(Connection::new(
                        stream,
                        &this.options,
                        this.stats.clone(),
                    ))));
                }
                Err(e) if is_resource_exhaustion(&e) => {
                    this.stats.accept_backoffs.fetch_add(1, Ordering::Relaxed);
                    if this.delay == BACKOFF_MIN {
                        tracing::warn!(error = %e, open = this.stats.open(), "cannot accept connections: out of file descriptors or memory; pausing accept (raise the fd limit, e.g. LimitNOFILE, or lower --max-connections)");
                    } else {
                        tracing::debug!(error = %e, pause = ?this.delay, "accept still failing; pausing");
                    }
                    this.backoff = Some(Box::pin(tokio::time::sleep(this.delay)));
                    this.delay = (this.delay * 2).min(BACKOFF_MAX);
                }
                Err(e) => {
                    // ECONNABORTED and the like concern one client only.
                    tracing::debug!(error = %e, "accept failed");
                }
            }
        }
    }
}

/// Calls in flight on one connection and when the last one ended, shared with the request layer
/// (through the connection's `ConnectInfo`) so the connection can tell when it is idle.
#[derive(Debug)]
pub struct Activity {
    start: tokio::time::Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `start` at which the last call began or ended.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Marks a call in flight until the guard is dropped.
    pub fn call(self: &Arc<Self>) -> CallGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        CallGuard(self.clone())
    }

    /// When the connection became idle, or `None` while a call is in flight.
    fn idle_since(&self) -> Option<tokio::time::Instant> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

pub struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What tonic puts in each request's extensions for a [`Connection`].
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub activity: Arc<Activity>,
    pub peer: UdsConnectInfo,
}

/// One accepted connection: the `:authority` shim over the socket, plus the handshake and idle
/// timeouts and this connection's slot in the connection count.
pub struct Connection {
    shim: AuthorityShim<tokio::net::UnixStream>,
    stats: Arc<ConnectionStats>,
    activity: Arc<Activity>,
    /// Until the preface has arrived.
    handshake: Option<Pin<Box<tokio::time::Sleep>>>,
    preface_left: usize,
    idle_timeout: Option<Duration>,
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Connection {
    fn new(
        stream: tokio::net::UnixStream,
        options: &AcceptOptions,
        stats: Arc<ConnectionStats>,
    ) -> Self {
        stats.open.fetch_add(1, Ordering::Relaxed);
        let shim =
            AuthorityShim::with_limits(stream, options.shim).with_counters(stats.shim.clone());
        Self {
            shim,
            stats,
            activity: Arc::new(Activity::new()),
            handshake: Some(Box::pin(tokio::time::sleep(options.handshake_timeout))),
            preface_left: crate::protocol::authority::frame::PREFACE.len(),
            idle_timeout: options.idle_timeout,
            idle: None,
        }
    }

    /// Whether the idle timer says to close. The timer is only looked at when it fires, so a
    /// busy connection pays nothing per read.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(timeout) = self.idle_timeout else {
            return false;
        };
        let sleep = self
            .idle
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let now = tokio::time::Instant::now();
            let deadline = match self.activity.idle_since() {
                Some(since) => since + timeout,
                None => now + timeout,
            };
            if deadline <= now {
                return true;
            }
            sleep.as_mut().reset(deadline);
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.shim).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if this.handshake.is_some() {
                    let n = buf.filled().len() - before;
                    this.preface_left = this.preface_left.saturating_sub(n);
                    if this.preface_left == 0 {
                        this.handshake = None;
                    }
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                if let Some(h) = this.handshake.as_mut() {
                    if h.as_mut().poll(cx).is_ready() {
                        this.stats
                            .handshake_timeouts
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("closing a connection that sent no HTTP/2 preface in time");
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no HTTP/2 preface within the handshake timeout",
                        )));
                    }
                }
                if this.poll_idle(cx) {
                    this.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("closing an idle connection");
                    // End of stream: h2 closes the connection; no call is in flight on it.
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().shim).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().shim).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.shim.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().shim).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().shim).poll_shutdown(cx)
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo {
            activity: self.activity.clone(),
            peer: self.shim.connect_info(),
        }
    }
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
