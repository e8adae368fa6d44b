//! Operational surfaces: Prometheus metrics, the HTTP health/metrics endpoint and the audit log.
//!
//! Each piece is self-contained; `serve` creates one [`metrics::Metrics`], an optional
//! [`audit::AuditLog`] and an optional [`http`] server, and hands clones to the engine and the gRPC layer.

pub mod audit;
pub mod http;
pub mod metrics;
