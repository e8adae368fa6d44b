//! Command-line options of the Akeyless backend, and the drop-in environment of the original plugin.
//!
//! Secrets (access key, Universal Identity token) are never flags: a flag is visible to every user of
//! the node in `ps`. They come from `KMS_PLUGIN_AKEYLESS_ACCESS_KEY` / `KMS_PLUGIN_AKEYLESS_UID_TOKEN`
//! (read by [`AkeylessArgs::load_secrets_from_env`]), from files, or, in drop-in mode, from the
//! original plugin's `AKEYLESS_ACCESS_KEY` / `AKEYLESS_UID_INIT_TOKEN`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use zeroize::Zeroizing;

/// Public Akeyless API.
pub const DEFAULT_URL: &str = "https://api.akeyless.io";
/// Audience Akeyless expects in GCP identity tokens unless the auth method says otherwise.
pub const DEFAULT_GCP_AUDIENCE: &str = "akeyless.io";
pub const DEFAULT_K8S_SA_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// A credential held in memory: wiped on drop, never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(Zeroizing::new(s.into()))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How the plugin proves its identity to Akeyless (the `access-type` of `/auth`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum AccessType {
    #[value(name = "access_key", alias = "access-key", alias = "api_key")]
    AccessKey,
    #[value(name = "aws_iam", alias = "aws-iam")]
    AwsIam,
    #[value(name = "azure_ad", alias = "azure-ad")]
    AzureAd,
    #[value(name = "gcp")]
    Gcp,
    #[value(
        name = "universal_identity",
        alias = "universal-identity",
        alias = "uid"
    )]
    UniversalIdentity,
    #[value(name = "k8s", alias = "kubernetes")]
    K8s,
    #[value(name = "cert", alias = "certificate")]
    Cert,
    #[value(name = "jwt", alias = "oidc_jwt")]
    Jwt,
}

impl AccessType {
    /// The value of `access-type` on the wire.
    pub fn wire_name(self) -> &'static str {
        match self {
            AccessType::AccessKey => "access_key",
            AccessType::AwsIam => "aws_iam",
            AccessType::AzureAd => "azure_ad",
            AccessType::Gcp => "gcp",
            AccessType::UniversalIdentity => "universal_identity",
            AccessType::K8s => "k8s",
            AccessType::Cert => "cert",
            AccessType::Jwt => "jwt",
        }
    }

    /// Parses the spellings the original plugin and the Akeyless CLI accept.
    pub fn parse_loose(s: &str) -> Option<Self> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        Some(match norm.as_str() {
            "access_key" | "api_key" => AccessType::AccessKey,
            "aws_iam" | "aws" => AccessType::AwsIam,
            "azure_ad" | "azure" => AccessType::AzureAd,
            "gcp" => AccessType::Gcp,
            "universal_identity" | "uid" => AccessType::UniversalIdentity,
            "k8s" | "kubernetes" => AccessType::K8s,
            "cert" | "certificate" => AccessType::Cert,
            "jwt" | "oidc_jwt" => AccessType::Jwt,
            _ => return None,
        })
    }
}

impl fmt::Display for AccessType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.wire_name())
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Options of `--backend akeyless`.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct AkeylessArgs {
    /// Akeyless API base URL: the public API, or a Gateway: https://gw:8000/api/v2, legacy
    /// https://gw:8080/v2 (the /v2 suffix is needed; 8080's root is the old form API) or
    /// https://gw:8081 (at the root). Plain http is accepted for in-cluster gateways, with a warning.
    #[arg(long = "akeyless-url", env = "KMS_PLUGIN_AKEYLESS_URL", default_value = DEFAULT_URL)]
    pub url: String,

    /// Access ID of the Akeyless auth method (p-...).
    #[arg(long = "akeyless-access-id", env = "KMS_PLUGIN_AKEYLESS_ACCESS_ID")]
    pub access_id: Option<String>,

    /// Auth method type. When absent: access key given → access_key, UID token given →
    /// universal_identity, otherwise the cloud the plugin runs in is detected.
    #[arg(
        long = "akeyless-access-type",
        env = "KMS_PLUGIN_AKEYLESS_ACCESS_TYPE",
        value_enum
    )]
    pub access_type: Option<AccessType>,

    /// Name of the AES256GCM key that wraps the plugin's local KEKs (e.g. /k8s/kms-kek).
    #[arg(long = "akeyless-key-name", env = "KMS_PLUGIN_AKEYLESS_KEY_NAME")]
    pub key_name: Option<String>,

    /// File holding the access key (access_key auth). Or env KMS_PLUGIN_AKEYLESS_ACCESS_KEY.
    #[arg(
        long = "akeyless-access-key-file",
        env = "KMS_PLUGIN_AKEYLESS_ACCESS_KEY_FILE"
    )]
    pub access_key_file: Option<PathBuf>,

    /// File holding the initial Universal Identity token. Or env KMS_PLUGIN_AKEYLESS_UID_TOKEN.
    /// Rotated tokens are kept in <state-dir>/akeyless-uid-token and preferred on restart.
    #[arg(
        long = "akeyless-uid-token-file",
        env = "KMS_PLUGIN_AKEYLESS_UID_TOKEN_FILE"
    )]
    pub uid_token_file: Option<PathBuf>,

    /// Universal Identity token TTL to assume when Akeyless does not report it (/uid-list-children).
    #[arg(long = "akeyless-uid-ttl", env = "KMS_PLUGIN_AKEYLESS_UID_TTL", default_value = "60m", value_parser = humantime::parse_duration)]
    pub uid_ttl: Duration,

    /// Object ID of the Azure managed identity (azure_ad auth, optional).
    #[arg(
        long = "akeyless-azure-object-id",
        env = "KMS_PLUGIN_AKEYLESS_AZURE_OBJECT_ID"
    )]
    pub azure_object_id: Option<String>,

    /// Audience of the GCP identity token (gcp auth).
    #[arg(long = "akeyless-gcp-audience", env = "KMS_PLUGIN_AKEYLESS_GCP_AUDIENCE", default_value = DEFAULT_GCP_AUDIENCE)]
    pub gcp_audience: String,

    /// AWS STS endpoint named in the signed GetCallerIdentity request (aws_iam auth); default: the
    /// cloud-identity module's default. Set it to the regional endpoint your auth method expects.
    #[arg(long = "akeyless-aws-sts-url", env = "KMS_PLUGIN_AKEYLESS_AWS_STS_URL")]
    pub aws_sts_url: Option<String>,

    /// AWS instance metadata base URL (credentials and cloud detection); for tests and unusual clouds.
    #[arg(
        long = "akeyless-aws-imds-url",
        env = "KMS_PLUGIN_AKEYLESS_AWS_IMDS_URL"
    )]
    pub aws_imds_url: Option<String>,

    /// Azure instance metadata base URL (azure_ad auth and cloud detection).
    #[arg(
        long = "akeyless-azure-imds-url",
        env = "KMS_PLUGIN_AKEYLESS_AZURE_IMDS_URL"
    )]
    pub azure_imds_url: Option<String>,

    /// GCP metadata server base URL (gcp auth and cloud detection).
    #[arg(
        long = "akeyless-gcp-metadata-url",
        env = "KMS_PLUGIN_AKEYLESS_GCP_METADATA_URL"
    )]
    pub gcp_metadata_url: Option<String>,

    /// Name of the Akeyless Kubernetes auth config (k8s auth).
    #[arg(
        long = "akeyless-k8s-auth-config-name",
        env = "KMS_PLUGIN_AKEYLESS_K8S_AUTH_CONFIG_NAME"
    )]
    pub k8s_auth_config_name: Option<String>,

    /// Service-account token presented for k8s auth (re-read at every authentication).
    #[arg(
        long = "akeyless-k8s-service-account-token-file",
        env = "KMS_PLUGIN_AKEYLESS_K8S_SERVICE_ACCOUNT_TOKEN_FILE",
        default_value = DEFAULT_K8S_SA_TOKEN_FILE
    )]
    pub k8s_service_account_token_file: PathBuf,

    /// Client certificate, PEM (cert auth).
    #[arg(long = "akeyless-cert-file", env = "KMS_PLUGIN_AKEYLESS_CERT_FILE")]
    pub cert_file: Option<PathBuf>,

    /// Private key of the client certificate, PEM (cert auth).
    #[arg(long = "akeyless-key-file", env = "KMS_PLUGIN_AKEYLESS_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// File holding a JWT (jwt auth; re-read at every authentication).
    #[arg(long = "akeyless-jwt-file", env = "KMS_PLUGIN_AKEYLESS_JWT_FILE")]
    pub jwt_file: Option<PathBuf>,

    /// Encryption context bound to every wrapped key (repeatable KEY=VALUE). Changing it makes
    /// existing data undecryptable; set it once, e.g. cluster=prod-eu.
    #[arg(
        long = "akeyless-encryption-context",
        env = "KMS_PLUGIN_AKEYLESS_ENCRYPTION_CONTEXT",
        value_parser = parse_kv,
        value_delimiter = ','
    )]
    pub encryption_context: Vec<(String, String)>,

    /// Time budget of one Akeyless operation including its retries. Kept below the apiserver's 3 s
    /// KMS deadline; each attempt gets at most 40% of it.
    #[arg(long = "akeyless-timeout", env = "KMS_PLUGIN_AKEYLESS_TIMEOUT", default_value = "2500ms", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Time budget of start-up calls, logins, token renewals and UID rotations, including their
    /// retries (each attempt gets 40% of it). These have no apiserver waiting, and cloud logins make
    /// Akeyless call the cloud provider, so they get more time than the request path.
    #[arg(long = "akeyless-login-timeout", env = "KMS_PLUGIN_AKEYLESS_LOGIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub login_timeout: Duration,

    /// Extra CA certificates (PEM bundle) trusted for the Akeyless URL, e.g. a private Gateway's CA.
    /// Added to the system trust store (or to SSL_CERT_FILE / SSL_CERT_DIR when those are set).
    #[arg(long = "akeyless-ca-file", env = "KMS_PLUGIN_AKEYLESS_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for a Gateway that requires mutual TLS; needs
    /// --akeyless-client-key-file. Not the cert auth method (see --akeyless-cert-file).
    #[arg(
        long = "akeyless-client-cert-file",
        env = "KMS_PLUGIN_AKEYLESS_CLIENT_CERT_FILE"
    )]
    pub client_cert_file: Option<PathBuf>,

    /// Private key (PEM) of --akeyless-client-cert-file.
    #[arg(
        long = "akeyless-client-key-file",
        env = "KMS_PLUGIN_AKEYLESS_CLIENT_KEY_FILE"
    )]
    pub client_key_file: Option<PathBuf>,

    /// Access key, from env or file (never a flag).
    #[arg(skip)]
    pub access_key: Option<Secret>,

    /// Initial Universal Identity token, from env or file (never a flag).
    #[arg(skip)]
    pub uid_token: Option<Secret>,
}

impl Default for AkeylessArgs {
    fn default() -> Self {
        AkeylessArgs {
            url: DEFAULT_URL.to_string(),
            access_id: None,
            access_type: None,
            key_name: None,
            access_key_file: None,
            uid_token_file: None,
            uid_ttl: Duration::from_secs(3600),
            azure_object_id: None,
            gcp_audience: DEFAULT_GCP_AUDIENCE.to_string(),
            aws_sts_url: None,
            aws_imds_url: None,
            azure_imds_url: None,
            gcp_metadata_url: None,
            k8s_auth_config_name: None,
            k8s_service_account_token_file: PathBuf::from(DEFAULT_K8S_SA_TOKEN_FILE),
            cert_file: None,
            key_file: None,
            jwt_file: None,
            encryption_context: Vec::new(),
            timeout: Duration::from_millis(2500),
            login_timeout: Duration::from_secs(30),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            access_key: None,
            uid_token: None,
        }
    }
}

impl AkeylessArgs {
    /// The TLS trust options of the Akeyless URL.
    pub fn tls(&self) -> crate::backend::tls::TlsOptions {
        crate::backend::tls::TlsOptions {
            ca_file: self.ca_file.clone(),
            client_cert_file: self.client_cert_file.clone(),
            client_key_file: self.client_key_file.clone(),
        }
    }
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

impl AkeylessArgs {
    /// Reads the secrets this crate's own variables may carry (`KMS_PLUGIN_AKEYLESS_ACCESS_KEY`,
    /// `KMS_PLUGIN_AKEYLESS_UID_TOKEN`) unless already set.
    pub fn load_secrets_from_env(&mut self) {
        self.load_secrets_with(|k| std::env::var(k).ok());
    }

    pub fn load_secrets_with(&mut self, env: impl Fn(&str) -> Option<String>) {
        if self.access_key.is_none() {
            self.access_key = non_empty(env("KMS_PLUGIN_AKEYLESS_ACCESS_KEY")).map(Secret::new);
        }
        if self.uid_token.is_none() {
            self.uid_token = non_empty(env("KMS_PLUGIN_AKEYLESS_UID_TOKEN")).map(Secret::new);
        }
    }

    /// Drop-in mode: fills what is still unset from the original Akeyless plugin's environment
    /// (`AKEYLESS_URL`, `AKEYLESS_KEY_ENCRYPTION_KEY`, `AKEYLESS_ACCESS_ID`, `AKEYLESS_ACCESS_KEY`,
    /// `AKEYLESS_ACCESS_TYPE`, `AKEYLESS_AZURE_OBJECT_ID`, `AKEYLESS_GCP_AUDIENCE`,
    /// `AKEYLESS_UID_INIT_TOKEN`). Options given explicitly (flag or `KMS_PLUGIN_*`) win; for options
    /// with a default, a value equal to the default counts as unset.
    pub fn apply_legacy_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        if self.url == DEFAULT_URL {
            if let Some(v) = non_empty(env("AKEYLESS_URL")) {
                self.url = v;
            }
        }
        if self.key_name.is_none() {
            self.key_name = non_empty(env("AKEYLESS_KEY_ENCRYPTION_KEY"));
        }
        if self.access_id.is_none() {
            self.access_id = non_empty(env("AKEYLESS_ACCESS_ID"));
        }
        if self.access_key.is_none() && self.access_key_file.is_none() {
            self.access_key = non_empty(env("AKEYLESS_ACCESS_KEY")).map(Secret::new);
        }
        if self.access_type.is_none() {
            if let Some(v) = non_empty(env("AKEYLESS_ACCESS_TYPE")) {
                self.access_type = Some(AccessType::parse_loose(&v).ok_or_else(|| {
                    format!("AKEYLESS_ACCESS_TYPE={v:?} is not a known access type")
                })?);
            }
        }
        if self.azure_object_id.is_none() {
            self.azure_object_id = non_empty(env("AKEYLESS_AZURE_OBJECT_ID"));
        }
        if self.gcp_audience == DEFAULT_GCP_AUDIENCE {
            if let Some(v) = non_empty(env("AKEYLESS_GCP_AUDIENCE")) {
                self.gcp_audience = v;
            }
        }
        if self.uid_token.is_none() && self.uid_token_file.is_none() {
            self.uid_token = non_empty(env("AKEYLESS_UID_INIT_TOKEN")).map(Secret::new);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: AkeylessArgs,
    }

    #[test]
    fn flags_parse_and_debug_hides_secrets() {
        let cli = Cli::try_parse_from([
            "x",
            "--akeyless-access-type",
            "universal_identity",
            "--akeyless-key-name",
            "/k/kek",
            "--akeyless-encryption-context",
            "cluster=prod",
            "--akeyless-encryption-context",
            "team=a=b",
            "--akeyless-timeout",
            "2s",
        ])
        .unwrap();
        let mut a = cli.a;
        assert_eq!(a.access_type, Some(AccessType::UniversalIdentity));
        assert_eq!(a.url, DEFAULT_URL);
        assert_eq!(a.timeout, Duration::from_secs(2));
        assert_eq!(
            a.encryption_context,
            vec![
                ("cluster".into(), "prod".into()),
                ("team".into(), "a=b".into())
            ]
        );
        a.load_secrets_with(|k| {
            (k == "KMS_PLUGIN_AKEYLESS_ACCESS_KEY").then(|| "SECRETKEY".into())
        });
        assert!(!format!("{a:?}").contains("SECRETKEY"));
        assert_eq!(a.access_key.as_ref().unwrap().expose(), "SECRETKEY");
    }

    #[test]
    fn legacy_env_fills_only_unset() {
        let mut a = AkeylessArgs {
            key_name: Some("explicit".into()),
            ..Default::default()
        };
        a.apply_legacy_env(|k| {
            Some(
                match k {
                    "AKEYLESS_URL" => "http://127.0.0.1:1/api/v2",
                    "AKEYLESS_KEY_ENCRYPTION_KEY" => "legacy",
                    "AKEYLESS_ACCESS_ID" => "p-123",
                    "AKEYLESS_ACCESS_KEY" => "ak",
                    "AKEYLESS_ACCESS_TYPE" => "Access-Key",
                    "AKEYLESS_GCP_AUDIENCE" => "aud",
                    "AKEYLESS_UID_INIT_TOKEN" => "u-1",
                    _ => return None,
                }
                .to_string(),
            )
        })
        .unwrap();
        assert_eq!(a.url, "http://127.0.0.1:1/api/v2");
        assert_eq!(a.key_name.as_deref(), Some("explicit"));
        assert_eq!(a.access_id.as_deref(), Some("p-123"));
        assert_eq!(a.access_type, Some(AccessType::AccessKey));
        assert_eq!(a.gcp_audience, "aud");
        assert_eq!(a.uid_token.as_ref().unwrap().expose(), "u-1");
        let mut b = AkeylessArgs::default();
        assert!(b
            .apply_legacy_env(|k| (k == "AKEYLESS_ACCESS_TYPE").then(|| "bogus".into()))
            .is_err());
    }
}
