//! KMS v1beta1: Version, Encrypt, Decrypt. One Encrypt per apiserver write, so the local KEK hierarchy
//! is what keeps the backend out of the write path.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::observe::{RequestObserver, RequestRecord};
use super::v2::within;
use super::{deadline, errors, RUNTIME_NAME, RUNTIME_VERSION};
use crate::engine::{Api, Binding, Engine, EngineError};
use crate::proto::v1beta1::key_management_service_server::KeyManagementService;
use crate::proto::v1beta1::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, VersionRequest,
    VersionResponse,
};

pub const API_VERSION: &str = "v1beta1";
/// v1 ciphertexts we produce stay far below this; anything larger is refused before decryption.
pub const MAX_CIPHERTEXT: usize = 64 * 1024;

pub struct V1Service {
    engine: Arc<Engine>,
    observer: Arc<dyn RequestObserver>,
}

impl V1Service {
    pub fn new(engine: Arc<Engine>, observer: Arc<dyn RequestObserver>) -> Self {
        V1Service { engine, observer }
    }

    fn record(
        &self,
        method: &'static str,
        started: Instant,
        code: tonic::Code,
        kek_ref: Option<&str>,
        backend_call: bool,
        error: Option<&'static str>,
    ) {
        self.observer.request(&RequestRecord {
            api: Api::V1,
            method,
            uid: "",
            code,
            elapsed: started.elapsed(),
            key_id: None,
            kek_ref,
            backend_call,
            error,
        });
    }
}

fn check_version(version: &str) -> Result<(), EngineError> {
    if version.is_empty() || version == API_VERSION {
        Ok(())
    } else {
        Err(EngineError::InvalidInput(format!(
            "unsupported KMS API version {version:?}; this endpoint serves {API_VERSION}"
        )))
    }
}

#[tonic::async_trait]
impl KeyManagementService for V1Service {
    async fn version(
        &self,
        request: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        let started = Instant::now();
        let requested = request.into_inner().version;
        tracing::debug!(requested = %requested, "v1 version");
        self.record("Version", started, tonic::Code::Ok, None, false, None);
        Ok(Response::new(VersionResponse {
            version: API_VERSION.to_string(),
            runtime_name: RUNTIME_NAME.to_string(),
            runtime_version: RUNTIME_VERSION.to_string(),
        }))
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let started = Instant::now();
        let budget = deadline::budget(request.metadata());
        let req = request.into_inner();
        let result = match check_version(&req.version) {
            Ok(()) => within(budget, self.engine.encrypt(&req.plain, Api::V1)).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(sealed) => {
                tracing::debug!(key_id = %sealed.key_id, kek = %sealed.kek_ref, "v1 encrypt");
                self.record(
                    "Encrypt",
                    started,
                    tonic::Code::Ok,
                    Some(&sealed.kek_ref),
                    sealed.backend_call,
                    None,
                );
                Ok(Response::new(EncryptResponse {
                    cipher: sealed.ciphertext,
                }))
            }
            Err(e) => {
                let status = errors::to_status(&e);
                tracing::warn!(code = ?status.code(), error = %e, "v1 encrypt failed");
                self.record(
                    "Encrypt",
                    started,
                    status.code(),
                    None,
                    false,
                    Some(e.label()),
                );
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
        let result = if let Err(e) = check_version(&req.version) {
            Err(e)
        } else if req.cipher.is_empty() {
            Err(EngineError::InvalidInput("ciphertext is empty".into()))
        } else if req.cipher.len() > MAX_CIPHERTEXT {
            Err(EngineError::InvalidInput(format!(
                "ciphertext is {} bytes; this plugin's v1 ciphertexts are at most {MAX_CIPHERTEXT}",
                req.cipher.len()
            )))
        } else {
            within(budget, self.engine.decrypt(&req.cipher, Binding::V1)).await
        };
        match result {
            Ok(opened) => {
                tracing::debug!(kek = %opened.kek_ref, backend_call = opened.backend_call, "v1 decrypt");
                self.record(
                    "Decrypt",
                    started,
                    tonic::Code::Ok,
                    Some(&opened.kek_ref),
                    opened.backend_call,
                    None,
                );
                Ok(Response::new(DecryptResponse {
                    plain: opened.plaintext.to_vec(),
                }))
            }
            Err(e) => {
                let status = errors::to_status(&e);
                tracing::warn!(code = ?status.code(), error = %e, "v1 decrypt failed");
                self.record(
                    "Decrypt",
                    started,
                    status.code(),
                    None,
                    false,
                    Some(e.label()),
                );
                Err(status)
            }
        }
    }
}
