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
use http::{HealthCheck, SocketAlive};
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

/// `/livez`: the gRPC socket accepts connections. Never looks at the backend.
pub fn liveness(listen: &ListenAddr) -> impl HealthCheck {
    match listen {
        ListenAddr::Path(p) => SocketAlive(p.clone()),
        ListenAddr::Abstract(name) => SocketAlive(format!("@{name}").into()),
    }
}
