//! AWS plumbing shared by the AWS KMS backend and Akeyless `aws_iam` authentication: the official
//! SDK's configuration (`aws-config`: region and credentials chains, credentials cache) sending
//! through [`http_client::ReqwestHttpClient`], i.e. through the plugin's own trust store.
//!
//! Credentials come from the SDK's default chain, in its order: environment, shared config and
//! credentials files (profiles with `role_arn` + `source_profile`/`credential_source`,
//! `credential_process`, SSO, `web_identity_token_file`), web identity from the environment (IRSA),
//! the ECS/EKS container endpoint (EKS Pod Identity), IMDSv2. The chain sits behind
//! [`renewing::RenewingCredentials`] instead of the SDK's lazy cache: renewed in the background
//! ahead of expiry, and the current credentials stay in use while a renewal fails.

pub mod http_client;
pub mod renewing;

use std::sync::Arc;

use aws_config::identity::IdentityCache;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::SharedCredentialsProvider;

use super::tls::{TlsFlags, TlsOptions};
use super::{BackendError, BackendEvents};

/// Re-exported for the AWS callers: see [`super::error_chain`].
pub use super::error_chain;

/// What an AWS client needs beyond the SDK's own environment and profile files.
#[derive(Clone, Debug, Default)]
pub struct AwsOptions {
    /// Region to use, ahead of the SDK's region chain (env, profile, IMDS).
    pub region: Option<String>,
    /// `Some(true)` forces FIPS endpoints; `None` leaves it to `AWS_USE_FIPS_ENDPOINT` / the profile.
    pub use_fips: Option<bool>,
    /// `Some(true)` forces dual-stack endpoints; `None` leaves it to the SDK's settings.
    pub use_dual_stack: Option<bool>,
    /// Trust options for every HTTPS request (AWS service, STS, SSO).
    pub tls: TlsOptions,
    /// Credentials given by the caller instead of the default chain (tests, tooling).
    pub credentials: Option<SharedCredentialsProvider>,
    /// Where credential renewals are reported, and under which backend name.
    pub events: Option<(Arc<dyn BackendEvents>, &'static str)>,
    /// When credentials are renewed (tests shorten it).
    pub renewal: renewing::Timing,
}

/// The SDK configuration for `opts`, with the trust store of [`super::tls`]. Reads the process
/// environment and the shared AWS files as the SDK does; contacts nothing but IMDS (for the region,
/// and only when no region is set anywhere else).
pub async fn sdk_config(opts: &AwsOptions, flags: &TlsFlags) -> Result<SdkConfig, BackendError> {
    let (tls, roots) = super::tls::client_config(&opts.tls, flags)?;
    tracing::debug!(roots = ?roots, ca_file = ?opts.tls.ca_file, "AWS TLS trust");
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client::ReqwestHttpClient::new(tls).shared());
    if let Some(r) = opts
        .region
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
    {
        loader = loader.region(Region::new(r.to_string()));
    }
    if let Some(f) = opts.use_fips {
        loader = loader.use_fips(f);
    }
    if let Some(d) = opts.use_dual_stack {
        loader = loader.use_dual_stack(d);
    }
    if let Some(c) = &opts.credentials {
        loader = loader.credentials_provider(c.clone());
    }
    let config = loader.load().await;
    let Some(chain) = config.credentials_provider() else {
        return Ok(config);
    };
    let (events, backend) = opts
        .events
        .clone()
        .unwrap_or_else(|| (super::no_events(), "aws"));
    let renewing = renewing::RenewingCredentials::new(chain, opts.renewal, events, backend);
    Ok(config
        .into_builder()
        .credentials_provider(SharedCredentialsProvider::new(renewing))
        .identity_cache(IdentityCache::no_cache())
        .build())
}

/// The partition's DNS suffix for `region` (China and the ISO partitions differ from `aws`).
pub fn dns_suffix(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else if region.starts_with("us-isob-") {
        "sc2s.sgov.gov"
    } else if region.starts_with("us-iso-") {
        "c2s.ic.gov"
    } else {
        "amazonaws.com"
    }
}
