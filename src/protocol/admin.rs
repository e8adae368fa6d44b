//! kms-plugin's administration service on the KMS socket (proto/admin.proto): operator actions
//! that must reach the running process, with the socket's permissions as the access check.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::engine::Engine;
use crate::proto::admin::admin_server::Admin;
use crate::proto::admin::{
    EscrowBackendHealth, EscrowHealthRequest, EscrowHealthResponse, RetireLocalKekRequest,
    RetireLocalKekResponse,
};

pub struct AdminService {
    engine: Arc<Engine>,
}

impl AdminService {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn retire_local_kek(
        &self,
        _request: Request<RetireLocalKekRequest>,
    ) -> Result<Response<RetireLocalKekResponse>, Status> {
        let retired = self.engine.retire_current_kek().await.unwrap_or_default();
        Ok(Response::new(RetireLocalKekResponse {
            retired_kek: retired,
        }))
    }

    async fn escrow_health(
        &self,
        _request: Request<EscrowHealthRequest>,
    ) -> Result<Response<EscrowHealthResponse>, Status> {
        let escrow = self
            .engine
            .escrow_health()
            .into_iter()
            .map(|(backend, outcome)| EscrowBackendHealth {
                backend: backend.to_string(),
                ok: outcome.is_ok(),
                error: outcome.err().unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(EscrowHealthResponse { escrow }))
    }
}
