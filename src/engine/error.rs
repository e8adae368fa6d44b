use crate::backend::BackendError;

/// Why an engine operation failed. The protocol layer maps each variant to one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The request itself is wrong (malformed, oversized, wrong key_id, tampered).
    #[error("{0}")]
    InvalidInput(String),
    /// No usable remote key yet (start-up, or the backend has never answered).
    #[error("not ready: {0}")]
    NotReady(String),
    /// The backend reported the key disabled, deleted or access denied; cached keys were dropped.
    #[error("the key encryption key is revoked: {0}")]
    Revoked(String),
    /// A backend call failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A backend call took longer than allowed.
    #[error("the key backend did not answer within {0:?}")]
    DeadlineExceeded(std::time::Duration),
    /// A bug or an impossible state; never caused by input alone.
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// Bounded label for metrics and audit lines.
    pub fn label(&self) -> &'static str {
        match self {
            EngineError::InvalidInput(_) => "invalid_input",
            EngineError::NotReady(_) => "not_ready",
            EngineError::Revoked(_) => "revoked",
            EngineError::Backend(e) => e.label(),
            EngineError::DeadlineExceeded(_) => "deadline_exceeded",
            EngineError::Internal(_) => "internal",
        }
    }
}
