//! A live move between key managers: a **primary** backend that wraps every new local KEK and
//! answers the probes (so key_id is the primary's), and a **previous** backend that is only asked
//! to unwrap what the primary cannot. The apiserver sees one provider whose key_id changed and
//! re-encrypts through its usual storage migration; old data keeps decrypting through the previous
//! backend until it is gone (docs/migration.md).
//!
//! Which backend a stored key reference belongs to is not written in the data, so an unwrap tries
//! the primary first and the previous one when the primary fails. When both fail, an outage on
//! either side wins (no revocation on partial knowledge); then "key not found" counts as "not
//! mine", so the other side's answer is the owner's (disabled, denied, bad ciphertext); not found
//! on both sides is not found; otherwise the primary's answer.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Backend, BackendError, KeyIdentity, SecretBytes, WrappedKey};

#[derive(Debug)]
pub struct WithPrevious {
    primary: Arc<dyn Backend>,
    previous: Arc<dyn Backend>,
}

impl WithPrevious {
    pub fn new(primary: Arc<dyn Backend>, previous: Arc<dyn Backend>) -> Self {
        Self { primary, previous }
    }
}

/// The error to report when neither backend could unwrap.
fn combine(primary: BackendError, previous: BackendError) -> BackendError {
    let not_found = |e: &BackendError| matches!(e, BackendError::KeyNotFound(_));
    let previous_decides = !primary.is_transient()
        && (previous.is_transient() || (not_found(&primary) && !not_found(&previous)));
    if previous_decides {
        previous
    } else {
        primary
    }
}

#[async_trait]
impl Backend for WithPrevious {
    fn kind(&self) -> &'static str {
        self.primary.kind()
    }

    async fn current_key(&self) -> Result<KeyIdentity, BackendError> {
        self.primary.current_key().await
    }

    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        self.primary.wrap(plaintext).await
    }

    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError> {
        let first = match self.primary.unwrap(key_ref, ciphertext).await {
            Ok(k) => return Ok(k),
            Err(e) => e,
        };
        match self.previous.unwrap(key_ref, ciphertext).await {
            Ok(k) => Ok(k),
            Err(second) => Err(combine(first, second)),
        }
    }

    async fn decrypt_legacy_v1(
        &self,
        ciphertext: &[u8],
    ) -> Option<Result<(String, SecretBytes), BackendError>> {
        match self.primary.decrypt_legacy_v1(ciphertext).await {
            Some(Ok(r)) => Some(Ok(r)),
            first => match (first, self.previous.decrypt_legacy_v1(ciphertext).await) {
                (_, Some(Ok(r))) => Some(Ok(r)),
                (Some(Err(a)), Some(Err(b))) => Some(Err(combine(a, b))),
                (Some(Err(a)), None) => Some(Err(a)),
                (None, other) => other,
                (Some(Ok(_)), _) => unreachable!("handled above"),
            },
        }
    }

    async fn encrypt_legacy_v1(&self, dek: &[u8]) -> Option<Result<Vec<u8>, BackendError>> {
        self.primary.encrypt_legacy_v1(dek).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::{KeyState, MemoryBackend};

    fn pair() -> (Arc<MemoryBackend>, Arc<MemoryBackend>, WithPrevious) {
        let a = Arc::new(MemoryBackend::new("a"));
        let b = Arc::new(MemoryBackend::new("b"));
        let both = WithPrevious::new(b.clone(), a.clone());
        (a, b, both)
    }

    #[tokio::test]
    async fn new_keys_come_from_the_primary_and_old_ones_still_unwrap() {
        let (a, _b, both) = pair();
        let old = a.wrap(b"under a").await.unwrap();
        assert_eq!(both.current_key().await.unwrap().key_id, "b:v1");
        let new = both.wrap(b"under b").await.unwrap();
        assert_eq!(new.key_id, "b:v1");
        assert_eq!(
            &both.unwrap(&old.key_ref, &old.ciphertext).await.unwrap()[..],
            b"under a"
        );
        assert_eq!(
            &both.unwrap(&new.key_ref, &new.ciphertext).await.unwrap()[..],
            b"under b"
        );
        assert_eq!(a.wrap_calls(), 1, "the previous backend never wraps");
    }

    #[tokio::test]
    async fn an_outage_on_either_side_is_never_a_revocation() {
        let (a, _b, both) = pair();
        let old = a.wrap(b"under a").await.unwrap();
        // The previous backend disabled its key: b says "not mine", a says "disabled".
        a.set_state(KeyState::Disabled);
        let e = both
            .unwrap(&old.key_ref, &old.ciphertext)
            .await
            .unwrap_err();
        assert!(matches!(e, BackendError::KeyDisabled(_)), "{e:?}");
        // A bad blob under the primary's key: the primary's answer, not the previous one's
        // "not mine", which must never read as a revocation of the primary's key.
        a.set_state(KeyState::Enabled);
        let e = both.unwrap("b/1", b"not a wrapped key").await.unwrap_err();
        assert!(!e.is_revocation(), "{e:?}");
    }

    #[test]
    fn an_outage_wins_and_not_found_means_not_mine() {
        let gone = || BackendError::KeyNotFound("x".into());
        let down = || BackendError::Unavailable("x".into());
        let bad = || BackendError::InvalidCiphertext("x".into());
        let off = || BackendError::KeyDisabled("x".into());
        assert!(combine(gone(), down()).is_transient());
        assert!(combine(down(), gone()).is_transient());
        assert!(matches!(
            combine(bad(), gone()),
            BackendError::InvalidCiphertext(_)
        ));
        assert!(matches!(
            combine(gone(), off()),
            BackendError::KeyDisabled(_)
        ));
        assert!(matches!(
            combine(gone(), gone()),
            BackendError::KeyNotFound(_)
        ));
        assert!(matches!(
            combine(bad(), off()),
            BackendError::InvalidCiphertext(_)
        ));
    }
}
