//! Universal Identity: the UID token, its rotation and its persistence.
//!
//! A UID token lives for a TTL (60 minutes by default) unless it is rotated; `/uid-rotate-token`
//! returns a fresh token and retires the old one. The plugin therefore rotates at half the TTL
//! (`--akeyless-uid-ttl`), retries a failed rotation with the old token (still valid for the other
//! half), and writes every new token atomically (mode 0600) to `<state-dir>/akeyless-uid-token` so a
//! restart uses the newest token rather than the consumed init token. At start-up the persisted
//! token is preferred; if the server refuses it, the init token is tried (an operator who had to
//! issue a new init token after a long outage needs no manual clean-up). Start-up only needs the
//! chosen token to authenticate; it is then rotated at once (its age is unknown), and a failed
//! rotation is retried in the background rather than failing the start.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::time::Instant;

use super::client::{CallError, Client, Op};
use super::config::Secret;
use crate::backend::{AuthEvent, AuthKind, BackendError, BackendEvents};

/// File name of the persisted token inside the state directory.
pub const UID_TOKEN_FILE: &str = "akeyless-uid-token";

/// The current UID token and where it is persisted.
pub(crate) struct UidState {
    current: Mutex<Secret>,
    path: Option<PathBuf>,
    ttl: Duration,
    rotated_at_start: AtomicBool,
    events: Arc<dyn BackendEvents>,
}

impl std::fmt::Debug for UidState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UidState")
            .field("path", &self.path)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl UidState {
    pub(crate) fn current(&self) -> Secret {
        self.current.lock().unwrap().clone()
    }

    /// Time between rotations: half the TTL.
    pub(crate) fn interval(&self) -> Duration {
        (self.ttl / 2).max(Duration::from_secs(1))
    }

    /// Pause before retrying a failed rotation: short against the time left.
    pub(crate) fn retry_pause(&self) -> Duration {
        (self.ttl / 20).clamp(Duration::from_millis(500), Duration::from_secs(60))
    }

    /// Rotates now and persists the new token. On failure the old token stays.
    pub(crate) async fn rotate(
        &self,
        client: &Client,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        let old = self.current();
        let result = rotate_token(client, &old, deadline).await;
        self.events.auth(AuthEvent {
            backend: super::KIND,
            kind: AuthKind::IdentityRotation,
            outcome: result.as_ref().map(|_| ()),
        });
        self.install(result?);
        Ok(())
    }

    fn install(&self, new: Secret) {
        if let Some(path) = &self.path {
            match persist(path, &new) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "rotated the Akeyless Universal Identity token and saved it")
                }
                Err(e) => tracing::error!(
                    path = %path.display(),
                    error = %e,
                    "rotated the Akeyless Universal Identity token but could not save it; a restart \
                     will come back with an outdated token"
                ),
            }
        } else {
            tracing::warn!("rotated the Akeyless Universal Identity token; no --state-dir, so it is kept in memory only");
        }
        *self.current.lock().unwrap() = new;
    }

    /// Start-up: picks the persisted token if there is one, else the init token, and rotates it at
    /// once (its age is unknown). A refused persisted token falls back to the init token.
    pub(crate) async fn start(
        client: &Client,
        access_id: Option<&str>,
        init: Option<Secret>,
        state_dir: Option<&Path>,
        ttl: Duration,
        deadline: Instant,
        events: Arc<dyn BackendEvents>,
    ) -> Result<(UidState, Option<Map<String, Value>>), BackendError> {
        let path = state_dir.map(|d| d.join(UID_TOKEN_FILE));
        let persisted = path.as_deref().and_then(load);
        if path.is_none() {
            tracing::warn!(
                "no --state-dir: rotated Universal Identity tokens cannot be saved, and a restart after \
                 the first rotation will fail with the consumed init token"
            );
        }
        let mut candidates: Vec<(&str, Secret)> = Vec::new();
        if let Some(p) = persisted {
            candidates.push(("saved", p));
        }
        if let Some(i) = init {
            if !candidates.iter().any(|(_, c)| *c == i) {
                candidates.push(("initial", i));
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
                        path,
                        ttl,
                        rotated_at_start: AtomicBool::new(false),
                        events,
                    };
                    return Ok((state, None));
                }
                Ok(login) => {
                    let state = UidState {
                        current: Mutex::new(token),
                        path,
                        ttl,
                        rotated_at_start: AtomicBool::new(false),
                        events,
                    };
                    // Rotate at once (the token's age is unknown); a failure is retried later.
                    match state.rotate(client, deadline).await {
                        Ok(()) => state.rotated_at_start.store(true, Ordering::Relaxed),
                        Err(e) => tracing::warn!(
                            error = %e,
                            "could not rotate the Akeyless Universal Identity token at start-up; retrying soon"
                        ),
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
            "no usable Universal Identity token ({}); create a new token with `akeyless uid-generate-token` \
             and provide it as the init token",
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
    let mut body = Map::new();
    body.insert(
        "access-type".into(),
        Value::String("universal_identity".into()),
    );
    if let Some(id) = access_id {
        body.insert("access-id".into(), Value::String(id.to_string()));
    }
    body.insert(
        "uid-token".into(),
        Value::String(token.expose().to_string()),
    );
    client
        .call(Op::Auth, "auth", &body, deadline)
        .await
        .map_err(|e| match e {
            CallError::Failed(e) => e,
            CallError::TokenRejected(m) => BackendError::Authentication(m),
        })
}

/// Calls `/uid-rotate-token` and returns the new token.
async fn rotate_token(
    client: &Client,
    token: &Secret,
    deadline: Instant,
) -> Result<Secret, BackendError> {
    let mut body = Map::new();
    body.insert(
        "uid-token".into(),
        Value::String(token.expose().to_string()),
    );
    let reply = client
        .call(Op::UidRotate, "uid-rotate-token", &body, deadline)
        .await
        .map_err(|e| match e {
            CallError::Failed(e) => e,
            CallError::TokenRejected(m) => BackendError::Authentication(m),
        })?;
    // Current servers answer `token`; accept the spellings older ones used too.
    ["token", "uid-token", "uid_token"]
        .iter()
        .find_map(|k| match reply.get(*k) {
            Some(Value::String(t)) if !t.trim().is_empty() => Some(Secret::new(t.trim())),
            _ => None,
        })
        .ok_or_else(|| BackendError::Other("/uid-rotate-token answered without a token".into()))
}

/// The saved token, if there is a readable one. An unreadable file is reported and skipped: the init
/// token may still work.
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

fn persist(path: &Path, token: &Secret) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::fsutil::write_atomic(path, format!("{}\n", token.expose()).as_bytes(), 0o600)
}
