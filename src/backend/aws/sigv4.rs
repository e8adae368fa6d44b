//! AWS Signature Version 4 request signing (header form), written from the published algorithm.
//!
//! Only what this crate needs: sign one request with a payload held in memory. The caller sends the
//! returned headers along with the ones it passed in.

use std::time::SystemTime;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::credentials::Credentials;

const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// A request to sign. `headers` are the extra headers to sign and send (e.g. `content-type`,
/// `x-amz-target`); `host` and `x-amz-date` (and the session token) are added by the signer.
pub struct Request<'a> {
    pub method: &'a str,
    pub url: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// Headers produced by [`sign`], to add to the request. Holds the signature, so not `Debug`.
pub struct Signed {
    /// `X-Amz-Date` value.
    pub amz_date: String,
    /// `X-Amz-Security-Token` value, when the credentials are temporary.
    pub security_token: Option<String>,
    /// `Authorization` value.
    pub authorization: String,
    /// The `Host` value that was signed (authority of the URL, default port omitted).
    pub host: String,
    /// Semicolon-separated names of the signed headers.
    pub signed_headers: String,
}

/// Why a request could not be signed (only a malformed URL).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot sign request: {0}")]
pub struct SignError(String);

/// `YYYYMMDDTHHMMSSZ` for `t`.
pub fn amz_date(t: SystemTime) -> String {
    // humantime renders RFC 3339 in UTC: "2015-08-30T12:36:00Z".
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect()
}

/// Percent-encodes everything except the RFC 3986 unreserved characters (and `/` when asked).
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let (h, l) = (bytes[i + 1], bytes[i + 2]);
            if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() {
                let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
                out.push(digit(h) << 4 | digit(l));
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hmac(key: &[u8], msg: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(msg);
    Zeroizing::new(mac.finalize().into_bytes().to_vec())
}

/// Hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), false),
                uri_encode(&percent_decode(v), false),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Signs `req` for `region`/`service` at `time`.
pub fn sign(
    req: &Request<'_>,
    creds: &Credentials,
    region: &str,
    service: &str,
    time: SystemTime,
) -> Result<Signed, SignError> {
    let uri: http::Uri = req
        .url
        .parse()
        .map_err(|e| SignError(format!("invalid URL: {e}")))?;
    let authority = uri
        .authority()
        .ok_or_else(|| SignError("URL has no host".into()))?;
    let default_port = match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    };
    let host = match authority.port_u16() {
        Some(p) if Some(p) != default_port => format!("{}:{p}", authority.host()),
        _ => authority.host().to_string(),
    };
    let path = if uri.path().is_empty() {
        "/"
    } else {
        uri.path()
    };
    // Non-S3 services expect each path segment encoded once more on top of the URL's own encoding.
    let canonical_uri = uri_encode(path, true);
    let canonical_query = canonical_query(uri.query().unwrap_or(""));

    let amz_date = amz_date(time);
    let date = &amz_date[..8];
    let token = creds.session_token();

    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_ascii_lowercase(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect();
    headers.push(("host".into(), host.clone()));
    headers.push(("x-amz-date".into(), amz_date.clone()));
    if let Some(t) = token {
        headers.push(("x-amz-security-token".into(), t.to_string()));
    }
    headers.sort();
    // Repeated names are joined with commas, in the order given.
    let mut merged: Vec<(String, String)> = Vec::new();
    for (k, v) in headers {
        match merged.last_mut() {
            Some((lk, lv)) if *lk == k => {
                lv.push(',');
                lv.push_str(&v);
            }
            _ => merged.push((k, v)),
        }
    }
    let canonical_headers: String = merged.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed_headers = merged
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");

    let canonical_request = format!(
        "{}\n{canonical_uri}\n{canonical_query}\n{canonical_headers}\n{signed_headers}\n{}",
        req.method.to_ascii_uppercase(),
        sha256_hex(req.body)
    );
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    );

    let secret = Zeroizing::new(format!("AWS4{}", creds.secret_access_key()));
    let k_date = hmac(secret.as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    let signature = hex::encode(&*hmac(&k_signing, string_to_sign.as_bytes()));

    Ok(Signed {
        authorization: format!(
            "{ALGORITHM} Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            creds.access_key_id()
        ),
        amz_date,
        security_token: token.map(str::to_string),
        host,
        signed_headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    // Values of AWS's published SigV4 test suite (example credentials, 2015-08-30T12:36:00Z).
    fn suite_creds() -> Credentials {
        Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
        )
    }
    fn suite_time() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_440_938_160)
    }
    fn auth(sig: &str, signed: &str) -> String {
        format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders={signed}, Signature={sig}"
        )
    }

    #[test]
    fn suite_get_vanilla() {
        let req = Request {
            method: "GET",
            url: "https://example.amazonaws.com/",
            headers: &[],
            body: b"",
        };
        let s = sign(&req, &suite_creds(), "us-east-1", "service", suite_time()).unwrap();
        assert_eq!(s.amz_date, "20150830T123600Z");
        assert_eq!(s.host, "example.amazonaws.com");
        assert_eq!(
            s.authorization,
            auth(
                "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
                "host;x-amz-date"
            )
        );
    }

    #[test]
    fn suite_get_vanilla_query_order_key_case() {
        let req = Request {
            method: "GET",
            url: "https://example.amazonaws.com/?Param2=value2&Param1=value1",
            headers: &[],
            body: b"",
        };
        let s = sign(&req, &suite_creds(), "us-east-1", "service", suite_time()).unwrap();
        assert_eq!(
            s.authorization,
            auth(
                "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
                "host;x-amz-date"
            )
        );
    }

    #[test]
    fn suite_post_x_www_form_urlencoded() {
        let req = Request {
            method: "POST",
            url: "https://example.amazonaws.com/",
            headers: &[("Content-Type", "application/x-www-form-urlencoded")],
            body: b"Param1=value1",
        };
        let s = sign(&req, &suite_creds(), "us-east-1", "service", suite_time()).unwrap();
        assert_eq!(
            s.authorization,
            auth(
                "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
                "content-type;host;x-amz-date"
            )
        );
    }

    #[test]
    fn session_token_is_signed_and_port_kept() {
        let creds = Credentials::new("AKIDEXAMPLE", "secret", Some("TOKEN".into()));
        let req = Request {
            method: "POST",
            url: "http://127.0.0.1:4566/",
            headers: &[],
            body: b"{}",
        };
        let s = sign(&req, &creds, "eu-west-1", "kms", suite_time()).unwrap();
        assert_eq!(s.host, "127.0.0.1:4566");
        assert_eq!(s.signed_headers, "host;x-amz-date;x-amz-security-token");
        assert_eq!(s.security_token.as_deref(), Some("TOKEN"));
        assert!(!s.authorization.contains("secret"));
    }

    #[test]
    fn encoding() {
        assert_eq!(uri_encode("a b/c~d*", false), "a%20b%2Fc~d%2A");
        assert_eq!(uri_encode("/x y/", true), "/x%20y/");
        assert_eq!(canonical_query("b=2&a=%2F&a=1"), "a=%2F&a=1&b=2");
    }
}
