//! AWS KMS as the remote KEK, through the official SDK (`aws-sdk-kms`) with `aws-config`'s
//! credentials and region chains (see [`super::aws`]).
//!
//! - Identity: `DescribeKey` on the configured key (id, ARN or alias) gives the key ARN, which is
//!   both key_id and key_ref. AWS's automatic rotation of the backing key is invisible here (the
//!   ARN stays and old ciphertexts keep decrypting); configuring another key, or re-pointing an
//!   alias, is a new key_id, and the old ciphertexts still decrypt because their key_ref names the
//!   old ARN.
//! - Wrap = `Encrypt`, unwrap = `Decrypt` (with `KeyId`, so a blob can only open under the key it
//!   names), both with the optional encryption context. The wrapped key is labelled with the ARN
//!   Encrypt reports, i.e. the key that actually wrapped.
//! - Unwrap only asks KMS about allowed keys: by default those in the configured key's account and
//!   region, plus `--aws-kms-unwrap-allow`; a crafted ciphertext naming another account's key is
//!   refused without a call.
//! - Only an answer in KMS's own typed error shape can be a revocation; a bare status from a proxy
//!   is an outage. The SDK retries throttling, 429, 5xx and transport errors within
//!   [`RETRY_BUDGET`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_smithy_runtime_api::client::interceptors::context::InterceptorContext;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::retries::classifiers::{ClassifyRetry, RetryAction};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use zeroize::Zeroizing;

use super::aws::AwsOptions;
use super::tls::{TlsFlags, TlsOptions};
use super::{Backend, BackendError, KeyIdentity, SecretBytes, WrappedKey};

/// Total time one operation may spend, retries included.
pub const RETRY_BUDGET: Duration = Duration::from_millis(2500);
const MAX_ATTEMPTS: u32 = 4;

const KIND: &str = "aws-kms";

const TLS_FLAGS: TlsFlags = TlsFlags {
    ca_file: "--aws-ca-file",
    client_cert_file: "--aws-client-cert-file",
    client_key_file: "--aws-client-key-file",
};

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
    /// AWS region (default: the region of a key ARN, else the SDK's chain: AWS_REGION,
    /// AWS_DEFAULT_REGION, the profile's `region`, IMDS).
    #[arg(
        long = "aws-region",
        env = "KMS_PLUGIN_AWS_REGION",
        value_name = "REGION"
    )]
    pub aws_region: Option<String>,
    /// KMS endpoint URL (VPC endpoints, test servers). Default: the SDK's endpoint for the region
    /// and partition (`kms.REGION.amazonaws.com`, `.amazonaws.com.cn` in China, FIPS and
    /// dual-stack variants on request).
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
    /// Use the FIPS endpoint of KMS (and of STS for credentials). Default: AWS_USE_FIPS_ENDPOINT or
    /// the profile's `use_fips_endpoint`.
    #[arg(
        long = "aws-use-fips-endpoint",
        env = "KMS_PLUGIN_AWS_USE_FIPS_ENDPOINT",
        value_name = "BOOL"
    )]
    pub aws_use_fips_endpoint: Option<bool>,
    /// Use the dual-stack (IPv4 and IPv6) endpoint of KMS. Default: AWS_USE_DUALSTACK_ENDPOINT or
    /// the profile's `use_dualstack_endpoint`.
    #[arg(
        long = "aws-use-dualstack-endpoint",
        env = "KMS_PLUGIN_AWS_USE_DUALSTACK_ENDPOINT",
        value_name = "BOOL"
    )]
    pub aws_use_dualstack_endpoint: Option<bool>,
    /// PEM bundle of extra CA certificates for KMS and STS (a TLS-inspecting proxy, a private
    /// VPC endpoint name). Default: AWS_CA_BUNDLE. Added to the system store or SSL_CERT_FILE.
    #[arg(
        long = "aws-ca-file",
        env = "KMS_PLUGIN_AWS_CA_FILE",
        value_name = "FILE"
    )]
    pub aws_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for a proxy or endpoint that requires mutual TLS.
    #[arg(
        long = "aws-client-cert-file",
        env = "KMS_PLUGIN_AWS_CLIENT_CERT_FILE",
        value_name = "FILE"
    )]
    pub aws_client_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --aws-client-cert-file.
    #[arg(
        long = "aws-client-key-file",
        env = "KMS_PLUGIN_AWS_CLIENT_KEY_FILE",
        value_name = "FILE"
    )]
    pub aws_client_key_file: Option<PathBuf>,
    /// Further KMS keys Decrypt may be asked to use (repeatable; comma-separated in the
    /// environment): a key ARN, an ARN prefix ending in `*` (e.g. `arn:aws:kms:REGION:ACCOUNT:key/*`)
    /// or `*` for any key. By default only keys in the configured key's account and region are
    /// used, so a crafted ciphertext cannot make the plugin call KMS on another account's key.
    #[arg(
        long = "aws-kms-unwrap-allow",
        env = "KMS_PLUGIN_AWS_KMS_UNWRAP_ALLOW",
        value_name = "ARN|PREFIX*|*",
        value_delimiter = ','
    )]
    pub aws_kms_unwrap_allow: Vec<String>,
}

fn de_context<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    let map: BTreeMap<String, String> = serde::Deserialize::deserialize(d)?;
    Ok(map.into_iter().collect())
}

/// Builds the AWS KMS backend from its options and the SDK's default chains, and checks the key
/// once (`DescribeKey`), so that a wrong key, region or permission stops start-up with a clear
/// error.
/// Credential renewals are reported to `events`.
pub async fn from_args(
    args: &AwsKmsArgs,
    events: Arc<dyn super::BackendEvents>,
) -> Result<Arc<dyn Backend>, BackendError> {
    let mut opts = options(args, None)?;
    opts.events = Some((events, KIND));
    let config = super::aws::sdk_config(&opts, &TLS_FLAGS).await?;
    let backend = AwsKmsBackend::new(args, &config)?;
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
    Ok(Arc::new(backend))
}

/// The SDK configuration for `args`: region (flag, key ARN, then the SDK's chain), FIPS and
/// dual-stack settings, trust store; `credentials` replaces the default chain when given.
pub async fn sdk_config(
    args: &AwsKmsArgs,
    credentials: Option<aws_credential_types::provider::SharedCredentialsProvider>,
) -> Result<SdkConfig, BackendError> {
    super::aws::sdk_config(&options(args, credentials)?, &TLS_FLAGS).await
}

fn options(
    args: &AwsKmsArgs,
    credentials: Option<aws_credential_types::provider::SharedCredentialsProvider>,
) -> Result<AwsOptions, BackendError> {
    let key = configured_key(args)?;
    Ok(AwsOptions {
        region: args.aws_region.clone().or_else(|| region_of_arn(&key)),
        use_fips: args.aws_use_fips_endpoint,
        use_dual_stack: args.aws_use_dualstack_endpoint,
        tls: TlsOptions {
            ca_file: args.aws_ca_file.clone().or_else(|| {
                std::env::var_os("AWS_CA_BUNDLE")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            }),
            client_cert_file: args.aws_client_cert_file.clone(),
            client_key_file: args.aws_client_key_file.clone(),
        },
        credentials,
        ..AwsOptions::default()
    })
}

fn configured_key(args: &AwsKmsArgs) -> Result<String, BackendError> {
    args.aws_kms_key_id
        .as_deref()
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            BackendError::Config("--aws-kms-key-id is required for --backend aws-kms".into())
        })
}

/// See the module documentation.
pub struct AwsKmsBackend {
    key: String,
    region: String,
    client: aws_sdk_kms::Client,
    context: Option<HashMap<String, String>>,
    allow: AllowList,
}

impl std::fmt::Debug for AwsKmsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<_> = self.context.iter().flat_map(|c| c.keys()).collect();
        keys.sort();
        f.debug_struct("AwsKmsBackend")
            .field("key", &self.key)
            .field("region", &self.region)
            .field("encryption_context_keys", &keys)
            .finish_non_exhaustive()
    }
}

/// `arn:PARTITION:kms:REGION:ACCOUNT:...` split into (partition, region, account).
fn arn_parts(arn: &str) -> Option<(&str, &str, &str)> {
    let mut it = arn.splitn(6, ':');
    let (a, partition, service, region, account) =
        (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    it.next()?;
    (a == "arn" && service == "kms" && !region.is_empty() && !account.is_empty())
        .then_some((partition, region, account))
}

fn region_of_arn(key: &str) -> Option<String> {
    arn_parts(key).map(|(_, r, _)| r.to_string())
}

/// Which key ARNs Decrypt may name (see [`AwsKmsArgs::aws_kms_unwrap_allow`]).
#[derive(Debug, Default)]
struct AllowList {
    /// `arn:PARTITION:kms:REGION:ACCOUNT:` of the configured key, once known.
    home: Mutex<Option<String>>,
    /// Keys this process resolved or wrapped with.
    used: Mutex<HashSet<String>>,
    /// From the flag: exact ARNs, and prefixes (without their `*`).
    exact: HashSet<String>,
    prefixes: Vec<String>,
}

impl AllowList {
    fn new(extra: &[String], key: &str) -> Self {
        let mut a = AllowList::default();
        for e in extra.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            match e.strip_suffix('*') {
                Some(prefix) => a.prefixes.push(prefix.to_string()),
                None => {
                    a.exact.insert(e.to_string());
                }
            }
        }
        a.learn(key);
        a
    }

    /// Records a key ARN the backend itself resolved or used; the first one sets the home account.
    fn learn(&self, arn: &str) {
        if let Some((p, r, acct)) = arn_parts(arn) {
            let mut home = self.home.lock().unwrap_or_else(|e| e.into_inner());
            if home.is_none() {
                *home = Some(format!("arn:{p}:kms:{r}:{acct}:"));
            }
            drop(home);
            self.used
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(arn.to_string());
        }
    }

    fn home_known(&self) -> bool {
        self.home
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn allows(&self, arn: &str) -> bool {
        if self.exact.contains(arn) || self.prefixes.iter().any(|p| arn.starts_with(p.as_str())) {
            return true;
        }
        if self
            .used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(arn)
        {
            return true;
        }
        // Same account and region as the configured key; `key/` or an alias under it.
        let home = self.home.lock().unwrap_or_else(|e| e.into_inner());
        match (&*home, arn_parts(arn)) {
            (Some(h), Some(_)) => arn.starts_with(h.as_str()),
            _ => false,
        }
    }
}

/// Retries a bare 429 as throttling (the SDK's own classifiers retry typed throttling and 5xx).
#[derive(Debug)]
struct TooManyRequests;

impl ClassifyRetry for TooManyRequests {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        match ctx.response() {
            Some(r) if r.status().as_u16() == 429 => RetryAction::throttling_error(),
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "HTTP 429"
    }
}

impl AwsKmsBackend {
    /// Builds the backend on `config` (see [`sdk_config`]) without contacting AWS.
    pub fn new(args: &AwsKmsArgs, config: &SdkConfig) -> Result<Self, BackendError> {
        let key = configured_key(args)?;
        let region = config.region().map(|r| r.to_string()).ok_or_else(|| {
            BackendError::Config(
                "no AWS region: pass --aws-region, use a key ARN, or set AWS_REGION".into(),
            )
        })?;
        let mut b = aws_sdk_kms::config::Builder::from(config)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(MAX_ATTEMPTS)
                    .with_initial_backoff(Duration::from_millis(50))
                    .with_max_backoff(Duration::from_millis(800)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .operation_timeout(RETRY_BUDGET)
                    .build(),
            )
            .retry_classifier(TooManyRequests);
        if let Some(url) = args.aws_endpoint_url.as_deref().map(str::trim) {
            let parsed: http::Uri = url.parse().map_err(|e| {
                BackendError::Config(format!("--aws-endpoint-url {url:?} is not a URL: {e}"))
            })?;
            match parsed.scheme_str() {
                Some("https") => {}
                Some("http") => tracing::warn!(endpoint = %url, "AWS KMS endpoint uses plain http"),
                _ => {
                    return Err(BackendError::Config(format!(
                        "--aws-endpoint-url {url:?} must be http(s)"
                    )))
                }
            }
            b = b.endpoint_url(url.trim_end_matches('/'));
        }
        let context: HashMap<String, String> =
            args.aws_kms_encryption_context.iter().cloned().collect();
        Ok(AwsKmsBackend {
            allow: AllowList::new(&args.aws_kms_unwrap_allow, &key),
            key,
            region,
            client: aws_sdk_kms::Client::from_conf(b.build()),
            context: (!context.is_empty()).then_some(context),
        })
    }

    /// The configured key (as given: id, ARN or alias).
    pub fn configured_key(&self) -> &str {
        &self.key
    }

    /// The region the client calls.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The SDK client, with the backend's retry and timeout settings: for operational tooling
    /// (creating keys or aliases) and tests.
    pub fn client(&self) -> &aws_sdk_kms::Client {
        &self.client
    }

    /// A `KMSInvalidStateException` says the key's state forbids the call; what that state is, and
    /// whether it means revocation (Disabled, PendingDeletion) or a passing condition, only
    /// DescribeKey can tell.
    async fn recheck_state(&self, key: &str, err: BackendError) -> BackendError {
        if !matches!(&err, BackendError::Other(m) if m.ends_with(INVALID_STATE)) {
            return err;
        }
        match self.client.describe_key().key_id(key).send().await {
            Ok(resp) => {
                let meta = resp.key_metadata();
                let arn = meta.and_then(|m| m.arn()).unwrap_or(key);
                let state = meta
                    .and_then(|m| m.key_state())
                    .map(|s| s.as_str())
                    .unwrap_or("");
                key_state_error(arn, state).unwrap_or(err)
            }
            Err(e) => {
                let describe = classify("DescribeKey", e);
                if describe.is_revocation() {
                    describe
                } else {
                    err
                }
            }
        }
    }

    async fn allowed(&self, key_ref: &str) -> Result<(), BackendError> {
        if !self.allow.home_known() {
            // Configured by alias or key id and not resolved yet: learn the account first.
            self.current_key().await?;
        }
        if self.allow.allows(key_ref) {
            return Ok(());
        }
        Err(BackendError::InvalidCiphertext(format!(
            "the wrapped key names the AWS KMS key {key_ref:?}, which is outside the configured \
             key's account and region; if that key is meant to be used, add it to \
             --aws-kms-unwrap-allow"
        )))
    }
}

/// An SDK error as a [`BackendError`].
fn classify<E>(action: &str, err: SdkError<E, HttpResponse>) -> BackendError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(ctx) => {
            let e = ctx.err();
            map_error(
                action,
                ctx.raw().status().as_u16(),
                e.code().unwrap_or(""),
                e.message().unwrap_or(""),
            )
        }
        SdkError::TimeoutError(_) => BackendError::Timeout(RETRY_BUDGET),
        SdkError::DispatchFailure(d) if d.is_timeout() => BackendError::Timeout(RETRY_BUDGET),
        SdkError::DispatchFailure(d) if d.is_io() => {
            let cause = super::aws::error_chain(&err);
            let hint = if cause.contains("invalid peer certificate") {
                " (the server's certificate is not trusted: add its CA with --aws-ca-file or \
                 SSL_CERT_FILE)"
            } else {
                ""
            };
            BackendError::Unavailable(format!("AWS KMS {action}: {cause}{hint}"))
        }
        // Before sending: resolving credentials (STS, IMDS, the container endpoint, a profile)
        // or signing failed. Not KMS's answer, so never a revocation.
        SdkError::DispatchFailure(d) if d.is_other() => BackendError::Unavailable(format!(
            "AWS KMS {action}: no usable AWS credentials: {} (the SDK's chain: environment, \
             profile, web identity, container endpoint, IMDS)",
            super::aws::error_chain(&err)
        )),
        SdkError::DispatchFailure(_) => BackendError::Other(format!(
            "AWS KMS {action}: the request could not be sent: {}",
            super::aws::error_chain(&err)
        )),
        SdkError::ResponseError(r) => BackendError::Unavailable(format!(
            "AWS KMS {action}: HTTP {} with an unreadable body (a proxy or endpoint in between?)",
            r.raw().status().as_u16()
        )),
        SdkError::ConstructionFailure(_) => BackendError::Config(format!(
            "AWS KMS {action}: cannot build the request: {}",
            super::aws::error_chain(&err)
        )),
        _ => BackendError::Other(format!(
            "AWS KMS {action}: {}",
            super::aws::error_chain(&err)
        )),
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
        KIND
    }

    async fn current_key(&self) -> Result<KeyIdentity, BackendError> {
        let resp = self
            .client
            .describe_key()
            .key_id(&self.key)
            .send()
            .await
            .map_err(|e| classify("DescribeKey", e))?;
        let meta = resp.key_metadata().ok_or_else(|| {
            BackendError::Other("AWS KMS DescribeKey answer lacks KeyMetadata".into())
        })?;
        let arn = meta.arn().filter(|a| !a.is_empty()).ok_or_else(|| {
            BackendError::Other("AWS KMS DescribeKey answer lacks the key ARN".into())
        })?;
        let state = match meta.key_state() {
            Some(s) => s.as_str(),
            None if !meta.enabled() => "Disabled",
            None => "Enabled",
        };
        if let Some(e) = key_state_error(arn, state) {
            return Err(e);
        }
        if let Some(usage) = meta.key_usage().map(|u| u.as_str()) {
            if usage != "ENCRYPT_DECRYPT" {
                return Err(BackendError::Config(format!(
                    "AWS KMS key {arn} has KeyUsage {usage}, need ENCRYPT_DECRYPT"
                )));
            }
        }
        #[allow(deprecated)]
        let spec = meta
            .key_spec()
            .map(|s| s.as_str())
            .or_else(|| meta.customer_master_key_spec().map(|s| s.as_str()));
        if let Some(spec) = spec {
            if spec != "SYMMETRIC_DEFAULT" {
                return Err(BackendError::Config(format!(
                    "AWS KMS key {arn} is {spec}, need a SYMMETRIC_DEFAULT key"
                )));
            }
        }
        self.allow.learn(arn);
        Ok(KeyIdentity {
            key_id: arn.to_string(),
            key_ref: arn.to_string(),
        })
    }

    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        let resp = self
            .client
            .encrypt()
            .key_id(&self.key)
            .plaintext(Blob::new(plaintext.to_vec()))
            .set_encryption_context(self.context.clone())
            .send()
            .await;
        let mut resp = match resp {
            Ok(r) => r,
            Err(e) => {
                let e = classify("Encrypt", e);
                return Err(self.recheck_state(&self.key, e).await);
            }
        };
        let ciphertext = resp
            .ciphertext_blob
            .take()
            .map(Blob::into_inner)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                BackendError::Other("AWS KMS Encrypt answer lacks the ciphertext".into())
            })?;
        let arn = resp
            .key_id
            .take()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| BackendError::Other("AWS KMS Encrypt answer lacks KeyId".into()))?;
        self.allow.learn(&arn);
        Ok(WrappedKey {
            key_id: arn.clone(),
            key_ref: arn,
            ciphertext,
        })
    }

    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError> {
        if ciphertext.is_empty() {
            return Err(BackendError::InvalidCiphertext("empty wrapped key".into()));
        }
        self.allowed(key_ref).await?;
        let resp = self
            .client
            .decrypt()
            .key_id(key_ref)
            .ciphertext_blob(Blob::new(ciphertext.to_vec()))
            .set_encryption_context(self.context.clone())
            .send()
            .await;
        let mut resp = match resp {
            Ok(r) => r,
            Err(e) => {
                let e = classify("Decrypt", e);
                return Err(self.recheck_state(key_ref, e).await);
            }
        };
        let plain = resp
            .plaintext
            .take()
            .map(|b| Zeroizing::new(b.into_inner()))
            .ok_or_else(|| BackendError::Other("AWS KMS Decrypt answer lacks Plaintext".into()))?;
        Ok(plain)
    }
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

    #[tokio::test]
    async fn args_region_and_allow_list() {
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
            "--aws-use-fips-endpoint",
            "true",
        ])
        .unwrap();
        assert_eq!(cli.aws.aws_kms_encryption_context.len(), 2);
        assert_eq!(cli.aws.aws_use_fips_endpoint, Some(true));
        let creds = aws_credential_types::Credentials::new("AKID", "s", None, None, "test");
        let config = sdk_config(
            &cli.aws,
            Some(aws_credential_types::provider::SharedCredentialsProvider::new(creds)),
        )
        .await
        .unwrap();
        assert_eq!(config.use_fips(), Some(true));
        let b = AwsKmsBackend::new(&cli.aws, &config).unwrap();
        assert_eq!(b.region(), "eu-central-1");
        assert!(Cli::try_parse_from(["x", "--aws-kms-encryption-context", "novalue"]).is_err());
        let err = AwsKmsBackend::new(&AwsKmsArgs::default(), &config).unwrap_err();
        assert!(matches!(err, BackendError::Config(_)));
        let no_region = AwsKmsArgs {
            aws_kms_key_id: Some("alias/x".into()),
            ..Default::default()
        };
        let bare = SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        assert!(AwsKmsBackend::new(&no_region, &bare)
            .unwrap_err()
            .to_string()
            .contains("--aws-region"));

        // The allow-list: the home account and region, keys used, and the flag's entries.
        let a = AllowList::new(
            &[
                "arn:aws:kms:us-east-1:444455556666:key/one".into(),
                "arn:aws:kms:eu-west-1:777788889999:key/*".into(),
            ],
            "alias/x",
        );
        assert!(!a.home_known());
        a.learn("arn:aws:kms:eu-central-1:111122223333:key/abc");
        assert!(a.allows("arn:aws:kms:eu-central-1:111122223333:key/other"));
        assert!(!a.allows("arn:aws:kms:eu-central-1:999999999999:key/abc"));
        assert!(!a.allows("arn:aws:kms:us-west-2:111122223333:key/abc"));
        assert!(!a.allows("k1"));
        assert!(a.allows("arn:aws:kms:us-east-1:444455556666:key/one"));
        assert!(!a.allows("arn:aws:kms:us-east-1:444455556666:key/two"));
        assert!(a.allows("arn:aws:kms:eu-west-1:777788889999:key/any"));
        let any = AllowList::new(&["*".into()], "k");
        assert!(any.allows("arn:aws:kms:eu-west-1:1:key/x"));
        assert_eq!(
            arn_parts("arn:aws-cn:kms:cn-north-1:111122223333:key/abc"),
            Some(("aws-cn", "cn-north-1", "111122223333"))
        );
        assert_eq!(arn_parts("arn:aws:kms:eu-west-1:1"), None);
    }

    /// The endpoints the SDK derives from region, partition and the FIPS / dual-stack options:
    /// what replaces the hand-built `https://kms.REGION.amazonaws.com`.
    #[tokio::test]
    async fn endpoints_follow_partition_fips_and_dual_stack() {
        use aws_sdk_kms::config::endpoint::{DefaultResolver, Params, ResolveEndpoint};
        let url = |region: &str, fips: bool, dual: bool| {
            let p = Params::builder()
                .region(region)
                .use_fips(fips)
                .use_dual_stack(dual)
                .build()
                .unwrap();
            async move {
                DefaultResolver::new()
                    .resolve_endpoint(&p)
                    .await
                    .unwrap()
                    .url()
                    .to_string()
            }
        };
        assert_eq!(
            url("eu-west-1", false, false).await,
            "https://kms.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            url("cn-north-1", false, false).await,
            "https://kms.cn-north-1.amazonaws.com.cn"
        );
        assert_eq!(
            url("us-east-1", true, false).await,
            "https://kms-fips.us-east-1.amazonaws.com"
        );
        assert_eq!(
            url("us-gov-west-1", true, false).await,
            "https://kms-fips.us-gov-west-1.amazonaws.com"
        );
        assert_eq!(
            url("eu-west-1", false, true).await,
            "https://kms.eu-west-1.api.aws"
        );
    }
}
