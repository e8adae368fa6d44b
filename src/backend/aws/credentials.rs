//! The standard AWS credentials chain: environment, shared config/credentials files (basic
//! profiles), web identity (IRSA: `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN` →
//! STS AssumeRoleWithWebIdentity), and the EC2 instance metadata service (IMDSv2).
//!
//! Secrets never reach `Debug`, logs or errors: only the source and whether the credentials are
//! temporary are ever shown.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use zeroize::Zeroizing;

/// Default IMDS base URL (link-local; only ever contacted when nothing else provided credentials).
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";
/// Temporary credentials are refreshed this long before they expire.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// One set of AWS credentials.
#[derive(Clone)]
pub struct Credentials {
    access_key_id: String,
    secret_access_key: Zeroizing<String>,
    session_token: Option<Zeroizing<String>>,
    expires: Option<SystemTime>,
    source: &'static str,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("source", &self.source)
            .field("temporary", &self.session_token.is_some())
            .field(
                "expires",
                &self.expires.map(humantime::format_rfc3339_seconds),
            )
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Static credentials (session token for temporary ones).
    pub fn new(
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
        session_token: Option<String>,
    ) -> Self {
        Credentials {
            access_key_id: access_key_id.into(),
            secret_access_key: Zeroizing::new(secret_access_key.into()),
            session_token: session_token.filter(|t| !t.is_empty()).map(Zeroizing::new),
            expires: None,
            source: "static",
        }
    }

    fn with_source(mut self, source: &'static str, expires: Option<SystemTime>) -> Self {
        self.source = source;
        self.expires = expires;
        self
    }

    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }
    pub fn secret_access_key(&self) -> &str {
        &self.secret_access_key
    }
    pub fn session_token(&self) -> Option<&str> {
        self.session_token.as_ref().map(|t| t.as_str())
    }
    pub fn expires(&self) -> Option<SystemTime> {
        self.expires
    }
    /// Where these credentials came from (`environment`, `profile`, `web-identity`, `imds`, `static`).
    pub fn source(&self) -> &'static str {
        self.source
    }

    fn fresh(&self, now: SystemTime) -> bool {
        match self.expires {
            None => true,
            Some(exp) => exp
                .duration_since(now)
                .map(|left| left > REFRESH_MARGIN)
                .unwrap_or(false),
        }
    }
}

/// Why no credentials could be obtained. Messages never contain secret values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("no AWS credentials found (tried: {0})")]
    NotFound(String),
    #[error("AWS shared config: {0}")]
    Config(String),
    #[error("STS AssumeRoleWithWebIdentity failed: {0}")]
    WebIdentity(String),
    #[error("EC2 instance metadata (IMDSv2): {0}")]
    Imds(String),
}

/// Everything the chain looks at, captured once (see [`ChainConfig::from_env`]) so that tests can
/// build it directly without touching the process environment.
#[derive(Clone, Default)]
pub struct ChainConfig {
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`.
    pub env_access_key_id: Option<String>,
    pub env_secret_access_key: Option<Zeroizing<String>>,
    pub env_session_token: Option<Zeroizing<String>>,
    /// `AWS_PROFILE` (default `default`).
    pub profile: Option<String>,
    /// `AWS_SHARED_CREDENTIALS_FILE` (default `~/.aws/credentials`).
    pub credentials_file: Option<PathBuf>,
    /// `AWS_CONFIG_FILE` (default `~/.aws/config`).
    pub config_file: Option<PathBuf>,
    /// `AWS_WEB_IDENTITY_TOKEN_FILE`, `AWS_ROLE_ARN`, `AWS_ROLE_SESSION_NAME`.
    pub web_identity_token_file: Option<PathBuf>,
    pub role_arn: Option<String>,
    pub role_session_name: Option<String>,
    /// STS endpoint for web identity (`AWS_ENDPOINT_URL_STS`); default the regional endpoint.
    pub sts_endpoint: Option<String>,
    /// Region used for the default STS endpoint.
    pub region: Option<String>,
    /// IMDS base URL (`AWS_EC2_METADATA_SERVICE_ENDPOINT`), default [`DEFAULT_IMDS_ENDPOINT`].
    pub imds_endpoint: Option<String>,
    /// `AWS_EC2_METADATA_DISABLED=true`.
    pub imds_disabled: bool,
    /// Per-request timeout for IMDS (short: off EC2 there is nobody there).
    pub imds_timeout: Option<Duration>,
}

impl fmt::Debug for ChainConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainConfig")
            .field("env_credentials", &self.env_access_key_id.is_some())
            .field("profile", &self.profile)
            .field("web_identity_token_file", &self.web_identity_token_file)
            .field("role_arn", &self.role_arn)
            .field("sts_endpoint", &self.sts_endpoint)
            .field("region", &self.region)
            .field("imds_endpoint", &self.imds_endpoint)
            .field("imds_disabled", &self.imds_disabled)
            .finish()
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn home_file(rel: &str) -> Option<PathBuf> {
    env_nonempty("HOME").map(|h| Path::new(&h).join(rel))
}

impl ChainConfig {
    /// Reads the standard AWS environment variables.
    pub fn from_env() -> Self {
        ChainConfig {
            env_access_key_id: env_nonempty("AWS_ACCESS_KEY_ID"),
            env_secret_access_key: env_nonempty("AWS_SECRET_ACCESS_KEY").map(Zeroizing::new),
            env_session_token: env_nonempty("AWS_SESSION_TOKEN").map(Zeroizing::new),
            profile: env_nonempty("AWS_PROFILE"),
            credentials_file: env_nonempty("AWS_SHARED_CREDENTIALS_FILE")
                .map(PathBuf::from)
                .or_else(|| home_file(".aws/credentials")),
            config_file: env_nonempty("AWS_CONFIG_FILE")
                .map(PathBuf::from)
                .or_else(|| home_file(".aws/config")),
            web_identity_token_file: env_nonempty("AWS_WEB_IDENTITY_TOKEN_FILE").map(PathBuf::from),
            role_arn: env_nonempty("AWS_ROLE_ARN"),
            role_session_name: env_nonempty("AWS_ROLE_SESSION_NAME"),
            sts_endpoint: env_nonempty("AWS_ENDPOINT_URL_STS"),
            region: env_nonempty("AWS_REGION").or_else(|| env_nonempty("AWS_DEFAULT_REGION")),
            imds_endpoint: env_nonempty("AWS_EC2_METADATA_SERVICE_ENDPOINT"),
            imds_disabled: env_nonempty("AWS_EC2_METADATA_DISABLED")
                .is_some_and(|v| v.eq_ignore_ascii_case("true")),
            imds_timeout: None,
        }
    }

    fn profile_name(&self) -> &str {
        self.profile.as_deref().unwrap_or("default")
    }

    /// The region from the environment or, failing that, the profile in the shared config file.
    pub fn resolve_region(&self) -> Option<String> {
        if let Some(r) = &self.region {
            return Some(r.clone());
        }
        let path = self.config_file.as_ref()?;
        let text = std::fs::read_to_string(path).ok()?;
        let sections = parse_ini(&text);
        let name = self.profile_name();
        let section = if name == "default" {
            "default".to_string()
        } else {
            format!("profile {name}")
        };
        sections
            .get(&section)
            .and_then(|s| s.get("region"))
            .cloned()
            .or_else(|| {
                // Some tools write `[default]` as `[profile default]`.
                sections
                    .get(&format!("profile {name}"))
                    .and_then(|s| s.get("region"))
                    .cloned()
            })
    }
}

/// Minimal INI reader for the AWS shared files: `[section]`, `key = value`, `#`/`;` comments.
fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            out.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(sec), Some((k, v))) = (&current, line.split_once('=')) {
            out.entry(sec.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

fn profile_credentials(cfg: &ChainConfig) -> Result<Option<Credentials>, CredentialsError> {
    let name = cfg.profile_name();
    let mut candidates: Vec<(PathBuf, String)> = Vec::new();
    if let Some(p) = &cfg.credentials_file {
        candidates.push((p.clone(), name.to_string()));
    }
    if let Some(p) = &cfg.config_file {
        let section = if name == "default" {
            "default".to_string()
        } else {
            format!("profile {name}")
        };
        candidates.push((p.clone(), section));
    }
    for (path, section) in candidates {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => Zeroizing::new(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(CredentialsError::Config(format!(
                    "cannot read {}: {e}",
                    path.display()
                )))
            }
        };
        let sections = parse_ini(&text);
        let Some(s) = sections.get(&section) else {
            continue;
        };
        match (s.get("aws_access_key_id"), s.get("aws_secret_access_key")) {
            (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => {
                let token = s.get("aws_session_token").cloned();
                return Ok(Some(Credentials::new(id.clone(), secret.clone(), token).with_source("profile", None)));
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(CredentialsError::Config(format!(
                    "profile [{section}] in {} has only one of aws_access_key_id / aws_secret_access_key",
                    path.display()
                )))
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Text of the first `<tag>…</tag>` in an XML document (enough for STS's flat responses).
fn xml_tag<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(xml[start..end].trim())
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn parse_expiration(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s.trim().trim_end_matches('Z')).ok()
}

fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                super::sigv4::uri_encode(k, false),
                super::sigv4::uri_encode(v, false)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The STS endpoint to use for `region` (global endpoint when no region is known).
pub fn default_sts_endpoint(region: Option<&str>) -> String {
    match region {
        Some(r) => format!("https://sts.{r}.amazonaws.com"),
        None => "https://sts.amazonaws.com".to_string(),
    }
}

/// Resolves credentials through the chain and caches them until shortly before they expire.
pub struct CredentialsProvider {
    cfg: ChainConfig,
    http: reqwest::Client,
    /// IMDS is link-local: never through a proxy, never redirected.
    imds_http: reqwest::Client,
    cache: tokio::sync::Mutex<Option<Credentials>>,
    fixed: bool,
}

impl fmt::Debug for CredentialsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialsProvider")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl CredentialsProvider {
    pub fn new(cfg: ChainConfig) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .build()
            .expect("HTTP client builds with static settings");
        let imds_http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("HTTP client builds with static settings");
        CredentialsProvider {
            cfg,
            http,
            imds_http,
            cache: tokio::sync::Mutex::new(None),
            fixed: false,
        }
    }

    /// Always returns these credentials (tests, or credentials handed over by the caller).
    pub fn fixed(creds: Credentials) -> Self {
        let mut p = Self::new(ChainConfig {
            imds_disabled: true,
            ..Default::default()
        });
        *p.cache.get_mut() = Some(creds);
        p.fixed = true;
        p
    }

    pub fn config(&self) -> &ChainConfig {
        &self.cfg
    }

    /// Current credentials; one resolution at a time, cached while fresh.
    pub async fn credentials(&self) -> Result<Credentials, CredentialsError> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref().filter(|c| c.fresh(SystemTime::now())) {
            return Ok(c.clone());
        }
        match self.resolve().await {
            Ok(c) => {
                tracing::debug!(
                    source = c.source,
                    temporary = c.session_token.is_some(),
                    "resolved AWS credentials"
                );
                *cache = Some(c.clone());
                Ok(c)
            }
            // Still-valid (though soon expiring) credentials beat none when a refresh fails.
            Err(e) => match cache
                .as_ref()
                .filter(|c| c.expires.is_some_and(|x| x > SystemTime::now()))
            {
                Some(c) => {
                    tracing::warn!(error = %e, "refreshing AWS credentials failed; using the current ones until they expire");
                    Ok(c.clone())
                }
                None => Err(e),
            },
        }
    }

    /// Forgets cached credentials (after the service rejected them).
    pub async fn invalidate(&self) {
        if self.fixed {
            return;
        }
        *self.cache.lock().await = None;
    }

    async fn resolve(&self) -> Result<Credentials, CredentialsError> {
        let cfg = &self.cfg;
        let mut tried = Vec::new();
        match (&cfg.env_access_key_id, &cfg.env_secret_access_key) {
            (Some(id), Some(secret)) => {
                let token = cfg.env_session_token.as_ref().map(|t| t.to_string());
                return Ok(Credentials::new(id.clone(), secret.to_string(), token)
                    .with_source("environment", None));
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(CredentialsError::Config(
                    "only one of AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY is set".into(),
                ))
            }
            _ => tried.push("environment"),
        }
        if let Some(c) = profile_credentials(cfg)? {
            return Ok(c);
        }
        tried.push("shared config/credentials files");
        if let (Some(token_file), Some(role)) = (&cfg.web_identity_token_file, &cfg.role_arn) {
            return self.web_identity(token_file, role).await;
        }
        tried.push("web identity");
        if !cfg.imds_disabled {
            return self.imds().await;
        }
        tried.push("IMDS (disabled)");
        Err(CredentialsError::NotFound(tried.join(", ")))
    }

    async fn web_identity(
        &self,
        token_file: &Path,
        role_arn: &str,
    ) -> Result<Credentials, CredentialsError> {
        let err = CredentialsError::WebIdentity;
        // The token file is rotated by the kubelet: read it on every refresh.
        let token = Zeroizing::new(tokio::fs::read_to_string(token_file).await.map_err(|e| {
            err(format!(
                "cannot read token file {}: {e}",
                token_file.display()
            ))
        })?);
        let session = self.cfg.role_session_name.clone().unwrap_or_else(|| {
            let secs = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            format!("kms-plugin-{secs}")
        });
        let body = Zeroizing::new(form_encode(&[
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", "2011-06-15"),
            ("RoleArn", role_arn),
            ("RoleSessionName", &session),
            ("WebIdentityToken", token.trim()),
        ]));
        let endpoint = self
            .cfg
            .sts_endpoint
            .clone()
            .unwrap_or_else(|| default_sts_endpoint(self.cfg.region.as_deref()));
        let resp = self
            .http
            .post(&endpoint)
            .header(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| {
                err(format!(
                    "cannot reach {endpoint}: {}",
                    super::redact_reqwest(&e)
                ))
            })?;
        let status = resp.status();
        let text = Zeroizing::new(
            resp.text()
                .await
                .map_err(|e| err(format!("reading STS response: {e}")))?,
        );
        if !status.is_success() {
            let code = xml_tag(&text, "Code").unwrap_or("unknown");
            let msg = xml_tag(&text, "Message")
                .map(xml_unescape)
                .unwrap_or_default();
            return Err(err(format!("HTTP {status}: {code}: {msg}")));
        }
        let get = |tag: &str| {
            xml_tag(&text, tag)
                .map(xml_unescape)
                .ok_or_else(|| err(format!("response lacks {tag}")))
        };
        let expires = xml_tag(&text, "Expiration").and_then(parse_expiration);
        Ok(Credentials::new(
            get("AccessKeyId")?,
            get("SecretAccessKey")?,
            Some(get("SessionToken")?),
        )
        .with_source("web-identity", expires))
    }

    async fn imds(&self) -> Result<Credentials, CredentialsError> {
        let err = CredentialsError::Imds;
        let base = self
            .cfg
            .imds_endpoint
            .as_deref()
            .unwrap_or(DEFAULT_IMDS_ENDPOINT)
            .trim_end_matches('/');
        let timeout = self.cfg.imds_timeout.unwrap_or(Duration::from_secs(1));
        let token = Zeroizing::new(
            imds_token(&self.imds_http, base, timeout)
                .await
                .map_err(err)?,
        );
        let list_url = format!("{base}/latest/meta-data/iam/security-credentials/");
        let get = |url: String| {
            let req = self
                .imds_http
                .get(url)
                .header("x-aws-ec2-metadata-token", token.as_str())
                .timeout(timeout);
            async move {
                let resp = req
                    .send()
                    .await
                    .map_err(|e| err(format!("request failed: {}", super::redact_reqwest(&e))))?;
                let status = resp.status();
                if !status.is_success() {
                    return Err(err(format!("HTTP {status} (no instance role attached?)")));
                }
                resp.text()
                    .await
                    .map(Zeroizing::new)
                    .map_err(|e| err(format!("reading response: {e}")))
            }
        };
        let roles = get(list_url.clone()).await?;
        let role = roles
            .lines()
            .next()
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .ok_or_else(|| err("no instance role".into()))?;
        if !role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
        {
            return Err(err("instance role name has unexpected characters".into()));
        }
        let doc = get(format!("{list_url}{role}")).await?;
        #[derive(serde::Deserialize, zeroize::ZeroizeOnDrop)]
        #[serde(rename_all = "PascalCase")]
        struct ImdsCreds {
            code: Option<String>,
            access_key_id: String,
            secret_access_key: String,
            token: String,
            expiration: Option<String>,
        }
        let c: ImdsCreds = serde_json::from_str(&doc)
            .map_err(|e| err(format!("unexpected credentials document: {e}")))?;
        if let Some(code) = c.code.as_deref().filter(|c| *c != "Success") {
            return Err(err(format!("credentials document has Code {code}")));
        }
        let expires = c.expiration.as_deref().and_then(parse_expiration);
        Ok(Credentials::new(
            c.access_key_id.clone(),
            c.secret_access_key.clone(),
            Some(c.token.clone()),
        )
        .with_source("imds", expires))
    }
}

/// IMDSv2 session token (PUT `/latest/api/token`).
pub(crate) async fn imds_token(
    http: &reqwest::Client,
    base: &str,
    timeout: Duration,
) -> Result<String, String> {
    let resp = http
        .put(format!("{base}/latest/api/token"))
        .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("token request failed: {}", super::redact_reqwest(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("token request answered HTTP {status}"));
    }
    let token = resp
        .text()
        .await
        .map_err(|e| format!("reading token: {e}"))?;
    if token.trim().is_empty() {
        return Err("empty IMDSv2 token".into());
    }
    Ok(token.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_secrets() {
        let c = Credentials::new("AKIDSECRETID", "topsecret", Some("sessiontok".into()));
        let d = format!("{c:?}");
        assert!(
            !d.contains("topsecret") && !d.contains("sessiontok") && !d.contains("AKIDSECRETID"),
            "{d}"
        );
        let cfg = ChainConfig {
            env_access_key_id: Some("AKIDSECRETID".into()),
            env_secret_access_key: Some(Zeroizing::new("topsecret".into())),
            ..Default::default()
        };
        let d = format!("{cfg:?}");
        assert!(
            !d.contains("topsecret") && !d.contains("AKIDSECRETID"),
            "{d}"
        );
    }

    #[tokio::test]
    async fn env_then_profile_then_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let creds_file = dir.path().join("credentials");
        let config_file = dir.path().join("config");
        std::fs::write(
            &creds_file,
            "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = s1\n\n# comment\n[other]\naws_access_key_id=AKIDOTHER\naws_secret_access_key=s2\naws_session_token=t2\n",
        )
        .unwrap();
        std::fs::write(
            &config_file,
            "[profile cfgonly]\nregion = eu-north-1\naws_access_key_id = AKIDCFG\naws_secret_access_key = s3\n",
        )
        .unwrap();
        let base = ChainConfig {
            credentials_file: Some(creds_file),
            config_file: Some(config_file),
            imds_disabled: true,
            ..Default::default()
        };

        let env = ChainConfig {
            env_access_key_id: Some("AKIDENV".into()),
            env_secret_access_key: Some(Zeroizing::new("senv".into())),
            ..base.clone()
        };
        let c = CredentialsProvider::new(env).credentials().await.unwrap();
        assert_eq!((c.access_key_id(), c.source()), ("AKIDENV", "environment"));

        let c = CredentialsProvider::new(base.clone())
            .credentials()
            .await
            .unwrap();
        assert_eq!(
            (c.access_key_id(), c.secret_access_key(), c.session_token()),
            ("AKIDDEFAULT", "s1", None)
        );

        let other = ChainConfig {
            profile: Some("other".into()),
            ..base.clone()
        };
        let c = CredentialsProvider::new(other).credentials().await.unwrap();
        assert_eq!(
            (c.access_key_id(), c.session_token()),
            ("AKIDOTHER", Some("t2"))
        );

        let cfgonly = ChainConfig {
            profile: Some("cfgonly".into()),
            ..base.clone()
        };
        assert_eq!(cfgonly.resolve_region().as_deref(), Some("eu-north-1"));
        let c = CredentialsProvider::new(cfgonly)
            .credentials()
            .await
            .unwrap();
        assert_eq!(c.access_key_id(), "AKIDCFG");

        let none = ChainConfig {
            profile: Some("missing".into()),
            ..base
        };
        let e = CredentialsProvider::new(none)
            .credentials()
            .await
            .unwrap_err();
        assert!(matches!(e, CredentialsError::NotFound(_)), "{e}");
    }

    #[test]
    fn xml_and_expiration() {
        let x =
            "<R><Credentials><AccessKeyId>A</AccessKeyId><SecretAccessKey>a&amp;b</SecretAccessKey></Credentials></R>";
        assert_eq!(xml_tag(x, "AccessKeyId"), Some("A"));
        assert_eq!(xml_unescape(xml_tag(x, "SecretAccessKey").unwrap()), "a&b");
        assert!(parse_expiration("2026-11-28T08:00:00Z").is_some());
        assert!(parse_expiration("2026-11-28T08:00:00.123Z").is_some());
    }
}
