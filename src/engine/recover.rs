//! Offline decryption for disaster-recovery drills (`kms-plugin recover`): opens one ciphertext of
//! this plugin with one backend, without an engine, a cache or a probe. The backend is usually an
//! escrow backend; the wrapping made by a backend of its kind is used, else the primary's.

use zeroize::Zeroizing;

use super::format;
use super::kek::{Binding, LocalKek};
use super::EngineError;
use crate::backend::Backend;

/// Which wrapping of the local KEK served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsedWrapping {
    /// The escrow wrapping made by a backend of this kind.
    Escrow(String),
    /// The primary's wrapping.
    Primary,
}

/// Opens `ciphertext` (this plugin's, format 1 or 2) with `backend` alone.
pub async fn open_with(
    backend: &dyn Backend,
    ciphertext: &[u8],
    binding: Binding<'_>,
) -> Result<(Zeroizing<Vec<u8>>, UsedWrapping), EngineError> {
    let parsed = format::parse(ciphertext)?;
    let escrows = parsed.escrows();
    let mut attempts: Vec<(&str, &[u8], UsedWrapping)> = escrows
        .iter()
        .filter(|e| e.kind == backend.kind())
        .map(|e| {
            (
                e.key_ref,
                e.wrapped,
                UsedWrapping::Escrow(e.kind.to_string()),
            )
        })
        .collect();
    attempts.push((parsed.key_ref, parsed.wrapped, UsedWrapping::Primary));
    let mut last = None;
    for (key_ref, wrapped, used) in attempts {
        match backend.unwrap(key_ref, wrapped).await {
            Ok(secret) => {
                let kek = LocalKek::loaded(
                    &secret,
                    parsed.key_ref,
                    parsed.wrapped,
                    parsed.header.to_vec(),
                )?;
                return Ok((kek.open(&parsed, binding)?, used));
            }
            Err(e) => last = Some(e),
        }
    }
    let kinds: Vec<&str> = escrows.iter().map(|e| e.kind).collect();
    Err(EngineError::InvalidInput(format!(
        "backend {} could not unwrap this ciphertext's local KEK ({}; escrow wrappings in it: {}); \
         use the escrow backend (or the primary) that wrapped it",
        backend.kind(),
        last.map(|e| e.to_string()).unwrap_or_default(),
        if kinds.is_empty() { "none".to_string() } else { kinds.join(", ") }
    )))
}
