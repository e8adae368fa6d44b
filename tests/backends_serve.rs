//! The real binary served on each real backend server (a fresh SoftHSM2 token key, a fresh moto KMS
//! key) passes the socket-level conformance run for v2 and v1beta1.
mod support;

#[cfg(feature = "pkcs11")]
use std::process::Command;

#[cfg(feature = "pkcs11")]
use support::external::{opted_out, which};
#[allow(unused_imports)]
use support::plugin::{socket_conformance, Plugin};

#[cfg(feature = "pkcs11")]
#[tokio::test]
async fn serves_on_a_fresh_softhsm_token() {
    if opted_out("softhsm") {
        return;
    }
    let module = [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).is_file())
    .expect("libsofthsm2.so not found: run `make deps` or set KMS_TEST_OPT_OUT=softhsm");
    let util = which("softhsm2-util")
        .expect("softhsm2-util not found: run `make deps` or set KMS_TEST_OPT_OUT=softhsm");
    let tool = which("pkcs11-tool")
        .expect("pkcs11-tool (opensc) not found: run `make deps` or set KMS_TEST_OPT_OUT=softhsm");
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\n",
            tokens.display()
        ),
    )
    .unwrap();
    let run = |cmd: &mut Command| {
        let out = cmd.env("SOFTHSM2_CONF", &conf).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new(&util).args([
        "--init-token",
        "--free",
        "--label",
        "kms",
        "--so-pin",
        "87654321",
        "--pin",
        "11223344",
    ]));
    run(Command::new(&tool)
        .args([
            "--module",
            module,
            "--token-label",
            "kms",
            "--login",
            "--pin",
            "11223344",
        ])
        .args([
            "--keygen",
            "--key-type",
            "AES:32",
            "--label",
            "kek-1",
            "--id",
            "01",
            "--sensitive",
        ]));
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, "11223344\n").unwrap();
    let socket = dir.path().join("kms.sock");
    let args: Vec<String> = [
        "serve",
        "--listen",
        &format!("unix://{}", socket.display()),
        "--backend",
        "pkcs11",
        "--pkcs11-module",
        module,
        "--pkcs11-token-label",
        "kms",
        "--pkcs11-key-label",
        "kek-1",
        "--pkcs11-pin-file",
        &pin_file.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let addr = kms_plugin::protocol::socket::ListenAddr::Path(socket.clone());
    let p = Plugin::start(&args, addr.clone(), dir.path()).await;
    socket_conformance(&addr, &socket).await;
    assert!(!p.log_text().contains("11223344"), "PIN in the log");
}

#[cfg(feature = "aws-kms")]
#[tokio::test]
async fn serves_on_a_fresh_moto_kms_key() {
    let Some(moto) = support::external::start_moto() else {
        return;
    };
    let admin = support::aws::backend(&moto.url, "unused", &[]).await;
    let (_, arn) = support::aws::create_key(&admin).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kms.sock");
    let args: Vec<String> = [
        "serve",
        "--listen",
        &format!("unix://{}", socket.display()),
        "--backend",
        "aws-kms",
        "--aws-kms-key-id",
        &arn,
        "--aws-region",
        "us-east-1",
        "--aws-endpoint-url",
        &moto.url,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let env = support::aws::child_env(dir.path());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let addr = kms_plugin::protocol::socket::ListenAddr::Path(socket.clone());
    let p = Plugin::spawn_aws_isolated(&args, &env, addr.clone(), dir.path());
    p.wait_healthy(std::time::Duration::from_secs(20)).await;
    socket_conformance(&addr, &socket).await;
    assert!(
        !p.log_text().contains("testing-secret"),
        "secret key in the log"
    );
}
