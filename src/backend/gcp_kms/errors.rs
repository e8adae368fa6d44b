//! Cloud KMS errors as [`BackendError`]s.
//!
//! Google's APIs answer errors with a `google.rpc.Status` (`{"error": {"code", "status",
//! "message", "details"}}` over HTTP/JSON), and the SDK parses only that shape into a
//! [`Status`]. Only such an answer, with a known code that agrees with the HTTP status, may be a
//! revocation or an authentication failure; anything else came from something in between.

use google_cloud_gax::error::rpc::{Code, Status, StatusDetails};
use google_cloud_gax::error::Error;

use super::{BackendError, RETRY_BUDGET};

/// The HTTP status Google's HTTP/JSON mapping uses for a code.
fn http_status_of(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::Aborted => 409,
        Code::ResourceExhausted => 429,
        Code::Cancelled => 499,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::DeadlineExceeded => 504,
        _ => 500,
    }
}

/// Error messages are Google's own and never echo request data; a long one is cut anyway.
fn short(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(300) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Build errors of google-cloud-auth name fields, not values; cut them short anyway.
pub(super) fn without_secrets(s: &str) -> String {
    if s.contains("PRIVATE KEY") {
        return "the credentials JSON is malformed".into();
    }
    short(s)
}

fn reason(status: &Status) -> Option<String> {
    status.details.iter().find_map(|d| match d {
        StatusDetails::ErrorInfo(i) if !i.reason.is_empty() => {
            Some(format!("{} ({})", i.reason, i.domain))
        }
        _ => None,
    })
}

/// Maps an SDK error of `action` (`Encrypt`, `Decrypt`, `GetCryptoKey`) to a [`BackendError`].
pub fn map_error(action: &str, err: &Error) -> BackendError {
    if let Some(status) = err.status() {
        return map_status(action, err.http_status_code(), status);
    }
    if err.is_timeout() {
        return BackendError::Timeout(RETRY_BUDGET);
    }
    if err.is_authentication() {
        // Getting a token failed (metadata server, STS, a bad key file): not Cloud KMS's answer.
        return BackendError::Unavailable(format!(
            "Cloud KMS {action}: no access token from the Google credentials \
             (GOOGLE_APPLICATION_CREDENTIALS, workload identity federation or the metadata \
             server): {}",
            chain(err)
        ));
    }
    if let Some(code) = err.http_status_code() {
        if code == 429 {
            return BackendError::Throttled(format!("Cloud KMS {action}: HTTP 429"));
        }
        return BackendError::Unavailable(format!(
            "Cloud KMS {action}: HTTP {code} without a Google error body (a proxy or load \
             balancer in between?)"
        ));
    }
    let cause = chain(err);
    let hint = if cause.contains("certificate") {
        " (the server's certificate is not trusted: add its CA to SSL_CERT_FILE)"
    } else {
        ""
    };
    if err.is_io() || err.is_connect() || err.is_transport() || err.is_deserialization() {
        return BackendError::Unavailable(format!("Cloud KMS {action}: {cause}{hint}"));
    }
    if err.is_exhausted() {
        return BackendError::Unavailable(format!(
            "Cloud KMS {action}: retries exhausted: {cause}"
        ));
    }
    BackendError::Other(format!("Cloud KMS {action}: {cause}{hint}"))
}

fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    short(&crate::backend::error_chain(err))
}

/// Maps a `google.rpc.Status` (with the HTTP status it came with, if any).
pub fn map_status(action: &str, http: Option<u16>, status: &Status) -> BackendError {
    let code = status.code;
    let name = code.name();
    if code == Code::Unknown || http.is_some_and(|h| h != http_status_of(code)) {
        return BackendError::Unavailable(format!(
            "Cloud KMS {action}: HTTP {} with status {name}, not a Cloud KMS answer (a proxy in \
             between?)",
            http.map(|h| h.to_string()).unwrap_or_default()
        ));
    }
    let mut detail = format!("Cloud KMS {action}: {name}: {}", short(&status.message));
    if let Some(r) = reason(status) {
        detail.push_str(&format!(" [{r}]"));
    }
    match code {
        Code::PermissionDenied => BackendError::PermissionDenied(format!(
            "{detail}; grant roles/cloudkms.cryptoKeyEncrypterDecrypter on the key"
        )),
        Code::NotFound => BackendError::KeyNotFound(detail),
        // Google names the state of the version in the message ("has value DISABLED in field
        // crypto_key_version.state"); the backend re-checks the version when it cannot tell.
        Code::FailedPrecondition if status.message.contains("DESTROY") => {
            BackendError::KeyNotFound(detail)
        }
        Code::FailedPrecondition if status.message.contains("DISABLED") => {
            BackendError::KeyDisabled(detail)
        }
        Code::Unauthenticated => BackendError::Authentication(detail),
        Code::ResourceExhausted => BackendError::Throttled(detail),
        // A request checksum that did not match: damaged on the way to Cloud KMS, not bad data.
        Code::InvalidArgument if status.message.contains("crc32c") => BackendError::Unavailable(
            format!("{detail} (the request was damaged in transit; it is retried)"),
        ),
        Code::InvalidArgument if action == "Decrypt" => BackendError::InvalidCiphertext(detail),
        Code::InvalidArgument => BackendError::Config(detail),
        Code::Unavailable
        | Code::Internal
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Cancelled => BackendError::Unavailable(detail),
        _ => BackendError::Other(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(body: &str) -> Status {
        Status::try_from(&bytes::Bytes::from(body.to_string())).unwrap()
    }

    #[test]
    fn typed_answers() {
        let denied = status(
            r#"{"error":{"code":403,"message":"Permission 'cloudkms.cryptoKeyVersions.useToDecrypt' denied","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"IAM_PERMISSION_DENIED","domain":"cloudkms.googleapis.com"}]}}"#,
        );
        let e = map_status("Decrypt", Some(403), &denied);
        assert!(
            matches!(&e, BackendError::PermissionDenied(m) if m.contains("IAM_PERMISSION_DENIED")),
            "{e:?}"
        );
        // The same body with another HTTP status is not Google's.
        assert!(matches!(
            map_status("Decrypt", Some(404), &denied),
            BackendError::Unavailable(_)
        ));
        let disabled = status(
            r#"{"error":{"code":400,"message":"The request cannot be fulfilled. Resource projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1 has value DISABLED in field crypto_key_version.state.","status":"FAILED_PRECONDITION"}}"#,
        );
        assert!(matches!(
            map_status("Decrypt", Some(400), &disabled),
            BackendError::KeyDisabled(_)
        ));
        let destroyed = status(
            r#"{"error":{"code":400,"message":"... has value DESTROYED in field crypto_key_version.state.","status":"FAILED_PRECONDITION"}}"#,
        );
        assert!(matches!(
            map_status("Decrypt", Some(400), &destroyed),
            BackendError::KeyNotFound(_)
        ));
        let nf = status(r#"{"error":{"code":404,"message":"x not found","status":"NOT_FOUND"}}"#);
        assert!(matches!(
            map_status("GetCryptoKey", Some(404), &nf),
            BackendError::KeyNotFound(_)
        ));
        assert!(matches!(
            map_status("GetCryptoKey", None, &nf),
            BackendError::KeyNotFound(_)
        ));
        // No `status` string: code Unknown, never a revocation.
        let bare = status(r#"{"error":{"code":403,"message":"Forbidden"}}"#);
        assert!(matches!(
            map_status("Decrypt", Some(403), &bare),
            BackendError::Unavailable(_)
        ));
        let inv = status(
            r#"{"error":{"code":400,"message":"Decryption failed","status":"INVALID_ARGUMENT"}}"#,
        );
        assert!(matches!(
            map_status("Decrypt", Some(400), &inv),
            BackendError::InvalidCiphertext(_)
        ));
        // A request damaged in transit is not a bad ciphertext.
        let crc = status(
            r#"{"error":{"code":400,"message":"The checksum in field ciphertext_crc32c did not match the data in field ciphertext.","status":"INVALID_ARGUMENT"}}"#,
        );
        assert!(matches!(
            map_status("Decrypt", Some(400), &crc),
            BackendError::Unavailable(_)
        ));
        let busy = status(
            r#"{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}"#,
        );
        assert!(matches!(
            map_status("Decrypt", Some(429), &busy),
            BackendError::Throttled(_)
        ));
        let down = status(r#"{"error":{"code":503,"message":"try again","status":"UNAVAILABLE"}}"#);
        assert!(matches!(
            map_status("Decrypt", Some(503), &down),
            BackendError::Unavailable(_)
        ));
        let unauth =
            status(r#"{"error":{"code":401,"message":"expired","status":"UNAUTHENTICATED"}}"#);
        assert!(matches!(
            map_status("Encrypt", Some(401), &unauth),
            BackendError::Authentication(_)
        ));
    }

    #[test]
    fn bare_http_is_an_outage() {
        for code in [403u16, 404, 401, 400, 502] {
            let e = Error::http(
                code,
                http::HeaderMap::new(),
                bytes::Bytes::from_static(b"<html>denied</html>"),
            );
            let m = map_error("Decrypt", &e);
            assert!(matches!(m, BackendError::Unavailable(_)), "{code}: {m:?}");
        }
        let e = Error::http(429, http::HeaderMap::new(), bytes::Bytes::new());
        assert!(matches!(
            map_error("Decrypt", &e),
            BackendError::Throttled(_)
        ));
    }
}
