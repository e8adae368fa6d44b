//! The gRPC server: KMS v2, KMS v1beta1 and grpc.health.v1 on one UNIX socket.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::StreamExt;

use super::observe::RequestObserver;
use super::socket::BoundSocket;
use super::v1::V1Service;
use super::v2::{StatusVersion, V2Service};
use crate::engine::Engine;
use crate::proto::v1beta1::key_management_service_server::KeyManagementServiceServer as V1Server;
use crate::proto::v2::key_management_service_server::KeyManagementServiceServer as V2Server;

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub status_version: StatusVersion,
    /// Largest request message accepted. Bigger messages are refused before they are buffered.
    pub max_request_bytes: usize,
    /// How long in-flight calls may take to finish after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// Concurrent requests per connection.
    pub concurrency_per_connection: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            status_version: StatusVersion::V2,
            max_request_bytes: 4 * 1024 * 1024 + 64 * 1024,
            shutdown_timeout: Duration::from_secs(10),
            concurrency_per_connection: 1024,
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
    tracing::info!(listen = %addr, "serving KMS v2 and v1beta1");
    // Every connection goes through the :authority shim, so clients that send the socket path as
    // the HTTP/2 authority (kube-apiserver's v1 client, v2 before 1.32) are served.
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(clone_listener(listener)?)
        .map(|conn| conn.map(super::authority::AuthorityShim::new));

    let server = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(options.concurrency_per_connection)
        .add_service(health_service)
        .add_service(v2)
        .add_service(v1)
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
