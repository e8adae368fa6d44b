//! AWS plumbing shared by the AWS KMS backend and Akeyless `aws_iam` authentication: SigV4 request
//! signing and the standard credentials chain. No AWS SDK: the two protocols used here are small
//! and the SDK would dominate compile time.

pub mod credentials;
pub mod sigv4;

/// A reqwest error's text without the URL (ours never hold secrets, but keep messages short) and
/// with the cause chain flattened.
pub(crate) fn redact_reqwest(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut msg = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else {
        "request failed".to_string()
    };
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}
