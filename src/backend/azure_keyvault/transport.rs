//! The HTTP client the Azure SDK sends through: our reqwest with the plugin's rustls trust store
//! (ring only), instead of the SDK's own reqwest 0.13 whose TLS feature would add aws-lc.
//!
//! Two clients: one for Key Vault and Entra ID (honours HTTPS_PROXY), one for the instance
//! metadata service (never through a proxy). `--azure-imds-endpoint` moves the metadata address
//! (tests, sidecars): the SDK has the address built in.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::error::ErrorKind;
use azure_core::http::headers::{HeaderName, HeaderValue, Headers};
use azure_core::http::{AsyncRawResponse, Body, HttpClient, Method, Request, Url};

use super::BackendError;

/// The address the SDK's managed-identity credential asks.
pub(super) const IMDS_HOST: &str = "169.254.169.254";
/// Larger answers are not Key Vault's or Entra ID's (theirs are a few KiB).
const MAX_BODY: usize = 1 << 20;

pub(super) struct Transport {
    http: reqwest::Client,
    imds: reqwest::Client,
    imds_override: Option<Url>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field(
                "imds_override",
                &self.imds_override.as_ref().map(|u| u.as_str()),
            )
            .finish_non_exhaustive()
    }
}

impl Transport {
    pub(super) fn new(
        tls: rustls::ClientConfig,
        attempt_timeout: Duration,
        imds_override: Option<Url>,
    ) -> Result<Arc<Self>, BackendError> {
        let build = |proxy: bool| {
            let mut b = reqwest::Client::builder()
                .use_preconfigured_tls(tls.clone())
                .connect_timeout(Duration::from_secs(1).min(attempt_timeout))
                .timeout(attempt_timeout)
                // Key Vault never redirects; a redirect comes from something in between.
                .redirect(reqwest::redirect::Policy::none());
            if !proxy {
                b = b.no_proxy();
            }
            b.build()
                .map_err(|e| BackendError::Config(format!("cannot build the HTTPS client: {e}")))
        };
        Ok(Arc::new(Transport {
            http: build(true)?,
            imds: build(false)?,
            imds_override,
        }))
    }

    fn target(&self, url: &Url) -> (Url, bool) {
        if url.host_str() != Some(IMDS_HOST) {
            return (url.clone(), false);
        }
        let Some(base) = &self.imds_override else {
            return (url.clone(), true);
        };
        let mut moved = base.clone();
        moved.set_path(url.path());
        moved.set_query(url.query());
        (moved, true)
    }
}

fn method(m: Method) -> azure_core::Result<reqwest::Method> {
    Ok(match m {
        Method::Delete => reqwest::Method::DELETE,
        Method::Get => reqwest::Method::GET,
        Method::Head => reqwest::Method::HEAD,
        Method::Patch => reqwest::Method::PATCH,
        Method::Post => reqwest::Method::POST,
        Method::Put => reqwest::Method::PUT,
        _ => {
            return Err(azure_core::Error::with_message(
                ErrorKind::Other,
                "an HTTP method this plugin does not send",
            ))
        }
    })
}

fn io_error(kind: ErrorKind, e: reqwest::Error, what: &'static str) -> azure_core::Error {
    azure_core::Error::with_error(kind, e, what)
}

#[async_trait]
impl HttpClient for Transport {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let (url, imds) = self.target(request.url());
        let client = if imds { &self.imds } else { &self.http };
        let mut req = client.request(method(request.method())?, url);
        for (name, value) in request.headers().iter() {
            req = req.header(name.as_str(), value.as_str());
        }
        req = match request.body() {
            Body::Bytes(b) => req.body(b.clone()),
            #[allow(unreachable_patterns)]
            _ => {
                return Err(azure_core::Error::with_message(
                    ErrorKind::Other,
                    "streamed request bodies are not used by this plugin",
                ))
            }
        };
        let mut rsp = req.send().await.map_err(|e| {
            let kind = if e.is_connect() {
                ErrorKind::Connection
            } else {
                ErrorKind::Io
            };
            io_error(kind, e, "the HTTPS request failed")
        })?;
        let status = rsp.status().as_u16();
        let headers: std::collections::HashMap<HeaderName, HeaderValue> = rsp
            .headers()
            .iter()
            .filter_map(|(k, v)| {
                let v = v.to_str().ok()?;
                Some((
                    HeaderName::from(k.as_str().to_owned()),
                    HeaderValue::from(v.to_owned()),
                ))
            })
            .collect();
        let mut body = Vec::new();
        while let Some(chunk) = rsp
            .chunk()
            .await
            .map_err(|e| io_error(ErrorKind::Io, e, "reading the HTTPS answer failed"))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(azure_core::Error::with_message(
                    ErrorKind::Io,
                    "the answer is larger than 1 MiB; not Key Vault's",
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let stream = futures_util::stream::once(async move { Ok(bytes::Bytes::from(body)) });
        Ok(AsyncRawResponse::new(
            status.into(),
            Headers::from(headers),
            Box::pin(stream),
        ))
    }
}
