//! Code generated from `proto/*.proto` at build time.
#![allow(clippy::all, missing_docs)]

pub mod v2 {
    tonic::include_proto!("v2");
}

pub mod v1beta1 {
    tonic::include_proto!("v1beta1");
}

/// kms-plugin's own administration service (proto/admin.proto).
pub mod admin {
    tonic::include_proto!("kmsplugin.admin.v1");
}
