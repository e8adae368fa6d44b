//! HTTP transport for the Akeyless API: `POST <base>/<command>` with a JSON body, tolerant error
//! parsing, classification of failures, and bounded retries with backoff and jitter.
//!
//! Retries happen only for failures that may go away (transport errors, timeouts, 5xx, 429) and only
//! while the caller's deadline leaves room. 4xx answers are never retried here; the caller decides
//! whether a rejected token is worth one re-authentication.

use std::time::Duration;

use rand::Rng;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::backend::BackendError;

/// Most attempts for one operation, whatever the remaining time.
const MAX_ATTEMPTS: u32 = 4;
/// Largest response body read; Akeyless answers for these commands are a few kilobytes.
const MAX_BODY: usize = 1 << 20;
/// Longest server error text kept in an error message.
const MAX_ERROR_TEXT: usize = 300;
/// Request fields whose values are credentials; they are removed from any server text we repeat.
const SECRET_FIELDS: &[&str] = &[
    "token",
    "uid-token",
    "send-manual-ack-token",
    "access-key",
    "cloud-id",
    "jwt",
    "k8s-service-account-token",
    "key-data",
    "cert-data",
    "plaintext",
];

/// Which Akeyless call failed; decides how an error answer is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Auth,
    UidRotate,
    Describe,
    Encrypt,
    Decrypt,
}

/// A failed call, classified.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The server rejected the token we sent (expired, revoked): worth one re-authentication.
    TokenRejected(String),
    /// Anything else, final for this operation (retries already done where they made sense).
    Failed(BackendError),
}

impl From<BackendError> for CallError {
    fn from(e: BackendError) -> Self {
        CallError::Failed(e)
    }
}

/// One raw failure before classification.
#[derive(Debug)]
enum Raw {
    Transport {
        timed_out: bool,
        text: String,
    },
    Http {
        status: u16,
        text: String,
        retry_after: Option<Duration>,
    },
    BadBody(String),
}

pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    budget: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("budget", &self.budget)
            .finish()
    }
}

impl Client {
    /// `base` is the API URL (path prefixes such as `/api/v2` are kept). `budget` is the time one
    /// operation may take including retries.
    pub(crate) fn new(base: &str, budget: Duration) -> Result<Self, BackendError> {
        let parsed = reqwest::Url::parse(base.trim()).map_err(|e| {
            BackendError::Config(format!("--akeyless-url {base:?} is not a URL: {e}"))
        })?;
        match parsed.scheme() {
            "https" => {}
            "http" => tracing::warn!(
                url = %parsed,
                "Akeyless URL uses plain http: tokens and wrapped keys cross the network unencrypted; \
                 use this only for a gateway on the same host or cluster network"
            ),
            other => {
                return Err(BackendError::Config(format!(
                    "--akeyless-url must be http or https, not {other:?}"
                )))
            }
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(BackendError::Config(
                "--akeyless-url must not contain user credentials".into(),
            ));
        }
        if budget < Duration::from_millis(50) {
            return Err(BackendError::Config(
                "--akeyless-timeout must be at least 50ms".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("kms-plugin/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(attempt_timeout(budget))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| BackendError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base: parsed.as_str().trim_end_matches('/').to_string(),
            budget,
        })
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn budget(&self) -> Duration {
        self.budget
    }

    /// Calls `command` with `body`, retrying transient failures until `deadline`.
    pub(crate) async fn call(
        &self,
        op: Op,
        command: &str,
        body: &Map<String, Value>,
        deadline: Instant,
    ) -> Result<Map<String, Value>, CallError> {
        let total = deadline.saturating_duration_since(Instant::now());
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(CallError::Failed(BackendError::Timeout(total)));
            }
            let per_attempt = attempt_timeout(self.budget).min(remaining);
            let raw = match self.send_once(command, body, per_attempt).await {
                Ok(v) => return Ok(v),
                Err(raw) => raw,
            };
            let class = classify(op, &raw, body, &self.base, command, per_attempt);
            let CallError::Failed(mut err) = class else {
                return Err(class);
            };
            if matches!(err, BackendError::Timeout(_)) && attempt > 1 {
                // After retries the caller's whole budget is what ran out.
                err = BackendError::Timeout(total);
            }
            if !err.is_transient() || attempt >= MAX_ATTEMPTS {
                return Err(CallError::Failed(err));
            }
            let retry_after = match &raw {
                Raw::Http { retry_after, .. } => *retry_after,
                _ => None,
            };
            let delay = retry_after
                .unwrap_or_else(|| backoff(attempt, matches!(err, BackendError::Throttled(_))));
            // Only wait if a retry still has a useful amount of time left after the pause.
            let left = deadline.saturating_duration_since(Instant::now());
            if delay + Duration::from_millis(20) >= left {
                return Err(CallError::Failed(err));
            }
            tracing::debug!(command, attempt, delay_ms = delay.as_millis() as u64, error = %err, "retrying Akeyless call");
            tokio::time::sleep(delay).await;
        }
    }

    /// One attempt and no retry, for a call that must not be repeated blindly (a UID rotation whose
    /// answer was lost may already have happened). The attempt may use the whole time to `deadline`.
    pub(crate) async fn call_once(
        &self,
        op: Op,
        command: &str,
        body: &Map<String, Value>,
        deadline: Instant,
    ) -> Result<Map<String, Value>, CallError> {
        let limit = deadline.saturating_duration_since(Instant::now());
        if limit.is_zero() {
            return Err(CallError::Failed(BackendError::Timeout(limit)));
        }
        match self.send_once(command, body, limit).await {
            Ok(v) => Ok(v),
            Err(raw) => Err(classify(op, &raw, body, &self.base, command, limit)),
        }
    }

    async fn send_once(
        &self,
        command: &str,
        body: &Map<String, Value>,
        timeout: Duration,
    ) -> Result<Map<String, Value>, Raw> {
        let url = format!("{}/{}", self.base, command);
        let mut resp = self
            .http
            .post(&url)
            .timeout(timeout)
            .header("accept", "application/json")
            .json(body)
            .send()
            .await
            .map_err(|e| transport(&e))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Bounded read; the buffer may hold a token, so it is wiped when dropped.
        let mut bytes = zeroize::Zeroizing::new(Vec::new());
        while let Some(chunk) = resp.chunk().await.map_err(|e| transport(&e))? {
            if bytes.len() + chunk.len() > MAX_BODY {
                return Err(Raw::BadBody(format!(
                    "/{command} answered with more than {MAX_BODY} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        if !(200..300).contains(&status) {
            return Err(Raw::Http {
                status,
                text: error_text(&bytes),
                retry_after,
            });
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(map),
            // Never echo the body of a success: it may carry a token.
            Ok(_) => Err(Raw::BadBody(format!(
                "/{command} answered with JSON that is not an object"
            ))),
            Err(_) => Err(Raw::BadBody(format!(
                "/{command} answered HTTP {status} with a body that is not JSON ({} bytes); is \
                 --akeyless-url the API (or gateway /api/v2) address?",
                bytes.len()
            ))),
        }
    }
}

/// Credentials that [`interpret_for_fuzzing`] pretends to have sent; no answer may repeat them.
pub(crate) const FUZZ_SENT_SECRETS: [&str; 3] = [
    "t-fuzz0000secret0000token",
    "fuzz-access-key-secret",
    "ZnV6ei1wbGFpbnRleHQ=",
];

/// For fuzzing: one HTTP answer through the same steps as a real call — the success-body check, or
/// error-text extraction, sanitising and classification for every operation. Returns the messages.
pub(crate) fn interpret_for_fuzzing(status: u16, body: &[u8]) -> Vec<String> {
    let mut sent = Map::new();
    for (field, value) in ["token", "access-key", "plaintext"]
        .iter()
        .zip(FUZZ_SENT_SECRETS)
    {
        sent.insert((*field).into(), Value::String(value.into()));
    }
    sent.insert("key-name".into(), Value::String("/k/fuzz".into()));
    if (200..300).contains(&status) {
        return vec![match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(_)) => "object".to_string(),
            Ok(_) => "not an object".to_string(),
            Err(_) => format!("not JSON ({} bytes)", body.len()),
        }];
    }
    let raw = Raw::Http {
        status,
        text: error_text(body),
        retry_after: None,
    };
    [
        Op::Auth,
        Op::UidRotate,
        Op::Describe,
        Op::Encrypt,
        Op::Decrypt,
    ]
    .into_iter()
    .map(|op| {
        format!(
            "{:?}",
            classify(
                op,
                &raw,
                &sent,
                "http://fuzz",
                "cmd",
                Duration::from_secs(1)
            )
        )
    })
    .collect()
}

/// Each attempt may use up to 40% of the budget, so a hung connection still leaves time to retry.
fn attempt_timeout(budget: Duration) -> Duration {
    (budget * 2 / 5).max(Duration::from_millis(20))
}

fn backoff(attempt: u32, throttled: bool) -> Duration {
    let base_ms: u64 = if throttled { 150 } else { 50 };
    let exp = base_ms
        .saturating_mul(3u64.saturating_pow(attempt.saturating_sub(1)))
        .min(600);
    // Jitter in [0.5, 1.5) spreads the retries of many callers.
    let factor: f64 = rand::thread_rng().gen_range(0.5..1.5);
    Duration::from_millis((exp as f64 * factor) as u64)
}

fn transport(e: &reqwest::Error) -> Raw {
    // reqwest's Display names the URL and the cause, never the body.
    let mut text = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    Raw::Transport {
        timed_out: e.is_timeout(),
        text,
    }
}

/// The server's error text from a body in any of the shapes seen: `{"error": ...}`,
/// `{"error": ..., "message": ...}`, `{"message": ...}`, plain text, or nothing.
pub(crate) fn error_text(body: &[u8]) -> String {
    if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(body) {
        let field = |k: &str| match m.get(k) {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
            Some(v @ (Value::Object(_) | Value::Array(_))) => Some(v.to_string()),
            _ => None,
        };
        let parts: Vec<String> = ["error", "message", "error_description", "detail"]
            .iter()
            .filter_map(|k| field(k))
            .collect();
        if !parts.is_empty() {
            let mut out: Vec<String> = Vec::new();
            for p in parts {
                if !out.iter().any(|o| o.contains(&p)) {
                    out.push(p);
                }
            }
            return out.join(": ");
        }
        return String::new();
    }
    String::from_utf8_lossy(body).trim().to_string()
}

/// Shortens server text and removes anything we sent as a credential, in case the server echoed it.
fn sanitize(text: &str, sent: &Map<String, Value>) -> String {
    let mut t: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    for field in SECRET_FIELDS {
        if let Some(Value::String(s)) = sent.get(*field) {
            if s.len() >= 4 {
                t = t.replace(s.as_str(), "<redacted>");
            }
        }
    }
    if t.chars().count() > MAX_ERROR_TEXT {
        t = t.chars().take(MAX_ERROR_TEXT).collect::<String>() + "…";
    }
    if t.is_empty() {
        "(no error text)".to_string()
    } else {
        t
    }
}

/// Lowercase words for matching: `ItemNotFound`, `item_not_found` and `item-not-found` all become
/// `item not found`.
fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut prev_lower = false;
    for c in text.chars() {
        if c.is_ascii_uppercase() && prev_lower {
            out.push(' ');
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        out.push(match c {
            '_' | '-' => ' ',
            c => c.to_ascii_lowercase(),
        });
    }
    out
}

fn any(hay: &str, needles: &[&str]) -> bool {
    needles.iter().any(|n| hay.contains(n))
}

fn key_name_of(sent: &Map<String, Value>) -> String {
    match sent.get("key-name").or_else(|| sent.get("name")) {
        Some(Value::String(s)) => s.clone(),
        _ => "(unnamed)".into(),
    }
}

fn classify(
    op: Op,
    raw: &Raw,
    sent: &Map<String, Value>,
    base: &str,
    command: &str,
    waited: Duration,
) -> CallError {
    let (status, text) = match raw {
        Raw::Transport {
            timed_out: true, ..
        } => return CallError::Failed(BackendError::Timeout(waited)),
        Raw::Transport { text, .. } => {
            return CallError::Failed(BackendError::Unavailable(format!(
                "cannot reach Akeyless at {base}: {}",
                sanitize(text, sent)
            )))
        }
        Raw::BadBody(t) => return CallError::Failed(BackendError::Other(t.clone())),
        Raw::Http { status, text, .. } => (*status, sanitize(text, sent)),
    };
    let lower = normalize(&text);
    let what = format!("/{command} HTTP {status}: {text}");
    if status == 429
        || (status >= 500 && any(&lower, &["rate limit", "too many requests", "throttl"]))
    {
        return CallError::Failed(BackendError::Throttled(what));
    }
    let token_hint = any(
        &lower,
        &[
            "token expired",
            "token is expired",
            "expired token",
            "invalid token",
            "token is invalid",
            "token not valid",
            "token revoked",
            "token is not valid",
            "malformed token",
            "auth token",
        ],
    ) || (lower.contains("token")
        && any(
            &lower,
            &["expired", "revoked", "invalid", "not valid", "unauthorized"],
        ));
    if status >= 500 {
        if token_hint && op != Op::Auth && op != Op::UidRotate {
            return CallError::TokenRejected(what);
        }
        return CallError::Failed(BackendError::Unavailable(what));
    }
    match op {
        Op::Auth => {
            let msg = if any(
                &lower,
                &["access id", "access-id", "accessid", "auth method"],
            ) && any(
                &lower,
                &[
                    "not found",
                    "does not exist",
                    "not exist",
                    "unknown",
                    "invalid",
                ],
            ) {
                format!("unknown access id (the auth method does not exist): {what}")
            } else if any(
                &lower,
                &["access key", "access-key", "signature", "credential"],
            ) {
                format!("wrong access key or credentials: {what}")
            } else {
                format!("credentials rejected: {what}")
            };
            CallError::Failed(BackendError::Authentication(msg))
        }
        Op::UidRotate => CallError::Failed(BackendError::Authentication(format!(
            "Universal Identity token rejected (expired, revoked or already rotated): {what}"
        ))),
        Op::Describe | Op::Encrypt | Op::Decrypt => {
            let key = key_name_of(sent);
            if token_hint
                || (status == 401 && !any(&lower, &["permission", "access denied", "not allowed"]))
            {
                return CallError::TokenRejected(what);
            }
            if any(
                &lower,
                &[
                    "disabled",
                    "not enabled",
                    "is not active",
                    "inactive",
                    "suspended",
                ],
            ) {
                return CallError::Failed(BackendError::KeyDisabled(format!(
                    "Akeyless key {key:?}: {what}"
                )));
            }
            if status == 404
                || any(
                    &lower,
                    &[
                        "not found",
                        "does not exist",
                        "not exist",
                        "no such",
                        "deleted",
                        "no item",
                    ],
                )
            {
                return CallError::Failed(BackendError::KeyNotFound(format!(
                    "Akeyless key {key:?}: {what}"
                )));
            }
            if status == 403
                || any(
                    &lower,
                    &[
                        "permission",
                        "access denied",
                        "not allowed",
                        "forbidden",
                        "unauthorized",
                        "not authorized",
                    ],
                )
            {
                return CallError::Failed(BackendError::PermissionDenied(format!(
                    "Akeyless key {key:?}: {what}; the auth method's role needs read on this key (describe, encrypt, decrypt)"
                )));
            }
            if op == Op::Decrypt && (400..500).contains(&status) {
                return CallError::Failed(BackendError::InvalidCiphertext(what));
            }
            CallError::Failed(BackendError::Other(what))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, text: &str) -> Raw {
        Raw::Http {
            status,
            text: text.into(),
            retry_after: None,
        }
    }

    fn body(pairs: &[(&str, &str)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect()
    }

    fn failed(c: CallError) -> BackendError {
        match c {
            CallError::Failed(e) => e,
            CallError::TokenRejected(t) => panic!("unexpected token rejection {t}"),
        }
    }

    #[test]
    fn parses_error_bodies_tolerantly() {
        assert_eq!(error_text(br#"{"error":"boom"}"#), "boom");
        assert_eq!(
            error_text(br#"{"error":"boom","message":"more"}"#),
            "boom: more"
        );
        assert_eq!(error_text(br#"{"error":"same","message":"same"}"#), "same");
        assert_eq!(error_text(br#"{"message":"only"}"#), "only");
        assert_eq!(error_text(b"plain text\n"), "plain text");
        assert_eq!(error_text(b""), "");
        assert_eq!(error_text(br#"{"other":1}"#), "");
        assert_eq!(error_text(br#"{"error":{"code":3}}"#), r#"{"code":3}"#);
    }

    #[test]
    fn classifies_key_states_and_status_codes() {
        let b = body(&[("key-name", "/k"), ("token", "t-secret-token-value")]);
        let c = |op, raw| classify(op, &raw, &b, "https://x", "encrypt", Duration::from_secs(1));
        assert!(matches!(
            failed(c(Op::Encrypt, http(400, "key is disabled"))),
            BackendError::KeyDisabled(_)
        ));
        assert!(matches!(
            failed(c(Op::Encrypt, http(400, "ItemNotFound"))),
            BackendError::KeyNotFound(_)
        ));
        assert!(matches!(
            failed(c(Op::Encrypt, http(400, "AccessDenied: no rule"))),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(
            c(Op::Encrypt, http(400, "TokenExpired")),
            CallError::TokenRejected(_)
        ));
        assert!(matches!(
            failed(c(Op::Encrypt, http(404, ""))),
            BackendError::KeyNotFound(_)
        ));
        assert!(matches!(
            failed(c(Op::Encrypt, http(400, "Item not found"))),
            BackendError::KeyNotFound(_)
        ));
        assert!(matches!(
            failed(c(Op::Encrypt, http(403, ""))),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(
            failed(c(Op::Encrypt, http(401, "permission denied on item"))),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(
            c(Op::Encrypt, http(401, "")),
            CallError::TokenRejected(_)
        ));
        assert!(matches!(
            c(Op::Describe, http(400, "token expired")),
            CallError::TokenRejected(_)
        ));
        assert!(matches!(
            c(Op::Describe, http(500, "Token is expired")),
            CallError::TokenRejected(_)
        ));
        assert!(matches!(
            failed(c(Op::Encrypt, http(503, "down"))),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(
            failed(c(Op::Encrypt, http(429, ""))),
            BackendError::Throttled(_)
        ));
        assert!(matches!(
            failed(c(Op::Decrypt, http(400, "failed to decrypt"))),
            BackendError::InvalidCiphertext(_)
        ));
        assert!(
            matches!(failed(c(Op::Auth, http(401, "access id not found"))), BackendError::Authentication(m) if m.contains("unknown access id"))
        );
        assert!(matches!(
            failed(c(
                Op::Encrypt,
                Raw::Transport {
                    timed_out: true,
                    text: String::new()
                }
            )),
            BackendError::Timeout(_)
        ));
        // A server that echoes our token gets it redacted.
        let e = failed(c(
            Op::Encrypt,
            http(400, "bad token t-secret-token-value here, item not found"),
        ));
        assert!(!e.to_string().contains("t-secret-token-value"), "{e}");
    }

    #[test]
    fn backoff_is_bounded() {
        for a in 1..10 {
            assert!(backoff(a, true) <= Duration::from_millis(900));
        }
    }
}
