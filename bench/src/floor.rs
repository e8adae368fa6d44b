//! The floor: the cheapest possible KMS server built like the plugin (same tonic, same UNIX socket
//! code, same server settings, same logging set-up, same router with the health service), whose
//! handlers return their input. The gap between it and the plugin is what the plugin itself costs.

use std::os::fd::AsFd;
use std::sync::Arc;

use kms_plugin::proto::v1beta1::key_management_service_server::{
    KeyManagementService as V1Kms, KeyManagementServiceServer as V1Server,
};
use kms_plugin::proto::v2::key_management_service_server::{
    KeyManagementService as V2Kms, KeyManagementServiceServer as V2Server,
};
use kms_plugin::proto::{v1beta1, v2};
use kms_plugin::protocol::server::ServerOptions;
use kms_plugin::protocol::socket::{self, ListenAddr, SocketOptions};
use tonic::{Request, Response, Status};

pub const FLOOR_KEY_ID: &str = "floor:key-1";

struct EchoV2;

#[tonic::async_trait]
impl V2Kms for EchoV2 {
    async fn status(
        &self,
        _r: Request<v2::StatusRequest>,
    ) -> Result<Response<v2::StatusResponse>, Status> {
        Ok(Response::new(v2::StatusResponse {
            version: "v2".into(),
            healthz: "ok".into(),
            key_id: FLOOR_KEY_ID.into(),
        }))
    }

    async fn encrypt(
        &self,
        r: Request<v2::EncryptRequest>,
    ) -> Result<Response<v2::EncryptResponse>, Status> {
        Ok(Response::new(v2::EncryptResponse {
            ciphertext: r.into_inner().plaintext,
            key_id: FLOOR_KEY_ID.into(),
            annotations: Default::default(),
        }))
    }

    async fn decrypt(
        &self,
        r: Request<v2::DecryptRequest>,
    ) -> Result<Response<v2::DecryptResponse>, Status> {
        Ok(Response::new(v2::DecryptResponse {
            plaintext: r.into_inner().ciphertext,
        }))
    }
}

struct EchoV1;

#[tonic::async_trait]
impl V1Kms for EchoV1 {
    async fn version(
        &self,
        _r: Request<v1beta1::VersionRequest>,
    ) -> Result<Response<v1beta1::VersionResponse>, Status> {
        Ok(Response::new(v1beta1::VersionResponse {
            version: "v1beta1".into(),
            runtime_name: "floor".into(),
            runtime_version: "0.1.0".into(),
        }))
    }

    async fn encrypt(
        &self,
        r: Request<v1beta1::EncryptRequest>,
    ) -> Result<Response<v1beta1::EncryptResponse>, Status> {
        Ok(Response::new(v1beta1::EncryptResponse {
            cipher: r.into_inner().plain,
        }))
    }

    async fn decrypt(
        &self,
        r: Request<v1beta1::DecryptRequest>,
    ) -> Result<Response<v1beta1::DecryptResponse>, Status> {
        Ok(Response::new(v1beta1::DecryptResponse {
            plain: r.into_inner().cipher,
        }))
    }
}

/// Runs the floor server until SIGTERM/SIGINT. Mirrors `kms-plugin serve`: multi-thread runtime with
/// default workers, an info-level fmt subscriber on stderr, the plugin's socket binding and server options.
pub fn run(listen: ListenAddr) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let options = ServerOptions::default();
        let bound = socket::bind(&listen, &SocketOptions::default())?;
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        // A second handle on the socket, as the plugin's server does, so `bound` keeps its cleanup.
        let fd = bound.listener.as_fd().try_clone_to_owned()?;
        let listener =
            tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let v2 = V2Server::from_arc(Arc::new(EchoV2))
            .max_decoding_message_size(options.max_request_bytes);
        let v1 = V1Server::from_arc(Arc::new(EchoV1))
            .max_decoding_message_size(options.max_request_bytes);
        tracing::info!(listen = %listen, "floor serving");
        tonic::transport::Server::builder()
            .concurrency_limit_per_connection(options.concurrency_per_connection)
            .add_service(health)
            .add_service(v2)
            .add_service(v1)
            .serve_with_incoming_shutdown(incoming, terminated())
            .await?;
        drop(bound);
        anyhow::Ok(())
    })
}

async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
