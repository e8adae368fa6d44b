//! The `--http ADDR` endpoint: `/livez`, `/readyz`, `/healthz` and `/metrics`.
//!
//! - `/livez` says the process and its gRPC socket are alive. It never looks at the key backend, so a
//!   KMS outage or a revoked permission never makes a liveness probe restart-loop the plugin.
//! - `/readyz` and `/healthz` run the readiness check (fresh, successful backend probe); a failure
//!   answers 503 with the reason in the body.
//! - `/metrics` serves [`Metrics::encode`].
//!
//! Checks run with a deadline so a wedged check answers 503 instead of hanging the kubelet's probe.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::metrics::{Metrics, CONTENT_TYPE as METRICS_CONTENT_TYPE};

/// Longest a health check may take before the endpoint answers 503.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Slow clients get this long to send their request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections are given this long to finish after shutdown was requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// More simultaneous connections than this are refused (the endpoint serves probes and a scraper).
const MAX_CONNECTIONS: usize = 128;

/// A health check: `Ok(())` when healthy, otherwise the reason (shown in the response body, so it
/// must not contain secrets).
#[async_trait]
pub trait HealthCheck: Send + Sync + 'static {
    async fn check(&self) -> Result<(), String>;
}

#[async_trait]
impl<F> HealthCheck for F
where
    F: Fn() -> Result<(), String> + Send + Sync + 'static,
{
    async fn check(&self) -> Result<(), String> {
        self()
    }
}

/// Liveness of the gRPC listener: a connection to its UNIX socket is accepted. Catches a deleted or
/// stale socket file, which is what leaves the apiserver waiting forever. `@name` is an abstract socket.
#[derive(Clone, Debug)]
pub struct SocketAlive(pub PathBuf);

#[async_trait]
impl HealthCheck for SocketAlive {
    async fn check(&self) -> Result<(), String> {
        let path = self.0.clone();
        let shown = path.display().to_string();
        let r = match shown.strip_prefix('@') {
            Some(name) => {
                let name = name.to_owned();
                tokio::task::spawn_blocking(move || {
                    use std::os::linux::net::SocketAddrExt;
                    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                    std::os::unix::net::UnixStream::connect_addr(&addr).map(drop)
                })
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e.to_string())))
            }
            None => tokio::net::UnixStream::connect(&path).await.map(drop),
        };
        r.map_err(|e| format!("gRPC socket {shown} does not accept connections: {e}"))
    }
}

/// What the endpoint serves.
#[derive(Clone)]
pub struct HttpState {
    pub live: Arc<dyn HealthCheck>,
    pub ready: Arc<dyn HealthCheck>,
    pub metrics: Option<Metrics>,
    /// Extra lines for `/readyz?verbose` that never change the status code (escrow health).
    pub ready_detail: Option<Arc<dyn Fn() -> String + Send + Sync>>,
}

impl HttpState {
    pub fn new(live: impl HealthCheck, ready: impl HealthCheck, metrics: Option<Metrics>) -> Self {
        HttpState {
            live: Arc::new(live),
            ready: Arc::new(ready),
            metrics,
            ready_detail: None,
        }
    }

    /// Adds the `/readyz?verbose` detail lines.
    pub fn with_ready_detail(
        mut self,
        detail: impl Fn() -> String + Send + Sync + 'static,
    ) -> Self {
        self.ready_detail = Some(Arc::new(detail));
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on --http {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Binds the listener (separately from [`serve`] so start-up fails early on a busy port and tests can
/// use port 0).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// First and longest pause of the accept loop after an accept error (EMFILE and the like).
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Serves until `shutdown` completes, then stops accepting, lets open requests finish (up to a few
/// seconds) and returns.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut accept_pause: Option<Duration> = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            // Reap finished connections so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(a) => {
                        accept_pause = None;
                        a
                    }
                    Err(e) => {
                        // E.g. EMFILE: pause, doubling up to a second, and say so once per
                        // episode instead of ten times a second.
                        let pause = match accept_pause {
                            None => {
                                tracing::warn!(error = %e, "http accept failed; pausing accept (out of file descriptors? raise LimitNOFILE)");
                                ACCEPT_PAUSE_MIN
                            }
                            Some(p) => {
                                tracing::debug!(error = %e, "http accept still failing");
                                (p * 2).min(ACCEPT_PAUSE_MAX)
                            }
                        };
                        accept_pause = Some(pause);
                        tokio::select! {
                            _ = &mut shutdown => break,
                            _ = tokio::time::sleep(pause) => {}
                        }
                        continue;
                    }
                };
                if conns.len() >= MAX_CONNECTIONS {
                    drop(stream);
                    continue;
                }
                let state = state.clone();
                let mut stop_rx = stop_rx.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(route(&state, req).await) }
                    });
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = async { stop_rx.wait_for(|s| *s).await.map(drop) } => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        conns.abort_all();
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

async fn run_check(check: &dyn HealthCheck, what: &str) -> Response<Full<Bytes>> {
    let (code, body) = check_outcome(check, what).await;
    text(code, body)
}

async fn check_outcome(check: &dyn HealthCheck, what: &str) -> (StatusCode, String) {
    match tokio::time::timeout(CHECK_TIMEOUT, check.check()).await {
        Ok(Ok(())) => (StatusCode::OK, "ok\n".to_string()),
        Ok(Err(reason)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{what} check failed: {reason}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{what} check timed out after {CHECK_TIMEOUT:?}\n"),
        ),
    }
}

async fn route(state: &HttpState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/livez" => run_check(state.live.as_ref(), "liveness").await,
        "/readyz" | "/healthz" => {
            let (code, mut body) = check_outcome(state.ready.as_ref(), "readiness").await;
            let verbose = req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|p| p == "verbose"));
            if let (true, Some(detail)) = (verbose, &state.ready_detail) {
                body.push_str(&detail());
            }
            text(code, body)
        }
        "/metrics" => match &state.metrics {
            Some(m) => {
                let mut r = text(StatusCode::OK, m.encode());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(METRICS_CONTENT_TYPE),
                );
                r
            }
            None => text(StatusCode::NOT_FOUND, "metrics disabled\n"),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /livez, /readyz, /healthz or /metrics\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let (head, body) = buf.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_owned(), body.to_owned())
    }

    struct Slow;
    #[async_trait]
    impl HealthCheck for Slow {
        async fn check(&self) -> Result<(), String> {
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn endpoints_answer_with_correct_codes() {
        let ready = Arc::new(AtomicBool::new(false));
        let r2 = ready.clone();
        let metrics = Metrics::new();
        metrics.grpc_request(
            super::super::metrics::Api::V2,
            super::super::metrics::Method::Encrypt,
            tonic::Code::Ok,
            Duration::from_millis(1),
        );
        let state = HttpState::new(
            || Ok(()),
            move || {
                if r2.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("backend probe failed: timeout".into())
                }
            },
            Some(metrics),
        );
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, state, async {
            let _ = rx.await;
        }));

        assert_eq!(get(addr, "GET", "/livez").await.0, 200);
        let (code, _, body) = get(addr, "GET", "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("backend probe failed: timeout"), "{body}");
        assert_eq!(get(addr, "GET", "/healthz").await.0, 503);
        ready.store(true, Ordering::SeqCst);
        let (code, _, body) = get(addr, "GET", "/readyz").await;
        assert_eq!((code, body.as_str()), (200, "ok\n"));
        assert_eq!(get(addr, "GET", "/healthz").await.0, 200);
        assert_eq!(get(addr, "HEAD", "/livez").await.0, 200);
        assert_eq!(get(addr, "GET", "/nope").await.0, 404);
        assert_eq!(get(addr, "POST", "/livez").await.0, 405);
        let (code, head, body) = get(addr, "GET", "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        assert!(
            body.contains(
                r#"kms_plugin_grpc_requests_total{api="v2",method="Encrypt",code="OK"} 1"#
            ),
            "{body}"
        );

        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "listener still open after shutdown"
        );
    }

    #[tokio::test]
    async fn wedged_check_times_out_with_503() {
        let state = HttpState::new(|| Ok(()), Slow, None);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, state, async {
            let _ = rx.await;
        }));
        let (code, _, body) = get(addr, "GET", "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("timed out"), "{body}");
        assert_eq!(get(addr, "GET", "/metrics").await.0, 404);
        tx.send(()).unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_lets_an_open_keepalive_connection_go() {
        let state = HttpState::new(|| Ok(()), || Ok(()), None);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, state, async {
            let _ = rx.await;
        }));
        // An idle keep-alive connection must not hold shutdown up for the whole grace period.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.unwrap();
        assert!(std::str::from_utf8(&buf[..n])
            .unwrap()
            .starts_with("HTTP/1.1 200"));
        let started = std::time::Instant::now();
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
        assert!(
            started.elapsed() < SHUTDOWN_GRACE,
            "idle connection delayed shutdown"
        );
        // The server closed the idle connection.
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn socket_alive_checks_the_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.sock");
        let check = SocketAlive(path.clone());
        let err = check.check().await.unwrap_err();
        assert!(err.contains("kms.sock"), "{err}");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        assert_eq!(check.check().await, Ok(()));
        // A stale socket file with nobody listening is not alive.
        drop(listener);
        assert!(path.exists());
        assert!(check.check().await.is_err());
    }
}
