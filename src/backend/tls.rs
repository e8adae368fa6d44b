//! TLS trust for every HTTPS backend (Akeyless, AWS KMS): one place that decides which servers the
//! plugin believes.
//!
//! Roots, in this order:
//! - `SSL_CERT_FILE` / `SSL_CERT_DIR` when set (OpenSSL's variables, as the official SDKs honour them):
//!   only those, so an operator can narrow trust;
//! - otherwise the system trust store; an image without one (scratch, distroless/static) falls back
//!   to the bundled Mozilla roots so the public SaaS still works;
//! - plus the backend's own CA bundle (`--akeyless-ca-file`), always.
//!
//! A client certificate is optional, for gateways behind mutual TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pki_types::pem::PemObject;
use pki_types::{CertificateDer, PrivateKeyDer};

use super::BackendError;

/// The trust options of one backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM bundle of extra CA certificates (a private gateway's CA).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub client_key_file: Option<PathBuf>,
}

/// The option names errors should mention, e.g. `--akeyless-ca-file`.
#[derive(Clone, Copy, Debug)]
pub struct TlsFlags {
    pub ca_file: &'static str,
    pub client_cert_file: &'static str,
    pub client_key_file: &'static str,
}

/// Where the roots came from, for the start-up log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootSource {
    /// `SSL_CERT_FILE` / `SSL_CERT_DIR`.
    Environment,
    /// The operating system's store.
    System,
    /// The bundled Mozilla roots (no system store found).
    Bundled,
}

fn config_err(msg: String) -> BackendError {
    BackendError::Config(msg)
}

fn read_pem(path: &Path, what: &str, flag: &str) -> Result<Vec<u8>, BackendError> {
    std::fs::read(path).map_err(|e| {
        config_err(format!(
            "cannot read the {what} {} ({flag}): {e}",
            path.display()
        ))
    })
}

/// Every certificate of a PEM bundle; an unreadable file, a file with no certificate, or a
/// certificate rustls rejects is an error naming the file and the option.
fn certs_from_file(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, BackendError> {
    let pem = read_pem(path, "CA bundle", flag)?;
    let mut out = Vec::new();
    for item in CertificateDer::pem_slice_iter(&pem) {
        out.push(item.map_err(|e| {
            config_err(format!(
                "{} ({flag}) is not a valid PEM certificate bundle: {e}",
                path.display()
            ))
        })?);
    }
    if out.is_empty() {
        return Err(config_err(format!(
            "{} ({flag}) holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(out)
}

/// The root store for `opts` and where its base came from.
pub fn root_store(
    opts: &TlsOptions,
    flags: &TlsFlags,
) -> Result<(rustls::RootCertStore, RootSource), BackendError> {
    let mut roots = rustls::RootCertStore::empty();
    let from_env = std::env::var_os("SSL_CERT_FILE").is_some_and(|v| !v.is_empty())
        || std::env::var_os("SSL_CERT_DIR").is_some_and(|v| !v.is_empty());
    let native = rustls_native_certs::load_native_certs();
    if from_env && !native.errors.is_empty() {
        // The operator pointed at a file that does not work: say so rather than trust less silently.
        return Err(config_err(format!(
            "cannot load the certificates named by SSL_CERT_FILE/SSL_CERT_DIR: {}",
            native
                .errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    let source = if from_env {
        RootSource::Environment
    } else if added > 0 {
        RootSource::System
    } else {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        RootSource::Bundled
    };
    if let Some(path) = &opts.ca_file {
        for cert in certs_from_file(path, flags.ca_file)? {
            roots.add(cert).map_err(|e| {
                config_err(format!(
                    "{} ({}) holds a certificate that cannot be a trust anchor: {e}",
                    path.display(),
                    flags.ca_file
                ))
            })?;
        }
    }
    Ok((roots, source))
}

/// A rustls client configuration for `opts`.
pub fn client_config(
    opts: &TlsOptions,
    flags: &TlsFlags,
) -> Result<(rustls::ClientConfig, RootSource), BackendError> {
    let (roots, source) = root_store(opts, flags)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err(format!("TLS set-up failed: {e}")))?
        .with_root_certificates(roots);
    let config = match (&opts.client_cert_file, &opts.client_key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = certs_from_file(cert, flags.client_cert_file)?;
            let pem = zeroize::Zeroizing::new(read_pem(key, "client key", flags.client_key_file)?);
            let key_der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
                config_err(format!(
                    "{} ({}) is not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                    key.display(),
                    flags.client_key_file
                ))
            })?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                config_err(format!(
                    "the client certificate {} and key {} do not form a usable pair: {e}",
                    cert.display(),
                    key.display()
                ))
            })?
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(config_err(format!(
                "mutual TLS needs both {} and {}",
                flags.client_cert_file, flags.client_key_file
            )))
        }
    };
    Ok((config, source))
}

/// True when `err` (any error chain from an HTTPS client) is a failed server certificate check,
/// i.e. the trust configuration, not the network, is what stops the connection.
pub fn is_certificate_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return matches!(r, rustls::Error::InvalidCertificate(_));
        }
        // io::Error hides its payload from source(); look inside.
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                    return matches!(r, rustls::Error::InvalidCertificate(_));
                }
            }
        }
        // Connectors box errors in ways a downcast cannot see through; rustls's own wording for
        // this variant is the fallback.
        if e.to_string().starts_with("invalid peer certificate") {
            return true;
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAGS: TlsFlags = TlsFlags {
        ca_file: "--x-ca-file",
        client_cert_file: "--x-cert",
        client_key_file: "--x-key",
    };

    #[test]
    fn bad_ca_files_are_named_with_their_option() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let opts = TlsOptions {
            ca_file: Some(missing.clone()),
            ..Default::default()
        };
        let e = root_store(&opts, &FLAGS).unwrap_err().to_string();
        assert!(
            e.contains("--x-ca-file") && e.contains("missing.pem"),
            "{e}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let opts = TlsOptions {
            ca_file: Some(junk),
            ..Default::default()
        };
        let e = root_store(&opts, &FLAGS).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        let bad = dir.path().join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let opts = TlsOptions {
            ca_file: Some(bad),
            ..Default::default()
        };
        assert!(root_store(&opts, &FLAGS).is_err());
    }

    #[test]
    fn client_cert_needs_both_halves() {
        let opts = TlsOptions {
            client_cert_file: Some("/nonexistent".into()),
            ..Default::default()
        };
        let e = client_config(&opts, &FLAGS).unwrap_err().to_string();
        assert!(e.contains("--x-cert") && e.contains("--x-key"), "{e}");
    }
}
