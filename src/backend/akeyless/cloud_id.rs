//! Cloud identities for Akeyless authentication (`access-type` `aws_iam`, `azure_ad`, `gcp`), and
//! detection of the cloud we run on.
//!
//! Wire formats (as the official Akeyless clients produce them):
//! - AWS: base64 of JSON `{sts_request_method, sts_request_url, sts_request_body,
//!   sts_request_headers}`, the last three base64 too; the headers are the SigV4-signed headers of an
//!   STS `GetCallerIdentity` call as a JSON map of arrays. Akeyless replays the request to STS to learn
//!   who we are; we sign it but never send it.
//! - Azure: base64 of a managed-identity access token for `https://management.azure.com/` from IMDS.
//! - GCP: base64 of a metadata-server identity token for the audience.
//!
//! Every endpoint is a parameter so that tests and unusual clouds can point elsewhere.
//!
//! Typical use by the Akeyless backend:
//! - `aws_iam`: keep one [`AwsCredentialSource`] (the SDK's default chain, `aws-config`, with a
//!   small cache) and call [`aws_iam_cloud_id_from_chain`] before each `/auth`, with
//!   [`DEFAULT_STS_URL`] (region `us-east-1`) or a regional `https://sts.REGION.amazonaws.com/`
//!   ([`sts_region_from_url`] gives the signing region). The request is signed with `aws-sigv4`.
//! - `azure_ad`: [`azure_ad_cloud_id`]`(DEFAULT_AZURE_IMDS_URL, object_id)`.
//! - `gcp`: [`gcp_cloud_id`]`(DEFAULT_GCP_METADATA_URL, audience)`.
//! - no access type and no secret given: [`detect_cloud`] then [`Cloud::access_type`].
//!
//! The returned strings are secrets (bearer credentials for Akeyless): they are wiped on drop and
//! must not be logged.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
pub use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::backend::http::redact_reqwest;

/// STS endpoint used by older Akeyless clients; current ones sign for a regional endpoint.
pub const DEFAULT_STS_URL: &str = "https://sts.amazonaws.com/";
/// Base URL of the AWS and Azure instance metadata services.
pub const DEFAULT_AWS_IMDS_URL: &str = "http://169.254.169.254";
pub const DEFAULT_AZURE_IMDS_URL: &str = "http://169.254.169.254";
/// Base URL of the GCP metadata server.
pub const DEFAULT_GCP_METADATA_URL: &str = "http://metadata.google.internal";
/// Default audience of GCP identity tokens for Akeyless.
pub const DEFAULT_GCP_AUDIENCE: &str = "akeyless.io";
/// Resource of the Azure managed-identity token Akeyless expects.
pub const AZURE_RESOURCE: &str = "https://management.azure.com/";

const STS_BODY: &str = "Action=GetCallerIdentity&Version=2011-06-15";
const STS_CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
const METADATA_TIMEOUT: Duration = Duration::from_secs(3);

/// A cloud identity could not be produced. Messages never contain tokens or credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudIdError {
    #[error("AWS credentials: {0}")]
    Credentials(String),
    #[error("cannot sign the STS request: {0}")]
    Sign(String),
    #[error("{service} at {url}: {detail}")]
    Metadata {
        service: &'static str,
        url: String,
        detail: String,
    },
}

/// The STS endpoint current official clients sign for: the regional one of `region` (China:
/// `.amazonaws.com.cn`; GovCloud regions are ordinary `sts.us-gov-*.amazonaws.com` hosts), or the
/// global [`DEFAULT_STS_URL`] when no region is set. `region` usually comes from `AWS_REGION`.
pub fn sts_url_for_region(region: Option<&str>) -> String {
    let Some(r) = region.map(str::trim).filter(|r| !r.is_empty()) else {
        return DEFAULT_STS_URL.to_string();
    };
    if !r
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        tracing::warn!(
            region = r,
            "AWS_REGION is not a region name; signing for the global STS endpoint"
        );
        return DEFAULT_STS_URL.to_string();
    }
    format!("https://sts.{r}.{}/", crate::backend::aws::dns_suffix(r))
}

/// The region whose STS endpoint `url` names (`sts.<region>.amazonaws.com`), else `us-east-1`.
pub fn sts_region_from_url(url: &str) -> String {
    url.parse::<http::Uri>()
        .ok()
        .and_then(|u| {
            let host = u.host()?.to_string();
            let rest = host.strip_prefix("sts.")?;
            let region = rest.split('.').next()?;
            (region != "amazonaws" && !region.is_empty()).then(|| region.to_string())
        })
        .unwrap_or_else(|| "us-east-1".to_string())
}

/// The AWS cloud-id for `creds`, signed at `time` for the STS endpoint `sts_url` in `region`.
pub fn aws_iam_cloud_id_at(
    creds: &Credentials,
    sts_url: &str,
    region: &str,
    time: SystemTime,
) -> Result<Zeroizing<String>, CloudIdError> {
    let content_length = STS_BODY.len().to_string();
    let headers = [
        ("content-length", content_length.as_str()),
        ("content-type", STS_CONTENT_TYPE),
    ];
    let identity = creds.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sts")
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| CloudIdError::Sign(e.to_string()))?
        .into();
    let signable = SignableRequest::new(
        "POST",
        sts_url,
        headers.iter().copied(),
        SignableBody::Bytes(STS_BODY.as_bytes()),
    )
    .map_err(|e| CloudIdError::Sign(e.to_string()))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| CloudIdError::Sign(e.to_string()))?
        .into_parts();

    // Canonical Go header names, values as arrays, as Akeyless's server reads them. The Host header
    // is not listed: the replaying client derives it from the URL.
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    map.insert("Content-Length".into(), vec![content_length.clone()]);
    map.insert("Content-Type".into(), vec![STS_CONTENT_TYPE.to_string()]);
    for (name, value) in instructions.headers() {
        let canonical = match name {
            "authorization" => "Authorization",
            "x-amz-date" => "X-Amz-Date",
            "x-amz-security-token" => "X-Amz-Security-Token",
            other => {
                return Err(CloudIdError::Sign(format!(
                    "the signer added an unexpected header {other}"
                )))
            }
        };
        map.insert(canonical.into(), vec![value.to_string()]);
    }
    let headers_json = Zeroizing::new(serde_json::to_vec(&map).expect("string map serializes"));
    let doc = serde_json::json!({
        "sts_request_method": "POST",
        "sts_request_url": B64.encode(sts_url),
        "sts_request_body": B64.encode(STS_BODY),
        "sts_request_headers": B64.encode(&*headers_json),
    });
    let doc = Zeroizing::new(serde_json::to_vec(&doc).expect("JSON value serializes"));
    Ok(Zeroizing::new(B64.encode(&*doc)))
}

/// The AWS cloud-id (`access-type: aws_iam`), signed now. Pure computation: nothing is sent.
pub async fn aws_iam_cloud_id(
    creds: &Credentials,
    sts_url: &str,
    region: &str,
) -> Result<Zeroizing<String>, CloudIdError> {
    aws_iam_cloud_id_at(creds, sts_url, region, SystemTime::now())
}

/// AWS credentials for the cloud-id: the SDK's default chain (env, profiles with role_arn /
/// credential_process / SSO, web identity, container endpoint, IMDSv2) behind the renewing cache
/// of [`crate::backend::aws::renewing`], so a login never waits on a renewal that is not due.
pub struct AwsCredentialSource {
    provider: tokio::sync::OnceCell<Result<SharedCredentialsProvider, CloudIdError>>,
    imds_url: Option<String>,
    given: Option<SharedCredentialsProvider>,
}

impl std::fmt::Debug for AwsCredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentialSource")
            .field("imds_url", &self.imds_url)
            .finish_non_exhaustive()
    }
}

impl AwsCredentialSource {
    /// The default chain; `imds_url` replaces the IMDS endpoint (also settable through
    /// `AWS_EC2_METADATA_SERVICE_ENDPOINT`). Nothing is contacted before the first use.
    pub fn default_chain(imds_url: Option<String>) -> Self {
        AwsCredentialSource {
            provider: tokio::sync::OnceCell::new(),
            imds_url,
            given: None,
        }
    }

    /// A given provider (tests, static credentials), behind the same renewing cache.
    pub fn new(provider: impl ProvideCredentials + 'static) -> Self {
        let renewing = crate::backend::aws::renewing::RenewingCredentials::new(
            SharedCredentialsProvider::new(provider),
            Default::default(),
            crate::backend::no_events(),
            "akeyless",
        );
        AwsCredentialSource {
            given: Some(SharedCredentialsProvider::new(renewing)),
            ..Self::default_chain(None)
        }
    }

    async fn provider(&self) -> Result<SharedCredentialsProvider, CloudIdError> {
        if let Some(p) = &self.given {
            return Ok(p.clone());
        }
        self.provider
            .get_or_init(|| async {
                let mut opts = crate::backend::aws::AwsOptions {
                    events: Some((crate::backend::no_events(), "akeyless")),
                    ..Default::default()
                };
                if let Some(url) = &self.imds_url {
                    opts.credentials = Some(imds_chain(url).await?);
                }
                let flags = crate::backend::tls::TlsFlags {
                    ca_file: "SSL_CERT_FILE",
                    client_cert_file: "-",
                    client_key_file: "-",
                };
                let config = crate::backend::aws::sdk_config(&opts, &flags)
                    .await
                    .map_err(|e| CloudIdError::Credentials(e.to_string()))?;
                config.credentials_provider().ok_or_else(|| {
                    CloudIdError::Credentials("the AWS SDK found no credentials provider".into())
                })
            })
            .await
            .clone()
    }

    /// Current credentials (from the renewing cache for the default chain).
    pub async fn credentials(&self) -> Result<Credentials, CloudIdError> {
        self.provider()
            .await?
            .provide_credentials()
            .await
            .map_err(|e| CloudIdError::Credentials(crate::backend::aws::error_chain(&e)))
    }
}

async fn imds_chain(url: &str) -> Result<SharedCredentialsProvider, CloudIdError> {
    let (tls, _) = crate::backend::tls::client_config(
        &Default::default(),
        &crate::backend::tls::TlsFlags {
            ca_file: "SSL_CERT_FILE",
            client_cert_file: "-",
            client_key_file: "-",
        },
    )
    .map_err(|e| CloudIdError::Credentials(e.to_string()))?;
    let conf = aws_config::provider_config::ProviderConfig::without_region()
        .with_http_client(crate::backend::aws::http_client::ReqwestHttpClient::new(tls).shared())
        .load_default_region()
        .await;
    let imds = aws_config::imds::Client::builder()
        .configure(&conf)
        .endpoint(url)
        .map_err(|e| CloudIdError::Credentials(format!("--akeyless-aws-imds-url {url:?}: {e}")))?
        .build();
    let chain = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
        .imds_client(imds)
        .configure(conf)
        .build()
        .await;
    Ok(SharedCredentialsProvider::new(chain))
}

/// Like [`aws_iam_cloud_id`], with credentials from `source`.
pub async fn aws_iam_cloud_id_from_chain(
    source: &AwsCredentialSource,
    sts_url: &str,
    region: &str,
) -> Result<Zeroizing<String>, CloudIdError> {
    let creds = source.credentials().await?;
    aws_iam_cloud_id(&creds, sts_url, region).await
}

fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(timeout)
        .timeout(timeout)
        // Metadata services are local; a proxy would be wrong and a redirect suspicious.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("HTTP client builds with static settings")
}

async fn fetch(
    service: &'static str,
    req: reqwest::RequestBuilder,
    url: &str,
) -> Result<Zeroizing<String>, CloudIdError> {
    let err = |detail: String| CloudIdError::Metadata {
        service,
        url: url.to_string(),
        detail,
    };
    let resp = req.send().await.map_err(|e| err(redact_reqwest(&e)))?;
    let status = resp.status();
    let body = Zeroizing::new(
        resp.text()
            .await
            .map_err(|e| err(format!("reading response: {e}")))?,
    );
    if !status.is_success() {
        // Error bodies of metadata services carry no secrets; keep a bounded excerpt.
        let excerpt: String = body.chars().take(200).collect();
        return Err(err(format!("HTTP {status}: {excerpt}")));
    }
    Ok(body)
}

/// Attempts at Azure IMDS for one token (pauses 0.5, 1, 2, 4 s between them).
const AZURE_IMDS_ATTEMPTS: u32 = 5;

fn azure_imds_retryable(e: &CloudIdError) -> bool {
    let CloudIdError::Metadata { detail, .. } = e else {
        return false;
    };
    // `fetch` words a status answer as "HTTP <code> ...".
    detail
        .strip_prefix("HTTP ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|code| code.parse::<u16>().ok())
        .is_some_and(|code| matches!(code, 404 | 410 | 429 | 500..=599))
}

/// AKS workload identity: the federated service-account token that the webhook projects
/// (`AZURE_FEDERATED_TOKEN_FILE`), exchanged at Microsoft Entra ID for an access token of the
/// identity `AZURE_CLIENT_ID` in `AZURE_TENANT_ID`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AzureWorkloadIdentity {
    /// `AZURE_AUTHORITY_HOST`, default `https://login.microsoftonline.com/`.
    pub authority_host: String,
    pub tenant_id: String,
    pub client_id: String,
    pub token_file: std::path::PathBuf,
}

impl AzureWorkloadIdentity {
    /// From the variables the workload identity webhook sets; `None` unless all three are set.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let get = |k: &str| {
            env(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        Some(AzureWorkloadIdentity {
            authority_host: get("AZURE_AUTHORITY_HOST")
                .unwrap_or_else(|| "https://login.microsoftonline.com/".into()),
            tenant_id: get("AZURE_TENANT_ID")?,
            client_id: get("AZURE_CLIENT_ID")?,
            token_file: get("AZURE_FEDERATED_TOKEN_FILE")?.into(),
        })
    }
}

/// The Azure cloud-id through workload identity: base64 of the access token for [`AZURE_RESOURCE`]
/// that Entra ID issues for the federated token (re-read on every call: the kubelet rotates it).
pub async fn azure_workload_identity_cloud_id(
    wi: &AzureWorkloadIdentity,
) -> Result<Zeroizing<String>, CloudIdError> {
    let url = format!(
        "{}/{}/oauth2/v2.0/token",
        wi.authority_host.trim_end_matches('/'),
        wi.tenant_id
    );
    let err = |detail: String| CloudIdError::Metadata {
        service: "Azure workload identity",
        url: url.clone(),
        detail,
    };
    let assertion = Zeroizing::new(
        std::fs::read_to_string(&wi.token_file)
            .map_err(|e| err(format!("cannot read {}: {e}", wi.token_file.display())))?,
    );
    let scope = format!("{}.default", AZURE_RESOURCE);
    let form = [
        ("client_id", wi.client_id.as_str()),
        ("grant_type", "client_credentials"),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion.trim()),
        ("scope", scope.as_str()),
    ];
    // Entra ID is a public endpoint: proxies apply, redirects do not.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| err(format!("HTTP client: {e}")))?;
    let body = fetch("Azure workload identity", http.post(&url).form(&form), &url).await?;
    #[derive(serde::Deserialize, zeroize::ZeroizeOnDrop)]
    struct Token {
        access_token: String,
    }
    let tok: Token =
        serde_json::from_str(&body).map_err(|e| err(format!("unexpected token response: {e}")))?;
    if tok.access_token.is_empty() {
        return Err(err("empty access_token".into()));
    }
    Ok(Zeroizing::new(B64.encode(tok.access_token.as_bytes())))
}

/// The Azure cloud-id (`access-type: azure_ad`): base64 of a managed-identity access token for
/// [`AZURE_RESOURCE`] from IMDS at `imds_url` (base URL), optionally for the identity `object_id`.
pub async fn azure_ad_cloud_id(
    imds_url: &str,
    object_id: Option<&str>,
) -> Result<Zeroizing<String>, CloudIdError> {
    let url = format!(
        "{}/metadata/identity/oauth2/token",
        imds_url.trim_end_matches('/')
    );
    let mut query = vec![("api-version", "2018-02-01"), ("resource", AZURE_RESOURCE)];
    if let Some(id) = object_id.filter(|s| !s.is_empty()) {
        query.push(("object_id", id));
    }
    let http = client(METADATA_TIMEOUT);
    // IMDS answers 404 while the identity is still being attached, 429 when called too often and
    // 5xx while it restarts: retried with backoff, as Azure's own identity clients do.
    let mut attempt = 0u32;
    let body = loop {
        attempt += 1;
        let req = http.get(&url).query(&query).header("Metadata", "true");
        match fetch("Azure IMDS", req, &url).await {
            Ok(body) => break body,
            Err(e) if attempt < AZURE_IMDS_ATTEMPTS && azure_imds_retryable(&e) => {
                let pause = Duration::from_millis(500 * (1 << (attempt - 1)));
                tracing::debug!(attempt, error = %e, "Azure IMDS not ready; retrying");
                tokio::time::sleep(pause).await;
            }
            Err(e) => return Err(e),
        }
    };
    #[derive(serde::Deserialize, zeroize::ZeroizeOnDrop)]
    struct Token {
        access_token: String,
    }
    let tok: Token = serde_json::from_str(&body).map_err(|e| CloudIdError::Metadata {
        service: "Azure IMDS",
        url: url.clone(),
        detail: format!("unexpected token response: {e}"),
    })?;
    if tok.access_token.is_empty() {
        return Err(CloudIdError::Metadata {
            service: "Azure IMDS",
            url,
            detail: "empty access_token".into(),
        });
    }
    Ok(Zeroizing::new(B64.encode(tok.access_token.as_bytes())))
}

/// The GCP cloud-id (`access-type: gcp`): base64 of the metadata server's identity token for
/// `audience` (default [`DEFAULT_GCP_AUDIENCE`]); `metadata_url` is the server's base URL.
pub async fn gcp_cloud_id(
    metadata_url: &str,
    audience: Option<&str>,
) -> Result<Zeroizing<String>, CloudIdError> {
    let url = format!(
        "{}/computeMetadata/v1/instance/service-accounts/default/identity",
        metadata_url.trim_end_matches('/')
    );
    let audience = audience
        .filter(|a| !a.is_empty())
        .unwrap_or(DEFAULT_GCP_AUDIENCE);
    let req = client(METADATA_TIMEOUT)
        .get(&url)
        .query(&[("audience", audience), ("format", "full")])
        .header("Metadata-Flavor", "Google");
    let body = fetch("GCP metadata server", req, &url).await?;
    let token = body.trim();
    if token.is_empty() {
        return Err(CloudIdError::Metadata {
            service: "GCP metadata server",
            url,
            detail: "empty identity token".into(),
        });
    }
    Ok(Zeroizing::new(B64.encode(token)))
}

/// A cloud found by [`detect_cloud`], named by its Akeyless access type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    Aws,
    Gcp,
    Azure,
}

impl Cloud {
    /// The Akeyless `access-type` for this cloud.
    pub fn access_type(self) -> &'static str {
        match self {
            Cloud::Aws => "aws_iam",
            Cloud::Gcp => "gcp",
            Cloud::Azure => "azure_ad",
        }
    }
}

/// Where [`detect_cloud`] looks.
#[derive(Debug, Clone)]
pub struct DetectConfig {
    pub aws_imds_url: String,
    pub gcp_metadata_url: String,
    pub azure_imds_url: String,
    /// Per-probe timeout; off-cloud nothing answers, so keep it short.
    pub timeout: Duration,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            aws_imds_url: DEFAULT_AWS_IMDS_URL.into(),
            gcp_metadata_url: DEFAULT_GCP_METADATA_URL.into(),
            azure_imds_url: DEFAULT_AZURE_IMDS_URL.into(),
            timeout: Duration::from_secs(1),
        }
    }
}

async fn probe_aws(http: &reqwest::Client, cfg: &DetectConfig) -> bool {
    // IMDSv2's session-token call: only the real service (or a stand-in for it) answers it.
    let url = format!(
        "{}/latest/api/token",
        cfg.aws_imds_url.trim_end_matches('/')
    );
    match http
        .put(url)
        .header("x-aws-ec2-metadata-token-ttl-seconds", "60")
        .timeout(cfg.timeout)
        .send()
        .await
    {
        Ok(r) => r.status().is_success(),
        Err(_) => false,
    }
}

async fn probe_gcp(http: &reqwest::Client, cfg: &DetectConfig) -> bool {
    let url = format!(
        "{}/computeMetadata/v1/",
        cfg.gcp_metadata_url.trim_end_matches('/')
    );
    match http
        .get(url)
        .header("Metadata-Flavor", "Google")
        .send()
        .await
    {
        // The real server marks its answers; a random HTTP server on the address does not.
        Ok(r) => {
            r.status().is_success()
                && r.headers()
                    .get("metadata-flavor")
                    .is_some_and(|v| v == "Google")
        }
        Err(_) => false,
    }
}

async fn probe_azure(http: &reqwest::Client, cfg: &DetectConfig) -> bool {
    let url = format!(
        "{}/metadata/instance",
        cfg.azure_imds_url.trim_end_matches('/')
    );
    match http
        .get(url)
        .query(&[("api-version", "2021-02-01")])
        .header("Metadata", "true")
        .send()
        .await
    {
        Ok(r) => r.status().is_success(),
        Err(_) => false,
    }
}

/// Probes the AWS, GCP and Azure metadata services concurrently, each within `cfg.timeout`, and
/// names the cloud that answered (AWS, then GCP, then Azure when several do), or `None`.
pub async fn detect_cloud(cfg: &DetectConfig) -> Option<Cloud> {
    let http = client(cfg.timeout);
    let (aws, gcp, azure) = tokio::join!(
        probe_aws(&http, cfg),
        probe_gcp(&http, cfg),
        probe_azure(&http, cfg)
    );
    tracing::debug!(aws, gcp, azure, "cloud metadata probes");
    match (aws, gcp, azure) {
        (true, _, _) => Some(Cloud::Aws),
        (_, true, _) => Some(Cloud::Gcp),
        (_, _, true) => Some(Cloud::Azure),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sts_url_follows_the_region_and_partition() {
        assert_eq!(sts_url_for_region(None), DEFAULT_STS_URL);
        assert_eq!(sts_url_for_region(Some(" ")), DEFAULT_STS_URL);
        assert_eq!(
            sts_url_for_region(Some("eu-west-1")),
            "https://sts.eu-west-1.amazonaws.com/"
        );
        assert_eq!(
            sts_url_for_region(Some("cn-north-1")),
            "https://sts.cn-north-1.amazonaws.com.cn/"
        );
        assert_eq!(
            sts_url_for_region(Some("us-gov-west-1")),
            "https://sts.us-gov-west-1.amazonaws.com/"
        );
        assert_eq!(sts_url_for_region(Some("x/../y")), DEFAULT_STS_URL);
        for r in ["eu-west-1", "cn-north-1", "us-gov-west-1"] {
            assert_eq!(sts_region_from_url(&sts_url_for_region(Some(r))), r);
        }
    }

    #[test]
    fn workload_identity_needs_all_three_variables() {
        let env = |k: &str| {
            Some(
                match k {
                    "AZURE_TENANT_ID" => "t",
                    "AZURE_CLIENT_ID" => "c",
                    "AZURE_FEDERATED_TOKEN_FILE" => {
                        "/var/run/secrets/azure/tokens/azure-identity-token"
                    }
                    _ => return None,
                }
                .to_string(),
            )
        };
        let wi = AzureWorkloadIdentity::from_env(env).unwrap();
        assert_eq!(wi.authority_host, "https://login.microsoftonline.com/");
        assert!(AzureWorkloadIdentity::from_env(|k| (k != "AZURE_CLIENT_ID")
            .then(|| env(k))
            .flatten())
        .is_none());
    }

    #[test]
    fn region_from_sts_url() {
        assert_eq!(
            sts_region_from_url("https://sts.amazonaws.com/"),
            "us-east-1"
        );
        assert_eq!(
            sts_region_from_url("https://sts.eu-west-1.amazonaws.com"),
            "eu-west-1"
        );
        assert_eq!(sts_region_from_url("http://127.0.0.1:9/"), "us-east-1");
    }
}
