//! The gRPC side: KMS v2 and v1beta1 adapters over the envelope engine, the UNIX socket, and the
//! server that ties them together. Nothing here knows which backend holds the remote KEK.

pub mod admin;
pub mod authority;
pub mod deadline;
pub mod errors;
pub mod observe;
pub mod server;
pub mod socket;
pub mod v1;
pub mod v2;

/// The version string in v1beta1 Version replies and the runtime version reported to the apiserver.
pub const RUNTIME_NAME: &str = "kms-plugin";
pub const RUNTIME_VERSION: &str = env!("CARGO_PKG_VERSION");
