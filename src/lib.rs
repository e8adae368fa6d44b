//! kms-plugin: a Kubernetes KMS v2 / v1beta1 provider with a local key hierarchy.
//!
//! Layers, from the socket inwards:
//! - [`protocol`]: the gRPC adapters for KMS v2 and v1beta1, the UNIX socket listener, and the shim
//!   that lets path-valued HTTP/2 `:authority` headers through.
//! - [`engine`]: the envelope engine: local KEK hierarchy, ciphertext format, key_id and Status.
//! - [`backend`]: the remote KEK trait and one module per key manager.
//! - [`cli`] and [`config`]: the command line and configuration.
#![forbid(unsafe_code)]

pub mod backend;
pub mod cli;
pub mod config;
pub mod engine;
pub mod fsutil;
#[cfg(feature = "inventory")]
pub mod inventory;
pub mod ops;
pub mod proto;
pub mod protocol;

/// Backends compiled into this build.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut v = vec!["local"];
    if cfg!(feature = "akeyless") {
        v.push("akeyless");
    }
    if cfg!(feature = "pkcs11") {
        v.push("pkcs11");
    }
    if cfg!(feature = "aws-kms") {
        v.push("aws-kms");
    }
    if cfg!(feature = "gcp-kms") {
        v.push("gcp-kms");
    }
    if cfg!(feature = "azure-keyvault") {
        v.push("azure-keyvault");
    }
    v
}
