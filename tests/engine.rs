//! The envelope engine against the in-memory backend, with faults injected.
mod support;

use std::sync::Arc;
use std::time::Duration;

use kms_plugin::backend::memory::{KeyState, MemoryBackend};
use kms_plugin::backend::BackendError;
use kms_plugin::engine::{Api, Binding, Engine, EngineConfig, EngineError};
use support::faulty::{Faults, FaultyBackend};

use support::engines::{config, ready, seed};

#[tokio::test]
async fn v2_round_trip_reports_status_key_id_and_randomises() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let engine = ready(mem.clone(), config()).await;
    let status = engine.status();
    assert_eq!(status.healthz, "ok");
    assert_eq!(status.key_id, "memory:t:v1");
    let a = engine.encrypt(&seed(1), Api::V2).await.unwrap();
    let b = engine.encrypt(&seed(1), Api::V2).await.unwrap();
    assert_eq!(a.key_id, status.key_id);
    assert_ne!(
        a.ciphertext, b.ciphertext,
        "same plaintext must give distinct ciphertexts"
    );
    assert!(a.ciphertext.len() <= 1024);
    let out = engine
        .decrypt(&a.ciphertext, Binding::V2 { key_id: &a.key_id })
        .await
        .unwrap();
    assert_eq!(&out.plaintext[..], &seed(1)[..]);
    assert!(!out.backend_call);
}

#[tokio::test]
async fn v1_accepts_any_length_and_is_bound_to_v1() {
    let engine = ready(Arc::new(MemoryBackend::new("t")), config()).await;
    for pt in [&b"ping"[..], &[7u8; 32][..], &[1u8; 4096][..]] {
        let s = engine.encrypt(pt, Api::V1).await.unwrap();
        assert_eq!(
            &engine
                .decrypt(&s.ciphertext, Binding::V1)
                .await
                .unwrap()
                .plaintext[..],
            pt
        );
        // A v1 ciphertext is not a v2 ciphertext, and vice versa.
        assert!(engine
            .decrypt(&s.ciphertext, Binding::V2 { key_id: &s.key_id })
            .await
            .is_err());
    }
    let s = engine.encrypt(b"x", Api::V2).await.unwrap();
    assert!(engine.decrypt(&s.ciphertext, Binding::V1).await.is_err());
}

#[tokio::test]
async fn hierarchy_keeps_backend_calls_per_local_kek_not_per_operation() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let engine = ready(mem.clone(), config()).await;
    let wraps_after_start = mem.wrap_calls();
    let unwraps_after_start = mem.unwrap_calls();
    let mut cts = Vec::new();
    for i in 0..1000 {
        cts.push(engine.encrypt(&seed(i), Api::V1).await.unwrap().ciphertext);
    }
    for (i, ct) in cts.iter().enumerate() {
        assert_eq!(
            &engine.decrypt(ct, Binding::V1).await.unwrap().plaintext[..],
            &seed(i as u32)[..]
        );
    }
    assert_eq!(
        mem.wrap_calls(),
        wraps_after_start,
        "1000 encrypts reuse the local KEK made at start"
    );
    assert_eq!(
        mem.unwrap_calls(),
        unwraps_after_start,
        "decrypts hit the cache"
    );

    // A restarted plugin (fresh engine, same backend) unwraps the local KEK once.
    let restarted = ready(mem.clone(), config()).await;
    let before = mem.unwrap_calls();
    for (i, ct) in cts.iter().enumerate() {
        let out = restarted.decrypt(ct, Binding::V1).await.unwrap();
        assert_eq!(&out.plaintext[..], &seed(i as u32)[..]);
        assert_eq!(out.backend_call, i == 0);
    }
    assert_eq!(mem.unwrap_calls() - before, 1);
}

#[tokio::test]
async fn local_kek_retired_after_max_uses() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let engine = ready(
        mem.clone(),
        EngineConfig {
            kek_max_uses: 10,
            ..config()
        },
    )
    .await;
    let start = mem.wrap_calls();
    let mut refs = std::collections::HashSet::new();
    for i in 0..25 {
        refs.insert(engine.encrypt(&seed(i), Api::V2).await.unwrap().kek_ref);
    }
    assert_eq!(refs.len(), 3, "25 encrypts at 10 uses per local KEK");
    assert_eq!(
        mem.wrap_calls() - start,
        2,
        "the KEK made at start plus two more"
    );
}

#[tokio::test(start_paused = true)]
async fn local_kek_retired_after_max_age() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let engine = ready(
        mem.clone(),
        EngineConfig {
            kek_max_age: Duration::from_secs(60),
            ..config()
        },
    )
    .await;
    let first = engine.encrypt(&seed(1), Api::V2).await.unwrap();
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(
        engine.encrypt(&seed(2), Api::V2).await.unwrap().kek_ref,
        first.kek_ref
    );
    tokio::time::advance(Duration::from_secs(31)).await;
    let later = engine.encrypt(&seed(3), Api::V2).await.unwrap();
    assert_ne!(later.kek_ref, first.kek_ref);
    assert!(later.backend_call);
    // Old data still decrypts.
    assert!(engine
        .decrypt(
            &first.ciphertext,
            Binding::V2 {
                key_id: &first.key_id
            }
        )
        .await
        .is_ok());
}

#[tokio::test]
async fn rotation_changes_key_id_and_old_data_still_decrypts() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let engine = ready(mem.clone(), config()).await;
    let old = engine.encrypt(&seed(1), Api::V2).await.unwrap();
    mem.rotate();
    engine.probe(false).await.unwrap();
    let status = engine.status();
    assert_eq!(status.key_id, "memory:t:v2");
    let new = engine.encrypt(&seed(2), Api::V2).await.unwrap();
    assert_eq!(new.key_id, status.key_id);
    assert_ne!(new.kek_ref, old.kek_ref);
    assert!(!new.backend_call, "the probe prepared the new local KEK");
    assert_eq!(
        &engine
            .decrypt(
                &old.ciphertext,
                Binding::V2 {
                    key_id: &old.key_id
                }
            )
            .await
            .unwrap()
            .plaintext[..],
        &seed(1)[..]
    );
    // Presenting old data under the new key_id fails authentication.
    let err = engine
        .decrypt(
            &old.ciphertext,
            Binding::V2 {
                key_id: &new.key_id,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, EngineError::InvalidInput(ref m) if m.contains("key_id")),
        "{err}"
    );
}

#[tokio::test]
async fn a_key_id_is_never_reused_and_a_returning_key_stays_healthy() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let faulty = FaultyBackend::new(mem.clone());
    let engine = ready(faulty.clone(), config()).await;
    let a = engine.status().key_id;
    faulty.set(Faults {
        key_id_override: Some("other".into()),
        ..Faults::default()
    });
    engine.probe(false).await.unwrap();
    let b = engine.status().key_id;
    assert_eq!(b, "memory:other");
    faulty.heal();
    engine.probe(false).await.unwrap();
    let status = engine.status();
    assert_eq!(status.healthz, "ok", "A -> B -> A keeps Status healthy");
    assert_eq!(
        status.key_id,
        format!("{a}#2"),
        "the returning key gets a new epoch"
    );
    let sealed = engine.encrypt(&seed(1), Api::V2).await.unwrap();
    assert_eq!(sealed.key_id, status.key_id);
}

#[tokio::test]
async fn cache_is_bounded() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let producer = ready(
        mem.clone(),
        EngineConfig {
            kek_max_uses: 1,
            ..config()
        },
    )
    .await;
    let mut cts = Vec::new();
    for i in 0..10 {
        cts.push(
            producer
                .encrypt(&seed(i), Api::V1)
                .await
                .unwrap()
                .ciphertext,
        );
    }
    let consumer = ready(
        mem.clone(),
        EngineConfig {
            kek_cache_size: 4,
            ..config()
        },
    )
    .await;
    for ct in &cts {
        consumer.decrypt(ct, Binding::V1).await.unwrap();
    }
    assert!(
        consumer.cached_keks() <= 4 + 1,
        "cache holds {} local KEKs",
        consumer.cached_keks()
    );
}

#[tokio::test]
async fn tampering_and_garbage_are_refused() {
    let engine = ready(Arc::new(MemoryBackend::new("t")), config()).await;
    let s = engine.encrypt(&seed(9), Api::V2).await.unwrap();
    let binding = Binding::V2 { key_id: &s.key_id };
    for i in 0..s.ciphertext.len() {
        let mut bad = s.ciphertext.clone();
        bad[i] ^= 0x80;
        let err = engine
            .decrypt(&bad, binding)
            .await
            .expect_err("tampered byte accepted");
        assert!(
            matches!(
                err,
                EngineError::InvalidInput(_)
                    | EngineError::Backend(BackendError::InvalidCiphertext(_))
                    | EngineError::Backend(BackendError::KeyNotFound(_))
            ),
            "byte {i}: {err:?}"
        );
    }
    for n in 0..s.ciphertext.len() {
        assert!(
            engine.decrypt(&s.ciphertext[..n], binding).await.is_err(),
            "truncated to {n}"
        );
    }
    assert!(engine
        .decrypt(&s.ciphertext, Binding::V2 { key_id: "" })
        .await
        .is_err());
    assert!(engine
        .decrypt(
            &s.ciphertext,
            Binding::V2 {
                key_id: "memory:t:v9"
            }
        )
        .await
        .is_err());
    assert!(matches!(
        engine.encrypt(b"", Api::V2).await,
        Err(EngineError::InvalidInput(_))
    ));
    assert!(matches!(
        engine.encrypt(&vec![0; 5000], Api::V1).await,
        Err(EngineError::InvalidInput(_))
    ));
}

#[tokio::test]
async fn transient_outage_keeps_cached_keys_and_recovers() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let faulty = FaultyBackend::new(mem.clone());
    let engine = ready(faulty.clone(), config()).await;
    let s = engine.encrypt(&seed(1), Api::V2).await.unwrap();
    faulty.set(Faults {
        fail_with: Some(BackendError::Unavailable("down".into())),
        ..Faults::default()
    });
    assert!(engine.probe(false).await.is_err());
    let status = engine.status();
    assert!(status.healthz.contains("unavailable"), "{}", status.healthz);
    assert_eq!(status.key_id, s.key_id, "key_id kept during an outage");
    // Cached decrypts and encrypts with the current local KEK keep working.
    for i in 0..100 {
        let out = engine
            .decrypt(&s.ciphertext, Binding::V2 { key_id: &s.key_id })
            .await
            .unwrap();
        assert_eq!(&out.plaintext[..], &seed(1)[..]);
        engine.encrypt(&seed(i), Api::V2).await.unwrap();
    }
    faulty.heal();
    engine.probe(false).await.unwrap();
    assert_eq!(engine.status().healthz, "ok");
}

#[tokio::test]
async fn revocation_purges_cache_and_recovers() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let engine = ready(mem.clone(), config()).await;
    let s = engine.encrypt(&seed(1), Api::V2).await.unwrap();
    let binding = Binding::V2 { key_id: &s.key_id };
    for state in [
        KeyState::Disabled,
        KeyState::AccessDenied,
        KeyState::Deleted,
    ] {
        mem.set_state(state);
        assert!(engine.probe(false).await.is_err());
        assert!(
            engine.status().healthz.starts_with("key revoked"),
            "{}",
            engine.status().healthz
        );
        assert_eq!(engine.cached_keks(), 0);
        assert!(matches!(
            engine.decrypt(&s.ciphertext, binding).await,
            Err(EngineError::Revoked(_))
        ));
        assert!(matches!(
            engine.encrypt(&seed(2), Api::V2).await,
            Err(EngineError::Revoked(_))
        ));
        mem.set_state(KeyState::Enabled);
        engine.probe(false).await.unwrap();
        let before = mem.unwrap_calls();
        let out = engine.decrypt(&s.ciphertext, binding).await.unwrap();
        assert_eq!(&out.plaintext[..], &seed(1)[..]);
        assert_eq!(
            mem.unwrap_calls() - before,
            1,
            "the local KEK had to be unwrapped again"
        );
    }
}

#[tokio::test]
async fn one_unwrap_for_many_concurrent_decrypts_and_bounded_backend_concurrency() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let producer = ready(
        mem.clone(),
        EngineConfig {
            kek_max_uses: 1,
            ..config()
        },
    )
    .await;
    let mut cts = Vec::new();
    for i in 0..40 {
        cts.push(
            producer
                .encrypt(&seed(i), Api::V1)
                .await
                .unwrap()
                .ciphertext,
        );
    }
    let faulty = FaultyBackend::new(mem.clone());
    let consumer = ready(
        faulty.clone(),
        EngineConfig {
            backend_concurrency: 4,
            ..config()
        },
    )
    .await;
    faulty.set(Faults {
        delay: Some(Duration::from_millis(20)),
        ..Faults::default()
    });
    let before = faulty.calls();
    let mut tasks = Vec::new();
    for _ in 0..5 {
        for (i, ct) in cts.iter().enumerate() {
            let (e, ct) = (consumer.clone(), ct.clone());
            tasks.push(tokio::spawn(async move {
                let out = e.decrypt(&ct, Binding::V1).await.unwrap();
                assert_eq!(&out.plaintext[..], &seed(i as u32)[..]);
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        faulty.calls() - before,
        40,
        "one unwrap per distinct local KEK"
    );
    assert!(
        faulty.max_in_flight() <= 4,
        "backend concurrency {} > 4",
        faulty.max_in_flight()
    );
}

#[tokio::test]
async fn slow_backend_hits_timeout_and_the_unwrap_still_fills_the_cache() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let producer = ready(mem.clone(), config()).await;
    let s = producer.encrypt(&seed(1), Api::V1).await.unwrap();
    let faulty = FaultyBackend::new(mem.clone());
    let consumer = ready(faulty.clone(), config()).await;
    faulty.set(Faults {
        delay: Some(Duration::from_millis(300)),
        ..Faults::default()
    });
    // The caller gives up first (its deadline), the detached unwrap goes on.
    let r = tokio::time::timeout(
        Duration::from_millis(50),
        consumer.decrypt(&s.ciphertext, Binding::V1),
    )
    .await;
    assert!(r.is_err(), "caller deadline");
    let cached_before = consumer.cached_keks();
    support::wait_until(Duration::from_secs(5), || {
        consumer.cached_keks() > cached_before
    })
    .await;
    faulty.set(Faults {
        fail_with: Some(BackendError::Unavailable("down".into())),
        ..Faults::default()
    });
    let out = consumer.decrypt(&s.ciphertext, Binding::V1).await.unwrap();
    assert_eq!(&out.plaintext[..], &seed(1)[..]);
    assert!(!out.backend_call);
}

#[tokio::test(start_paused = true)]
async fn status_goes_stale_without_successful_probes() {
    let engine = ready(
        Arc::new(MemoryBackend::new("t")),
        EngineConfig {
            status_staleness: Duration::from_secs(60),
            ..config()
        },
    )
    .await;
    assert_eq!(engine.status().healthz, "ok");
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(
        engine
            .status()
            .healthz
            .contains("no successful backend check"),
        "{}",
        engine.status().healthz
    );
}

#[tokio::test]
async fn first_encrypt_without_probe_asks_the_backend() {
    let engine = Engine::new(Arc::new(MemoryBackend::new("t")), config());
    assert_ne!(engine.status().healthz, "ok");
    assert_eq!(engine.status().key_id, "");
    let s = engine.encrypt(&seed(1), Api::V2).await.unwrap();
    assert_eq!(s.key_id, "memory:t:v1");
    assert!(s.backend_call);
}
