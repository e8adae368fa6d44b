//! Escrow (docs/escrow.md): each local KEK wrapped by the primary and by escrow backends, in the
//! ciphertext (format version 2); Decrypt through an escrow when the primary is down, revoked or has
//! lost the key; Encrypt never failing because an escrow is down.
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kms_plugin::backend::memory::{KeyState, MemoryBackend};
use kms_plugin::backend::{Backend, BackendError, KeyIdentity, SecretBytes, WrappedKey};
use kms_plugin::engine::{Api, Binding, Engine, EngineConfig, Observer};
use support::engines::{config, seed};
use support::faulty::{Faults, FaultyBackend};

/// A backend under another kind name: the engine tells escrow backends apart by kind.
#[derive(Debug)]
struct Kinded(&'static str, Arc<dyn Backend>);

#[async_trait]
impl Backend for Kinded {
    fn kind(&self) -> &'static str {
        self.0
    }
    async fn current_key(&self) -> Result<KeyIdentity, BackendError> {
        self.1.current_key().await
    }
    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        self.1.wrap(plaintext).await
    }
    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError> {
        self.1.unwrap(key_ref, ciphertext).await
    }
}

/// Records the escrow events the engine reports.
#[derive(Default)]
struct Events {
    wraps: Mutex<Vec<(String, &'static str)>>,
    unwraps: Mutex<Vec<(String, String, &'static str)>>,
}

impl Observer for Events {
    fn escrow_wrap(&self, escrow: &str, outcome: Result<(), &BackendError>) {
        let label = outcome.err().map_or("ok", |e| e.label());
        self.wraps.lock().unwrap().push((escrow.to_string(), label));
    }
    fn escrow_unwrap(
        &self,
        escrow: &str,
        _kek_ref: &str,
        primary_error: &str,
        outcome: Result<(), &BackendError>,
    ) {
        let label = outcome.err().map_or("ok", |e| e.label());
        self.unwraps
            .lock()
            .unwrap()
            .push((escrow.to_string(), primary_error.to_string(), label));
    }
}

struct Setup {
    primary: Arc<FaultyBackend>,
    primary_mem: Arc<MemoryBackend>,
    escrow: Arc<FaultyBackend>,
    escrow_mem: Arc<MemoryBackend>,
}

fn setup() -> Setup {
    let primary_mem = Arc::new(MemoryBackend::new("primary"));
    let escrow_mem = Arc::new(MemoryBackend::new("safe"));
    Setup {
        primary: FaultyBackend::new(primary_mem.clone()),
        primary_mem,
        escrow: FaultyBackend::new(Arc::new(Kinded("vault", escrow_mem.clone()))),
        escrow_mem,
    }
}

/// A fresh engine (empty KEK cache, as after a restart) over the same keys.
async fn ready_engine(s: &Setup, cfg: EngineConfig) -> (Arc<Engine>, Arc<Events>) {
    let events = Arc::new(Events::default());
    let escrow: Arc<dyn Backend> = s.escrow.clone();
    let engine = Engine::with_escrow(s.primary.clone(), vec![escrow], cfg, events.clone());
    engine.probe(true).await.expect("initial probe");
    (engine, events)
}

#[tokio::test]
async fn every_new_local_kek_carries_the_escrow_wrapping_in_format_version_2() {
    let s = setup();
    let (engine, events) = ready_engine(&s, config()).await;
    let sealed = engine.encrypt(&seed(1), Api::V2).await.unwrap();
    assert_eq!(sealed.ciphertext[0], 0x4B);
    assert_eq!(sealed.ciphertext[1], 2, "format version with escrow");
    assert!(sealed.ciphertext.len() <= 1024);
    assert_eq!(s.escrow_mem.wrap_calls(), 1);
    assert_eq!(*events.wraps.lock().unwrap(), [("vault".to_string(), "ok")]);
    // key_id is the primary's.
    assert_eq!(sealed.key_id, "memory:primary:v1");
    // The healthy path never asks the escrow to unwrap.
    let (fresh, events) = ready_engine(&s, config()).await;
    let out = fresh
        .decrypt(
            &sealed.ciphertext,
            Binding::V2 {
                key_id: &sealed.key_id,
            },
        )
        .await
        .unwrap();
    assert_eq!(&out.plaintext[..], &seed(1)[..]);
    assert_eq!(s.escrow_mem.unwrap_calls(), 0);
    assert!(events.unwraps.lock().unwrap().is_empty());
    assert_eq!(fresh.escrow_health(), [("vault", Ok(()))]);
}

#[tokio::test]
async fn the_primary_losing_its_key_leaves_every_secret_readable_through_the_escrow() {
    let s = setup();
    let (engine, _) = ready_engine(&s, config()).await;
    let v2 = engine.encrypt(&seed(2), Api::V2).await.unwrap();
    let v1 = engine.encrypt(b"v1-dek", Api::V1).await.unwrap();
    // The key is deleted in the primary key manager; the plugin restarts (cold cache).
    s.primary_mem.set_state(KeyState::Deleted);
    let (fresh, events) = {
        let events = Arc::new(Events::default());
        let escrow: Arc<dyn Backend> = s.escrow.clone();
        let e = Engine::with_escrow(s.primary.clone(), vec![escrow], config(), events.clone());
        (e, events)
    };
    let out = fresh
        .decrypt(&v2.ciphertext, Binding::V2 { key_id: &v2.key_id })
        .await
        .unwrap();
    assert_eq!(&out.plaintext[..], &seed(2)[..]);
    assert!(out.backend_call);
    let out = fresh.decrypt(&v1.ciphertext, Binding::V1).await.unwrap();
    assert_eq!(&out.plaintext[..], b"v1-dek");
    let unwraps = events.unwraps.lock().unwrap().clone();
    assert_eq!(
        unwraps.len(),
        1,
        "one escrow unwrap per local KEK, then cached: {unwraps:?}"
    );
    assert_eq!(unwraps[0].0, "vault");
    assert_eq!(unwraps[0].2, "ok");
    assert!(
        unwraps[0].1.contains("not found"),
        "the primary's answer is reported: {}",
        unwraps[0].1
    );
    // The primary's key is revoked in the lifecycle (two authoritative answers), yet the escrow serves.
    let v2b = engine.encrypt(&seed(3), Api::V2).await;
    assert!(
        v2b.is_ok(),
        "cached KEK of the old engine still encrypts until retired"
    );
    fresh.probe(false).await.unwrap_err();
    assert_ne!(
        fresh.status().healthz,
        "ok",
        "Status reports the primary's loss"
    );
    let again = Engine::with_escrow(
        s.primary.clone(),
        vec![s.escrow.clone() as Arc<dyn Backend>],
        config(),
        Arc::new(Events::default()),
    );
    let _ = again.probe(false).await;
    let _ = again.probe(false).await;
    let out = again
        .decrypt(&v2.ciphertext, Binding::V2 { key_id: &v2.key_id })
        .await
        .expect("a revoked primary key does not gate a Decrypt the escrow can serve");
    assert_eq!(&out.plaintext[..], &seed(2)[..]);
}

#[tokio::test]
async fn a_primary_outage_is_served_by_the_escrow_and_the_primary_is_tried_first() {
    let s = setup();
    let (engine, _) = ready_engine(&s, config()).await;
    let v2 = engine.encrypt(&seed(4), Api::V2).await.unwrap();
    let (fresh, events) = engine_cold(&s);
    s.primary.set(Faults {
        fail_with: Some(BackendError::Unavailable("connection refused".into())),
        ..Faults::default()
    });
    let before = s.primary.calls();
    let out = fresh
        .decrypt(&v2.ciphertext, Binding::V2 { key_id: &v2.key_id })
        .await
        .unwrap();
    assert_eq!(&out.plaintext[..], &seed(4)[..]);
    assert_eq!(s.primary.calls(), before + 1, "the primary is asked first");
    assert_eq!(events.unwraps.lock().unwrap()[0].2, "ok");
}

fn engine_cold(s: &Setup) -> (Arc<Engine>, Arc<Events>) {
    let events = Arc::new(Events::default());
    let escrow: Arc<dyn Backend> = s.escrow.clone();
    (
        Engine::with_escrow(s.primary.clone(), vec![escrow], config(), events.clone()),
        events,
    )
}

#[tokio::test]
async fn when_primary_and_escrow_both_fail_the_primary_answer_is_returned() {
    let s = setup();
    let (engine, _) = ready_engine(&s, config()).await;
    let v2 = engine.encrypt(&seed(5), Api::V2).await.unwrap();
    let (fresh, events) = engine_cold(&s);
    s.primary.set(Faults {
        fail_with: Some(BackendError::Unavailable("gateway down".into())),
        ..Faults::default()
    });
    s.escrow_mem.set_state(KeyState::Disabled);
    let err = fresh
        .decrypt(&v2.ciphertext, Binding::V2 { key_id: &v2.key_id })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("gateway down"), "{err}");
    assert_eq!(events.unwraps.lock().unwrap()[0].2, "key_disabled");
    assert!(fresh.escrow_health()[0].1.is_err());
}

#[tokio::test]
async fn encrypt_never_fails_because_an_escrow_is_down_and_the_kek_is_replaced_once_it_is_back() {
    let s = setup();
    let cfg = EngineConfig {
        escrow_retry: Duration::ZERO,
        ..config()
    };
    s.escrow.set(Faults {
        fail_with: Some(BackendError::Unavailable("escrow region down".into())),
        ..Faults::default()
    });
    let (engine, events) = ready_engine(&s, cfg).await;
    let a = engine.encrypt(&seed(6), Api::V2).await.unwrap();
    assert_eq!(a.ciphertext[1], 1, "no escrow wrapping: format version 1");
    assert_eq!(events.wraps.lock().unwrap()[0].1, "unavailable");
    assert!(engine.escrow_health()[0].1.is_err());
    s.escrow.heal();
    let b = engine.encrypt(&seed(7), Api::V2).await.unwrap();
    assert!(b.backend_call, "the incomplete KEK was replaced");
    assert_eq!(
        b.ciphertext[1], 2,
        "the new KEK carries the escrow wrapping"
    );
    assert_ne!(a.kek_ref, b.kek_ref);
    let c = engine.encrypt(&seed(8), Api::V2).await.unwrap();
    assert!(!c.backend_call, "a complete KEK is kept");
    assert_eq!(c.kek_ref, b.kek_ref);
    for (sealed, i) in [(&a, 6), (&b, 7), (&c, 8)] {
        let out = engine
            .decrypt(
                &sealed.ciphertext,
                Binding::V2 {
                    key_id: &sealed.key_id,
                },
            )
            .await
            .unwrap();
        assert_eq!(&out.plaintext[..], &seed(i)[..]);
    }
}

#[tokio::test]
async fn a_plugin_without_escrow_still_reads_format_2_through_the_primary() {
    let s = setup();
    let (engine, _) = ready_engine(&s, config()).await;
    let v2 = engine.encrypt(&seed(9), Api::V2).await.unwrap();
    let plain = Engine::new(s.primary.clone(), config());
    let out = plain
        .decrypt(&v2.ciphertext, Binding::V2 { key_id: &v2.key_id })
        .await
        .unwrap();
    assert_eq!(&out.plaintext[..], &seed(9)[..]);
    // Tampering with the escrow section fails authentication (it is associated data).
    let mut bad = v2.ciphertext.clone();
    let at = bad.len() - 12 - 32 - 16 - 1;
    bad[at] ^= 1;
    assert!(plain
        .decrypt(&bad, Binding::V2 { key_id: &v2.key_id })
        .await
        .is_err());
}

#[tokio::test]
async fn a_deep_probe_reports_escrow_health_without_touching_status() {
    let s = setup();
    let (engine, _) = ready_engine(&s, config()).await;
    assert_eq!(engine.escrow_health(), [("vault", Ok(()))]);
    s.escrow.set(Faults {
        fail_with: Some(BackendError::Unavailable("escrow region down".into())),
        ..Faults::default()
    });
    engine
        .probe(true)
        .await
        .expect("an escrow outage does not fail the probe");
    assert_eq!(engine.status().healthz, "ok");
    let health = engine.escrow_health();
    assert!(
        health[0]
            .1
            .as_ref()
            .unwrap_err()
            .contains("escrow region down"),
        "{health:?}"
    );
    s.escrow.heal();
    engine.probe(true).await.unwrap();
    assert_eq!(engine.escrow_health(), [("vault", Ok(()))]);
}

/// An escrow backend that hangs is bounded by the backend timeout, counted as a timeout in the
/// escrow metrics and shown in the escrow health; Encrypt still succeeds, without its wrapping.
#[tokio::test]
async fn a_hanging_escrow_is_bounded_and_counted_as_a_timeout() {
    let s = setup();
    let cfg = EngineConfig {
        backend_timeout: Duration::from_millis(200),
        ..config()
    };
    s.escrow.set(Faults {
        delay: Some(Duration::from_secs(3600)),
        ..Faults::default()
    });
    let (engine, events) = ready_engine(&s, cfg).await;
    let sealed = engine.encrypt(&seed(9), Api::V2).await.unwrap();
    assert_eq!(
        sealed.ciphertext[1], 1,
        "no escrow wrapping: format version 1"
    );
    assert_eq!(
        events.wraps.lock().unwrap().as_slice(),
        &[("vault".to_string(), "timeout")]
    );
    let health = engine.escrow_health();
    assert!(
        health[0]
            .1
            .as_ref()
            .is_err_and(|e| e.contains("did not answer")),
        "{health:?}"
    );
}
