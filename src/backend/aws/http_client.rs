//! The HTTP client the AWS SDK sends through: reqwest with the trust store of
//! [`crate::backend::tls`] (system or `SSL_CERT_FILE` roots, a private CA, optional client
//! certificate), so AWS trusts exactly what every other HTTPS backend trusts and no second TLS
//! stack is linked.
//!
//! Proxies from `HTTPS_PROXY`/`NO_PROXY` apply to KMS and STS, never to the link-local and loopback
//! credential endpoints (IMDS, the ECS/EKS container endpoints): a proxy there would answer for
//! the wrong machine.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::http::Response;
use aws_smithy_types::body::SdkBody;

use crate::backend::http::redact_reqwest;
use crate::backend::BackendError;

type Timeouts = (Option<Duration>, Option<Duration>);

/// See the module documentation.
#[derive(Clone)]
pub struct ReqwestHttpClient {
    tls: Arc<rustls::ClientConfig>,
    /// One pair of clients (proxied, direct) per timeout setting the SDK asks for; there are few.
    clients: Arc<Mutex<HashMap<Timeouts, SharedHttpConnector>>>,
}

impl std::fmt::Debug for ReqwestHttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReqwestHttpClient")
    }
}

impl ReqwestHttpClient {
    /// A client trusting what `tls` trusts.
    pub fn new(tls: rustls::ClientConfig) -> Self {
        ReqwestHttpClient {
            tls: Arc::new(tls),
            clients: Arc::default(),
        }
    }

    /// As a client for `aws_config` and the service configs.
    pub fn shared(self) -> SharedHttpClient {
        SharedHttpClient::new(self)
    }

    fn build(&self, t: Timeouts, proxy: bool) -> Result<reqwest::Client, BackendError> {
        let mut b = reqwest::Client::builder()
            .use_preconfigured_tls((*self.tls).clone())
            .pool_idle_timeout(Duration::from_secs(60))
            // The SDK signs the exact request; a redirect would replay it elsewhere.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(c) = t.0 {
            b = b.connect_timeout(c);
        }
        if let Some(r) = t.1 {
            b = b.read_timeout(r);
        }
        if !proxy {
            b = b.no_proxy();
        }
        b.build()
            .map_err(|e| BackendError::Config(format!("cannot build the AWS HTTP client: {e}")))
    }
}

impl HttpClient for ReqwestHttpClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        let key = (settings.connect_timeout(), settings.read_timeout());
        let mut map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key)
            .or_insert_with(|| {
                // Building with a TLS config that already built once cannot fail; if it did,
                // every request says so instead of panicking.
                let pair = self
                    .build(key, true)
                    .and_then(|p| Ok((p, self.build(key, false)?)));
                SharedHttpConnector::new(Connector(Arc::new(pair)))
            })
            .clone()
    }
}

#[derive(Debug)]
struct Connector(Arc<Result<(reqwest::Client, reqwest::Client), BackendError>>);

/// True for the hosts of local credential endpoints: link-local and loopback addresses.
fn is_local_endpoint(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => a.is_link_local() || a.is_loopback(),
        // fd00:ec2::/32 is IMDS and the EKS Pod Identity agent over IPv6.
        Ok(IpAddr::V6(a)) => {
            a.is_loopback()
                || (a.segments()[0] & 0xffc0) == 0xfe80
                || a.segments()[..2] == [0xfd00, 0x0ec2]
        }
        Err(_) => host == "localhost",
    }
}

impl HttpConnector for Connector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let clients = self.0.clone();
        HttpConnectorFuture::new(async move {
            let (proxied, direct) = match &*clients {
                Ok(pair) => pair,
                Err(e) => return Err(ConnectorError::other(e.to_string().into(), None)),
            };
            let req = request
                .try_into_http1x()
                .map_err(|e| ConnectorError::user(e.into()))?;
            let (parts, body) = req.into_parts();
            // Every request of KMS, STS, SSO and the credential endpoints has an in-memory body.
            let body = body.bytes().map(<[u8]>::to_vec).ok_or_else(|| {
                ConnectorError::user("streaming request bodies are not supported".into())
            })?;
            let local = parts.uri.host().is_some_and(is_local_endpoint);
            let client = if local { direct } else { proxied };
            let url = parts.uri.to_string();
            let mut rb = client.request(parts.method, url).body(body);
            for (k, v) in parts.headers.iter() {
                rb = rb.header(k, v);
            }
            let resp = rb.send().await.map_err(map_reqwest)?;
            let mut builder = http::Response::builder().status(resp.status());
            for (k, v) in resp.headers() {
                builder = builder.header(k, v);
            }
            let bytes = resp.bytes().await.map_err(map_reqwest)?;
            let out = builder
                .body(SdkBody::from(bytes))
                .map_err(|e| ConnectorError::other(e.into(), None))?;
            Response::try_from(out).map_err(|e| ConnectorError::other(e.into(), None))
        })
    }
}

/// A transport error as the SDK's retry logic understands it: timeouts and I/O are transient.
/// A failed certificate check stays `io` (retried like any connection failure) but keeps its
/// cause in the message, which the backend turns into a hint about the trust options.
fn map_reqwest(e: reqwest::Error) -> ConnectorError {
    let msg = redact_reqwest(&e);
    if e.is_timeout() {
        ConnectorError::timeout(msg.into())
    } else {
        ConnectorError::io(msg.into())
    }
}

#[cfg(test)]
mod tests {
    use super::is_local_endpoint;

    #[test]
    fn local_endpoints_bypass_proxies() {
        for h in [
            "169.254.169.254",
            "169.254.170.2",
            "169.254.170.23",
            "127.0.0.1",
            "[fd00:ec2::254]",
            "[fd00:ec2::23]",
            "localhost",
        ] {
            assert!(is_local_endpoint(h), "{h}");
        }
        for h in ["kms.eu-west-1.amazonaws.com", "10.0.0.1", "[2001:db8::1]"] {
            assert!(!is_local_endpoint(h), "{h}");
        }
    }
}
