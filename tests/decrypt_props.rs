//! Property: any byte string given to Decrypt, v1 or v2, through the engine and through the gRPC
//! service handlers, yields an error or the original plaintext — never a panic, never other bytes.

use std::sync::{Arc, OnceLock};

use kms_plugin::backend::memory::MemoryBackend;
use kms_plugin::engine::{Api, Binding, Engine, EngineConfig};
use kms_plugin::proto::v1beta1::key_management_service_server::KeyManagementService as V1Kms;
use kms_plugin::proto::v2::key_management_service_server::KeyManagementService as V2Kms;
use kms_plugin::proto::{v1beta1, v2};
use kms_plugin::protocol::observe::NoRequestObserver;
use kms_plugin::protocol::v1::V1Service;
use kms_plugin::protocol::v2::{StatusVersion, V2Service};
use proptest::prelude::*;

struct World {
    rt: tokio::runtime::Runtime,
    engine: Arc<Engine>,
    v1: V1Service,
    v2: V2Service,
    /// (api, ciphertext, key_id, plaintext) made by this engine.
    samples: Vec<(Api, Vec<u8>, String, Vec<u8>)>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let engine = Engine::new(
            Arc::new(MemoryBackend::new("props")),
            EngineConfig::default(),
        );
        let mut samples = Vec::new();
        rt.block_on(async {
            engine.probe(true).await.unwrap();
            for (api, pt) in [
                (Api::V2, vec![0x11u8; 32]),
                (Api::V1, b"ping".to_vec()),
                (Api::V1, vec![0x22u8; 32]),
            ] {
                let s = engine.encrypt(&pt, api).await.unwrap();
                samples.push((api, s.ciphertext, s.key_id, pt));
            }
        });
        World {
            v1: V1Service::new(engine.clone(), Arc::new(NoRequestObserver)),
            v2: V2Service::new(
                engine.clone(),
                StatusVersion::V2,
                Arc::new(NoRequestObserver),
            ),
            rt,
            engine,
            samples,
        }
    })
}

/// Decrypts through the engine and both handlers; every path must agree with `expect`.
fn check(api: Api, ciphertext: &[u8], key_id: &str, expect: Option<&[u8]>) {
    let w = world();
    let binding = match api {
        Api::V1 => Binding::V1,
        Api::V2 => Binding::V2 { key_id },
    };
    let engine_result = w.rt.block_on(w.engine.decrypt(ciphertext, binding));
    let handler_result: Result<Vec<u8>, tonic::Status> = w.rt.block_on(async {
        match api {
            Api::V1 => V1Kms::decrypt(
                &w.v1,
                tonic::Request::new(v1beta1::DecryptRequest {
                    version: "v1beta1".into(),
                    cipher: ciphertext.to_vec(),
                }),
            )
            .await
            .map(|r| r.into_inner().plain),
            Api::V2 => V2Kms::decrypt(
                &w.v2,
                tonic::Request::new(v2::DecryptRequest {
                    ciphertext: ciphertext.to_vec(),
                    uid: "prop".into(),
                    key_id: key_id.into(),
                    annotations: Default::default(),
                }),
            )
            .await
            .map(|r| r.into_inner().plaintext),
        }
    });
    match (&engine_result, expect) {
        (Ok(o), Some(want)) => assert_eq!(&o.plaintext[..], want),
        (Ok(o), None) => panic!(
            "{} bytes of input decrypted to {} bytes",
            ciphertext.len(),
            o.plaintext.len()
        ),
        (Err(e), _) => assert!(!e.to_string().is_empty()),
    }
    match (&handler_result, expect) {
        (Ok(p), Some(want)) => assert_eq!(&p[..], want),
        (Ok(_), None) => panic!("handler decrypted garbage"),
        (Err(s), _) => assert_ne!(s.code(), tonic::Code::Ok),
    }
    assert_eq!(
        engine_result.is_ok(),
        handler_result.is_ok(),
        "engine and handler disagree"
    );
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { pos: usize, bit: u8 },
    Truncate(usize),
    Append(Vec<u8>),
    Insert { pos: usize, bytes: Vec<u8> },
    Remove { pos: usize, len: usize },
    Overwrite { pos: usize, bytes: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(pos, bit)| Mutation::Flip { pos, bit }),
        any::<usize>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Append),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(pos, bytes)| Mutation::Insert { pos, bytes }),
        (any::<usize>(), 1usize..32).prop_map(|(pos, len)| Mutation::Remove { pos, len }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(pos, bytes)| Mutation::Overwrite { pos, bytes }),
    ]
}

fn apply(ct: &[u8], m: &Mutation) -> Vec<u8> {
    let mut v = ct.to_vec();
    let at = |pos: usize, len: usize| if len == 0 { 0 } else { pos % len };
    match m {
        Mutation::Flip { pos, bit } => {
            // An earlier mutation may have emptied the input: nothing to flip then.
            let i = at(*pos, v.len());
            if let Some(byte) = v.get_mut(i) {
                *byte ^= 1 << bit;
            }
        }
        Mutation::Truncate(n) => v.truncate(at(*n, v.len())),
        Mutation::Append(b) => v.extend_from_slice(b),
        Mutation::Insert { pos, bytes } => {
            let i = at(*pos, v.len() + 1);
            v.splice(i..i, bytes.iter().copied());
        }
        Mutation::Remove { pos, len } => {
            let i = at(*pos, v.len());
            let end = (i + len).min(v.len());
            v.drain(i..end);
        }
        Mutation::Overwrite { pos, bytes } => {
            let i = at(*pos, v.len());
            for (k, b) in bytes.iter().enumerate() {
                if let Some(slot) = v.get_mut(i + k) {
                    *slot = *b;
                }
            }
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_decrypt_and_never_panic(
        data in proptest::collection::vec(any::<u8>(), 0..1500),
        v2 in any::<bool>(),
    ) {
        let w = world();
        let api = if v2 { Api::V2 } else { Api::V1 };
        check(api, &data, &w.samples[0].2, None);
    }

    #[test]
    fn mutated_ciphertexts_give_an_error_or_the_original(
        which in 0usize..3,
        mutations in proptest::collection::vec(mutation(), 1..4),
        key_id_suffix in proptest::option::of("[a-z0-9:]{0,8}"),
    ) {
        let w = world();
        let (api, ct, key_id, pt) = &w.samples[which];
        let mut bad = ct.clone();
        for m in &mutations {
            bad = apply(&bad, m);
        }
        let key_id = match &key_id_suffix {
            Some(s) => format!("{key_id}{s}"),
            None => key_id.clone(),
        };
        // Authenticated encryption: only the unchanged input (and unchanged key_id for v2) decrypts.
        let unchanged = bad == *ct && (*api == Api::V1 || key_id == w.samples[which].2);
        check(*api, &bad, &key_id, unchanged.then_some(&pt[..]));
    }

    #[test]
    fn the_other_api_never_accepts_a_ciphertext(which in 0usize..3) {
        let w = world();
        let (api, ct, key_id, _) = &w.samples[which];
        let other = if *api == Api::V1 { Api::V2 } else { Api::V1 };
        let key_id = if key_id.is_empty() { "memory:props:v1".to_string() } else { key_id.clone() };
        check(other, ct, &key_id, None);
    }
}

#[test]
fn unmodified_samples_decrypt() {
    let w = world();
    for (api, ct, key_id, pt) in &w.samples {
        check(*api, ct, key_id, Some(pt));
    }
}
