//! Authentication: building the `/auth` request for each access type, and the token manager.
//!
//! Akeyless has no refresh call, so the manager authenticates again before the token expires:
//! at 3/4 of the lifetime the server announces in `expiration`, but at least every 14.5 minutes
//! (what Akeyless's own clients do; tokens usually live 60 minutes). It re-authenticates once more
//! when the server rejects a token. Only one authentication is in flight at a time: concurrent
//! callers wait for it and share its result. When a scheduled re-authentication fails while the old
//! token is still valid, the old token keeps serving and the next attempt waits a little.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{Map, Value};
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::client::{CallError, Client, Op};
use super::cloud_id;
use super::config::{AccessType, AkeylessArgs, Secret};
use super::uid::UidState;
use crate::backend::{AuthEvent, AuthKind, BackendError, BackendEvents};

/// Re-authentication interval when the server does not say when the token expires.
pub(crate) const DEFAULT_REFRESH: Duration = Duration::from_secs(14 * 60 + 30);
/// How long a token is assumed to stay usable when the server does not say (tokens usually live 60
/// minutes; this is only how long a failing re-authentication may fall back on the old token).
const DEFAULT_ASSUMED_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// What a cloud identity provider is asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudIdRequest {
    /// `AwsIam`, `AzureAd` or `Gcp`.
    pub kind: AccessType,
    /// Azure: object id of the managed identity, if several are attached.
    pub azure_object_id: Option<String>,
    /// GCP: audience of the identity token.
    pub gcp_audience: String,
}

/// Builds the `cloud-id` field of `/auth` for the cloud access types (AWS: a signed, never-sent STS
/// GetCallerIdentity request; Azure: a managed-identity token from IMDS; GCP: an identity token from
/// the metadata server), and detects which cloud the plugin runs in.
///
/// Implemented over `cloud_id.rs`; [`default_cloud_id_provider`] returns it once it exists. The
/// provider is built from [`AkeylessArgs`] and so knows the endpoint overrides
/// (`--akeyless-aws-sts-url`, `--akeyless-aws-imds-url`, `--akeyless-azure-imds-url`,
/// `--akeyless-gcp-metadata-url`).
#[async_trait]
pub trait CloudIdProvider: Send + Sync + fmt::Debug + 'static {
    /// The base64 cloud-id for `req.kind`. Must not put the credential into errors.
    async fn cloud_id(&self, req: &CloudIdRequest) -> Result<String, BackendError>;
    /// The cloud we run in (probing metadata services with short timeouts), or `None`.
    async fn detect(&self) -> Option<AccessType>;
}

/// Placeholder until the cloud identity builders land: every cloud access type is a configuration
/// error, and detection finds nothing.
#[derive(Debug, Default)]
pub struct NoCloudId;

#[async_trait]
impl CloudIdProvider for NoCloudId {
    async fn cloud_id(&self, req: &CloudIdRequest) -> Result<String, BackendError> {
        Err(BackendError::Config(format!(
            "access type {} needs cloud identity support, which this build does not include",
            req.kind
        )))
    }
    async fn detect(&self) -> Option<AccessType> {
        None
    }
}

/// The provider used by [`super::AkeylessBackend::connect`]: the metadata services and the AWS
/// credentials chain, with the endpoint overrides from `args`.
pub fn default_cloud_id_provider(args: &AkeylessArgs) -> Arc<dyn CloudIdProvider> {
    let mut detect = cloud_id::DetectConfig::default();
    if let Some(url) = &args.aws_imds_url {
        detect.aws_imds_url = url.clone();
    }
    if let Some(url) = &args.azure_imds_url {
        detect.azure_imds_url = url.clone();
    }
    if let Some(url) = &args.gcp_metadata_url {
        detect.gcp_metadata_url = url.clone();
    }
    Arc::new(MetadataCloudId {
        aws: cloud_id::AwsCredentialSource::default_chain(args.aws_imds_url.clone()),
        // Current official clients sign for the regional STS endpoint when AWS_REGION is set.
        sts_url: args.aws_sts_url.clone().unwrap_or_else(|| {
            cloud_id::sts_url_for_region(std::env::var("AWS_REGION").ok().as_deref())
        }),
        azure_workload: cloud_id::AzureWorkloadIdentity::from_env(|k| std::env::var(k).ok()),
        detect,
    })
}

/// [`CloudIdProvider`] over [`cloud_id`]: signed STS request, Azure IMDS, GCP metadata server.
struct MetadataCloudId {
    aws: cloud_id::AwsCredentialSource,
    sts_url: String,
    /// AKS workload identity, preferred over IMDS when its variables are set.
    azure_workload: Option<cloud_id::AzureWorkloadIdentity>,
    detect: cloud_id::DetectConfig,
}

impl fmt::Debug for MetadataCloudId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetadataCloudId")
            .field("sts_url", &self.sts_url)
            .field("azure_workload", &self.azure_workload)
            .field("detect", &self.detect)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl CloudIdProvider for MetadataCloudId {
    async fn cloud_id(&self, req: &CloudIdRequest) -> Result<String, BackendError> {
        let result = match req.kind {
            AccessType::AwsIam => {
                let region = cloud_id::sts_region_from_url(&self.sts_url);
                cloud_id::aws_iam_cloud_id_from_chain(&self.aws, &self.sts_url, &region).await
            }
            AccessType::AzureAd if self.azure_workload.is_some() => {
                let wi = self.azure_workload.as_ref().expect("checked");
                cloud_id::azure_workload_identity_cloud_id(wi).await
            }
            AccessType::AzureAd => {
                cloud_id::azure_ad_cloud_id(
                    &self.detect.azure_imds_url,
                    req.azure_object_id.as_deref(),
                )
                .await
            }
            AccessType::Gcp => {
                cloud_id::gcp_cloud_id(&self.detect.gcp_metadata_url, Some(&req.gcp_audience)).await
            }
            other => {
                return Err(BackendError::Config(format!(
                    "access type {other} has no cloud identity"
                )))
            }
        };
        // A metadata service, STS credentials source or Entra ID that does not answer is not
        // Akeyless refusing us: Unavailable (start-up goes on, logins are retried), with the cause.
        result.map(|id| id.to_string()).map_err(|e| match e {
            cloud_id::CloudIdError::Sign(_) => BackendError::Other(format!(
                "cannot build the {} cloud identity: {e}",
                req.kind
            )),
            _ => BackendError::Unavailable(format!(
                "cannot build the {} cloud identity: {e} (if the plugin does not run on that cloud, \
                 set --akeyless-access-type)",
                req.kind
            )),
        })
    }

    async fn detect(&self) -> Option<AccessType> {
        if self.azure_workload.is_some() {
            return Some(AccessType::AzureAd);
        }
        let cloud = cloud_id::detect_cloud(&self.detect).await?;
        AccessType::parse_loose(cloud.access_type())
    }
}

/// How `/auth` proves who we are.
pub(crate) enum Method {
    AccessKey(Secret),
    Uid(Arc<UidState>),
    K8s {
        config_name: String,
        token_file: PathBuf,
    },
    Cert {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
    Jwt {
        file: PathBuf,
    },
    Cloud {
        provider: Arc<dyn CloudIdProvider>,
        req: CloudIdRequest,
    },
}

impl Method {
    pub(crate) fn access_type(&self) -> AccessType {
        match self {
            Method::AccessKey(_) => AccessType::AccessKey,
            Method::Uid(_) => AccessType::UniversalIdentity,
            Method::K8s { .. } => AccessType::K8s,
            Method::Cert { .. } => AccessType::Cert,
            Method::Jwt { .. } => AccessType::Jwt,
            Method::Cloud { req, .. } => req.kind,
        }
    }
}

impl fmt::Debug for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Method({})", self.access_type())
    }
}

fn read_secret_file(path: &PathBuf, what: &str) -> Result<Zeroizing<String>, BackendError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        BackendError::Config(format!(
            "cannot read the {what} file {}: {e}",
            path.display()
        ))
    })?);
    let trimmed = Zeroizing::new(text.trim().to_string());
    if trimmed.is_empty() {
        return Err(BackendError::Config(format!(
            "the {what} file {} is empty",
            path.display()
        )));
    }
    Ok(trimmed)
}

/// A token and when to renew it.
struct Slot {
    token: Secret,
    generation: u64,
    refresh_at: Instant,
    expires_at: Instant,
    /// The server rejected it: do not hand it out again.
    rejected: bool,
}

/// Authenticates, caches the token and renews it; see the module documentation.
pub(crate) struct TokenManager {
    client: Arc<Client>,
    access_id: Option<String>,
    method: Method,
    slot: RwLock<Option<Slot>>,
    /// Single flight: held while authenticating (and while rotating a UID token).
    flight: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    last_failure: Mutex<Option<Instant>>,
    auth_calls: AtomicU64,
    events: Arc<dyn BackendEvents>,
}

impl fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenManager")
            .field("access_id", &self.access_id)
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

impl TokenManager {
    pub(crate) fn new(
        client: Arc<Client>,
        access_id: Option<String>,
        method: Method,
        events: Arc<dyn BackendEvents>,
    ) -> Self {
        TokenManager {
            client,
            access_id,
            method,
            slot: RwLock::new(None),
            flight: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            last_failure: Mutex::new(None),
            auth_calls: AtomicU64::new(0),
            events,
        }
    }

    pub(crate) fn flight(&self) -> &tokio::sync::Mutex<()> {
        &self.flight
    }

    /// Number of `/auth` calls made so far.
    pub(crate) fn auth_calls(&self) -> u64 {
        self.auth_calls.load(Ordering::Relaxed)
    }

    fn retry_pause(&self) -> Duration {
        (self.client.budgets().request * 2).max(Duration::from_secs(1))
    }

    /// A token usable now, authenticating first if needed. Returns the token and its generation
    /// (pass it to [`TokenManager::reject`] if the server refuses it).
    ///
    /// A token that is due for renewal but still valid is returned as it is: renewing is the
    /// background task's job ([`TokenManager::renew`]), so a request never waits for a slow login
    /// while it holds a usable token.
    pub(crate) async fn get(&self, deadline: Instant) -> Result<(Secret, u64), BackendError> {
        if let Some(t) = self.still_valid() {
            return Ok(t);
        }
        self.acquire(deadline).await
    }

    /// Background renewal: authenticates when the token is due (or missing), keeps the old token
    /// when that fails while it is still valid.
    pub(crate) async fn renew(&self, deadline: Instant) -> Result<(Secret, u64), BackendError> {
        self.acquire(deadline).await
    }

    async fn acquire(&self, deadline: Instant) -> Result<(Secret, u64), BackendError> {
        if let Some(t) = self.fresh() {
            return Ok(t);
        }
        let _flight = tokio::time::timeout_at(deadline, self.flight.lock())
            .await
            .map_err(|_| BackendError::Timeout(self.client.budgets().request))?;
        // Someone else may have authenticated while we waited.
        if let Some(t) = self.fresh() {
            return Ok(t);
        }
        // Renewing a token that still works is a refresh; anything else (first token, rejected or
        // expired one) is a login.
        let kind = if self.still_valid().is_some() {
            AuthKind::TokenRefresh
        } else {
            AuthKind::Login
        };
        let result = self.authenticate(deadline).await;
        self.events.auth(AuthEvent {
            backend: super::KIND,
            kind,
            outcome: result.as_ref().map(|_| ()),
        });
        match result {
            Ok(t) => Ok(t),
            Err(e) => {
                *self.last_failure.lock().unwrap() = Some(Instant::now());
                if let Some(t) = self.still_valid() {
                    tracing::warn!(error = %e, "Akeyless re-authentication failed; the current token stays in use");
                    return Ok(t);
                }
                Err(e)
            }
        }
    }

    /// The cached token if no renewal is due (or a recent renewal failed and it is still valid).
    fn fresh(&self) -> Option<(Secret, u64)> {
        let now = Instant::now();
        let slot = self.slot.read().unwrap();
        let s = slot.as_ref()?;
        if s.rejected || now >= s.expires_at {
            return None;
        }
        if now < s.refresh_at {
            return Some((s.token.clone(), s.generation));
        }
        let recent_failure = self
            .last_failure
            .lock()
            .unwrap()
            .is_some_and(|t| now < t + self.retry_pause());
        recent_failure.then(|| (s.token.clone(), s.generation))
    }

    fn still_valid(&self) -> Option<(Secret, u64)> {
        let slot = self.slot.read().unwrap();
        let s = slot.as_ref()?;
        (!s.rejected && Instant::now() < s.expires_at).then(|| (s.token.clone(), s.generation))
    }

    /// The server refused the token of `generation`: the next [`TokenManager::get`] authenticates.
    pub(crate) fn reject(&self, generation: u64) {
        if let Some(s) = self.slot.write().unwrap().as_mut() {
            if s.generation == generation {
                s.rejected = true;
            }
        }
    }

    /// When the background task should next look at the token.
    pub(crate) fn next_check(&self) -> Instant {
        let now = Instant::now();
        let slot = self.slot.read().unwrap();
        let failure = *self.last_failure.lock().unwrap();
        match slot.as_ref() {
            None => now + self.retry_pause(),
            Some(s) if now >= s.refresh_at => {
                failure.map_or(now, |f| f + self.retry_pause()).max(now)
            }
            Some(s) => s.refresh_at,
        }
    }

    /// Authenticates now (the caller holds the flight lock) and stores the new token.
    async fn authenticate(&self, deadline: Instant) -> Result<(Secret, u64), BackendError> {
        let body = self.auth_body(deadline).await?;
        self.auth_calls.fetch_add(1, Ordering::Relaxed);
        let reply = self
            .client
            .call(Op::Auth, "auth", &body, deadline)
            .await
            .map_err(|e| match e {
                CallError::Failed(e) => e,
                CallError::TokenRejected(m) => BackendError::Authentication(m),
            })?;
        self.store(&reply)
    }

    /// Uses the answer of a `/auth` made elsewhere (the Universal Identity start-up check) as the
    /// current token, so start-up logs in once.
    pub(crate) fn install_login(&self, reply: &Map<String, Value>) -> Result<(), BackendError> {
        let _flight = self
            .flight
            .try_lock()
            .map_err(|_| BackendError::Other("a login is already in flight at start-up".into()))?;
        self.auth_calls.fetch_add(1, Ordering::Relaxed);
        self.store(reply).map(|_| ())
    }

    /// Stores the token of an `/auth` answer.
    fn store(&self, reply: &Map<String, Value>) -> Result<(Secret, u64), BackendError> {
        let token =
            match reply.get("token") {
                Some(Value::String(t)) if !t.is_empty() => Secret::new(t.clone()),
                _ => return Err(BackendError::Authentication(
                    "/auth answered without a token (an auth method needing a second factor or a \
                     browser cannot be used by the plugin)"
                        .into(),
                )),
            };
        let expiration = expiration_of(reply);
        let (refresh_at, expires_at) = schedule(Instant::now(), SystemTime::now(), expiration);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.slot.write().unwrap() = Some(Slot {
            token: token.clone(),
            generation,
            refresh_at,
            expires_at,
            rejected: false,
        });
        *self.last_failure.lock().unwrap() = None;
        tracing::info!(
            access_type = %self.method.access_type(),
            renew_in_s = refresh_at.saturating_duration_since(Instant::now()).as_secs(),
            "authenticated to Akeyless"
        );
        Ok((token, generation))
    }

    /// The cert method's challenge flow: `/get-cert-challenge` gives a challenge, the client key
    /// signs it (SHA-256; RSA PKCS#1 v1.5 or ECDSA P-256, DER), and `/auth` gets the signature
    /// instead of the key. `None` when the server does not offer the command or the key type
    /// cannot sign that way: then the key itself is sent, as older clients do.
    async fn cert_challenge(
        &self,
        cert_b64: &str,
        key_pem: &[u8],
        key_file: &std::path::Path,
        deadline: Instant,
    ) -> Result<Option<(String, String)>, BackendError> {
        use pki_types::pem::PemObject;
        use rustls::SignatureScheme;
        let der = pki_types::PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
            BackendError::Config(format!(
                "{} (--akeyless-key-file) is not a PEM private key: {e}",
                key_file.display()
            ))
        })?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&der)
            .ok()
            .and_then(|k| {
                k.choose_scheme(&[
                    SignatureScheme::RSA_PKCS1_SHA256,
                    SignatureScheme::ECDSA_NISTP256_SHA256,
                ])
            });
        let Some(signer) = signer else {
            tracing::debug!(
                "the cert auth key cannot sign a challenge (not RSA or P-256); sending the key"
            );
            return Ok(None);
        };
        let mut body = Map::new();
        if let Some(id) = &self.access_id {
            body.insert("access-id".into(), Value::String(id.clone()));
        }
        body.insert("cert-data".into(), Value::String(cert_b64.to_string()));
        let reply = self
            .client
            .call_if_offered(Op::Auth, "get-cert-challenge", &body, deadline)
            .await
            .map_err(|e| match e {
                CallError::Failed(e) => e,
                CallError::TokenRejected(m) => BackendError::Authentication(m),
            })?;
        let Some(reply) = reply else {
            tracing::info!(
                "the Akeyless server offers no /get-cert-challenge; sending the client key"
            );
            return Ok(None);
        };
        let challenge = match reply.get("challenge") {
            Some(Value::String(c)) if !c.trim().is_empty() => c.trim().to_string(),
            _ => {
                return Err(BackendError::Unavailable(
                    "/get-cert-challenge answered without a challenge".into(),
                ))
            }
        };
        let raw = B64.decode(&challenge).map_err(|_| {
            BackendError::Unavailable(
                "/get-cert-challenge answered a challenge that is not base64".into(),
            )
        })?;
        let signature = signer
            .sign(&raw)
            .map_err(|e| BackendError::Other(format!("cannot sign the cert challenge: {e}")))?;
        Ok(Some((challenge, B64.encode(signature))))
    }

    async fn auth_body(&self, deadline: Instant) -> Result<Map<String, Value>, BackendError> {
        let mut b = Map::new();
        let s = |v: &str| Value::String(v.to_string());
        b.insert(
            "access-type".into(),
            s(self.method.access_type().wire_name()),
        );
        if let Some(id) = &self.access_id {
            b.insert("access-id".into(), s(id));
        }
        match &self.method {
            Method::AccessKey(k) => {
                b.insert("access-key".into(), s(k.expose()));
            }
            Method::Uid(uid) => {
                b.insert("uid-token".into(), s(uid.current().expose()));
            }
            Method::K8s {
                config_name,
                token_file,
            } => {
                let jwt = read_secret_file(token_file, "Kubernetes service account token")?;
                b.insert("k8s-auth-config-name".into(), s(config_name));
                b.insert(
                    "k8s-service-account-token".into(),
                    Value::String(B64.encode(jwt.as_bytes())),
                );
            }
            Method::Cert {
                cert_file,
                key_file,
            } => {
                let cert = read_secret_file(cert_file, "client certificate")?;
                let key = read_secret_file(key_file, "client key")?;
                let cert_b64 = B64.encode(cert.as_bytes());
                match self
                    .cert_challenge(&cert_b64, key.as_bytes(), key_file, deadline)
                    .await?
                {
                    Some((challenge, signature)) => {
                        b.insert("cert-challenge".into(), Value::String(challenge));
                        b.insert("signed-cert-challenge".into(), Value::String(signature));
                    }
                    None => {
                        b.insert("key-data".into(), Value::String(B64.encode(key.as_bytes())));
                    }
                }
                b.insert("cert-data".into(), Value::String(cert_b64));
            }
            Method::Jwt { file } => {
                let jwt = read_secret_file(file, "JWT")?;
                b.insert("jwt".into(), s(&jwt));
            }
            Method::Cloud { provider, req } => {
                let id = Zeroizing::new(provider.cloud_id(req).await?);
                b.insert("cloud-id".into(), s(&id));
                if req.kind == AccessType::Gcp {
                    b.insert("gcp-audience".into(), s(&req.gcp_audience));
                }
            }
        }
        Ok(b)
    }
}

/// When to renew a token issued at `now` (monotonic and wall clock) that expires at `expiration`.
pub(crate) fn schedule(
    now: Instant,
    wall: SystemTime,
    expiration: Option<SystemTime>,
) -> (Instant, Instant) {
    match expiration
        .and_then(|e| e.duration_since(wall).ok())
        .filter(|l| !l.is_zero())
    {
        Some(lifetime) => {
            let refresh = (lifetime * 3 / 4).min(DEFAULT_REFRESH);
            // Stop handing the token out a little before the server's expiry.
            let margin = (lifetime / 10).min(Duration::from_secs(5));
            (now + refresh, now + (lifetime - margin).max(refresh))
        }
        None => (
            now + DEFAULT_REFRESH,
            now + DEFAULT_REFRESH.max(DEFAULT_ASSUMED_LIFETIME),
        ),
    }
}

/// The expiry announced by `/auth`: `expiration` (a date in any of the usual spellings or Unix
/// seconds) or `creds.expiry` (Unix seconds).
pub(crate) fn expiration_of(reply: &Map<String, Value>) -> Option<SystemTime> {
    let from_value = |v: &Value| match v {
        Value::String(s) => parse_time(s),
        Value::Number(n) => n.as_u64().and_then(unix_any),
        _ => None,
    };
    reply.get("expiration").and_then(from_value).or_else(|| {
        reply
            .get("creds")
            .and_then(|c| c.get("expiry"))
            .and_then(|v| v.as_u64())
            .and_then(unix_any)
    })
}

/// Unix time in seconds or milliseconds.
fn unix_any(n: u64) -> Option<SystemTime> {
    match n {
        0..=999_999_999 => None, // before 2001: not a timestamp
        1_000_000_000..=99_999_999_999 => Some(UNIX_EPOCH + Duration::from_secs(n)),
        _ => Some(UNIX_EPOCH + Duration::from_millis(n)),
    }
}

/// Parses `2025-01-02T03:04:05Z`, `2025-01-02T03:04:05.123+02:00`, Go's
/// `2025-01-02 03:04:05.123 +0000 UTC` and Unix seconds.
pub(crate) fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().ok().and_then(unix_any);
    }
    // Go appends a monotonic clock reading ("m=+1.2") to time.String(); drop it.
    let s = s.split(" m=").next()?;
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b' ' || b[10] == b't')
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':'
        || b[16] != b':'
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || min > 59
        || sec > 60
    {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos: u32 = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits: String = frac.chars().take_while(|c| c.is_ascii_digit()).collect();
        rest = &frac[digits.len()..];
        let padded = format!("{:0<9}", &digits[..digits.len().min(9)]);
        nanos = padded.parse().ok()?;
    }
    let rest = rest.trim();
    let offset_secs: i64 =
        if rest.is_empty() || rest.eq_ignore_ascii_case("z") || rest.eq_ignore_ascii_case("utc") {
            0
        } else {
            let tz = rest.split_whitespace().next()?; // "+0000 UTC" → "+0000"
            if tz.eq_ignore_ascii_case("z") {
                0
            } else {
                let sign = match tz.as_bytes()[0] {
                    b'+' => 1,
                    b'-' => -1,
                    _ => return None,
                };
                let digits: String = tz[1..].chars().filter(|c| c.is_ascii_digit()).collect();
                if digits.len() != 4 {
                    return None;
                }
                sign * (digits[0..2].parse::<i64>().ok()? * 3600
                    + digits[2..4].parse::<i64>().ok()? * 60)
            }
        };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn parses_expiration_formats() {
        let want = 1_767_323_045; // 2026-01-02T03:04:05Z
        for s in [
            "2026-01-02T03:04:05Z",
            "2026-01-02T03:04:05.123456789Z",
            "2026-01-02 03:04:05 +0000 UTC",
            "2026-01-02 03:04:05.5 +0000 UTC m=+900.000000001",
            "2026-01-02T05:04:05+02:00",
            "2026-01-01 22:04:05 -0500 EST",
            "1767323045",
        ] {
            assert_eq!(parse_time(s).map(unix), Some(want), "{s}");
        }
        for s in [
            "",
            "tomorrow",
            "2026-13-02T03:04:05Z",
            "2026-01-02T03:04:05+0",
            "12",
        ] {
            assert_eq!(parse_time(s), None, "{s}");
        }
        let m: Map<String, Value> =
            serde_json::from_str(r#"{"token":"t","creds":{"expiry":1767323045}}"#).unwrap();
        assert_eq!(expiration_of(&m).map(unix), Some(want));
    }

    #[test]
    fn schedules_renewal_before_expiry() {
        let now = Instant::now();
        let wall = SystemTime::now();
        let (r, e) = schedule(now, wall, Some(wall + Duration::from_secs(3600)));
        assert_eq!(r - now, DEFAULT_REFRESH);
        assert_eq!(e - now, Duration::from_secs(3595));
        let (r, e) = schedule(now, wall, Some(wall + Duration::from_secs(4)));
        assert_eq!(r - now, Duration::from_secs(3));
        assert!(e - now >= Duration::from_secs(3) && e - now < Duration::from_secs(4));
        let (r, _) = schedule(now, wall, None);
        assert_eq!(r - now, DEFAULT_REFRESH);
        // An expiration in the past is ignored rather than causing an auth loop.
        let (r, _) = schedule(now, wall, Some(wall - Duration::from_secs(10)));
        assert_eq!(r - now, DEFAULT_REFRESH);
    }
}
