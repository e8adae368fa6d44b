//! The Akeyless backend against the fake Akeyless server (tests/fakes/akeyless_fake.py).
//!
//! Needs a Python with `cryptography` (KMS_TEST_PYTHON, else ./.venv/bin/python). Without one the
//! tests fail, unless KMS_TEST_OPT_OUT names `akeyless-fake`.
#![cfg(feature = "akeyless")]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_plugin::backend::akeyless::auth::{CloudIdProvider, CloudIdRequest, NoCloudId};
use kms_plugin::backend::akeyless::cloud_id::aws_iam_cloud_id;
use kms_plugin::backend::akeyless::cloud_id::Credentials;
use kms_plugin::backend::akeyless::{AccessType, AkeylessArgs, AkeylessBackend, Secret};
use kms_plugin::backend::{AuthKind, Backend, BackendError};
use serde_json::json;
use support::akeyless_fake::{
    jwt, make_certs, Fake, ACCESS_ID, ACCESS_KEY, AWS_KEY_ID, AWS_SECRET, KEY,
};
use support::events::Recorder;

async fn connect(args: &AkeylessArgs) -> AkeylessBackend {
    AkeylessBackend::connect(args, None).await.expect("connect")
}

/// Polls `cond` until it holds or `limit` passes.
async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Neither the access key nor anything shaped like a fake-issued token (`t-` + 32 hex digits).
fn assert_no_secret(text: &str) {
    assert!(!text.contains(ACCESS_KEY), "access key leaked: {text}");
    let tokenish = text.match_indices("t-").any(|(i, _)| {
        let rest = &text[i + 2..];
        rest.len() >= 32 && rest[..32].bytes().all(|b| b.is_ascii_hexdigit())
    });
    assert!(!tokenish, "token leaked: {text}");
}

#[tokio::test]
async fn conformance_with_rotation_through_the_control_api() {
    let Some(fake) = Fake::start(&[]) else { return };
    let backend = Arc::new(connect(&fake.args()).await);
    assert_eq!(backend.kind(), "akeyless");
    let id = backend.current_key().await.unwrap();
    assert!(
        id.key_id.starts_with("/k8s/kek@") && id.key_id.ends_with(":v1"),
        "{}",
        id.key_id
    );
    assert_eq!(id.key_ref, KEY);
    let fake = Arc::new(fake);
    let f2 = fake.clone();
    support::conformance::run(
        backend.clone(),
        Some(Box::new(move || {
            let f = f2.clone();
            Box::pin(async move {
                f.control("key", json!({"name": KEY, "action": "rotate"}))
                    .await;
            })
        })),
    )
    .await;
    assert!(backend.current_key().await.unwrap().key_id.ends_with(":v2"));
}

#[tokio::test]
async fn remote_calls_are_what_they_say() {
    let Some(fake) = Fake::start(&[]) else { return };
    let backend = connect(&fake.args()).await;
    // Start-up: one auth, one describe, one round trip.
    for (cmd, n) in [
        ("auth", 1),
        ("describe-item", 1),
        ("encrypt", 1),
        ("decrypt", 1),
    ] {
        assert_eq!(fake.calls(cmd).await, n, "{cmd}");
    }
    backend.current_key().await.unwrap();
    backend.wrap(b"k").await.unwrap();
    assert_eq!(fake.calls("auth").await, 1, "the token is reused");
}

#[tokio::test]
async fn token_expiry_mid_run_reauthenticates_once_for_all_callers() {
    let Some(fake) = Fake::start(&[]) else { return };
    let backend = Arc::new(connect(&fake.args()).await);
    let w = backend.wrap(b"before").await.unwrap();
    fake.control("expire-tokens", json!({})).await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let b = backend.clone();
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            b.unwrap(&w.key_ref, &w.ciphertext).await
        }));
    }
    for t in tasks {
        assert_eq!(&t.await.unwrap().unwrap()[..], b"before");
    }
    assert_eq!(
        fake.calls("auth").await,
        2,
        "single flight: one re-authentication"
    );
    assert_eq!(backend.auth_calls(), 2);
}

#[tokio::test]
async fn token_is_renewed_before_expiry_in_the_background() {
    for format in ["rfc3339", "go", "unix"] {
        let Some(fake) = Fake::start(&["--token-ttl", "2", "--expiration-format", format]) else {
            return;
        };
        let backend = connect(&fake.args()).await;
        let renewed = eventually(Duration::from_secs(6), || async {
            fake.calls("auth").await >= 3
        })
        .await;
        assert!(renewed, "{format}: token not renewed in the background");
        backend.wrap(b"x").await.unwrap();
        assert!(backend.auth_calls() >= 3);
    }
}

#[tokio::test]
async fn server_without_expiration_still_works() {
    let Some(fake) = Fake::start(&["--expiration-format", "none"]) else {
        return;
    };
    let backend = connect(&fake.args()).await;
    backend.wrap(b"x").await.unwrap();
}

#[tokio::test]
async fn universal_identity_rotates_persists_and_survives_restart() {
    let Some(fake) = Fake::start(&[]) else { return };
    let state = tempfile::tempdir().unwrap();
    let saved = state.path().join("akeyless-uid-token");
    let init = fake.control("uid-token", json!({"ttl": 3600})).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let args = AkeylessArgs {
        url: fake.url.clone(),
        key_name: Some(KEY.into()),
        uid_token: Some(Secret::new(init.clone())),
        ..Default::default()
    };
    // No access type: a UID token means universal_identity.
    let backend = AkeylessBackend::connect(&args, Some(state.path().to_path_buf()))
        .await
        .expect("connect with UID");
    let first = std::fs::read_to_string(&saved).unwrap().trim().to_string();
    assert!(
        first.starts_with("u-") && first != init,
        "start-up rotates and saves"
    );
    assert_eq!(
        std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777,
        0o600
    );
    backend.rotate_uid_token().await.unwrap();
    let second = std::fs::read_to_string(&saved).unwrap().trim().to_string();
    assert_ne!(second, first);
    assert_eq!(
        fake.control("uid-tokens", json!({})).await["valid"],
        1,
        "old tokens are retired"
    );
    assert!(!format!("{backend:?}").contains(&second));
    drop(backend);

    // Restart with the same (consumed) init token: the saved token is used.
    let again = AkeylessBackend::connect(&args, Some(state.path().to_path_buf()))
        .await
        .expect("restart");
    again.wrap(b"after restart").await.unwrap();
    drop(again);

    // Without the saved token the consumed init token is refused, with a clear message.
    let empty = tempfile::tempdir().unwrap();
    let err = AkeylessBackend::connect(&args, Some(empty.path().to_path_buf()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BackendError::Authentication(m) if m.contains("Universal Identity")),
        "{err}"
    );
    assert!(!err.to_string().contains(&init));

    // A dead saved token falls back to a fresh init token.
    let fresh = fake.control("uid-token", json!({"ttl": 3600})).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(&saved, "u-dead-token\n").unwrap();
    let args2 = AkeylessArgs {
        uid_token: Some(Secret::new(fresh)),
        ..args.clone()
    };
    AkeylessBackend::connect(&args2, Some(state.path().to_path_buf()))
        .await
        .expect("fallback to init token");
}

#[tokio::test]
async fn universal_identity_rotates_in_the_background_and_keeps_old_token_on_failure() {
    let Some(fake) = Fake::start(&[]) else { return };
    let state = tempfile::tempdir().unwrap();
    let saved = state.path().join("akeyless-uid-token");
    // The real TTL (4 s) comes from the server, not from --akeyless-uid-ttl.
    let init = fake.control("uid-token", json!({"ttl": 4})).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let args = AkeylessArgs {
        url: fake.url.clone(),
        key_name: Some(KEY.into()),
        access_type: Some(AccessType::UniversalIdentity),
        uid_token: Some(Secret::new(init)),
        uid_ttl: Duration::from_secs(3600),
        ..Default::default()
    };
    let backend = AkeylessBackend::connect(&args, Some(state.path().to_path_buf()))
        .await
        .unwrap();
    let first = std::fs::read_to_string(&saved).unwrap();
    // Two failing rotations, then success: the token file only ever holds a live token.
    fake.control(
        "fail",
        json!({"command": "uid-rotate-token", "status": 503, "count": 2}),
    )
    .await;
    let rotated = eventually(Duration::from_secs(8), || async {
        std::fs::read_to_string(&saved).unwrap() != first
    })
    .await;
    assert!(rotated, "background rotation did not happen");
    assert!(fake.calls("injected:uid-rotate-token").await >= 1);
    // The saved token is the live one (read it again if a rotation raced with us).
    let client = reqwest::Client::new();
    let mut live = false;
    for _ in 0..3 {
        let tok = std::fs::read_to_string(&saved).unwrap();
        let r = client
            .post(format!("{}/auth", fake.url))
            .json(&json!({"access-type": "universal_identity", "uid-token": tok.trim()}))
            .send()
            .await
            .unwrap();
        if r.status().is_success() {
            live = true;
            break;
        }
    }
    assert!(live, "the saved UID token is not accepted");
    drop(backend);
}

#[tokio::test]
async fn server_errors_and_timeouts_are_retried_within_the_deadline() {
    let Some(fake) = Fake::start(&[]) else { return };
    let backend = connect(&fake.args()).await;

    fake.control(
        "fail",
        json!({"command": "encrypt", "status": 503, "count": 2}),
    )
    .await;
    backend.wrap(b"x").await.expect("two 503s are retried");

    fake.control(
        "fail",
        json!({"command": "encrypt", "status": 502, "count": 1, "body": "upstream exploded"}),
    )
    .await;
    backend.wrap(b"x").await.expect("plain-text 502 is retried");

    fake.control(
        "fail",
        json!({"command": "describe-item", "status": 429, "count": 1}),
    )
    .await;
    backend.current_key().await.expect("one 429 is retried");

    // A hung first attempt times out after 40% of the budget and the retry succeeds.
    fake.control(
        "latency",
        json!({"command": "encrypt", "seconds": 1.6, "count": 1}),
    )
    .await;
    let t = Instant::now();
    backend.wrap(b"x").await.expect("slow attempt retried");
    eprintln!("measure: hung first attempt + retry took {:?}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_millis(3000),
        "{:?}",
        t.elapsed()
    );

    // Persistent failures end with a transient error within the budget (2.5 s; asserted against the
    // apiserver's 3 s deadline to leave room for a loaded test machine).
    for (status, body) in [
        (500, json!(null)),
        (429, json!(null)),
        (503, json!("plain text outage")),
    ] {
        fake.control(
            "fail",
            json!({"command": "encrypt", "status": status, "count": 100, "body": body}),
        )
        .await;
        let t = Instant::now();
        let before = fake.calls("injected:encrypt").await;
        let err = backend.wrap(b"x").await.unwrap_err();
        eprintln!(
            "measure: persistent {status}: {} attempts, gave up after {:?}",
            fake.calls("injected:encrypt").await - before,
            t.elapsed()
        );
        assert!(
            t.elapsed() < Duration::from_millis(3000),
            "{status}: {:?}",
            t.elapsed()
        );
        assert!(err.is_transient(), "{status}: {err}");
        if status == 429 {
            assert!(matches!(err, BackendError::Throttled(_)), "{err}");
        }
        if status == 503 {
            // Plain text is not Akeyless's error shape: reported as such, never echoed.
            assert!(err.to_string().contains("not an Akeyless answer"), "{err}");
        }
        assert_no_secret(&err.to_string());
        fake.control("clear-faults", json!({})).await;
    }
    fake.control(
        "latency",
        json!({"command": "*", "seconds": 3.0, "count": 100}),
    )
    .await;
    let t = Instant::now();
    let err = backend.wrap(b"x").await.unwrap_err();
    eprintln!(
        "measure: server never answering: {err} after {:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_millis(3000));
    assert!(matches!(err, BackendError::Timeout(_)), "{err}");
    fake.control("clear-faults", json!({})).await;
}

#[tokio::test]
async fn key_states_are_reported_and_4xx_not_retried() {
    let Some(fake) = Fake::start(&[]) else { return };
    let backend = connect(&fake.args()).await;
    let w = backend.wrap(b"secret").await.unwrap();
    let cases: [(&str, &str); 3] = [
        ("disable", "key_disabled"),
        ("deny", "permission_denied"),
        ("delete", "key_not_found"),
    ];
    let undo = ["enable", "allow", "undelete"];
    for ((action, label), undo) in cases.into_iter().zip(undo) {
        fake.control("key", json!({"name": KEY, "action": action}))
            .await;
        let before = fake.calls("encrypt").await;
        let e1 = backend.current_key().await.unwrap_err();
        let e2 = backend.wrap(b"x").await.unwrap_err();
        let e3 = backend.unwrap(&w.key_ref, &w.ciphertext).await.unwrap_err();
        for e in [&e1, &e2, &e3] {
            assert_eq!(e.label(), label, "{action}: {e}");
            assert!(e.is_revocation());
        }
        assert_eq!(
            fake.calls("encrypt").await,
            before + 1,
            "{action}: no retry on 4xx"
        );
        fake.control("key", json!({"name": KEY, "action": undo}))
            .await;
    }
    assert_eq!(
        &backend.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"secret"
    );
    // Deleting the key version a ciphertext needs.
    fake.control("key", json!({"name": KEY, "action": "rotate"}))
        .await;
    fake.control(
        "key",
        json!({"name": KEY, "action": "delete-version", "version": 1}),
    )
    .await;
    let e = backend.unwrap(&w.key_ref, &w.ciphertext).await.unwrap_err();
    assert!(matches!(e, BackendError::KeyNotFound(_)), "{e}");
}

#[tokio::test]
async fn encryption_context_is_bound() {
    let Some(fake) = Fake::start(&[]) else { return };
    let mut args = fake.args();
    args.encryption_context = vec![("cluster".into(), "a".into())];
    let a = connect(&args).await;
    let w = a.wrap(b"ctx").await.unwrap();
    assert_eq!(
        &a.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"ctx"
    );
    args.encryption_context = vec![("cluster".into(), "b".into())];
    let b = connect(&args).await;
    assert!(matches!(
        b.unwrap(&w.key_ref, &w.ciphertext).await,
        Err(BackendError::InvalidCiphertext(_))
    ));
}

#[tokio::test]
async fn start_up_failures_name_the_cause_and_never_the_secret() {
    let Some(fake) = Fake::start(&[]) else { return };
    let base = fake.args();
    let check = |e: &BackendError| {
        assert_no_secret(&e.to_string());
        assert_no_secret(&format!("{e:?}"));
    };

    let wrong_key = AkeylessArgs {
        access_key: Some(Secret::new("AK-wrong-key-value-123")),
        ..base.clone()
    };
    let e = AkeylessBackend::connect(&wrong_key, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BackendError::Authentication(m) if m.contains("access key")),
        "{e}"
    );
    assert!(!e.to_string().contains("AK-wrong-key-value-123"));
    check(&e);

    let unknown_id = AkeylessArgs {
        access_id: Some("p-nobody".into()),
        ..base.clone()
    };
    let e = AkeylessBackend::connect(&unknown_id, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BackendError::Authentication(m) if m.contains("access id p-nobody not found")),
        "{e}"
    );
    check(&e);

    let no_key = AkeylessArgs {
        key_name: Some("/no/such/key".into()),
        ..base.clone()
    };
    let e = AkeylessBackend::connect(&no_key, None).await.unwrap_err();
    assert!(
        matches!(&e, BackendError::KeyNotFound(m) if m.contains("/no/such/key")),
        "{e}"
    );
    check(&e);

    fake.control(
        "key",
        json!({"name": "/rsa", "action": "create", "type": "RSA2048"}),
    )
    .await;
    let rsa = AkeylessArgs {
        key_name: Some("/rsa".into()),
        ..base.clone()
    };
    let e = AkeylessBackend::connect(&rsa, None).await.unwrap_err();
    assert!(
        matches!(&e, BackendError::Config(m) if m.contains("AES256GCM")),
        "{e}"
    );

    fake.control("key", json!({"name": KEY, "action": "disable"}))
        .await;
    let e = AkeylessBackend::connect(&base, None).await.unwrap_err();
    assert!(matches!(e, BackendError::KeyDisabled(_)), "{e}");
    fake.control("key", json!({"name": KEY, "action": "enable"}))
        .await;

    let no_secret = AkeylessArgs {
        access_key: None,
        access_type: Some(AccessType::AccessKey),
        ..base.clone()
    };
    let e = AkeylessBackend::connect(&no_secret, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BackendError::Config(m) if m.contains("KMS_PLUGIN_AKEYLESS_ACCESS_KEY")),
        "{e}"
    );

    let nothing = AkeylessArgs {
        access_key: None,
        ..base.clone()
    };
    // A provider that finds no cloud (the real one would probe metadata services off loopback).
    let e = AkeylessBackend::connect_with(&nothing, None, Arc::new(NoCloudId))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BackendError::Config(m) if m.contains("cannot tell how to authenticate")),
        "{e}"
    );

    let aws = AkeylessArgs {
        access_type: Some(AccessType::AwsIam),
        ..base.clone()
    };
    assert!(matches!(
        AkeylessBackend::connect_with(&aws, None, Arc::new(NoCloudId)).await,
        Err(BackendError::Config(_))
    ));

    // Unreachable URL: a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gone = AkeylessArgs {
        url: format!("http://127.0.0.1:{port}"),
        ..base.clone()
    };
    // Unreachable is transient: start-up goes on, and the calls report it.
    let t = Instant::now();
    let backend = AkeylessBackend::connect(&gone, None)
        .await
        .expect("a transient start-up failure does not stop start-up");
    assert!(t.elapsed() < Duration::from_secs(11));
    let e = backend.current_key().await.unwrap_err();
    assert!(
        matches!(&e, BackendError::Unavailable(m) if m.contains("cannot reach")),
        "{e}"
    );
    check(&e);

    // Debug output of a working backend and of the arguments hides the access key.
    let ok = connect(&base).await;
    assert_no_secret(&format!("{ok:?}"));
    assert_no_secret(&format!("{base:?}"));
}

#[tokio::test]
async fn other_auth_methods_and_gateway_prefix() {
    let Some(fake) = Fake::start(&["--gateway", "--k8s-auth-config", "cluster-a"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sa = dir.path().join("sa-token");
    let sa_jwt = jwt(
        json!({"iss": "kubernetes/serviceaccount", "sub": "system:serviceaccount:kube-system:kms"}),
    );
    std::fs::write(&sa, format!("{sa_jwt}\n")).unwrap();
    let k8s = AkeylessArgs {
        url: format!("{}/api/v2", fake.url),
        access_key: None,
        access_type: Some(AccessType::K8s),
        k8s_auth_config_name: Some("cluster-a".into()),
        k8s_service_account_token_file: sa,
        ..fake.args()
    };
    connect(&k8s).await.wrap(b"k8s").await.unwrap();

    // A config name the gateway does not know is refused by it.
    let unknown = AkeylessArgs {
        k8s_auth_config_name: Some("cluster-b".into()),
        ..k8s.clone()
    };
    let e = AkeylessBackend::connect(&unknown, None).await.unwrap_err();
    assert!(matches!(e, BackendError::Authentication(_)), "{e}");

    assert!(make_certs(dir.path()));
    let cert = dir.path().join("client.pem");
    let key = dir.path().join("client-key.pem");
    // A certificate with someone else's key is refused.
    let wrong = AkeylessArgs {
        access_key: None,
        access_type: Some(AccessType::Cert),
        cert_file: Some(cert.clone()),
        key_file: Some(dir.path().join("server-key.pem")),
        ..fake.args()
    };
    let e = AkeylessBackend::connect(&wrong, None).await.unwrap_err();
    assert!(matches!(e, BackendError::Authentication(_)), "{e}");
    let c = AkeylessArgs {
        access_key: None,
        access_type: Some(AccessType::Cert),
        cert_file: Some(cert),
        key_file: Some(key),
        ..fake.args()
    };
    connect(&c).await.wrap(b"cert").await.unwrap();
    // An RSA client key signs the challenge with PKCS#1 v1.5 / SHA-256.
    let rsa = AkeylessArgs {
        cert_file: Some(dir.path().join("client-rsa.pem")),
        key_file: Some(dir.path().join("client-rsa-key.pem")),
        ..c.clone()
    };
    connect(&rsa).await.wrap(b"cert-rsa").await.unwrap();

    let akf = dir.path().join("access-key");
    std::fs::write(&akf, format!("{ACCESS_KEY}\n")).unwrap();
    let from_file = AkeylessArgs {
        access_key: None,
        access_key_file: Some(akf),
        ..fake.args()
    };
    connect(&from_file).await.wrap(b"file").await.unwrap();

    let records = fake.control("stats", json!({})).await["auth_records"].clone();
    let types: Vec<&str> = records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["access_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["k8s", "cert", "cert", "access_key"]);
    // The challenge flow: the key signed a challenge and was not sent.
    assert_eq!(records[1]["cert_flow"], "challenge");
    assert_eq!(records[2]["cert_flow"], "challenge");
    assert_eq!(
        fake.calls("get-cert-challenge").await,
        3,
        "wrong key, EC key, RSA key"
    );
    // Without --gateway the fake is the SaaS, which has no k8s auth.
    let Some(saas) = Fake::start(&["--k8s-auth-config", "cluster-a"]) else {
        return;
    };
    let on_saas = AkeylessArgs {
        url: saas.url.clone(),
        ..k8s.clone()
    };
    let e = AkeylessBackend::connect(&on_saas, None).await.unwrap_err();
    assert!(
        matches!(&e, BackendError::Authentication(m) if m.contains("Gateway")),
        "{e}"
    );
    assert_eq!(records[0]["k8s_auth_config_name"], "cluster-a");
}

#[tokio::test]
async fn drop_in_environment_of_the_original_plugin() {
    let Some(fake) = Fake::start(&[]) else { return };
    let mut args = AkeylessArgs::default();
    let url = fake.url.clone();
    args.apply_legacy_env(|k| {
        Some(match k {
            "AKEYLESS_URL" => url.clone(),
            "AKEYLESS_KEY_ENCRYPTION_KEY" => KEY.to_string(),
            "AKEYLESS_ACCESS_ID" => ACCESS_ID.to_string(),
            "AKEYLESS_ACCESS_KEY" => ACCESS_KEY.to_string(),
            _ => return None,
        })
    })
    .unwrap();
    let backend = connect(&args).await;
    let w = backend.wrap(b"legacy").await.unwrap();
    assert_eq!(
        &backend.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"legacy"
    );
}

/// Stands in for the cloud-identity module: fixed cloud-ids, detection says GCP.
#[derive(Debug)]
struct TestCloud;

#[async_trait::async_trait]
impl CloudIdProvider for TestCloud {
    async fn cloud_id(&self, req: &CloudIdRequest) -> Result<String, BackendError> {
        use base64::Engine as _;
        let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
        Ok(match req.kind {
            AccessType::AwsIam => {
                let creds = Credentials::new(AWS_KEY_ID, AWS_SECRET, None, None, "test");
                aws_iam_cloud_id(&creds, "https://sts.eu-west-1.amazonaws.com/", "eu-west-1")
                    .await
                    .unwrap()
                    .to_string()
            }
            AccessType::Gcp => b64(jwt(json!({"aud": req.gcp_audience, "sub": "gce"}))),
            _ => b64(jwt(json!({"aud": "https://management.azure.com/"}))),
        })
    }
    async fn detect(&self) -> Option<AccessType> {
        Some(AccessType::Gcp)
    }
}

#[tokio::test]
async fn cloud_identities_go_through_the_provider_hook() {
    let Some(fake) = Fake::start(&[]) else { return };
    let aws = AkeylessArgs {
        access_key: None,
        access_type: Some(AccessType::AwsIam),
        ..fake.args()
    };
    AkeylessBackend::connect_with(&aws, None, Arc::new(TestCloud))
        .await
        .expect("aws_iam via the hook");
    // Nothing configured: detection picks the cloud.
    let detect = AkeylessArgs {
        access_key: None,
        gcp_audience: "my-aud".into(),
        ..fake.args()
    };
    AkeylessBackend::connect_with(&detect, None, Arc::new(TestCloud))
        .await
        .expect("detected gcp");
    let records = fake.control("stats", json!({})).await["auth_records"].clone();
    assert_eq!(records[0]["access_type"], "aws_iam");
    // The fake verified the SigV4 signature with botocore for the region the URL names.
    assert_eq!(records[0]["sts"]["region"], "eu-west-1");
    assert_eq!(records[0]["sts"]["access_key_id"], AWS_KEY_ID);
    assert_eq!(records[1]["access_type"], "gcp");
    assert_eq!(records[1]["gcp_audience"], "my-aud");
    assert_eq!(records[1]["claims"]["aud"], "my-aud");
    // A signature by another secret is refused by the fake, as STS would refuse it.
    struct BadAws;
    impl std::fmt::Debug for BadAws {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("BadAws")
        }
    }
    #[async_trait::async_trait]
    impl CloudIdProvider for BadAws {
        async fn cloud_id(&self, _: &CloudIdRequest) -> Result<String, BackendError> {
            let creds = Credentials::new(AWS_KEY_ID, "not-the-secret", None, None, "test");
            Ok(
                aws_iam_cloud_id(&creds, "https://sts.amazonaws.com/", "us-east-1")
                    .await
                    .unwrap()
                    .to_string(),
            )
        }
        async fn detect(&self) -> Option<AccessType> {
            None
        }
    }
    let e = AkeylessBackend::connect_with(&aws, None, Arc::new(BadAws))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BackendError::Authentication(m) if m.contains("signature")),
        "{e}"
    );
}

#[tokio::test]
async fn engine_over_akeyless_keeps_remote_calls_in_single_digits_and_follows_rotation() {
    use kms_plugin::engine::{Api, Binding, Engine, EngineConfig};
    let Some(fake) = Fake::start(&[]) else { return };
    let backend: Arc<dyn Backend> = Arc::new(connect(&fake.args()).await);
    fake.control("reset-stats", json!({})).await;
    let engine = Engine::new(backend.clone(), EngineConfig::default());
    engine.probe(true).await.expect("probe");
    let key_id = engine.status().key_id.clone();
    assert!(
        key_id.contains("/k8s/kek@") && key_id.ends_with(":v1"),
        "{key_id}"
    );

    let mut sealed = Vec::new();
    for i in 0..1000u32 {
        let s = engine.encrypt(&i.to_be_bytes(), Api::V2).await.unwrap();
        sealed.push(s);
    }
    for (i, s) in sealed.iter().enumerate() {
        let out = engine
            .decrypt(&s.ciphertext, Binding::V2 { key_id: &s.key_id })
            .await
            .unwrap();
        assert_eq!(&out.plaintext[..], &(i as u32).to_be_bytes());
    }
    let remote = fake.calls("encrypt").await + fake.calls("decrypt").await;
    eprintln!("measure: {remote} remote encrypt/decrypt calls for 1000 encrypts + 1000 decrypts");
    assert!(
        remote < 10,
        "{remote} remote crypto calls for 2000 operations"
    );

    // "Rotate key now" in Akeyless: the probe picks it up, old data still decrypts.
    fake.control("key", json!({"name": KEY, "action": "rotate"}))
        .await;
    engine.probe(true).await.expect("probe after rotation");
    let new_id = engine.status().key_id.clone();
    assert!(new_id.ends_with(":v2"), "{new_id}");
    let s = engine.encrypt(b"new", Api::V2).await.unwrap();
    assert_eq!(s.key_id, new_id);
    let old = &sealed[0];
    let out = engine
        .decrypt(
            &old.ciphertext,
            Binding::V2 {
                key_id: &old.key_id,
            },
        )
        .await
        .unwrap();
    assert_eq!(&out.plaintext[..], &0u32.to_be_bytes());

    // A restarted engine decrypts old data with a handful of remote calls.
    let fresh = Engine::new(backend, EngineConfig::default());
    fresh.probe(true).await.expect("probe");
    let before = fake.calls("decrypt").await;
    for s in sealed.iter().take(200) {
        fresh
            .decrypt(&s.ciphertext, Binding::V2 { key_id: &s.key_id })
            .await
            .unwrap();
    }
    assert!(fake.calls("decrypt").await - before < 10);
}

#[tokio::test]
async fn a_token_rejected_after_reauthentication_is_an_error_not_a_loop() {
    let Some(fake) = Fake::start(&[]) else { return };
    let backend = connect(&fake.args()).await;
    // From now on every issued token is dead on arrival.
    fake.control("token-ttl", json!({"seconds": -1})).await;
    fake.control("expire-tokens", json!({})).await;
    let before = fake.calls("auth").await;
    let err = backend.wrap(b"x").await.unwrap_err();
    assert!(
        matches!(&err, BackendError::Authentication(m) if m.contains("fresh token")),
        "{err}"
    );
    assert_eq!(
        fake.calls("auth").await - before,
        1,
        "exactly one re-authentication"
    );
    assert_eq!(
        fake.calls("encrypt").await,
        1 + 2,
        "start-up + two attempts"
    );
    assert_no_secret(&err.to_string());

    // Wrong credentials at start-up: /auth is not retried.
    let wrong = AkeylessArgs {
        access_key: Some(Secret::new("AK-wrong")),
        ..fake.args()
    };
    let before = fake.calls("auth").await;
    AkeylessBackend::connect(&wrong, None).await.unwrap_err();
    assert_eq!(fake.calls("auth").await - before, 1);
}

#[tokio::test]
async fn uid_start_up_survives_a_failing_rotation_and_rotates_later() {
    let Some(fake) = Fake::start(&[]) else { return };
    let state = tempfile::tempdir().unwrap();
    let saved = state.path().join("akeyless-uid-token");
    let init = fake.control("uid-token", json!({"ttl": 20})).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    // A server where rotation is (for now) unavailable or not implemented.
    fake.control(
        "fail",
        json!({"command": "uid-rotate-token", "status": 404, "count": 1000, "body": "unknown command"}),
    )
    .await;
    let args = AkeylessArgs {
        url: fake.url.clone(),
        key_name: Some(KEY.into()),
        uid_token: Some(Secret::new(init.clone())),
        uid_ttl: Duration::from_secs(4),
        ..Default::default()
    };
    let backend = AkeylessBackend::connect(&args, Some(state.path().to_path_buf()))
        .await
        .expect("start-up needs only a working auth");
    backend.wrap(b"x").await.unwrap();
    assert!(!saved.exists());
    fake.control("clear-faults", json!({})).await;
    // Retried at a twentieth of the TTL the server reports (1 minute here).
    let rotated = eventually(Duration::from_secs(10), || async { saved.exists() }).await;
    assert!(rotated, "rotation retried in the background");
    let now = std::fs::read_to_string(&saved).unwrap();
    assert_ne!(now.trim(), init);
}

/// The real cloud-identity provider, against loopback fakes of the metadata services.
#[tokio::test]
async fn real_cloud_provider_detects_gcp_and_builds_azure_identity() {
    use support::http_fake::{closed_url, start, Resp};
    let Some(fake) = Fake::start(&[]) else { return };
    let gcp = start(|req| {
        if req.header("metadata-flavor") != Some("Google") {
            return Resp::new(403, "");
        }
        let body = if req.path.ends_with("/service-accounts/default/identity") {
            jwt(json!({"aud": req.query_param("audience").unwrap_or_default(), "sub": "gce-sa"}))
        } else {
            String::new()
        };
        Resp::new(200, body).header("metadata-flavor", "Google")
    })
    .await;
    let azure = start(|req| {
        if req.header("metadata") != Some("true") {
            return Resp::new(400, "");
        }
        if req.path == "/metadata/identity/oauth2/token" {
            let oid = req.query_param("object_id").unwrap_or_default();
            let token = jwt(json!({"aud": "https://management.azure.com/", "oid": oid}));
            Resp::new(200, format!(r#"{{"access_token":"{token}"}}"#))
        } else {
            Resp::new(404, "")
        }
    })
    .await;
    let base = AkeylessArgs {
        access_key: None,
        aws_imds_url: Some(closed_url()),
        azure_imds_url: Some(closed_url()),
        gcp_metadata_url: Some(gcp.url.clone()),
        gcp_audience: "aud-x".into(),
        ..fake.args()
    };
    // No access type and no credentials: the GCP metadata server answers, so gcp.
    connect(&base).await.wrap(b"gcp").await.unwrap();
    let azure_args = AkeylessArgs {
        access_type: Some(AccessType::AzureAd),
        azure_imds_url: Some(azure.url.clone()),
        azure_object_id: Some("oid-1".into()),
        ..base.clone()
    };
    connect(&azure_args).await.wrap(b"azure").await.unwrap();
    let records = fake.control("stats", json!({})).await["auth_records"].clone();
    let decoded = |i: usize| {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(records[i]["cloud_id"].as_str().unwrap())
            .unwrap();
        String::from_utf8(raw).unwrap()
    };
    assert_eq!(records[0]["access_type"], "gcp");
    assert_eq!(records[0]["claims"]["aud"], "aud-x");
    assert_eq!(decoded(0).split('.').count(), 3);
    assert_eq!(records[1]["access_type"], "azure_ad");
    assert_eq!(records[1]["claims"]["oid"], "oid-1");
}

async fn connect_recorded(
    args: &AkeylessArgs,
    state_dir: Option<std::path::PathBuf>,
) -> (Result<AkeylessBackend, BackendError>, Arc<Recorder>) {
    let rec = Arc::new(Recorder::new("akeyless"));
    let backend =
        AkeylessBackend::connect_with_events(args, state_dir, Arc::new(NoCloudId), rec.clone())
            .await;
    (backend, rec)
}

#[tokio::test]
async fn authentications_are_reported_to_the_event_hook() {
    use AuthKind::*;
    let Some(fake) = Fake::start(&[]) else { return };
    let (backend, rec) = connect_recorded(&fake.args(), None).await;
    let backend = backend.expect("connect");
    assert_eq!(rec.take(), [(Login, "ok")], "start-up login");
    backend.wrap(b"x").await.unwrap();
    assert_eq!(rec.take(), [], "a cached token is no event");

    // A rejected (expired) token: a new login, not a refresh.
    fake.control("expire-tokens", json!({})).await;
    backend.wrap(b"x").await.unwrap();
    assert_eq!(rec.take(), [(Login, "ok")]);

    // The re-authentication itself refused: a failed login, then a good one on the next call.
    fake.control("expire-tokens", json!({})).await;
    fake.control(
        "fail",
        json!({"command": "auth", "status": 401, "count": 1}),
    )
    .await;
    let err = backend.wrap(b"x").await.unwrap_err();
    assert!(matches!(err, BackendError::Authentication(_)), "{err}");
    assert_eq!(rec.take(), [(Login, "authentication")]);
    backend.wrap(b"x").await.unwrap();
    assert_eq!(rec.take(), [(Login, "ok")]);
    assert_eq!(backend.auth_calls(), 4);
    drop(backend);

    // Wrong credentials at start-up.
    let wrong = AkeylessArgs {
        access_key: Some(Secret::new("wrong-access-key")),
        ..fake.args()
    };
    let (backend, rec) = connect_recorded(&wrong, None).await;
    backend.unwrap_err();
    assert_eq!(rec.take(), [(Login, "authentication")]);
}

#[tokio::test]
async fn background_renewal_is_reported_as_a_token_refresh() {
    // Tokens live 4 s: renewal at 3 s while the old token is still valid.
    let Some(fake) = Fake::start(&["--token-ttl", "4"]) else {
        return;
    };
    let (backend, rec) = connect_recorded(&fake.args(), None).await;
    let _backend = backend.expect("connect");
    let seen = rec.clone();
    let refreshed = eventually(Duration::from_secs(10), || {
        let seen = seen.clone();
        async move { seen.saw((AuthKind::TokenRefresh, "ok")) }
    })
    .await;
    assert!(refreshed, "no token_refresh event: {:?}", rec.take());
    assert_eq!(rec.take()[0], (AuthKind::Login, "ok"));
}

#[tokio::test]
async fn uid_rotation_is_reported_to_the_event_hook() {
    use AuthKind::*;
    let Some(fake) = Fake::start(&[]) else { return };
    let state = tempfile::tempdir().unwrap();
    let init = fake.control("uid-token", json!({"ttl": 3600})).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let args = AkeylessArgs {
        url: fake.url.clone(),
        key_name: Some(KEY.into()),
        uid_token: Some(Secret::new(init)),
        ..Default::default()
    };
    let (backend, rec) = connect_recorded(&args, Some(state.path().to_path_buf())).await;
    let backend = backend.expect("connect with UID");
    // The UID token is proven by the one start-up login (whose token the token manager keeps),
    // then rotated at once.
    assert_eq!(rec.take(), [(Login, "ok"), (IdentityRotation, "ok")]);
    assert_eq!(fake.calls("auth").await, 1, "one login at start-up");
    backend.rotate_uid_token().await.unwrap();
    assert_eq!(rec.take(), [(IdentityRotation, "ok")]);
    fake.control(
        "fail",
        json!({"command": "uid-rotate-token", "status": 403, "count": 1}),
    )
    .await;
    let err = backend.rotate_uid_token().await.unwrap_err();
    assert_eq!(rec.take(), [(IdentityRotation, err.label())]);
}

/// Answers that are not Akeyless's JSON error shape (a proxy, an ingress default backend, a WAF)
/// are Unavailable for every call, whatever the status; the same statuses in Akeyless's shape are
/// authoritative.
#[tokio::test]
async fn proxy_answers_are_unavailable_and_akeyless_answers_are_authoritative() {
    let Some(fake) = Fake::start(&[]) else { return };
    // A short request budget: the retries of transient answers end quickly.
    let backend = connect(&AkeylessArgs {
        timeout: Duration::from_millis(400),
        ..fake.args()
    })
    .await;
    let w = backend.wrap(b"secret").await.unwrap();
    let html = "<html><head><title>404 Not Found</title></head><body>nginx</body></html>";
    for status in [400u16, 401, 403, 404, 410, 502] {
        for (body, ctype) in [
            (html, "text/html"),
            ("", "text/plain"),
            ("Forbidden", "text/plain"),
        ] {
            fake.control(
                "fail",
                json!({"command": "*", "status": status, "count": -1, "body": body, "content_type": ctype}),
            )
            .await;
            let errors = [
                backend.current_key().await.unwrap_err(),
                backend.wrap(b"x").await.unwrap_err(),
                backend.unwrap(&w.key_ref, &w.ciphertext).await.unwrap_err(),
            ];
            for e in &errors {
                assert!(
                    matches!(e, BackendError::Unavailable(m) if m.contains("not an Akeyless answer")),
                    "{status} {body:?}: {e:?}"
                );
                assert!(!e.is_revocation());
                assert!(
                    !e.to_string().contains("nginx"),
                    "the foreign body is not echoed"
                );
            }
            fake.control("clear-faults", json!({})).await;
        }
    }
    // JSON that is not {"error": "..."} is not Akeyless's shape either.
    for body in [
        json!({"message": "Not Found"}),
        json!({"error": {"code": 404}}),
        json!({}),
    ] {
        fake.control(
            "fail",
            json!({"command": "describe-item", "status": 404, "count": -1, "body": body}),
        )
        .await;
        let e = backend.current_key().await.unwrap_err();
        assert!(matches!(e, BackendError::Unavailable(_)), "{body}: {e:?}");
        fake.control("clear-faults", json!({})).await;
    }
    // Akeyless's own answers with those statuses.
    for (status, label) in [(404, "key_not_found"), (403, "permission_denied")] {
        fake.control(
            "fail",
            json!({"command": "describe-item", "status": status, "count": 1, "body": {"error": "failed to describe item"}}),
        )
        .await;
        let e = backend.current_key().await.unwrap_err();
        assert_eq!(e.label(), label, "{e}");
    }
    // An Akeyless 401 is a rejected token: one re-authentication, then success.
    let auths = fake.calls("auth").await;
    fake.control(
        "fail",
        json!({"command": "describe-item", "status": 401, "count": 1, "body": {"error": "Unauthorized"}}),
    )
    .await;
    backend.current_key().await.unwrap();
    assert_eq!(fake.calls("auth").await, auths + 1);
    // The client-type header Akeyless's own integrations send.
    assert!(fake.calls("client-type:k8s-kms-plugin").await > 0);
    assert_eq!(fake.calls("client-type:").await, 0);
}

#[tokio::test]
async fn mutual_tls_gateway_needs_the_client_certificate() {
    let tls = tempfile::tempdir().unwrap();
    if !make_certs(tls.path()) {
        return;
    }
    let Some(fake) = Fake::start_tls(tls.path(), &["--require-client-cert"]) else {
        return;
    };
    let ca = tls.path().join("ca.pem");
    let with = AkeylessArgs {
        ca_file: Some(ca.clone()),
        client_cert_file: Some(tls.path().join("client.pem")),
        client_key_file: Some(tls.path().join("client-key.pem")),
        ..fake.args()
    };
    connect(&with).await.wrap(b"mtls").await.unwrap();
    // Without the client certificate the gateway drops the handshake: not reachable, not revoked.
    let without = AkeylessArgs {
        ca_file: Some(ca.clone()),
        timeout: Duration::from_millis(800),
        login_timeout: Duration::from_secs(2),
        ..fake.args()
    };
    let b = AkeylessBackend::connect(&without, None).await.unwrap();
    let e = b.current_key().await.unwrap_err();
    assert!(e.is_transient() && !e.is_revocation(), "{e:?}");
    // Half a client pair, a missing CA file or a file that is not PEM: configuration errors naming the option.
    for (args, flag) in [
        (
            AkeylessArgs {
                client_cert_file: Some(tls.path().join("client.pem")),
                ..fake.args()
            },
            "--akeyless-client-key-file",
        ),
        (
            AkeylessArgs {
                ca_file: Some(tls.path().join("nope.pem")),
                ..fake.args()
            },
            "--akeyless-ca-file",
        ),
        (
            AkeylessArgs {
                ca_file: Some(tls.path().join("client-key.pem")),
                ..fake.args()
            },
            "--akeyless-ca-file",
        ),
    ] {
        let e = AkeylessBackend::connect(&args, None).await.unwrap_err();
        assert!(
            matches!(&e, BackendError::Config(m) if m.contains(flag)),
            "{e}"
        );
        assert_no_secret(&e.to_string());
    }
}

#[tokio::test]
async fn classic_keys_are_accepted_like_dfc_keys() {
    let Some(fake) = Fake::start(&[]) else { return };
    fake.control(
        "key",
        json!({"name": "/classic/aes", "action": "create", "type": "CLASSIC_KEY", "key_type": "AES256GCM"}),
    )
    .await;
    fake.control(
        "key",
        json!({"name": "/classic/rsa", "action": "create", "type": "CLASSIC_KEY", "key_type": "RSA2048"}),
    )
    .await;
    fake.control(
        "key",
        json!({"name": "/dfc/rsa", "action": "create", "type": "RSA2048"}),
    )
    .await;
    let classic = AkeylessArgs {
        key_name: Some("/classic/aes".into()),
        ..fake.args()
    };
    let b = connect(&classic).await;
    let w = b.wrap(b"classic").await.unwrap();
    assert_eq!(
        &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"classic"
    );
    for name in ["/classic/rsa", "/dfc/rsa"] {
        let args = AkeylessArgs {
            key_name: Some(name.into()),
            ..fake.args()
        };
        let e = AkeylessBackend::connect(&args, None).await.unwrap_err();
        assert!(
            matches!(&e, BackendError::Config(m) if m.contains("RSA2048") && m.contains("AES256GCM")),
            "{name}: {e}"
        );
    }
}

#[tokio::test]
async fn k8s_auth_against_the_saas_url_says_it_needs_a_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let sa = dir.path().join("sa");
    std::fs::write(&sa, jwt(json!({"sub": "system:serviceaccount:a:b"}))).unwrap();
    let args = AkeylessArgs {
        url: "https://api.akeyless.io".into(),
        access_id: Some(ACCESS_ID.into()),
        key_name: Some(KEY.into()),
        access_type: Some(AccessType::K8s),
        k8s_auth_config_name: Some("c".into()),
        k8s_service_account_token_file: sa,
        ..Default::default()
    };
    // Refused before any network call.
    let e = AkeylessBackend::connect_with(&args, None, Arc::new(NoCloudId))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BackendError::Config(m) if m.contains("Gateway") && m.contains("--akeyless-url")),
        "{e}"
    );
}

/// A renewal that is due while the token is still valid happens in the background: requests keep
/// using the current token and never wait for a slow login.
#[tokio::test]
async fn slow_renewals_do_not_delay_requests() {
    let Some(fake) = Fake::start(&[]) else { return };
    fake.control("token-ttl", json!({"seconds": 12})).await;
    let backend = connect(&fake.args()).await;
    // From now on every login takes 1.5 s; the renewal is due at 9 s, the token expires at ~10.8 s.
    fake.control(
        "latency",
        json!({"command": "auth", "seconds": 1.5, "count": -1}),
    )
    .await;
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    while start.elapsed() < Duration::from_millis(10_500) {
        let t = Instant::now();
        backend.current_key().await.unwrap();
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("slowest request around a 1.5 s background renewal: {slowest:?}");
    assert!(slowest < Duration::from_millis(1000), "{slowest:?}");
    assert_eq!(fake.calls("auth").await, 2, "start-up login + one renewal");
}

/// Universal Identity with Akeyless away at start-up: the backend comes up, keeps the token, and
/// logs in (and rotates) once Akeyless answers.
#[tokio::test]
async fn uid_start_up_with_akeyless_away_logs_in_later() {
    let Some(fake) = Fake::start(&[]) else { return };
    let state = tempfile::tempdir().unwrap();
    let init = fake.control("uid-token", json!({"ttl": 3600})).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    fake.control(
        "fail",
        json!({"command": "*", "status": 502, "count": -1, "body": "<html>Bad Gateway</html>", "content_type": "text/html"}),
    )
    .await;
    let args = AkeylessArgs {
        url: fake.url.clone(),
        key_name: Some(KEY.into()),
        uid_token: Some(Secret::new(init)),
        uid_ttl: Duration::from_secs(20),
        login_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let backend = AkeylessBackend::connect(&args, Some(state.path().to_path_buf()))
        .await
        .expect("a transient failure does not stop start-up");
    let e = backend.current_key().await.unwrap_err();
    assert!(e.is_transient() && !e.is_revocation(), "{e:?}");
    fake.control("clear-faults", json!({})).await;
    backend.wrap(b"later").await.unwrap();
    let saved = state.path().join("akeyless-uid-token");
    assert!(
        eventually(Duration::from_secs(5), || async { saved.exists() }).await,
        "the token is rotated once Akeyless is back"
    );
}

/// A server without `/get-cert-challenge` gets the client key, as older clients send it.
#[tokio::test]
async fn cert_auth_falls_back_to_sending_the_key_where_there_is_no_challenge() {
    let Some(fake) = Fake::start(&["--no-cert-challenge"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    assert!(make_certs(dir.path()));
    let c = AkeylessArgs {
        access_key: None,
        access_type: Some(AccessType::Cert),
        cert_file: Some(dir.path().join("client.pem")),
        key_file: Some(dir.path().join("client-key.pem")),
        ..fake.args()
    };
    connect(&c).await.wrap(b"cert").await.unwrap();
    let records = fake.control("stats", json!({})).await["auth_records"].clone();
    assert_eq!(records[0]["cert_flow"], "key");
}
