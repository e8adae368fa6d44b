//! KMS v2: Status, Encrypt, Decrypt.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::observe::{RequestObserver, RequestRecord};
use super::{deadline, errors};
use crate::engine::{Api, Binding, Engine, EngineError};
use crate::proto::v2::key_management_service_server::KeyManagementService;
use crate::proto::v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};

/// Ciphertext and key_id limits checked by the apiserver.
pub const MAX_CIPHERTEXT: usize = 1024;
pub const MAX_KEY_ID: usize = 1024;

/// What `StatusResponse.version` says: `v2` (Kubernetes 1.29+) or `v2beta1` (1.27-1.28).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusVersion {
    V2,
    V2beta1,
}

impl StatusVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusVersion::V2 => "v2",
            StatusVersion::V2beta1 => "v2beta1",
        }
    }
}

pub struct V2Service {
    engine: Arc<Engine>,
    version: StatusVersion,
    observer: Arc<dyn RequestObserver>,
    last_status: std::sync::Mutex<(String, String)>,
}

impl V2Service {
    pub fn new(
        engine: Arc<Engine>,
        version: StatusVersion,
        observer: Arc<dyn RequestObserver>,
    ) -> Self {
        V2Service {
            engine,
            version,
            observer,
            last_status: Default::default(),
        }
    }
}

/// Runs an engine call within the request's deadline.
pub(super) async fn within<T>(
    budget: std::time::Duration,
    fut: impl std::future::Future<Output = Result<T, EngineError>>,
) -> Result<T, EngineError> {
    tokio::time::timeout(budget, fut)
        .await
        .unwrap_or(Err(EngineError::DeadlineExceeded(budget)))
}

#[tonic::async_trait]
impl KeyManagementService for V2Service {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let started = Instant::now();
        let status = self.engine.status();
        {
            let mut last = self.last_status.lock().unwrap();
            if last.0 != status.healthz || last.1 != status.key_id {
                *last = (status.healthz.clone(), status.key_id.clone());
                self.observer
                    .status_changed(&status.healthz, &status.key_id);
            }
        }
        // Counted for metrics (the apiserver's polling rate); the audit log records only changes.
        self.observer.request(&RequestRecord {
            api: Api::V2,
            method: "Status",
            uid: "",
            code: tonic::Code::Ok,
            elapsed: started.elapsed(),
            key_id: (!status.key_id.is_empty()).then_some(status.key_id.as_str()),
            kek_ref: None,
            backend_call: false,
            error: None,
        });
        Ok(Response::new(StatusResponse {
            version: self.version.as_str().to_string(),
            healthz: status.healthz,
            key_id: status.key_id,
        }))
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let started = Instant::now();
        let budget = deadline::budget(request.metadata());
        let req = request.into_inner();
        let result = within(budget, self.engine.encrypt(&req.plaintext, Api::V2)).await.and_then(|sealed| {
            if sealed.ciphertext.len() > MAX_CIPHERTEXT {
                return Err(EngineError::Internal(format!(
                    "ciphertext would be {} bytes, over the apiserver's {MAX_CIPHERTEXT}-byte limit; the backend's wrapped key is too large",
                    sealed.ciphertext.len()
                )));
            }
            Ok(sealed)
        });
        let record = |code, key_id, kek_ref, backend_call, error| RequestRecord {
            api: Api::V2,
            method: "Encrypt",
            uid: &req.uid,
            code,
            elapsed: started.elapsed(),
            key_id,
            kek_ref,
            backend_call,
            error,
        };
        match result {
            Ok(sealed) => {
                tracing::debug!(uid = %req.uid, key_id = %sealed.key_id, kek = %sealed.kek_ref, "v2 encrypt");
                self.observer.request(&record(
                    tonic::Code::Ok,
                    Some(&sealed.key_id),
                    Some(&sealed.kek_ref),
                    sealed.backend_call,
                    None,
                ));
                Ok(Response::new(EncryptResponse {
                    ciphertext: sealed.ciphertext,
                    key_id: sealed.key_id,
                    annotations: Default::default(),
                }))
            }
            Err(e) => {
                let status = errors::to_status(&e);
                tracing::warn!(uid = %req.uid, code = ?status.code(), error = %e, "v2 encrypt failed");
                self.observer
                    .request(&record(status.code(), None, None, false, Some(e.label())));
                Err(status)
            }
        }
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let started = Instant::now();
        let budget = deadline::budget(request.metadata());
        let req = request.into_inner();
        let result = if req.ciphertext.is_empty() {
            Err(EngineError::InvalidInput("ciphertext is empty".into()))
        } else if req.ciphertext.len() > MAX_CIPHERTEXT {
            Err(EngineError::InvalidInput(format!(
                "ciphertext is {} bytes; KMS v2 ciphertexts are at most {MAX_CIPHERTEXT}",
                req.ciphertext.len()
            )))
        } else if req.key_id.len() > MAX_KEY_ID {
            Err(EngineError::InvalidInput(format!(
                "key_id is {} bytes; the limit is {MAX_KEY_ID}",
                req.key_id.len()
            )))
        } else {
            within(
                budget,
                self.engine.decrypt(
                    &req.ciphertext,
                    Binding::V2 {
                        key_id: &req.key_id,
                    },
                ),
            )
            .await
        };
        let key_id = (!req.key_id.is_empty() && req.key_id.len() <= MAX_KEY_ID)
            .then_some(req.key_id.as_str());
        match result {
            Ok(opened) => {
                tracing::debug!(uid = %req.uid, key_id = %req.key_id, kek = %opened.kek_ref, backend_call = opened.backend_call, "v2 decrypt");
                self.observer.request(&RequestRecord {
                    api: Api::V2,
                    method: "Decrypt",
                    uid: &req.uid,
                    code: tonic::Code::Ok,
                    elapsed: started.elapsed(),
                    key_id,
                    kek_ref: Some(&opened.kek_ref),
                    backend_call: opened.backend_call,
                    error: None,
                });
                Ok(Response::new(DecryptResponse {
                    plaintext: opened.plaintext.to_vec(),
                }))
            }
            Err(e) => {
                let status = errors::to_status(&e);
                tracing::warn!(uid = %req.uid, code = ?status.code(), error = %e, "v2 decrypt failed");
                self.observer.request(&RequestRecord {
                    api: Api::V2,
                    method: "Decrypt",
                    uid: &req.uid,
                    code: status.code(),
                    elapsed: started.elapsed(),
                    key_id,
                    kek_ref: None,
                    backend_call: false,
                    error: Some(e.label()),
                });
                Err(status)
            }
        }
    }
}
