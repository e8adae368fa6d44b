//! The Akeyless backend: an AES256GCM key in Akeyless wraps the engine's local KEKs.
//!
//! - [`config`]: the `--akeyless-*` options and the drop-in environment of the original plugin.
//! - [`client`]: HTTP, error parsing, retries.
//! - [`auth`]: `/auth` for every access type, the token manager, the cloud identity hook.
//! - [`uid`]: Universal Identity token rotation and persistence.
//!
//! Start-up mirrors the original plugin: authenticate, describe the key, one encryption round trip.
//! A permanent answer there (credentials refused by Akeyless, missing key, wrong key type, bad
//! configuration) stops start-up with its cause; a transient one (Akeyless or the network away)
//! does not: the backend is returned, the engine's start-up probe reports it unhealthy, and the
//! next calls log in again by themselves.
//! `current_key` is `/describe-item` (cheap, no cryptography): the key_id carries the item id and
//! last version, so "rotate key" in Akeyless is noticed by the engine's probe, while old ciphertexts
//! keep decrypting because Akeyless puts the key version inside its ciphertext.

pub mod auth;
pub(crate) mod client;
pub mod cloud_id;
pub mod config;
pub mod uid;

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{Map, Value};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use zeroize::Zeroizing;

use self::auth::{CloudIdProvider, CloudIdRequest, Method, TokenManager};
use self::client::{Budgets, CallError, Client, Op};
pub use self::config::{AccessType, AkeylessArgs, Secret};
use self::uid::UidState;
use super::{Backend, BackendError, BackendEvents, KeyIdentity, SecretBytes, WrappedKey};

/// [`Backend::kind`] of this backend.
pub(crate) const KIND: &str = "akeyless";

/// Longest key name we accept: it is stored in clear in every ciphertext.
const MAX_KEY_NAME: usize = 255;
/// Hosts of the Akeyless SaaS: some auth methods (k8s) only work through a customer Gateway.
const SAAS_HOST_SUFFIX: &str = "akeyless.io";

/// See the module documentation.
pub struct AkeylessBackend {
    key_name: String,
    client: Arc<Client>,
    tokens: Arc<TokenManager>,
    uid: Option<Arc<UidState>>,
    context: Option<Map<String, Value>>,
    tasks: Vec<AbortHandle>,
    /// Budget of background logins and rotations.
    login_budget: Duration,
}

/// True when `url` is the Akeyless SaaS rather than a Gateway.
fn is_saas(url: &str) -> bool {
    reqwest::Url::parse(url.trim())
        .ok()
        .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
        .is_some_and(|h| h == SAAS_HOST_SUFFIX || h.ends_with(&format!(".{SAAS_HOST_SUFFIX}")))
}

impl std::fmt::Debug for AkeylessBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AkeylessBackend")
            .field("url", &self.client.base())
            .field("key_name", &self.key_name)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl Drop for AkeylessBackend {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn missing(what: &str, flag: &str, env: &str) -> BackendError {
    BackendError::Config(format!("{what} is required: set {flag} (env {env})"))
}

const CERT_ENV: &str = "KMS_PLUGIN_AKEYLESS_CERT_FILE";
const KEY_ENV: &str = "KMS_PLUGIN_AKEYLESS_KEY_FILE";
const JWT_ENV: &str = "KMS_PLUGIN_AKEYLESS_JWT_FILE";

fn saved_uid_token(state_dir: Option<&std::path::Path>) -> bool {
    state_dir.is_some_and(|d| d.join(uid::UID_TOKEN_FILE).exists())
}

fn read_file_secret(path: &PathBuf, what: &str) -> Result<Secret, BackendError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        BackendError::Config(format!(
            "cannot read the {what} file {}: {e}",
            path.display()
        ))
    })?);
    let s = Secret::new(text.trim());
    if s.is_empty() {
        return Err(BackendError::Config(format!(
            "the {what} file {} is empty",
            path.display()
        )));
    }
    Ok(s)
}

impl AkeylessBackend {
    /// What `kms-plugin serve` calls: secrets from `KMS_PLUGIN_AKEYLESS_ACCESS_KEY` /
    /// `KMS_PLUGIN_AKEYLESS_UID_TOKEN`, then whatever is still unset from the original plugin's
    /// `AKEYLESS_*` variables (explicit options win), then [`AkeylessBackend::connect_with_events`]
    /// with the default cloud identity provider.
    pub async fn connect_from_env(
        args: &AkeylessArgs,
        state_dir: Option<PathBuf>,
        events: Arc<dyn BackendEvents>,
    ) -> Result<Self, BackendError> {
        let mut args = args.clone();
        args.load_secrets_from_env();
        args.apply_legacy_env(|k| std::env::var(k).ok())
            .map_err(BackendError::Config)?;
        let cloud = auth::default_cloud_id_provider(&args);
        Self::connect_with_events(&args, state_dir, cloud, events).await
    }

    /// Connects with the default cloud identity provider. See [`AkeylessBackend::connect_with`].
    pub async fn connect(
        args: &AkeylessArgs,
        state_dir: Option<PathBuf>,
    ) -> Result<Self, BackendError> {
        Self::connect_with(args, state_dir, auth::default_cloud_id_provider(args)).await
    }

    /// [`AkeylessBackend::connect_with_events`] without an event hook.
    pub async fn connect_with(
        args: &AkeylessArgs,
        state_dir: Option<PathBuf>,
        cloud: Arc<dyn CloudIdProvider>,
    ) -> Result<Self, BackendError> {
        Self::connect_with_events(args, state_dir, cloud, super::no_events()).await
    }

    /// Authenticates, checks the key (exists, enabled, AES) and does one encryption round trip, then
    /// starts the background token renewal (and UID rotation). Errors name the cause. Every
    /// authentication (`/auth`, start-up included) and UID token rotation, successful or not, is
    /// reported to `events`.
    pub async fn connect_with_events(
        args: &AkeylessArgs,
        state_dir: Option<PathBuf>,
        cloud: Arc<dyn CloudIdProvider>,
        events: Arc<dyn BackendEvents>,
    ) -> Result<Self, BackendError> {
        let key_name = args
            .key_name
            .clone()
            .filter(|k| !k.trim().is_empty())
            .ok_or_else(|| {
                missing(
                    "the Akeyless key name",
                    "--akeyless-key-name",
                    "KMS_PLUGIN_AKEYLESS_KEY_NAME",
                )
            })?;
        if key_name.len() > MAX_KEY_NAME {
            return Err(BackendError::Config(format!(
                "Akeyless key name is longer than {MAX_KEY_NAME} bytes"
            )));
        }
        let budgets = Budgets {
            request: args.timeout,
            login: args.login_timeout,
        };
        let client = Arc::new(Client::new(&args.url, budgets, &args.tls())?);
        let slow = || Instant::now() + budgets.login;

        let access_key = match (&args.access_key, &args.access_key_file) {
            (Some(k), _) => Some(k.clone()),
            (None, Some(p)) => Some(read_file_secret(p, "access key")?),
            (None, None) => None,
        };
        let uid_init = match (&args.uid_token, &args.uid_token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(p)) => Some(read_file_secret(p, "UID token")?),
            (None, None) => None,
        };
        let access_type = match args.access_type {
            Some(t) => t,
            None if access_key.is_some() => AccessType::AccessKey,
            None if uid_init.is_some() || saved_uid_token(state_dir.as_deref()) => {
                AccessType::UniversalIdentity
            }
            None => cloud.detect().await.ok_or_else(|| {
                BackendError::Config(
                    "cannot tell how to authenticate to Akeyless: set --akeyless-access-type, or provide an \
                     access key (KMS_PLUGIN_AKEYLESS_ACCESS_KEY) or a UID token (KMS_PLUGIN_AKEYLESS_UID_TOKEN); \
                     no cloud identity was detected"
                        .into(),
                )
            })?,
        };
        let needs_id = access_type != AccessType::UniversalIdentity;
        if needs_id
            && args
                .access_id
                .as_deref()
                .is_none_or(|s| s.trim().is_empty())
        {
            return Err(missing(
                "the Akeyless access id",
                "--akeyless-access-id",
                "KMS_PLUGIN_AKEYLESS_ACCESS_ID",
            ));
        }
        if access_type == AccessType::K8s && is_saas(&args.url) {
            return Err(BackendError::Config(format!(
                "the k8s auth method works only through an Akeyless Gateway, not the SaaS URL {}: \
                 set --akeyless-url to your Gateway (e.g. https://gw:8000/api/v2)",
                args.url
            )));
        }
        let mut uid_state = None;
        let mut uid_login = None;
        let method = match access_type {
            AccessType::AccessKey => Method::AccessKey(access_key.ok_or_else(|| {
                BackendError::Config(
                    "access_key auth needs the access key: env KMS_PLUGIN_AKEYLESS_ACCESS_KEY or \
                     --akeyless-access-key-file"
                        .into(),
                )
            })?),
            AccessType::UniversalIdentity => {
                let (state, login) = UidState::start(
                    &client,
                    args.access_id.as_deref(),
                    uid_init,
                    state_dir.as_deref(),
                    args.uid_ttl,
                    slow(),
                    events.clone(),
                )
                .await?;
                let state = Arc::new(state);
                uid_login = login;
                uid_state = Some(state.clone());
                Method::Uid(state)
            }
            AccessType::K8s => Method::K8s {
                config_name: args.k8s_auth_config_name.clone().ok_or_else(|| {
                    missing(
                        "k8s auth config name",
                        "--akeyless-k8s-auth-config-name",
                        "KMS_PLUGIN_AKEYLESS_K8S_AUTH_CONFIG_NAME",
                    )
                })?,
                token_file: args.k8s_service_account_token_file.clone(),
            },
            AccessType::Cert => Method::Cert {
                cert_file: args.cert_file.clone().ok_or_else(|| {
                    missing("the client certificate", "--akeyless-cert-file", CERT_ENV)
                })?,
                key_file: args
                    .key_file
                    .clone()
                    .ok_or_else(|| missing("the client key", "--akeyless-key-file", KEY_ENV))?,
            },
            AccessType::Jwt => Method::Jwt {
                file: args
                    .jwt_file
                    .clone()
                    .ok_or_else(|| missing("the JWT file", "--akeyless-jwt-file", JWT_ENV))?,
            },
            kind @ (AccessType::AwsIam | AccessType::AzureAd | AccessType::Gcp) => Method::Cloud {
                provider: cloud,
                req: CloudIdRequest {
                    kind,
                    azure_object_id: args.azure_object_id.clone(),
                    gcp_audience: args.gcp_audience.clone(),
                },
            },
        };
        let tokens = Arc::new(TokenManager::new(
            client.clone(),
            args.access_id.clone(),
            method,
            events,
        ));
        if let Some(login) = &uid_login {
            tokens.install_login(login)?;
        }
        let context = (!args.encryption_context.is_empty()).then(|| {
            args.encryption_context
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect()
        });
        let mut backend = AkeylessBackend {
            key_name,
            client: client.clone(),
            tokens: tokens.clone(),
            uid: uid_state,
            context,
            tasks: Vec::new(),
            login_budget: budgets.login,
        };

        match backend.startup_check(slow()).await {
            Ok(id) => {
                tracing::info!(url = backend.client.base(), key_id = %id.key_id, "Akeyless backend ready")
            }
            Err(e) if e.is_transient() => tracing::warn!(
                url = backend.client.base(),
                error = %e,
                "Akeyless is not reachable at start-up; starting unhealthy, logging in and checking \
                 the key again in the background"
            ),
            Err(e) => return Err(e),
        }

        backend.tasks.push(
            tokio::spawn(renew_tokens(Arc::downgrade(&tokens), budgets.login)).abort_handle(),
        );
        if let Some(uid) = &backend.uid {
            backend.tasks.push(
                tokio::spawn(rotate_uid(
                    Arc::downgrade(uid),
                    Arc::downgrade(&tokens),
                    client.clone(),
                    budgets.login,
                ))
                .abort_handle(),
            );
        }
        Ok(backend)
    }

    /// Number of `/auth` calls so far (for tests and metrics).
    pub fn auth_calls(&self) -> u64 {
        self.tokens.auth_calls()
    }

    /// Seconds until the Universal Identity token expires, when UID is in use and this is known.
    pub fn uid_token_seconds_left(&self) -> Option<f64> {
        self.uid.as_ref()?.seconds_left()
    }

    /// Rotates the Universal Identity token now (for tests and an operator endpoint).
    pub async fn rotate_uid_token(&self) -> Result<(), BackendError> {
        let uid = self
            .uid
            .as_ref()
            .ok_or_else(|| BackendError::Config("not using Universal Identity".into()))?;
        uid.rotate(
            &self.client,
            Instant::now() + self.login_budget,
            Some(self.tokens.flight()),
        )
        .await
    }

    /// What the original plugin checks before listening: log in, the key exists, is enabled and
    /// is an AES key, and one encryption round trip works.
    async fn startup_check(&self, deadline: Instant) -> Result<KeyIdentity, BackendError> {
        self.tokens.get(deadline).await?;
        let item = self.describe(deadline).await?;
        let kind = if is_classic(&item) { "Classic" } else { "DFC" };
        match key_algorithm(&item) {
            Some(t) if !t.to_ascii_uppercase().contains("AES") => {
                return Err(BackendError::Config(format!(
                    "Akeyless item {:?} is a {kind} key of type {t}, not an AES key; create an \
                     AES256GCM key",
                    self.key_name
                )))
            }
            Some(t) if !t.to_ascii_uppercase().contains("GCM") => tracing::warn!(
                item_type = t,
                "the Akeyless key is not AES-GCM; AES256GCM is recommended"
            ),
            Some(_) => {}
            None => tracing::warn!(
                "Akeyless did not say the key's algorithm; the round trip decides whether it works"
            ),
        }
        let id = identity(&self.key_name, &item)?;
        let display_id = item
            .get("display_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        tracing::info!(key = %self.key_name, display_id, "using {kind} key");
        let probe = Zeroizing::new(rand::random::<[u8; 32]>());
        let wrapped = self.encrypt(&probe[..], deadline).await?;
        let back = self.decrypt(&self.key_name, &wrapped, deadline).await?;
        if back[..] != probe[..] {
            return Err(BackendError::Other(
                "the start-up round trip through Akeyless returned different data".into(),
            ));
        }
        Ok(id)
    }

    /// A call that needs a token: one re-authentication if the server rejects it.
    async fn authed(
        &self,
        op: Op,
        command: &str,
        mut body: Map<String, Value>,
        deadline: Instant,
    ) -> Result<Map<String, Value>, BackendError> {
        let mut reauthenticated = false;
        loop {
            let (token, generation) = self.tokens.get(deadline).await?;
            body.insert("token".into(), Value::String(token.expose().to_string()));
            let result = self.client.call(op, command, &body, deadline).await;
            body.remove("token");
            match result {
                Ok(reply) => return Ok(reply),
                Err(CallError::Failed(e)) => return Err(e),
                Err(CallError::TokenRejected(msg)) if !reauthenticated => {
                    tracing::info!(command, reason = %msg, "Akeyless rejected the token; authenticating again");
                    self.tokens.reject(generation);
                    reauthenticated = true;
                }
                Err(CallError::TokenRejected(msg)) => {
                    return Err(BackendError::Authentication(format!(
                        "Akeyless rejected a fresh token: {msg}"
                    )))
                }
            }
        }
    }

    async fn describe(&self, deadline: Instant) -> Result<Map<String, Value>, BackendError> {
        let mut body = Map::new();
        body.insert("name".into(), Value::String(self.key_name.clone()));
        let item = self
            .authed(Op::Describe, "describe-item", body, deadline)
            .await?;
        check_state(&self.key_name, &item)?;
        Ok(item)
    }

    async fn encrypt(&self, plaintext: &[u8], deadline: Instant) -> Result<Vec<u8>, BackendError> {
        let mut body = Map::new();
        body.insert("key-name".into(), Value::String(self.key_name.clone()));
        body.insert("plaintext".into(), Value::String(B64.encode(plaintext)));
        body.insert("input-format".into(), Value::String("base64".into()));
        if let Some(ctx) = &self.context {
            body.insert("encryption-context".into(), Value::Object(ctx.clone()));
        }
        let reply = self.authed(Op::Encrypt, "encrypt", body, deadline).await;
        // The request body held the plaintext in base64; it was dropped with `body` above.
        let reply = reply?;
        match reply.get("result") {
            Some(Value::String(c)) if !c.is_empty() => Ok(c.as_bytes().to_vec()),
            _ => Err(BackendError::Other(
                "/encrypt answered without a ciphertext".into(),
            )),
        }
    }

    async fn decrypt(
        &self,
        key_name: &str,
        ciphertext: &[u8],
        deadline: Instant,
    ) -> Result<SecretBytes, BackendError> {
        let text = std::str::from_utf8(ciphertext).map_err(|_| {
            BackendError::InvalidCiphertext("not an Akeyless ciphertext (not text)".into())
        })?;
        if text.trim().is_empty() {
            return Err(BackendError::InvalidCiphertext("empty ciphertext".into()));
        }
        let mut body = Map::new();
        body.insert("key-name".into(), Value::String(key_name.to_string()));
        body.insert("ciphertext".into(), Value::String(text.to_string()));
        body.insert("output-format".into(), Value::String("base64".into()));
        if let Some(ctx) = &self.context {
            body.insert("encryption-context".into(), Value::Object(ctx.clone()));
        }
        let mut reply = self.authed(Op::Decrypt, "decrypt", body, deadline).await?;
        let result = match reply.remove("result") {
            Some(Value::String(s)) => Zeroizing::new(s),
            _ => {
                return Err(BackendError::Other(
                    "/decrypt answered without a result".into(),
                ))
            }
        };
        let plain = B64.decode(result.trim()).map_err(|_| {
            BackendError::Other("/decrypt answered with a result that is not base64".into())
        })?;
        Ok(Zeroizing::new(plain))
    }

    async fn legacy_v1(&self, cipher: &[u8]) -> Result<SecretBytes, BackendError> {
        let candidates = legacy_candidates(cipher);
        if candidates.is_empty() {
            return Err(BackendError::InvalidCiphertext(
                "not an Akeyless ciphertext (neither text nor base64 of text)".into(),
            ));
        }
        let mut last = None;
        for text in candidates {
            match self
                .decrypt(&self.key_name, text.as_bytes(), self.deadline())
                .await
            {
                Ok(plain) => return legacy_dek(plain),
                Err(e @ BackendError::InvalidCiphertext(_)) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one candidate was tried"))
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.client.budgets().request
    }
}

/// Fuzzing entry point: interprets one Akeyless HTTP answer (status and body) the way the backend
/// does — error classification for every command, and for an object body the key state and key
/// identity of `/describe-item`. Never panics. The `errors` never contain [`fuzz_sent_secrets`].
#[doc(hidden)]
pub fn interpret_response_for_fuzzing(status: u16, body: &[u8]) -> FuzzInterpretation {
    let errors = client::interpret_for_fuzzing(status, body);
    // The legacy v1 decoders see bytes from etcd and values from /decrypt.
    let mut legacy: Vec<String> = Vec::new();
    legacy.extend(
        legacy_candidates(body)
            .into_iter()
            .map(|c| format!("candidate of {} bytes", c.len())),
    );
    if let Err(e) = legacy_dek(Zeroizing::new(body.to_vec())) {
        legacy.push(e.to_string());
    }
    let (state, key_id) = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(item)) => (
            Some(format!("{:?}", check_state("/k/fuzz", &item))),
            identity("/k/fuzz", &item).ok().map(|i| i.key_id),
        ),
        _ => (None, None),
    };
    FuzzInterpretation {
        errors,
        legacy,
        state,
        key_id,
    }
}

/// What [`interpret_response_for_fuzzing`] found.
#[doc(hidden)]
#[derive(Debug)]
pub struct FuzzInterpretation {
    pub errors: Vec<String>,
    /// What the legacy v1 decoders made of the body (candidate lengths, refusals).
    pub legacy: Vec<String>,
    pub state: Option<String>,
    pub key_id: Option<String>,
}

/// The credentials [`interpret_response_for_fuzzing`] pretends to have sent.
#[doc(hidden)]
pub fn fuzz_sent_secrets() -> &'static [&'static str] {
    &client::FUZZ_SENT_SECRETS
}

/// The texts a legacy v1 cipher may hold for `/decrypt`: the stored bytes as text, then the text
/// inside one more base64 layer.
fn legacy_candidates(cipher: &[u8]) -> Vec<String> {
    let printable = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic());
    let mut out = Vec::new();
    if let Ok(text) = std::str::from_utf8(cipher) {
        let text = text.trim();
        if printable(text) {
            out.push(text.to_string());
        }
        if let Ok(inner) = B64.decode(text) {
            if let Ok(inner) = String::from_utf8(inner) {
                if printable(inner.trim()) && !out.contains(&inner) {
                    out.push(inner.trim().to_string());
                }
            }
        }
    }
    out
}

/// The DEK inside a decrypted legacy value: raw AES key bytes, or their base64.
fn legacy_dek(plain: SecretBytes) -> Result<SecretBytes, BackendError> {
    let aes = |n: usize| matches!(n, 16 | 24 | 32);
    if aes(plain.len()) {
        return Ok(plain);
    }
    if let Ok(text) = std::str::from_utf8(&plain) {
        if let Ok(inner) = B64.decode(text.trim()) {
            if aes(inner.len()) {
                return Ok(Zeroizing::new(inner));
            }
        }
    }
    Err(BackendError::InvalidCiphertext(format!(
        "the legacy ciphertext decrypted to {} bytes, neither an AES key nor one in base64",
        plain.len()
    )))
}

/// A Classic key: `item_type` says so and the algorithm sits in
/// `item_general_info.classic_key_details.key_type`.
fn is_classic(item: &Map<String, Value>) -> bool {
    item.get("item_type")
        .and_then(Value::as_str)
        .is_some_and(|t| t.eq_ignore_ascii_case("CLASSIC_KEY"))
}

/// The key's algorithm: `item_type` for DFC keys (`AES256GCM`), the classic key details otherwise.
fn key_algorithm(item: &Map<String, Value>) -> Option<&str> {
    if is_classic(item) {
        return item
            .get("item_general_info")?
            .get("classic_key_details")?
            .get("key_type")?
            .as_str();
    }
    item.get("item_type").and_then(Value::as_str)
}

/// Disabled or deleted keys, as `/describe-item` reports them.
fn check_state(name: &str, item: &Map<String, Value>) -> Result<(), BackendError> {
    if item.get("is_enabled").and_then(Value::as_bool) == Some(false) {
        return Err(BackendError::KeyDisabled(format!(
            "Akeyless key {name:?} is disabled"
        )));
    }
    if let Some(state) = item.get("item_state").and_then(Value::as_str) {
        let s = state.to_ascii_lowercase();
        if s.contains("delet") || s.contains("destroy") {
            return Err(BackendError::KeyNotFound(format!(
                "Akeyless key {name:?} is {state}"
            )));
        }
        if s.contains("disabled") || s.contains("suspend") {
            return Err(BackendError::KeyDisabled(format!(
                "Akeyless key {name:?} is {state}"
            )));
        }
    }
    Ok(())
}

/// key_id = `<name>@<item_id>:v<last_version>`; the name is cut to keep the id bounded.
fn identity(name: &str, item: &Map<String, Value>) -> Result<KeyIdentity, BackendError> {
    let version = item
        .get("last_version")
        .and_then(Value::as_u64)
        .or_else(|| {
            item.get("item_versions")?
                .as_array()?
                .iter()
                .filter_map(|v| v.get("version")?.as_u64())
                .max()
        });
    let item_id = item.get("item_id").and_then(|v| {
        v.as_u64()
            .map(|n| n.to_string())
            .or(v.as_str().map(String::from))
    });
    let short: String = name.chars().take(200).collect();
    let mut key_id = short;
    if let Some(id) = item_id {
        key_id.push('@');
        key_id.extend(
            id.chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(40),
        );
    }
    if let Some(v) = version {
        key_id.push_str(&format!(":v{v}"));
    }
    Ok(KeyIdentity {
        key_id,
        key_ref: name.to_string(),
    })
}

/// Background: renew the token before it expires.
async fn renew_tokens(tokens: Weak<TokenManager>, budget: Duration) {
    loop {
        let Some(at) = tokens.upgrade().map(|t| t.next_check()) else {
            return;
        };
        tokio::time::sleep_until(at).await;
        let Some(t) = tokens.upgrade() else { return };
        if let Err(e) = t.renew(Instant::now() + budget).await {
            tracing::warn!(error = %e, "Akeyless token renewal failed; retrying");
        }
    }
}

/// Background: rotate the UID token at half its TTL; retry sooner after a failure.
async fn rotate_uid(
    uid: Weak<UidState>,
    tokens: Weak<TokenManager>,
    client: Arc<Client>,
    budget: Duration,
) {
    let mut wait = uid.upgrade().map(|u| u.first_wait()).unwrap_or_default();
    loop {
        tokio::time::sleep(wait).await;
        let (Some(u), Some(t)) = (uid.upgrade(), tokens.upgrade()) else {
            return;
        };
        wait = match u
            .rotate(&client, Instant::now() + budget, Some(t.flight()))
            .await
        {
            Ok(()) => u.interval(),
            Err(e) => {
                tracing::warn!(error = %e, "Akeyless UID token rotation failed; keeping the current token and retrying");
                u.retry_pause()
            }
        };
    }
}

#[async_trait]
impl Backend for AkeylessBackend {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn current_key(&self) -> Result<KeyIdentity, BackendError> {
        // A UID token about to expire while rotation fails is a fact the operator must see.
        if let Some(uid) = &self.uid {
            uid.health()?;
        }
        let item = self.describe(self.deadline()).await?;
        identity(&self.key_name, &item)
    }

    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        let ciphertext = self.encrypt(plaintext, self.deadline()).await?;
        // `/encrypt` does not say which version it used, and versions only grow: the version
        // described right after the encryption is the one that wrapped, or a newer one, in which case
        // the engine sees a key_id other than the probed one and wraps again.
        let item = self.describe(self.deadline()).await?;
        let id = identity(&self.key_name, &item)?;
        Ok(WrappedKey {
            key_ref: id.key_ref,
            key_id: id.key_id,
            ciphertext,
        })
    }

    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError> {
        if key_ref.is_empty() || key_ref.len() > MAX_KEY_NAME {
            return Err(BackendError::KeyNotFound(
                "invalid Akeyless key name in the ciphertext".into(),
            ));
        }
        self.decrypt(key_ref, ciphertext, self.deadline()).await
    }

    /// The original Akeyless plugin (KMS v1 only) stored Akeyless's `/encrypt` result for each DEK
    /// as the v1 cipher. Accepted encodings: the result string itself, or that string base64-encoded
    /// once more; the decrypted value is the DEK, or the DEK in base64 (when the original sent the
    /// DEK as base64 text without `input-format`). Anything else is refused with the reason.
    async fn decrypt_legacy_v1(
        &self,
        ciphertext: &[u8],
    ) -> Option<Result<(String, SecretBytes), BackendError>> {
        Some(
            self.legacy_v1(ciphertext)
                .await
                .map(|dek| (self.key_name.clone(), dek)),
        )
    }

    /// The first encoding [`Self::decrypt_legacy_v1`] reads: the `/encrypt` result string.
    async fn encrypt_legacy_v1(&self, dek: &[u8]) -> Option<Result<Vec<u8>, BackendError>> {
        Some(self.encrypt(dek, self.deadline()).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(j: &str) -> Map<String, Value> {
        serde_json::from_str(j).unwrap()
    }

    #[test]
    fn key_identity_from_describe_item() {
        let id = identity("/k8s/kek", &map(r#"{"item_id": 1234, "last_version": 3}"#)).unwrap();
        assert_eq!(id.key_id, "/k8s/kek@1234:v3");
        assert_eq!(id.key_ref, "/k8s/kek");
        let id = identity(
            "k",
            &map(r#"{"item_versions": [{"version": 1}, {"version": 2}]}"#),
        )
        .unwrap();
        assert_eq!(id.key_id, "k:v2");
        let long = "n".repeat(255);
        assert!(
            identity(&long, &map(r#"{"item_id": 1, "last_version": 1}"#))
                .unwrap()
                .key_id
                .len()
                < 260
        );
    }

    #[test]
    fn legacy_encodings() {
        assert_eq!(legacy_candidates(b"AkK0abc=="), ["AkK0abc=="]);
        let wrapped = B64.encode("AkK0abc==");
        assert_eq!(legacy_candidates(wrapped.as_bytes())[1], "AkK0abc==");
        assert!(legacy_candidates(&[0xff, 0x00, 0x4b]).is_empty());
        let dek = [7u8; 32];
        assert_eq!(&legacy_dek(Zeroizing::new(dek.to_vec())).unwrap()[..], &dek);
        let in_b64 = Zeroizing::new(B64.encode(dek).into_bytes());
        assert_eq!(&legacy_dek(in_b64).unwrap()[..], &dek);
        assert!(matches!(
            legacy_dek(Zeroizing::new(b"ping".to_vec())),
            Err(BackendError::InvalidCiphertext(_))
        ));
    }

    #[test]
    fn key_states() {
        assert!(check_state(
            "k",
            &map(r#"{"is_enabled": true, "item_state": "Enabled"}"#)
        )
        .is_ok());
        assert!(matches!(
            check_state("k", &map(r#"{"is_enabled": false}"#)),
            Err(BackendError::KeyDisabled(_))
        ));
        assert!(matches!(
            check_state(
                "k",
                &map(r#"{"is_enabled": true, "item_state": "PendingDeletion"}"#)
            ),
            Err(BackendError::KeyNotFound(_))
        ));
    }

    #[test]
    fn fuzz_entry_point_redacts_echoed_credentials() {
        for status in [400u16, 401, 403, 404, 429, 500, 503] {
            let body = format!(
                "{{\"error\": \"bad token {} for access key {}\"}}",
                fuzz_sent_secrets()[0],
                fuzz_sent_secrets()[1]
            );
            let out = interpret_response_for_fuzzing(status, body.as_bytes());
            assert_eq!(out.errors.len(), 5);
            for e in &out.errors {
                assert!(fuzz_sent_secrets().iter().all(|s| !e.contains(s)), "{e}");
            }
        }
        let out = interpret_response_for_fuzzing(
            200,
            br#"{"is_enabled": false, "item_id": 7, "last_version": 3}"#,
        );
        assert!(out.state.unwrap().contains("KeyDisabled"));
        assert_eq!(out.key_id.as_deref(), Some("/k/fuzz@7:v3"));
    }
}
