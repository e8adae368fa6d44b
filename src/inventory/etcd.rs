//! A read-only etcd v3 client for the inventory: `KV.Range` through etcd's JSON gateway
//! (`POST /v3/kv/range`, served on every client URL), paginated.
//!
//! Why not an etcd client crate: the maintained one (`etcd-client`) compiles etcd's protobufs with
//! `protoc` at build time, which this crate avoids on purpose (build.rs uses a pure-Rust compiler);
//! the gateway is etcd's own JSON mapping of the same call, and the plugin already has an HTTPS
//! client with the trust options every backend uses. Only Range is ever sent: nothing here can
//! write to etcd.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::backend::tls::{client_config, TlsFlags, TlsOptions};

const TLS_FLAGS: TlsFlags = TlsFlags {
    ca_file: "--etcd-cacert",
    client_cert_file: "--etcd-cert",
    client_key_file: "--etcd-key",
};

/// One key and its value.
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("{0}")]
    Config(String),
    #[error("etcd at {endpoint} did not answer: {reason} (check --etcd-endpoints and, for https, --etcd-cacert/--etcd-cert/--etcd-key)")]
    Unreachable { endpoint: String, reason: String },
    #[error("etcd at {endpoint} refused the range read: HTTP {status}: {message}")]
    Refused {
        endpoint: String,
        status: u16,
        message: String,
    },
    #[error("etcd at {endpoint} sent an answer that is not a range response: {reason}")]
    BadAnswer { endpoint: String, reason: String },
}

#[derive(Serialize)]
struct RangeRequest {
    key: String,
    range_end: String,
    limit: i64,
}

#[derive(Deserialize)]
struct RangeResponse {
    #[serde(default)]
    kvs: Vec<JsonKeyValue>,
    #[serde(default)]
    more: bool,
}

#[derive(Deserialize)]
struct JsonKeyValue {
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
struct GatewayError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    error: String,
}

pub struct EtcdClient {
    http: reqwest::Client,
    endpoints: Vec<String>,
}

/// The first key after every key that starts with `prefix` (etcd's prefix range end).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // all keys
}

impl EtcdClient {
    pub fn new(endpoints: Vec<String>, tls: &TlsOptions) -> Result<Self, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::Config(
                "no etcd endpoint: give --etcd-endpoints, e.g. https://127.0.0.1:2379".into(),
            ));
        }
        let (config, _) =
            client_config(tls, &TLS_FLAGS).map_err(|e| EtcdError::Config(e.to_string()))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| EtcdError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            endpoints: endpoints
                .into_iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
        })
    }

    /// Up to `limit` keys in `[start, end)`, in key order; `true` when more follow.
    pub async fn range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: i64,
    ) -> Result<(Vec<KeyValue>, bool), EtcdError> {
        let body = RangeRequest {
            key: B64.encode(start),
            range_end: B64.encode(end),
            limit,
        };
        let mut last = None;
        // Any endpoint will do: a range read is served by every member.
        for endpoint in &self.endpoints {
            match self.range_at(endpoint, &body).await {
                Ok(r) => return Ok(r),
                Err(e @ EtcdError::Unreachable { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| EtcdError::Config("no etcd endpoint".into())))
    }

    async fn range_at(
        &self,
        endpoint: &str,
        body: &RangeRequest,
    ) -> Result<(Vec<KeyValue>, bool), EtcdError> {
        let resp = self
            .http
            .post(format!("{endpoint}/v3/kv/range"))
            .json(body)
            .send()
            .await
            .map_err(|e| EtcdError::Unreachable {
                endpoint: endpoint.to_string(),
                reason: e.without_url().to_string(),
            })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| EtcdError::Unreachable {
            endpoint: endpoint.to_string(),
            reason: e.without_url().to_string(),
        })?;
        if !status.is_success() {
            let message = serde_json::from_str::<GatewayError>(&text)
                .map(|e| {
                    if e.message.is_empty() {
                        e.error
                    } else {
                        e.message
                    }
                })
                .unwrap_or_else(|_| "(no etcd error body)".into());
            return Err(EtcdError::Refused {
                endpoint: endpoint.to_string(),
                status: status.as_u16(),
                message,
            });
        }
        let bad = |reason: String| EtcdError::BadAnswer {
            endpoint: endpoint.to_string(),
            reason,
        };
        let r: RangeResponse = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let kvs = r
            .kvs
            .into_iter()
            .map(|kv| {
                Ok(KeyValue {
                    key: B64.decode(&kv.key).map_err(|e| bad(format!("key: {e}")))?,
                    value: B64
                        .decode(&kv.value)
                        .map_err(|e| bad(format!("value: {e}")))?,
                })
            })
            .collect::<Result<Vec<_>, EtcdError>>()?;
        Ok((kvs, r.more))
    }
}
