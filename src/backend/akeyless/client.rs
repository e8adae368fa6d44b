//! HTTP transport for the Akeyless API: `POST <base>/<command>` with a JSON body, error
//! classification, and bounded retries with backoff and jitter.
//!
//! Retries happen only for failures that may go away (transport errors, timeouts, 5xx, 429) and only
//! while the caller's deadline leaves room. 4xx answers are never retried here; the caller decides
//! whether a rejected token is worth one re-authentication.
//!
//! # Who answered
//! Akeyless itself answers an error as a JSON object with an `"error"` string and the HTTP status
//! that goes with it. Anything else (an HTML page, an empty or non-JSON body, JSON without an
//! `"error"` string) was written by something between the plugin and Akeyless: a proxy, an ingress
//! default backend, a load balancer, a WAF, a gateway that is still starting. Such an answer never
//! says anything about the key or our credentials, so it is always `Unavailable` (`Throttled` for
//! 429), whatever its status. Only Akeyless's own answers are read further, by [`classify`]'s table.

use std::time::Duration;

use rand::Rng;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::backend::tls::{TlsFlags, TlsOptions};
use crate::backend::BackendError;

/// Header Akeyless's own integrations send to name the client kind.
pub(crate) const CLIENT_TYPE_HEADER: &str = "akeylessclienttype";
/// Our value of [`CLIENT_TYPE_HEADER`].
pub(crate) const CLIENT_TYPE: &str = "k8s-kms-plugin";

/// Option names for TLS errors.
pub(crate) const TLS_FLAGS: TlsFlags = TlsFlags {
    ca_file: "--akeyless-ca-file",
    client_cert_file: "--akeyless-client-cert-file",
    client_key_file: "--akeyless-client-key-file",
};

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
        /// The server's certificate failed verification: our trust set-up, not the network.
        certificate: bool,
        text: String,
    },
    Http {
        status: u16,
        /// The body is Akeyless's own error shape (a JSON object with an `"error"` string).
        from_akeyless: bool,
        /// Akeyless's error text, or a short description of the foreign body.
        text: String,
        retry_after: Option<Duration>,
    },
    /// A success status whose body is not a JSON object: not Akeyless either.
    BadBody(String),
}

/// Time limits of one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Budgets {
    /// One request-path operation (Describe, Encrypt, Decrypt) including retries: below the
    /// apiserver's KMS deadline.
    pub(crate) request: Duration,
    /// Start-up, logins, renewals and rotations, which no apiserver call waits for (cloud logins
    /// make Akeyless call the cloud provider, which can take seconds).
    pub(crate) login: Duration,
}

pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    budgets: Budgets,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("budgets", &self.budgets)
            .finish()
    }
}

impl Client {
    /// `base` is the API URL (path prefixes such as `/api/v2` are kept).
    pub(crate) fn new(
        base: &str,
        budgets: Budgets,
        tls: &TlsOptions,
    ) -> Result<Self, BackendError> {
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
        if budgets.request < Duration::from_millis(50) {
            return Err(BackendError::Config(
                "--akeyless-timeout must be at least 50ms".into(),
            ));
        }
        if budgets.login < budgets.request {
            return Err(BackendError::Config(
                "--akeyless-login-timeout must not be shorter than --akeyless-timeout".into(),
            ));
        }
        let (tls_config, roots) = crate::backend::tls::client_config(tls, &TLS_FLAGS)?;
        if parsed.scheme() == "https" {
            tracing::info!(roots = ?roots, ca_file = ?tls.ca_file, mutual_tls = tls.client_cert_file.is_some(), "Akeyless TLS trust");
        }
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            CLIENT_TYPE_HEADER,
            reqwest::header::HeaderValue::from_static(CLIENT_TYPE),
        );
        let http = reqwest::Client::builder()
            .user_agent(concat!("kms-plugin/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .use_preconfigured_tls(tls_config)
            // Each request's own timeout bounds the request path; this only keeps a login's
            // connection set-up (TCP + TLS to a distant SaaS region) from being cut short.
            .connect_timeout(attempt_timeout(budgets.login))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| BackendError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base: parsed.as_str().trim_end_matches('/').to_string(),
            budgets,
        })
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn budgets(&self) -> Budgets {
        self.budgets
    }

    /// Calls `command` with `body`, retrying transient failures until `deadline`. Each attempt gets
    /// 40% of the time the call was given (a hung connection still leaves room to retry); a login
    /// or rotation may use up to 40% of the login budget even on the request path, so a slow cloud
    /// login is not cut off after a second.
    pub(crate) async fn call(
        &self,
        op: Op,
        command: &str,
        body: &Map<String, Value>,
        deadline: Instant,
    ) -> Result<Map<String, Value>, CallError> {
        self.call_inner(op, command, body, deadline, false)
            .await
            .map(|r| r.unwrap_or_default())
    }

    /// [`Client::call`] for a command some servers do not offer: `Ok(None)` when the server answers
    /// 404, 405 or 501 (in any shape), the command being absent there.
    pub(crate) async fn call_if_offered(
        &self,
        op: Op,
        command: &str,
        body: &Map<String, Value>,
        deadline: Instant,
    ) -> Result<Option<Map<String, Value>>, CallError> {
        self.call_inner(op, command, body, deadline, true).await
    }

    async fn call_inner(
        &self,
        op: Op,
        command: &str,
        body: &Map<String, Value>,
        deadline: Instant,
        absent_ok: bool,
    ) -> Result<Option<Map<String, Value>>, CallError> {
        let total = deadline.saturating_duration_since(Instant::now());
        let attempt_limit = match op {
            Op::Auth | Op::UidRotate => {
                attempt_timeout(total).max(attempt_timeout(self.budgets.login).min(total))
            }
            _ => attempt_timeout(total),
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(CallError::Failed(BackendError::Timeout(total)));
            }
            let per_attempt = attempt_limit.min(remaining);
            let raw = match self.send_once(command, body, per_attempt).await {
                Ok(v) => return Ok(Some(v)),
                Err(Raw::Http { status, .. }) if absent_ok && matches!(status, 404 | 405 | 501) => {
                    return Ok(None)
                }
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
            .map(|s| Duration::from_secs(s.min(30)));
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
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
            return Err(http_error(status, &bytes, &content_type, retry_after));
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(map),
            // Never echo the body of a success: it may carry a token.
            Ok(_) => Err(Raw::BadBody(format!(
                "/{command} answered HTTP {status} with JSON that is not an object"
            ))),
            Err(_) => Err(Raw::BadBody(format!(
                "/{command} answered HTTP {status} with a body that is not JSON ({} bytes{}); is \
                 --akeyless-url the API (or gateway /api/v2) address?",
                bytes.len(),
                describe_type(&content_type)
            ))),
        }
    }
}

fn describe_type(content_type: &str) -> String {
    let t = content_type.split(';').next().unwrap_or("").trim();
    if t.is_empty() {
        String::new()
    } else {
        format!(", {}", t.chars().take(60).collect::<String>())
    }
}

/// An error status and its body, with the answer's origin decided (see the module documentation).
fn http_error(status: u16, body: &[u8], content_type: &str, retry_after: Option<Duration>) -> Raw {
    match akeyless_error(body) {
        Some(text) => Raw::Http {
            status,
            from_akeyless: true,
            text,
            retry_after,
        },
        None => {
            let what = if body.iter().all(u8::is_ascii_whitespace) {
                "an empty body".to_string()
            } else if looks_like_html(body) {
                format!("an HTML page ({} bytes)", body.len())
            } else {
                format!(
                    "a body that is not an Akeyless error ({} bytes{})",
                    body.len(),
                    describe_type(content_type)
                )
            };
            Raw::Http {
                status,
                from_akeyless: false,
                text: what,
                retry_after,
            }
        }
    }
}

/// Markup (HTML, XML): only for describing the body in the message.
fn looks_like_html(body: &[u8]) -> bool {
    String::from_utf8_lossy(&body[..body.len().min(64)])
        .trim_start()
        .starts_with('<')
}

/// Akeyless's error text when `body` is its error shape: a JSON object whose `"error"` is a
/// non-empty string (a `"message"` string next to it is appended).
fn akeyless_error(body: &[u8]) -> Option<String> {
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let error = m.get("error")?.as_str()?.trim();
    if error.is_empty() {
        return None;
    }
    match m.get("message").and_then(Value::as_str).map(str::trim) {
        Some(msg) if !msg.is_empty() && !error.contains(msg) => Some(format!("{error}: {msg}")),
        _ => Some(error.to_string()),
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
    let raw = http_error(status, body, "", None);
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
        certificate: crate::backend::tls::is_certificate_error(e),
        text,
    }
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

/// Exact phrases of Akeyless's error texts that say the *token* (not the key) was refused. Matched
/// case-insensitively inside an Akeyless error; never applied to foreign bodies.
const TOKEN_REJECTED: &[&str] = &[
    "token is expired",
    "token expired",
    "invalid token",
    "token is invalid",
    "token not valid",
    "token is not valid",
    "token was revoked",
    "token revoked",
    "failed to validate token",
];
/// Akeyless phrases for a key that exists but is switched off.
const KEY_DISABLED: &[&str] = &["is disabled", "key disabled", "item is not enabled"];
/// Akeyless phrases for an item that does not exist (it also answers 404 with them).
const ITEM_NOT_FOUND: &[&str] = &["item not found", "not found", "does not exist"];

fn has(text: &str, phrases: &[&str]) -> bool {
    let t = text.to_ascii_lowercase();
    phrases.iter().any(|p| t.contains(p))
}

fn key_name_of(sent: &Map<String, Value>) -> String {
    match sent.get("key-name").or_else(|| sent.get("name")) {
        Some(Value::String(s)) => s.clone(),
        _ => "(unnamed)".into(),
    }
}

/// The error table. Rows are tried top to bottom; "key op" is describe-item, encrypt or decrypt.
///
/// | # | answer                                            | op      | result                    |
/// |---|---------------------------------------------------|---------|---------------------------|
/// | 1 | transport: certificate not trusted                | any     | Config (names CA options) |
/// | 2 | transport: timed out / other                      | any     | Timeout / Unavailable     |
/// | 3 | 2xx whose body is not a JSON object               | any     | Unavailable               |
/// | 4 | not Akeyless's error shape, 429                   | any     | Throttled                 |
/// | 5 | not Akeyless's error shape, any other status      | any     | Unavailable               |
/// | 6 | Akeyless 429                                      | any     | Throttled                 |
/// | 7 | Akeyless, text in [`TOKEN_REJECTED`]              | key op  | TokenRejected (re-auth)   |
/// | 8 | Akeyless 5xx or 408                               | any     | Unavailable               |
/// | 9 | Akeyless 4xx                                      | auth    | Authentication            |
/// |10 | Akeyless 4xx                                      | rotate  | Authentication            |
/// |11 | Akeyless 401                                      | key op  | TokenRejected (re-auth)   |
/// |12 | Akeyless 403                                      | key op  | PermissionDenied          |
/// |13 | Akeyless 404                                      | key op  | KeyNotFound               |
/// |14 | Akeyless 4xx, text in [`KEY_DISABLED`]            | key op  | KeyDisabled               |
/// |15 | Akeyless 4xx, text in [`ITEM_NOT_FOUND`]          | key op  | KeyNotFound               |
/// |16 | Akeyless 400                                      | decrypt | InvalidCiphertext         |
/// |17 | anything else                                     | any     | Other                     |
///
/// A second refusal of a fresh token (row 7 or 11 twice) becomes Authentication in the caller.
fn classify(
    op: Op,
    raw: &Raw,
    sent: &Map<String, Value>,
    base: &str,
    command: &str,
    waited: Duration,
) -> CallError {
    use BackendError as E;
    let fail = |e: BackendError| CallError::Failed(e);
    let (status, from_akeyless, text) = match raw {
        Raw::Transport {
            certificate: true,
            text,
            ..
        } => {
            return fail(E::Config(format!(
                "the TLS certificate of {base} is not trusted: {}; trust its CA with \
                 --akeyless-ca-file (PEM bundle) or SSL_CERT_FILE/SSL_CERT_DIR",
                sanitize(text, sent)
            )))
        }
        Raw::Transport {
            timed_out: true, ..
        } => return fail(E::Timeout(waited)),
        Raw::Transport { text, .. } => {
            return fail(E::Unavailable(format!(
                "cannot reach Akeyless at {base}: {}",
                sanitize(text, sent)
            )))
        }
        Raw::BadBody(t) => {
            return fail(E::Unavailable(format!(
                "{t}; not an Akeyless answer (a proxy or captive portal in the path?)"
            )))
        }
        Raw::Http {
            status,
            from_akeyless,
            text,
            ..
        } => (*status, *from_akeyless, sanitize(text, sent)),
    };
    if !from_akeyless {
        let what = format!(
            "/{command} HTTP {status} with {text}: not an Akeyless answer; something between the \
             plugin and {base} (proxy, ingress, load balancer, gateway starting up) answered"
        );
        return fail(if status == 429 {
            E::Throttled(what)
        } else {
            E::Unavailable(what)
        });
    }
    let what = format!("/{command} HTTP {status}: {text}");
    let key_op = matches!(op, Op::Describe | Op::Encrypt | Op::Decrypt);
    if status == 429 {
        return fail(E::Throttled(what));
    }
    if key_op && has(&text, TOKEN_REJECTED) {
        return CallError::TokenRejected(what);
    }
    if status >= 500 || status == 408 || status < 400 {
        return fail(E::Unavailable(what));
    }
    let key = key_name_of(sent);
    match (op, status) {
        (Op::Auth, _) => fail(E::Authentication(format!(
            "Akeyless refused the login (check the access id, the credentials and the auth \
             method's type): {what}"
        ))),
        (Op::UidRotate, _) => fail(E::Authentication(format!(
            "Universal Identity token rejected (expired, revoked or already rotated): {what}"
        ))),
        (_, 401) => CallError::TokenRejected(what),
        (_, 403) => fail(E::PermissionDenied(format!(
            "Akeyless key {key:?}: {what}; the auth method's role needs read on this key \
             (describe, encrypt, decrypt)"
        ))),
        (_, 404) => fail(E::KeyNotFound(format!("Akeyless key {key:?}: {what}"))),
        _ if has(&text, KEY_DISABLED) => {
            fail(E::KeyDisabled(format!("Akeyless key {key:?}: {what}")))
        }
        _ if has(&text, ITEM_NOT_FOUND) => {
            fail(E::KeyNotFound(format!("Akeyless key {key:?}: {what}")))
        }
        (Op::Decrypt, 400) => fail(E::InvalidCiphertext(what)),
        _ => fail(E::Other(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn akeyless(status: u16, error: &str) -> Raw {
        http_error(
            status,
            serde_json::json!({ "error": error }).to_string().as_bytes(),
            "application/json",
            None,
        )
    }

    fn foreign(status: u16, body: &[u8]) -> Raw {
        http_error(status, body, "text/html", None)
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
    fn only_a_json_error_string_is_akeylesss_shape() {
        assert_eq!(
            akeyless_error(br#"{"error":"boom"}"#).as_deref(),
            Some("boom")
        );
        assert_eq!(
            akeyless_error(br#"{"error":"boom","message":"more"}"#).as_deref(),
            Some("boom: more")
        );
        for not in [
            &b""[..],
            b"   ",
            b"<html><body>404 Not Found</body></html>",
            b"item not found",
            br#"{"message":"item not found"}"#,
            br#"{"error":""}"#,
            br#"{"error":{"code":3}}"#,
            br#"{"error":null}"#,
            br#"["error"]"#,
        ] {
            assert_eq!(
                akeyless_error(not),
                None,
                "{:?}",
                String::from_utf8_lossy(not)
            );
        }
    }

    #[test]
    fn foreign_answers_are_never_revocations() {
        let b = body(&[("key-name", "/k"), ("token", "t-secret-token-value")]);
        let bodies: [&[u8]; 5] = [
            b"",
            b"<!DOCTYPE html><html><title>403 Forbidden</title>item not found, key is disabled</html>",
            b"Not Found",
            br#"{"message":"Forbidden"}"#,
            br#"{"error":{"reason":"not found"}}"#,
        ];
        for op in [
            Op::Auth,
            Op::UidRotate,
            Op::Describe,
            Op::Encrypt,
            Op::Decrypt,
        ] {
            for status in [400u16, 401, 403, 404, 410, 500, 502, 503] {
                for raw in bodies {
                    let c = classify(
                        op,
                        &foreign(status, raw),
                        &b,
                        "https://x",
                        "encrypt",
                        Duration::from_secs(1),
                    );
                    let e = failed(c);
                    assert!(
                        matches!(e, BackendError::Unavailable(_)),
                        "{op:?} {status}: {e}"
                    );
                    assert!(e.to_string().contains("not an Akeyless answer"), "{e}");
                }
            }
            let c = classify(
                op,
                &foreign(429, b""),
                &b,
                "https://x",
                "encrypt",
                Duration::from_secs(1),
            );
            assert!(matches!(failed(c), BackendError::Throttled(_)));
        }
    }

    #[test]
    fn the_table_for_akeyless_answers() {
        let b = body(&[("key-name", "/k"), ("token", "t-secret-token-value")]);
        let c = |op, raw| classify(op, &raw, &b, "https://x", "encrypt", Duration::from_secs(1));
        use BackendError as E;
        let cases: &[(Op, u16, &str, &str)] = &[
            (Op::Encrypt, 429, "rate limit", "Throttled"),
            (Op::Encrypt, 503, "down", "Unavailable"),
            (Op::Encrypt, 408, "timeout", "Unavailable"),
            (Op::Auth, 401, "access id not found", "Authentication"),
            (Op::Auth, 400, "failed to authenticate", "Authentication"),
            (Op::Auth, 500, "internal", "Unavailable"),
            (Op::UidRotate, 401, "expired", "Authentication"),
            (Op::Encrypt, 403, "access denied", "PermissionDenied"),
            (Op::Describe, 404, "failed to get item", "KeyNotFound"),
            (Op::Encrypt, 400, "key is disabled", "KeyDisabled"),
            (Op::Encrypt, 400, "Item not found", "KeyNotFound"),
            (Op::Decrypt, 400, "failed to decrypt", "InvalidCiphertext"),
            (Op::Encrypt, 400, "bad request", "Other"),
        ];
        for (op, status, text, want) in cases {
            let got = failed(c(*op, akeyless(*status, text)));
            let name = format!("{got:?}");
            assert!(name.starts_with(want), "{op:?} {status} {text:?}: {got}");
        }
        for (op, status, text) in [
            (Op::Encrypt, 401, ""),
            (Op::Encrypt, 401, "Unauthorized"),
            (Op::Describe, 400, "Token is expired"),
            (
                Op::Describe,
                500,
                "failed to validate token: token is expired",
            ),
            (Op::Decrypt, 403, "invalid token"),
        ] {
            let raw = if text.is_empty() {
                // An Akeyless 401 whose error string is blank is not its shape: Unavailable.
                assert!(matches!(
                    failed(c(op, akeyless(status, text))),
                    E::Unavailable(_)
                ));
                continue;
            } else {
                akeyless(status, text)
            };
            assert!(
                matches!(c(op, raw), CallError::TokenRejected(_)),
                "{op:?} {status} {text}"
            );
        }
        assert!(matches!(
            failed(c(
                Op::Encrypt,
                Raw::Transport {
                    timed_out: true,
                    certificate: false,
                    text: String::new()
                }
            )),
            E::Timeout(_)
        ));
        let e = failed(c(
            Op::Encrypt,
            Raw::Transport {
                timed_out: false,
                certificate: true,
                text: "invalid peer certificate: UnknownIssuer".into(),
            },
        ));
        assert!(
            matches!(&e, E::Config(m) if m.contains("--akeyless-ca-file") && m.contains("SSL_CERT_FILE")),
            "{e}"
        );
        assert!(matches!(
            failed(c(Op::Describe, Raw::BadBody("x".into()))),
            E::Unavailable(_)
        ));
        // A server that echoes our token gets it redacted.
        let e = failed(c(
            Op::Encrypt,
            akeyless(400, "bad token t-secret-token-value here, item not found"),
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
