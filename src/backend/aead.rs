//! AES-256-GCM sealing shared by the backends that hold raw key bytes themselves (local, in-memory).
//! Layout: 12-byte random nonce ‖ ciphertext ‖ 16-byte tag; the key name is the associated data so a
//! blob can never be opened under a different key name.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;

use super::{BackendError, SecretBytes};

// AES round keys are wiped on drop only when the `aes` crate is built with its `zeroize` feature
// (Cargo.toml); this stops the build if that feature ever goes missing.
const _: () = {
    const fn zeroized_on_drop<T: zeroize::ZeroizeOnDrop>() {}
    zeroized_on_drop::<aes::Aes256>();
    zeroized_on_drop::<aes_gcm::aes::Aes256>();
};

pub(crate) const NONCE_LEN: usize = 12;
pub(crate) const TAG_LEN: usize = 16;

pub(crate) fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.into());
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("AES-GCM encryption of a small buffer cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

pub(crate) fn open(key: &[u8; 32], aad: &[u8], blob: &[u8]) -> Result<SecretBytes, BackendError> {
    if blob.len() < NONCE_LEN + TAG_LEN {
        return Err(BackendError::InvalidCiphertext(format!(
            "wrapped key is {} bytes, shorter than nonce and tag",
            blob.len()
        )));
    }
    let (nonce, sealed) = blob.split_at(NONCE_LEN);
    Aes256Gcm::new(key.into())
        .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
        .map(SecretBytes::new)
        .map_err(|_| BackendError::InvalidCiphertext("authentication tag mismatch".into()))
}

#[cfg(test)]
mod tests {
    /// `ghash` and `polyval` have no marker trait to assert at compile time, so check the features
    /// cargo actually resolved for this build.
    #[test]
    fn aes_ghash_and_polyval_are_built_with_zeroize() {
        let out = std::process::Command::new(env!("CARGO"))
            .args(["metadata", "--format-version", "1", "--locked", "--offline"])
            .arg("--manifest-path")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .output()
            .expect("run cargo metadata");
        assert!(
            out.status.success(),
            "cargo metadata: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let nodes = meta["resolve"]["nodes"].as_array().unwrap();
        for krate in ["aes", "ghash", "polyval"] {
            let node = nodes
                .iter()
                .find(|n| {
                    n["id"]
                        .as_str()
                        .is_some_and(|id| id.contains(&format!("#{krate}@")))
                })
                .unwrap_or_else(|| panic!("{krate} is not in the dependency graph"));
            let features: Vec<&str> = node["features"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|f| f.as_str())
                .collect();
            assert!(
                features.contains(&"zeroize"),
                "{krate} is built without its zeroize feature: {features:?}"
            );
        }
    }
}
