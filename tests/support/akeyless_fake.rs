//! The fake Akeyless API server (tests/fakes/akeyless_fake.py) as a child process.
//!
//! Needs a Python with `cryptography` (KMS_TEST_PYTHON, else ./.venv/bin/python). Without one the
//! tests fail, unless KMS_TEST_OPT_OUT names `akeyless-fake`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use kms_plugin::backend::akeyless::{AkeylessArgs, Secret};
use serde_json::{json, Value};

pub const ACCESS_ID: &str = "p-rusttest";
pub const ACCESS_KEY: &str = "AK-very-secret-access-key-4f9a1c";
pub const KEY: &str = "/k8s/kek";

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

pub fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KMS_TEST_PYTHON").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    venv.exists().then_some(venv)
}

pub fn opted_out() -> bool {
    std::env::var("KMS_TEST_OPT_OUT")
        .unwrap_or_default()
        .split(',')
        .any(|s| s.trim() == "akeyless-fake")
}

impl Fake {
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
            ])
            .args(extra)
            .env("FAKE_AKEYLESS_ACCESS_KEY", ACCESS_KEY)
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
        let r = self
            .http
            .post(format!("{}/__control/{action}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "control {action}: {}", r.status());
        r.json().await.unwrap()
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
