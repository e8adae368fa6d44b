//! KMS v1beta1 request handling, like `v2_request`.
#![no_main]

use std::sync::Arc;

use kms_plugin::proto::v1beta1::key_management_service_server::KeyManagementService;
use kms_plugin::proto::v1beta1::{DecryptRequest, EncryptRequest, VersionRequest};
use kms_plugin::protocol::observe::NoRequestObserver;
use kms_plugin::protocol::v1::V1Service;
use kms_plugin_fuzz::{engine, runtime};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::Request;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let svc = V1Service::new(engine().clone(), Arc::new(NoRequestObserver));
    runtime().block_on(async {
        match selector % 3 {
            0 => {
                if let Ok(req) = DecryptRequest::decode(body) {
                    let _ = svc.decrypt(Request::new(req)).await;
                }
            }
            1 => {
                if let Ok(req) = EncryptRequest::decode(body) {
                    let plain = req.plain.clone();
                    if let Ok(enc) = svc.encrypt(Request::new(req)).await {
                        let dec = svc
                            .decrypt(Request::new(DecryptRequest {
                                version: "v1beta1".into(),
                                cipher: enc.into_inner().cipher,
                            }))
                            .await
                            .expect("decrypt of a fresh ciphertext");
                        assert_eq!(dec.into_inner().plain, plain);
                    }
                }
            }
            _ => {
                if let Ok(req) = VersionRequest::decode(body) {
                    let _ = svc.version(Request::new(req)).await;
                }
            }
        }
    });
});
