//! The key lifecycle (docs/security.md, "Key lifecycle"): revocation only on the key manager's
//! word, confirmed, per key, never refilled by a late unwrap, and key_ids from the wrap itself.
mod support;

use std::sync::Arc;
use std::time::Duration;

use kms_plugin::backend::memory::{KeyState, MemoryBackend};
use kms_plugin::backend::BackendError;
use kms_plugin::engine::{Api, Binding, Engine, EngineConfig, EngineError, KeyHealth};
use support::faulty::{Faults, FaultyBackend};

use support::engines::{config, ready, seed};

/// Key reference stored in a ciphertext (format.md: byte 2 is its length, the reference follows).
fn key_ref_of(ciphertext: &[u8]) -> String {
    let n = ciphertext[2] as usize;
    String::from_utf8(ciphertext[3..3 + n].to_vec()).unwrap()
}

/// Wrapped local KEK stored in a ciphertext.
fn wrapped_of(ciphertext: &[u8]) -> Vec<u8> {
    let n = ciphertext[2] as usize;
    let w = u16::from_be_bytes([ciphertext[3 + n], ciphertext[4 + n]]) as usize;
    ciphertext[5 + n..5 + n + w].to_vec()
}

async fn decrypts(
    engine: &Engine,
    sealed: &kms_plugin::engine::Sealed,
) -> Result<Vec<u8>, EngineError> {
    engine
        .decrypt(
            &sealed.ciphertext,
            Binding::V2 {
                key_id: &sealed.key_id,
            },
        )
        .await
        .map(|o| o.plaintext.to_vec())
}

#[tokio::test]
async fn one_authoritative_answer_is_confirmed_before_anything_is_purged() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let faulty = FaultyBackend::new(mem.clone());
    let engine = ready(faulty.clone(), config()).await;
    let sealed = engine.encrypt(&seed(1), Api::V2).await.unwrap();
    let cached = engine.cached_keks();
    // A single "disabled" answer (a flapping gateway) is re-checked at once; the re-check succeeds.
    faulty.set(Faults {
        fail_once_with: Some(BackendError::KeyDisabled("one stray answer".into())),
        ..Faults::default()
    });
    let _ = engine.probe(false).await;
    assert_eq!(engine.cached_keks(), cached, "nothing purged on one answer");
    assert_eq!(
        engine.key_health(&key_ref_of(&sealed.ciphertext)),
        KeyHealth::Active
    );
    assert_eq!(decrypts(&engine, &sealed).await.unwrap(), seed(1));
    engine.probe(false).await.unwrap();
    assert_eq!(engine.status().healthz, "ok");
}

#[tokio::test]
async fn revoked_stays_revoked_through_an_outage_and_only_a_check_of_that_key_restores_it() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let faulty = FaultyBackend::new(mem.clone());
    let engine = ready(faulty.clone(), config()).await;
    let sealed = engine.encrypt(&seed(1), Api::V2).await.unwrap();
    let key_ref = key_ref_of(&sealed.ciphertext);
    mem.set_state(KeyState::Disabled);
    assert!(engine.probe(false).await.is_err());
    assert!(matches!(engine.key_health(&key_ref), KeyHealth::Revoked(_)));
    assert_eq!(engine.cached_keks(), 0);
    // The key comes back, but the key manager is unreachable: still revoked, no backend call.
    mem.set_state(KeyState::Enabled);
    faulty.set(Faults {
        fail_with: Some(BackendError::Unavailable("proxy answered 502".into())),
        ..Faults::default()
    });
    assert!(engine.probe(false).await.is_err());
    assert!(matches!(engine.key_health(&key_ref), KeyHealth::Revoked(_)));
    assert!(
        engine.status().healthz.starts_with("key revoked"),
        "{}",
        engine.status().healthz
    );
    let calls = faulty.calls();
    assert!(matches!(
        decrypts(&engine, &sealed).await,
        Err(EngineError::Revoked(_))
    ));
    assert_eq!(
        faulty.calls(),
        calls,
        "a revoked key's Decrypt makes no backend call"
    );
    faulty.heal();
    engine.probe(false).await.unwrap();
    assert_eq!(engine.key_health(&key_ref), KeyHealth::Active);
    assert_eq!(decrypts(&engine, &sealed).await.unwrap(), seed(1));
    assert_eq!(engine.status().healthz, "ok");
}

#[tokio::test]
async fn revoking_an_old_key_drops_only_its_data_within_one_deep_probe() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let engine = ready(mem.clone(), config()).await;
    let old = engine.encrypt(&seed(1), Api::V2).await.unwrap();
    mem.rotate();
    engine.probe(false).await.unwrap();
    let new = engine.encrypt(&seed(2), Api::V2).await.unwrap();
    assert_ne!(old.key_id, new.key_id);
    // Version 1 is disabled while its local KEK is cached. A cheap probe looks only at the
    // current key; the deep probe re-checks every cached key.
    mem.set_version_state(1, KeyState::Disabled);
    engine.probe(false).await.unwrap();
    assert_eq!(
        decrypts(&engine, &old).await.unwrap(),
        seed(1),
        "cached until the deep probe"
    );
    engine.probe(true).await.unwrap();
    assert!(matches!(
        engine.key_health(&key_ref_of(&old.ciphertext)),
        KeyHealth::Revoked(_)
    ));
    assert!(matches!(
        decrypts(&engine, &old).await,
        Err(EngineError::Revoked(_))
    ));
    assert_eq!(
        decrypts(&engine, &new).await.unwrap(),
        seed(2),
        "the current key is unaffected"
    );
    assert_eq!(engine.status().healthz, "ok");
    assert!(engine.encrypt(&seed(3), Api::V2).await.is_ok());
    // Re-enabled: the next probe re-checks it and its data decrypts again.
    mem.set_version_state(1, KeyState::Enabled);
    engine.probe(false).await.unwrap();
    assert_eq!(decrypts(&engine, &old).await.unwrap(), seed(1));
}

#[tokio::test]
async fn revocation_of_the_current_key_keeps_data_under_other_keys_readable() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let engine = ready(mem.clone(), config()).await;
    let old = engine.encrypt(&seed(1), Api::V2).await.unwrap();
    mem.rotate();
    engine.probe(false).await.unwrap();
    let new = engine.encrypt(&seed(2), Api::V2).await.unwrap();
    mem.set_version_state(2, KeyState::Disabled);
    assert!(engine.probe(false).await.is_err());
    assert!(matches!(
        engine.key_health(&key_ref_of(&new.ciphertext)),
        KeyHealth::Revoked(_)
    ));
    assert!(matches!(
        decrypts(&engine, &new).await,
        Err(EngineError::Revoked(_))
    ));
    assert!(matches!(
        engine.encrypt(&seed(3), Api::V2).await,
        Err(EngineError::Revoked(_))
    ));
    assert_eq!(
        decrypts(&engine, &old).await.unwrap(),
        seed(1),
        "data under v1 still decrypts"
    );
}

#[tokio::test]
async fn an_unwrap_that_finishes_after_a_purge_does_not_refill_the_cache() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let faulty = FaultyBackend::new(mem.clone());
    let writer = ready(faulty.clone(), config()).await;
    let sealed = writer.encrypt(&seed(1), Api::V2).await.unwrap();
    // A second engine (a restarted plugin) meets the ciphertext cold; its unwrap is held.
    let reader = ready(faulty.clone(), config()).await;
    assert_eq!(decrypts(&reader, &sealed).await.unwrap(), seed(1));
    let key_ref = key_ref_of(&sealed.ciphertext);
    let cold = ready(faulty.clone(), config()).await;
    // Learn the key (as a first use does), so that a revocation has something to act on.
    cold.probe(true).await.unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    faulty.set(Faults {
        hold_unwraps: Some(gate.clone()),
        ..Faults::default()
    });
    let c2 = cold.clone();
    let s2 = sealed.ciphertext.clone();
    let k2 = sealed.key_id.clone();
    let pending = tokio::spawn(async move {
        c2.decrypt(&s2, Binding::V2 { key_id: &k2 })
            .await
            .map(|_| ())
    });
    // Wait until the held unwrap has started.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while cold.unwraps_in_flight() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the unwrap never started"
        );
        tokio::task::yield_now().await;
    }
    // The key is revoked (confirmed) while that unwrap is in flight.
    faulty.heal();
    mem.set_state(KeyState::Disabled);
    assert!(cold.probe(false).await.is_err());
    assert!(matches!(cold.key_health(&key_ref), KeyHealth::Revoked(_)));
    mem.set_state(KeyState::Enabled);
    gate.add_permits(100);
    let late = pending.await.unwrap();
    assert!(matches!(late, Err(EngineError::Revoked(_))), "{late:?}");
    assert_eq!(
        cold.cached_keks(),
        0,
        "the late unwrap did not refill the cache"
    );
    assert_eq!(
        cold.unwraps_in_flight(),
        0,
        "no in-flight entry left behind"
    );
}

#[tokio::test]
async fn a_rotation_between_probe_and_wrap_never_mislabels_a_kek() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let engine = ready(
        mem.clone(),
        EngineConfig {
            kek_max_uses: 1,
            ..config()
        },
    )
    .await;
    assert_eq!(engine.status().key_id, "memory:t:v1");
    engine.encrypt(&seed(1), Api::V2).await.unwrap();
    // Rotate behind the engine's back: the next wrap is done by v2 although Status still says v1.
    mem.rotate();
    let sealed = engine.encrypt(&seed(2), Api::V2).await.unwrap();
    assert_eq!(
        sealed.key_id, "memory:t:v2",
        "labelled by the key that wrapped"
    );
    assert_eq!(engine.status().key_id, "memory:t:v2");
    assert_eq!(key_ref_of(&sealed.ciphertext), "t/2");
    // The label is true: version 2 itself unwraps the local KEK.
    assert!(mem
        .unwrap_with_version(2, &wrapped_of(&sealed.ciphertext))
        .is_ok());
    assert_eq!(decrypts(&engine, &sealed).await.unwrap(), seed(2));
}

#[tokio::test]
async fn an_alias_rolled_back_keeps_status_healthy_unique_key_ids_and_true_labels() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let engine = ready(mem.clone(), config()).await;
    let mut seen = std::collections::HashSet::new();
    let mut sealed = Vec::new();
    // A -> B -> A -> B: the current version moves back and forth.
    for (i, version) in [1u64, 2, 1, 2].into_iter().enumerate() {
        if version == 2 && mem.rotate() != 2 {
            mem.set_current(2);
        }
        if version == 1 {
            mem.set_current(1);
        }
        engine.probe(false).await.unwrap();
        let status = engine.status();
        assert_eq!(status.healthz, "ok", "step {i}");
        assert!(
            seen.insert(status.key_id.clone()),
            "key_id {} reported twice",
            status.key_id
        );
        let s = engine.encrypt(&seed(i as u32), Api::V2).await.unwrap();
        assert_eq!(s.key_id, status.key_id);
        assert_eq!(key_ref_of(&s.ciphertext), format!("t/{version}"));
        assert!(
            mem.unwrap_with_version(version, &wrapped_of(&s.ciphertext))
                .is_ok(),
            "step {i}: the KEK labelled v{version} is wrapped by v{version}"
        );
        sealed.push((s, seed(i as u32)));
    }
    for (s, plain) in &sealed {
        assert_eq!(&decrypts(&engine, s).await.unwrap(), plain);
    }
}

#[tokio::test]
async fn authentication_failures_do_not_purge_unless_asked() {
    for revoke_on_auth in [false, true] {
        let mem = Arc::new(MemoryBackend::new("t"));
        let faulty = FaultyBackend::new(mem.clone());
        let engine = ready(
            faulty.clone(),
            EngineConfig {
                revoke_on_auth_failure: revoke_on_auth,
                ..config()
            },
        )
        .await;
        let sealed = engine.encrypt(&seed(1), Api::V2).await.unwrap();
        faulty.set(Faults {
            fail_with: Some(BackendError::Authentication("access key deleted".into())),
            ..Faults::default()
        });
        assert!(engine.probe(false).await.is_err());
        let result = decrypts(&engine, &sealed).await;
        if revoke_on_auth {
            assert!(matches!(result, Err(EngineError::Revoked(_))), "{result:?}");
        } else {
            assert_eq!(
                result.unwrap(),
                seed(1),
                "cached KEKs keep serving after a credential loss"
            );
        }
    }
}
