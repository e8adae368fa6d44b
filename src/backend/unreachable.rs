//! Stands in for a primary backend that could not even be set up at start (its key deleted, its
//! credentials refused) when escrow backends are configured: the plugin then starts anyway, Status
//! unhealthy, and serves Decrypt through the escrow instead of taking every Secret down. Every call
//! answers `Config` (not transient: it never heals by itself) with the start-up error; restart the
//! plugin once the primary is fixed.

use async_trait::async_trait;

use super::{Backend, BackendError, KeyIdentity, SecretBytes, WrappedKey};

#[derive(Debug)]
pub struct Unreachable {
    kind: &'static str,
    reason: String,
}

impl Unreachable {
    pub fn new(kind: &'static str, reason: String) -> Self {
        Unreachable { kind, reason }
    }

    fn error(&self) -> BackendError {
        BackendError::Config(format!(
            "the {} backend could not be set up at start ({}); restart the plugin once it is fixed",
            self.kind, self.reason
        ))
    }
}

#[async_trait]
impl Backend for Unreachable {
    fn kind(&self) -> &'static str {
        self.kind
    }

    async fn current_key(&self) -> Result<KeyIdentity, BackendError> {
        Err(self.error())
    }

    async fn wrap(&self, _plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        Err(self.error())
    }

    async fn unwrap(
        &self,
        _key_ref: &str,
        _ciphertext: &[u8],
    ) -> Result<SecretBytes, BackendError> {
        Err(self.error())
    }
}
