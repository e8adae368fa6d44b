//! The KMIP backend against a real PyKMIP server (`pykmip-server` from the test venv, mutual TLS
//! with a test CA): the conformance suite with rotation (a new key with the same name), the newest
//! Active key winning, Revoke and Destroy revoking through the engine, the server going down and
//! coming back, non-KMIP answers and TLS failures as outages, another identity refused in KMIP's
//! own words, a hung connection holding one pool slot only, and the served binary's socket
//! conformance.
#![cfg(feature = "kmip")]
mod support;

use std::sync::Arc;
use std::time::Duration;

use kms_plugin::backend::kmip::{KmipArgs, KmipBackend};
use kms_plugin::backend::{Backend, BackendError};
use kms_plugin::engine::{Api, Binding, Engine, EngineConfig, KeyHealth};
use support::external::{start_pykmip, PyKmip};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn args(k: &PyKmip, endpoint: &str) -> KmipArgs {
    KmipArgs {
        kmip_endpoint: Some(endpoint.to_string()),
        kmip_ca_file: Some(k.certs.join("ca.pem")),
        kmip_cert_file: Some(k.certs.join("client.pem")),
        kmip_key_file: Some(k.certs.join("client-key.pem")),
        kmip_key_name: Some("k8s".into()),
        kmip_timeout: Duration::from_secs(5),
        kmip_pool_size: 4,
        ..Default::default()
    }
}

fn backend(k: &PyKmip) -> Arc<KmipBackend> {
    Arc::new(KmipBackend::new(&args(k, &k.endpoint)).unwrap())
}

/// Runs blocking admin calls (a Python process) off the async runtime.
async fn admin(k: &Arc<PyKmip>, cmd: &'static [&'static str]) -> String {
    let k = k.clone();
    tokio::task::spawn_blocking(move || k.admin(cmd))
        .await
        .unwrap()
}

#[tokio::test]
async fn conforms_and_follows_rotation_to_the_newest_active_key() {
    let Some(k) = start_pykmip() else { return };
    let k = Arc::new(k);
    let first = k.create_key("k8s");
    k.create_key("other-name");
    let b = backend(&k);
    assert_eq!(b.current_key().await.unwrap().key_id, first);
    let kk = k.clone();
    support::conformance::run(
        b.clone(),
        Some(Box::new(move || {
            let kk = kk.clone();
            Box::pin(async move {
                admin(&kk, &["create", "k8s"]).await;
            })
        })),
    )
    .await;
    // Rotation left the old key Active: the newest one is current, the old one still unwraps.
    let second = b.current_key().await.unwrap().key_id;
    assert_ne!(second, first);
    let w = b.wrap(b"x").await.unwrap();
    assert_eq!(
        (w.key_ref.as_str(), w.key_id.as_str()),
        (&*second, &*second)
    );
    // Several Active keys created within the same second: the latest unique identifier wins;
    // revoking it makes the previous one current again (no key_id ever goes back to an older
    // value in the engine: it is another key, and the engine tracks it as such).
    let third = k.create_key("k8s");
    let fourth = k.create_key("k8s");
    assert_eq!(b.current_key().await.unwrap().key_id, fourth);
    k.admin(&["revoke", &fourth]);
    assert_eq!(b.current_key().await.unwrap().key_id, third);
    // A fixed unique identifier.
    let by_id = KmipBackend::new(&KmipArgs {
        kmip_key_name: None,
        kmip_key_id: Some(first.clone()),
        ..args(&k, &k.endpoint)
    })
    .unwrap();
    assert_eq!(by_id.current_key().await.unwrap().key_id, first);
    let w = by_id.wrap(b"fixed").await.unwrap();
    assert_eq!(
        &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"fixed"
    );
    // A key of another name cannot be named by a ciphertext.
    let foreign = k.create_key("not-k8s");
    let fw = KmipBackend::new(&KmipArgs {
        kmip_key_name: None,
        kmip_key_id: Some(foreign.clone()),
        ..args(&k, &k.endpoint)
    })
    .unwrap()
    .wrap(b"foreign")
    .await
    .unwrap();
    let err = b.unwrap(&fw.key_ref, &fw.ciphertext).await.unwrap_err();
    assert!(matches!(err, BackendError::InvalidCiphertext(_)), "{err:?}");
}

#[tokio::test]
async fn revoke_and_destroy_are_revocations_through_the_engine() {
    let Some(k) = start_pykmip() else { return };
    let old_key = k.create_key("k8s");
    let b = backend(&k);
    let engine = Engine::new(b.clone(), EngineConfig::default());
    engine.probe(true).await.unwrap();
    let old = engine.encrypt(&[1; 32], Api::V2).await.unwrap();
    let new_key = k.create_key("k8s");
    engine.probe(false).await.unwrap();
    let new = engine.encrypt(&[2; 32], Api::V2).await.unwrap();
    assert_ne!(old.key_id, new.key_id);
    assert!(new.key_id.ends_with(&new_key), "{}", new.key_id);

    // Revoke (Deactivated): PyKMIP refuses to decrypt with it, in its own typed answer.
    k.admin(&["revoke", &old_key]);
    assert_eq!(k.admin(&["state", &old_key]), "DEACTIVATED");
    let w = kms_plugin::engine::format::parse(&old.ciphertext).unwrap();
    let err = b.unwrap(w.key_ref, w.wrapped).await.unwrap_err();
    assert!(err.is_revocation(), "{err:?}");
    engine.probe(true).await.unwrap();
    assert!(matches!(engine.key_health(&old_key), KeyHealth::Revoked(_)));
    assert_eq!(engine.key_health(&new_key), KeyHealth::Active);
    let k_old = old.key_id.clone();
    assert!(engine
        .decrypt(&old.ciphertext, Binding::V2 { key_id: &k_old })
        .await
        .is_err());
    let k_new = new.key_id.clone();
    let back = engine
        .decrypt(&new.ciphertext, Binding::V2 { key_id: &k_new })
        .await
        .unwrap();
    assert_eq!(&back.plaintext[..], &[2; 32]);
    assert_eq!(engine.status().healthz, "ok");

    // Destroy the current key: no Active key is left, the current key is revoked.
    k.admin(&["destroy", &new_key]);
    let err = b.current_key().await.unwrap_err();
    assert!(err.is_revocation(), "{err:?}");
    assert!(
        err.to_string().contains(&old_key),
        "the error lists the keys it saw: {err}"
    );
    let w = kms_plugin::engine::format::parse(&new.ciphertext).unwrap();
    let err = b.unwrap(w.key_ref, w.wrapped).await.unwrap_err();
    assert!(matches!(err, BackendError::KeyNotFound(_)), "{err:?}");
    assert!(engine.probe(true).await.is_err());
    assert!(engine.probe(true).await.is_err());
    assert_ne!(engine.status().healthz, "ok");
    assert!(matches!(engine.key_health(&new_key), KeyHealth::Revoked(_)));
    // A fixed unique identifier that was destroyed: not found.
    let gone = KmipBackend::new(&KmipArgs {
        kmip_key_name: None,
        kmip_key_id: Some(new_key.clone()),
        ..args(&k, &k.endpoint)
    })
    .unwrap();
    let err = gone.current_key().await.unwrap_err();
    assert!(matches!(err, BackendError::KeyNotFound(_)), "{err:?}");
}

#[tokio::test]
async fn server_down_is_an_outage_and_status_recovers() {
    let Some(mut k) = start_pykmip() else { return };
    let uid = k.create_key("k8s");
    let b = backend(&k);
    let engine = Engine::new(b.clone(), EngineConfig::default());
    engine.probe(true).await.unwrap();
    let sealed = engine.encrypt(&[7; 32], Api::V1).await.unwrap();
    k.stop();
    let err = b.current_key().await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(engine.probe(true).await.is_err());
    assert_eq!(engine.key_health(&uid), KeyHealth::Active);
    let back = engine
        .decrypt(&sealed.ciphertext, Binding::V1)
        .await
        .unwrap();
    assert_eq!(&back.plaintext[..], &[7; 32]);
    assert_ne!(engine.status().healthz, "ok");
    assert!(k.start_again(), "PyKMIP did not come back");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while engine.probe(true).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the engine did not recover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(engine.status().healthz, "ok");
    assert_eq!(engine.key_health(&uid), KeyHealth::Active);
    // A restart while nobody calls leaves dead connections in the pool: the next calls find them
    // broken, re-dial once, and succeed.
    for _ in 0..3 {
        b.current_key().await.unwrap();
    }
    assert!(k.start_again(), "PyKMIP did not restart");
    b.current_key()
        .await
        .expect("a call after a quiet restart re-dials");
    let w = b.wrap(b"after restart").await.unwrap();
    assert_eq!(
        &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"after restart"
    );
}

/// What a listener answers after accepting (and, for TLS, completing the handshake).
#[derive(Clone, Copy)]
enum Junk {
    Http,
    Truncated,
    WrongMessage,
}

impl Junk {
    fn bytes(self) -> Vec<u8> {
        match self {
            Junk::Http => b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n".to_vec(),
            // A Response Message header announcing 64 bytes, then the connection closes.
            Junk::Truncated => vec![0x42, 0x00, 0x7B, 0x01, 0, 0, 0, 0x40, 0x42, 0x00],
            // Well-formed TTLV, but a Request Message.
            Junk::WrongMessage => vec![0x42, 0x00, 0x78, 0x01, 0, 0, 0, 0],
        }
    }
}

async fn junk_tls_server(k: &PyKmip, junk: Junk) -> String {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(k.certs.join("server.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(k.certs.join("server-key.pem")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 512];
                let _ = tls.read(&mut buf).await;
                let _ = tls.write_all(&junk.bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr.to_string()
}

async fn junk_tcp_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp.write_all(&Junk::Http.bytes()).await;
            });
        }
    });
    addr.to_string()
}

#[tokio::test]
async fn non_kmip_answers_and_tls_failures_are_outages() {
    let Some(k) = start_pykmip() else { return };
    let mut endpoints = vec![("plain HTTP", junk_tcp_server().await)];
    for (what, junk) in [
        ("HTTP over TLS", Junk::Http),
        ("a truncated message", Junk::Truncated),
        ("a Request Message", Junk::WrongMessage),
    ] {
        endpoints.push((what, junk_tls_server(&k, junk).await));
    }
    // Nothing listening.
    endpoints.push((
        "a closed port",
        format!("127.0.0.1:{}", support::external::free_port()),
    ));
    for (what, endpoint) in endpoints {
        let b = KmipBackend::new(&args(&k, &endpoint)).unwrap();
        let err = b.current_key().await.unwrap_err();
        assert!(
            matches!(err, BackendError::Unavailable(_)),
            "{what}: {err:?}"
        );
        let err = b
            .unwrap(
                "1",
                &[
                    1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    0, 0, 0, 0, 0, 0,
                ],
            )
            .await
            .unwrap_err();
        assert!(!err.is_revocation(), "{what}: {err:?}");
    }
    // A client certificate from a CA the server does not trust: the handshake fails, an outage
    // whose message points at the certificate.
    let other = tempfile::tempdir().unwrap();
    support::external::run_python(
        "tests/fakes/akeyless_fake.py",
        &["--make-certs", other.path().to_str().unwrap()],
    );
    let b = KmipBackend::new(&KmipArgs {
        kmip_cert_file: Some(other.path().join("client.pem")),
        kmip_key_file: Some(other.path().join("client-key.pem")),
        ..args(&k, &k.endpoint)
    })
    .unwrap();
    let err = b.current_key().await.unwrap_err();
    assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
    // A server certificate the plugin does not trust.
    let b = KmipBackend::new(&KmipArgs {
        kmip_ca_file: Some(other.path().join("ca.pem")),
        ..args(&k, &k.endpoint)
    })
    .unwrap();
    let err = b.current_key().await.unwrap_err();
    assert!(
        matches!(&err, BackendError::Unavailable(m) if m.contains("--kmip-ca-file")),
        "{err:?}"
    );
    // The real server still works through the same kind of backend.
    k.create_key("k8s");
    backend(&k).current_key().await.unwrap();
}

#[tokio::test]
async fn served_binary_passes_socket_conformance() {
    let Some(k) = start_pykmip() else { return };
    k.create_key("k8s");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kms.sock");
    let c = |f: &str| k.certs.join(f).display().to_string();
    let args: Vec<String> = vec![
        "serve".into(),
        "--listen".into(),
        format!("unix://{}", socket.display()),
        "--backend".into(),
        "kmip".into(),
        "--kmip-endpoint".into(),
        k.endpoint.clone(),
        "--kmip-ca-file".into(),
        c("ca.pem"),
        "--kmip-cert-file".into(),
        c("client.pem"),
        "--kmip-key-file".into(),
        c("client-key.pem"),
        "--kmip-key-name".into(),
        "k8s".into(),
    ];
    let addr = kms_plugin::protocol::socket::ListenAddr::Path(socket.clone());
    let p = support::plugin::Plugin::start(&args, addr.clone(), dir.path()).await;
    support::plugin::socket_conformance(&addr, &socket).await;
    let log = p.log_text();
    assert!(!log.contains("PRIVATE KEY"), "key material in the log");
}

/// A TCP forwarder to `target` that swallows its first connection (reads, never answers).
async fn stalling_proxy(target: String) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst);
            let target = target.clone();
            tokio::spawn(async move {
                if n == 0 {
                    let mut sink = [0u8; 4096];
                    while matches!(inbound.read(&mut sink).await, Ok(r) if r > 0) {}
                    return;
                }
                if let Ok(mut out) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    (addr, accepted)
}

/// One hung connection holds one pool slot, not the pool: other calls go through on another
/// connection meanwhile, the hung call ends as a timeout, and its connection is not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_connection_does_not_block_other_calls() {
    let Some(k) = start_pykmip() else { return };
    k.create_key("k8s");
    let (proxy, accepted) = stalling_proxy(k.endpoint.clone()).await;
    let b = Arc::new(
        KmipBackend::new(&KmipArgs {
            kmip_timeout: Duration::from_secs(3),
            kmip_pool_size: 2,
            ..args(&k, &proxy)
        })
        .unwrap(),
    );
    let hung = tokio::spawn({
        let b = b.clone();
        async move { b.current_key().await }
    });
    support::wait_until(Duration::from_secs(5), || {
        accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1
    })
    .await;
    let started = std::time::Instant::now();
    let w = b
        .wrap(b"meanwhile")
        .await
        .expect("a call beside the hung one");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(!hung.is_finished(), "the hung call ended early");
    let err = hung.await.unwrap().unwrap_err();
    assert!(matches!(err, BackendError::Timeout(_)), "{err:?}");
    // The pool still works and never hands out the hung connection again.
    for _ in 0..4 {
        assert_eq!(
            &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
            b"meanwhile"
        );
    }
}

/// PyKMIP's ownership model: a key belongs to the identity (certificate common name) that created
/// it. Another identity's Locate does not see it (not found), and naming it by identifier is
/// refused in PyKMIP's typed answer (permission denied): both revocation-class, never an outage.
#[tokio::test]
async fn another_identity_is_refused_in_kmips_own_words() {
    let Some(k) = start_pykmip() else { return };
    let uid = k.create_key("k8s");
    let owner = backend(&k);
    let w = owner.wrap(b"owned").await.unwrap();
    // The same test CA's RSA client certificate has another common name.
    let other = |name: Option<&str>, id: Option<&str>| {
        KmipBackend::new(&KmipArgs {
            kmip_cert_file: Some(k.certs.join("client-rsa.pem")),
            kmip_key_file: Some(k.certs.join("client-rsa-key.pem")),
            kmip_key_name: name.map(str::to_string),
            kmip_key_id: id.map(str::to_string),
            ..args(&k, &k.endpoint)
        })
        .unwrap()
    };
    let by_name = other(Some("k8s"), None);
    let err = by_name.current_key().await.unwrap_err();
    assert!(matches!(err, BackendError::KeyNotFound(_)), "{err:?}");
    let err = by_name.unwrap(&w.key_ref, &w.ciphertext).await.unwrap_err();
    assert!(matches!(err, BackendError::PermissionDenied(_)), "{err:?}");
    let by_id = other(None, Some(&uid));
    let err = by_id.current_key().await.unwrap_err();
    assert!(matches!(err, BackendError::PermissionDenied(_)), "{err:?}");
    let err = by_id.unwrap(&w.key_ref, &w.ciphertext).await.unwrap_err();
    assert!(matches!(err, BackendError::PermissionDenied(_)), "{err:?}");
    assert!(!err.to_string().contains("owned"));
}
