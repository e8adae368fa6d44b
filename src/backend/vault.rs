//! HashiCorp Vault / OpenBao Transit as the remote KEK.
//!
//! - wrap = `POST <mount>/encrypt/<key>`, unwrap = `POST <mount>/decrypt/<key>`; Vault's ciphertext
//!   (`vault:v<N>:…`) names the key version, so key_ref = `<key>:v<N>` and the engine tracks every
//!   version on its own: raising `min_decryption_version` revokes the data of the older versions
//!   only, which is Vault's way of retiring old data.
//! - current_key = `GET <mount>/keys/<key>` (no cryptography): key_id = `<key>:v<latest_version>`, so
//!   `vault write -f transit/keys/<key>/rotate` is followed without a restart.
//! - Authentication: a token (file, re-read when it changes, or `VAULT_TOKEN`), AppRole, JWT/OIDC,
//!   Kubernetes or TLS certificate login. A token is renewed once two thirds of its TTL are gone and
//!   a login method logs in again when it cannot be.
//! - Only Vault's own error shape (`{"errors": [...]}`) can mean revocation; a sealed or standby node,
//!   5xx, and anything without that shape (a proxy, a load balancer) is an outage.
//!
//! A small typed client on reqwest rather than a Vault crate: the plugin needs six endpoints and
//! exact control over which answers may revoke a key, timeouts and TLS trust, and `vaultrs` would
//! bring a second HTTP stack whose errors flatten Vault's status codes.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::{Backend, BackendError, KeyIdentity, SecretBytes, WrappedKey};

const KIND: &str = "vault";
/// One attempt of a Vault call; the engine's --backend-timeout bounds the whole operation.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(4);
/// Login and renewal get their own, longer budget: an auth backend may call out (JWKS, TokenReview).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BODY: usize = 1 << 20;
/// Transit key types that are AEADs (encrypt + decrypt with integrity).
const AEAD_TYPES: &[&str] = &["aes256-gcm96", "aes128-gcm96", "chacha20-poly1305"];

/// How the plugin authenticates to Vault.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VaultAuth {
    /// A token from --vault-token-file or VAULT_TOKEN.
    #[default]
    Token,
    /// AppRole: --vault-role-id and --vault-secret-id-file.
    Approle,
    /// JWT/OIDC: --vault-role and --vault-jwt-file.
    Jwt,
    /// Kubernetes auth: --vault-role and a service-account token file.
    Kubernetes,
    /// TLS certificate auth: --vault-client-cert-file and --vault-client-key-file.
    Cert,
}

/// Command-line options of the Vault backend (`--backend vault`). Vault's own variables
/// (`VAULT_ADDR`, `VAULT_TOKEN`, `VAULT_CACERT`, `VAULT_NAMESPACE`) are honoured; flags win.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct VaultArgs {
    /// Vault address, e.g. https://vault.example:8200 (default: VAULT_ADDR).
    #[arg(long = "vault-addr", env = "KMS_PLUGIN_VAULT_ADDR", value_name = "URL")]
    pub vault_addr: Option<String>,
    /// Name of the transit key.
    #[arg(
        long = "vault-transit-key",
        env = "KMS_PLUGIN_VAULT_TRANSIT_KEY",
        value_name = "NAME"
    )]
    pub vault_transit_key: Option<String>,
    /// Mount path of the transit secrets engine.
    #[arg(
        long = "vault-transit-mount",
        env = "KMS_PLUGIN_VAULT_TRANSIT_MOUNT",
        default_value = "transit",
        value_name = "PATH"
    )]
    pub vault_transit_mount: String,
    /// Vault Enterprise namespace (default: VAULT_NAMESPACE).
    #[arg(
        long = "vault-namespace",
        env = "KMS_PLUGIN_VAULT_NAMESPACE",
        value_name = "NS"
    )]
    pub vault_namespace: Option<String>,
    /// PEM bundle of the CA(s) that sign Vault's certificate (default: VAULT_CACERT, then the system
    /// trust store).
    #[arg(
        long = "vault-cacert",
        env = "KMS_PLUGIN_VAULT_CACERT",
        value_name = "FILE"
    )]
    pub vault_cacert: Option<PathBuf>,
    /// Authentication method.
    #[arg(
        long = "vault-auth",
        env = "KMS_PLUGIN_VAULT_AUTH",
        value_enum,
        default_value = "token"
    )]
    pub vault_auth: VaultAuth,
    /// Mount path of the auth method (default: the method's name, e.g. approle, jwt, kubernetes, cert).
    #[arg(
        long = "vault-auth-mount",
        env = "KMS_PLUGIN_VAULT_AUTH_MOUNT",
        value_name = "PATH"
    )]
    pub vault_auth_mount: Option<String>,
    /// Token auth: file holding the token (re-read when it changes). Default: VAULT_TOKEN.
    #[arg(
        long = "vault-token-file",
        env = "KMS_PLUGIN_VAULT_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub vault_token_file: Option<PathBuf>,
    /// AppRole: the role id (not secret).
    #[arg(
        long = "vault-role-id",
        env = "KMS_PLUGIN_VAULT_ROLE_ID",
        value_name = "ID"
    )]
    pub vault_role_id: Option<String>,
    /// AppRole: file holding the secret id.
    #[arg(
        long = "vault-secret-id-file",
        env = "KMS_PLUGIN_VAULT_SECRET_ID_FILE",
        value_name = "FILE"
    )]
    pub vault_secret_id_file: Option<PathBuf>,
    /// JWT / Kubernetes auth: the Vault role to log in as.
    #[arg(
        long = "vault-role",
        env = "KMS_PLUGIN_VAULT_ROLE",
        value_name = "ROLE"
    )]
    pub vault_role: Option<String>,
    /// JWT / Kubernetes auth: file holding the JWT (Kubernetes default: the pod's service-account token).
    #[arg(
        long = "vault-jwt-file",
        env = "KMS_PLUGIN_VAULT_JWT_FILE",
        value_name = "FILE"
    )]
    pub vault_jwt_file: Option<PathBuf>,
    /// TLS certificate auth (and mTLS listeners): client certificate, PEM.
    #[arg(
        long = "vault-client-cert-file",
        env = "KMS_PLUGIN_VAULT_CLIENT_CERT_FILE",
        value_name = "FILE"
    )]
    pub vault_client_cert_file: Option<PathBuf>,
    /// TLS certificate auth: client private key, PEM.
    #[arg(
        long = "vault-client-key-file",
        env = "KMS_PLUGIN_VAULT_CLIENT_KEY_FILE",
        value_name = "FILE"
    )]
    pub vault_client_key_file: Option<PathBuf>,
}

const K8S_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

const TLS_FLAGS: super::tls::TlsFlags = super::tls::TlsFlags {
    ca_file: "--vault-cacert",
    client_cert_file: "--vault-client-cert-file",
    client_key_file: "--vault-client-key-file",
};

fn config(msg: impl Into<String>) -> BackendError {
    BackendError::Config(msg.into())
}

fn read_secret_file(path: &PathBuf, what: &str) -> Result<Zeroizing<String>, BackendError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        config(format!(
            "cannot read the Vault {what} file {}: {e}",
            path.display()
        ))
    })?;
    let text = Zeroizing::new(text.trim().to_string());
    if text.is_empty() {
        return Err(config(format!(
            "the Vault {what} file {} is empty",
            path.display()
        )));
    }
    Ok(text)
}

/// Where the session token comes from.
enum Login {
    /// A token given to us; `file` is re-read when its modification time changes.
    Given {
        file: Option<PathBuf>,
        env: Option<Zeroizing<String>>,
    },
    /// A login call that returns a token.
    Method { path: String, body: LoginBody },
}

enum LoginBody {
    AppRole {
        role_id: String,
        secret_id_file: PathBuf,
    },
    Jwt {
        role: String,
        jwt_file: PathBuf,
    },
    Cert,
}

struct Session {
    token: Zeroizing<String>,
    /// When to renew (two thirds of the TTL), `None` for a token without a TTL.
    renew_at: Option<Instant>,
    renewable: bool,
    /// For a token read from a file: the file's modification time.
    file_stamp: Option<SystemTime>,
}

/// See the module documentation.
pub struct VaultBackend {
    http: reqwest::Client,
    base: String,
    namespace: Option<String>,
    mount: String,
    key: String,
    login: Login,
    session: Mutex<Option<Session>>,
}

impl std::fmt::Debug for VaultBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultBackend")
            .field("addr", &self.base)
            .field("mount", &self.mount)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// What one Vault answer means. Only a body in Vault's own shape is Vault speaking.
#[derive(Debug)]
enum Answer {
    Ok(Map<String, Value>),
    /// `{"errors": [...]}` from Vault, with its status.
    Vault {
        status: u16,
        text: String,
    },
    /// Anything else: transport, timeout, a body that is not Vault's.
    Outage(BackendError),
}

fn vault_errors(body: &[u8]) -> Option<String> {
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let errors = m.get("errors")?.as_array()?;
    let text: Vec<String> = errors
        .iter()
        .filter_map(|e| e.as_str())
        .map(|e| e.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    Some(text.join("; ").chars().take(300).collect())
}

impl VaultBackend {
    /// Builds the backend from its options and Vault's environment, without contacting Vault.
    pub fn new(args: &VaultArgs) -> Result<Self, BackendError> {
        Self::with_env(args, |k| std::env::var(k).ok())
    }

    pub fn with_env(
        args: &VaultArgs,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, BackendError> {
        let addr = args
            .vault_addr
            .clone()
            .or_else(|| env("VAULT_ADDR"))
            .filter(|a| !a.trim().is_empty())
            .ok_or_else(|| config("--backend vault needs --vault-addr or VAULT_ADDR"))?;
        let url = reqwest::Url::parse(addr.trim())
            .map_err(|e| config(format!("--vault-addr {addr:?} is not a URL: {e}")))?;
        match url.scheme() {
            "https" => {}
            "http" => {
                tracing::warn!(addr = %url, "Vault address uses plain http: tokens and wrapped keys cross the network unencrypted")
            }
            s => {
                return Err(config(format!(
                    "--vault-addr must be http or https, not {s:?}"
                )))
            }
        }
        let key = args
            .vault_transit_key
            .clone()
            .filter(|k| !k.trim().is_empty())
            .ok_or_else(|| config("--backend vault needs --vault-transit-key NAME"))?;
        if key.contains('/') || key.len() > 200 {
            return Err(config(
                "--vault-transit-key must be a key name (no '/', at most 200 bytes)",
            ));
        }
        // Trust as every HTTPS backend: the system store (or SSL_CERT_FILE/SSL_CERT_DIR), plus
        // --vault-cacert / VAULT_CACERT; the client certificate for cert auth and mTLS listeners.
        let tls = super::tls::TlsOptions {
            ca_file: args
                .vault_cacert
                .clone()
                .or_else(|| env("VAULT_CACERT").map(PathBuf::from)),
            client_cert_file: args.vault_client_cert_file.clone(),
            client_key_file: args.vault_client_key_file.clone(),
        };
        let (tls_config, _roots) = super::tls::client_config(&tls, &TLS_FLAGS)?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("kms-plugin/", env!("CARGO_PKG_VERSION")))
            .use_preconfigured_tls(tls_config)
            .connect_timeout(Duration::from_secs(3))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| config(format!("cannot build the HTTP client: {e}")))?;
        let mount_of = |default: &str| {
            args.vault_auth_mount
                .clone()
                .unwrap_or_else(|| default.to_string())
                .trim_matches('/')
                .to_string()
        };
        let role = || {
            args.vault_role
                .clone()
                .filter(|r| !r.is_empty())
                .ok_or_else(|| config("JWT and Kubernetes auth need --vault-role"))
        };
        let login = match args.vault_auth {
            VaultAuth::Token => {
                let env_token = env("VAULT_TOKEN")
                    .filter(|t| !t.is_empty())
                    .map(Zeroizing::new);
                if args.vault_token_file.is_none() && env_token.is_none() {
                    return Err(config(
                        "token auth needs --vault-token-file or VAULT_TOKEN (or choose --vault-auth approle|jwt|kubernetes|cert)",
                    ));
                }
                Login::Given {
                    file: args.vault_token_file.clone(),
                    env: env_token,
                }
            }
            VaultAuth::Approle => Login::Method {
                path: format!("auth/{}/login", mount_of("approle")),
                body: LoginBody::AppRole {
                    role_id: args
                        .vault_role_id
                        .clone()
                        .ok_or_else(|| config("AppRole auth needs --vault-role-id"))?,
                    secret_id_file: args
                        .vault_secret_id_file
                        .clone()
                        .ok_or_else(|| config("AppRole auth needs --vault-secret-id-file"))?,
                },
            },
            VaultAuth::Jwt => Login::Method {
                path: format!("auth/{}/login", mount_of("jwt")),
                body: LoginBody::Jwt {
                    role: role()?,
                    jwt_file: args
                        .vault_jwt_file
                        .clone()
                        .ok_or_else(|| config("JWT auth needs --vault-jwt-file"))?,
                },
            },
            VaultAuth::Kubernetes => Login::Method {
                path: format!("auth/{}/login", mount_of("kubernetes")),
                body: LoginBody::Jwt {
                    role: role()?,
                    jwt_file: args
                        .vault_jwt_file
                        .clone()
                        .unwrap_or_else(|| PathBuf::from(K8S_TOKEN)),
                },
            },
            VaultAuth::Cert => {
                if args.vault_client_cert_file.is_none() || args.vault_client_key_file.is_none() {
                    return Err(config(
                        "certificate auth needs --vault-client-cert-file and --vault-client-key-file",
                    ));
                }
                Login::Method {
                    path: format!("auth/{}/login", mount_of("cert")),
                    body: LoginBody::Cert,
                }
            }
        };
        Ok(VaultBackend {
            http,
            base: url.as_str().trim_end_matches('/').to_string(),
            namespace: args
                .vault_namespace
                .clone()
                .or_else(|| env("VAULT_NAMESPACE"))
                .filter(|n| !n.is_empty()),
            mount: args.vault_transit_mount.trim_matches('/').to_string(),
            key,
            login,
            session: Mutex::new(None),
        })
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Answer {
        let mut req = self
            .http
            .request(method, format!("{}/v1/{path}", self.base))
            .timeout(timeout)
            .header("accept", "application/json");
        if let Some(t) = token {
            req = req.header("x-vault-token", t);
        }
        if let Some(ns) = &self.namespace {
            req = req.header("x-vault-namespace", ns);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Answer::Outage(BackendError::Timeout(timeout)),
            Err(e) => {
                return Answer::Outage(BackendError::Unavailable(format!(
                    "cannot reach Vault at {}: {}",
                    self.base,
                    super::http::redact_reqwest(&e)
                )))
            }
        };
        let status = resp.status().as_u16();
        let bytes = match resp.bytes().await {
            Ok(b) if b.len() <= MAX_BODY => Zeroizing::new(b.to_vec()),
            Ok(_) => {
                return Answer::Outage(BackendError::Unavailable(format!(
                    "Vault /{path} answered with more than {MAX_BODY} bytes"
                )))
            }
            Err(e) => {
                return Answer::Outage(BackendError::Unavailable(format!(
                    "reading Vault's answer: {}",
                    super::http::redact_reqwest(&e)
                )))
            }
        };
        if (200..300).contains(&status) {
            return match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::Object(m)) => Answer::Ok(m),
                _ if status == 204 => Answer::Ok(Map::new()),
                _ => Answer::Outage(BackendError::Unavailable(format!(
                    "Vault /{path} answered HTTP {status} with a body that is not a JSON object; is --vault-addr Vault's address?"
                ))),
            };
        }
        match vault_errors(&bytes) {
            Some(text) => Answer::Vault { status, text },
            None if status == 429 => Answer::Outage(BackendError::Throttled(format!(
                "Vault /{path}: HTTP 429"
            ))),
            None => Answer::Outage(BackendError::Unavailable(format!(
                "Vault /{path}: HTTP {status} without Vault's error body (a proxy or load balancer in between?)"
            ))),
        }
    }

    /// A valid session token, logging in or renewing first when needed.
    async fn token(&self) -> Result<Zeroizing<String>, BackendError> {
        let mut session = self.session.lock().await;
        if let Some(s) = session.as_ref() {
            let file_changed = match &self.login {
                Login::Given { file: Some(f), .. } => {
                    std::fs::metadata(f).and_then(|m| m.modified()).ok() != s.file_stamp
                }
                _ => false,
            };
            let due = s.renew_at.is_some_and(|at| Instant::now() >= at);
            if !file_changed && !due {
                return Ok(s.token.clone());
            }
            if due && !file_changed && s.renewable {
                match self.renew(&s.token).await {
                    Ok(renewed) => {
                        let token = renewed.token.clone();
                        *session = Some(renewed);
                        return Ok(token);
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "Vault token could not be renewed; logging in again")
                    }
                }
            }
        }
        let fresh = self.log_in().await?;
        let token = fresh.token.clone();
        *session = Some(fresh);
        Ok(token)
    }

    fn session_from(auth: &Value, file_stamp: Option<SystemTime>) -> Result<Session, BackendError> {
        let token = auth
            .get("client_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                BackendError::Other("Vault's login answer has no client_token".into())
            })?;
        let ttl = auth
            .get("lease_duration")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        Ok(Session {
            token: Zeroizing::new(token.to_string()),
            renew_at: (ttl > 0).then(|| Instant::now() + Duration::from_secs(ttl) * 2 / 3),
            renewable: auth
                .get("renewable")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            file_stamp,
        })
    }

    async fn log_in(&self) -> Result<Session, BackendError> {
        match &self.login {
            Login::Given { file, env } => {
                let (token, stamp) = match file {
                    Some(f) => (
                        read_secret_file(f, "token")?,
                        std::fs::metadata(f).and_then(|m| m.modified()).ok(),
                    ),
                    None => (env.clone().expect("checked at construction"), None),
                };
                // The token's own TTL decides when to renew it.
                match self
                    .send(reqwest::Method::GET, "auth/token/lookup-self", Some(&token), None, LOGIN_TIMEOUT)
                    .await
                {
                    Answer::Ok(m) => {
                        let data = m.get("data").cloned().unwrap_or(Value::Null);
                        let ttl = data.get("ttl").and_then(Value::as_u64).unwrap_or(0);
                        Ok(Session {
                            token,
                            renew_at: (ttl > 0)
                                .then(|| Instant::now() + Duration::from_secs(ttl) * 2 / 3),
                            renewable: data.get("renewable").and_then(Value::as_bool).unwrap_or(false),
                            file_stamp: stamp,
                        })
                    }
                    Answer::Vault { status: 403, text } => Err(BackendError::Authentication(format!(
                        "Vault rejects the token ({text}); renew it or write a new one to the token file"
                    ))),
                    Answer::Vault { status, text } => Err(classify_other(status, &text, "auth/token/lookup-self")),
                    Answer::Outage(e) => Err(e),
                }
            }
            Login::Method { path, body } => {
                let payload = match body {
                    LoginBody::AppRole {
                        role_id,
                        secret_id_file,
                    } => {
                        let secret = read_secret_file(secret_id_file, "secret id")?;
                        json!({ "role_id": role_id, "secret_id": secret.as_str() })
                    }
                    LoginBody::Jwt { role, jwt_file } => {
                        let jwt = read_secret_file(jwt_file, "JWT")?;
                        json!({ "role": role, "jwt": jwt.as_str() })
                    }
                    LoginBody::Cert => json!({}),
                };
                let answer = self
                    .send(
                        reqwest::Method::POST,
                        path,
                        None,
                        Some(&payload),
                        LOGIN_TIMEOUT,
                    )
                    .await;
                drop(payload);
                match answer {
                    Answer::Ok(m) => {
                        Self::session_from(m.get("auth").unwrap_or(&Value::Null), None)
                    }
                    Answer::Vault {
                        status: 400 | 401 | 403,
                        text,
                    } => Err(BackendError::Authentication(format!(
                        "Vault refused the login at {path}: {text}"
                    ))),
                    Answer::Vault { status, text } => Err(classify_other(status, &text, path)),
                    Answer::Outage(e) => Err(e),
                }
            }
        }
    }

    async fn renew(&self, token: &str) -> Result<Session, BackendError> {
        match self
            .send(
                reqwest::Method::POST,
                "auth/token/renew-self",
                Some(token),
                Some(&json!({})),
                LOGIN_TIMEOUT,
            )
            .await
        {
            Answer::Ok(m) => Self::session_from(m.get("auth").unwrap_or(&Value::Null), None),
            Answer::Vault { status, text } => Err(BackendError::Authentication(format!(
                "Vault refused to renew the token (HTTP {status}: {text})"
            ))),
            Answer::Outage(e) => Err(e),
        }
    }

    /// A transit call with the session token; a 403 is told apart from a dead token by asking
    /// Vault about the token, and a dead token gets one fresh login.
    async fn transit(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        what: &str,
    ) -> Result<Map<String, Value>, BackendError> {
        let mut relogged = false;
        loop {
            let token = self.token().await?;
            match self
                .send(method.clone(), path, Some(&token), body, ATTEMPT_TIMEOUT)
                .await
            {
                Answer::Ok(m) => return Ok(m),
                Answer::Outage(e) => return Err(e),
                Answer::Vault { status: 403, text } => {
                    let token_alive = matches!(
                        self.send(
                            reqwest::Method::GET,
                            "auth/token/lookup-self",
                            Some(&token),
                            None,
                            ATTEMPT_TIMEOUT
                        )
                        .await,
                        Answer::Ok(_)
                    );
                    if token_alive {
                        return Err(BackendError::PermissionDenied(format!(
                            "Vault denies {what} on transit key {:?} ({text}); the token's policy needs update on {}/encrypt/{}, {}/decrypt/{} and read on {}/keys/{}",
                            self.key, self.mount, self.key, self.mount, self.key, self.mount, self.key
                        )));
                    }
                    if relogged {
                        return Err(BackendError::Authentication(format!(
                            "Vault rejects a fresh token ({text})"
                        )));
                    }
                    *self.session.lock().await = None;
                    relogged = true;
                }
                Answer::Vault { status, text } => {
                    return Err(classify(status, &text, what, &self.key))
                }
            }
        }
    }

    fn key_path(&self, op: &str, key: &str) -> String {
        format!("{}/{op}/{key}", self.mount)
    }
}

/// Vault's own error answers on transit calls (the 403 case is handled by the caller).
fn classify(status: u16, text: &str, what: &str, key: &str) -> BackendError {
    let lower = text.to_ascii_lowercase();
    let detail = format!("Vault {what} on key {key:?}: HTTP {status}: {text}");
    match status {
        400 if lower.contains("disallowed by policy") || lower.contains("too old") => {
            BackendError::KeyDisabled(format!(
                "{detail} (min_decryption_version was raised above this version)"
            ))
        }
        400 | 404 if lower.contains("key not found") || lower.contains("no existing key") => {
            BackendError::KeyNotFound(detail)
        }
        404 => BackendError::KeyNotFound(detail),
        400 if lower.contains("invalid ciphertext")
            || lower.contains("message authentication failed")
            || lower.contains("invalid version")
            || lower.contains("decode") =>
        {
            BackendError::InvalidCiphertext(detail)
        }
        _ => classify_other(status, text, what),
    }
}

fn classify_other(status: u16, text: &str, what: &str) -> BackendError {
    let detail = format!("Vault {what}: HTTP {status}: {text}");
    match status {
        429 => BackendError::Throttled(detail),
        // 472/473: a DR or performance standby that cannot serve the call.
        500..=599 | 472 | 473 => BackendError::Unavailable(detail),
        _ => BackendError::Other(detail),
    }
}

/// `vault:v<N>:…` → N.
fn version_of(ciphertext: &str) -> Option<u64> {
    let rest = ciphertext.strip_prefix("vault:v")?;
    let (n, _) = rest.split_once(':')?;
    n.parse().ok()
}

fn key_ref(key: &str, version: u64) -> String {
    format!("{key}:v{version}")
}

#[async_trait]
impl Backend for VaultBackend {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn current_key(&self) -> Result<KeyIdentity, BackendError> {
        let path = self.key_path("keys", &self.key);
        let reply = self
            .transit(reqwest::Method::GET, &path, None, "reading the key")
            .await?;
        let data = reply.get("data").cloned().unwrap_or(Value::Null);
        let typ = data.get("type").and_then(Value::as_str).unwrap_or("");
        if !AEAD_TYPES.contains(&typ) {
            return Err(config(format!(
                "Vault transit key {:?} is of type {typ:?}; use an AEAD key: {}",
                self.key,
                AEAD_TYPES.join(", ")
            )));
        }
        if data.get("deletion_allowed").and_then(Value::as_bool) == Some(true) {
            tracing::warn!(key = %self.key, "the Vault transit key allows deletion (deletion_allowed=true): deleting it loses every Secret");
        }
        if data.get("exportable").and_then(Value::as_bool) == Some(true) {
            tracing::warn!(key = %self.key, "the Vault transit key is exportable");
        }
        let latest = data
            .get("latest_version")
            .and_then(Value::as_u64)
            .filter(|v| *v > 0)
            .ok_or_else(|| BackendError::Other("Vault's key answer lacks latest_version".into()))?;
        if let Some(min_enc) = data.get("min_encryption_version").and_then(Value::as_u64) {
            if min_enc > latest {
                return Err(config("min_encryption_version is above latest_version"));
            }
        }
        Ok(KeyIdentity {
            key_id: key_ref(&self.key, latest),
            key_ref: key_ref(&self.key, latest),
        })
    }

    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        let body = json!({ "plaintext": Zeroizing::new(B64.encode(plaintext)).as_str() });
        let path = self.key_path("encrypt", &self.key);
        let reply = self
            .transit(reqwest::Method::POST, &path, Some(&body), "encrypt")
            .await;
        drop(body);
        let reply = reply?;
        let ciphertext = reply
            .get("data")
            .and_then(|d| d.get("ciphertext"))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                BackendError::Other("Vault's encrypt answer has no ciphertext".into())
            })?;
        let version = version_of(ciphertext).ok_or_else(|| {
            BackendError::Other("Vault's ciphertext does not start with vault:v<N>:".into())
        })?;
        let r = key_ref(&self.key, version);
        Ok(WrappedKey {
            key_id: r.clone(),
            key_ref: r,
            ciphertext: ciphertext.as_bytes().to_vec(),
        })
    }

    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError> {
        let text = std::str::from_utf8(ciphertext)
            .ok()
            .filter(|t| version_of(t).is_some())
            .ok_or_else(|| {
                BackendError::InvalidCiphertext("not a Vault transit ciphertext".into())
            })?;
        // Only the configured key: a crafted ciphertext must not make us decrypt with another one.
        let key = key_ref
            .rsplit_once(":v")
            .map(|(k, _)| k)
            .filter(|k| *k == self.key)
            .ok_or_else(|| {
                BackendError::InvalidCiphertext(format!(
                    "the ciphertext names Vault key {key_ref:?}, not the configured {:?}",
                    self.key
                ))
            })?;
        let body = json!({ "ciphertext": text });
        let path = self.key_path("decrypt", key);
        let reply = self
            .transit(reqwest::Method::POST, &path, Some(&body), "decrypt")
            .await?;
        let plain = reply
            .get("data")
            .and_then(|d| d.get("plaintext"))
            .and_then(Value::as_str)
            .ok_or_else(|| BackendError::Other("Vault's decrypt answer has no plaintext".into()))?;
        let plain = Zeroizing::new(plain.to_string());
        B64.decode(plain.as_str())
            .map(Zeroizing::new)
            .map_err(|_| BackendError::Other("Vault's decrypt answer is not base64".into()))
    }
}

/// `kms-plugin serve --backend vault`: builds the backend and looks at the key once; a transient
/// failure (Vault sealed, unreachable) leaves the plugin starting unhealthy, a permanent one
/// (refused login, missing key, wrong key type) stops start-up with the cause.
pub async fn from_args(args: &VaultArgs) -> Result<std::sync::Arc<dyn Backend>, BackendError> {
    let backend = VaultBackend::new(args)?;
    match backend.current_key().await {
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, "Vault is not reachable yet; starting unhealthy and retrying")
        }
        other => {
            other?;
        }
    }
    Ok(std::sync::Arc::new(backend))
}

/// Fuzzing entry point: one Vault HTTP answer through error-shape detection and classification
/// (every operation), and a success body through the ciphertext-version parser. Never panics.
#[doc(hidden)]
pub fn interpret_response_for_fuzzing(status: u16, body: &[u8]) -> Vec<String> {
    if (200..300).contains(&status) {
        let version = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
            v.get("data")?
                .get("ciphertext")?
                .as_str()
                .and_then(version_of)
        });
        return vec![format!("{version:?}")];
    }
    match vault_errors(body) {
        Some(text) => ["reading the key", "encrypt", "decrypt"]
            .iter()
            .map(|what| classify(status, &text, what, "k8s").to_string())
            .collect(),
        None => vec!["not a Vault answer".into()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_vaults_own_error_shape_is_an_answer() {
        assert_eq!(
            vault_errors(br#"{"errors":["permission denied"]}"#).as_deref(),
            Some("permission denied")
        );
        assert_eq!(vault_errors(br#"{"errors":[]}"#).as_deref(), Some(""));
        assert!(vault_errors(b"<html>404</html>").is_none());
        assert!(vault_errors(b"").is_none());
        assert!(vault_errors(br#"{"error":"x"}"#).is_none());
    }

    #[test]
    fn classification_table() {
        let c = |s, t| classify(s, t, "decrypt", "k");
        assert!(matches!(
            c(
                400,
                "ciphertext or signature version is disallowed by policy (too old)"
            ),
            BackendError::KeyDisabled(_)
        ));
        assert!(matches!(
            c(400, "encryption key not found"),
            BackendError::KeyNotFound(_)
        ));
        assert!(matches!(c(404, ""), BackendError::KeyNotFound(_)));
        assert!(matches!(
            c(400, "invalid ciphertext: unable to decrypt"),
            BackendError::InvalidCiphertext(_)
        ));
        assert!(matches!(
            c(503, "Vault is sealed"),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(c(429, "rate limit"), BackendError::Throttled(_)));
        assert!(matches!(c(472, "standby"), BackendError::Unavailable(_)));
        assert!(matches!(c(400, "something else"), BackendError::Other(_)));
    }

    #[test]
    fn versions_and_refs() {
        assert_eq!(version_of("vault:v12:abc"), Some(12));
        assert_eq!(version_of("vault:vx:abc"), None);
        assert_eq!(version_of("other"), None);
        assert_eq!(key_ref("k8s", 3), "k8s:v3");
    }

    #[test]
    fn vault_environment_is_honoured_and_flags_win() {
        let env = |k: &str| match k {
            "VAULT_ADDR" => Some("http://127.0.0.1:8200".to_string()),
            "VAULT_TOKEN" => Some("s.envtoken".to_string()),
            "VAULT_NAMESPACE" => Some("team-a".to_string()),
            _ => None,
        };
        let args = VaultArgs {
            vault_transit_key: Some("k8s".into()),
            vault_transit_mount: "transit".into(),
            ..Default::default()
        };
        let b = VaultBackend::with_env(&args, env).unwrap();
        assert_eq!(b.base, "http://127.0.0.1:8200");
        assert_eq!(b.namespace.as_deref(), Some("team-a"));
        let args = VaultArgs {
            vault_addr: Some("https://vault.flag:8200".into()),
            vault_namespace: Some("flag-ns".into()),
            ..args
        };
        let b = VaultBackend::with_env(&args, env).unwrap();
        assert_eq!(b.base, "https://vault.flag:8200");
        assert_eq!(b.namespace.as_deref(), Some("flag-ns"));
        let err = VaultBackend::with_env(&VaultArgs::default(), |_| None).unwrap_err();
        assert!(err.to_string().contains("VAULT_ADDR"), "{err}");
    }
}
