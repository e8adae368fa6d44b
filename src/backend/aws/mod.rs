//! AWS plumbing shared by the AWS KMS backend and Akeyless `aws_iam` authentication: SigV4 request
//! signing and the standard credentials chain. No AWS SDK: the two protocols used here are small
//! and the SDK would dominate compile time.

pub mod credentials;
pub mod sigv4;

pub(crate) use super::http::redact_reqwest;
