//! Local key-encryption keys: generated here, wrapped once by the remote KEK, used for many DEKs.

use std::sync::atomic::{AtomicU64, Ordering};
use tokio::time::Instant;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::format::{self, NONCE_LEN, TAG_LEN};
use super::EngineError;
use crate::backend::WrappedKey;

/// Cache key of a local KEK: SHA-256 over its wrapped form (key reference and wrapped bytes).
pub type KekDigest = [u8; 32];

pub fn digest_of(key_ref: &str, wrapped: &[u8]) -> KekDigest {
    let mut h = Sha256::new();
    h.update((key_ref.len() as u32).to_be_bytes());
    h.update(key_ref.as_bytes());
    h.update(wrapped);
    h.finalize().into()
}

/// The short public reference of a local KEK in logs, metrics, audit lines and the inventory: 12 hex
/// digits of its digest.
pub fn short_ref(digest: &KekDigest) -> String {
    hex::encode(&digest[..6])
}

/// The associated data binds a ciphertext to its API and, for v2, its key_id.
#[derive(Clone, Copy, Debug)]
pub enum Binding<'a> {
    V1,
    V2 { key_id: &'a str },
}

impl Binding<'_> {
    fn append_to(&self, aad: &mut Vec<u8>) {
        match self {
            Binding::V1 => aad.extend_from_slice(b"v1"),
            Binding::V2 { key_id } => {
                aad.extend_from_slice(b"v2");
                aad.extend_from_slice(key_id.as_bytes());
            }
        }
    }
}

/// An unwrapped local KEK. The AES key schedule is wiped on drop (aes-gcm's `zeroize` feature).
pub struct LocalKek {
    cipher: Aes256Gcm,
    /// Header shared by every ciphertext under this KEK (see [`format`]).
    header: Vec<u8>,
    digest: KekDigest,
    wrapped_len: usize,
    /// key_id of the remote KEK that wrapped it (what Encrypt reports; empty for a KEK loaded by
    /// Decrypt, which never encrypts).
    pub key_id: String,
    /// Reference of the remote key that wrapped it (stored in every ciphertext under it).
    pub key_ref: String,
    pub created: Instant,
    /// True when an escrow backend is configured but could not wrap this KEK: the engine replaces
    /// it early (see `EngineConfig::escrow_retry`).
    pub escrow_incomplete: bool,
    uses: AtomicU64,
}

impl std::fmt::Debug for LocalKek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalKek({} key_id={})", self.reference(), self.key_id)
    }
}

impl LocalKek {
    /// Generates fresh key bytes; the caller wraps them and then calls [`LocalKek::new`].
    pub fn generate_secret() -> Zeroizing<[u8; 32]> {
        let mut k = Zeroizing::new([0u8; 32]);
        rand::thread_rng().fill_bytes(&mut *k);
        k
    }

    pub fn new(secret: &[u8], wrapped: &WrappedKey, key_id: String) -> Result<Self, EngineError> {
        Self::with_header(
            secret,
            wrapped,
            key_id,
            format::encode_header(&wrapped.key_ref, &wrapped.ciphertext)?,
        )
    }

    /// A KEK whose ciphertexts also carry its escrow wrappings (format version 2).
    pub fn with_escrow(
        secret: &[u8],
        wrapped: &WrappedKey,
        escrows: &[WrappedKey],
        escrow_kinds: &[&str],
        key_id: String,
    ) -> Result<Self, EngineError> {
        let list: Vec<format::EscrowWrapping<'_>> = escrows
            .iter()
            .zip(escrow_kinds)
            .map(|(w, kind)| format::EscrowWrapping {
                kind,
                key_ref: &w.key_ref,
                wrapped: &w.ciphertext,
            })
            .collect();
        let header =
            format::encode_header_with_escrow(&wrapped.key_ref, &wrapped.ciphertext, &list)?;
        Self::with_header(secret, wrapped, key_id, header)
    }

    /// A KEK loaded by Decrypt from a ciphertext header (unwrapped by the primary or an escrow).
    pub fn loaded(
        secret: &[u8],
        key_ref: &str,
        wrapped: &[u8],
        header: Vec<u8>,
    ) -> Result<Self, EngineError> {
        let wrapped = WrappedKey {
            key_ref: key_ref.to_string(),
            key_id: String::new(),
            ciphertext: wrapped.to_vec(),
        };
        Self::with_header(secret, &wrapped, String::new(), header)
    }

    fn with_header(
        secret: &[u8],
        wrapped: &WrappedKey,
        key_id: String,
        header: Vec<u8>,
    ) -> Result<Self, EngineError> {
        if secret.len() != 32 {
            return Err(EngineError::Internal(format!(
                "the backend returned a {}-byte local KEK, expected 32 (wrong key or corrupted ciphertext)",
                secret.len()
            )));
        }
        let cipher = Aes256Gcm::new_from_slice(secret).expect("32-byte key");
        Ok(LocalKek {
            cipher,
            header,
            digest: digest_of(&wrapped.key_ref, &wrapped.ciphertext),
            wrapped_len: wrapped.ciphertext.len(),
            key_id,
            key_ref: wrapped.key_ref.clone(),
            created: Instant::now(),
            escrow_incomplete: false,
            uses: AtomicU64::new(0),
        })
    }

    pub fn digest(&self) -> &KekDigest {
        &self.digest
    }

    /// The header every ciphertext under this KEK starts with (see [`format`]); the cache key.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// The primary's wrapped form of this KEK, as stored in its ciphertexts' header.
    pub fn wrapped(&self) -> &[u8] {
        let start = 5 + self.key_ref.len();
        &self.header[start..start + self.wrapped_len]
    }

    /// Short public reference for logs, metrics and audit lines: 12 hex digits of the digest.
    pub fn reference(&self) -> String {
        short_ref(&self.digest)
    }

    pub fn uses(&self) -> u64 {
        self.uses.load(Ordering::Relaxed)
    }

    /// Takes one use; false once `max_uses` is reached.
    pub fn try_use(&self, max_uses: u64) -> bool {
        self.uses.fetch_add(1, Ordering::Relaxed) < max_uses
    }

    fn aad(&self, header: &[u8], binding: Binding<'_>) -> Vec<u8> {
        let mut aad = Vec::with_capacity(header.len() + 2 + 64);
        aad.extend_from_slice(header);
        binding.append_to(&mut aad);
        aad
    }

    pub fn seal(&self, plaintext: &[u8], binding: Binding<'_>) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let aad = self.aad(&self.header, binding);
        let mut out = Vec::with_capacity(self.header.len() + NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&self.header);
        out.extend_from_slice(&nonce);
        let body_start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut out[body_start..])
            .expect("AES-GCM encryption of a small buffer cannot fail");
        out.extend_from_slice(&tag);
        out
    }

    pub fn open(
        &self,
        parsed: &format::Parsed<'_>,
        binding: Binding<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, EngineError> {
        let aad = self.aad(parsed.header, binding);
        let (body, tag) = parsed.sealed.split_at(parsed.sealed.len() - TAG_LEN);
        let mut plaintext = Zeroizing::new(body.to_vec());
        self.cipher
            .decrypt_in_place_detached(Nonce::from_slice(parsed.nonce), &aad, &mut plaintext, tag.into())
            .map_err(|_| match binding {
                Binding::V1 => EngineError::InvalidInput(
                    "ciphertext failed authentication: it was modified or is not a v1 ciphertext of this plugin".into(),
                ),
                Binding::V2 { .. } => EngineError::InvalidInput(
                    "ciphertext failed authentication: it was modified, or the key_id sent with it is not the one it was encrypted under".into(),
                ),
            })?;
        Ok(plaintext)
    }
}
