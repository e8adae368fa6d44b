//! The AWS KMS backend against a real moto server (the KMS JSON API on loopback), plus retry and
//! error-mapping checks against a scripted loopback endpoint.
#![cfg(feature = "aws-kms")]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_plugin::backend::{Backend, BackendError};
use serde_json::{json, Value};
use support::aws::{backend, create_key, point_alias, set_enabled};
use support::external::start_moto;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conforms_with_alias_rotation() {
    let Some(moto) = start_moto() else { return };
    let admin = backend(&moto.url, "unused", &[]).await;
    let (k1, arn1) = create_key(&admin).await;
    let (k2, arn2) = create_key(&admin).await;
    point_alias(&admin, true, "alias/kms-plugin", &k1).await;

    let b = Arc::new(backend(&moto.url, "alias/kms-plugin", &[("cluster", "conformance")]).await);
    let id = b.current_key().await.unwrap();
    assert_eq!(id.key_id, arn1);
    let admin = Arc::new(admin);
    let a2 = admin.clone();
    support::conformance::run(
        b.clone(),
        Some(Box::new(move || {
            let a = a2.clone();
            let k2 = k2.clone();
            Box::pin(async move {
                point_alias(&a, false, "alias/kms-plugin", &k2).await;
            })
        })),
    )
    .await;
    assert_eq!(b.current_key().await.unwrap().key_id, arn2);
    assert_eq!(b.wrap(b"x").await.unwrap().key_ref, arn2);
}

#[tokio::test]
async fn changed_key_new_key_id_old_data_decrypts() {
    let Some(moto) = start_moto() else { return };
    let admin = backend(&moto.url, "unused", &[]).await;
    let (k1, arn1) = create_key(&admin).await;
    let (_k2, arn2) = create_key(&admin).await;

    let before = backend(&moto.url, &k1, &[("cluster", "a")]).await;
    assert_eq!(before.current_key().await.unwrap().key_id, arn1);
    let w = before.wrap(b"local kek bytes").await.unwrap();
    assert_eq!(w.key_ref, arn1);

    // "Restart" with another key configured (by ARN this time).
    let after = backend(&moto.url, &arn2, &[("cluster", "a")]).await;
    let id = after.current_key().await.unwrap();
    assert_eq!(id.key_id, arn2);
    assert_ne!(id.key_id, arn1);
    assert_eq!(
        &after.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"local kek bytes"
    );

    // The encryption context is bound: another context does not decrypt.
    let other_ctx = backend(&moto.url, &arn2, &[("cluster", "b")]).await;
    let err = other_ctx
        .unwrap(&w.key_ref, &w.ciphertext)
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::InvalidCiphertext(_)), "{err:?}");
}

#[tokio::test]
async fn disabled_and_missing_keys() {
    let Some(moto) = start_moto() else { return };
    let admin = backend(&moto.url, "unused", &[]).await;
    let (k1, _) = create_key(&admin).await;
    let b = backend(&moto.url, &k1, &[]).await;
    let w = b.wrap(b"secret").await.unwrap();

    set_enabled(&admin, &k1, false).await;
    let err = b.current_key().await.unwrap_err();
    assert!(matches!(err, BackendError::KeyDisabled(_)), "{err:?}");
    assert!(err.is_revocation());
    // moto still encrypts under a disabled key (real KMS answers DisabledException, whose mapping
    // `permanent_errors_are_not_retried` checks), so only the probe is asserted here.

    set_enabled(&admin, &k1, true).await;
    b.current_key().await.unwrap();
    assert_eq!(
        &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"secret"
    );

    let missing = backend(&moto.url, "alias/does-not-exist", &[]).await;
    let err = missing.current_key().await.unwrap_err();
    assert!(matches!(err, BackendError::KeyNotFound(_)), "{err:?}");
}

/// A loopback HTTP endpoint that answers each request with the next scripted (status, body).
async fn scripted(responses: Vec<(u16, Value)>) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let n = c.fetch_add(1, Ordering::SeqCst);
            let (status, body) = responses[n.min(responses.len() - 1)].clone();
            tokio::spawn(async move {
                // Read the head and the body it announces, then answer and close.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(read) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if read == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..read]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let body = body.to_string();
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    (url, count)
}

const K1: &str = "arn:aws:kms:us-east-1:111122223333:key/k1";

fn describe_ok() -> Value {
    json!({ "KeyMetadata": { "Arn": "arn:aws:kms:us-east-1:111122223333:key/k1", "KeyId": "k1",
        "KeyState": "Enabled", "KeyUsage": "ENCRYPT_DECRYPT", "KeySpec": "SYMMETRIC_DEFAULT" } })
}

#[tokio::test]
async fn throttling_and_5xx_are_retried_within_budget() {
    let throttle = json!({ "__type": "ThrottlingException", "message": "slow down" });
    let (url, count) = scripted(vec![
        (400, throttle.clone()),
        (429, json!({})),
        (503, json!({})),
        (200, describe_ok()),
    ])
    .await;
    let b = backend(&url, K1, &[]).await;
    assert_eq!(
        b.current_key().await.unwrap().key_id,
        "arn:aws:kms:us-east-1:111122223333:key/k1"
    );
    assert_eq!(count.load(Ordering::SeqCst), 4);

    let (url, count) = scripted(vec![(500, json!({ "__type": "KMSInternalException" }))]).await;
    let b = backend(&url, K1, &[]).await;
    let started = Instant::now();
    let err = b.current_key().await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
    assert!(took < Duration::from_millis(3500), "retries took {took:?}");
    assert!(
        count.load(Ordering::SeqCst) >= 3,
        "only {} attempts",
        count.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn permanent_errors_are_not_retried() {
    for (typ, check) in [
        (
            "AccessDeniedException",
            (|e: &BackendError| matches!(e, BackendError::PermissionDenied(_)))
                as fn(&BackendError) -> bool,
        ),
        ("DisabledException", |e| {
            matches!(e, BackendError::KeyDisabled(_))
        }),
        ("NotFoundException", |e| {
            matches!(e, BackendError::KeyNotFound(_))
        }),
        ("InvalidCiphertextException", |e| {
            matches!(e, BackendError::InvalidCiphertext(_))
        }),
    ] {
        let (url, count) = scripted(vec![(400, json!({ "__type": typ, "message": "no" }))]).await;
        let b = backend(&url, K1, &[]).await;
        let err = b
            .unwrap("arn:aws:kms:us-east-1:111122223333:key/k1", b"blob")
            .await
            .unwrap_err();
        assert!(check(&err), "{typ}: {err:?}");
        assert_eq!(count.load(Ordering::SeqCst), 1, "{typ} was retried");
        assert!(!err.to_string().contains("testing-secret"));
    }
    // KMSInvalidStateException is not retried; the key's state is asked of DescribeKey, which
    // decides: Disabled is a revocation, a passing state (here: the same error again) is not.
    let (url, count) = scripted(vec![
        (400, json!({ "__type": "KMSInvalidStateException", "message": "no" })),
        (
            200,
            json!({ "KeyMetadata": { "Arn": "arn:aws:kms:us-east-1:111122223333:key/k1", "KeyState": "Disabled" } }),
        ),
    ])
    .await;
    let err = backend(&url, K1, &[])
        .await
        .unwrap("arn:aws:kms:us-east-1:111122223333:key/k1", b"blob")
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::KeyDisabled(_)), "{err:?}");
    assert_eq!(
        count.load(Ordering::SeqCst),
        2,
        "one Decrypt, one DescribeKey"
    );
    let (url, count) = scripted(vec![(
        400,
        json!({ "__type": "KMSInvalidStateException", "message": "pending import" }),
    )])
    .await;
    let err = backend(&url, K1, &[])
        .await
        .unwrap("arn:aws:kms:us-east-1:111122223333:key/k1", b"blob")
        .await
        .unwrap_err();
    assert!(!err.is_revocation() && !err.is_transient(), "{err:?}");
    assert_eq!(count.load(Ordering::SeqCst), 2);
    // A rejected signature is an authentication error, not retried: the SDK's credentials cache
    // refreshes temporary credentials ahead of their expiry.
    let (url, count) = scripted(vec![(
        400,
        json!({ "__type": "UnrecognizedClientException" }),
    )])
    .await;
    let err = backend(&url, K1, &[])
        .await
        .current_key()
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::Authentication(_)), "{err:?}");
    assert_eq!(count.load(Ordering::SeqCst), 1);
    // A bare 403/404 without KMS's error type (a proxy, WAF or VPC endpoint policy) is an outage.
    for status in [403, 404] {
        let (url, _) = scripted(vec![(status, json!({ "message": "denied by proxy" }))]).await;
        let err = backend(&url, K1, &[])
            .await
            .current_key()
            .await
            .unwrap_err();
        assert!(
            matches!(err, BackendError::Unavailable(_)),
            "{status}: {err:?}"
        );
    }
}

/// A crafted ciphertext naming another account's key never reaches KMS; the flag widens the set.
#[tokio::test]
async fn unwrap_only_asks_kms_about_allowed_keys() {
    let (url, count) = scripted(vec![(200, json!({ "KeyId": K1, "Plaintext": "c2VjcmV0" }))]).await;
    let b = backend(&url, K1, &[]).await;
    let foreign = "arn:aws:kms:us-east-1:999999999999:key/evil";
    let err = b.unwrap(foreign, b"blob").await.unwrap_err();
    assert!(matches!(err, BackendError::InvalidCiphertext(_)), "{err:?}");
    assert!(err.to_string().contains("--aws-kms-unwrap-allow"), "{err}");
    let other_region = "arn:aws:kms:eu-west-1:111122223333:key/k2";
    assert!(b.unwrap(other_region, b"blob").await.is_err());
    assert_eq!(count.load(Ordering::SeqCst), 0, "KMS was called");
    // Same account and region: allowed (an alias's earlier target lives there).
    let same = "arn:aws:kms:us-east-1:111122223333:key/k0";
    assert_eq!(&b.unwrap(same, b"blob").await.unwrap()[..], b"secret");
    assert_eq!(count.load(Ordering::SeqCst), 1);

    let mut args = support::aws::args(&url, K1, &[]);
    args.aws_kms_unwrap_allow = vec!["arn:aws:kms:us-east-1:999999999999:key/*".into()];
    let widened = support::aws::backend_with(&args).await;
    assert_eq!(
        &widened.unwrap(foreign, b"blob").await.unwrap()[..],
        b"secret"
    );
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

/// The trust store is the one every HTTPS backend uses: a private CA is trusted only when given
/// (`--aws-ca-file`), and an untrusted certificate says which option fixes it. The HTTPS server
/// here is the Akeyless fake's TLS listener: what is tested is the handshake, not KMS.
#[cfg(feature = "akeyless")]
#[tokio::test]
async fn private_ca_is_trusted_only_when_given() {
    let tls = tempfile::tempdir().unwrap();
    if !support::akeyless_fake::make_certs(tls.path()) {
        return;
    }
    let Some(fake) = support::akeyless_fake::Fake::start_tls(tls.path(), &[]) else {
        return;
    };
    let mut args = support::aws::args(&fake.url, K1, &[]);
    let err = support::aws::backend_with(&args)
        .await
        .current_key()
        .await
        .unwrap_err();
    assert!(
        matches!(err, BackendError::Unavailable(_)) && err.to_string().contains("--aws-ca-file"),
        "{err}"
    );
    args.aws_ca_file = Some(tls.path().join("ca.pem"));
    let err = support::aws::backend_with(&args)
        .await
        .current_key()
        .await
        .unwrap_err();
    // The handshake succeeded; the answer is not KMS's, so it is an outage, not a revocation.
    assert!(
        !err.to_string().contains("certificate") && !err.is_revocation(),
        "{err}"
    );
}
