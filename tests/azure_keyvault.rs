//! The Azure Key Vault backend (official Rust SDK over the plugin's own HTTPS client) against the
//! Key Vault stand-in (tests/fakes/azure_keyvault_fake.py, proven against the official Python
//! client by tests/python/test_azure_keyvault_fake_sdk.py): conformance, rotation, per-version
//! revocation (disabled, expired, not yet valid), proxy answers, credentials (client secret,
//! workload identity, managed identity through IMDS, token renewal under load), a hanging
//! service, Managed HSM keys and the served binary over HTTPS with a private CA.
#![cfg(feature = "azure-keyvault")]
mod support;

use std::sync::Arc;
use std::time::Duration;

use kms_plugin::backend::azure_keyvault::{AzureCredential, AzureKeyVaultBackend};
use kms_plugin::backend::{Backend, BackendError};
use serde_json::json;
use support::azure_fake::{version_of, Fake, KEY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conforms_and_follows_rotation() {
    let Some(fake) = Fake::start() else { return };
    let fake = Arc::new(fake);
    let b = Arc::new(fake.backend());
    let first = b.current_key().await.unwrap();
    assert!(
        first
            .key_id
            .starts_with(&format!("{}/keys/{KEY}/", fake.url)),
        "{first:?}"
    );
    assert_eq!(
        first.key_ref,
        format!("RSA-OAEP-256/{}", version_of(&first.key_id))
    );
    let f2 = fake.clone();
    support::conformance::run(
        b.clone(),
        Some(Box::new(move || {
            let f = f2.clone();
            Box::pin(async move {
                f.key("rotate", None).await;
            })
        })),
    )
    .await;
    // The rotation is seen without a restart; the wrap names the version that wrapped.
    let now = b.current_key().await.unwrap();
    assert_ne!(now.key_id, first.key_id);
    let w = b.wrap(b"x").await.unwrap();
    assert_eq!(
        (w.key_id.as_str(), w.key_ref.as_str()),
        (now.key_id.as_str(), now.key_ref.as_str())
    );
}

#[tokio::test]
async fn each_wrap_goes_to_and_names_one_version() {
    let Some(fake) = Fake::start() else { return };
    let b = fake.backend();
    let v1 = b.current_key().await.unwrap();
    let w1 = b.wrap(b"under v1").await.unwrap();
    assert_eq!(w1.key_id, v1.key_id);
    let kid2 = fake.key("rotate", None).await;
    // Until the next probe the wrap stays on the version the probe named, and says so.
    let w = b.wrap(b"still v1").await.unwrap();
    assert_eq!(w.key_id, v1.key_id);
    assert_eq!(b.current_key().await.unwrap().key_id, kid2);
    let w2 = b.wrap(b"under v2").await.unwrap();
    assert_eq!(w2.key_id, kid2);
    assert_eq!(
        &b.unwrap(&w1.key_ref, &w1.ciphertext).await.unwrap()[..],
        b"under v1"
    );
    assert_eq!(
        &b.unwrap(&w2.key_ref, &w2.ciphertext).await.unwrap()[..],
        b"under v2"
    );
    // A pinned version is used even after a rotation.
    let mut args = fake.args();
    args.azure_keyvault_key_version = Some(version_of(&v1.key_id).to_string());
    let pinned = AzureKeyVaultBackend::new(&args).unwrap();
    assert_eq!(pinned.current_key().await.unwrap().key_id, v1.key_id);
    assert_eq!(pinned.wrap(b"p").await.unwrap().key_id, v1.key_id);
}

#[tokio::test]
async fn disabled_expired_or_not_yet_valid_version_revokes_only_its_data() {
    let Some(fake) = Fake::start() else { return };
    let b = fake.backend();
    let v1 = version_of(&b.current_key().await.unwrap().key_id).to_string();
    let w1 = b.wrap(b"one").await.unwrap();
    fake.key("rotate", None).await;
    b.current_key().await.unwrap();
    let w2 = b.wrap(b"two").await.unwrap();

    for (action, word) in [
        ("disable", "disabled"),
        ("expire", "expired"),
        ("not-yet-valid", "not yet valid"),
    ] {
        fake.key(action, Some(&v1)).await;
        let e = b.unwrap(&w1.key_ref, &w1.ciphertext).await.unwrap_err();
        assert!(
            matches!(&e, BackendError::KeyDisabled(m) if m.contains(word)),
            "{action}: {e:?}"
        );
        assert_eq!(
            &b.unwrap(&w2.key_ref, &w2.ciphertext).await.unwrap()[..],
            b"two"
        );
        b.current_key().await.unwrap();
        fake.key("enable", Some(&v1)).await;
        assert_eq!(
            &b.unwrap(&w1.key_ref, &w1.ciphertext).await.unwrap()[..],
            b"one"
        );
    }

    // The current version disabled: the probe and new wraps report it; nothing else is touched.
    fake.key("disable", None).await;
    let e = b.current_key().await.unwrap_err();
    assert!(matches!(e, BackendError::KeyDisabled(_)), "{e:?}");
    let e = b.wrap(b"three").await.unwrap_err();
    assert!(matches!(e, BackendError::KeyDisabled(_)), "{e:?}");
    assert_eq!(
        &b.unwrap(&w1.key_ref, &w1.ciphertext).await.unwrap()[..],
        b"one"
    );
    // An expired current version is as unusable, from the attributes getKey returns.
    fake.key("enable", None).await;
    fake.key("expire", None).await;
    let e = b.current_key().await.unwrap_err();
    assert!(
        matches!(&e, BackendError::KeyDisabled(m) if m.contains("expired")),
        "{e:?}"
    );
}

#[tokio::test]
async fn typed_denials_and_deleted_keys_are_revocations() {
    let Some(fake) = Fake::start() else { return };
    let b = fake.backend();
    let w = b.wrap(b"s").await.unwrap();
    fake.control("key", json!({"name": KEY, "action": "deny"}))
        .await;
    for e in [
        b.current_key().await.unwrap_err(),
        b.wrap(b"s").await.unwrap_err(),
        b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap_err(),
    ] {
        assert!(
            matches!(&e, BackendError::PermissionDenied(m) if m.contains("ForbiddenByRbac")),
            "{e:?}"
        );
    }
    fake.control("key", json!({"name": KEY, "action": "allow"}))
        .await;
    fake.key("delete", None).await;
    for e in [
        b.current_key().await.unwrap_err(),
        b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap_err(),
    ] {
        assert!(
            matches!(&e, BackendError::KeyNotFound(m) if m.contains("KeyNotFound")),
            "{e:?}"
        );
    }
    // A key without wrapKey / unwrapKey in key_ops cannot be the KEK: a configuration error.
    fake.control("key", json!({"name": "noops", "action": "create"}))
        .await;
    fake.control("key", json!({"name": "noops", "action": "drop-ops"}))
        .await;
    let mut args = fake.args();
    args.azure_keyvault_key = Some("noops".into());
    let e = AzureKeyVaultBackend::new(&args)
        .unwrap()
        .current_key()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BackendError::Config(m) if m.contains("wrapKey")),
        "{e:?}"
    );
}

#[tokio::test]
async fn proxy_answers_are_outages_not_revocations() {
    let Some(fake) = Fake::start() else { return };
    let b = fake.backend();
    let w = b.wrap(b"s").await.unwrap();
    for (status, body, ctype) in [
        (
            403,
            "<html><body>Forbidden by proxy policy</body></html>",
            "text/html",
        ),
        (404, "<html>404 Not Found</html>", "text/html"),
        (403, "", "text/plain"),
        (404, r#"{"error":"not found"}"#, "application/json"),
        (
            403,
            r#"{"error":{"code":"KeyNotFound","message":"wrong status"}}"#,
            "application/json",
        ),
        (401, "Unauthorized", "text/plain"),
        (502, "<html>Bad Gateway</html>", "text/html"),
    ] {
        fake.control(
            "fail",
            json!({"method": "*", "status": status, "count": -1, "body": body, "content_type": ctype}),
        )
        .await;
        for e in [
            b.current_key().await.unwrap_err(),
            b.wrap(b"s").await.unwrap_err(),
            b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap_err(),
        ] {
            assert!(!e.is_revocation(), "{status} {body:?}: {e:?}");
            assert!(e.is_transient(), "{status} {body:?}: {e:?}");
        }
        fake.control("clear-faults", json!({})).await;
    }
    assert_eq!(
        &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"s"
    );
}

#[tokio::test]
async fn foreign_or_tampered_wrappings_are_refused() {
    let Some(fake) = Fake::start() else { return };
    let b = fake.backend();
    let w = b.wrap(b"s").await.unwrap();
    let before = fake.stats().await["calls"]["unwrapKey"]
        .as_u64()
        .unwrap_or(0);
    for bad_ref in ["RSA1_5/abc", "RSA-OAEP-256/../../secrets/x", "nothing"] {
        let e = b.unwrap(bad_ref, &w.ciphertext).await.unwrap_err();
        assert!(
            matches!(e, BackendError::InvalidCiphertext(_)),
            "{bad_ref}: {e:?}"
        );
    }
    assert_eq!(
        fake.stats().await["calls"]["unwrapKey"]
            .as_u64()
            .unwrap_or(0),
        before
    );
    let mut bad = w.ciphertext.clone();
    bad[10] ^= 1;
    let e = b.unwrap(&w.key_ref, &bad).await.unwrap_err();
    assert!(matches!(e, BackendError::InvalidCiphertext(_)), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_renewed_under_load_without_a_failed_call() {
    let Some(fake) = Fake::start() else { return };
    // The SDK renews a token 5 minutes before it expires: a 302 s token is renewed after ~2 s.
    fake.control("token-ttl", json!({"seconds": 302})).await;
    let b = Arc::new(fake.backend());
    let w = b.wrap(b"load").await.unwrap();
    let issued0 = fake.stats().await["issued"]["client_secret"]
        .as_u64()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(5500);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (b, w) = (b.clone(), w.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u32;
            while tokio::time::Instant::now() < deadline {
                assert_eq!(
                    &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
                    b"load"
                );
                n += 1;
            }
            n
        }));
    }
    let mut calls = 0;
    for t in tasks {
        calls += t.await.unwrap();
    }
    let stats = fake.stats().await;
    let issued = stats["issued"]["client_secret"].as_u64().unwrap();
    assert!(issued > issued0, "no renewal in {calls} calls: {stats}");
    assert_eq!(
        stats["refused"]["expired"].as_u64().unwrap_or(0),
        0,
        "{stats}"
    );
    eprintln!("{calls} unwraps, {} token requests", issued - issued0);
}

#[tokio::test]
async fn workload_and_managed_identity() {
    let Some(fake) = Fake::start() else { return };
    // `auto` picks workload identity when a federated token file is given.
    let mut wi = fake.args();
    wi.azure_credential = AzureCredential::Auto;
    wi.azure_client_id = Some(fake.id("wi_client"));
    wi.azure_client_secret_file = None;
    wi.azure_federated_token_file = Some(fake.dir.path().join("federated-token"));
    let b = AzureKeyVaultBackend::new(&wi).unwrap();
    let w = b.wrap(b"wi").await.unwrap();
    assert_eq!(
        &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"wi"
    );
    assert!(
        fake.stats().await["issued"]["workload_identity"]
            .as_u64()
            .unwrap()
            >= 1
    );

    for client in [None, Some(fake.id("mi_client"))] {
        let mut mi = fake.args();
        mi.azure_credential = AzureCredential::ManagedIdentity;
        mi.azure_client_id = client;
        mi.azure_tenant_id = None;
        mi.azure_client_secret_file = None;
        mi.azure_imds_endpoint = Some(fake.imds_url.clone());
        let b = AzureKeyVaultBackend::new(&mi).unwrap();
        assert_eq!(
            &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
            b"wi"
        );
    }
    assert!(
        fake.stats().await["issued"]["managed_identity"]
            .as_u64()
            .unwrap()
            >= 2
    );

    // A wrong secret: Entra ID's typed refusal, never a revocation, and no secret in the text.
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("secret");
    std::fs::write(&wrong, "not-the-secret-value").unwrap();
    let mut bad = fake.args();
    bad.azure_client_secret_file = Some(wrong);
    let e = AzureKeyVaultBackend::new(&bad)
        .unwrap()
        .current_key()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BackendError::Authentication(m) if m.contains("AADSTS7000215")),
        "{e:?}"
    );
    assert!(!e.to_string().contains("not-the-secret-value"));
    // An IMDS that answers 500 (as it does while the identity is being assigned) is an outage.
    fake.control(
        "fail",
        json!({"method": "imds", "status": 500, "count": -1}),
    )
    .await;
    let mut mi = fake.args();
    mi.azure_credential = AzureCredential::ManagedIdentity;
    mi.azure_imds_endpoint = Some(fake.imds_url.clone());
    let t = std::time::Instant::now();
    let e = AzureKeyVaultBackend::new(&mi)
        .unwrap()
        .current_key()
        .await
        .unwrap_err();
    assert!(e.is_transient() && !e.is_revocation(), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}

#[tokio::test]
async fn challenge_resource_is_checked_by_default() {
    let Some(fake) = Fake::start() else { return };
    let mut args = fake.args();
    args.azure_keyvault_skip_challenge_resource_check = false;
    let e = AzureKeyVaultBackend::new(&args)
        .unwrap()
        .current_key()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BackendError::Config(m) if m.contains("--azure-keyvault-skip-challenge-resource-check")),
        "{e:?}"
    );
    // No token was asked for: the challenge is refused before any credential is used.
    assert!(fake.stats().await["issued"].get("client_secret").is_none());
}

#[tokio::test]
async fn a_hanging_service_is_a_bounded_failure() {
    let Some(fake) = Fake::start() else { return };
    let b = fake.backend();
    let w = b.wrap(b"s").await.unwrap();
    fake.control(
        "latency",
        json!({"method": "*", "seconds": 30, "count": -1}),
    )
    .await;
    for op in ["probe", "wrap", "unwrap"] {
        let t = std::time::Instant::now();
        let e = match op {
            "probe" => b.current_key().await.map(|_| ()),
            "wrap" => b.wrap(b"s").await.map(|_| ()),
            _ => b.unwrap(&w.key_ref, &w.ciphertext).await.map(|_| ()),
        }
        .unwrap_err();
        assert!(e.is_transient() && !e.is_revocation(), "{op}: {e:?}");
        assert!(
            t.elapsed() < Duration::from_millis(3500),
            "{op} took {:?}",
            t.elapsed()
        );
    }
    fake.control("clear-faults", json!({})).await;
}

#[tokio::test]
async fn managed_hsm_oct_key_wraps_with_a256kw() {
    let Some(fake) = Fake::start_hsm() else {
        return;
    };
    let b = fake.backend();
    let id = b.current_key().await.unwrap();
    assert!(id.key_ref.starts_with("A256KW/"), "{id:?}");
    let w = b.wrap(&[9; 32]).await.unwrap();
    assert_eq!(w.ciphertext.len(), 40);
    assert_eq!(
        &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        &[9; 32]
    );
    fake.key("rotate", None).await;
    assert_ne!(b.current_key().await.unwrap().key_id, id.key_id);
    assert_eq!(
        &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        &[9; 32]
    );
}

#[tokio::test]
async fn disabled_version_through_the_engine_revokes_only_its_data() {
    use kms_plugin::engine::{Api, Binding, Engine, EngineConfig, KeyHealth};
    let Some(fake) = Fake::start() else { return };
    let b: Arc<dyn Backend> = Arc::new(fake.backend());
    let engine = Engine::new(b.clone(), EngineConfig::default());
    engine.probe(true).await.unwrap();
    let old = engine.encrypt(&[1; 32], Api::V2).await.unwrap();
    let v1 = b.current_key().await.unwrap().key_ref;
    fake.key("rotate", None).await;
    engine.probe(false).await.unwrap();
    let new = engine.encrypt(&[2; 32], Api::V2).await.unwrap();
    assert_ne!(old.key_id, new.key_id);
    let v2 = b.current_key().await.unwrap().key_ref;

    fake.key("disable", Some(version_of(&v1))).await;
    engine.probe(true).await.unwrap();
    assert!(matches!(engine.key_health(&v1), KeyHealth::Revoked(_)));
    assert_eq!(engine.key_health(&v2), KeyHealth::Active);
    assert!(engine
        .decrypt(
            &old.ciphertext,
            Binding::V2 {
                key_id: &old.key_id
            }
        )
        .await
        .is_err());
    let back = engine
        .decrypt(
            &new.ciphertext,
            Binding::V2 {
                key_id: &new.key_id,
            },
        )
        .await
        .unwrap();
    assert_eq!(&back.plaintext[..], &[2; 32]);
    assert_eq!(engine.status().healthz, "ok");
}

#[tokio::test]
async fn proxy_403_through_the_engine_keeps_cached_keys() {
    use kms_plugin::engine::{Api, Binding, Engine, EngineConfig, KeyHealth};
    let Some(fake) = Fake::start() else { return };
    let b: Arc<dyn Backend> = Arc::new(fake.backend());
    let engine = Engine::new(b.clone(), EngineConfig::default());
    engine.probe(true).await.unwrap();
    let v1 = b.current_key().await.unwrap().key_ref;
    let sealed = engine.encrypt(&[7; 32], Api::V2).await.unwrap();
    fake.control(
        "fail",
        json!({"method": "*", "status": 403, "count": -1,
               "body": "<html>Access denied by egress proxy</html>", "content_type": "text/html"}),
    )
    .await;
    let _ = engine.probe(true).await;
    assert_eq!(engine.key_health(&v1), KeyHealth::Active);
    let back = engine
        .decrypt(
            &sealed.ciphertext,
            Binding::V2 {
                key_id: &sealed.key_id,
            },
        )
        .await
        .unwrap();
    assert_eq!(&back.plaintext[..], &[7; 32]);
    fake.control("clear-faults", json!({})).await;
    engine.probe(true).await.unwrap();
    assert_eq!(engine.status().healthz, "ok");
}

// Multi-threaded: the test's gRPC connections must close while terminate() blocks this thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_over_https_with_a_private_ca() {
    use support::plugin::{socket_conformance, wait_for_key_id_change, Plugin};
    let Some(fake) = Fake::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kms.sock");
    let secret = fake.dir.path().join("client-secret").display().to_string();
    let base: Vec<String> = [
        "serve",
        "--listen",
        &format!("unix://{}", socket.display()),
        "--backend",
        "azure-keyvault",
        "--azure-keyvault-url",
        &fake.url,
        "--azure-keyvault-key",
        KEY,
        "--azure-credential",
        "client-secret",
        "--azure-tenant-id",
        &fake.id("tenant"),
        "--azure-client-id",
        &fake.id("sp_client"),
        "--azure-client-secret-file",
        &secret,
        "--azure-authority-host",
        &fake.url,
        "--azure-keyvault-skip-challenge-resource-check",
        "--probe-interval",
        "200ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let addr = kms_plugin::protocol::socket::ListenAddr::Path(socket.clone());

    // Without the CA the server is not trusted: the plugin serves, unhealthy, and says why.
    // The system store (or the bundled roots) does not hold the stand-in's CA.
    let env: [(&str, &str); 0] = [];
    let mut p = Plugin::spawn_with_env(&base, &env, addr.clone(), dir.path());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !p.log_text().contains("certificate is not trusted") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no hint: {}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.terminate();
    let _ = std::fs::remove_file(&socket);

    let mut args = base.clone();
    args.extend([
        "--azure-keyvault-ca-file".to_string(),
        fake.ca_file().display().to_string(),
    ]);
    let mut p = Plugin::spawn_with_env(&args, &env, addr.clone(), dir.path());
    p.wait_healthy(Duration::from_secs(20)).await;
    socket_conformance(&addr, &socket).await;
    let before = support::plugin::try_status(&addr).await.unwrap().key_id;
    fake.key("rotate", None).await;
    let after = wait_for_key_id_change(&addr, &before, Duration::from_secs(20)).await;
    assert!(after.contains(&format!("/keys/{KEY}/")), "{after}");
    p.terminate();
    let log = p.log_text();
    let secret_value = std::fs::read_to_string(fake.dir.path().join("client-secret")).unwrap();
    assert!(!log.contains(&secret_value), "client secret in the log");
    assert!(!log.contains("eyJ"), "a token in the log");
    assert!(!log.contains(" ERROR "), "errors on a healthy run: {log}");
}
