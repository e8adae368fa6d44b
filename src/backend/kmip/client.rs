//! KMIP over mutual TLS: a bounded pool of connections, one request in flight per connection.
//!
//! - At most `size` connections; a caller waits for a free one (within its timeout) rather than
//!   opening more. The pool's lock guards only the list of idle connections, never network I/O,
//!   so one slow call holds one connection and nothing else.
//! - A connection that fails in any way (I/O error, timeout, malformed answer) is dropped, never
//!   reused. A request that fails on a reused connection before an answer arrived is sent once
//!   more on a fresh one: the server may have closed an idle connection (every operation the
//!   plugin sends is safe to repeat).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

use super::ttlv::{self, Item};
use crate::backend::BackendError;

type Conn = TlsStream<TcpStream>;

pub struct Pool {
    endpoint: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// How one attempt failed.
enum Failure {
    /// Before any answer byte arrived on a reused connection: worth one fresh attempt.
    Stale(BackendError),
    Final(BackendError),
}

impl Pool {
    pub fn new(
        endpoint: &str,
        tls: rustls::ClientConfig,
        size: usize,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Pool, BackendError> {
        let host = host_of(endpoint)?;
        let server_name = ServerName::try_from(host.to_string()).map_err(|_| {
            BackendError::Config(format!(
                "--kmip-endpoint {endpoint:?}: {host:?} is not a valid host name or IP address"
            ))
        })?;
        Ok(Pool {
            endpoint: endpoint.to_string(),
            server_name,
            connector: TlsConnector::from(Arc::new(tls)),
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(size.max(1)),
            connect_timeout,
            request_timeout,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends one encoded Request Message and returns the decoded Response Message. The whole
    /// call, including waiting for a connection, is bounded by the request timeout.
    pub async fn call(&self, request: &[u8]) -> Result<Item, BackendError> {
        let timeout = self.request_timeout;
        match tokio::time::timeout(timeout, self.call_inner(request)).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Timeout(timeout)),
        }
    }

    async fn call_inner(&self, request: &[u8]) -> Result<Item, BackendError> {
        let _permit =
            self.permits.acquire().await.map_err(|_| {
                BackendError::Unavailable("the KMIP connection pool is closed".into())
            })?;
        let reused = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let (conn, was_reused) = match reused {
            Some(c) => (c, true),
            None => (self.dial().await?, false),
        };
        match self.exchange(conn, request, was_reused).await {
            Ok(answer) => Ok(answer),
            Err(Failure::Final(e)) => Err(e),
            Err(Failure::Stale(e)) => {
                tracing::debug!(error = %e, endpoint = %self.endpoint, "reused KMIP connection failed; redialling once");
                let conn = self.dial().await?;
                match self.exchange(conn, request, false).await {
                    Ok(answer) => Ok(answer),
                    Err(Failure::Final(e) | Failure::Stale(e)) => Err(e),
                }
            }
        }
    }

    async fn dial(&self) -> Result<Conn, BackendError> {
        let connect = async {
            let tcp = TcpStream::connect(&self.endpoint).await.map_err(|e| {
                BackendError::Unavailable(format!(
                    "cannot connect to the KMIP server at {}: {e}",
                    self.endpoint
                ))
            })?;
            let _ = tcp.set_nodelay(true);
            self.connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| {
                    let hint = if crate::backend::tls::is_certificate_error(&e) {
                        " (the server's certificate is not trusted: give its CA with --kmip-ca-file, and connect by a name or IP address the certificate carries)"
                    } else {
                        " (the server may have refused the client certificate: check --kmip-cert-file and that the server trusts its CA)"
                    };
                    BackendError::Unavailable(format!(
                        "TLS handshake with the KMIP server at {} failed: {e}{hint}",
                        self.endpoint
                    ))
                })
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Timeout(self.connect_timeout)),
        }
    }

    async fn exchange(
        &self,
        mut conn: Conn,
        request: &[u8],
        reused: bool,
    ) -> Result<Item, Failure> {
        let io_err = |stage: &str, e: std::io::Error| {
            BackendError::Unavailable(format!(
                "KMIP connection to {} failed while {stage}: {e}",
                self.endpoint
            ))
        };
        if let Err(e) = async {
            conn.write_all(request).await?;
            conn.flush().await
        }
        .await
        {
            let e = io_err("sending the request", e);
            return Err(if reused {
                Failure::Stale(e)
            } else {
                Failure::Final(e)
            });
        }
        let mut header = [0u8; 8];
        if let Err(e) = conn.read_exact(&mut header).await {
            let e = io_err("reading the answer", e);
            return Err(if reused {
                Failure::Stale(e)
            } else {
                Failure::Final(e)
            });
        }
        let total =
            ttlv::message_len(&header).map_err(|e| Failure::Final(super::messages::not_kmip(e)))?;
        // The answer of a Decrypt holds the plaintext: wipe the buffer after decoding.
        let mut buf = Zeroizing::new(vec![0u8; total]);
        buf[..8].copy_from_slice(&header);
        conn.read_exact(&mut buf[8..])
            .await
            .map_err(|e| Failure::Final(io_err("reading the answer", e)))?;
        let item = ttlv::decode(&buf).map_err(|e| Failure::Final(super::messages::not_kmip(e)))?;
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
        Ok(item)
    }
}

/// The host part of `HOST:PORT` or `[V6]:PORT`.
fn host_of(endpoint: &str) -> Result<&str, BackendError> {
    let bad = || {
        BackendError::Config(format!(
            "--kmip-endpoint {endpoint:?} is not HOST:PORT (e.g. kmip.example.com:5696 or [::1]:5696)"
        ))
    };
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err(bad());
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(host_of("kmip.example:5696").unwrap(), "kmip.example");
        assert_eq!(host_of("127.0.0.1:5696").unwrap(), "127.0.0.1");
        assert_eq!(host_of("[::1]:5696").unwrap(), "::1");
        for bad in ["kmip.example", "kmip:x", ":5696", "https://k:1/x:5696"] {
            assert!(host_of(bad).is_err(), "{bad}");
        }
    }
}
