//! AWS KMS as the remote KEK, over the KMS JSON API (`TrentService.*`) with our own SigV4 signing.
//!
//! - Identity: `DescribeKey` on the configured key (id, ARN or alias) gives the key ARN, which is
//!   both key_id and key_ref. AWS's automatic rotation of the backing key is invisible here (the
//!   ARN stays and old ciphertexts keep decrypting); configuring another key, or re-pointing an
//!   alias, is a new key_id, and the old ciphertexts still decrypt because their key_ref names the
//!   old ARN.
//! - Wrap = `Encrypt`, unwrap = `Decrypt` (with `KeyId`, so a blob can only open under the key it
//!   names), both with the optional encryption context.
//! - Throttling, 429, 5xx and transport errors are retried with exponential backoff and full
//!   jitter within [`RETRY_BUDGET`]; everything else is mapped to a [`BackendError`] at once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::Rng;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::aws::credentials::{ChainConfig, CredentialsProvider};
use super::aws::{redact_reqwest, sigv4};
use super::{Backend, BackendError, KeyIdentity, SecretBytes, WrappedKey};

/// Total time one operation may spend, retries included.
pub const RETRY_BUDGET: Duration = Duration::from_millis(2500);
const BACKOFF_BASE: Duration = Duration::from_millis(50);
const BACKOFF_CAP: Duration = Duration::from_millis(800);

fn parse_context(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Command-line options of the AWS KMS backend (`--backend aws-kms`).
#[derive(clap::Args, Debug, Clone, Default, serde::Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct AwsKmsArgs {
    /// The KMS key: key id, key ARN, alias name (`alias/NAME`) or alias ARN. Re-pointing an alias
    /// rotates to another key; data wrapped under the old key keeps decrypting.
    #[arg(
        long = "aws-kms-key-id",
        env = "KMS_PLUGIN_AWS_KMS_KEY_ID",
        value_name = "ID|ARN|ALIAS"
    )]
    pub aws_kms_key_id: Option<String>,
    /// AWS region (default: AWS_REGION, AWS_DEFAULT_REGION, the shared config file, or the region
    /// of an ARN given as key).
    #[arg(
        long = "aws-region",
        env = "KMS_PLUGIN_AWS_REGION",
        value_name = "REGION"
    )]
    pub aws_region: Option<String>,
    /// KMS endpoint URL (VPC endpoints, FIPS endpoints, test servers). Default
    /// `https://kms.REGION.amazonaws.com`.
    #[arg(
        long = "aws-endpoint-url",
        env = "KMS_PLUGIN_AWS_ENDPOINT_URL",
        value_name = "URL"
    )]
    pub aws_endpoint_url: Option<String>,
    /// Encryption context pair bound to every wrapped key (repeatable; comma-separated in the
    /// environment). Must stay the same for as long as the data must decrypt.
    #[arg(
        long = "aws-kms-encryption-context",
        env = "KMS_PLUGIN_AWS_KMS_ENCRYPTION_CONTEXT",
        value_name = "KEY=VALUE",
        value_delimiter = ',',
        value_parser = parse_context
    )]
    #[serde(deserialize_with = "de_context")]
    pub aws_kms_encryption_context: Vec<(String, String)>,
}

fn de_context<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    let map: BTreeMap<String, String> = serde::Deserialize::deserialize(d)?;
    Ok(map.into_iter().collect())
}

/// Builds the AWS KMS backend from its options and the standard AWS credentials chain, and checks
/// the key once (`DescribeKey`), so that a wrong key, region or permission stops start-up with a
/// clear error.
pub async fn from_args(args: &AwsKmsArgs) -> Result<std::sync::Arc<dyn Backend>, BackendError> {
    let chain = ChainConfig::from_env();
    let backend = AwsKmsBackend::new(args, chain)?;
    // A first contact that fails transiently (KMS or STS briefly away while a whole control plane
    // restarts) is not fatal: the engine's start-up probe reports it and keeps retrying.
    match backend.current_key().await {
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, "AWS KMS is not reachable yet; starting unhealthy and retrying")
        }
        other => {
            other?;
        }
    }
    Ok(std::sync::Arc::new(backend))
}

/// See the module documentation.
pub struct AwsKmsBackend {
    key: String,
    region: String,
    endpoint: String,
    context: BTreeMap<String, String>,
    creds: CredentialsProvider,
    http: reqwest::Client,
    budget: Duration,
}

impl std::fmt::Debug for AwsKmsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsKmsBackend")
            .field("key", &self.key)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field(
                "encryption_context_keys",
                &self.context.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn region_of_arn(key: &str) -> Option<String> {
    // arn:PARTITION:kms:REGION:ACCOUNT:key/ID
    let parts: Vec<&str> = key.split(':').collect();
    (parts.len() >= 6 && parts[0] == "arn" && !parts[3].is_empty()).then(|| parts[3].to_string())
}

impl AwsKmsBackend {
    /// Builds the backend without contacting AWS.
    pub fn new(args: &AwsKmsArgs, chain: ChainConfig) -> Result<Self, BackendError> {
        let key = args
            .aws_kms_key_id
            .clone()
            .filter(|k| !k.trim().is_empty())
            .ok_or_else(|| {
                BackendError::Config("--aws-kms-key-id is required for --backend aws-kms".into())
            })?;
        let key = key.trim().to_string();
        let region = args
            .aws_region
            .clone()
            .or_else(|| chain.resolve_region())
            .or_else(|| region_of_arn(&key))
            .ok_or_else(|| {
                BackendError::Config("no AWS region: pass --aws-region or set AWS_REGION".into())
            })?;
        let endpoint = args
            .aws_endpoint_url
            .clone()
            .unwrap_or_else(|| format!("https://kms.{region}.amazonaws.com"));
        let endpoint = endpoint.trim_end_matches('/').to_string() + "/";
        let parsed: http::Uri = endpoint.parse().map_err(|e| {
            BackendError::Config(format!("--aws-endpoint-url {endpoint:?} is not a URL: {e}"))
        })?;
        match parsed.scheme_str() {
            Some("https") => {}
            Some("http") => {
                tracing::warn!(endpoint = %endpoint, "AWS KMS endpoint uses plain http")
            }
            _ => {
                return Err(BackendError::Config(format!(
                    "--aws-endpoint-url {endpoint:?} must be http(s)"
                )))
            }
        }
        let mut chain = chain;
        if chain.region.is_none() {
            chain.region = Some(region.clone());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| BackendError::Config(format!("cannot build HTTP client: {e}")))?;
        Ok(AwsKmsBackend {
            key,
            region,
            endpoint,
            context: args.aws_kms_encryption_context.iter().cloned().collect(),
            creds: CredentialsProvider::new(chain),
            http,
            budget: RETRY_BUDGET,
        })
    }

    /// Uses `creds` instead of the credentials chain (credentials handed over by the caller).
    pub fn with_credentials(mut self, creds: CredentialsProvider) -> Self {
        self.creds = creds;
        self
    }

    /// The configured key (as given: id, ARN or alias).
    pub fn configured_key(&self) -> &str {
        &self.key
    }

    /// One KMS JSON API call (`action` without the `TrentService.` prefix), signed and retried as
    /// described in the module documentation. Low-level: the backend methods use it, and so can
    /// operational tooling (e.g. creating an alias). Not for secrets: the JSON values are not wiped.
    pub async fn call_api(&self, action: &str, body: &Value) -> Result<Value, BackendError> {
        let payload = serde_json::to_vec(body).expect("JSON value serializes");
        let resp = self.call_raw(action, &payload).await?;
        serde_json::from_slice(&resp).map_err(|e| {
            BackendError::Other(format!("AWS KMS {action} returned invalid JSON: {e}"))
        })
    }

    async fn call_raw(
        &self,
        action: &str,
        payload: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        let deadline = Instant::now() + self.budget;
        let mut attempt: u32 = 0;
        let mut reauthenticated = false;
        loop {
            attempt += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let result = if remaining.is_zero() {
                Err(BackendError::Timeout(self.budget))
            } else {
                self.call_once(action, payload, remaining).await
            };
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if matches!(err, BackendError::Authentication(_)) && !reauthenticated {
                // Temporary credentials may have expired under us: resolve them once more.
                reauthenticated = true;
                self.creds.invalidate().await;
                continue;
            }
            if !err.is_transient() {
                return Err(err);
            }
            let exp = BACKOFF_BASE
                .saturating_mul(1u32 << attempt.min(5))
                .min(BACKOFF_CAP);
            let sleep =
                Duration::from_millis(rand::thread_rng().gen_range(0..=exp.as_millis() as u64));
            if Instant::now() + sleep >= deadline {
                tracing::debug!(action, attempt, error = %err, "AWS KMS retry budget exhausted");
                return Err(err);
            }
            tracing::debug!(action, attempt, error = %err, ?sleep, "retrying AWS KMS call");
            tokio::time::sleep(sleep).await;
        }
    }

    async fn call_once(
        &self,
        action: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        let creds = self
            .creds
            .credentials()
            .await
            .map_err(|e| BackendError::Authentication(e.to_string()))?;
        let target = format!("TrentService.{action}");
        let headers = [
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", target.as_str()),
        ];
        let req = sigv4::Request {
            method: "POST",
            url: &self.endpoint,
            headers: &headers,
            body: payload,
        };
        let signed = sigv4::sign(&req, &creds, &self.region, "kms", SystemTime::now())
            .map_err(|e| BackendError::Config(e.to_string()))?;
        let mut builder = self
            .http
            .post(&self.endpoint)
            .timeout(timeout)
            .header("content-type", "application/x-amz-json-1.1")
            .header("x-amz-target", &target)
            .header("x-amz-date", &signed.amz_date)
            .header("authorization", &signed.authorization)
            .body(payload.to_vec());
        if let Some(t) = &signed.security_token {
            builder = builder.header("x-amz-security-token", t);
        }
        let resp = builder.send().await.map_err(|e| {
            if e.is_timeout() {
                BackendError::Timeout(timeout)
            } else {
                BackendError::Unavailable(format!(
                    "AWS KMS at {}: {}",
                    self.endpoint,
                    redact_reqwest(&e)
                ))
            }
        })?;
        let status = resp.status().as_u16();
        let error_type_header = resp
            .headers()
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = Zeroizing::new(
            resp.bytes()
                .await
                .map_err(|e| {
                    BackendError::Unavailable(format!(
                        "reading AWS KMS response: {}",
                        redact_reqwest(&e)
                    ))
                })?
                .to_vec(),
        );
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let typ = parsed
            .get("__type")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or(error_type_header)
            .unwrap_or_default();
        let msg = parsed
            .get("message")
            .or_else(|| parsed.get("Message"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .chars()
            .take(300)
            .collect::<String>();
        Err(map_error(action, status, &typ, &msg))
    }

    /// A `KMSInvalidStateException` says the key's state forbids the call; what that state is, and
    /// whether it means revocation (Disabled, PendingDeletion) or a passing condition, only
    /// DescribeKey can tell.
    async fn recheck_state(&self, key: &str, err: BackendError) -> BackendError {
        if !matches!(&err, BackendError::Other(m) if m.ends_with(INVALID_STATE)) {
            return err;
        }
        match self.call_api("DescribeKey", &json!({ "KeyId": key })).await {
            Ok(resp) => {
                let meta = resp.get("KeyMetadata");
                let arn = meta
                    .and_then(|m| m.get("Arn"))
                    .and_then(Value::as_str)
                    .unwrap_or(key);
                let state = meta
                    .and_then(|m| m.get("KeyState"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                key_state_error(arn, state).unwrap_or(err)
            }
            Err(describe) if describe.is_revocation() => describe,
            Err(_) => err,
        }
    }

    fn context(&self) -> Option<&BTreeMap<String, String>> {
        (!self.context.is_empty()).then_some(&self.context)
    }
}

/// Maps a KMS error response to a [`BackendError`].
pub fn map_error(action: &str, status: u16, error_type: &str, message: &str) -> BackendError {
    // `__type` may be namespaced (`com.amazonaws.kms#NotFoundException`) or carry a suffix after ':'.
    let typ = error_type
        .rsplit('#')
        .next()
        .unwrap_or("")
        .split(':')
        .next()
        .unwrap_or("");
    // Signature errors may echo the canonical request, which holds the session token: drop them.
    let auth_error = matches!(
        typ,
        "InvalidSignatureException" | "IncompleteSignature" | "SignatureDoesNotMatch"
    );
    let detail = if message.is_empty() || auth_error {
        format!("AWS KMS {action}: {typ} (HTTP {status})")
    } else {
        format!("AWS KMS {action}: {typ}: {message}")
    };
    // Only a typed KMS error (`__type` / `x-amzn-ErrorType`) is an answer from KMS itself; a bare
    // status from a proxy, a VPC endpoint policy page or a load balancer is an outage.
    match typ {
        "ThrottlingException" | "LimitExceededException" | "RequestLimitExceeded" => {
            BackendError::Throttled(detail)
        }
        "AccessDeniedException" => BackendError::PermissionDenied(detail),
        "DisabledException" => BackendError::KeyDisabled(detail),
        "NotFoundException" => BackendError::KeyNotFound(detail),
        // The key's state forbids the operation, but the state may be passing (PendingImport,
        // Updating, a custom key store reconnecting): the backend re-checks it with DescribeKey.
        "KMSInvalidStateException" => BackendError::Other(format!("{detail} {INVALID_STATE}")),
        "InvalidCiphertextException" | "IncorrectKeyException" => {
            BackendError::InvalidCiphertext(detail)
        }
        "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "ExpiredTokenException"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch" => BackendError::Authentication(detail),
        "InvalidKeyUsageException" | "InvalidGrantTokenException" => BackendError::Config(detail),
        "" if status == 429 => BackendError::Throttled(detail),
        "" => BackendError::Unavailable(format!(
            "AWS KMS {action}: HTTP {status} without a KMS error type (a proxy or endpoint in between?)"
        )),
        _ if status == 429 => BackendError::Throttled(detail),
        _ if status >= 500 => BackendError::Unavailable(detail),
        "KMSInternalException"
        | "DependencyTimeoutException"
        | "KeyUnavailableException"
        | "ServiceUnavailable" => BackendError::Unavailable(detail),
        _ => BackendError::Other(detail),
    }
}

/// Marks the errors that [`AwsKmsBackend::recheck_state`] resolves through DescribeKey.
const INVALID_STATE: &str = "(key state re-checked with DescribeKey)";

fn key_state_error(arn: &str, state: &str) -> Option<BackendError> {
    match state {
        "Enabled" => None,
        "Disabled" | "PendingImport" => {
            Some(BackendError::KeyDisabled(format!("AWS KMS key {arn} is in state {state}")))
        }
        "PendingDeletion" | "PendingReplicaDeletion" => Some(BackendError::KeyNotFound(format!(
            "AWS KMS key {arn} is scheduled for deletion (state {state}); cancel the deletion to keep your data"
        ))),
        _ => Some(BackendError::Unavailable(format!("AWS KMS key {arn} is in state {state}"))),
    }
}

#[async_trait]
impl Backend for AwsKmsBackend {
    fn kind(&self) -> &'static str {
        "aws-kms"
    }

    async fn current_key(&self) -> Result<KeyIdentity, BackendError> {
        let resp = self
            .call_api("DescribeKey", &json!({ "KeyId": self.key }))
            .await?;
        let meta = resp.get("KeyMetadata").ok_or_else(|| {
            BackendError::Other("AWS KMS DescribeKey answer lacks KeyMetadata".into())
        })?;
        let arn = meta
            .get("Arn")
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                BackendError::Other("AWS KMS DescribeKey answer lacks the key ARN".into())
            })?;
        let state = meta
            .get("KeyState")
            .and_then(Value::as_str)
            .unwrap_or_else(|| {
                if meta.get("Enabled").and_then(Value::as_bool) == Some(false) {
                    "Disabled"
                } else {
                    "Enabled"
                }
            });
        if let Some(e) = key_state_error(arn, state) {
            return Err(e);
        }
        if let Some(usage) = meta.get("KeyUsage").and_then(Value::as_str) {
            if usage != "ENCRYPT_DECRYPT" {
                return Err(BackendError::Config(format!(
                    "AWS KMS key {arn} has KeyUsage {usage}, need ENCRYPT_DECRYPT"
                )));
            }
        }
        if let Some(spec) = meta
            .get("KeySpec")
            .or_else(|| meta.get("CustomerMasterKeySpec"))
            .and_then(Value::as_str)
        {
            if spec != "SYMMETRIC_DEFAULT" {
                return Err(BackendError::Config(format!(
                    "AWS KMS key {arn} is {spec}, need a SYMMETRIC_DEFAULT key"
                )));
            }
        }
        Ok(KeyIdentity {
            key_id: arn.to_string(),
            key_ref: arn.to_string(),
        })
    }

    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        let b64 = Zeroizing::new(B64.encode(plaintext));
        let body = Zeroizing::new(
            serde_json::to_vec(&EncryptRequest {
                key_id: &self.key,
                plaintext: &b64,
                encryption_context: self.context(),
            })
            .expect("request serializes"),
        );
        let resp = match self.call_raw("Encrypt", &body).await {
            Ok(r) => r,
            Err(e) => return Err(self.recheck_state(&self.key, e).await),
        };
        let resp: EncryptResponse = serde_json::from_slice(&resp).map_err(|e| {
            BackendError::Other(format!("AWS KMS Encrypt answer is not as expected: {e}"))
        })?;
        let ciphertext = B64
            .decode(&resp.ciphertext_blob)
            .map_err(|_| BackendError::Other("AWS KMS Encrypt answer has invalid base64".into()))?;
        if resp.key_id.is_empty() {
            return Err(BackendError::Other(
                "AWS KMS Encrypt answer lacks KeyId".into(),
            ));
        }
        Ok(WrappedKey {
            key_id: resp.key_id.clone(),
            key_ref: resp.key_id,
            ciphertext,
        })
    }

    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError> {
        if ciphertext.is_empty() {
            return Err(BackendError::InvalidCiphertext("empty wrapped key".into()));
        }
        let blob = B64.encode(ciphertext);
        let body = serde_json::to_vec(&DecryptRequest {
            key_id: key_ref,
            ciphertext_blob: &blob,
            encryption_context: self.context(),
        })
        .expect("request serializes");
        let resp = match self.call_raw("Decrypt", &body).await {
            Ok(r) => r,
            Err(e) => return Err(self.recheck_state(key_ref, e).await),
        };
        let resp: DecryptResponse = serde_json::from_slice(&resp).map_err(|e| {
            BackendError::Other(format!("AWS KMS Decrypt answer is not as expected: {e}"))
        })?;
        let secret = B64
            .decode(&resp.plaintext)
            .map_err(|_| BackendError::Other("AWS KMS Decrypt answer has invalid base64".into()))?;
        Ok(SecretBytes::new(secret))
    }
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct EncryptRequest<'a> {
    key_id: &'a str,
    plaintext: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    encryption_context: Option<&'a BTreeMap<String, String>>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EncryptResponse {
    ciphertext_blob: String,
    key_id: String,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct DecryptRequest<'a> {
    key_id: &'a str,
    ciphertext_blob: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    encryption_context: Option<&'a BTreeMap<String, String>>,
}

#[derive(serde::Deserialize, zeroize::ZeroizeOnDrop)]
#[serde(rename_all = "PascalCase")]
struct DecryptResponse {
    plaintext: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_mapping() {
        let m = |status, typ| map_error("Decrypt", status, typ, "m");
        assert!(matches!(
            m(400, "ThrottlingException"),
            BackendError::Throttled(_)
        ));
        assert!(matches!(m(429, ""), BackendError::Throttled(_)));
        assert!(matches!(m(500, "Whatever"), BackendError::Unavailable(_)));
        assert!(matches!(m(503, ""), BackendError::Unavailable(_)));
        assert!(matches!(
            m(500, "KMSInternalException"),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(
            m(400, "AccessDeniedException"),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(
            m(400, "DisabledException"),
            BackendError::KeyDisabled(_)
        ));
        // Re-checked through DescribeKey by the backend; on its own it is not a revocation.
        assert!(matches!(
            m(400, "com.amazonaws.kms#KMSInvalidStateException"),
            BackendError::Other(ref d) if d.ends_with(INVALID_STATE)
        ));
        // Without a KMS error type, no status is a revocation: a proxy, WAF or VPC endpoint
        // answered, not KMS.
        for status in [400, 401, 403, 404, 409] {
            assert!(
                matches!(m(status, ""), BackendError::Unavailable(_)),
                "{status}"
            );
        }
        assert!(matches!(
            m(400, "NotFoundException"),
            BackendError::KeyNotFound(_)
        ));
        assert!(matches!(
            m(400, "InvalidCiphertextException"),
            BackendError::InvalidCiphertext(_)
        ));
        assert!(matches!(
            m(400, "IncorrectKeyException"),
            BackendError::InvalidCiphertext(_)
        ));
        assert!(matches!(
            m(400, "UnrecognizedClientException"),
            BackendError::Authentication(_)
        ));
        assert!(matches!(
            m(400, "ExpiredTokenException:"),
            BackendError::Authentication(_)
        ));
        assert!(matches!(
            m(400, "ValidationException"),
            BackendError::Other(_)
        ));
        let e = map_error(
            "Encrypt",
            400,
            "InvalidSignatureException",
            "x-amz-security-token:SECRET",
        );
        assert!(matches!(e, BackendError::Authentication(_)) && !e.to_string().contains("SECRET"));
        assert!(m(400, "ThrottlingException").is_transient());
        assert!(m(400, "AccessDeniedException").is_revocation());
        assert_eq!(
            map_error("Encrypt", 400, "NotFoundException", "").to_string(),
            "the key was not found: AWS KMS Encrypt: NotFoundException (HTTP 400)"
        );
    }

    #[test]
    fn key_states() {
        assert!(key_state_error("a", "Enabled").is_none());
        assert!(matches!(
            key_state_error("a", "Disabled"),
            Some(BackendError::KeyDisabled(_))
        ));
        assert!(matches!(
            key_state_error("a", "PendingDeletion"),
            Some(BackendError::KeyNotFound(_))
        ));
        assert!(matches!(
            key_state_error("a", "Creating"),
            Some(BackendError::Unavailable(_))
        ));
    }

    #[test]
    fn args_and_region() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            aws: AwsKmsArgs,
        }
        let cli = Cli::try_parse_from([
            "x",
            "--aws-kms-key-id",
            "arn:aws:kms:eu-central-1:111122223333:key/abc",
            "--aws-kms-encryption-context",
            "cluster=prod",
            "--aws-kms-encryption-context",
            "app=k8s",
        ])
        .unwrap();
        assert_eq!(cli.aws.aws_kms_encryption_context.len(), 2);
        let chain = ChainConfig {
            imds_disabled: true,
            ..Default::default()
        };
        let b = AwsKmsBackend::new(&cli.aws, chain.clone()).unwrap();
        assert_eq!(b.region, "eu-central-1");
        assert_eq!(b.endpoint, "https://kms.eu-central-1.amazonaws.com/");
        assert!(Cli::try_parse_from(["x", "--aws-kms-encryption-context", "novalue"]).is_err());
        let err = AwsKmsBackend::new(&AwsKmsArgs::default(), chain.clone()).unwrap_err();
        assert!(matches!(err, BackendError::Config(_)));
        let no_region = AwsKmsArgs {
            aws_kms_key_id: Some("alias/x".into()),
            ..Default::default()
        };
        assert!(AwsKmsBackend::new(&no_region, chain)
            .unwrap_err()
            .to_string()
            .contains("--aws-region"));
    }
}
