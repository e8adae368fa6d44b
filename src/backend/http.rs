//! Small pieces shared by the HTTPS backends.

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
