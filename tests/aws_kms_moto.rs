//! The AWS KMS backend against a real moto server (the KMS JSON API on loopback), plus retry and
//! error-mapping checks against a scripted loopback endpoint.
#![cfg(feature = "aws-kms")]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_plugin::backend::aws::credentials::{ChainConfig, Credentials, CredentialsProvider};
use kms_plugin::backend::aws_kms::{AwsKmsArgs, AwsKmsBackend};
use kms_plugin::backend::{Backend, BackendError};
use serde_json::{json, Value};
use support::external::start_moto;

fn backend(url: &str, key: &str, context: &[(&str, &str)]) -> AwsKmsBackend {
    let args = AwsKmsArgs {
        aws_kms_key_id: Some(key.to_string()),
        aws_region: Some("us-east-1".into()),
        aws_endpoint_url: Some(url.to_string()),
        aws_kms_encryption_context: context
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    AwsKmsBackend::new(
        &args,
        ChainConfig {
            imds_disabled: true,
            ..Default::default()
        },
    )
    .unwrap()
    .with_credentials(CredentialsProvider::fixed(Credentials::new(
        "AKIDTESTING",
        "testing-secret",
        None,
    )))
}

async fn create_key(admin: &AwsKmsBackend) -> (String, String) {
    let r = admin
        .call_api("CreateKey", &json!({ "Description": "kms-plugin test" }))
        .await
        .unwrap();
    let meta = &r["KeyMetadata"];
    (
        meta["KeyId"].as_str().unwrap().to_string(),
        meta["Arn"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conforms_with_alias_rotation() {
    let Some(moto) = start_moto() else { return };
    let admin = backend(&moto.url, "unused", &[]);
    let (k1, arn1) = create_key(&admin).await;
    let (k2, arn2) = create_key(&admin).await;
    admin
        .call_api(
            "CreateAlias",
            &json!({ "AliasName": "alias/kms-plugin", "TargetKeyId": k1 }),
        )
        .await
        .unwrap();

    let b = Arc::new(backend(
        &moto.url,
        "alias/kms-plugin",
        &[("cluster", "conformance")],
    ));
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
                a.call_api(
                    "UpdateAlias",
                    &json!({ "AliasName": "alias/kms-plugin", "TargetKeyId": k2 }),
                )
                .await
                .unwrap();
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
    let admin = backend(&moto.url, "unused", &[]);
    let (k1, arn1) = create_key(&admin).await;
    let (_k2, arn2) = create_key(&admin).await;

    let before = backend(&moto.url, &k1, &[("cluster", "a")]);
    assert_eq!(before.current_key().await.unwrap().key_id, arn1);
    let w = before.wrap(b"local kek bytes").await.unwrap();
    assert_eq!(w.key_ref, arn1);

    // "Restart" with another key configured (by ARN this time).
    let after = backend(&moto.url, &arn2, &[("cluster", "a")]);
    let id = after.current_key().await.unwrap();
    assert_eq!(id.key_id, arn2);
    assert_ne!(id.key_id, arn1);
    assert_eq!(
        &after.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"local kek bytes"
    );

    // The encryption context is bound: another context does not decrypt.
    let other_ctx = backend(&moto.url, &arn2, &[("cluster", "b")]);
    let err = other_ctx
        .unwrap(&w.key_ref, &w.ciphertext)
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::InvalidCiphertext(_)), "{err:?}");
}

#[tokio::test]
async fn disabled_and_missing_keys() {
    let Some(moto) = start_moto() else { return };
    let admin = backend(&moto.url, "unused", &[]);
    let (k1, _) = create_key(&admin).await;
    let b = backend(&moto.url, &k1, &[]);
    let w = b.wrap(b"secret").await.unwrap();

    admin
        .call_api("DisableKey", &json!({ "KeyId": k1 }))
        .await
        .unwrap();
    let err = b.current_key().await.unwrap_err();
    assert!(matches!(err, BackendError::KeyDisabled(_)), "{err:?}");
    assert!(err.is_revocation());
    // moto still encrypts under a disabled key (real KMS answers DisabledException, whose mapping
    // `permanent_errors_are_not_retried` checks), so only the probe is asserted here.

    admin
        .call_api("EnableKey", &json!({ "KeyId": k1 }))
        .await
        .unwrap();
    b.current_key().await.unwrap();
    assert_eq!(
        &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"secret"
    );

    let missing = backend(&moto.url, "alias/does-not-exist", &[]);
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
    let b = backend(&url, "k1", &[]);
    assert_eq!(
        b.current_key().await.unwrap().key_id,
        "arn:aws:kms:us-east-1:111122223333:key/k1"
    );
    assert_eq!(count.load(Ordering::SeqCst), 4);

    let (url, count) = scripted(vec![(500, json!({ "__type": "KMSInternalException" }))]).await;
    let b = backend(&url, "k1", &[]);
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
        let b = backend(&url, "k1", &[]);
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
    let err = backend(&url, "k1", &[])
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
    let err = backend(&url, "k1", &[])
        .unwrap("arn:aws:kms:us-east-1:111122223333:key/k1", b"blob")
        .await
        .unwrap_err();
    assert!(!err.is_revocation() && !err.is_transient(), "{err:?}");
    assert_eq!(count.load(Ordering::SeqCst), 2);
    // A rejected signature is retried once, with freshly resolved credentials.
    let (url, count) = scripted(vec![(
        400,
        json!({ "__type": "UnrecognizedClientException" }),
    )])
    .await;
    let err = backend(&url, "k1", &[]).current_key().await.unwrap_err();
    assert!(matches!(err, BackendError::Authentication(_)), "{err:?}");
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

/// The credentials chain end to end: web identity (IRSA) against moto's STS, then KMS calls signed
/// with the temporary credentials it returned.
#[tokio::test]
async fn web_identity_credentials_through_moto_sts() {
    let Some(moto) = start_moto() else { return };
    let admin = backend(&moto.url, "unused", &[]);
    let (k1, arn1) = create_key(&admin).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n").unwrap();
    let chain = ChainConfig {
        web_identity_token_file: Some(token),
        role_arn: Some("arn:aws:iam::123456789012:role/kms-plugin".into()),
        sts_endpoint: Some(moto.url.clone()),
        imds_disabled: true,
        ..Default::default()
    };
    let provider = CredentialsProvider::new(chain.clone());
    let creds = provider.credentials().await.unwrap();
    assert_eq!(creds.source(), "web-identity");
    assert!(creds.session_token().is_some() && creds.expires().is_some());
    let args = AwsKmsArgs {
        aws_kms_key_id: Some(k1),
        aws_region: Some("us-east-1".into()),
        aws_endpoint_url: Some(moto.url.clone()),
        aws_kms_encryption_context: vec![],
    };
    let b = AwsKmsBackend::new(&args, chain).unwrap();
    assert_eq!(b.current_key().await.unwrap().key_id, arn1);
    let w = b.wrap(b"irsa").await.unwrap();
    assert_eq!(
        &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"irsa"
    );
}
