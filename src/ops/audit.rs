//! Audit log: one JSON object per line for every Encrypt, Decrypt, Status change, rotation and
//! authentication event.
//!
//! Lines carry identifiers only (apiserver uid, key_id, a short reference of the local KEK) and never
//! plaintext, DEKs, keys or tokens.
//!
//! Writing never blocks the request path: [`AuditLog::record`] serialises the line and hands it to a
//! dedicated writer thread through a bounded queue. When the queue is full (the disk or the stdout
//! pipe stalls) the line is dropped, counted in `kms_plugin_audit_lines_dropped_total`, and the writer
//! reports the gap in the log itself (an `audit_lines_dropped` line) once it catches up. A KMS plugin
//! that hangs because its log reader stalled would take the apiserver down with it; a gap in the audit
//! trail that is counted and reported is the lesser evil.
//!
//! The writer flushes whenever the queue runs empty, so at low rates every line reaches the file at
//! once, and under load lines are written in batches.
//!
//! logrotate: after the file was renamed, [`AuditLog::reopen`] (or SIGHUP with
//! [`spawn_reopen_on_sighup`]) makes the writer open the path again.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::metrics::{Api, Metrics};

/// Default queue length: enough to absorb a cold-start burst of v1 Decrypts (thousands) while the
/// disk is slow, at a few hundred bytes per line.
pub const DEFAULT_QUEUE_LINES: usize = 8192;

/// Longest apiserver uid copied into a line (uids are UUIDs; anything longer is cut, not trusted).
const MAX_UID_LEN: usize = 128;
/// Longest `detail` text copied into a line.
const MAX_DETAIL_LEN: usize = 512;

/// Where audit lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditTarget {
    /// `-`: standard output (container logs).
    Stdout,
    /// A file, opened in append mode (created with mode 0600).
    File(PathBuf),
}

impl FromStr for AuditTarget {
    type Err = AuditError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Err(AuditError::EmptyPath),
            "-" => Ok(AuditTarget::Stdout),
            p => Ok(AuditTarget::File(PathBuf::from(p))),
        }
    }
}

impl fmt::Display for AuditTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuditTarget::Stdout => f.write_str("-"),
            AuditTarget::File(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("--audit-log needs a path or '-' for standard output")]
    EmptyPath,
    #[error("cannot open audit log {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot start the audit writer thread: {0}")]
    Thread(io::Error),
    #[error("audit writer stopped")]
    WriterGone,
    #[error("audit log write failed: {0}")]
    Write(io::Error),
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditOp {
    Encrypt,
    Decrypt,
    /// The health or key_id reported by Status changed (first probe, failure, recovery, new key_id).
    StatusChange,
    /// The remote KEK changed: a new key_id was observed.
    KeyRotation,
    /// A new local KEK was generated and wrapped by the remote KEK.
    LocalKekRotation,
    /// The backend authenticated while holding no usable session token (start-up, after the token
    /// was rejected or expired).
    Auth,
    /// The backend renewed a still-valid session token ahead of its expiry.
    TokenRefresh,
    /// The backend replaced its long-lived identity credential (e.g. a Universal Identity token).
    IdentityRotation,
    /// A remote key changed lifecycle state (suspect, revoked, active again).
    KeyState,
    /// A local KEK the primary backend could not unwrap was unwrapped by an escrow backend (or the
    /// escrow failed too).
    EscrowUnwrap,
}

/// One audit event. Every field is an identifier or a bounded label: never pass secret material.
#[derive(Clone, Debug, Default)]
pub struct AuditEvent<'a> {
    /// KMS API version for gRPC operations; `None` for internal events (rotation, auth).
    pub api: Option<Api>,
    pub operation: Option<AuditOp>,
    /// The `uid` the apiserver sent with the request.
    pub uid: Option<&'a str>,
    /// The key_id of the request/response or, for status/rotation events, the new key_id.
    pub key_id: Option<&'a str>,
    /// For status changes and rotations: the key_id before.
    pub previous_key_id: Option<&'a str>,
    /// Short reference of the local KEK used (see [`local_kek_ref`]).
    pub local_kek: Option<&'a str>,
    /// For backend events (auth, token refresh): the backend kind (`akeyless`, ...).
    pub backend: Option<&'a str>,
    /// For key state changes: the remote key reference (a key name, label or ARN; never secret).
    pub key_ref: Option<&'a str>,
    /// Whether serving this event needed a call to the remote key backend.
    pub backend_call: bool,
    /// `ok` or a bounded error label (`BackendError::label()`, a gRPC code name, ...).
    pub outcome: &'a str,
    /// Free text for status changes (the healthz reason) and failed backend events (the error).
    /// Must not contain secrets.
    pub detail: Option<&'a str>,
    /// Time taken to serve a request (`None` for events that are not requests).
    pub latency: Option<Duration>,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    api: Option<&'static str>,
    operation: Option<AuditOp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_key_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    local_kek: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_ref: Option<&'a str>,
    backend_call: bool,
    outcome: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ms: Option<f64>,
}

#[derive(Serialize)]
struct DroppedLine {
    time: String,
    operation: &'static str,
    count: u64,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A short, non-secret reference for a local KEK: the first 6 bytes (12 hex digits) of SHA-256 over
/// its *wrapped* form, so the same KEK has the same reference on every node and in every line, and
/// nothing about the key itself is revealed.
pub fn local_kek_ref(wrapped_kek: &[u8]) -> String {
    let digest = Sha256::digest(wrapped_kek);
    hex::encode(&digest[..6])
}

enum Msg {
    Line(String),
    /// Nudge the writer to look at the reopen flag.
    Wake,
    Flush(mpsc::Sender<io::Result<()>>),
}

struct Shared {
    tx: SyncSender<Msg>,
    reopen_requested: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    metrics: Option<Metrics>,
    target: AuditTarget,
}

/// Handle to the audit log. Cheap to clone; every clone feeds the same writer. The writer thread
/// drains the queue and exits when the last handle is dropped.
#[derive(Clone)]
pub struct AuditLog(Arc<Shared>);

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuditLog({})", self.0.target)
    }
}

type Sink = Box<dyn Write + Send>;

fn open_sink(target: &AuditTarget) -> Result<Sink, AuditError> {
    match target {
        AuditTarget::Stdout => Ok(Box::new(io::stdout())),
        AuditTarget::File(path) => open_file(path)
            .map(|f| Box::new(f) as Sink)
            .map_err(|source| AuditError::Open {
                path: path.clone(),
                source,
            }),
    }
}

fn open_file(path: &Path) -> io::Result<std::fs::File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

impl AuditLog {
    /// Opens the target now (so a bad path fails at start-up) and starts the writer thread.
    pub fn open(target: AuditTarget, metrics: Option<Metrics>) -> Result<Self, AuditError> {
        Self::with_capacity(target, DEFAULT_QUEUE_LINES, metrics)
    }

    /// Like [`AuditLog::open`] with a given queue length (lines).
    pub fn with_capacity(
        target: AuditTarget,
        capacity: usize,
        metrics: Option<Metrics>,
    ) -> Result<Self, AuditError> {
        let sink = open_sink(&target)?;
        let (tx, rx) = mpsc::sync_channel(capacity.max(1));
        let reopen_requested = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            rx,
            out: BufWriter::with_capacity(64 * 1024, sink),
            target: target.clone(),
            reopen_requested: reopen_requested.clone(),
            dropped: dropped.clone(),
            metrics: metrics.clone(),
            failing: false,
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run())
            .map_err(AuditError::Thread)?;
        Ok(AuditLog(Arc::new(Shared {
            tx,
            reopen_requested,
            dropped,
            metrics,
            target,
        })))
    }

    pub fn target(&self) -> &AuditTarget {
        &self.0.target
    }

    /// Queues one event; never blocks. Returns false if the line was dropped (queue full).
    pub fn record(&self, event: &AuditEvent<'_>) -> bool {
        let line = Line {
            time: now_rfc3339(),
            api: event.api.map(Api::as_str),
            operation: event.operation,
            uid: event.uid.map(|u| truncate(u, MAX_UID_LEN)),
            key_id: event.key_id,
            previous_key_id: event.previous_key_id,
            local_kek: event.local_kek,
            backend: event.backend,
            key_ref: event.key_ref,
            backend_call: event.backend_call,
            outcome: event.outcome,
            detail: event.detail.map(|d| truncate(d, MAX_DETAIL_LEN)),
            // Milliseconds with microsecond resolution.
            latency_ms: event.latency.map(|l| (l.as_micros() as f64) / 1000.0),
        };
        let mut text = match serde_json::to_string(&line) {
            Ok(t) => t,
            // Serialising plain strings and numbers cannot fail; count it like a drop if it ever does.
            Err(_) => {
                self.count_drop();
                return false;
            }
        };
        text.push('\n');
        match self.0.tx.try_send(Msg::Line(text)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.count_drop();
                false
            }
        }
    }

    fn count_drop(&self) {
        self.0.dropped.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.0.metrics {
            m.audit_line_dropped();
        }
    }

    /// Asks the writer to reopen the target path (after logrotate renamed it). Never blocks; the
    /// writer reopens before writing its next line.
    pub fn reopen(&self) {
        self.0.reopen_requested.store(true, Ordering::SeqCst);
        // If the queue is full the writer is busy and will see the flag anyway.
        let _ = self.0.tx.try_send(Msg::Wake);
    }

    /// Waits until every line queued before this call was written and flushed. For shutdown and
    /// tests; blocks the calling thread (use `spawn_blocking` from async code).
    pub fn flush(&self) -> Result<(), AuditError> {
        let (ack_tx, ack_rx) = mpsc::channel();
        self.0
            .tx
            .send(Msg::Flush(ack_tx))
            .map_err(|_| AuditError::WriterGone)?;
        match ack_rx.recv() {
            Ok(r) => r.map_err(AuditError::Write),
            Err(_) => Err(AuditError::WriterGone),
        }
    }
}

struct Writer {
    rx: Receiver<Msg>,
    out: BufWriter<Sink>,
    target: AuditTarget,
    reopen_requested: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    metrics: Option<Metrics>,
    /// True while writes fail, so the failure is logged once rather than per line.
    failing: bool,
}

impl Writer {
    fn run(mut self) {
        while let Ok(msg) = self.rx.recv() {
            self.handle(msg);
            // Batch whatever else is queued, then flush once the queue is empty.
            while let Ok(msg) = self.rx.try_recv() {
                self.handle(msg);
            }
            self.report_drops();
            let r = self.out.flush();
            self.note(r);
        }
        // All handles are gone: write what is buffered and stop.
        self.report_drops();
        let r = self.out.flush();
        self.note(r);
    }

    fn handle(&mut self, msg: Msg) {
        if self.reopen_requested.swap(false, Ordering::SeqCst) {
            self.reopen();
        }
        match msg {
            Msg::Line(line) => {
                let r = self.out.write_all(line.as_bytes());
                self.note(r);
            }
            Msg::Wake => {}
            Msg::Flush(ack) => {
                self.report_drops();
                let r = self.out.flush();
                let reply = match &r {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
                self.note(r);
                let _ = ack.send(reply);
            }
        }
    }

    fn reopen(&mut self) {
        let AuditTarget::File(path) = self.target.clone() else {
            return;
        };
        // Whatever is buffered belongs to the old file.
        let r = self.out.flush();
        self.note(r);
        match open_file(&path) {
            Ok(f) => {
                self.out = BufWriter::with_capacity(64 * 1024, Box::new(f));
                tracing::info!(path = %path.display(), "audit log reopened");
            }
            Err(e) => {
                // Keep writing to the old file rather than losing lines.
                tracing::warn!(path = %path.display(), error = %e, "cannot reopen the audit log; still writing to the old file");
                if let Some(m) = &self.metrics {
                    m.audit_write_error();
                }
            }
        }
    }

    fn report_drops(&mut self) {
        let n = self.dropped.swap(0, Ordering::Relaxed);
        if n == 0 {
            return;
        }
        let line = DroppedLine {
            time: now_rfc3339(),
            operation: "audit_lines_dropped",
            count: n,
        };
        if let Ok(mut text) = serde_json::to_string(&line) {
            text.push('\n');
            let r = self.out.write_all(text.as_bytes());
            self.note(r);
        }
    }

    fn note(&mut self, r: io::Result<()>) {
        match r {
            Ok(()) => {
                if self.failing {
                    tracing::info!(target_path = %self.target, "audit log writes work again");
                    self.failing = false;
                }
            }
            Err(e) => {
                if let Some(m) = &self.metrics {
                    m.audit_write_error();
                }
                if !self.failing {
                    tracing::warn!(target_path = %self.target, error = %e, "audit log write failed");
                    self.failing = true;
                }
            }
        }
    }
}

/// Installs a SIGHUP handler that reopens `audit` (logrotate's `postrotate kill -HUP`). Must be called
/// inside a tokio runtime; the handler is in place when this returns.
pub fn spawn_reopen_on_sighup(audit: AuditLog) -> io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            audit.reopen();
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn read_lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
            .collect()
    }

    fn encrypt_event(uid: &str) -> AuditEvent<'_> {
        AuditEvent {
            api: Some(Api::V2),
            operation: Some(AuditOp::Encrypt),
            uid: Some(uid),
            key_id: Some("local:abc:1"),
            local_kek: Some("0123456789ab"),
            backend_call: false,
            outcome: "ok",
            latency: Some(Duration::from_micros(1234)),
            ..Default::default()
        }
    }

    #[test]
    fn lines_are_json_with_all_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(AuditTarget::File(path.clone()), None).unwrap();
        assert!(log.record(&encrypt_event("uid-1")));
        assert!(log.record(&AuditEvent {
            operation: Some(AuditOp::KeyRotation),
            key_id: Some("new"),
            previous_key_id: Some("old"),
            backend_call: true,
            outcome: "ok",
            ..Default::default()
        }));
        log.flush().unwrap();
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 2);
        let l = &lines[0];
        assert_eq!(l["api"], "v2");
        assert_eq!(l["operation"], "encrypt");
        assert_eq!(l["uid"], "uid-1");
        assert_eq!(l["key_id"], "local:abc:1");
        assert_eq!(l["local_kek"], "0123456789ab");
        assert_eq!(l["backend_call"], false);
        assert_eq!(l["outcome"], "ok");
        assert_eq!(l["latency_ms"], 1.234);
        let time = l["time"].as_str().unwrap();
        // RFC 3339, UTC, milliseconds: 2026-01-02T03:04:05.678Z
        assert_eq!(time.len(), 24, "{time}");
        assert!(time.ends_with('Z') && time.as_bytes()[19] == b'.', "{time}");
        assert!(humantime::parse_rfc3339(time).is_ok());
        assert_eq!(lines[1]["operation"], "key_rotation");
        assert_eq!(lines[1]["previous_key_id"], "old");
        assert!(lines[1].get("api").is_none());
        assert!(lines[1].get("uid").is_none());
        assert!(lines[1].get("latency_ms").is_none());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn hostile_uid_is_escaped_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(AuditTarget::File(path.clone()), None).unwrap();
        let uid = format!("a\"b\n{{}}\u{e9}{}", "x".repeat(500));
        log.record(&encrypt_event(&uid));
        log.flush().unwrap();
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 1);
        let got = lines[0]["uid"].as_str().unwrap();
        assert!(got.len() <= MAX_UID_LEN && got.starts_with("a\"b\n{}\u{e9}"));
    }

    #[test]
    fn reopen_after_rename_writes_to_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let rotated = dir.path().join("audit.log.1");
        let log = AuditLog::open(AuditTarget::File(path.clone()), None).unwrap();
        log.record(&encrypt_event("before"));
        log.flush().unwrap();
        std::fs::rename(&path, &rotated).unwrap();
        // Without reopen, lines follow the renamed file (same inode).
        log.record(&encrypt_event("still-old"));
        log.flush().unwrap();
        log.reopen();
        log.record(&encrypt_event("after"));
        log.flush().unwrap();
        let old: Vec<_> = read_lines(&rotated)
            .iter()
            .map(|l| l["uid"].as_str().unwrap().to_owned())
            .collect();
        let new: Vec<_> = read_lines(&path)
            .iter()
            .map(|l| l["uid"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(old, ["before", "still-old"]);
        assert_eq!(new, ["after"]);
    }

    #[tokio::test]
    async fn sighup_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let rotated = dir.path().join("audit.log.1");
        let log = AuditLog::open(AuditTarget::File(path.clone()), None).unwrap();
        let task = spawn_reopen_on_sighup(log.clone()).unwrap();
        log.record(&encrypt_event("before"));
        let l2 = log.clone();
        tokio::task::spawn_blocking(move || l2.flush())
            .await
            .unwrap()
            .unwrap();
        std::fs::rename(&path, &rotated).unwrap();
        let status = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        // Signal delivery is asynchronous: keep writing until a line lands in the new file.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            log.record(&encrypt_event("probe"));
            let l2 = log.clone();
            tokio::task::spawn_blocking(move || l2.flush())
                .await
                .unwrap()
                .unwrap();
            if path.exists() && !read_lines(&path).is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "SIGHUP did not reopen the audit log"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(read_lines(&rotated)[0]["uid"], "before");
        task.abort();
    }

    #[test]
    fn full_queue_drops_and_counts_instead_of_blocking() {
        // A writer that never finishes its first write: the queue fills up behind it.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let ok = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mkfifo failed");
        // Opening a FIFO for writing blocks until a reader exists: open a reader first.
        let fifo2 = fifo.clone();
        let reader = std::thread::spawn(move || std::fs::File::open(fifo2).unwrap());
        let metrics = Metrics::new();
        let log =
            AuditLog::with_capacity(AuditTarget::File(fifo.clone()), 4, Some(metrics.clone()))
                .unwrap();
        let mut reader = reader.join().unwrap();
        // Fill the pipe buffer (64 KiB) and the queue; record() must return promptly every time.
        let start = Instant::now();
        let mut dropped = 0;
        for i in 0..2000 {
            if !log.record(&encrypt_event(&format!("{i:0>100}"))) {
                dropped += 1;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(5), "record() blocked");
        assert!(dropped > 0, "expected drops with a stalled reader");
        let text = metrics.encode();
        assert!(
            text.contains(&format!("kms_plugin_audit_lines_dropped_total {dropped}")),
            "dropped={dropped}\n{text}"
        );
        // Drain the reader: the writer catches up and reports the gap in the log.
        let drain = std::thread::spawn(move || {
            let mut s = String::new();
            io::Read::read_to_string(&mut reader, &mut s).unwrap();
            s
        });
        log.flush().unwrap();
        drop(log);
        let text = drain.join().unwrap();
        let gap: u64 = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["operation"] == "audit_lines_dropped")
            .map(|v| v["count"].as_u64().unwrap())
            .sum();
        assert_eq!(gap, dropped);
    }

    #[test]
    fn target_parsing_and_kek_ref() {
        assert_eq!("-".parse::<AuditTarget>().unwrap(), AuditTarget::Stdout);
        assert_eq!(
            "/x/y".parse::<AuditTarget>().unwrap(),
            AuditTarget::File("/x/y".into())
        );
        assert!("".parse::<AuditTarget>().is_err());
        let r = local_kek_ref(b"wrapped");
        assert_eq!(r.len(), 12);
        assert!(r.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(r, local_kek_ref(b"wrapped"));
        assert_ne!(r, local_kek_ref(b"wrapped2"));
        let err =
            AuditLog::open(AuditTarget::File("/nonexistent-dir/a.log".into()), None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir/a.log"), "{err}");
    }

    /// Cost of `record()` on the caller's thread: the queued writer against a mutex'd BufWriter
    /// flushed per line. Run with `cargo test --lib ops::audit -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_record_cost() {
        let dir = tempfile::tempdir().unwrap();
        let n = 50_000;
        let path = dir.path().join("q.log");
        let log = AuditLog::open(AuditTarget::File(path), None).unwrap();
        let start = Instant::now();
        let mut dropped = 0;
        for i in 0..n {
            if !log.record(&encrypt_event(&format!("uid-{i}"))) {
                dropped += 1;
            }
        }
        let queued = start.elapsed();
        log.flush().unwrap();
        let total = start.elapsed();

        let path = dir.path().join("m.log");
        let f = std::sync::Mutex::new(BufWriter::new(open_file(&path).unwrap()));
        let start = Instant::now();
        for i in 0..n {
            let line = serde_json::to_string(&Line {
                time: now_rfc3339(),
                api: Some("v2"),
                operation: Some(AuditOp::Encrypt),
                uid: Some(&format!("uid-{i}")),
                key_id: Some("local:abc:1"),
                previous_key_id: None,
                local_kek: Some("0123456789ab"),
                backend: None,
                key_ref: None,
                backend_call: false,
                outcome: "ok",
                detail: None,
                latency_ms: Some(1.2),
            })
            .unwrap();
            let mut w = f.lock().unwrap();
            w.write_all(line.as_bytes()).unwrap();
            w.write_all(b"\n").unwrap();
            w.flush().unwrap();
        }
        let mutexed = start.elapsed();
        println!(
            "queued: {:.2} us/record on caller ({} dropped), {:.2} us/line until flushed; mutex+flush per line: {:.2} us/record",
            queued.as_secs_f64() * 1e6 / n as f64,
            dropped,
            total.as_secs_f64() * 1e6 / n as f64,
            mutexed.as_secs_f64() * 1e6 / n as f64
        );
    }
}
