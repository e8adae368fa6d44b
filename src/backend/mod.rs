//! The remote key-encryption-key (KEK) interface.
//!
//! A backend holds the remote KEK and can wrap and unwrap small secrets (the engine's local KEKs) with
//! it. It knows nothing about gRPC or Kubernetes; the envelope engine is its only caller. Every backend
//! reports its errors as [`BackendError`], whose variants say whether a failure is transient (retry,
//! keep caches) or permanent (the key is gone or access was revoked).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use zeroize::Zeroizing;

mod aead;
#[cfg(feature = "akeyless")]
pub mod akeyless;
#[cfg(any(feature = "aws-kms", feature = "akeyless"))]
pub mod aws;
#[cfg(feature = "aws-kms")]
pub mod aws_kms;
#[cfg(feature = "azure-keyvault")]
pub mod azure_keyvault;
#[cfg(feature = "gcp-kms")]
pub mod gcp_kms;
#[cfg(any(feature = "aws-kms", feature = "akeyless", feature = "vault"))]
mod http;
#[cfg(feature = "kmip")]
pub mod kmip;
pub mod local;
pub mod memory;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;
#[cfg(any(
    feature = "aws-kms",
    feature = "akeyless",
    feature = "vault",
    feature = "inventory",
    feature = "kmip",
    feature = "azure-keyvault"
))]
pub mod tls;
pub mod unreachable;
#[cfg(feature = "vault")]
pub mod vault;
pub mod with_previous;

/// A secret returned by [`Backend::unwrap`]; wiped from memory when dropped.
pub type SecretBytes = Zeroizing<Vec<u8>>;

/// The identity of the backend's current remote KEK.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyIdentity {
    /// Public, stable name of the remote KEK *including its version*. It becomes the KMS v2 `key_id`
    /// (prefixed with the backend kind by the engine), so it must change when the key is rotated and
    /// must never contain secret material.
    pub key_id: String,
    /// What the backend needs later to find this key again for [`Backend::unwrap`] (a key name, label
    /// or ARN). Stored in clear inside every ciphertext; keep it short.
    pub key_ref: String,
}

impl fmt::Debug for KeyIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyIdentity({} ref={})", self.key_id, self.key_ref)
    }
}

/// A secret wrapped by the remote KEK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey {
    /// See [`KeyIdentity::key_ref`].
    pub key_ref: String,
    /// [`KeyIdentity::key_id`] of the key (and version) that actually wrapped, as far as the backend
    /// can tell from the wrap itself. The engine labels the local KEK with it, never with an earlier
    /// probe's answer, so a rotation between probe and wrap cannot mislabel data.
    pub key_id: String,
    /// Opaque bytes produced by the backend; only that backend can turn them back into the secret.
    pub ciphertext: Vec<u8>,
}

/// The remote KEK.
///
/// Implementations must be cheap to share (`Arc<dyn Backend>`), honour their own timeouts, and never
/// put secret material (plaintext, keys, credentials, tokens) into errors or logs.
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// Short lowercase name of the backend kind (`local`, `akeyless`, ...). Part of every key_id.
    fn kind(&self) -> &'static str;

    /// The current remote KEK. This is the *cheap* health probe: it should not perform a
    /// cryptographic operation where the backend offers a metadata call.
    async fn current_key(&self) -> Result<KeyIdentity, BackendError>;

    /// Wraps `plaintext` (at most a few dozen bytes) with the current remote KEK.
    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError>;

    /// Unwraps what [`Backend::wrap`] returned, including after the remote KEK was rotated.
    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError>;

    /// Decrypts a KMS v1 ciphertext written by the plugin this backend replaces in place (the
    /// original Akeyless plugin stored the key manager's own ciphertext of each DEK). `None` when
    /// the backend has no such legacy format. Returns the key reference used and the DEK.
    async fn decrypt_legacy_v1(
        &self,
        _ciphertext: &[u8],
    ) -> Option<Result<(String, SecretBytes), BackendError>> {
        None
    }

    /// Encrypts a KMS v1 DEK in the format of the plugin this backend replaces, so that a rollback
    /// to it can read data written meanwhile (one remote call per write, as that plugin made).
    /// `None` when the backend has no such format.
    async fn encrypt_legacy_v1(&self, _dek: &[u8]) -> Option<Result<Vec<u8>, BackendError>> {
        None
    }
}

/// Which authentication step a backend took (see [`BackendEvents`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthKind {
    /// Acquired a session credential while holding no usable one: at start-up, after the server
    /// rejected the old one, or after it expired.
    Login,
    /// Renewed a session credential that was still valid, ahead of its expiry.
    TokenRefresh,
    /// Replaced a long-lived identity credential (e.g. an Akeyless Universal Identity token).
    IdentityRotation,
}

impl AuthKind {
    /// Bounded label for metrics and audit lines.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthKind::Login => "login",
            AuthKind::TokenRefresh => "token_refresh",
            AuthKind::IdentityRotation => "identity_rotation",
        }
    }
}

/// One authentication attempt and how it ended. Carries no secret: only the backend kind, the step
/// and the error (whose message never holds secret material, see [`BackendError`]).
#[derive(Clone, Copy, Debug)]
pub struct AuthEvent<'a> {
    /// [`Backend::kind`] of the backend that authenticated.
    pub backend: &'static str,
    pub kind: AuthKind,
    pub outcome: Result<(), &'a BackendError>,
}

/// Hook through which a backend reports what it does on its own, outside the engine's calls
/// (authentication, credential renewal). Given to a backend at construction; the default is
/// [`no_events`]. Implementations must be cheap and must not block: backends call it inline.
pub trait BackendEvents: Send + Sync + fmt::Debug + 'static {
    fn auth(&self, event: AuthEvent<'_>);
}

/// A [`BackendEvents`] that ignores everything.
#[derive(Debug, Default)]
pub struct NoEvents;

impl BackendEvents for NoEvents {
    fn auth(&self, _event: AuthEvent<'_>) {}
}

/// The default hook: [`NoEvents`].
pub fn no_events() -> Arc<dyn BackendEvents> {
    Arc::new(NoEvents)
}

/// An SDK error and its causes, by their `Display` only, each cause once. SDKs' `Debug` forms can
/// include raw responses (a session token, a credentials body) that must not reach a log.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// Everything that can go wrong talking to a backend.
///
/// Messages name the cause and, where there is one, the fix. They never include secret material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The backend could not be reached or answered with a server error. Transient.
    #[error("key backend unavailable: {0}")]
    Unavailable(String),
    /// The backend asked us to slow down. Transient.
    #[error("key backend is throttling requests: {0}")]
    Throttled(String),
    /// No answer within the allowed time. Transient.
    #[error("key backend did not answer within {0:?}")]
    Timeout(Duration),
    /// Our credentials were rejected. Permanent until the credentials are fixed.
    #[error("authentication to the key backend failed: {0}")]
    Authentication(String),
    /// The credentials are valid but lack permission on the key. Permanent (revocation).
    #[error("permission denied on the key: {0}")]
    PermissionDenied(String),
    /// The key exists but is disabled. Permanent (revocation).
    #[error("the key is disabled: {0}")]
    KeyDisabled(String),
    /// The key (or the key version a ciphertext needs) does not exist. Permanent (revocation).
    #[error("the key was not found: {0}")]
    KeyNotFound(String),
    /// The backend refused to unwrap the data: it was not produced by this key or is corrupted.
    #[error("the key backend could not unwrap the data (wrong key or corrupted ciphertext): {0}")]
    InvalidCiphertext(String),
    /// The backend is configured in a way that cannot work.
    #[error("key backend configuration error: {0}")]
    Config(String),
    /// Anything else.
    #[error("key backend error: {0}")]
    Other(String),
}

impl BackendError {
    /// True for failures that say the key is no longer usable by us (disabled, deleted, access
    /// denied). These, and only these, make the engine purge cached local KEKs.
    pub fn is_revocation(&self) -> bool {
        matches!(
            self,
            BackendError::PermissionDenied(_)
                | BackendError::KeyDisabled(_)
                | BackendError::KeyNotFound(_)
        )
    }

    /// True for failures that may go away by themselves and are worth retrying.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BackendError::Unavailable(_) | BackendError::Throttled(_) | BackendError::Timeout(_)
        )
    }

    /// Bounded label for metrics and audit lines.
    pub fn label(&self) -> &'static str {
        match self {
            BackendError::Unavailable(_) => "unavailable",
            BackendError::Throttled(_) => "throttled",
            BackendError::Timeout(_) => "timeout",
            BackendError::Authentication(_) => "authentication",
            BackendError::PermissionDenied(_) => "permission_denied",
            BackendError::KeyDisabled(_) => "key_disabled",
            BackendError::KeyNotFound(_) => "key_not_found",
            BackendError::InvalidCiphertext(_) => "invalid_ciphertext",
            BackendError::Config(_) => "config",
            BackendError::Other(_) => "other",
        }
    }
}
