//! The fake Akeyless API server (tests/fakes/akeyless_fake.py) as a child process.
//!
//! Needs a Python with `cryptography` (KMS_TEST_PYTHON, else ./.venv/bin/python). Without one the
//! tests fail, unless KMS_TEST_OPT_OUT names `akeyless-fake`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use kms_plugin::backend::akeyless::{AkeylessArgs, Secret};
use serde_json::{json, Value};

pub const ACCESS_ID: &str = "p-rusttest";
pub const ACCESS_KEY: &str = "AK-very-secret-access-key-4f9a1c";
pub const KEY: &str = "/k8s/kek";
/// The AWS key whose signatures the fake's aws_iam logins accept.
pub const AWS_KEY_ID: &str = "AKIDKMSPLUGINTEST";
pub const AWS_SECRET: &str = "kms-plugin-test-aws-secret-key/0123456789";

pub struct Fake {
    pub child: Child,
    pub url: String,
    pub http: reqwest::Client,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub use super::external::test_python as python;

pub fn opted_out() -> bool {
    std::env::var("KMS_TEST_OPT_OUT")
        .unwrap_or_default()
        .split(',')
        .any(|s| s.trim() == "akeyless-fake")
}

/// A JWT-shaped token with `claims` (the fake checks the shape and the claims, not the issuer).
pub fn jwt(claims: Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as U;
    use base64::Engine as _;
    format!(
        "{}.{}.{}",
        U.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        U.encode(claims.to_string()),
        U.encode(b"test-signature")
    )
}

/// Writes a test CA (ca.pem), a server pair for 127.0.0.1 (server.pem, server-key.pem) and a client
/// pair (client.pem, client-key.pem) into `dir`, with the fake's own generator.
pub fn make_certs(dir: &Path) -> bool {
    let Some(py) = python() else {
        assert!(
            opted_out(),
            "the Akeyless fake needs Python: set KMS_TEST_PYTHON or KMS_TEST_OPT_OUT=akeyless-fake"
        );
        return false;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fakes/akeyless_fake.py");
    let out = Command::new(py)
        .arg(script)
        .arg("--make-certs")
        .arg(dir)
        .output()
        .expect("run the fake's certificate generator");
    assert!(
        out.status.success(),
        "--make-certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

impl Fake {
    /// Starts the fake over HTTPS with the certificates in `tls_dir` (see [`make_certs`]); the
    /// control client trusts its CA.
    pub fn start_tls(tls_dir: &Path, extra: &[&str]) -> Option<Fake> {
        let dir = tls_dir.display().to_string();
        let mut args = vec!["--tls-dir", dir.as_str()];
        args.extend_from_slice(extra);
        let mut fake = Self::start(&args)?;
        fake.url = fake.url.replacen("http://", "https://", 1);
        let ca = std::fs::read(tls_dir.join("ca.pem")).unwrap();
        let mut b = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap());
        if extra.contains(&"--require-client-cert") {
            let mut pem = std::fs::read(tls_dir.join("client.pem")).unwrap();
            pem.extend(std::fs::read(tls_dir.join("client-key.pem")).unwrap());
            b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        fake.http = b.build().unwrap();
        Some(fake)
    }

    /// Starts the fake, or returns None when the test is opted out.
    pub fn start(extra: &[&str]) -> Option<Fake> {
        let Some(py) = python() else {
            if opted_out() {
                eprintln!("skipped: akeyless-fake opted out and no Python found");
                return None;
            }
            panic!("the Akeyless fake needs Python with `cryptography`: set KMS_TEST_PYTHON (make deps) or KMS_TEST_OPT_OUT=akeyless-fake");
        };
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fakes/akeyless_fake.py");
        let mut cmd = Command::new(&py);
        cmd.arg(script)
            .args([
                "--port",
                "0",
                "--access-id",
                ACCESS_ID,
                "--key",
                KEY,
                "--exit-on-stdin-eof",
                "--aws-access-key-id",
                AWS_KEY_ID,
            ])
            .args(extra)
            .env("FAKE_AKEYLESS_ACCESS_KEY", ACCESS_KEY)
            .env("FAKE_AKEYLESS_AWS_SECRET", AWS_SECRET)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if opted_out() => {
                eprintln!("skipped: akeyless-fake opted out ({e})");
                return None;
            }
            Err(e) => panic!("cannot start {}: {e}", py.display()),
        };
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = match line
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse().ok())
        {
            Some(p) => p,
            None if opted_out() => {
                eprintln!("skipped: akeyless-fake did not start and is opted out");
                return None;
            }
            None => panic!(
                "the Akeyless fake did not start (is `cryptography` installed in {}?)",
                py.display()
            ),
        };
        Some(Fake {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        })
    }

    pub async fn control(&self, action: &str, body: Value) -> Value {
        super::external::fake_control(&self.http, &self.url, action, body).await
    }

    pub async fn calls(&self, command: &str) -> u64 {
        self.control("stats", json!({})).await["calls"][command]
            .as_u64()
            .unwrap_or(0)
    }

    pub fn args(&self) -> AkeylessArgs {
        AkeylessArgs {
            url: self.url.clone(),
            access_id: Some(ACCESS_ID.into()),
            key_name: Some(KEY.into()),
            access_key: Some(Secret::new(ACCESS_KEY)),
            ..Default::default()
        }
    }
}
