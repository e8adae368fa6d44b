//! Key Vault errors as [`BackendError`]s.
//!
//! Key Vault and Managed HSM answer errors as `{"error": {"code", "message", "innererror":
//! {"code"}}}` with a matching HTTP status (a disabled key: 403 `Forbidden` with inner code
//! `KeyDisabled`; a deleted key: 404 `KeyNotFound`; RBAC: 403 `Forbidden` / `ForbiddenByRbac`).
//! Only such an answer may be a revocation or an authentication failure; a bare status, an HTML
//! page or an empty body came from something in between and is an outage.

use azure_core::error::ErrorKind;

use super::{BackendError, RETRY_BUDGET};

/// Key Vault's own error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    pub code: String,
    pub message: String,
    /// The innermost `innererror.code`, if any.
    pub inner: Option<String>,
}

/// Parses Key Vault's error shape; `None` for anything else.
pub fn parse_service_error(body: &[u8]) -> Option<ServiceError> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let e = v.as_object()?.get("error")?.as_object()?;
    let code = e.get("code")?.as_str()?.to_string();
    let message = e.get("message")?.as_str()?.to_string();
    if code.is_empty() {
        return None;
    }
    let mut inner = None;
    let mut cur = e
        .get("innererror")
        .or_else(|| e.get("innerError"))
        .and_then(|i| i.as_object());
    while let Some(i) = cur {
        if let Some(c) = i.get("code").and_then(|c| c.as_str()) {
            inner = Some(c.to_string());
        }
        cur = i
            .get("innererror")
            .or_else(|| i.get("innerError"))
            .and_then(|i| i.as_object());
    }
    Some(ServiceError {
        code,
        message,
        inner,
    })
}

/// Service messages name keys and operations, never request data; a long one is cut anyway.
fn short(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(300) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Maps a typed Key Vault answer of `action` (`wrapKey`, `unwrapKey`, `getKey`) with HTTP
/// status `http`.
pub fn map_service_error(action: &str, http: u16, e: &ServiceError) -> BackendError {
    let inner = e.inner.as_deref().unwrap_or("");
    let mut detail = format!("Key Vault {action}: HTTP {http} {}", e.code);
    if !inner.is_empty() {
        detail.push_str(&format!("/{inner}"));
    }
    detail.push_str(&format!(": {}", short(&e.message)));
    let lower = e.message.to_ascii_lowercase();
    match (http, e.code.as_str()) {
        (401, "Unauthorized") => BackendError::Authentication(format!(
            "{detail}; check the credential (tenant, client ID, secret or federated token) and \
             that its token is for Key Vault"
        )),
        (403, "Forbidden") => {
            let lifecycle = |word: &str, inner_code: &str| {
                inner.eq_ignore_ascii_case(inner_code) || lower.contains(word)
            };
            if lifecycle("disabled key", "KeyDisabled") {
                BackendError::KeyDisabled(format!(
                    "{detail}; enable the key version again to read the data it wrapped"
                ))
            } else if lifecycle("expired", "KeyExpired")
                || lifecycle("not yet valid", "KeyNotYetValid")
            {
                BackendError::KeyDisabled(format!(
                    "{detail}; the key version is outside its activation (nbf) / expiry (exp) \
                     window: update its attributes"
                ))
            } else {
                BackendError::PermissionDenied(format!(
                    "{detail}; grant the role \"Key Vault Crypto Service Encryption User\" (or \
                     the wrapKey, unwrapKey and get key permissions) on the key"
                ))
            }
        }
        // Only the key's own code: a generic `NotFound` in this shape can come from another
        // Azure front end (a wrong path, a gateway) and proves nothing about the key.
        (404, "KeyNotFound") => BackendError::KeyNotFound(format!(
            "{detail}; a deleted key can be recovered while soft-delete keeps it"
        )),
        (400, "BadParameter" | "BadRequest") if action == "unwrapKey" => {
            BackendError::InvalidCiphertext(detail)
        }
        (400, _) => BackendError::Config(detail),
        (429, _) => BackendError::Throttled(detail),
        (500..=599, _) => BackendError::Unavailable(detail),
        _ => BackendError::Unavailable(format!(
            "{detail} (an unexpected status and code pair; not treated as Key Vault's verdict)"
        )),
    }
}

/// Maps an SDK error of `action`.
pub fn map_error(action: &str, err: &azure_core::Error) -> BackendError {
    match err.kind() {
        ErrorKind::HttpResponse {
            status,
            raw_response,
            ..
        } => {
            let http = u16::from(*status);
            let typed = raw_response
                .as_ref()
                .and_then(|r| parse_service_error(r.body().as_ref()));
            match typed {
                Some(e) => map_service_error(action, http, &e),
                None if http == 429 => {
                    BackendError::Throttled(format!("Key Vault {action}: HTTP 429"))
                }
                None => BackendError::Unavailable(format!(
                    "Key Vault {action}: HTTP {http} without a Key Vault error body (a proxy, \
                     firewall or load balancer in between?)"
                )),
            }
        }
        ErrorKind::Credential => {
            let cause = chain(err);
            // Entra ID's own refusal names an AADSTS code; anything else is the way to it.
            if cause.contains("AADSTS") {
                BackendError::Authentication(format!(
                    "Key Vault {action}: Entra ID refused the credential: {cause}"
                ))
            } else {
                BackendError::Unavailable(format!(
                    "Key Vault {action}: no access token (managed identity endpoint, workload \
                     identity token file or Entra ID): {cause}"
                ))
            }
        }
        ErrorKind::Connection | ErrorKind::Io => {
            let cause = chain(err);
            if cause.contains("timed out") || cause.contains("operation timed out") {
                return BackendError::Timeout(RETRY_BUDGET);
            }
            let hint = if cause.contains("certificate") {
                " (the server's certificate is not trusted: add its CA with \
                 --azure-keyvault-ca-file or SSL_CERT_FILE)"
            } else {
                ""
            };
            BackendError::Unavailable(format!("Key Vault {action}: {cause}{hint}"))
        }
        ErrorKind::DataConversion => BackendError::Unavailable(format!(
            "Key Vault {action}: an answer that is not Key Vault's: {}",
            chain(err)
        )),
        _ => {
            let cause = chain(err);
            if cause.contains("doesn't match the requested domain") {
                return BackendError::Config(format!(
                    "Key Vault {action}: the vault's authentication challenge names a resource \
                     outside the vault URL's domain: {cause}; check --azure-keyvault-url (for a \
                     private endpoint or test server see \
                     --azure-keyvault-skip-challenge-resource-check)"
                ));
            }
            BackendError::Other(format!("Key Vault {action}: {cause}"))
        }
    }
}

/// The error and its causes, without the token or secret (the SDK never puts them in errors;
/// cut anyway).
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    short(&crate::backend::error_chain(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(body: &str) -> ServiceError {
        parse_service_error(body.as_bytes()).expect("typed")
    }

    #[test]
    fn typed_answers() {
        let disabled = typed(
            r#"{"error":{"code":"Forbidden","message":"Operation unwrapKey is not allowed on a disabled key.","innererror":{"code":"KeyDisabled"}}}"#,
        );
        assert_eq!(disabled.inner.as_deref(), Some("KeyDisabled"));
        assert!(matches!(
            map_service_error("unwrapKey", 403, &disabled),
            BackendError::KeyDisabled(_)
        ));
        // The same body with another status is not Key Vault's verdict.
        assert!(matches!(
            map_service_error("unwrapKey", 404, &disabled),
            BackendError::Unavailable(_)
        ));
        let rbac = typed(
            r#"{"error":{"code":"Forbidden","message":"Caller is not authorized to perform action on resource.","innererror":{"code":"ForbiddenByRbac"}}}"#,
        );
        assert!(matches!(
            map_service_error("wrapKey", 403, &rbac),
            BackendError::PermissionDenied(_)
        ));
        let expired = typed(
            r#"{"error":{"code":"Forbidden","message":"Operation wrapKey is not allowed on an expired key.","innererror":{"code":"KeyExpired"}}}"#,
        );
        assert!(matches!(
            map_service_error("wrapKey", 403, &expired),
            BackendError::KeyDisabled(_)
        ));
        let gone = typed(
            r#"{"error":{"code":"KeyNotFound","message":"A key with (name/id) k was not found in this key vault."}}"#,
        );
        assert!(matches!(
            map_service_error("getKey", 404, &gone),
            BackendError::KeyNotFound(_)
        ));
        // A generic NotFound in the same shape (a wrong path, another front end): an outage.
        let route = typed(r#"{"error":{"code":"NotFound","message":"Resource not found"}}"#);
        assert!(matches!(
            map_service_error("getKey", 404, &route),
            BackendError::Unavailable(_)
        ));
        let bad = typed(r#"{"error":{"code":"BadParameter","message":"Invalid value"}}"#);
        assert!(matches!(
            map_service_error("unwrapKey", 400, &bad),
            BackendError::InvalidCiphertext(_)
        ));
        let unauth = typed(r#"{"error":{"code":"Unauthorized","message":"Token expired"}}"#);
        assert!(matches!(
            map_service_error("getKey", 401, &unauth),
            BackendError::Authentication(_)
        ));
        let busy = typed(r#"{"error":{"code":"Throttled","message":"slow down"}}"#);
        assert!(matches!(
            map_service_error("getKey", 429, &busy),
            BackendError::Throttled(_)
        ));
    }

    #[test]
    fn other_shapes_are_not_typed() {
        for body in [
            "",
            "<html><body>403 Forbidden</body></html>",
            r#"{"error":"Forbidden"}"#,
            r#"{"error":{"code":"Forbidden"}}"#,
            r#"{"message":"Forbidden"}"#,
            r#"{"error":{"code":"","message":"x"}}"#,
        ] {
            assert_eq!(parse_service_error(body.as_bytes()), None, "{body}");
        }
    }
}
