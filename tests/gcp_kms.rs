//! The Google Cloud KMS backend (official Rust SDK, HTTP/JSON) against the Cloud KMS stand-in
//! (tests/fakes/gcp_kms_fake.py, proven against the official Python client by
//! tests/python/test_gcp_kms_fake_sdk.py): conformance, rotation, per-version revocation, proxy
//! answers, credentials (service-account JWT, workload identity federation with token expiry,
//! the metadata server) and the served binary.
#![cfg(feature = "gcp-kms")]
mod support;

use std::sync::Arc;
use std::time::Duration;

use kms_plugin::backend::gcp_kms::GcpKmsBackend;
use kms_plugin::backend::{Backend, BackendError};
use serde_json::json;
use support::gcp_fake::{version, Fake, KEY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conforms_and_follows_rotation() {
    let Some(fake) = Fake::start() else { return };
    let fake = Arc::new(fake);
    let b = Arc::new(fake.backend(Some("cluster-a")).await);
    assert_eq!(b.current_key().await.unwrap().key_id, version(1));
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
    // The rotation is seen without a restart; Encrypt names the version that wrapped.
    let id = b.current_key().await.unwrap();
    assert_eq!(id.key_id, version(2));
    let w = b.wrap(b"x").await.unwrap();
    assert_eq!(
        (w.key_id.as_str(), w.key_ref.as_str()),
        (version(2).as_str(), version(2).as_str())
    );
}

#[tokio::test]
async fn wrap_names_the_version_that_wrapped() {
    let Some(fake) = Fake::start() else { return };
    let b = fake.backend(None).await;
    let w1 = b.wrap(b"under v1").await.unwrap();
    assert_eq!(w1.key_id, version(1));
    // Rotated between probe and wrap: the label follows Encrypt's answer, not the probe.
    fake.key("rotate", None).await;
    let w2 = b.wrap(b"under v2").await.unwrap();
    assert_eq!(w2.key_id, version(2));
    assert_eq!(
        &b.unwrap(&w1.key_ref, &w1.ciphertext).await.unwrap()[..],
        b"under v1"
    );
    assert_eq!(
        &b.unwrap(&w2.key_ref, &w2.ciphertext).await.unwrap()[..],
        b"under v2"
    );
}

#[tokio::test]
async fn disabled_or_destroyed_version_revokes_only_its_data() {
    let Some(fake) = Fake::start() else { return };
    let b = fake.backend(Some("c")).await;
    let w1 = b.wrap(b"one").await.unwrap();
    fake.key("rotate", None).await;
    let w2 = b.wrap(b"two").await.unwrap();

    fake.key("disable", Some(1)).await;
    let e = b.unwrap(&w1.key_ref, &w1.ciphertext).await.unwrap_err();
    assert!(
        matches!(&e, BackendError::KeyDisabled(m) if m.contains("cryptoKeyVersions/1")),
        "{e:?}"
    );
    assert_eq!(
        &b.unwrap(&w2.key_ref, &w2.ciphertext).await.unwrap()[..],
        b"two"
    );
    assert_eq!(b.current_key().await.unwrap().key_id, version(2));

    fake.key("enable", Some(1)).await;
    assert_eq!(
        &b.unwrap(&w1.key_ref, &w1.ciphertext).await.unwrap()[..],
        b"one"
    );

    fake.key("destroy", Some(1)).await;
    let e = b.unwrap(&w1.key_ref, &w1.ciphertext).await.unwrap_err();
    assert!(matches!(e, BackendError::KeyNotFound(_)), "{e:?}");
    assert_eq!(
        &b.unwrap(&w2.key_ref, &w2.ciphertext).await.unwrap()[..],
        b"two"
    );

    // The primary disabled: the probe and new wraps report it; nothing else is touched.
    fake.key("disable", Some(2)).await;
    let e = b.current_key().await.unwrap_err();
    assert!(matches!(e, BackendError::KeyDisabled(_)), "{e:?}");
    let e = b.wrap(b"three").await.unwrap_err();
    assert!(matches!(e, BackendError::KeyDisabled(_)), "{e:?}");
}

#[tokio::test]
async fn typed_denials_and_missing_keys_are_revocations() {
    let Some(fake) = Fake::start() else { return };
    let b = fake.backend(None).await;
    let w = b.wrap(b"s").await.unwrap();
    fake.control("key", json!({"name": KEY, "action": "deny"}))
        .await;
    for e in [
        b.current_key().await.unwrap_err(),
        b.wrap(b"s").await.unwrap_err(),
        b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap_err(),
    ] {
        assert!(
            matches!(&e, BackendError::PermissionDenied(m) if m.contains("IAM_PERMISSION_DENIED")),
            "{e:?}"
        );
    }
    fake.control("key", json!({"name": KEY, "action": "allow"}))
        .await;

    let mut args = fake.args(&fake.sa_file(), None);
    args.gcp_kms_key = Some(KEY.replace("/kek", "/missing"));
    let missing = GcpKmsBackend::new(&args).await.unwrap();
    let e = missing.current_key().await.unwrap_err();
    assert!(matches!(e, BackendError::KeyNotFound(_)), "{e:?}");
}

#[tokio::test]
async fn proxy_answers_are_outages_not_revocations() {
    let Some(fake) = Fake::start() else { return };
    let b = fake.backend(None).await;
    let w = b.wrap(b"s").await.unwrap();
    for (status, body, ctype) in [
        (
            403,
            "<html><body>Forbidden by proxy policy</body></html>",
            "text/html",
        ),
        (404, "<html>404 Not Found</html>", "text/html"),
        (403, "", "text/plain"),
        (
            404,
            r#"{"error":{"code":404,"message":"no route"}}"#,
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

/// Cloud KMS's CRC32C fields: every request carries its checksums (the stand-in checks them as
/// the service does), and an answer damaged on the way back is retried a few times and then an
/// outage, never stored and never a revocation.
#[tokio::test]
async fn damaged_answers_are_retried_then_outages() {
    let Some(fake) = Fake::start() else { return };
    let b = fake.backend(Some("cluster-a")).await;
    let calls = |s: serde_json::Value, m: &str| s["calls"][m].as_u64().unwrap_or(0);
    let before = fake.stats().await;
    fake.control("corrupt", json!({"method": "encrypt", "count": 1}))
        .await;
    let w = b.wrap(b"damaged once").await.unwrap();
    fake.control("corrupt", json!({"method": "decrypt", "count": 2}))
        .await;
    assert_eq!(
        &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"damaged once"
    );
    let after = fake.stats().await;
    assert_eq!(
        calls(after.clone(), "encrypt") - calls(before.clone(), "encrypt"),
        2
    );
    assert_eq!(calls(after, "decrypt") - calls(before, "decrypt"), 3);
    for method in ["encrypt", "decrypt"] {
        fake.control("corrupt", json!({"method": method, "count": 3}))
            .await;
        let e = if method == "encrypt" {
            b.wrap(b"x").await.unwrap_err()
        } else {
            b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap_err()
        };
        assert!(matches!(e, BackendError::Unavailable(_)), "{method}: {e:?}");
        assert!(e.to_string().contains("CRC32C"), "{e}");
    }
    fake.control("clear-faults", json!({})).await;
    assert_eq!(
        &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"damaged once"
    );
}

#[tokio::test]
async fn aad_and_foreign_key_refs_are_refused() {
    let Some(fake) = Fake::start() else { return };
    let a = fake.backend(Some("cluster-a")).await;
    let w = a.wrap(b"s").await.unwrap();
    let other = fake.backend(Some("cluster-b")).await;
    let e = other.unwrap(&w.key_ref, &w.ciphertext).await.unwrap_err();
    assert!(matches!(e, BackendError::InvalidCiphertext(_)), "{e:?}");
    let none = fake.backend(None).await;
    assert!(none.unwrap(&w.key_ref, &w.ciphertext).await.is_err());
    // A key_ref naming another key is refused before any call.
    let before = fake.stats().await["calls"]["decrypt"].as_u64().unwrap_or(0);
    let foreign = w.key_ref.replace("/kek/", "/other/");
    let e = a.unwrap(&foreign, &w.ciphertext).await.unwrap_err();
    assert!(matches!(e, BackendError::InvalidCiphertext(_)), "{e:?}");
    assert_eq!(
        fake.stats().await["calls"]["decrypt"].as_u64().unwrap_or(0),
        before
    );
    // Tampered ciphertext.
    let mut bad = w.ciphertext.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let e = a.unwrap(&w.key_ref, &bad).await.unwrap_err();
    assert!(matches!(e, BackendError::InvalidCiphertext(_)), "{e:?}");
}

#[tokio::test]
async fn workload_identity_tokens_are_renewed_before_expiry() {
    let Some(fake) = Fake::start() else { return };
    // google-cloud-auth renews a token 4 minutes before expiry, or every 10 s when it lives
    // shorter: an 11 s token must be replaced before it expires, with no call failing.
    fake.control("token-ttl", json!({"seconds": 11})).await;
    let start = tokio::time::Instant::now();
    let b = GcpKmsBackend::new(&fake.args(&fake.external_file(), None))
        .await
        .unwrap();
    let w = b.wrap(b"wif").await.unwrap();
    // Keep working across several token lifetimes: every call must succeed, and STS must have
    // been asked again (the stand-in refuses expired tokens).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert_eq!(
            &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
            b"wif"
        );
        b.current_key().await.unwrap();
        let issued = fake.stats().await["issued"]["sts"].as_u64().unwrap_or(0);
        if issued >= 2 && start.elapsed() > Duration::from_secs(12) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "STS asked {issued} times"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        fake.stats().await["refused"]["expired"]
            .as_u64()
            .unwrap_or(0),
        0
    );
}

#[tokio::test]
async fn bad_credentials_are_clear_errors() {
    let Some(fake) = Fake::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("creds.json");
    std::fs::write(
        &f,
        r#"{"type":"authorized_user","client_secret":"s3cr3t-value"}"#,
    )
    .unwrap();
    let e = GcpKmsBackend::new(&fake.args(&f, None)).await.unwrap_err();
    assert!(
        matches!(&e, BackendError::Config(m) if m.contains("authorized_user") && !m.contains("s3cr3t")),
        "{e:?}"
    );
    std::fs::write(&f, "-----BEGIN PRIVATE KEY----- not json").unwrap();
    let e = GcpKmsBackend::new(&fake.args(&f, None)).await.unwrap_err();
    assert!(
        matches!(&e, BackendError::Config(m) if !m.contains("PRIVATE")),
        "{e:?}"
    );
    // A service-account key the service does not know: Google's typed 401.
    let mut sa: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fake.sa_file()).unwrap()).unwrap();
    sa["client_email"] = json!("someone-else@kms-plugin-test.iam.gserviceaccount.com");
    std::fs::write(&f, sa.to_string()).unwrap();
    let b = GcpKmsBackend::new(&fake.args(&f, None)).await.unwrap();
    let e = b.current_key().await.unwrap_err();
    assert!(matches!(e, BackendError::Authentication(_)), "{e:?}");
    // A bad key name is a configuration error before any call.
    let mut args = fake.args(&fake.sa_file(), None);
    args.gcp_kms_key = Some("projects/p/keyRings/r/cryptoKeys/k".into());
    assert!(matches!(
        GcpKmsBackend::new(&args).await.unwrap_err(),
        BackendError::Config(_)
    ));
}

// Multi-threaded: the test's gRPC connections must close while terminate() blocks this thread,
// or the plugin waits for them until its shutdown timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_with_metadata_server_credentials() {
    use support::plugin::{socket_conformance, wait_for_key_id_change};
    let Some(fake) = Fake::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kms.sock");
    let args: Vec<String> = [
        "serve",
        "--listen",
        &format!("unix://{}", socket.display()),
        "--backend",
        "gcp-kms",
        "--gcp-kms-key",
        KEY,
        "--gcp-kms-endpoint",
        &fake.url,
        "--probe-interval",
        "200ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // No key file anywhere: ADC falls through to the metadata server (the stand-in).
    let home = dir.path().display().to_string();
    let mds = fake.url.trim_start_matches("http://").to_string();
    let env = [("HOME", home.as_str()), ("GCE_METADATA_HOST", mds.as_str())];
    let addr = kms_plugin::protocol::socket::ListenAddr::Path(socket.clone());
    let mut p = support::gcp_fake::spawn_plugin_adc(&args, &env, addr.clone(), dir.path());
    p.wait_healthy(Duration::from_secs(20)).await;
    socket_conformance(&addr, &socket).await;
    let before = support::plugin::try_status(&addr).await.unwrap().key_id;
    assert!(before.contains("cryptoKeyVersions/1"), "{before}");
    fake.key("rotate", None).await;
    let after = wait_for_key_id_change(&addr, &before, Duration::from_secs(20)).await;
    assert!(after.contains("cryptoKeyVersions/2"), "{after}");
    assert!(
        fake.stats().await["issued"]["metadata"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    );
    p.terminate();
    let log = p.log_text();
    assert!(!log.contains("ya29."), "access token in the log");
    assert!(!log.contains(" ERROR "), "errors on a healthy run: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_ca_through_ssl_cert_file() {
    use support::plugin::socket_conformance;
    let Some(fake) = Fake::start_tls() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kms.sock");
    let sa = fake.sa_file().display().to_string();
    let ca = fake.dir.path().join("ca.pem").display().to_string();
    let args: Vec<String> = [
        "serve",
        "--listen",
        &format!("unix://{}", socket.display()),
        "--backend",
        "gcp-kms",
        "--gcp-kms-key",
        KEY,
        "--gcp-kms-endpoint",
        &fake.url,
        "--gcp-credentials-file",
        &sa,
        "--probe-interval",
        "200ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let home = dir.path().display().to_string();
    let addr = kms_plugin::protocol::socket::ListenAddr::Path(socket.clone());

    // Without the CA the server is not trusted: the plugin serves, unhealthy, and says why.
    let mut p = support::gcp_fake::spawn_plugin_adc(
        &args,
        &[("HOME", home.as_str()), ("SSL_CERT_FILE", "/nonexistent")],
        addr.clone(),
        dir.path(),
    );
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

    let mut p = support::gcp_fake::spawn_plugin_adc(
        &args,
        &[("HOME", home.as_str()), ("SSL_CERT_FILE", ca.as_str())],
        addr.clone(),
        dir.path(),
    );
    p.wait_healthy(Duration::from_secs(20)).await;
    socket_conformance(&addr, &socket).await;
    p.terminate();
    let log = p.log_text();
    assert!(!log.contains("PRIVATE KEY"), "key material in the log");
}

#[tokio::test]
async fn disabled_version_through_the_engine_revokes_only_its_data() {
    use kms_plugin::engine::{Api, Binding, Engine, EngineConfig, KeyHealth};
    let Some(fake) = Fake::start() else { return };
    let b: Arc<dyn Backend> = Arc::new(fake.backend(Some("cluster-a")).await);
    let engine = Engine::new(b.clone(), EngineConfig::default());
    engine.probe(true).await.unwrap();
    let old = engine.encrypt(&[1; 32], Api::V2).await.unwrap();
    fake.key("rotate", None).await;
    engine.probe(false).await.unwrap();
    let new = engine.encrypt(&[2; 32], Api::V2).await.unwrap();
    assert_ne!(old.key_id, new.key_id);
    assert!(new.key_id.contains("cryptoKeyVersions/2"), "{}", new.key_id);

    fake.key("disable", Some(1)).await;
    engine.probe(true).await.unwrap();
    assert!(matches!(
        engine.key_health(&version(1)),
        KeyHealth::Revoked(_)
    ));
    assert_eq!(engine.key_health(&version(2)), KeyHealth::Active);
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
    let b: Arc<dyn Backend> = Arc::new(fake.backend(None).await);
    let engine = Engine::new(b.clone(), EngineConfig::default());
    engine.probe(true).await.unwrap();
    let sealed = engine.encrypt(&[7; 32], Api::V2).await.unwrap();
    fake.control(
        "fail",
        json!({"method": "*", "status": 403, "count": -1,
               "body": "<html>Access denied by egress proxy</html>", "content_type": "text/html"}),
    )
    .await;
    let _ = engine.probe(true).await;
    assert_eq!(engine.key_health(&version(1)), KeyHealth::Active);
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

#[tokio::test]
async fn a_hanging_service_is_a_bounded_failure() {
    let Some(fake) = Fake::start() else { return };
    let b = fake.backend(None).await;
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
async fn sdk_request_logging_is_refused() {
    let Some(fake) = Fake::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kms.sock");
    let sa = fake.sa_file().display().to_string();
    let args: Vec<String> = [
        "serve",
        "--listen",
        &format!("unix://{}", socket.display()),
        "--backend",
        "gcp-kms",
        "--gcp-kms-key",
        KEY,
        "--gcp-kms-endpoint",
        &fake.url,
        "--gcp-credentials-file",
        &sa,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let addr = kms_plugin::protocol::socket::ListenAddr::Path(socket.clone());
    let mut p = support::gcp_fake::spawn_plugin_adc(
        &args,
        &[("GOOGLE_CLOUD_RUST_LOGGING", "true")],
        addr,
        dir.path(),
    );
    let status = p.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    assert!(
        p.log_text().contains("GOOGLE_CLOUD_RUST_LOGGING"),
        "{}",
        p.log_text()
    );
}
