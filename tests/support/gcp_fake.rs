//! The Cloud KMS stand-in (tests/fakes/gcp_kms_fake.py) as a child process.
//!
//! Needs a Python with `cryptography` (KMS_TEST_PYTHON, else ./.venv/bin/python). Without one the
//! tests fail, unless KMS_TEST_OPT_OUT names `gcp-fake`.

use std::ffi::OsStr;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use kms_plugin::backend::gcp_kms::{GcpKmsArgs, GcpKmsBackend};
use serde_json::{json, Value};

pub const KEY: &str = "projects/kms-plugin-test/locations/global/keyRings/k8s/cryptoKeys/kek";

pub struct Fake {
    pub child: Child,
    pub url: String,
    /// Holds sa.json, external.json, subject-token.
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Fake {
    /// Starts the stand-in with [`KEY`] created, or returns None when opted out.
    pub fn start() -> Option<Fake> {
        Self::start_with(&[])
    }

    /// [`Fake::start`] over HTTPS (`--tls`); its CA is `dir/ca.pem`.
    pub fn start_tls() -> Option<Fake> {
        let mut f = Self::start_with(&["--tls"])?;
        f.url = f.url.replacen("http://", "https://", 1);
        let ca = std::fs::read(f.dir.path().join("ca.pem")).unwrap();
        f.http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .build()
            .unwrap();
        Some(f)
    }

    fn start_with(extra: &[&str]) -> Option<Fake> {
        if super::external::opted_out("gcp-fake") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<&OsStr> = ["--port", "0", "--key", KEY, "--exit-on-stdin-eof"]
            .iter()
            .map(OsStr::new)
            .collect();
        args.extend([OsStr::new("--dir"), dir.path().as_os_str()]);
        args.extend(extra.iter().map(OsStr::new));
        let (child, mut out) = super::external::spawn_fake(
            "gcp_kms_fake.py",
            &args,
            "the Cloud KMS stand-in needs Python with `cryptography`: set KMS_TEST_PYTHON \
             (make deps) or KMS_TEST_OPT_OUT=gcp-fake",
        );
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let port: u16 = line
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("the Cloud KMS stand-in did not start: {line:?}"));
        Some(Fake {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
            http: reqwest::Client::new(),
        })
    }

    pub fn sa_file(&self) -> PathBuf {
        self.dir.path().join("sa.json")
    }

    pub fn external_file(&self) -> PathBuf {
        self.dir.path().join("external.json")
    }

    pub async fn control(&self, action: &str, body: Value) -> Value {
        super::external::fake_control(&self.http, &self.url, action, body).await
    }

    pub async fn key(&self, action: &str, version: Option<u32>) -> Value {
        let mut b = json!({"name": KEY, "action": action});
        if let Some(v) = version {
            b["version"] = json!(v);
        }
        self.control("key", b).await
    }

    pub async fn stats(&self) -> Value {
        self.http
            .get(format!("{}/__control/stats", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub fn args(&self, creds: &Path, aad: Option<&str>) -> GcpKmsArgs {
        GcpKmsArgs {
            gcp_kms_key: Some(KEY.into()),
            gcp_kms_endpoint: Some(self.url.clone()),
            gcp_kms_aad: aad.map(str::to_string),
            gcp_credentials_file: Some(creds.to_path_buf()),
        }
    }

    /// The backend with the service-account key (self-signed JWTs).
    pub async fn backend(&self, aad: Option<&str>) -> GcpKmsBackend {
        GcpKmsBackend::new(&self.args(&self.sa_file(), aad))
            .await
            .unwrap()
    }
}

pub fn version(n: u32) -> String {
    format!("{KEY}/cryptoKeyVersions/{n}")
}

/// Spawns the plugin without any `GOOGLE_*` / `GCE_*` variable of the test process, so that ADC
/// sees only what `env` gives it.
pub fn spawn_plugin_adc(
    args: &[String],
    env: &[(&str, &str)],
    addr: kms_plugin::protocol::socket::ListenAddr,
    log_dir: &Path,
) -> super::plugin::Plugin {
    let log = log_dir.join(format!("plugin-{}.log", rand::random::<u32>()));
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(super::plugin::BIN);
    for (k, _) in std::env::vars_os() {
        let k2 = k.to_string_lossy();
        if k2.starts_with("GOOGLE_") || k2.starts_with("GCE_") || k2 == "CLOUDSDK_CONFIG" {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .args(args)
        .envs(env.iter().copied())
        .env("KMS_PLUGIN_LOG_LEVEL", "debug")
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .expect("spawn kms-plugin");
    super::plugin::Plugin { child, addr, log }
}
