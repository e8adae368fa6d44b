//! Every AWS credential source real control planes use, end to end: the real binary, started with
//! only the AWS set-up each test gives it, serves on a moto KMS key. A recording proxy in front of
//! moto sees which access key signed each KMS and STS request; for assumed roles moto's
//! GetCallerIdentity names the role behind that key. The container endpoint (EKS Pod Identity)
//! and IMDSv2 have no real server on loopback: small stand-ins answer as the AWS services do.
#![cfg(feature = "aws-kms")]
mod support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kms_plugin::backend::Backend;
use kms_plugin::protocol::socket::ListenAddr;
use support::external::{start_moto, Moto};
use support::fault_proxy::{self, FaultProxy};
use support::http_fake::{self, Resp};
use support::plugin::{channel, v2_client, Plugin};

/// Secret values the tests hand out; none may appear in the plugin's (debug-level) log.
const SECRETS: &[&str] = &[
    "env-secret",
    "pod-secret",
    "pod-token",
    "pod-identity-token",
    "imds-session",
    "process-token",
    "eyJzdWIiOiJzeXN0ZW0ifQ",
];

struct Kms {
    moto: Moto,
    proxy: FaultProxy,
    arn: String,
}

async fn kms() -> Option<Kms> {
    let moto = start_moto()?;
    let admin = support::aws::backend(&moto.url, "unused", &[]).await;
    let (_, arn) = support::aws::create_key(&admin).await;
    let proxy = fault_proxy::start(&moto.url).await;
    Some(Kms { moto, proxy, arn })
}

/// Runs the plugin with `env` (plus defaults that keep the machine's own AWS set-up out), does one
/// Encrypt and Decrypt, and returns the access keys that signed KMS requests.
async fn serve(kms: &Kms, dir: &Path, env: &[(&str, String)]) -> HashSet<String> {
    let socket = dir.join("kms.sock");
    let args: Vec<String> = [
        "serve",
        "--listen",
        &format!("unix://{}", socket.display()),
        "--backend",
        "aws-kms",
        "--aws-kms-key-id",
        &kms.arn,
        "--aws-endpoint-url",
        &kms.proxy.url,
        "--probe-interval",
        "200ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let absent = |n: &str| dir.join(n).display().to_string();
    let mut all: Vec<(&str, String)> = env.to_vec();
    for (k, v) in [
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_CONFIG_FILE", absent("no-config")),
        ("AWS_SHARED_CREDENTIALS_FILE", absent("no-credentials")),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        // STS calls of the chain (assume-role, web identity) go to moto through the proxy.
        ("AWS_ENDPOINT_URL_STS", kms.proxy.url.clone()),
    ] {
        if !all.iter().any(|(n, _)| *n == k) {
            all.push((k, v));
        }
    }
    let env: Vec<(&str, &str)> = all.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let addr = ListenAddr::Path(socket);
    let mut p = Plugin::spawn_aws_isolated(&args, &env, addr.clone(), dir);
    p.wait_healthy(Duration::from_secs(20)).await;
    let mut c = v2_client(channel(&addr).await);
    let sealed = c
        .encrypt(kms_plugin::proto::v2::EncryptRequest {
            plaintext: vec![7; 32],
            uid: "e".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let plain = c
        .decrypt(kms_plugin::proto::v2::DecryptRequest {
            ciphertext: sealed.ciphertext,
            uid: "d".into(),
            key_id: sealed.key_id,
            annotations: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    assert_eq!(plain, vec![7; 32]);
    p.terminate();
    let log = p.log_text();
    for secret in SECRETS {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
    kms_signers(&kms.proxy)
}

fn kms_signers(proxy: &FaultProxy) -> HashSet<String> {
    proxy
        .seen()
        .into_iter()
        .filter(|(op, _)| op.starts_with("TrentService."))
        .map(|(op, akid)| akid.unwrap_or_else(|| panic!("unsigned KMS request {op}")))
        .collect()
}

/// The ARN moto's STS says is behind `access_key` (moto reads the key from the Authorization
/// header; the signature is not what is asked here).
async fn caller_arn(moto: &Moto, access_key: &str) -> String {
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential={access_key}/20250101/us-east-1/sts/aws4_request, \
         SignedHeaders=host, Signature=0"
    );
    let body = reqwest::Client::new()
        .post(&moto.url)
        .header("authorization", auth)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("Action=GetCallerIdentity&Version=2011-06-15")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let start = body.find("<Arn>").expect("GetCallerIdentity answer") + 5;
    let end = body[start..].find("</Arn>").unwrap() + start;
    body[start..end].to_string()
}

fn one(set: HashSet<String>) -> String {
    assert_eq!(set.len(), 1, "{set:?}");
    set.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_variables() {
    let Some(kms) = kms().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let signers = serve(
        &kms,
        dir.path(),
        &[
            ("AWS_ACCESS_KEY_ID", "AKIAFROMENVIRONMENT".into()),
            ("AWS_SECRET_ACCESS_KEY", "env-secret".into()),
        ],
    )
    .await;
    assert_eq!(one(signers), "AKIAFROMENVIRONMENT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_credentials_file_and_named_profile() {
    let Some(kms) = kms().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id = AKIADEFAULTPROFILE\naws_secret_access_key = d\n\n\
         [plugin]\naws_access_key_id = AKIANAMEDPROFILE\naws_secret_access_key = n\n",
    )
    .unwrap();
    let file = creds.display().to_string();
    let signers = serve(
        &kms,
        dir.path(),
        &[("AWS_SHARED_CREDENTIALS_FILE", file.clone())],
    )
    .await;
    assert_eq!(one(signers), "AKIADEFAULTPROFILE");
    let kms2 = Kms {
        proxy: fault_proxy::start(&kms.moto.url).await,
        ..kms
    };
    let dir2 = tempfile::tempdir().unwrap();
    let signers = serve(
        &kms2,
        dir2.path(),
        &[
            ("AWS_SHARED_CREDENTIALS_FILE", file),
            ("AWS_PROFILE", "plugin".into()),
        ],
    )
    .await;
    assert_eq!(one(signers), "AKIANAMEDPROFILE");
}

/// `role_arn` + `source_profile`: the source profile's key signs AssumeRole at moto's STS, and the
/// role's temporary key signs every KMS call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_assuming_a_role_from_a_source_profile() {
    let Some(kms) = kms().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::write(
        &config,
        "[profile base]\naws_access_key_id = AKIASOURCEPROFILE\naws_secret_access_key = b\n\n\
         [profile app]\nrole_arn = arn:aws:iam::123456789012:role/kms-plugin-app\n\
         source_profile = base\nrole_session_name = kms-plugin-test\n",
    )
    .unwrap();
    let signers = serve(
        &kms,
        dir.path(),
        &[
            ("AWS_CONFIG_FILE", config.display().to_string()),
            ("AWS_PROFILE", "app".into()),
        ],
    )
    .await;
    let assume: Vec<_> = kms
        .proxy
        .seen()
        .into_iter()
        .filter(|(op, _)| op == "AssumeRole")
        .collect();
    assert!(!assume.is_empty(), "{:?}", kms.proxy.seen());
    assert!(assume
        .iter()
        .all(|(_, k)| k.as_deref() == Some("AKIASOURCEPROFILE")));
    let key = one(signers);
    assert_ne!(key, "AKIASOURCEPROFILE");
    assert_eq!(
        caller_arn(&kms.moto, &key).await,
        "arn:aws:sts::123456789012:assumed-role/kms-plugin-app/kms-plugin-test"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_process() {
    let Some(kms) = kms().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("creds.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho '{\"Version\": 1, \"AccessKeyId\": \"ASIAFROMPROCESS\", \
         \"SecretAccessKey\": \"p\", \"SessionToken\": \"process-token\", \
         \"Expiration\": \"2099-01-01T00:00:00Z\"}'\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
    let config = dir.path().join("config");
    std::fs::write(
        &config,
        format!("[default]\ncredential_process = {}\n", script.display()),
    )
    .unwrap();
    let signers = serve(
        &kms,
        dir.path(),
        &[("AWS_CONFIG_FILE", config.display().to_string())],
    )
    .await;
    assert_eq!(one(signers), "ASIAFROMPROCESS");
}

/// IRSA: the projected service-account token is exchanged at STS (AssumeRoleWithWebIdentity) for
/// the role's temporary key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_identity_token_file_irsa() {
    let Some(kms) = kms().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW0ifQ.c2ln\n").unwrap();
    let signers = serve(
        &kms,
        dir.path(),
        &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", token.display().to_string()),
            (
                "AWS_ROLE_ARN",
                "arn:aws:iam::123456789012:role/kms-plugin-irsa".into(),
            ),
            ("AWS_ROLE_SESSION_NAME", "irsa-session".into()),
        ],
    )
    .await;
    assert!(kms
        .proxy
        .seen()
        .iter()
        .any(|(op, _)| op == "AssumeRoleWithWebIdentity"));
    let key = one(signers);
    assert_eq!(
        caller_arn(&kms.moto, &key).await,
        "arn:aws:sts::123456789012:assumed-role/kms-plugin-irsa/irsa-session"
    );
}

fn container_credentials(akid: &str, expires: SystemTime) -> String {
    let exp = humantime::format_rfc3339_seconds(expires);
    format!(
        r#"{{"AccessKeyId":"{akid}","SecretAccessKey":"pod-secret","Token":"pod-token","Expiration":"{exp}"}}"#
    )
}

/// EKS Pod Identity: the container credentials endpoint, called with the contents of the
/// authorization token file (re-read: the kubelet rotates it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_endpoint_with_authorization_token_file_pod_identity() {
    let Some(kms) = kms().await else { return };
    let agent = http_fake::start(|req| {
        if req.method == "GET"
            && req.path == "/v1/credentials"
            && req.header("authorization") == Some("pod-identity-token")
        {
            Resp::new(
                200,
                container_credentials(
                    "ASIAPODIDENTITY",
                    SystemTime::now() + Duration::from_secs(6 * 3600),
                ),
            )
            .header("content-type", "application/json")
        } else {
            Resp::new(401, r#"{"message":"bad token"}"#)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("eks-pod-identity-token");
    std::fs::write(&token, "pod-identity-token").unwrap();
    let signers = serve(
        &kms,
        dir.path(),
        &[
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                format!("{}/v1/credentials", agent.url),
            ),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                token.display().to_string(),
            ),
        ],
    )
    .await;
    assert_eq!(one(signers), "ASIAPODIDENTITY");
    assert!(agent
        .requests()
        .iter()
        .all(|r| r.header("authorization") == Some("pod-identity-token")));
}

/// IMDSv2: a session token first (PUT), then the role's credentials with that token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imds_v2_instance_role() {
    let Some(kms) = kms().await else { return };
    let imds = http_fake::start(|req| {
        let token_ok = req.header("x-aws-ec2-metadata-token") == Some("imds-session");
        match (req.method.as_str(), req.path.as_str()) {
            ("PUT", "/latest/api/token")
                if req.header("x-aws-ec2-metadata-token-ttl-seconds").is_some() =>
            {
                Resp::new(200, "imds-session").header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
            }
            _ if !token_ok => Resp::new(401, ""),
            ("GET", "/latest/meta-data/iam/security-credentials/") => {
                Resp::new(200, "node-role")
            }
            ("GET", "/latest/meta-data/iam/security-credentials/node-role") => Resp::new(
                200,
                format!(
                    r#"{{"Code":"Success","Type":"AWS-HMAC","AccessKeyId":"ASIAINSTANCEROLE","SecretAccessKey":"i","Token":"t","Expiration":"{}"}}"#,
                    humantime::format_rfc3339_seconds(
                        SystemTime::now() + Duration::from_secs(6 * 3600)
                    )
                ),
            ),
            _ => Resp::new(404, ""),
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let signers = serve(
        &kms,
        dir.path(),
        &[
            ("AWS_EC2_METADATA_DISABLED", "false".into()),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url.clone()),
        ],
    )
    .await;
    assert_eq!(one(signers), "ASIAINSTANCEROLE");
    let reqs = imds.requests();
    assert_eq!(reqs[0].method, "PUT");
}

/// Temporary credentials that expire every few seconds while KMS calls keep coming: the SDK's
/// cache renews them in time and not one call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credentials_expiring_under_load_fail_no_call() {
    let Some(kms) = kms().await else { return };
    #[derive(Debug)]
    struct ShortLived(Arc<AtomicUsize>);
    impl aws_credential_types::provider::ProvideCredentials for ShortLived {
        fn provide_credentials<'a>(
            &'a self,
        ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            let n = self.0.clone();
            aws_credential_types::provider::future::ProvideCredentials::new(async move {
                // A slow STS: renewals take a while.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let i = n.fetch_add(1, Ordering::SeqCst);
                Ok(aws_credential_types::Credentials::new(
                    format!("ASIASHORTLIVED{i}"),
                    "s",
                    Some("t".into()),
                    Some(SystemTime::now() + Duration::from_secs(11)),
                    "short-lived",
                ))
            })
        }
    }
    let loads = Arc::new(AtomicUsize::new(0));
    let args = support::aws::args(&kms.proxy.url, &kms.arn, &[("cluster", "load")]);
    let config = kms_plugin::backend::aws_kms::sdk_config(
        &args,
        Some(
            aws_credential_types::provider::SharedCredentialsProvider::new(ShortLived(
                loads.clone(),
            )),
        ),
    )
    .await
    .unwrap();
    let b = Arc::new(kms_plugin::backend::aws_kms::AwsKmsBackend::new(&args, &config).unwrap());
    // The plugin's cache renews in the second half of a short lifetime: after 5.5 s here.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    let mut tasks = Vec::new();
    for t in 0..4u8 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while tokio::time::Instant::now() < deadline {
                let r = async {
                    b.current_key().await?;
                    let w = b.wrap(&[t; 32]).await?;
                    let p = b.unwrap(&w.key_ref, &w.ciphertext).await?;
                    assert_eq!(&p[..], &[t; 32]);
                    Ok::<_, kms_plugin::backend::BackendError>(())
                }
                .await;
                match r {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    let mut total = 0;
    for t in tasks {
        let (ok, failed) = t.await.unwrap();
        assert!(failed.is_empty(), "failed calls: {failed:?}");
        total += ok;
    }
    assert!(total > 20, "only {total} rounds");
    let signers = kms_signers(&kms.proxy);
    assert!(
        loads.load(Ordering::SeqCst) >= 2 && signers.len() >= 2,
        "no renewal under load: {} loads, signers {signers:?}",
        loads.load(Ordering::SeqCst)
    );
}

/// A renewal that hangs (an STS or IMDS hiccup) while the current credentials are still valid:
/// every call keeps being served with them, none waits for the renewal, and the new credentials
/// are used once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_renewal_stalls_no_call() {
    let Some(kms) = kms().await else { return };
    #[derive(Debug)]
    struct HangingRenewal {
        calls: Arc<AtomicUsize>,
        release: Arc<tokio::sync::Notify>,
    }
    impl aws_credential_types::provider::ProvideCredentials for HangingRenewal {
        fn provide_credentials<'a>(
            &'a self,
        ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            let (calls, release) = (self.calls.clone(), self.release.clone());
            aws_credential_types::provider::future::ProvideCredentials::new(async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Ok(aws_credential_types::Credentials::new(
                        "ASIABEFORE",
                        "s",
                        Some("t".into()),
                        Some(SystemTime::now() + Duration::from_secs(12)),
                        "hanging",
                    ));
                }
                release.notified().await;
                Ok(aws_credential_types::Credentials::new(
                    "ASIAAFTER",
                    "s",
                    Some("t".into()),
                    Some(SystemTime::now() + Duration::from_secs(3600)),
                    "hanging",
                ))
            })
        }
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let args = support::aws::args(&kms.proxy.url, &kms.arn, &[("cluster", "hang")]);
    let source = HangingRenewal {
        calls: calls.clone(),
        release: release.clone(),
    };
    let config = kms_plugin::backend::aws_kms::sdk_config(
        &args,
        Some(aws_credential_types::provider::SharedCredentialsProvider::new(source)),
    )
    .await
    .unwrap();
    let b = Arc::new(kms_plugin::backend::aws_kms::AwsKmsBackend::new(&args, &config).unwrap());
    let rounds = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..4u8 {
        let (b, rounds, stop) = (b.clone(), rounds.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let r = async {
                    let w = b.wrap(&[t; 32]).await?;
                    let p = b.unwrap(&w.key_ref, &w.ciphertext).await?;
                    assert_eq!(&p[..], &[t; 32]);
                    Ok::<_, kms_plugin::backend::BackendError>(())
                }
                .await;
                match r {
                    Ok(()) => {
                        rounds.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            failed
        }));
    }
    // Poll with a bound: the renewal starts 6 s in (half the lifetime) and then hangs.
    let poll = |what: &'static str, deadline: Duration, cond: Box<dyn Fn() -> bool + Send>| async move {
        let end = tokio::time::Instant::now() + deadline;
        while !cond() {
            assert!(
                tokio::time::Instant::now() < end,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let c = calls.clone();
    poll(
        "the renewal",
        Duration::from_secs(15),
        Box::new(move || c.load(Ordering::SeqCst) >= 2),
    )
    .await;
    let during = rounds.load(Ordering::SeqCst);
    let r = rounds.clone();
    poll(
        "calls served while the renewal hangs",
        Duration::from_secs(3),
        Box::new(move || r.load(Ordering::SeqCst) >= during + 20),
    )
    .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the hanging renewal was started again"
    );
    release.notify_one();
    let p = kms.proxy.clone();
    poll(
        "the renewed credentials",
        Duration::from_secs(10),
        Box::new(move || kms_signers(&p).contains("ASIAAFTER")),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let failed = t.await.unwrap();
        assert!(failed.is_empty(), "failed calls: {failed:?}");
    }
    assert_eq!(
        kms_signers(&kms.proxy),
        HashSet::from(["ASIABEFORE".to_string(), "ASIAAFTER".to_string()])
    );
}
