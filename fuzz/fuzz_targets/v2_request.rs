//! KMS v2 request handling: arbitrary bytes decoded as the request messages (as tonic would) and given
//! to the service handlers. First byte picks the method. Oracle: whatever Encrypt returns, Decrypt
//! gives back the same plaintext.
#![no_main]

use std::sync::Arc;

use kms_plugin::proto::v2::key_management_service_server::KeyManagementService;
use kms_plugin::proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use kms_plugin::protocol::observe::NoRequestObserver;
use kms_plugin::protocol::v2::{StatusVersion, V2Service};
use kms_plugin_fuzz::{engine, runtime};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::Request;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let svc = V2Service::new(
        engine().clone(),
        StatusVersion::V2,
        Arc::new(NoRequestObserver),
    );
    runtime().block_on(async {
        match selector % 3 {
            0 => {
                if let Ok(req) = DecryptRequest::decode(body) {
                    let _ = svc.decrypt(Request::new(req)).await;
                }
            }
            1 => {
                if let Ok(req) = EncryptRequest::decode(body) {
                    let plaintext = req.plaintext.clone();
                    if let Ok(enc) = svc.encrypt(Request::new(req)).await {
                        let enc = enc.into_inner();
                        assert!(!enc.ciphertext.is_empty() && enc.ciphertext.len() <= 1024);
                        let dec = svc
                            .decrypt(Request::new(DecryptRequest {
                                ciphertext: enc.ciphertext,
                                uid: String::new(),
                                key_id: enc.key_id,
                                annotations: enc.annotations,
                            }))
                            .await
                            .expect("decrypt of a fresh ciphertext");
                        assert_eq!(dec.into_inner().plaintext, plaintext);
                    }
                }
            }
            _ => {
                if let Ok(req) = StatusRequest::decode(body) {
                    let _ = svc.status(Request::new(req)).await;
                }
            }
        }
    });
});
