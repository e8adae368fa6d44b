//! What the gRPC layer tells metrics and the audit log about each request.

use std::time::Duration;

use crate::engine::Api;

/// One finished KMS request. Carries no plaintext, ciphertext or key material.
#[derive(Debug)]
pub struct RequestRecord<'a> {
    pub api: Api,
    pub method: &'static str,
    /// The apiserver's request uid (empty for Status and v1, which carry none).
    pub uid: &'a str,
    pub code: tonic::Code,
    pub elapsed: Duration,
    pub key_id: Option<&'a str>,
    /// Short public reference of the local KEK involved.
    pub kek_ref: Option<&'a str>,
    /// Whether the request needed a backend call.
    pub backend_call: bool,
    /// Error label (bounded set) when the request failed.
    pub error: Option<&'static str>,
}

pub trait RequestObserver: Send + Sync + 'static {
    fn request(&self, record: &RequestRecord<'_>);
    /// Status answers that differ from the previous one (health or key_id changes).
    fn status_changed(&self, _healthz: &str, _key_id: &str) {}
}

/// Observes nothing.
pub struct NoRequestObserver;

impl RequestObserver for NoRequestObserver {
    fn request(&self, _record: &RequestRecord<'_>) {}
}
