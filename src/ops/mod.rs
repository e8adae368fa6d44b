//! Operational surfaces: Prometheus metrics, the HTTP health/metrics endpoint and the audit log.
//!
//! Each piece is self-contained. [`OpsObserver`] plugs metrics and the audit log into the engine
//! ([`crate::engine::Observer`]) and the gRPC layer ([`RequestObserver`]); [`readiness`] and
//! [`liveness`] give the HTTP endpoint its checks.

pub mod audit;
pub mod http;
pub mod metrics;

use std::sync::Arc;
use std::time::Duration;

use crate::backend::BackendError;
use crate::engine::{self, Engine, Lookup};
use crate::protocol::observe::{RequestObserver, RequestRecord};
use crate::protocol::socket::ListenAddr;
use audit::{AuditEvent, AuditLog, AuditOp};
use http::HealthCheck;
use metrics::{Method, Metrics};

/// Feeds engine and request events into [`Metrics`] and, when enabled, the [`AuditLog`].
#[derive(Clone, Debug)]
pub struct OpsObserver {
    metrics: Metrics,
    audit: Option<AuditLog>,
}

impl OpsObserver {
    pub fn new(metrics: Metrics, audit: Option<AuditLog>) -> Self {
        OpsObserver { metrics, audit }
    }

    fn audit(&self, event: AuditEvent<'_>) {
        if let Some(a) = &self.audit {
            a.record(&event);
        }
    }
}

impl engine::Observer for OpsObserver {
    fn backend_call(
        &self,
        op: engine::BackendOp,
        outcome: Result<(), &BackendError>,
        elapsed: Duration,
    ) {
        self.metrics.backend_call(op.into(), outcome, elapsed);
    }

    fn kek_cache(&self, lookup: Lookup, size: usize) {
        match lookup {
            Lookup::Hit => self.metrics.local_kek_cache_hit(),
            Lookup::Miss => self.metrics.local_kek_cache_miss(),
        }
        self.metrics.set_local_kek_cache_size(size);
    }

    fn kek_created(&self, reference: &str, key_id: &str) {
        self.audit(AuditEvent {
            operation: Some(AuditOp::LocalKekRotation),
            key_id: Some(key_id),
            local_kek: Some(reference),
            backend_call: true,
            outcome: "ok",
            ..Default::default()
        });
    }

    fn kek_retired(&self, reason: engine::RetireReason) {
        self.metrics.local_kek_retired(reason);
    }

    fn key_id_changed(&self, old: Option<&str>, new: &str) {
        self.metrics.key_id_changed();
        self.audit(AuditEvent {
            operation: Some(AuditOp::KeyRotation),
            key_id: Some(new),
            previous_key_id: old,
            backend_call: true,
            outcome: "ok",
            ..Default::default()
        });
    }

    fn probe(&self, _deep: bool, result: Result<(), &str>) {
        self.metrics.probe_result(result.is_ok());
    }
}

impl RequestObserver for OpsObserver {
    fn request(&self, r: &RequestRecord<'_>) {
        if let Some(method) = Method::from_name(r.method) {
            self.metrics.grpc_request(r.api, method, r.code, r.elapsed);
        }
        // Status/Version are polled constantly; only their changes are audited (status_changed).
        let operation = match r.method {
            "Encrypt" => AuditOp::Encrypt,
            "Decrypt" => AuditOp::Decrypt,
            _ => return,
        };
        self.audit(AuditEvent {
            api: Some(r.api),
            operation: Some(operation),
            uid: (!r.uid.is_empty()).then_some(r.uid),
            key_id: r.key_id,
            local_kek: r.kek_ref,
            backend_call: r.backend_call,
            outcome: r.error.unwrap_or("ok"),
            latency: Some(r.elapsed),
            ..Default::default()
        });
    }

    fn status_changed(&self, healthz: &str, key_id: &str) {
        let ok = healthz == "ok";
        self.audit(AuditEvent {
            api: Some(engine::Api::V2),
            operation: Some(AuditOp::StatusChange),
            key_id: (!key_id.is_empty()).then_some(key_id),
            outcome: if ok { "ok" } else { "unhealthy" },
            detail: (!ok).then_some(healthz),
            ..Default::default()
        });
    }
}

/// `/readyz` and `/healthz`: what Status would answer (fresh successful probe, key not revoked).
pub fn readiness(engine: Arc<Engine>) -> impl HealthCheck {
    move || {
        let status = engine.status();
        if status.is_ok() {
            Ok(())
        } else {
            Err(status.healthz)
        }
    }
}

/// `/livez`: the gRPC server on the plugin socket answers a `grpc.health.v1` Check. Any answer counts,
/// `NOT_SERVING` included: liveness never depends on the key backend.
pub fn liveness(listen: &ListenAddr) -> impl HealthCheck {
    GrpcAlive(listen.clone())
}

/// See [`liveness`]. Catches a deleted or stale socket and a wedged server, not just a dead process.
#[derive(Clone, Debug)]
pub struct GrpcAlive(pub ListenAddr);

/// A liveness check must answer well within the kubelet's probe timeout.
const GRPC_ALIVE_TIMEOUT: Duration = Duration::from_millis(1500);

#[async_trait::async_trait]
impl HealthCheck for GrpcAlive {
    async fn check(&self) -> Result<(), String> {
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
        let attempt = async {
            let channel = crate::cli::client::connect(&self.0)
                .await
                .map_err(|e| format!("{e:#}"))?;
            let mut req = tonic::Request::new(HealthCheckRequest {
                service: String::new(),
            });
            req.set_timeout(GRPC_ALIVE_TIMEOUT);
            match HealthClient::new(channel).check(req).await {
                Ok(_) => Ok(()),
                // The server answered, just not with a health status: it is alive.
                Err(s)
                    if matches!(s.code(), tonic::Code::NotFound | tonic::Code::Unimplemented) =>
                {
                    Ok(())
                }
                Err(s) => Err(format!("{}: {}", s.code(), s.message())),
            }
        };
        match tokio::time::timeout(GRPC_ALIVE_TIMEOUT, attempt).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("gRPC server on {} does not answer: {e}", self.0)),
            Err(_) => Err(format!(
                "gRPC server on {} did not answer within {GRPC_ALIVE_TIMEOUT:?}",
                self.0
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grpc_alive_needs_an_answering_server_not_a_healthy_backend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.sock");
        let check = GrpcAlive(ListenAddr::Path(path.clone()));
        let err = check.check().await.unwrap_err();
        assert!(err.contains("kms.sock"), "{err}");

        // A server that reports NOT_SERVING is still alive.
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    async {
                        let _ = stop_rx.await;
                    },
                ),
        );
        assert_eq!(check.check().await, Ok(()));
        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
        // Socket file left behind, nobody serving: not alive.
        assert!(check.check().await.is_err());

        // Something that accepts connections but never speaks gRPC: not alive either.
        let _ = std::fs::remove_file(&path);
        let _mute = tokio::net::UnixListener::bind(&path).unwrap();
        let err = check.check().await.unwrap_err();
        assert!(
            err.contains("did not answer") || err.contains("does not answer"),
            "{err}"
        );
    }
}
