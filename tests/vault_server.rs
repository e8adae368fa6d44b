//! The Vault Transit backend against a real Vault dev server (`make deps-vault` builds one): the
//! conformance suite with rotation, `min_decryption_version` revoking only older versions, a sealed
//! server and a proxy's answers as outages, permission denied, AppRole and JWT tokens expiring
//! under load, TLS certificate login on an HTTPS listener, and the served binary's socket
//! conformance.
#![cfg(feature = "vault")]
mod support;

use std::sync::Arc;
use std::time::Duration;

use kms_plugin::backend::vault::{VaultArgs, VaultAuth, VaultBackend};
use kms_plugin::backend::{Backend, BackendError};
use kms_plugin::engine::{Api, Binding, Engine, EngineConfig, KeyHealth};
use serde_json::{json, Value};
use support::external::{start_vault, start_vault_tls, Vault};
use support::fault_proxy::{self, ProxyAnswer};

struct Admin {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Admin {
    fn new(v: &Vault) -> Self {
        let mut http = reqwest::Client::builder();
        if let Some(ca) = &v.ca_file {
            let pem = std::fs::read(ca).unwrap();
            http = http.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
        }
        Admin {
            http: http.build().unwrap(),
            url: v.url.clone(),
            token: v.root_token.clone(),
        }
    }
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self
            .http
            .request(method, format!("{}/v1/{path}", self.url))
            .header("x-vault-token", &self.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }
    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
    async fn setup_transit(&self, key: &str) {
        self.post("sys/mounts/transit", json!({ "type": "transit" }))
            .await;
        self.post(
            &format!("transit/keys/{key}"),
            json!({ "type": "aes256-gcm96" }),
        )
        .await;
    }
    async fn policy(&self, name: &str, rules: &str) {
        self.call(
            reqwest::Method::PUT,
            &format!("sys/policies/acl/{name}"),
            Some(json!({ "policy": rules })),
        )
        .await;
    }
}

const KMS_POLICY: &str = r#"
path "transit/encrypt/k8s" { capabilities = ["update"] }
path "transit/decrypt/k8s" { capabilities = ["update"] }
path "transit/keys/k8s" { capabilities = ["read"] }
"#;

fn token_args(url: &str, token_file: &std::path::Path) -> VaultArgs {
    VaultArgs {
        vault_addr: Some(url.to_string()),
        vault_transit_key: Some("k8s".into()),
        vault_transit_mount: "transit".into(),
        vault_token_file: Some(token_file.to_path_buf()),
        ..Default::default()
    }
}

fn backend_with_token(url: &str, token: &str, dir: &tempfile::TempDir) -> Arc<VaultBackend> {
    let file = dir.path().join(format!("token-{}", rand::random::<u32>()));
    std::fs::write(&file, token).unwrap();
    Arc::new(VaultBackend::with_env(&token_args(url, &file), |_| None).unwrap())
}

#[tokio::test]
async fn conforms_and_follows_rotation() {
    let Some(vault) = start_vault() else { return };
    let admin = Arc::new(Admin::new(&vault));
    admin.setup_transit("k8s").await;
    let dir = tempfile::tempdir().unwrap();
    let b = backend_with_token(&vault.url, &vault.root_token, &dir);
    assert_eq!(b.current_key().await.unwrap().key_id, "k8s:v1");
    let a = admin.clone();
    support::conformance::run(
        b.clone(),
        Some(Box::new(move || {
            let a = a.clone();
            Box::pin(async move {
                a.post("transit/keys/k8s/rotate", json!({})).await;
            })
        })),
    )
    .await;
    assert_eq!(b.current_key().await.unwrap().key_id, "k8s:v2");
    let w = b.wrap(b"x").await.unwrap();
    assert_eq!(
        (w.key_ref.as_str(), w.key_id.as_str()),
        ("k8s:v2", "k8s:v2")
    );
}

#[tokio::test]
async fn min_decryption_version_revokes_only_older_data() {
    let Some(vault) = start_vault() else { return };
    let admin = Admin::new(&vault);
    admin.setup_transit("k8s").await;
    let dir = tempfile::tempdir().unwrap();
    let b = backend_with_token(&vault.url, &vault.root_token, &dir);
    let engine = Engine::new(b.clone(), EngineConfig::default());
    engine.probe(true).await.unwrap();
    let old = engine.encrypt(&[1; 32], Api::V2).await.unwrap();
    admin.post("transit/keys/k8s/rotate", json!({})).await;
    engine.probe(false).await.unwrap();
    let new = engine.encrypt(&[2; 32], Api::V2).await.unwrap();
    assert_ne!(old.key_id, new.key_id);
    admin
        .post(
            "transit/keys/k8s/config",
            json!({ "min_decryption_version": 2 }),
        )
        .await;
    // Vault refuses version 1 in its own error shape: KeyDisabled for that version only.
    let w1 = kms_plugin::engine::format::parse(&old.ciphertext).unwrap();
    let err = b.unwrap(w1.key_ref, w1.wrapped).await.unwrap_err();
    assert!(matches!(err, BackendError::KeyDisabled(_)), "{err:?}");
    engine.probe(true).await.unwrap();
    assert!(matches!(engine.key_health("k8s:v1"), KeyHealth::Revoked(_)));
    assert_eq!(engine.key_health("k8s:v2"), KeyHealth::Active);
    let bind = |s: &kms_plugin::engine::Sealed| s.key_id.clone();
    let k_old = bind(&old);
    assert!(engine
        .decrypt(&old.ciphertext, Binding::V2 { key_id: &k_old })
        .await
        .is_err());
    let k_new = bind(&new);
    let back = engine
        .decrypt(&new.ciphertext, Binding::V2 { key_id: &k_new })
        .await
        .unwrap();
    assert_eq!(&back.plaintext[..], &[2; 32]);
    assert_eq!(engine.status().healthz, "ok");
}

#[tokio::test]
async fn sealed_vault_and_proxy_answers_are_outages_not_revocations() {
    let Some(vault) = start_vault() else { return };
    let admin = Admin::new(&vault);
    admin.setup_transit("k8s").await;
    let proxy = fault_proxy::start(&vault.url).await;
    let dir = tempfile::tempdir().unwrap();
    let b = backend_with_token(&proxy.url, &vault.root_token, &dir);
    let engine = Engine::new(b.clone(), EngineConfig::default());
    engine.probe(true).await.unwrap();
    let sealed = engine.encrypt(&[7; 32], Api::V1).await.unwrap();
    for answer in [
        ProxyAnswer::html(403),
        ProxyAnswer::html(404),
        ProxyAnswer::empty(403),
    ] {
        proxy.set(Some(answer));
        let err = b.current_key().await.unwrap_err();
        assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
        assert!(engine.probe(true).await.is_err());
        assert_eq!(engine.key_health("k8s:v1"), KeyHealth::Active);
        let back = engine
            .decrypt(&sealed.ciphertext, Binding::V1)
            .await
            .unwrap();
        assert_eq!(&back.plaintext[..], &[7; 32]);
    }
    proxy.set(None);
    engine.probe(true).await.unwrap();
    // Sealed: Vault answers 503 in its own shape; still an outage.
    admin.call(reqwest::Method::PUT, "sys/seal", None).await;
    let err = b.current_key().await.unwrap_err();
    assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
    assert!(engine.probe(true).await.is_err());
    assert_eq!(engine.key_health("k8s:v1"), KeyHealth::Active);
    assert!(engine
        .decrypt(&sealed.ciphertext, Binding::V1)
        .await
        .is_ok());
    reqwest::Client::new()
        .put(format!("{}/v1/sys/unseal", vault.url))
        .json(&json!({ "key": vault.unseal_key }))
        .send()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while engine.probe(true).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Vault did not come back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn permission_denied_and_a_dead_token_are_told_apart() {
    let Some(vault) = start_vault() else { return };
    let admin = Admin::new(&vault);
    admin.setup_transit("k8s").await;
    admin
        .policy(
            "read-only",
            r#"path "transit/keys/k8s" { capabilities = ["read"] }"#,
        )
        .await;
    let t = admin
        .post(
            "auth/token/create",
            json!({ "policies": ["read-only"], "ttl": "1h" }),
        )
        .await;
    let token = t["auth"]["client_token"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let b = backend_with_token(&vault.url, token, &dir);
    b.current_key().await.unwrap();
    let err = b.wrap(b"x").await.unwrap_err();
    assert!(
        matches!(err, BackendError::PermissionDenied(ref m) if m.contains("transit/encrypt/k8s")),
        "{err:?}"
    );
    let dead = backend_with_token(&vault.url, "hvs.not-a-token", &dir);
    let err = dead.current_key().await.unwrap_err();
    assert!(matches!(err, BackendError::Authentication(_)), "{err:?}");
    assert!(!err.to_string().contains("hvs.not-a-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approle_tokens_expiring_under_load_cost_no_failed_call() {
    let Some(vault) = start_vault() else { return };
    let admin = Admin::new(&vault);
    admin.setup_transit("k8s").await;
    admin.policy("kms", KMS_POLICY).await;
    admin
        .post("sys/auth/approle", json!({ "type": "approle" }))
        .await;
    admin
        .post(
            "auth/approle/role/kms",
            json!({ "token_policies": ["kms"], "token_ttl": "3s", "token_max_ttl": "6s" }),
        )
        .await;
    let role_id = admin
        .call(reqwest::Method::GET, "auth/approle/role/kms/role-id", None)
        .await["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_string();
    let secret_id = admin
        .post("auth/approle/role/kms/secret-id", json!({}))
        .await["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret-id");
    std::fs::write(&secret_file, &secret_id).unwrap();
    let b = Arc::new(
        VaultBackend::with_env(
            &VaultArgs {
                vault_addr: Some(vault.url.clone()),
                vault_transit_key: Some("k8s".into()),
                vault_transit_mount: "transit".into(),
                vault_auth: VaultAuth::Approle,
                vault_role_id: Some(role_id),
                vault_secret_id_file: Some(secret_file),
                ..Default::default()
            },
            |_| None,
        )
        .unwrap(),
    );
    // 9 s of calls: the token is renewed at 2 s, reaches its 6 s max TTL, and a new login follows.
    let calls = calls_keep_succeeding(&b, Duration::from_secs(9)).await;
    assert!(calls > 20, "{calls}");
}

#[tokio::test]
async fn served_binary_passes_socket_conformance_with_vaults_environment() {
    let Some(vault) = start_vault() else { return };
    let admin = Admin::new(&vault);
    admin.setup_transit("k8s").await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kms.sock");
    let args: Vec<String> = [
        "serve",
        "--listen",
        &format!("unix://{}", socket.display()),
        "--backend",
        "vault",
        "--vault-transit-key",
        "k8s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    std::env::set_var("VAULT_ADDR", &vault.url);
    std::env::set_var("VAULT_TOKEN", &vault.root_token);
    let addr = kms_plugin::protocol::socket::ListenAddr::Path(socket.clone());
    let p = support::plugin::Plugin::start(&args, addr.clone(), dir.path()).await;
    support::plugin::socket_conformance(&addr, &socket).await;
    let log = p.log_text();
    assert!(!log.contains("hvs."), "a Vault token in the log");
}

/// Wraps and unwraps for `for_how_long`, one call every 100 ms; every call must succeed.
async fn calls_keep_succeeding(b: &VaultBackend, for_how_long: Duration) -> usize {
    let until = std::time::Instant::now() + for_how_long;
    let mut calls = 0;
    while std::time::Instant::now() < until {
        let w = b.wrap(b"secret").await.expect("wrap while tokens expire");
        assert_eq!(
            &b.unwrap(&w.key_ref, &w.ciphertext).await.expect("unwrap")[..],
            b"secret"
        );
        calls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    calls
}

/// JWT auth with a signing key configured in Vault (`jwt_validation_pubkeys`, no JWKS server):
/// logins work, the short-lived Vault tokens are replaced under load without a failed call, and a
/// JWT for another audience is an authentication failure, not a revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_login_renews_under_load_and_a_wrong_audience_is_not_a_revocation() {
    let Some(vault) = start_vault() else { return };
    let admin = Admin::new(&vault);
    admin.setup_transit("k8s").await;
    admin.policy("kms", KMS_POLICY).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    support::external::run_python("tests/python/vault_fixtures.py", &["signer", d]);
    let public = std::fs::read_to_string(dir.path().join("jwt-pub.pem")).unwrap();
    admin.post("sys/auth/jwt", json!({ "type": "jwt" })).await;
    admin
        .post(
            "auth/jwt/config",
            json!({ "jwt_validation_pubkeys": [public], "bound_issuer": "https://issuer.test" }),
        )
        .await;
    admin
        .post(
            "auth/jwt/role/kms",
            json!({
                "role_type": "jwt",
                "bound_audiences": ["vault-kms"],
                "user_claim": "sub",
                "token_policies": ["kms"],
                "token_ttl": "2s",
                "token_max_ttl": "4s",
            }),
        )
        .await;
    let jwt_file = dir.path().join("token");
    let mint = |aud: &str| {
        support::external::run_python(
            "tests/python/vault_fixtures.py",
            &[
                "jwt",
                d,
                "https://issuer.test",
                "system:serviceaccount:kube-system:kms",
                aud,
                "600",
            ],
        )
    };
    std::fs::write(&jwt_file, mint("vault-kms").trim()).unwrap();
    let args = |role: &str| VaultArgs {
        vault_addr: Some(vault.url.clone()),
        vault_transit_key: Some("k8s".into()),
        vault_transit_mount: "transit".into(),
        vault_auth: VaultAuth::Jwt,
        vault_role: Some(role.into()),
        vault_jwt_file: Some(jwt_file.clone()),
        ..Default::default()
    };
    let b = VaultBackend::with_env(&args("kms"), |_| None).unwrap();
    // 6 s of calls: tokens of at most 4 s are renewed, then replaced by new logins.
    let calls = calls_keep_succeeding(&b, Duration::from_secs(6)).await;
    assert!(calls > 20, "{calls}");

    let wrong = dir.path().join("wrong-audience");
    std::fs::write(&wrong, mint("someone-else").trim()).unwrap();
    let b = VaultBackend::with_env(
        &VaultArgs {
            vault_jwt_file: Some(wrong),
            ..args("kms")
        },
        |_| None,
    )
    .unwrap();
    let err = b.current_key().await.unwrap_err();
    assert!(matches!(err, BackendError::Authentication(_)), "{err:?}");
    assert!(
        !err.to_string().contains("eyJ"),
        "the JWT leaked into the error: {err}"
    );
}

/// TLS certificate auth on an HTTPS listener whose CA is given with --vault-cacert: a client
/// certificate Vault trusts logs in; one it does not trust is an authentication failure.
#[tokio::test]
async fn cert_login_over_https_with_a_private_ca() {
    let Some(vault) = start_vault_tls() else {
        return;
    };
    let admin = Admin::new(&vault);
    admin.setup_transit("k8s").await;
    admin.policy("kms", KMS_POLICY).await;
    let trusted = tempfile::tempdir().unwrap();
    let untrusted = tempfile::tempdir().unwrap();
    for d in [&trusted, &untrusted] {
        support::external::run_python(
            "tests/fakes/akeyless_fake.py",
            &["--make-certs", d.path().to_str().unwrap()],
        );
    }
    admin.post("sys/auth/cert", json!({ "type": "cert" })).await;
    let client_ca = std::fs::read_to_string(trusted.path().join("ca.pem")).unwrap();
    admin
        .post(
            "auth/cert/certs/kms",
            json!({ "certificate": client_ca, "token_policies": ["kms"], "token_ttl": "1h" }),
        )
        .await;
    let args = |certs: &std::path::Path| VaultArgs {
        vault_addr: Some(vault.url.clone()),
        vault_transit_key: Some("k8s".into()),
        vault_transit_mount: "transit".into(),
        vault_auth: VaultAuth::Cert,
        vault_cacert: vault.ca_file.clone(),
        vault_client_cert_file: Some(certs.join("client.pem")),
        vault_client_key_file: Some(certs.join("client-key.pem")),
        ..Default::default()
    };
    let b = VaultBackend::with_env(&args(trusted.path()), |_| None).unwrap();
    let w = b.wrap(b"over tls").await.expect("wrap after cert login");
    assert_eq!(
        &b.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"over tls"
    );

    let b = VaultBackend::with_env(&args(untrusted.path()), |_| None).unwrap();
    let err = b.current_key().await.unwrap_err();
    assert!(matches!(err, BackendError::Authentication(_)), "{err:?}");
}

/// A live move from the local key file to Vault (`--backend vault --previous-backend local`): the
/// key_id becomes Vault's, data written under the local key still decrypts, new data is under
/// Vault; once the previous backend is dropped, only the new data decrypts.
#[tokio::test]
async fn migration_from_the_local_key_file_to_vault_keeps_old_data_readable() {
    let Some(vault) = start_vault() else { return };
    let admin = Admin::new(&vault);
    admin.setup_transit("k8s").await;
    let setup = support::plugin::Setup::new();
    let token = setup.dir.path().join("vault-token");
    std::fs::write(&token, &vault.root_token).unwrap();
    let decrypt =
        |sealed: &kms_plugin::proto::v2::EncryptResponse| kms_plugin::proto::v2::DecryptRequest {
            ciphertext: sealed.ciphertext.clone(),
            uid: "migration".into(),
            key_id: sealed.key_id.clone(),
            annotations: Default::default(),
        };
    let encrypt = |p: &[u8]| kms_plugin::proto::v2::EncryptRequest {
        plaintext: p.to_vec(),
        uid: "migration".into(),
    };
    let mut plugin =
        support::plugin::Plugin::start(&setup.args(), setup.addr(), setup.dir.path()).await;
    let mut c = support::plugin::v2_client(support::plugin::channel(&setup.addr()).await);
    let old = c
        .encrypt(encrypt(b"under the local key"))
        .await
        .unwrap()
        .into_inner();
    assert!(old.key_id.starts_with("local:"), "{}", old.key_id);
    plugin.terminate();

    let vault_args = [
        "--backend",
        "vault",
        "--vault-addr",
        &vault.url,
        "--vault-transit-key",
        "k8s",
        "--vault-token-file",
        token.to_str().unwrap(),
    ];
    // setup.args() is `serve --listen … --backend local --local-key-file F …`: keep the local flags
    // for the previous backend, and make vault the backend.
    let with_vault = |previous: bool| {
        let mut args = setup.args();
        let at = args.iter().position(|a| a == "--backend").unwrap();
        args[at] = "--previous-backend".into();
        if !previous {
            args.drain(at..at + 4); // --previous-backend local --local-key-file F
        }
        args.extend(vault_args.iter().map(|s| s.to_string()));
        args
    };
    let args = with_vault(true);
    let mut plugin = support::plugin::Plugin::start(&args, setup.addr(), setup.dir.path()).await;
    let mut c = support::plugin::v2_client(support::plugin::channel(&setup.addr()).await);
    let status = c
        .status(kms_plugin::proto::v2::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.key_id.starts_with("vault:"), "{}", status.key_id);
    let back = c.decrypt(decrypt(&old)).await.unwrap().into_inner();
    assert_eq!(back.plaintext, b"under the local key");
    let new = c
        .encrypt(encrypt(b"under vault"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(new.key_id, status.key_id);
    assert_eq!(
        c.decrypt(decrypt(&new))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        b"under vault"
    );
    plugin.terminate();

    // Without the previous backend, the old data is out of reach; the new data is not.
    let args = with_vault(false);
    let _plugin = support::plugin::Plugin::start(&args, setup.addr(), setup.dir.path()).await;
    let mut c = support::plugin::v2_client(support::plugin::channel(&setup.addr()).await);
    assert!(c.decrypt(decrypt(&old)).await.is_err());
    assert_eq!(
        c.decrypt(decrypt(&new))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        b"under vault"
    );
}
