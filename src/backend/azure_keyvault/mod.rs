//! Azure Key Vault or Managed HSM as the remote KEK, through the official SDK
//! (`azure_security_keyvault_keys`, `azure_identity`), sending through the plugin's own HTTPS
//! client (see [`transport`]).
//!
//! - Identity: `getKey` (latest version, or the pinned `--azure-keyvault-key-version`) gives the
//!   key's `kid`, `https://VAULT/keys/NAME/VERSION`; that URL is the key_id, so a rotation
//!   (manual or by the rotation policy) shows up at the next probe without a restart. The probe
//!   also checks the version's `enabled`, `nbf` and `exp` and that `key_ops` allow wrapKey and
//!   unwrapKey.
//! - Wrap = `wrapKey` (RSA-OAEP-256 for RSA keys, A256KW for `oct-HSM` keys on Managed HSM); the
//!   answer's `kid` names the version that wrapped, and the key_ref records it with the
//!   algorithm, so an unwrap goes to exactly that version.
//! - A disabled, expired or not-yet-valid version revokes only the data it wrapped.
//! - Only Key Vault's own error shape can be a revocation (see [`errors`]).

mod errors;
mod transport;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Url};
use azure_identity::{
    ClientSecretCredential, ClientSecretCredentialOptions, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, UserAssignedId, WorkloadIdentityCredential,
    WorkloadIdentityCredentialOptions,
};
use azure_security_keyvault_keys::models::{
    EncryptionAlgorithm, Key, KeyClientGetKeyOptions, KeyClientUnwrapKeyOptions,
    KeyClientWrapKeyOptions, KeyOperationParameters, KeyType,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use zeroize::Zeroizing;

pub use errors::{map_error, map_service_error, parse_service_error, ServiceError};

use super::{Backend, BackendError, KeyIdentity, SecretBytes, WrappedKey};

/// Total time one operation may spend, token fetch and retries included.
pub const RETRY_BUDGET: Duration = Duration::from_millis(2500);
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(2000);
/// The stable REST version both SDKs speak (the Rust crate defaults to a preview).
pub const API_VERSION: &str = "7.6";

const TLS_FLAGS: super::tls::TlsFlags = super::tls::TlsFlags {
    ca_file: "--azure-keyvault-ca-file",
    client_cert_file: "(none)",
    client_key_file: "(none)",
};

/// How the plugin gets its Entra ID token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AzureCredential {
    /// Workload identity when AZURE_FEDERATED_TOKEN_FILE is set, else a client secret when one
    /// is given, else managed identity.
    #[default]
    Auto,
    /// The instance metadata service (VM or VM scale set identity).
    ManagedIdentity,
    /// A federated token file (AKS workload identity: AZURE_FEDERATED_TOKEN_FILE,
    /// AZURE_CLIENT_ID, AZURE_TENANT_ID).
    WorkloadIdentity,
    /// A service principal's client secret.
    ClientSecret,
}

/// Command-line options of the Azure Key Vault backend (`--backend azure-keyvault`).
#[derive(clap::Args, Debug, Clone, Default, serde::Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct AzureKeyVaultArgs {
    /// The vault: https://NAME.vault.azure.net, or a Managed HSM https://NAME.managedhsm.azure.net
    /// (sovereign clouds: their vault domain).
    #[arg(
        long = "azure-keyvault-url",
        env = "KMS_PLUGIN_AZURE_KEYVAULT_URL",
        value_name = "URL"
    )]
    pub azure_keyvault_url: Option<String>,
    /// The key's name (RSA or RSA-HSM in Key Vault, oct-HSM in Managed HSM). Its current version
    /// wraps; a rotation is followed without a restart.
    #[arg(
        long = "azure-keyvault-key",
        env = "KMS_PLUGIN_AZURE_KEYVAULT_KEY",
        value_name = "NAME"
    )]
    pub azure_keyvault_key: Option<String>,
    /// Pin one key version instead of following the current one.
    #[arg(
        long = "azure-keyvault-key-version",
        env = "KMS_PLUGIN_AZURE_KEYVAULT_KEY_VERSION",
        value_name = "VERSION"
    )]
    pub azure_keyvault_key_version: Option<String>,
    /// Where the Entra ID token comes from.
    #[arg(
        long = "azure-credential",
        env = "KMS_PLUGIN_AZURE_CREDENTIAL",
        value_enum,
        default_value_t = AzureCredential::Auto
    )]
    pub azure_credential: AzureCredential,
    /// Tenant of the service principal or workload identity. Default: AZURE_TENANT_ID.
    #[arg(long = "azure-tenant-id", value_name = "ID")]
    pub azure_tenant_id: Option<String>,
    /// Client (application) ID; with managed identity, a user-assigned identity. Default:
    /// AZURE_CLIENT_ID.
    #[arg(long = "azure-client-id", value_name = "ID")]
    pub azure_client_id: Option<String>,
    /// Workload identity's federated token file (a projected service-account token). Default:
    /// AZURE_FEDERATED_TOKEN_FILE, as AKS sets it.
    #[arg(
        long = "azure-federated-token-file",
        env = "KMS_PLUGIN_AZURE_FEDERATED_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub azure_federated_token_file: Option<std::path::PathBuf>,
    /// File holding the service principal's client secret (default: AZURE_CLIENT_SECRET).
    #[arg(
        long = "azure-client-secret-file",
        env = "KMS_PLUGIN_AZURE_CLIENT_SECRET_FILE",
        value_name = "FILE"
    )]
    pub azure_client_secret_file: Option<std::path::PathBuf>,
    /// Entra ID authority host for sovereign clouds (https://login.microsoftonline.us,
    /// https://login.chinacloudapi.cn). Default: AZURE_AUTHORITY_HOST, else the public cloud.
    #[arg(
        long = "azure-authority-host",
        env = "KMS_PLUGIN_AZURE_AUTHORITY_HOST",
        value_name = "URL"
    )]
    pub azure_authority_host: Option<String>,
    /// Instance metadata service base URL for managed identity (tests, sidecars). Default:
    /// http://169.254.169.254.
    #[arg(
        long = "azure-imds-endpoint",
        env = "KMS_PLUGIN_AZURE_IMDS_ENDPOINT",
        value_name = "URL"
    )]
    pub azure_imds_endpoint: Option<String>,
    /// PEM bundle of extra CA certificates for the vault (and Entra ID) endpoints, on top of
    /// SSL_CERT_FILE or the system store.
    #[arg(
        long = "azure-keyvault-ca-file",
        env = "KMS_PLUGIN_AZURE_KEYVAULT_CA_FILE",
        value_name = "FILE"
    )]
    pub azure_keyvault_ca_file: Option<std::path::PathBuf>,
    /// Accept a bearer challenge whose resource is not the vault URL's parent domain (the vault
    /// reached by IP address or an alias). Off by default: the check keeps a token for one vault
    /// domain from being sent to another host.
    #[arg(
        long = "azure-keyvault-skip-challenge-resource-check",
        env = "KMS_PLUGIN_AZURE_KEYVAULT_SKIP_CHALLENGE_RESOURCE_CHECK"
    )]
    pub azure_keyvault_skip_challenge_resource_check: bool,
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Checks the vault URL: https, a host, no path beyond `/`.
pub fn parse_vault_url(url: &str) -> Result<Url, BackendError> {
    let url = url.trim();
    let parsed = Url::parse(url).map_err(|e| {
        BackendError::Config(format!(
            "--azure-keyvault-url {url:?} is not a URL ({e}); expected https://NAME.vault.azure.net"
        ))
    })?;
    if parsed.scheme() != "https" {
        return Err(BackendError::Config(format!(
            "--azure-keyvault-url {url:?} must be https:// (Key Vault and the Azure SDK refuse \
             plain http)"
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty)
        || !matches!(parsed.path(), "" | "/")
        || parsed.query().is_some()
        || !parsed.username().is_empty()
    {
        return Err(BackendError::Config(format!(
            "--azure-keyvault-url {url:?} must be the vault's base URL, e.g. \
             https://NAME.vault.azure.net or https://NAME.managedhsm.azure.net"
        )));
    }
    Ok(parsed)
}

/// The key_ref of a wrap: `ALG/VERSION`.
fn key_ref(alg: &EncryptionAlgorithm, version: &str) -> String {
    format!("{alg}/{version}")
}

fn parse_key_ref(r: &str) -> Option<(EncryptionAlgorithm, &str)> {
    let (alg, version) = r.split_once('/')?;
    let alg = match alg {
        "RSA-OAEP-256" => EncryptionAlgorithm::RsaOaep256,
        "A256KW" => EncryptionAlgorithm::A256Kw,
        _ => return None,
    };
    valid_name(version, 64).then_some((alg, version))
}

/// `https://VAULT/keys/NAME/VERSION` -> (NAME, VERSION).
fn split_kid(kid: &str) -> Option<(&str, &str)> {
    let rest = kid.split_once("://")?.1;
    let mut parts = rest.split('/');
    let _host = parts.next()?;
    if parts.next()? != "keys" {
        return None;
    }
    let name = parts.next()?;
    let version = parts.next()?;
    (parts.next().is_none() && valid_name(name, 127) && valid_name(version, 64))
        .then_some((name, version))
}

/// Builds the backend and checks the key once (`getKey`), so that a wrong vault, key or
/// permission stops start-up with a clear error.
pub async fn from_args(args: &AzureKeyVaultArgs) -> Result<Arc<dyn Backend>, BackendError> {
    let backend = AzureKeyVaultBackend::new(args)?;
    match backend.current_key().await {
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, "Azure Key Vault is not reachable yet; starting unhealthy and retrying")
        }
        other => {
            other?;
        }
    }
    Ok(Arc::new(backend))
}

/// See the module documentation.
pub struct AzureKeyVaultBackend {
    vault: Url,
    key: String,
    pinned: Option<String>,
    client: KeyClient,
    /// The algorithm and version of the last probe: wraps go to that version, so a rotation is
    /// picked up at the next probe and every wrap names its version explicitly.
    current: Mutex<Option<(EncryptionAlgorithm, String)>>,
}

impl std::fmt::Debug for AzureKeyVaultBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureKeyVaultBackend")
            .field("vault", &self.vault.as_str())
            .field("key", &self.key)
            .field("pinned", &self.pinned)
            .finish_non_exhaustive()
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn client_options(
    transport: &Arc<transport::Transport>,
    cloud: &Option<Arc<azure_core::cloud::CloudConfiguration>>,
) -> ClientOptions {
    ClientOptions {
        transport: Some(azure_core::http::Transport::new(transport.clone())),
        retry: RetryOptions::exponential(ExponentialRetryOptions {
            initial_delay: azure_core::time::Duration::milliseconds(100),
            max_retries: 3,
            max_total_elapsed: azure_core::time::Duration::milliseconds(2000),
            max_delay: azure_core::time::Duration::milliseconds(800),
        }),
        cloud: cloud.clone(),
        ..Default::default()
    }
}

fn credential(
    args: &AzureKeyVaultArgs,
    transport: &Arc<transport::Transport>,
    cloud: &Option<Arc<azure_core::cloud::CloudConfiguration>>,
) -> Result<Arc<dyn TokenCredential>, BackendError> {
    let tenant = args
        .azure_tenant_id
        .clone()
        .or_else(|| env_nonempty("AZURE_TENANT_ID"));
    let client_id = args
        .azure_client_id
        .clone()
        .or_else(|| env_nonempty("AZURE_CLIENT_ID"));
    let secret = match &args.azure_client_secret_file {
        Some(path) => {
            let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                BackendError::Config(format!(
                    "cannot read --azure-client-secret-file {}: {e}",
                    path.display()
                ))
            })?);
            let s = text.trim();
            if s.is_empty() {
                return Err(BackendError::Config(format!(
                    "--azure-client-secret-file {} is empty",
                    path.display()
                )));
            }
            Some(Secret::new(s.to_string()))
        }
        None => env_nonempty("AZURE_CLIENT_SECRET").map(Secret::new),
    };
    let kind = match args.azure_credential {
        AzureCredential::Auto
            if args.azure_federated_token_file.is_some()
                || env_nonempty("AZURE_FEDERATED_TOKEN_FILE").is_some() =>
        {
            AzureCredential::WorkloadIdentity
        }
        AzureCredential::Auto if secret.is_some() => AzureCredential::ClientSecret,
        AzureCredential::Auto => AzureCredential::ManagedIdentity,
        k => k,
    };
    let opts = || client_options(transport, cloud);
    let built: azure_core::Result<Arc<dyn TokenCredential>> = match kind {
        AzureCredential::ClientSecret => {
            let (Some(tenant), Some(client_id), Some(secret)) = (tenant, client_id, secret) else {
                return Err(BackendError::Config(
                    "the client-secret credential needs a tenant (--azure-tenant-id or \
                     AZURE_TENANT_ID), a client ID (--azure-client-id or AZURE_CLIENT_ID) and a \
                     secret (--azure-client-secret-file or AZURE_CLIENT_SECRET)"
                        .into(),
                ));
            };
            ClientSecretCredential::new(
                &tenant,
                client_id,
                secret,
                Some(ClientSecretCredentialOptions {
                    client_options: opts(),
                }),
            )
            .map(|c| c as Arc<dyn TokenCredential>)
        }
        AzureCredential::WorkloadIdentity => {
            let mut o = WorkloadIdentityCredentialOptions {
                tenant_id: tenant,
                client_id,
                token_file_path: args.azure_federated_token_file.clone(),
                ..Default::default()
            };
            o.credential_options.client_options = opts();
            WorkloadIdentityCredential::new(Some(o)).map(|c| c as Arc<dyn TokenCredential>)
        }
        AzureCredential::ManagedIdentity | AzureCredential::Auto => {
            ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.map(UserAssignedId::ClientId),
                client_options: opts(),
            }))
            .map(|c| c as Arc<dyn TokenCredential>)
        }
    };
    built.map_err(|e| {
        BackendError::Config(format!(
            "cannot set up the Azure {kind:?} credential: {}",
            e.to_string().lines().next().unwrap_or_default()
        ))
    })
}

impl AzureKeyVaultBackend {
    /// Builds the backend without calling Key Vault.
    pub fn new(args: &AzureKeyVaultArgs) -> Result<Self, BackendError> {
        let vault = parse_vault_url(args.azure_keyvault_url.as_deref().ok_or_else(|| {
            BackendError::Config(
                "--azure-keyvault-url is required for --backend azure-keyvault".into(),
            )
        })?)?;
        let key = args
            .azure_keyvault_key
            .as_deref()
            .map(str::trim)
            .ok_or_else(|| {
                BackendError::Config(
                    "--azure-keyvault-key is required for --backend azure-keyvault".into(),
                )
            })?
            .to_string();
        if !valid_name(&key, 127) {
            return Err(BackendError::Config(format!(
                "--azure-keyvault-key {key:?} is not a Key Vault key name (1-127 letters, digits \
                 and dashes)"
            )));
        }
        let pinned = match args.azure_keyvault_key_version.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(v) if valid_name(v, 64) => Some(v.to_string()),
            Some(v) => {
                return Err(BackendError::Config(format!(
                    "--azure-keyvault-key-version {v:?} is not a key version (the last segment \
                     of the key's kid URL)"
                )))
            }
        };
        let imds = match args.azure_imds_endpoint.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(u) => {
                let parsed = Url::parse(u).map_err(|e| {
                    BackendError::Config(format!("--azure-imds-endpoint {u:?} is not a URL: {e}"))
                })?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(BackendError::Config(format!(
                        "--azure-imds-endpoint {u:?} must be an http(s) URL"
                    )));
                }
                Some(parsed)
            }
        };
        let cloud = match args.azure_authority_host.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(h) => {
                let parsed = Url::parse(h).map_err(|e| {
                    BackendError::Config(format!("--azure-authority-host {h:?} is not a URL: {e}"))
                })?;
                if parsed.scheme() != "https" {
                    return Err(BackendError::Config(format!(
                        "--azure-authority-host {h:?} must be https://"
                    )));
                }
                let mut custom = azure_core::cloud::CustomConfiguration::default();
                custom.authority_host = h.trim_end_matches('/').to_string();
                Some(Arc::new(azure_core::cloud::CloudConfiguration::from(
                    custom,
                )))
            }
        };
        let tls = super::tls::TlsOptions {
            ca_file: args.azure_keyvault_ca_file.clone(),
            ..Default::default()
        };
        let (tls_config, _roots) = super::tls::client_config(&tls, &TLS_FLAGS)?;
        let transport = transport::Transport::new(tls_config, ATTEMPT_TIMEOUT, imds)?;
        let credential = credential(args, &transport, &cloud)?;
        let client = KeyClient::new(
            vault.as_str(),
            credential,
            Some(KeyClientOptions {
                api_version: API_VERSION.to_string(),
                client_options: client_options(&transport, &cloud),
                verify_challenge_resource: Some(!args.azure_keyvault_skip_challenge_resource_check),
            }),
        )
        .map_err(|e| BackendError::Config(format!("cannot build the Key Vault client: {e}")))?;
        Ok(AzureKeyVaultBackend {
            vault,
            key,
            pinned,
            client,
            current: Mutex::new(None),
        })
    }

    /// The SDK client (tests, tooling).
    pub fn client(&self) -> &KeyClient {
        &self.client
    }

    /// The configured key's name.
    pub fn key_name(&self) -> &str {
        &self.key
    }

    fn check_kid<'a>(&self, action: &str, kid: Option<&'a str>) -> Result<&'a str, BackendError> {
        let version = kid
            .and_then(split_kid)
            .filter(|(name, _)| name.eq_ignore_ascii_case(&self.key))
            .map(|(_, v)| v);
        version.ok_or_else(|| {
            BackendError::Unavailable(format!(
                "Key Vault {action} on {} answered without a kid of one of its versions ({kid:?})",
                self.key
            ))
        })
    }

    async fn wrapping_version(&self) -> Result<(EncryptionAlgorithm, String), BackendError> {
        if let Some(c) = self.current.lock().map_err(poisoned)?.clone() {
            return Ok(c);
        }
        self.current_key().await?;
        self.current
            .lock()
            .map_err(poisoned)?
            .clone()
            .ok_or_else(|| BackendError::Other("Key Vault key version unknown after getKey".into()))
    }
}

fn poisoned<T>(_: T) -> BackendError {
    BackendError::Other("internal lock poisoned".into())
}

async fn bounded<F: std::future::Future>(f: F) -> Result<F::Output, BackendError> {
    tokio::time::timeout(RETRY_BUDGET, f)
        .await
        .map_err(|_| BackendError::Timeout(RETRY_BUDGET))
}

/// The wrap algorithm of a key type, or why the key cannot be the KEK.
fn algorithm_for(name: &str, kty: Option<&KeyType>) -> Result<EncryptionAlgorithm, BackendError> {
    match kty {
        Some(KeyType::Rsa | KeyType::RsaHsm) => Ok(EncryptionAlgorithm::RsaOaep256),
        Some(KeyType::OctHsm | KeyType::Oct) => Ok(EncryptionAlgorithm::A256Kw),
        other => Err(BackendError::Config(format!(
            "Key Vault key {name} has type {other:?}; the plugin needs an RSA / RSA-HSM key (Key \
             Vault) or a 256-bit oct-HSM key (Managed HSM)"
        ))),
    }
}

/// How far this node's clock may be off before `exp` / `nbf` are judged locally; closer to the
/// boundary the call goes to Key Vault, whose own answer decides.
const CLOCK_SKEW: azure_core::time::Duration = azure_core::time::Duration::minutes(5);

/// Why the version the probe saw cannot wrap now; `None` when it can.
fn lifecycle_error(kid: &str, key: &Key) -> Option<BackendError> {
    let attrs = key.attributes.as_ref()?;
    let now = azure_core::time::OffsetDateTime::now_utc();
    if attrs.enabled == Some(false) {
        return Some(BackendError::KeyDisabled(format!(
            "Key Vault key version {kid} is disabled; enable it again (or rotate to a new \
             version) to wrap and to read the data it wrapped"
        )));
    }
    if let Some(exp) = attrs.expires {
        if exp + CLOCK_SKEW <= now {
            return Some(BackendError::KeyDisabled(format!(
                "Key Vault key version {kid} expired at {exp}; rotate the key or move its expiry"
            )));
        }
    }
    if let Some(nbf) = attrs.not_before {
        if nbf > now + CLOCK_SKEW {
            return Some(BackendError::KeyDisabled(format!(
                "Key Vault key version {kid} is not valid before {nbf}"
            )));
        }
    }
    None
}

#[async_trait]
impl Backend for AzureKeyVaultBackend {
    fn kind(&self) -> &'static str {
        "azure-keyvault"
    }

    async fn current_key(&self) -> Result<KeyIdentity, BackendError> {
        let rsp = bounded(self.client.get_key(
            &self.key,
            Some(KeyClientGetKeyOptions {
                key_version: self.pinned.clone(),
                ..Default::default()
            }),
        ))
        .await?
        .map_err(|e| map_error("getKey", &e))?;
        let key: Key = rsp.into_model().map_err(|e| {
            BackendError::Unavailable(format!(
                "Key Vault getKey: an answer that is not a key: {e}"
            ))
        })?;
        let jwk = key.key.as_ref().ok_or_else(|| {
            BackendError::Unavailable("Key Vault getKey answered without a key".into())
        })?;
        let kid = jwk.kid.clone().unwrap_or_default();
        let version = self.check_kid("getKey", Some(&kid))?.to_string();
        if let Some(p) = &self.pinned {
            if !p.eq_ignore_ascii_case(&version) {
                return Err(BackendError::Unavailable(format!(
                    "Key Vault getKey for version {p} answered with {kid}"
                )));
            }
        }
        let alg = algorithm_for(&self.key, jwk.kty.as_ref())?;
        if let Some(ops) = &jwk.key_ops {
            for need in ["wrapKey", "unwrapKey"] {
                if !ops.iter().any(|o| o == need) {
                    return Err(BackendError::Config(format!(
                        "Key Vault key {kid} does not allow {need} (key_ops {ops:?}); create the \
                         key (or a new version) with wrapKey and unwrapKey"
                    )));
                }
            }
        }
        if let Some(e) = lifecycle_error(&kid, &key) {
            // Never wrap under an older version the probe no longer names.
            *self.current.lock().map_err(poisoned)? = None;
            return Err(e);
        }
        *self.current.lock().map_err(poisoned)? = Some((alg.clone(), version.clone()));
        Ok(KeyIdentity {
            key_ref: key_ref(&alg, &version),
            key_id: kid,
        })
    }

    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        let (alg, version) = self.wrapping_version().await?;
        let params = KeyOperationParameters {
            algorithm: Some(alg.clone()),
            value: Some(plaintext.to_vec()),
            ..Default::default()
        };
        let body = params
            .try_into()
            .map_err(|e| BackendError::Other(format!("Key Vault wrapKey request: {e}")))?;
        let rsp = bounded(self.client.wrap_key(
            &self.key,
            body,
            Some(KeyClientWrapKeyOptions {
                key_version: Some(version),
                ..Default::default()
            }),
        ))
        .await?
        .map_err(|e| map_error("wrapKey", &e))?;
        let out = rsp.into_model().map_err(|e| {
            BackendError::Unavailable(format!(
                "Key Vault wrapKey: an answer that is not a result: {e}"
            ))
        })?;
        let version = self.check_kid("wrapKey", out.kid.as_deref())?.to_string();
        let ciphertext = out.result.filter(|c| !c.is_empty()).ok_or_else(|| {
            BackendError::Unavailable("Key Vault wrapKey answered without a value".into())
        })?;
        Ok(WrappedKey {
            key_ref: key_ref(&alg, &version),
            key_id: out.kid.unwrap_or_default(),
            ciphertext,
        })
    }

    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError> {
        let (alg, version) = parse_key_ref(key_ref).ok_or_else(|| {
            BackendError::InvalidCiphertext(format!(
                "the wrapped key names {key_ref:?}, not ALGORITHM/VERSION of a Key Vault key"
            ))
        })?;
        let params = KeyOperationParameters {
            algorithm: Some(alg),
            value: Some(ciphertext.to_vec()),
            ..Default::default()
        };
        let body = params
            .try_into()
            .map_err(|e| BackendError::Other(format!("Key Vault unwrapKey request: {e}")))?;
        let rsp = bounded(self.client.unwrap_key(
            &self.key,
            version,
            body,
            None::<KeyClientUnwrapKeyOptions<'_>>,
        ))
        .await?
        .map_err(|e| map_error("unwrapKey", &e))?;
        let out = rsp.into_model().map_err(|e| {
            BackendError::Unavailable(format!(
                "Key Vault unwrapKey: an answer that is not a result: {e}"
            ))
        })?;
        let plain = out.result.ok_or_else(|| {
            BackendError::Unavailable("Key Vault unwrapKey answered without a value".into())
        })?;
        Ok(Zeroizing::new(plain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kids_and_refs() {
        assert_eq!(
            split_kid("https://v.vault.azure.net/keys/k-1/0123abcd"),
            Some(("k-1", "0123abcd"))
        );
        for bad in [
            "https://v.vault.azure.net/keys/k-1",
            "https://v.vault.azure.net/secrets/k/1",
            "https://v.vault.azure.net/keys/k/1/x",
            "https://v.vault.azure.net/keys/k/a b",
            "v/keys/k/1",
        ] {
            assert_eq!(split_kid(bad), None, "{bad}");
        }
        let r = key_ref(&EncryptionAlgorithm::RsaOaep256, "abc123");
        assert_eq!(r, "RSA-OAEP-256/abc123");
        assert!(matches!(
            parse_key_ref(&r),
            Some((EncryptionAlgorithm::RsaOaep256, "abc123"))
        ));
        assert!(parse_key_ref("A256KW/x1").is_some());
        for bad in ["RSA1_5/x", "RSA-OAEP-256/", "RSA-OAEP-256/../x", "x"] {
            assert!(parse_key_ref(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn lifecycle_leaves_the_clock_boundary_to_key_vault() {
        use azure_core::time::{Duration, OffsetDateTime};
        use azure_security_keyvault_keys::models::KeyAttributes;
        let with = |f: &dyn Fn(&mut KeyAttributes)| {
            let mut a = KeyAttributes::default();
            f(&mut a);
            let mut k = Key::default();
            k.attributes = Some(a);
            lifecycle_error("kid", &k)
        };
        let now = OffsetDateTime::now_utc();
        assert!(with(&|_| {}).is_none());
        assert!(matches!(
            with(&|a| a.enabled = Some(false)),
            Some(BackendError::KeyDisabled(_))
        ));
        assert!(with(&|a| a.expires = Some(now - Duration::minutes(1))).is_none());
        assert!(matches!(
            with(&|a| a.expires = Some(now - Duration::hours(1))),
            Some(BackendError::KeyDisabled(m)) if m.contains("expired")
        ));
        assert!(with(&|a| a.not_before = Some(now + Duration::minutes(1))).is_none());
        assert!(matches!(
            with(&|a| a.not_before = Some(now + Duration::hours(1))),
            Some(BackendError::KeyDisabled(_))
        ));
    }

    #[test]
    fn vault_urls() {
        assert!(parse_vault_url("https://kv.vault.azure.net").is_ok());
        assert!(parse_vault_url("https://hsm.managedhsm.azure.net/").is_ok());
        for bad in [
            "http://kv.vault.azure.net",
            "kv.vault.azure.net",
            "https://kv.vault.azure.net/keys/k",
            "https://user@kv.vault.azure.net",
        ] {
            assert!(
                matches!(parse_vault_url(bad), Err(BackendError::Config(_))),
                "{bad}"
            );
        }
    }
}
