//! `kms-plugin recover`: offline disaster-recovery decryption of one value exported from etcd, with
//! one backend (normally an escrow backend, configured with its usual flags) and nothing else: no
//! running plugin, no apiserver, no primary key manager (docs/escrow.md, DR drill).
//!
//! The apiserver's storage format (CONTRACT §5): `k8s:enc:kms:v2:<name>:` + EncryptedObject, whose
//! data is sealed with a key derived from the seed (HKDF-SHA256 expand with a 32-byte info prefix,
//! then AES-256-GCM) or, for DEK-source type 0, with the DEK itself; `k8s:enc:kms:v1:<name>:` +
//! length-prefixed encrypted DEK + AES-GCM. The associated data is the object's etcd key.

use std::io::Write;
use std::path::PathBuf;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::Context;
use clap::Args;
use hmac::{Hmac, Mac};
use zeroize::Zeroizing;

use super::ServeArgs;
use crate::engine::recover::{open_with, UsedWrapping};
use crate::engine::Binding;
use crate::inventory::{split_fields, EncryptedObject};

#[derive(Args, Debug)]
pub struct RecoverArgs {
    /// The raw value of one object as stored in etcd (`etcdctl get KEY --print-value-only > F`).
    #[arg(long)]
    pub etcd_value_file: PathBuf,
    /// The object's etcd key, e.g. /registry/secrets/default/db: it is the associated data.
    #[arg(long)]
    pub etcd_key: String,
    /// Where to write the decrypted object (created with mode 0600, never overwritten); `-` writes
    /// to standard output.
    #[arg(long)]
    pub out: PathBuf,
    /// The backend to decrypt with, configured with its usual flags (as for `serve`); only its
    /// --backend and backend flags are used.
    #[command(flatten)]
    pub backend: ServeArgs,
}

pub async fn run(args: RecoverArgs) -> anyhow::Result<i32> {
    let value = std::fs::read(&args.etcd_value_file)
        .with_context(|| format!("read {}", args.etcd_value_file.display()))?;
    let kind = super::serve::effective_backend(&args.backend).context(
        "recover needs --backend and that backend's flags (e.g. --backend local --local-key-file F for a local escrow key)",
    )?;
    let metrics = crate::ops::metrics::Metrics::new();
    let backend = super::serve::build_kind(
        &args.backend,
        Some(kind),
        &metrics,
        crate::backend::no_events(),
    )
    .await?;
    let (plaintext, used) = decrypt_value(&*backend, &value, &args.etcd_key).await?;
    let used = match used {
        UsedWrapping::Escrow(kind) => format!("the {kind} escrow wrapping"),
        UsedWrapping::Primary => "the primary wrapping".to_string(),
    };
    if args.out.as_os_str() == "-" {
        std::io::stdout().write_all(&plaintext)?;
    } else {
        // Complete or absent, never a partial plaintext file; never over an existing one.
        crate::fsutil::create_atomic(&args.out, &plaintext, 0o600)
            .with_context(|| format!("create {} (it must not exist)", args.out.display()))?;
    }
    eprintln!(
        "recovered {} ({} bytes) with backend {} through {used}",
        args.etcd_key,
        plaintext.len(),
        backend.kind()
    );
    Ok(0)
}

/// Decrypts one etcd value of a KMS v1 or v2 provider backed by this plugin.
pub async fn decrypt_value(
    backend: &dyn crate::backend::Backend,
    value: &[u8],
    etcd_key: &str,
) -> anyhow::Result<(Zeroizing<Vec<u8>>, UsedWrapping)> {
    let rest = value.strip_prefix(b"k8s:enc:kms:").context(
        "the value is not stored by a KMS provider (it does not start with k8s:enc:kms:)",
    )?;
    let (fields, body) =
        split_fields(rest, 2).context("the value has no k8s:enc:kms:<version>:<name>: prefix")?;
    match fields[0].as_str() {
        "v2" => {
            let object = <EncryptedObject as prost::Message>::decode(body)
                .context("the KMS v2 value is not an EncryptedObject")?;
            let (source, used) = open_with(
                backend,
                &object.encrypted_dek_source,
                Binding::V2 {
                    key_id: &object.key_id,
                },
            )
            .await?;
            let data = &object.encrypted_data;
            let plaintext = match object.encrypted_dek_source_type {
                1 => {
                    anyhow::ensure!(data.len() > 32 + 12, "the encrypted data is truncated");
                    let (info, sealed) = data.split_at(32);
                    let key = hkdf_sha256_expand_32(&source, info);
                    gcm_open(&key, sealed, etcd_key)?
                }
                0 => gcm_open(&source, data, etcd_key)?,
                other => anyhow::bail!("unknown DEK source type {other} in the EncryptedObject"),
            };
            Ok((plaintext, used))
        }
        "v1" => {
            let len = body.get(..2).context("the KMS v1 value is truncated")?;
            let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
            let dek = body
                .get(2..2 + len)
                .context("the KMS v1 value is shorter than its DEK length")?;
            let (dek, used) = open_with(backend, dek, Binding::V1).await?;
            Ok((gcm_open(&dek, &body[2 + len..], etcd_key)?, used))
        }
        other => anyhow::bail!("unknown KMS storage version {other:?}"),
    }
}

/// HKDF-SHA256 expand (RFC 5869 §2.3) of one 32-byte block: T(1) = HMAC(PRK, info || 0x01).
fn hkdf_sha256_expand_32(prk: &[u8], info: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut mac =
        <Hmac<sha2::Sha256> as Mac>::new_from_slice(prk).expect("HMAC takes any key length");
    mac.update(info);
    mac.update(&[1]);
    Zeroizing::new(mac.finalize().into_bytes().to_vec())
}

/// AES-256-GCM open of `nonce || ciphertext || tag` with the etcd key as associated data.
fn gcm_open(key: &[u8], sealed: &[u8], etcd_key: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let cipher = Aes256Gcm::new_from_slice(key)
        .map_err(|_| anyhow::anyhow!("the DEK is {} bytes, not 32", key.len()))?;
    anyhow::ensure!(sealed.len() >= 12 + 16, "the encrypted data is truncated");
    let (nonce, ct) = sealed.split_at(12);
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: etcd_key.as_bytes() })
        .map(Zeroizing::new)
        .map_err(|_| {
            anyhow::anyhow!(
                "the object failed authentication: --etcd-key must be the exact key the value was read from"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hkdf_expand_matches_rfc_5869_test_case_1() {
        // RFC 5869 A.1: PRK and info given, OKM's first 32 bytes.
        let prk = hex::decode("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5")
            .unwrap();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        assert_eq!(
            hex::encode(&hkdf_sha256_expand_32(&prk, &info)[..]),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
        );
    }
}
