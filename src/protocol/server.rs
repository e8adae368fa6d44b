//! The gRPC server: KMS v2, KMS v1beta1 and grpc.health.v1 on one UNIX socket.

use super::admin::AdminService;
use crate::proto::admin::admin_server::AdminServer;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::authority::Limits;
use super::observe::RequestObserver;
use super::socket::{AcceptOptions, BoundSocket, ConnectionInfo, ConnectionStats, Incoming};
use super::v1::V1Service;
use super::v2::{StatusVersion, V2Service};
use crate::engine::Engine;
use crate::proto::v1beta1::key_management_service_server::KeyManagementServiceServer as V1Server;
use crate::proto::v2::key_management_service_server::KeyManagementServiceServer as V2Server;

/// Server settings. The HTTP/2 limits are sized for the one client that matters, a
/// kube-apiserver: a handful of connections, a few concurrent calls each, headers far under 8 KiB
/// (docs/security.md, "HTTP/2 limits").
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub status_version: StatusVersion,
    /// Largest request message accepted. Bigger messages are refused before they are buffered.
    pub max_request_bytes: usize,
    /// How long in-flight calls may take to finish after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// Concurrent requests per connection.
    pub concurrency_per_connection: usize,
    /// Connections open at once; more are closed right after accept and counted.
    pub max_connections: usize,
    /// SETTINGS_MAX_CONCURRENT_STREAMS: streams a client may open at once on one connection.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE: a request with larger headers is answered 431 on its stream.
    pub max_header_list_bytes: u32,
    /// SETTINGS_MAX_FRAME_SIZE (16384, the protocol minimum, is plenty for KMS messages).
    pub max_frame_size: u32,
    /// A new connection must send the HTTP/2 preface within this time.
    pub handshake_timeout: Duration,
    /// A connection with no call for this long is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// HTTP/2 PING interval (`None`: no pings) and how long to wait for the answer.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    /// Streams the server itself may reset for a client's errors (malformed requests) before the
    /// connection is closed with ENHANCE_YOUR_CALM; tonic leaves this unlimited.
    pub max_local_error_resets: usize,
    /// Streams a client opens and resets before they are served (rapid reset, CVE-2023-44487).
    pub max_pending_accept_resets: usize,
    /// Counters of the accept loop and the `:authority` shim, for the metrics.
    pub stats: Arc<ConnectionStats>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            status_version: StatusVersion::V2,
            max_request_bytes: 4 * 1024 * 1024 + 64 * 1024,
            shutdown_timeout: Duration::from_secs(10),
            concurrency_per_connection: 1024,
            max_connections: 128,
            max_concurrent_streams: 128,
            max_header_list_bytes: 16 * 1024,
            max_frame_size: 16 * 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(15 * 60)),
            keepalive_interval: Some(Duration::from_secs(60)),
            keepalive_timeout: Duration::from_secs(20),
            // h2's own defaults, which tonic does not pass on.
            max_local_error_resets: 1024,
            max_pending_accept_resets: 20,
            stats: Arc::default(),
        }
    }
}

impl ServerOptions {
    fn accept_options(&self) -> AcceptOptions {
        AcceptOptions {
            max_connections: self.max_connections,
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
            shim: Limits::for_server(self.max_header_list_bytes, self.max_frame_size),
        }
    }
}

/// Serves until `shutdown` completes, then drains in-flight calls for at most `shutdown_timeout`.
/// The socket is removed when `socket` is dropped at the end.
pub async fn serve(
    engine: Arc<Engine>,
    socket: BoundSocket,
    options: ServerOptions,
    observer: Arc<dyn RequestObserver>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let v2 = V2Server::new(V2Service::new(
        engine.clone(),
        options.status_version,
        observer.clone(),
    ))
    .max_decoding_message_size(options.max_request_bytes);
    let v1 = V1Server::new(V1Service::new(engine.clone(), observer))
        .max_decoding_message_size(options.max_request_bytes);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let health_task = tokio::spawn(report_health(engine.clone(), health_reporter));

    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown_timeout = options.shutdown_timeout;
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing in-flight calls");
        let _ = drain_tx.send(());
    };

    let BoundSocket { listener, addr, .. } = &socket;
    tracing::info!(listen = %addr, max_connections = options.max_connections, "serving KMS v2 and v1beta1");
    // Every connection goes through the :authority shim, so clients that send the socket path as
    // the HTTP/2 authority (kube-apiserver's v1 client, v2 before 1.32) are served.
    let incoming = Incoming::new(
        clone_listener(listener)?,
        options.accept_options(),
        options.stats.clone(),
    );

    let server = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(options.concurrency_per_connection)
        .max_concurrent_streams(options.max_concurrent_streams)
        .http2_max_header_list_size(options.max_header_list_bytes)
        .max_frame_size(options.max_frame_size)
        .http2_keepalive_interval(options.keepalive_interval)
        .http2_keepalive_timeout(Some(options.keepalive_timeout))
        .http2_max_local_error_reset_streams(Some(options.max_local_error_resets))
        .http2_max_pending_accept_reset_streams(Some(options.max_pending_accept_resets))
        .layer(TrackCalls)
        .add_service(health_service)
        .add_service(v2)
        .add_service(v1)
        .add_service(AdminServer::new(AdminService::new(engine.clone())))
        .serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r,
        _ = async {
            let _ = drain_rx.await;
            tokio::time::sleep(shutdown_timeout).await;
        } => {
            tracing::warn!(timeout = ?shutdown_timeout, "in-flight calls did not finish in time; exiting anyway");
            Ok(())
        }
    };
    health_task.abort();
    drop(socket);
    result
}

/// A second handle on the listening socket, so the `BoundSocket` (and its cleanup) outlives the server.
fn clone_listener(
    listener: &tokio::net::UnixListener,
) -> Result<tokio::net::UnixListener, tonic::transport::Error> {
    use std::os::fd::AsFd;
    let fd = listener
        .as_fd()
        .try_clone_to_owned()
        .expect("duplicate listening socket");
    let std_listener = std::os::unix::net::UnixListener::from(fd);
    Ok(tokio::net::UnixListener::from_std(std_listener)
        .expect("register duplicated listening socket"))
}

async fn report_health(engine: Arc<Engine>, reporter: tonic_health::server::HealthReporter) {
    let mut rx = engine.subscribe_health();
    loop {
        let healthy = *rx.borrow_and_update();
        let status = if healthy {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        reporter.set_service_status("", status).await;
        reporter
            .set_service_status("v2.KeyManagementService", status)
            .await;
        reporter
            .set_service_status("v1beta1.KeyManagementService", status)
            .await;
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Marks each call in flight on its connection, so idle connections can be told apart.
#[derive(Clone, Copy, Debug)]
struct TrackCalls;

impl<S> tower::Layer<S> for TrackCalls {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Tracked(inner)
    }
}

#[derive(Clone, Debug)]
struct Tracked<S>(S);

impl<S, B> tower::Service<http::Request<B>> for Tracked<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send + 'static>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<ConnectionInfo>()
            .map(|info| info.activity.call());
        let fut = self.0.call(req);
        Box::pin(async move {
            let result = fut.await;
            drop(guard);
            result
        })
    }
}
