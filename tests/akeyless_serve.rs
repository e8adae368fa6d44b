//! The real binary on the Akeyless backend (against the fake Akeyless API): socket conformance,
//! rotation picked up without restart, drop-in `AKEYLESS_*` configuration, and credentials that
//! never reach the logs.
#![cfg(feature = "akeyless")]
mod support;

use std::time::Duration;

use kms_plugin::proto::v2;
use kms_plugin::protocol::socket::ListenAddr;
use serde_json::json;
use support::akeyless_fake::{Fake, ACCESS_ID, ACCESS_KEY, KEY};
use support::plugin::{channel, socket_conformance, v2_client, Plugin, BIN};

#[tokio::test]
async fn drop_in_environment_conformance_and_rotation() {
    let Some(fake) = Fake::start(&[]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("akeyless.sock");
    // Configured only the way the original plugin image is: AKEYLESS_* variables, no flags.
    std::env::set_var("AKEYLESS_URL", &fake.url);
    std::env::set_var("AKEYLESS_UNIX_SOCKET", &socket);
    std::env::set_var("AKEYLESS_KEY_ENCRYPTION_KEY", KEY);
    std::env::set_var("AKEYLESS_ACCESS_ID", ACCESS_ID);
    std::env::set_var("AKEYLESS_ACCESS_KEY", ACCESS_KEY);
    std::env::set_var("KMS_PLUGIN_PROBE_INTERVAL", "200ms");
    std::env::set_var("KMS_PLUGIN_DATA_DIR", dir.path());
    let addr = ListenAddr::Path(socket.clone());
    let p = Plugin::start(&["serve".to_string()], addr.clone(), dir.path()).await;
    socket_conformance(&addr, &socket).await;

    // "Rotate key now" in Akeyless reaches Status without a restart; old data still decrypts.
    let mut c = v2_client(channel(&addr).await);
    let before = c
        .status(v2::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .key_id;
    assert!(before.starts_with("akeyless:"), "{before}");
    let old = c
        .encrypt(v2::EncryptRequest {
            plaintext: vec![1; 32],
            uid: "u".into(),
        })
        .await
        .unwrap()
        .into_inner();
    fake.control("key", json!({ "name": KEY, "action": "rotate" }))
        .await;
    support::plugin::wait_for_key_id_change(&addr, &before, Duration::from_secs(10)).await;
    let new = c
        .encrypt(v2::EncryptRequest {
            plaintext: vec![2; 32],
            uid: "u".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(new.key_id, old.key_id);
    let back = c
        .decrypt(v2::DecryptRequest {
            ciphertext: old.ciphertext,
            uid: "u".into(),
            key_id: old.key_id,
            annotations: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.plaintext, vec![1; 32]);

    let log = p.log_text();
    assert!(!log.contains(ACCESS_KEY), "access key in the log");
}

#[test]
fn bad_credentials_stop_start_up_with_the_cause() {
    let Some(fake) = Fake::start(&[]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--backend", "akeyless", "--listen"])
        .arg(format!("unix://{}/kms.sock", dir.path().display()))
        .args([
            "--akeyless-url",
            &fake.url,
            "--akeyless-access-id",
            ACCESS_ID,
            "--akeyless-key-name",
            KEY,
        ])
        .arg("--audit-log")
        .arg(dir.path().join("audit.log"))
        .env("KMS_PLUGIN_AKEYLESS_ACCESS_KEY", "wrong-access-key-0000")
        .env("KMS_PLUGIN_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.to_lowercase().contains("auth"), "{stderr}");
    assert!(
        !stderr.contains("wrong-access-key-0000"),
        "secret echoed: {stderr}"
    );
    assert!(!dir.path().join("kms.sock").exists());
    // The refused login is in the audit log (flushed before exiting), without the key.
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    let line: serde_json::Value = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .find(|l: &serde_json::Value| l["operation"] == "auth")
        .unwrap_or_else(|| panic!("no auth audit line: {audit}"));
    assert_eq!(line["outcome"], "authentication", "{line}");
    assert_eq!(line["backend"], "akeyless", "{line}");
    assert!(
        !audit.contains("wrong-access-key-0000"),
        "secret audited: {audit}"
    );
}

/// The original plugin's socket lives in /tmp: a directory others can write to is warned about
/// loudly; a private one is not.
#[tokio::test]
async fn socket_in_a_shared_directory_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let Some(fake) = Fake::start(&[]) else { return };
    for (mode, warned) in [(0o1777, true), (0o700, false)] {
        let dir = tempfile::tempdir().unwrap();
        let sock_dir = dir.path().join("sock");
        std::fs::create_dir(&sock_dir).unwrap();
        std::fs::set_permissions(&sock_dir, std::fs::Permissions::from_mode(mode)).unwrap();
        let socket = sock_dir.join("akeyless_kms_plugin.sock");
        let env = [
            ("AKEYLESS_URL", fake.url.clone()),
            ("AKEYLESS_UNIX_SOCKET", socket.display().to_string()),
            ("AKEYLESS_KEY_ENCRYPTION_KEY", KEY.to_string()),
            ("AKEYLESS_ACCESS_ID", ACCESS_ID.to_string()),
            ("AKEYLESS_ACCESS_KEY", ACCESS_KEY.to_string()),
            ("KMS_PLUGIN_DATA_DIR", dir.path().display().to_string()),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let addr = ListenAddr::Path(socket.clone());
        let p = Plugin::spawn_with_env(&["serve".to_string()], &env, addr, dir.path());
        p.wait_healthy(Duration::from_secs(20)).await;
        let log = p.log_text();
        assert_eq!(
            log.contains("SOCKET DIRECTORY IS WRITABLE BY GROUP OR OTHERS"),
            warned,
            "mode {mode:o}: {log}"
        );
    }
}

/// aws_iam through the real binary and the real credentials chain: the cloud-id is signed for the
/// regional STS endpoint of AWS_REGION (China's partition included), and the fake verifies it.
#[tokio::test]
async fn aws_iam_signs_for_the_region_of_aws_region() {
    use support::akeyless_fake::{AWS_KEY_ID, AWS_SECRET};
    let Some(fake) = Fake::start(&[]) else { return };
    for (region, url) in [
        (
            Some("cn-north-1"),
            "https://sts.cn-north-1.amazonaws.com.cn/",
        ),
        (
            Some("eu-central-1"),
            "https://sts.eu-central-1.amazonaws.com/",
        ),
        (None, "https://sts.amazonaws.com/"),
    ] {
        fake.control("reset-stats", json!({})).await;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kms.sock");
        let args: Vec<String> = [
            "serve",
            "--backend",
            "akeyless",
            "--listen",
            &format!("unix://{}", socket.display()),
            "--akeyless-url",
            &fake.url,
            "--akeyless-access-id",
            ACCESS_ID,
            "--akeyless-access-type",
            "aws_iam",
            "--akeyless-key-name",
            KEY,
            "--data-dir",
            &dir.path().display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // An empty AWS_REGION counts as unset (and hides one the test runner may have).
        let env = vec![
            ("AWS_ACCESS_KEY_ID", AWS_KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", AWS_SECRET),
            ("AWS_REGION", region.unwrap_or("")),
            ("AWS_CONFIG_FILE", "/nonexistent"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
        ];
        let p = Plugin::spawn_with_env(&args, &env, ListenAddr::Path(socket), dir.path());
        p.wait_healthy(Duration::from_secs(20)).await;
        let stats = fake.control("stats", json!({})).await;
        let rec = &stats["auth_records"][0];
        assert_eq!(rec["access_type"], "aws_iam", "{stats}");
        assert_eq!(rec["sts"]["url"], url, "{region:?}");
        assert!(!p.log_text().contains(AWS_SECRET));
    }
}
