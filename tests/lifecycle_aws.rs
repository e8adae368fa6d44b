//! The key lifecycle through the real binary on a real KMS API (moto), with a fault-injecting proxy
//! in front of it: a proxy's 403/404 (HTML or empty) is an outage, never a revocation; a real
//! revocation (DisableKey) drops only the data under that key; a key manager that is away at
//! start-up leaves the plugin up and unhealthy until it is back.
#![cfg(feature = "aws-kms")]
mod support;

use std::time::Duration;

use kms_plugin::backend::aws_kms::AwsKmsBackend;
use kms_plugin::proto::v2;
use kms_plugin::protocol::socket::ListenAddr;
use support::aws::{child_env, point_alias, set_enabled};
use support::external::start_moto;
use support::fault_proxy::{self, ProxyAnswer};
use support::plugin::{channel, try_status, v2_client, Plugin};

async fn admin(url: &str) -> AwsKmsBackend {
    support::aws::backend(url, "unused", &[]).await
}

async fn create_key(admin: &AwsKmsBackend) -> String {
    support::aws::create_key(admin).await.0
}

fn serve_args(socket: &std::path::Path, endpoint: &str, key: &str) -> Vec<String> {
    [
        "serve",
        "--listen",
        &format!("unix://{}", socket.display()),
        "--backend",
        "aws-kms",
        "--aws-kms-key-id",
        key,
        "--aws-region",
        "us-east-1",
        "--aws-endpoint-url",
        endpoint,
        "--probe-interval",
        "200ms",
        "--deep-probe-interval",
        "1s",
        "--backend-timeout",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Starts the plugin with the test credentials in its own environment only.
async fn start(args: &[String], addr: &ListenAddr, dir: &std::path::Path) -> Plugin {
    let p = spawn(args, addr, dir);
    p.wait_healthy(Duration::from_secs(20)).await;
    p
}

fn spawn(args: &[String], addr: &ListenAddr, dir: &std::path::Path) -> Plugin {
    let env = child_env(dir);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Plugin::spawn_aws_isolated(args, &env, addr.clone(), dir)
}

async fn wait_status(addr: &ListenAddr, limit: Duration, want_ok: bool) -> String {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok(s) = try_status(addr).await {
            if (s.healthz == "ok") == want_ok {
                return s.healthz;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Status did not become {} within {limit:?}",
            if want_ok { "ok" } else { "unhealthy" }
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn encrypt(addr: &ListenAddr, i: u8) -> (v2::EncryptResponse, Vec<u8>) {
    let mut c = v2_client(channel(addr).await);
    let plain = vec![i; 32];
    let resp = c
        .encrypt(v2::EncryptRequest {
            plaintext: plain.clone(),
            uid: format!("enc-{i}"),
        })
        .await
        .unwrap()
        .into_inner();
    (resp, plain)
}

async fn decrypt(
    addr: &ListenAddr,
    sealed: &v2::EncryptResponse,
) -> Result<Vec<u8>, tonic::Status> {
    let mut c = v2_client(channel(addr).await);
    c.decrypt(v2::DecryptRequest {
        ciphertext: sealed.ciphertext.clone(),
        uid: "dec".into(),
        key_id: sealed.key_id.clone(),
        annotations: Default::default(),
    })
    .await
    .map(|r| r.into_inner().plaintext)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_errors_in_front_of_kms_are_an_outage_not_a_revocation() {
    let Some(moto) = start_moto() else { return };
    let key = create_key(&admin(&moto.url).await).await;
    let proxy = fault_proxy::start(&moto.url).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kms.sock");
    let addr = ListenAddr::Path(socket.clone());
    let plugin = start(&serve_args(&socket, &proxy.url, &key), &addr, dir.path()).await;
    let mut sealed = Vec::new();
    for i in 0..5 {
        sealed.push(encrypt(&addr, i).await);
    }
    for answer in [
        ProxyAnswer::html(404),
        ProxyAnswer::html(403),
        ProxyAnswer::empty(403),
        ProxyAnswer::empty(404),
    ] {
        let status = answer.status;
        proxy.set(Some(answer));
        let healthz = wait_status(&addr, Duration::from_secs(10), false).await;
        assert!(!healthz.contains("revoked"), "{status}: {healthz}");
        // Several probes see the proxy's answer; cached Decrypts keep working all along.
        let probes_before = proxy.forwarded();
        for _ in 0..3 {
            for (s, plain) in &sealed {
                assert_eq!(
                    &decrypt(&addr, s).await.expect("cached Decrypt failed"),
                    plain
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(
            proxy.forwarded(),
            probes_before,
            "nothing reached KMS meanwhile"
        );
        proxy.set(None);
        wait_status(&addr, Duration::from_secs(10), true).await;
    }
    for (s, plain) in &sealed {
        assert_eq!(&decrypt(&addr, s).await.unwrap(), plain);
    }
    let log = plugin.log_text();
    assert!(
        !log.contains("revocation confirmed"),
        "a proxy answer revoked the key:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_key_drops_only_its_own_data() {
    let Some(moto) = start_moto() else { return };
    let admin = admin(&moto.url).await;
    let k1 = create_key(&admin).await;
    let k2 = create_key(&admin).await;
    point_alias(&admin, true, "alias/lc", &k1).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kms.sock");
    let addr = ListenAddr::Path(socket.clone());
    let _plugin = start(
        &serve_args(&socket, &moto.url, "alias/lc"),
        &addr,
        dir.path(),
    )
    .await;
    let (old, old_plain) = encrypt(&addr, 1).await;
    point_alias(&admin, false, "alias/lc", &k2).await;
    let new_id =
        support::plugin::wait_for_key_id_change(&addr, &old.key_id, Duration::from_secs(10)).await;
    let (new, new_plain) = encrypt(&addr, 2).await;
    assert_eq!(new.key_id, new_id);
    // Disable the current key: the probe sees DisableKey's state through DescribeKey.
    set_enabled(&admin, &k2, false).await;
    let healthz = wait_status(&addr, Duration::from_secs(5), false).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match decrypt(&addr, &new).await {
            Err(s) if s.code() == tonic::Code::FailedPrecondition => break,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still decrypting: {other:?} ({healthz})"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }
    let status = try_status(&addr).await.unwrap();
    assert!(
        status.healthz.starts_with("key revoked"),
        "{}",
        status.healthz
    );
    assert_eq!(
        decrypt(&addr, &old).await.unwrap(),
        old_plain,
        "data under the other key still reads"
    );
    set_enabled(&admin, &k2, true).await;
    wait_status(&addr, Duration::from_secs(10), true).await;
    assert_eq!(decrypt(&addr, &new).await.unwrap(), new_plain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_away_at_start_up_is_not_fatal() {
    let Some(moto) = start_moto() else { return };
    let key = create_key(&admin(&moto.url).await).await;
    let proxy = fault_proxy::start(&moto.url).await;
    proxy.set(Some(ProxyAnswer::empty(503)));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kms.sock");
    let addr = ListenAddr::Path(socket.clone());
    let mut plugin = spawn(&serve_args(&socket, &proxy.url, &key), &addr, dir.path());
    let healthz = wait_status(&addr, Duration::from_secs(20), false).await;
    assert!(!healthz.contains("revoked"), "{healthz}");
    assert!(
        plugin.child.try_wait().unwrap().is_none(),
        "the plugin exited:\n{}",
        plugin.log_text()
    );
    proxy.set(None);
    wait_status(&addr, Duration::from_secs(20), true).await;
    let (sealed, plain) = encrypt(&addr, 7).await;
    assert_eq!(decrypt(&addr, &sealed).await.unwrap(), plain);
    plugin.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_key_disabled_while_cached_stops_decrypting_within_one_deep_probe() {
    let Some(moto) = start_moto() else { return };
    let admin = admin(&moto.url).await;
    let k1 = create_key(&admin).await;
    let k2 = create_key(&admin).await;
    point_alias(&admin, true, "alias/old", &k1).await;
    let proxy = fault_proxy::start(&moto.url).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kms.sock");
    let addr = ListenAddr::Path(socket.clone());
    let _plugin = start(
        &serve_args(&socket, &proxy.url, "alias/old"),
        &addr,
        dir.path(),
    )
    .await;
    let (old, old_plain) = encrypt(&addr, 1).await;
    point_alias(&admin, false, "alias/old", &k2).await;
    support::plugin::wait_for_key_id_change(&addr, &old.key_id, Duration::from_secs(10)).await;
    let (new, new_plain) = encrypt(&addr, 2).await;
    // k1 is disabled. moto keeps decrypting under a disabled key; real KMS answers Decrypt with a
    // typed DisabledException, which the proxy adds in KMS's own error shape.
    set_enabled(&admin, &k1, false).await;
    let arn1 = admin
        .client()
        .describe_key()
        .key_id(&k1)
        .send()
        .await
        .unwrap()
        .key_metadata()
        .unwrap()
        .arn()
        .unwrap()
        .to_string();
    proxy.answer_typed(
        &arn1,
        400,
        "application/x-amz-json-1.1",
        &format!(r#"{{"__type":"DisabledException","message":"{arn1} is disabled."}}"#),
    );
    let started = std::time::Instant::now();
    loop {
        match decrypt(&addr, &old).await {
            Err(s) if s.code() == tonic::Code::FailedPrecondition => break,
            Ok(_) => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "old data still decrypts"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(s) => panic!("unexpected {s}"),
        }
    }
    // Within one deep-probe interval (1 s here) plus the two checks' backend timeouts (2 s each),
    // with slack for a loaded machine.
    let bound = Duration::from_secs(1 + 2 * 2 + 2);
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    assert_eq!(
        decrypt(&addr, &new).await.unwrap(),
        new_plain,
        "current key unaffected"
    );
    assert_eq!(try_status(&addr).await.unwrap().healthz, "ok");
    set_enabled(&admin, &k1, true).await;
    proxy.clear_typed();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while decrypt(&addr, &old).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "old key not accepted again"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(decrypt(&addr, &old).await.unwrap(), old_plain);
}
