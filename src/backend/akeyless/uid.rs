//! Universal Identity: the UID token, its two-phase rotation, its persistence and its lifetime.
//!
//! A UID token lives for a TTL (set on the auth method or the child token, 60 minutes by default)
//! that every rotation renews. Rotation is two-phase so the identity survives a lost answer or a
//! crash at any point:
//!
//! 1. `/uid-rotate-token` with `with-manual-ack`: the server issues a new token; the old one stays
//!    valid until the ack. Sent exactly once (never retried blindly): if the answer is lost, the old
//!    token still works and the next rotation simply replaces the unacknowledged one.
//! 2. The new token is written durably (atomic write + fsync, mode 0600) to
//!    `<state-dir>/akeyless-uid-token`, the old one to `akeyless-uid-token.previous`.
//! 3. `/uid-rotate-token` with `send-manual-ack-token` retires the old token (idempotent, retried);
//!    then the `.previous` file is removed.
//!
//! A crash before 2 leaves the old token saved and valid; a crash between 2 and 3 leaves both saved,
//! and start-up sends the ack first. At start-up the saved token is preferred, then the previous
//! one, then the init token.
//!
//! The real lifetime is read from `/uid-list-children` (the caller's own node: `expired_date`,
//! `ttl`) after every rotation; `--akeyless-uid-ttl` is only the fallback when the server does not
//! say. The next rotation comes at half the remaining lifetime, at least every 2 minutes (the cadence
//! of Akeyless's own integrations); a failed one is retried soon, and when
//! the token nears expiry while rotation keeps failing, the backend's health check fails with the
//! reason (visible in Status) and an error is logged.
//!
//! Logins wait for a rotation only while the token is swapped (and, until an ack has shown that the
//! server keeps old tokens valid, during phase 1 too), never across the ack or the lifetime lookup.
//!
//! The same calls serve `kms-plugin akeyless uid` (the generator machine's commands).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};
use tokio::time::Instant;

use super::auth::parse_time;
use super::client::{CallError, Client, Op};
use super::config::Secret;
use crate::backend::{AuthEvent, AuthKind, BackendError, BackendEvents};

/// Longest time between rotations: what Akeyless's own integrations use.
const MAX_INTERVAL: Duration = Duration::from_secs(120);

/// Reported when the single-flight lock is not free within a rotation's deadline.
const SLOW: Duration = Duration::from_secs(10);

/// File name of the persisted token inside the state directory.
pub const UID_TOKEN_FILE: &str = "akeyless-uid-token";

/// A token file and its `.previous` companion (the token a rotation replaced, kept until acked).
#[derive(Clone, Debug)]
pub struct TokenStore {
    path: PathBuf,
}

impl TokenStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        TokenStore { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn previous_path(&self) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".previous");
        self.path.with_file_name(name)
    }

    /// The saved token, if there is a readable one. An unreadable file is reported and skipped.
    pub fn load(&self) -> Option<Secret> {
        load(&self.path)
    }

    /// The token replaced by a rotation whose ack may not have reached the server.
    pub fn load_previous(&self) -> Option<Secret> {
        load(&self.previous_path())
    }

    /// Phase 2: `old` to `.previous` first, then `new` over the token file, each atomically and
    /// fsynced. A crash between the two leaves `old` in both, which is harmless.
    pub fn save_rotated(&self, old: &Secret, new: &Secret) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        write_token(&self.previous_path(), old)?;
        write_token(&self.path, new)
    }

    /// After the ack: the previous token is dead, forget it.
    pub fn acked(&self) {
        match std::fs::remove_file(self.previous_path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.previous_path().display(), error = %e, "cannot remove the previous UID token file")
            }
        }
    }
}

fn write_token(path: &Path, token: &Secret) -> std::io::Result<()> {
    crate::fsutil::write_atomic(path, format!("{}\n", token.expose()).as_bytes(), 0o600)
}

fn load(path: &Path) -> Option<Secret> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let t = Secret::new(text.trim());
            (!t.is_empty()).then_some(t)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the saved UID token");
            None
        }
    }
}

fn failed(e: CallError) -> BackendError {
    match e {
        CallError::Failed(e) => e,
        CallError::TokenRejected(m) => BackendError::Authentication(m),
    }
}

fn body_with(token_field: &str, token: &Secret) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert(
        token_field.into(),
        Value::String(token.expose().to_string()),
    );
    body
}

fn token_of(reply: &Map<String, Value>, command: &str) -> Result<Secret, BackendError> {
    // Current servers answer `token`; older ones used the other spellings.
    ["token", "uid-token", "uid_token"]
        .iter()
        .find_map(|k| match reply.get(*k) {
            Some(Value::String(t)) if !t.trim().is_empty() => Some(Secret::new(t.trim())),
            _ => None,
        })
        .ok_or_else(|| BackendError::Other(format!("/{command} answered without a token")))
}

/// Phase 1: asks for a new token; the old one stays valid until [`ack`]. One attempt only.
pub(crate) async fn rotate_begin(
    client: &Client,
    token: &Secret,
    deadline: Instant,
) -> Result<Secret, BackendError> {
    let mut body = body_with("uid-token", token);
    body.insert("with-manual-ack".into(), Value::Bool(true));
    let reply = client
        .call_once(Op::UidRotate, "uid-rotate-token", &body, deadline)
        .await
        .map_err(failed)?;
    token_of(&reply, "uid-rotate-token")
}

/// Phase 3: retires `old` in favour of `new`. Repeating it is harmless, so it is retried.
pub(crate) async fn ack(
    client: &Client,
    old: &Secret,
    new: &Secret,
    deadline: Instant,
) -> Result<(), BackendError> {
    let mut body = body_with("uid-token", old);
    body.insert(
        "send-manual-ack-token".into(),
        Value::String(new.expose().to_string()),
    );
    client
        .call(Op::UidRotate, "uid-rotate-token", &body, deadline)
        .await
        .map(|_| ())
        .map_err(failed)
}

/// Phases 1 and 2: a new token from the server, saved durably (old one to `.previous`). Until the
/// ack both tokens work, so a save failure abandons the new token and keeps the old one.
pub(crate) async fn rotate_and_save(
    client: &Client,
    store: Option<&TokenStore>,
    old: &Secret,
    deadline: Instant,
) -> Result<Secret, BackendError> {
    let new = rotate_begin(client, old, deadline).await?;
    if let Some(store) = store {
        store.save_rotated(old, &new).map_err(|e| {
            BackendError::Other(format!(
                "rotated the Universal Identity token but cannot save it to {}: {e}; the old token \
                 stays in use; fix the state directory (writable, not full)",
                store.path().display()
            ))
        })?;
    }
    Ok(new)
}

/// Phase 3: the ack, then `.previous` goes. Returns false when it should be sent again later
/// (a transient failure); a refusal is final (e.g. a server that rotated at once, without waiting
/// for an ack) and the new token is the one in use either way.
pub(crate) async fn finish(
    client: &Client,
    store: Option<&TokenStore>,
    old: &Secret,
    new: &Secret,
    deadline: Instant,
) -> bool {
    match ack(client, old, new, deadline).await {
        Ok(()) => {
            if let Some(store) = store {
                store.acked();
            }
            true
        }
        Err(e) => {
            let retry = e.is_transient();
            finish_failed(store, &e, retry);
            !retry
        }
    }
}

fn finish_failed(store: Option<&TokenStore>, e: &BackendError, retry: bool) {
    if retry {
        tracing::warn!(error = %e, "the new Universal Identity token is saved but its rotation was not acknowledged; retrying the ack later");
    } else {
        tracing::warn!(error = %e, "Akeyless refused the ack of a UID token rotation; using the new token");
        if let Some(store) = store {
            store.acked();
        }
    }
}

/// All three phases (the generator's `renew`): the new token and whether the ack went through.
pub(crate) async fn rotate_two_phase(
    client: &Client,
    store: Option<&TokenStore>,
    old: &Secret,
    deadline: Instant,
) -> Result<(Secret, bool), BackendError> {
    let new = rotate_and_save(client, store, old, deadline).await?;
    let acked = finish(client, store, old, &new, deadline).await;
    Ok((new, acked))
}

/// One node of the UID token tree as `/uid-list-children` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct UidNode {
    pub id: String,
    /// TTL as the server states it (minutes), if it does.
    pub ttl_minutes: Option<u64>,
    #[serde(skip)]
    pub expires: Option<SystemTime>,
    /// `expired_date` as sent.
    pub expired_date: String,
    /// `last_rotate` as sent (empty: never rotated).
    pub last_rotate: String,
    pub comment: String,
    pub revoked: bool,
    pub deny_rotate: bool,
    pub deny_inheritance: bool,
    pub children: Vec<UidNode>,
}

impl UidNode {
    fn parse(v: &Value) -> UidNode {
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let b = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        let expired_date = s("expired_date");
        let mut children: Vec<UidNode> = match v.get("children") {
            Some(Value::Object(m)) => m.values().map(UidNode::parse).collect(),
            Some(Value::Array(a)) => a.iter().map(UidNode::parse).collect(),
            _ => Vec::new(),
        };
        children.sort_by(|a, b| a.id.cmp(&b.id));
        UidNode {
            id: s("id"),
            ttl_minutes: v
                .get("ttl")
                .and_then(|t| t.as_u64().or_else(|| t.as_str()?.trim().parse().ok())),
            expires: parse_time(&expired_date),
            expired_date,
            last_rotate: s("last_rotate"),
            comment: s("comment"),
            revoked: b("revoked"),
            deny_rotate: b("deny_rotate"),
            deny_inheritance: b("deny_inheritance"),
            children,
        }
    }

    /// Seconds until expiry (negative: expired), if the server said when.
    pub fn seconds_left(&self) -> Option<i64> {
        let e = self.expires?;
        Some(match e.duration_since(SystemTime::now()) {
            Ok(d) => d.as_secs() as i64,
            Err(past) => -(past.duration().as_secs() as i64),
        })
    }
}

/// `/uid-list-children`: the tree under (and including) `token`'s own node.
pub(crate) async fn list_children(
    client: &Client,
    token: &Secret,
    deadline: Instant,
) -> Result<UidNode, BackendError> {
    let body = body_with("uid-token", token);
    let reply = client
        .call(Op::UidRotate, "uid-list-children", &body, deadline)
        .await
        .map_err(failed)?;
    match reply.get("root") {
        Some(root @ Value::Object(_)) => Ok(UidNode::parse(root)),
        // Tolerate a server that answers with the node itself.
        _ if reply.contains_key("id") => Ok(UidNode::parse(&Value::Object(reply))),
        _ => Err(BackendError::Other(
            "/uid-list-children answered without a token tree (`root`)".into(),
        )),
    }
}

/// What a new child token may do.
#[derive(Clone, Debug)]
pub struct ChildSpec {
    pub ttl: Duration,
    pub deny_rotate: bool,
    pub deny_inheritance: bool,
    pub description: String,
}

/// TTL in whole minutes (the API's unit), rounded up, at least 1.
pub fn ttl_minutes(ttl: Duration) -> u64 {
    ttl.as_secs().div_ceil(60).max(1)
}

/// `/uid-create-child-token` under `parent`.
pub(crate) async fn create_child(
    client: &Client,
    parent: &Secret,
    spec: &ChildSpec,
    deadline: Instant,
) -> Result<Secret, BackendError> {
    let mut body = body_with("uid-token", parent);
    body.insert("child-ttl".into(), Value::from(ttl_minutes(spec.ttl)));
    body.insert("child-deny-rotate".into(), Value::Bool(spec.deny_rotate));
    body.insert(
        "child-deny-inheritance".into(),
        Value::Bool(spec.deny_inheritance),
    );
    body.insert(
        "description".into(),
        Value::String(spec.description.clone()),
    );
    // Not idempotent either: a lost answer leaves a child nobody holds, which `list` shows and
    // `revoke` removes; repeating blindly would make several.
    let reply = client
        .call_once(Op::UidRotate, "uid-create-child-token", &body, deadline)
        .await
        .map_err(failed)?;
    token_of(&reply, "uid-create-child-token")
}

/// `/uid-revoke-token`: `token_id` alone, or with its whole subtree.
pub(crate) async fn revoke(
    client: &Client,
    parent: &Secret,
    token_id: &str,
    subtree: bool,
    deadline: Instant,
) -> Result<(), BackendError> {
    let mut body = body_with("uid-token", parent);
    body.insert("revoke-token".into(), Value::String(token_id.to_string()));
    body.insert(
        "revoke-type".into(),
        Value::String(if subtree { "revokeAll" } else { "revokeSelf" }.into()),
    );
    client
        .call(Op::UidRotate, "uid-revoke-token", &body, deadline)
        .await
        .map(|_| ())
        .map_err(failed)
}

/// What is known about the current token's lifetime.
#[derive(Debug, Default)]
struct Life {
    /// Full TTL (renewed by each rotation).
    ttl: Option<Duration>,
    expires: Option<SystemTime>,
    /// Whether `ttl`/`expires` came from the server rather than `--akeyless-uid-ttl`.
    discovered: bool,
    /// Why the last rotation failed, while it keeps failing.
    failing: Option<String>,
}

/// The current UID token and where it is persisted.
pub(crate) struct UidState {
    current: Mutex<Secret>,
    /// A rotation whose ack has not been confirmed: (old, new).
    unacked: Mutex<Option<(Secret, Secret)>>,
    store: Option<TokenStore>,
    configured_ttl: Duration,
    life: Mutex<Life>,
    rotated_at_start: AtomicBool,
    /// An ack has succeeded: the server keeps old tokens valid until acknowledged.
    two_phase: AtomicBool,
    events: Arc<dyn BackendEvents>,
}

impl std::fmt::Debug for UidState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UidState")
            .field("store", &self.store)
            .field("configured_ttl", &self.configured_ttl)
            .finish_non_exhaustive()
    }
}

impl UidState {
    pub(crate) fn current(&self) -> Secret {
        self.current.lock().unwrap().clone()
    }

    fn ttl(&self) -> Duration {
        self.life.lock().unwrap().ttl.unwrap_or(self.configured_ttl)
    }

    /// Time left on the current token, if known.
    fn left(&self) -> Option<Duration> {
        let expires = self.life.lock().unwrap().expires?;
        Some(
            expires
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
        )
    }

    /// Seconds until the current token expires (for the metric), if known.
    pub(crate) fn seconds_left(&self) -> Option<f64> {
        self.left().map(|d| d.as_secs_f64())
    }

    /// Time until the next rotation: half the time left (half the TTL right after a rotation), and
    /// at most [`MAX_INTERVAL`], so a TTL the server does not report cannot run out unnoticed.
    pub(crate) fn interval(&self) -> Duration {
        let left = self.left().unwrap_or(self.ttl());
        (left / 2).clamp(Duration::from_secs(1), MAX_INTERVAL)
    }

    /// Pause before retrying a failed rotation: short against the TTL, shorter as expiry nears.
    pub(crate) fn retry_pause(&self) -> Duration {
        let mut pause = self.ttl() / 20;
        if let Some(left) = self.left() {
            pause = pause.min(left / 8);
        }
        pause.clamp(Duration::from_millis(500), Duration::from_secs(60))
    }

    /// Fails when the token expires soon (under a third of its TTL left) and rotation keeps
    /// failing, or has expired: the reason reaches Status through the backend probe.
    pub(crate) fn health(&self) -> Result<(), BackendError> {
        let life = self.life.lock().unwrap();
        let (Some(reason), Some(expires)) = (&life.failing, life.expires) else {
            return Ok(());
        };
        let ttl = life.ttl.unwrap_or(self.configured_ttl);
        match expires.duration_since(SystemTime::now()) {
            Ok(left) if left > ttl / 3 => Ok(()),
            Ok(left) => Err(BackendError::Unavailable(format!(
                "the Akeyless Universal Identity token expires in {}s and its rotation keeps failing \
                 ({reason}); fix the cause, or give this node a new child token (`kms-plugin akeyless \
                 uid create-child`) in its token file before it expires",
                left.as_secs()
            ))),
            Err(_) => Err(BackendError::Authentication(format!(
                "the Akeyless Universal Identity token has expired (last rotation error: {reason}); \
                 give this node a new child token (`kms-plugin akeyless uid create-child`) and restart it"
            ))),
        }
    }

    fn note_failure(&self, e: &BackendError) {
        self.life.lock().unwrap().failing = Some(e.to_string());
        if let Err(alert) = self.health() {
            tracing::error!(error = %alert, "Akeyless Universal Identity token is close to expiry");
        }
    }

    /// Rotates now (two-phase) and persists the new token, then learns the new lifetime. On failure
    /// the old token stays.
    /// `flight` is the token manager's single-flight lock: held only while the token is swapped,
    /// so a login never presents a token the server just retired, and never across slow calls.
    pub(crate) async fn rotate(
        &self,
        client: &Client,
        deadline: Instant,
        flight: Option<&tokio::sync::Mutex<()>>,
    ) -> Result<(), BackendError> {
        let result = self.rotate_inner(client, deadline, flight).await;
        self.events.auth(AuthEvent {
            backend: super::KIND,
            kind: AuthKind::IdentityRotation,
            outcome: result.as_ref().map(|_| ()),
        });
        match &result {
            Ok(()) => {
                self.life.lock().unwrap().failing = None;
                self.discover(client, deadline, true).await;
            }
            Err(e) => self.note_failure(e),
        }
        result
    }

    async fn rotate_inner(
        &self,
        client: &Client,
        deadline: Instant,
        flight: Option<&tokio::sync::Mutex<()>>,
    ) -> Result<(), BackendError> {
        // Finish an earlier rotation first; if the server rotated without waiting for an ack, this
        // fails harmlessly and the rotation below works from the new token anyway.
        let pending = self.unacked.lock().unwrap().clone();
        if let Some((old, new)) = pending {
            match ack(client, &old, &new, deadline).await {
                Ok(()) => {
                    self.two_phase.store(true, Ordering::Relaxed);
                    *self.unacked.lock().unwrap() = None;
                    if let Some(s) = &self.store {
                        s.acked();
                    }
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, "cannot acknowledge the previous UID token rotation")
                }
                Err(e) => {
                    // Refused for good: the ack cannot succeed later; the new token is in use.
                    tracing::warn!(error = %e, "Akeyless refused the ack of the previous UID token rotation");
                    *self.unacked.lock().unwrap() = None;
                    if let Some(s) = &self.store {
                        s.acked();
                    }
                }
            }
        }
        let lock = || async {
            match flight {
                Some(f) => tokio::time::timeout_at(deadline, f.lock())
                    .await
                    .map(Some)
                    .map_err(|_| BackendError::Timeout(SLOW)),
                None => Ok(None),
            }
        };
        // A server known to wait for the ack keeps the old token valid meanwhile: logins need not
        // wait for phase 1. Otherwise (not known yet) the old token may die with phase 1's answer.
        let two_phase = self.two_phase.load(Ordering::Relaxed);
        let mut guard = if two_phase { None } else { lock().await? };
        let old = self.current();
        let new = rotate_and_save(client, self.store.as_ref(), &old, deadline).await?;
        if guard.is_none() {
            guard = lock().await?;
        }
        *self.current.lock().unwrap() = new.clone();
        drop(guard);
        let acked = match ack(client, &old, &new, deadline).await {
            Ok(()) => {
                self.two_phase.store(true, Ordering::Relaxed);
                if let Some(s) = &self.store {
                    s.acked();
                }
                true
            }
            Err(e) => {
                let retry = e.is_transient();
                finish_failed(self.store.as_ref(), &e, retry);
                !retry
            }
        };
        *self.unacked.lock().unwrap() = (!acked).then_some((old, new));
        {
            // The rotation renewed the TTL; until the server says otherwise, assume the known one.
            let mut life = self.life.lock().unwrap();
            let ttl = life.ttl.unwrap_or(self.configured_ttl);
            life.expires = Some(SystemTime::now() + ttl);
        }
        match &self.store {
            Some(s) => {
                tracing::info!(path = %s.path().display(), "rotated the Akeyless Universal Identity token and saved it")
            }
            None => tracing::warn!(
                "rotated the Akeyless Universal Identity token; no --state-dir, so it is kept in memory only"
            ),
        }
        Ok(())
    }

    /// Reads the token's real TTL and expiry from `/uid-list-children`. `just_rotated`: the time
    /// left is the full TTL. Failures only mean the configured TTL stays in use.
    async fn discover(&self, client: &Client, deadline: Instant, just_rotated: bool) {
        match list_children(client, &self.current(), deadline).await {
            Ok(node) => {
                let mut life = self.life.lock().unwrap();
                let stated = node.ttl_minutes.map(|m| Duration::from_secs(m * 60));
                if let Some(expires) = node.expires {
                    // A local clock running behind the server's must not stretch the lifetime
                    // beyond the stated TTL.
                    let mut left = expires
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO);
                    if let Some(t) = stated {
                        left = left.min(t);
                    }
                    life.expires = Some(SystemTime::now() + left);
                    if just_rotated && !left.is_zero() {
                        life.ttl = Some(left);
                    } else if stated.is_some() {
                        life.ttl = stated;
                    }
                } else if stated.is_some() {
                    life.ttl = stated;
                }
                if !life.discovered {
                    tracing::info!(
                        ttl_s = life.ttl.map(|t| t.as_secs()),
                        "learned the Universal Identity token's lifetime from Akeyless"
                    );
                }
                life.discovered = true;
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the UID token's lifetime; using --akeyless-uid-ttl")
            }
        }
    }

    /// Start-up: finishes an interrupted rotation, picks the saved token (then the previous one,
    /// then the init token), proves it with `/auth` and rotates it at once (its age is unknown).
    pub(crate) async fn start(
        client: &Client,
        access_id: Option<&str>,
        init: Option<Secret>,
        state_dir: Option<&Path>,
        ttl: Duration,
        deadline: Instant,
        events: Arc<dyn BackendEvents>,
    ) -> Result<(UidState, Option<Map<String, Value>>), BackendError> {
        let store = state_dir.map(|d| TokenStore::new(d.join(UID_TOKEN_FILE)));
        if store.is_none() {
            tracing::warn!(
                "no --state-dir: rotated Universal Identity tokens cannot be saved, and a restart after \
                 the first rotation will fail with the consumed init token"
            );
        }
        let saved = store.as_ref().and_then(TokenStore::load);
        let previous = store.as_ref().and_then(TokenStore::load_previous);
        if let (Some(s), Some(old), Some(new)) = (&store, &previous, &saved) {
            // A crash between saving and acknowledging: acknowledge now.
            match ack(client, old, new, deadline).await {
                Ok(()) => {
                    tracing::info!("acknowledged a UID token rotation interrupted by a restart");
                    s.acked();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot acknowledge an interrupted UID token rotation; trying the saved tokens")
                }
            }
        }
        let mut candidates: Vec<(&str, Secret)> = Vec::new();
        for (source, token) in [("saved", saved), ("previous", previous), ("initial", init)] {
            if let Some(t) = token {
                if !candidates.iter().any(|(_, c)| *c == t) {
                    candidates.push((source, t));
                }
            }
        }
        if candidates.is_empty() {
            return Err(BackendError::Config(
                "universal_identity needs a token: set KMS_PLUGIN_AKEYLESS_UID_TOKEN (or AKEYLESS_UID_INIT_TOKEN), \
                 or --akeyless-uid-token-file"
                    .into(),
            ));
        }
        let mut refused = Vec::new();
        for (source, token) in candidates {
            // Authenticating proves the token; start-up depends on nothing else.
            let result = accepted(client, access_id, &token, deadline).await;
            events.auth(AuthEvent {
                backend: super::KIND,
                kind: AuthKind::Login,
                outcome: result.as_ref().map(|_| ()),
            });
            let transient = matches!(&result, Err(e) if e.is_transient());
            match result {
                // Akeyless is not reachable: keep this token (the saved one is preferred) and let
                // the token manager log in once it is.
                Err(e) if transient => {
                    tracing::warn!(source, error = %e, "cannot check the Universal Identity token at start-up; will retry");
                    let state = UidState {
                        current: Mutex::new(token),
                        unacked: Mutex::new(None),
                        store,
                        configured_ttl: ttl,
                        life: Mutex::new(Life::default()),
                        rotated_at_start: AtomicBool::new(false),
                        two_phase: AtomicBool::new(false),
                        events,
                    };
                    return Ok((state, None));
                }
                Ok(login) => {
                    let state = UidState {
                        current: Mutex::new(token),
                        unacked: Mutex::new(None),
                        store,
                        configured_ttl: ttl,
                        life: Mutex::new(Life::default()),
                        rotated_at_start: AtomicBool::new(false),
                        two_phase: AtomicBool::new(false),
                        events,
                    };
                    // Rotate at once (the token's age is unknown); a failure is retried later.
                    match state.rotate(client, deadline, None).await {
                        Ok(()) => state.rotated_at_start.store(true, Ordering::Relaxed),
                        Err(e) => {
                            tracing::warn!(
                                error = %e,
                                "could not rotate the Akeyless Universal Identity token at start-up; retrying soon"
                            );
                            state.discover(client, deadline, false).await;
                        }
                    }
                    // The login that proved the token is the token manager's first login.
                    return Ok((state, Some(login)));
                }
                Err(BackendError::Authentication(msg)) => {
                    tracing::warn!(source, error = %msg, "Akeyless refused a Universal Identity token");
                    refused.push(format!("{source} token: {msg}"));
                }
                Err(e) => return Err(e),
            }
        }
        Err(BackendError::Authentication(format!(
            "no usable Universal Identity token ({}); create a new child token with `kms-plugin akeyless \
             uid create-child` on the generator (or `akeyless uid-generate-token`) and provide it as the \
             init token",
            refused.join("; ")
        )))
    }

    /// Time until the first background rotation.
    pub(crate) fn first_wait(&self) -> Duration {
        if self.rotated_at_start.load(Ordering::Relaxed) {
            self.interval()
        } else {
            self.retry_pause()
        }
    }
}

/// `/auth` with the UID token: is it alive? Returns the `/auth` answer.
async fn accepted(
    client: &Client,
    access_id: Option<&str>,
    token: &Secret,
    deadline: Instant,
) -> Result<Map<String, Value>, BackendError> {
    let mut body = body_with("uid-token", token);
    body.insert(
        "access-type".into(),
        Value::String("universal_identity".into()),
    );
    if let Some(id) = access_id {
        body.insert("access-id".into(), Value::String(id.to_string()));
    }
    client
        .call(Op::Auth, "auth", &body, deadline)
        .await
        .map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_token_tree() {
        let v: Value = serde_json::from_str(
            r#"{"id": "r", "ttl": 60, "expired_date": "2030-01-02T03:04:05Z", "last_rotate": "",
                "children": {"b": {"id": "b", "ttl": 5, "revoked": true, "comment": "node b"},
                             "a": {"id": "a", "deny_inheritance": true, "children": {}}}}"#,
        )
        .unwrap();
        let n = UidNode::parse(&v);
        assert_eq!(n.ttl_minutes, Some(60));
        assert!(n.expires.is_some() && n.seconds_left().unwrap() > 0);
        assert_eq!(
            n.children.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(n.children[1].revoked && n.children[0].deny_inheritance);
        // Junk never panics.
        let junk = UidNode::parse(&serde_json::json!({"ttl": "x", "children": 3}));
        assert_eq!(junk, UidNode::default());
    }

    fn state(ttl: Duration, left: Option<Duration>, failing: Option<&str>) -> UidState {
        UidState {
            current: Mutex::new(Secret::new("u-test")),
            unacked: Mutex::new(None),
            store: None,
            configured_ttl: Duration::from_secs(3600),
            life: Mutex::new(Life {
                ttl: Some(ttl),
                expires: left.map(|l| SystemTime::now() + l),
                discovered: true,
                failing: failing.map(String::from),
            }),
            rotated_at_start: AtomicBool::new(true),
            two_phase: AtomicBool::new(true),
            events: crate::backend::no_events(),
        }
    }

    #[test]
    fn schedule_and_expiry_alert() {
        let s = |left, failing| state(Duration::from_secs(90), left, failing);
        // Rotation at half the time left; retries quicker as expiry nears.
        let healthy = s(Some(Duration::from_secs(80)), None);
        assert!((39..=40).contains(&healthy.interval().as_secs()));
        let long = state(
            Duration::from_secs(3600),
            Some(Duration::from_secs(3000)),
            None,
        );
        assert_eq!(long.interval(), MAX_INTERVAL);
        assert_eq!(healthy.retry_pause(), Duration::from_millis(4500));
        assert_eq!(
            s(Some(Duration::from_secs(2)), None).retry_pause(),
            Duration::from_millis(500)
        );
        assert!(healthy.health().is_ok());
        // Failing, but two thirds of the TTL left: no alarm yet.
        assert!(s(Some(Duration::from_secs(70)), Some("boom"))
            .health()
            .is_ok());
        // Failing with under a third left: Status says so, with the cause and the fix.
        let near = s(Some(Duration::from_secs(20)), Some("HTTP 503"));
        let e = near.health().unwrap_err();
        assert!(matches!(&e, BackendError::Unavailable(m)
            if m.contains("expires in") && m.contains("HTTP 503") && m.contains("create-child")));
        assert!(!e.to_string().contains("u-test"));
        // Expired.
        let gone = s(None, Some("HTTP 401"));
        gone.life.lock().unwrap().expires = Some(SystemTime::now() - Duration::from_secs(1));
        assert!(matches!(
            gone.health(),
            Err(BackendError::Authentication(_))
        ));
        // Nothing known about the lifetime: no alarm, configured TTL for the schedule.
        assert!(s(None, Some("x")).health().is_ok());
    }

    #[test]
    fn ttl_is_sent_in_whole_minutes() {
        assert_eq!(ttl_minutes(Duration::from_secs(1)), 1);
        assert_eq!(ttl_minutes(Duration::from_secs(60)), 1);
        assert_eq!(ttl_minutes(Duration::from_secs(61)), 2);
        assert_eq!(ttl_minutes(Duration::from_secs(86_400)), 1440);
    }

    #[test]
    fn store_keeps_the_previous_token_until_acked() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path().join("sub/tok"));
        store
            .save_rotated(&Secret::new("u-old"), &Secret::new("u-new"))
            .unwrap();
        assert_eq!(store.load().unwrap().expose(), "u-new");
        assert_eq!(store.load_previous().unwrap().expose(), "u-old");
        use std::os::unix::fs::PermissionsExt;
        for p in [store.path().to_path_buf(), store.previous_path()] {
            let mode = std::fs::metadata(p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        store.acked();
        store.acked();
        assert!(store.load_previous().is_none());
        assert_eq!(store.load().unwrap().expose(), "u-new");
    }
}
