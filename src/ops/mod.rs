//! Operational surfaces: Prometheus metrics, the HTTP health/metrics endpoint and the audit log.
//!
//! Each piece is self-contained. [`OpsObserver`] plugs metrics and the audit log into the engine
//! ([`crate::engine::Observer`]), the gRPC layer ([`RequestObserver`]) and the key backend's own
//! authentication events ([`BackendEvents`]); [`readiness`] and
//! [`liveness`] give the HTTP endpoint its checks.

pub mod audit;
pub mod http;
pub mod metrics;

use std::sync::Arc;
use std::time::Duration;

use crate::backend::{AuthEvent, AuthKind, BackendError, BackendEvents};
use crate::engine::{self, Engine, Lookup};
use crate::protocol::observe::{RequestObserver, RequestRecord};
use crate::protocol::socket::ListenAddr;
use audit::{AuditEvent, AuditLog, AuditOp};
use http::HealthCheck;
use metrics::{Method, Metrics, TokenKind};

/// Feeds engine, request and backend events into [`Metrics`] and, when enabled, the [`AuditLog`].
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

    fn legacy_decrypt(&self, ok: bool) {
        self.metrics.legacy_decrypt(ok);
    }

    fn escrow_wrap(&self, escrow: &str, outcome: Result<(), &BackendError>) {
        self.metrics.escrow_wrap(escrow, outcome);
    }

    fn escrow_unwrap(
        &self,
        escrow: &str,
        kek_ref: &str,
        primary_error: &str,
        outcome: Result<(), &BackendError>,
    ) {
        self.metrics.escrow_unwrap(escrow, outcome);
        let detail = match outcome {
            Ok(()) => format!("primary could not unwrap: {primary_error}"),
            Err(e) => format!("primary could not unwrap: {primary_error}; escrow: {e}"),
        };
        self.audit(AuditEvent {
            operation: Some(AuditOp::EscrowUnwrap),
            backend: Some(escrow),
            local_kek: Some(kek_ref),
            backend_call: true,
            outcome: outcome.err().map_or("ok", BackendError::label),
            detail: Some(&detail),
            ..Default::default()
        });
    }

    fn key_health_changed(&self, key_ref: &str, health: &engine::KeyHealth) {
        self.metrics.key_state_changed(health.as_str());
        let detail = match health {
            engine::KeyHealth::Active => None,
            engine::KeyHealth::Suspect(r) | engine::KeyHealth::Revoked(r) => Some(r.as_str()),
        };
        self.audit(AuditEvent {
            operation: Some(AuditOp::KeyState),
            key_ref: Some(key_ref),
            outcome: health.as_str(),
            detail,
            ..Default::default()
        });
    }
}

impl BackendEvents for OpsObserver {
    fn auth(&self, event: AuthEvent<'_>) {
        let (token, operation) = match event.kind {
            AuthKind::Login => (TokenKind::Access, AuditOp::Auth),
            AuthKind::TokenRefresh => (TokenKind::Access, AuditOp::TokenRefresh),
            AuthKind::IdentityRotation => (TokenKind::Identity, AuditOp::IdentityRotation),
        };
        self.metrics.token_refresh(token, event.outcome);
        // BackendError messages carry no secrets (Backend contract); they tell the operator why.
        let detail = event.outcome.err().map(|e| e.to_string());
        self.audit(AuditEvent {
            operation: Some(operation),
            backend: Some(event.backend),
            backend_call: true,
            outcome: event.outcome.err().map_or("ok", BackendError::label),
            detail: detail.as_deref(),
            ..Default::default()
        });
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

/// `/readyz?verbose` detail: one line per escrow backend. Escrow health never changes readiness.
pub fn escrow_detail(engine: &Engine) -> String {
    engine
        .escrow_health()
        .into_iter()
        .map(|(kind, outcome)| match outcome {
            Ok(()) => format!("escrow {kind}: ok\n"),
            Err(e) => format!("escrow {kind}: {e}\n"),
        })
        .collect()
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

    #[test]
    fn backend_auth_events_feed_metrics_and_audit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let metrics = Metrics::new();
        let audit = AuditLog::open(audit::AuditTarget::File(path.clone()), None).unwrap();
        let ops = OpsObserver::new(metrics.clone(), Some(audit.clone()));
        let denied = BackendError::Authentication("access denied".into());
        for (kind, outcome) in [
            (AuthKind::Login, Ok(())),
            (AuthKind::TokenRefresh, Ok(())),
            (AuthKind::Login, Err(&denied)),
            (AuthKind::IdentityRotation, Ok(())),
        ] {
            ops.auth(AuthEvent {
                backend: "akeyless",
                kind,
                outcome,
            });
        }
        let text = metrics.encode();
        for series in [
            r#"kms_plugin_token_refreshes_total{kind="access",outcome="ok"} 2"#,
            r#"kms_plugin_token_refreshes_total{kind="access",outcome="authentication"} 1"#,
            r#"kms_plugin_token_refreshes_total{kind="identity",outcome="ok"} 1"#,
        ] {
            assert!(text.contains(series), "missing {series}\n{text}");
        }
        audit.flush().unwrap();
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let got: Vec<(&str, &str)> = lines
            .iter()
            .map(|l| {
                assert_eq!(l["backend"], "akeyless", "{l}");
                assert_eq!(l["backend_call"], true, "{l}");
                assert!(l.get("api").is_none() && l.get("key_id").is_none(), "{l}");
                (
                    l["operation"].as_str().unwrap(),
                    l["outcome"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("auth", "ok"),
                ("token_refresh", "ok"),
                ("auth", "authentication"),
                ("identity_rotation", "ok"),
            ]
        );
        assert!(lines[0].get("detail").is_none());
        assert!(lines[2]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("access denied")));
    }

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
