//! Google Cloud KMS as the remote KEK, through the official SDK (`google-cloud-kms-v1`, which
//! speaks HTTP/JSON to `cloudkms.googleapis.com`) with Application Default Credentials from
//! `google-cloud-auth`.
//!
//! - Identity: `GetCryptoKey` on the configured CryptoKey gives its primary CryptoKeyVersion;
//!   that version's resource name is the key_id, so a rotation (manual or automatic) shows up at
//!   the next probe without a restart.
//! - Wrap = `Encrypt` on the CryptoKey (Cloud KMS picks the primary version); the wrapped key is
//!   labelled with the version Encrypt reports in `name`, and its key_ref is that version, so an
//!   unwrap that fails can ask about exactly that version.
//! - Unwrap = `Decrypt` on the CryptoKey (the version is inside Google's ciphertext). A disabled or
//!   destroyed version revokes only the data it wrapped; the other versions keep working.
//! - Optional additional authenticated data (`--gcp-kms-aad`) binds every wrap to the cluster.
//! - Only an answer in Google's own error shape (a `google.rpc.Status` body whose code agrees with
//!   the HTTP status) can be a revocation; a bare 403/404, an HTML page or a transport error is an
//!   outage.

mod errors;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_gax::exponential_backoff::ExponentialBackoffBuilder;
use google_cloud_gax::options::RequestOptionsBuilder;
use google_cloud_gax::retry_policy::{Aip194Strict, RetryPolicyExt};
use google_cloud_kms_v1::client::KeyManagementService;
use google_cloud_kms_v1::model::crypto_key::CryptoKeyPurpose;
use google_cloud_kms_v1::model::crypto_key_version::CryptoKeyVersionState;
use zeroize::Zeroizing;

pub use errors::map_error;

use super::{Backend, BackendError, KeyIdentity, SecretBytes, WrappedKey};

/// Total time one operation may spend, retries included.
pub const RETRY_BUDGET: Duration = Duration::from_millis(2500);
const MAX_ATTEMPTS: u32 = 4;
const BUILD_TIMEOUT: Duration = Duration::from_secs(15);

/// Command-line options of the Google Cloud KMS backend (`--backend gcp-kms`).
#[derive(clap::Args, Debug, Clone, Default, serde::Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct GcpKmsArgs {
    /// The CryptoKey (purpose ENCRYPT_DECRYPT). Its primary version wraps; rotating the key
    /// (manually or on its rotation schedule) is followed without a restart.
    #[arg(
        long = "gcp-kms-key",
        env = "KMS_PLUGIN_GCP_KMS_KEY",
        value_name = "projects/P/locations/L/keyRings/R/cryptoKeys/K"
    )]
    pub gcp_kms_key: Option<String>,
    /// Cloud KMS endpoint URL (Private Service Connect, test servers). Default:
    /// https://cloudkms.googleapis.com. A private CA is trusted through SSL_CERT_FILE.
    #[arg(
        long = "gcp-kms-endpoint",
        env = "KMS_PLUGIN_GCP_KMS_ENDPOINT",
        value_name = "URL"
    )]
    pub gcp_kms_endpoint: Option<String>,
    /// Additional authenticated data bound to every wrapped key (e.g. the cluster's name). Must
    /// stay the same for as long as the data must decrypt.
    #[arg(
        long = "gcp-kms-aad",
        env = "KMS_PLUGIN_GCP_KMS_AAD",
        value_name = "TEXT"
    )]
    pub gcp_kms_aad: Option<String>,
    /// Credentials JSON: a service-account key (`service_account`) or a workload identity
    /// federation configuration (`external_account`). Default: Application Default Credentials
    /// (GOOGLE_APPLICATION_CREDENTIALS, gcloud's default file, then the metadata server).
    #[arg(
        long = "gcp-credentials-file",
        env = "KMS_PLUGIN_GCP_CREDENTIALS_FILE",
        value_name = "FILE"
    )]
    pub gcp_credentials_file: Option<std::path::PathBuf>,
}

/// Checks that `name` is a CryptoKey resource name, `projects/P/locations/L/keyRings/R/cryptoKeys/K`.
pub fn parse_key_name(name: &str) -> Result<String, BackendError> {
    let name = name.trim();
    let parts: Vec<&str> = name.split('/').collect();
    let ok = parts.len() == 8
        && parts[0] == "projects"
        && parts[2] == "locations"
        && parts[4] == "keyRings"
        && parts[6] == "cryptoKeys"
        && [1, 3, 5, 7].iter().all(|&i| {
            !parts[i].is_empty()
                && parts[i]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        });
    if ok {
        Ok(name.to_string())
    } else {
        Err(BackendError::Config(format!(
            "--gcp-kms-key {name:?} is not a CryptoKey name; expected \
             projects/PROJECT/locations/LOCATION/keyRings/RING/cryptoKeys/KEY"
        )))
    }
}

/// The CryptoKey a version or key resource name belongs to, if it is one of ours.
fn key_of_version(version: &str) -> Option<&str> {
    let (key, n) = version.rsplit_once("/cryptoKeyVersions/")?;
    (!n.is_empty() && n.chars().all(|c| c.is_ascii_digit())).then_some(key)
}

/// Builds the backend from its options and ADC, and checks the key once (`GetCryptoKey`), so that
/// a wrong key name or permission stops start-up with a clear error.
pub async fn from_args(args: &GcpKmsArgs) -> Result<Arc<dyn Backend>, BackendError> {
    let backend = GcpKmsBackend::new(args).await?;
    // A first contact that fails transiently is not fatal: the engine's start-up probe reports it
    // and keeps retrying.
    match backend.current_key().await {
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, "Google Cloud KMS is not reachable yet; starting unhealthy and retrying")
        }
        other => {
            other?;
        }
    }
    Ok(Arc::new(backend))
}

/// See the module documentation.
pub struct GcpKmsBackend {
    key: String,
    aad: Option<Vec<u8>>,
    client: KeyManagementService,
}

impl std::fmt::Debug for GcpKmsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcpKmsBackend")
            .field("key", &self.key)
            .field("aad", &self.aad.is_some())
            .finish_non_exhaustive()
    }
}

/// The SDK and google-cloud-auth sign and verify through rustls' process-wide provider; this
/// build carries ring only (no aws-lc).
fn install_crypto_provider() {
    // Err means one is installed already, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl GcpKmsBackend {
    /// Builds the backend with Application Default Credentials without calling Cloud KMS.
    pub async fn new(args: &GcpKmsArgs) -> Result<Self, BackendError> {
        let key = parse_key_name(args.gcp_kms_key.as_deref().ok_or_else(|| {
            BackendError::Config("--gcp-kms-key is required for --backend gcp-kms".into())
        })?)?;
        install_crypto_provider();
        let credentials = match &args.gcp_credentials_file {
            Some(path) => credentials_from_file(path)?,
            None => google_cloud_auth::credentials::Builder::default()
                .build()
                .map_err(|e| {
                    BackendError::Config(format!(
                        "no usable Google credentials (Application Default Credentials: \
                         GOOGLE_APPLICATION_CREDENTIALS, gcloud's default file, the metadata \
                         server): {e}"
                    ))
                })?,
        };
        Self::with_credentials(args, key, credentials).await
    }

    async fn with_credentials(
        args: &GcpKmsArgs,
        key: String,
        credentials: google_cloud_auth::credentials::Credentials,
    ) -> Result<Self, BackendError> {
        // With this set, the SDK logs every request and response at DEBUG, plaintext included.
        if std::env::var("GOOGLE_CLOUD_RUST_LOGGING").is_ok_and(|v| v == "true") {
            return Err(BackendError::Config(
                "GOOGLE_CLOUD_RUST_LOGGING=true makes the Google Cloud SDK log Encrypt and Decrypt \
                 requests and responses, which hold key material; unset it (the plugin logs the \
                 calls itself)"
                    .into(),
            ));
        }
        let backoff = ExponentialBackoffBuilder::new()
            .with_initial_delay(Duration::from_millis(50))
            .with_maximum_delay(Duration::from_millis(800))
            .build()
            .map_err(|e| BackendError::Config(format!("Cloud KMS backoff policy: {e}")))?;
        let mut b = KeyManagementService::builder()
            .with_credentials(credentials)
            .with_retry_policy(
                Aip194Strict
                    .with_attempt_limit(MAX_ATTEMPTS)
                    .with_time_limit(RETRY_BUDGET),
            )
            .with_backoff_policy(backoff)
            .with_attempt_timeout(RETRY_BUDGET);
        if let Some(url) = args.gcp_kms_endpoint.as_deref().map(str::trim) {
            let parsed: http::Uri = url.parse().map_err(|e| {
                BackendError::Config(format!("--gcp-kms-endpoint {url:?} is not a URL: {e}"))
            })?;
            match parsed.scheme_str() {
                Some("https") => {}
                Some("http") => {
                    tracing::warn!(endpoint = %url, "Google Cloud KMS endpoint uses plain http")
                }
                _ => {
                    return Err(BackendError::Config(format!(
                        "--gcp-kms-endpoint {url:?} must be an http(s) URL"
                    )))
                }
            }
            b = b.with_endpoint(url.trim_end_matches('/'));
        }
        // Building asks metadata-server credentials for their universe domain; a metadata
        // address that swallows packets must not hold start-up forever.
        let client = tokio::time::timeout(BUILD_TIMEOUT, b.build())
            .await
            .map_err(|_| {
                BackendError::Unavailable(format!(
                    "the Google credentials did not answer within {BUILD_TIMEOUT:?} while building \
                     the Cloud KMS client (the metadata server?); outside Google Cloud give \
                     GOOGLE_APPLICATION_CREDENTIALS or --gcp-credentials-file"
                ))
            })?
            .map_err(|e| BackendError::Config(format!("cannot build the Cloud KMS client: {e}")))?;
        Ok(GcpKmsBackend {
            key,
            aad: args
                .gcp_kms_aad
                .as_deref()
                .filter(|a| !a.is_empty())
                .map(|a| a.as_bytes().to_vec()),
            client,
        })
    }

    /// The configured CryptoKey.
    pub fn key_name(&self) -> &str {
        &self.key
    }

    /// The SDK client, with the backend's retry and timeout settings (tests, tooling).
    pub fn client(&self) -> &KeyManagementService {
        &self.client
    }

    /// A FAILED_PRECONDITION from Encrypt/Decrypt names a version state only in its message; ask
    /// Cloud KMS for the state of the version the data names, and keep the message-based answer
    /// when that is not possible (the caller may lack cloudkms.cryptoKeyVersions.get).
    /// Encrypt, retried while the answer fails its integrity check.
    async fn encrypt_checked(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self
                .client
                .encrypt()
                .set_name(&self.key)
                .set_plaintext(bytes::Bytes::copy_from_slice(plaintext))
                .set_plaintext_crc32c(crc(plaintext))
                .with_idempotency(true);
            if let Some(aad) = &self.aad {
                req = req
                    .set_additional_authenticated_data(bytes::Bytes::copy_from_slice(aad))
                    .set_additional_authenticated_data_crc32c(crc(aad));
            }
            let resp = req.send().await.map_err(|e| map_error("Encrypt", &e))?;
            if key_of_version(&resp.name) != Some(self.key.as_str()) || resp.ciphertext.is_empty() {
                return Err(BackendError::Unavailable(format!(
                    "Cloud KMS Encrypt on {} answered without a ciphertext of one of its versions \
                     (name {:?})",
                    self.key, resp.name
                )));
            }
            let intact = resp.verified_plaintext_crc32c
                && (self.aad.is_none() || resp.verified_additional_authenticated_data_crc32c)
                && resp.ciphertext_crc32c == Some(crc(&resp.ciphertext));
            if intact {
                return Ok(WrappedKey {
                    key_ref: resp.name.clone(),
                    key_id: resp.name,
                    ciphertext: resp.ciphertext.to_vec(),
                });
            }
            if attempt >= INTEGRITY_ATTEMPTS {
                return Err(integrity_error("Encrypt", &self.key));
            }
            tracing::warn!(key = %self.key, attempt, "Cloud KMS Encrypt answer damaged; retrying");
        }
    }

    /// Decrypt with `key`, retried while the answer fails its integrity check.
    async fn decrypt_checked(
        &self,
        key: &str,
        ciphertext: &[u8],
    ) -> Result<SecretBytes, BackendError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self
                .client
                .decrypt()
                .set_name(key)
                .set_ciphertext(bytes::Bytes::copy_from_slice(ciphertext))
                .set_ciphertext_crc32c(crc(ciphertext))
                .with_idempotency(true);
            if let Some(aad) = &self.aad {
                req = req
                    .set_additional_authenticated_data(bytes::Bytes::copy_from_slice(aad))
                    .set_additional_authenticated_data_crc32c(crc(aad));
            }
            match req.send().await {
                Ok(resp) => {
                    let plaintext = Zeroizing::new(resp.plaintext.to_vec());
                    if resp.plaintext_crc32c == Some(crc(&plaintext)) {
                        return Ok(plaintext);
                    }
                    if attempt >= INTEGRITY_ATTEMPTS {
                        return Err(integrity_error("Decrypt", key));
                    }
                    tracing::warn!(key = %key, attempt, "Cloud KMS Decrypt answer damaged; retrying");
                }
                Err(e) => return Err(map_error("Decrypt", &e)),
            }
        }
    }

    async fn recheck_version(&self, version: &str, err: BackendError) -> BackendError {
        if !matches!(err, BackendError::Other(_)) {
            return err;
        }
        let got = bounded(
            self.client
                .get_crypto_key_version()
                .set_name(version)
                .with_idempotency(true)
                .send(),
        )
        .await;
        match got {
            Ok(Ok(v)) => version_state_error(&v.name, &v.state).unwrap_or(err),
            _ => err,
        }
    }
}

/// Credentials from a JSON file of type `service_account` or `external_account`.
fn credentials_from_file(
    path: &std::path::Path,
) -> Result<google_cloud_auth::credentials::Credentials, BackendError> {
    use google_cloud_auth::credentials::{external_account, service_account};
    let shown = path.display();
    let text = std::fs::read(path).map_err(|e| {
        BackendError::Config(format!("cannot read --gcp-credentials-file {shown}: {e}"))
    })?;
    // The file holds a private key or a token source: never echo its content.
    let json: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|_| BackendError::Config(format!("--gcp-credentials-file {shown} is not JSON")))?;
    let built = match json.get("type").and_then(|t| t.as_str()) {
        Some("service_account") => service_account::Builder::new(json).build(),
        Some("external_account") => external_account::Builder::new(json).build(),
        other => {
            return Err(BackendError::Config(format!(
                "--gcp-credentials-file {shown} has type {other:?}; expected \"service_account\" \
                 or \"external_account\" (other kinds work through GOOGLE_APPLICATION_CREDENTIALS)"
            )))
        }
    };
    built.map_err(|e| {
        BackendError::Config(format!(
            "--gcp-credentials-file {shown} is not usable: {}",
            errors::without_secrets(&e.to_string())
        ))
    })
}

/// Answers that fail their integrity check are retried this often in all, as Google advises
/// ("a limited number of retries"); then the call is an outage, never a revocation.
const INTEGRITY_ATTEMPTS: u32 = 3;

/// Cloud KMS's integrity fields: CRC32C (Castagnoli) as an int64.
fn crc(data: &[u8]) -> i64 {
    i64::from(crc32c::crc32c(data))
}

fn integrity_error(action: &str, key: &str) -> BackendError {
    BackendError::Unavailable(format!(
        "Cloud KMS {action} on {key}: the answer failed its CRC32C integrity check \
         {INTEGRITY_ATTEMPTS} times; something between Cloud KMS and the plugin (a proxy \
         rewriting bodies, faulty memory) damages data"
    ))
}

async fn bounded<F: std::future::Future>(f: F) -> Result<F::Output, BackendError> {
    // The SDK's attempt timeout bounds each attempt; this bounds token fetches and retries too.
    tokio::time::timeout(RETRY_BUDGET + Duration::from_millis(250), f)
        .await
        .map_err(|_| BackendError::Timeout(RETRY_BUDGET))
}

/// The revocation (or passing condition) a version state means; `None` for ENABLED.
fn version_state_error(name: &str, state: &CryptoKeyVersionState) -> Option<BackendError> {
    match state {
        CryptoKeyVersionState::Enabled => None,
        CryptoKeyVersionState::Disabled => Some(BackendError::KeyDisabled(format!(
            "Cloud KMS key version {name} is DISABLED; enable it again to read the data it wrapped"
        ))),
        CryptoKeyVersionState::Destroyed | CryptoKeyVersionState::DestroyScheduled => {
            Some(BackendError::KeyNotFound(format!(
                "Cloud KMS key version {name} is {}; the data it wrapped is lost unless the \
                 destruction is still scheduled and is cancelled (RestoreCryptoKeyVersion)",
                state.name().unwrap_or("DESTROYED")
            )))
        }
        other => Some(BackendError::Unavailable(format!(
            "Cloud KMS key version {name} is in state {}",
            other.name().unwrap_or("UNKNOWN")
        ))),
    }
}

#[async_trait]
impl Backend for GcpKmsBackend {
    fn kind(&self) -> &'static str {
        "gcp-kms"
    }

    async fn current_key(&self) -> Result<KeyIdentity, BackendError> {
        let key = bounded(
            self.client
                .get_crypto_key()
                .set_name(&self.key)
                .with_idempotency(true)
                .send(),
        )
        .await?
        .map_err(|e| map_error("GetCryptoKey", &e))?;
        if key.purpose != CryptoKeyPurpose::EncryptDecrypt {
            return Err(BackendError::Config(format!(
                "Cloud KMS key {} has purpose {}; the plugin needs a symmetric ENCRYPT_DECRYPT key",
                self.key,
                key.purpose.name().unwrap_or("UNSPECIFIED")
            )));
        }
        let primary = key.primary.ok_or_else(|| {
            BackendError::KeyDisabled(format!(
                "Cloud KMS key {} has no primary version; set one with UpdateCryptoKeyPrimaryVersion",
                self.key
            ))
        })?;
        if key_of_version(&primary.name) != Some(self.key.as_str()) {
            return Err(BackendError::Unavailable(format!(
                "Cloud KMS answered GetCryptoKey for {} with primary version {:?} of another key",
                self.key, primary.name
            )));
        }
        if let Some(e) = version_state_error(&primary.name, &primary.state) {
            return Err(e);
        }
        Ok(KeyIdentity {
            key_id: primary.name.clone(),
            key_ref: primary.name,
        })
    }

    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        // One budget for every attempt: a body-damaging proxy must not triple the wait.
        bounded(self.encrypt_checked(plaintext)).await?
    }

    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError> {
        // key_ref is the version that wrapped; Decrypt takes its CryptoKey. Only our own key is
        // asked, so a crafted ciphertext cannot make the plugin use another key.
        let key = key_of_version(key_ref)
            .filter(|k| *k == self.key)
            .ok_or_else(|| {
                BackendError::InvalidCiphertext(format!(
                    "the wrapped key names {key_ref:?}, which is not a version of the configured \
                     Cloud KMS key {}",
                    self.key
                ))
            })?;
        let outcome = bounded(self.decrypt_checked(key, ciphertext)).await?;
        match outcome {
            Err(err) => Err(self.recheck_version(key_ref, err).await),
            ok => ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names() {
        let k = "projects/p-1/locations/europe-west1/keyRings/r_1/cryptoKeys/k.1";
        assert_eq!(parse_key_name(k).unwrap(), k);
        for bad in [
            "",
            "projects/p/locations/l/keyRings/r",
            "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1",
            "projects//locations/l/keyRings/r/cryptoKeys/k",
            "project/p/locations/l/keyRings/r/cryptoKeys/k",
            "projects/p/locations/l/keyRings/r/cryptoKeys/k?x",
        ] {
            assert!(
                matches!(parse_key_name(bad), Err(BackendError::Config(_))),
                "{bad}"
            );
        }
        assert_eq!(
            key_of_version("projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/12"),
            Some("projects/p/locations/l/keyRings/r/cryptoKeys/k")
        );
        assert_eq!(
            key_of_version("projects/p/locations/l/keyRings/r/cryptoKeys/k"),
            None
        );
        assert_eq!(key_of_version("x/cryptoKeyVersions/1a"), None);
    }
}
