//! Code generated from `proto/*.proto` at build time.
#![allow(clippy::all, missing_docs)]

pub mod v2 {
    tonic::include_proto!("v2");
}

pub mod v1beta1 {
    tonic::include_proto!("v1beta1");
}
