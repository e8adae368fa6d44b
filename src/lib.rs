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
pub mod fsutil;
pub mod proto;
pub mod protocol;
