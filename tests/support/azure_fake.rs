//! The Key Vault stand-in (tests/fakes/azure_keyvault_fake.py) as a child process.
//!
//! Needs a Python with `cryptography` (KMS_TEST_PYTHON, else ./.venv/bin/python). Without one the
//! tests fail, unless KMS_TEST_OPT_OUT names `azure-fake`.

use std::ffi::OsStr;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::Child;

use kms_plugin::backend::azure_keyvault::{
    AzureCredential, AzureKeyVaultArgs, AzureKeyVaultBackend,
};
use serde_json::{json, Value};

pub const KEY: &str = "kek";

pub struct Fake {
    pub child: Child,
    /// https://127.0.0.1:PORT: the vault and the Entra ID authority host.
    pub url: String,
    /// http://127.0.0.1:PORT of the IMDS stand-in.
    pub imds_url: String,
    /// Holds ca.pem, client-secret, federated-token, ids.json.
    pub dir: tempfile::TempDir,
    pub ids: Value,
    pub http: reqwest::Client,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn port_of(line: &str, prefix: &str) -> u16 {
    line.strip_prefix(prefix)
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("the Key Vault stand-in did not start: {line:?}"))
}

impl Fake {
    /// Starts the stand-in with an RSA key [`KEY`], or returns None when opted out.
    pub fn start() -> Option<Fake> {
        Self::start_with(&[])
    }

    /// A Managed HSM stand-in with an oct-HSM key [`KEY`].
    pub fn start_hsm() -> Option<Fake> {
        Self::start_with(&["--hsm"])
    }

    fn start_with(extra: &[&str]) -> Option<Fake> {
        if super::external::opted_out("azure-fake") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<&OsStr> = ["--key", KEY, "--exit-on-stdin-eof", "--dir"]
            .iter()
            .map(OsStr::new)
            .collect();
        args.push(dir.path().as_os_str());
        args.extend(extra.iter().map(OsStr::new));
        let (child, mut out) = super::external::spawn_fake(
            "azure_keyvault_fake.py",
            &args,
            "the Key Vault stand-in needs Python with `cryptography`: set KMS_TEST_PYTHON \
             (make deps) or KMS_TEST_OPT_OUT=azure-fake",
        );
        let (mut l1, mut l2) = (String::new(), String::new());
        out.read_line(&mut l1).unwrap();
        out.read_line(&mut l2).unwrap();
        let (port, iport) = (port_of(&l1, "PORT "), port_of(&l2, "IMDS_PORT "));
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let ids =
            serde_json::from_slice(&std::fs::read(dir.path().join("ids.json")).unwrap()).unwrap();
        Some(Fake {
            child,
            url: format!("https://127.0.0.1:{port}"),
            imds_url: format!("http://127.0.0.1:{iport}"),
            dir,
            ids,
            http: reqwest::Client::builder()
                .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
                .build()
                .unwrap(),
        })
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn id(&self, name: &str) -> String {
        self.ids[name].as_str().unwrap().to_string()
    }

    pub async fn control(&self, action: &str, body: Value) -> Value {
        super::external::fake_control(&self.http, &self.url, action, body).await
    }

    /// A key action on [`KEY`] (on `version`, else the latest); returns the version's kid.
    pub async fn key(&self, action: &str, version: Option<&str>) -> String {
        let mut b = json!({"name": KEY, "action": action});
        if let Some(v) = version {
            b["version"] = json!(v);
        }
        self.control("key", b).await["kid"]
            .as_str()
            .unwrap()
            .to_string()
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

    /// Options for the service principal (client secret file), trusting the stand-in's CA.
    pub fn args(&self) -> AzureKeyVaultArgs {
        AzureKeyVaultArgs {
            azure_keyvault_url: Some(self.url.clone()),
            azure_keyvault_key: Some(KEY.into()),
            azure_credential: AzureCredential::ClientSecret,
            azure_tenant_id: Some(self.id("tenant")),
            azure_client_id: Some(self.id("sp_client")),
            azure_client_secret_file: Some(self.dir.path().join("client-secret")),
            azure_authority_host: Some(self.url.clone()),
            azure_keyvault_ca_file: Some(self.ca_file()),
            // Reached by IP address: the challenge resource cannot be the host's parent domain.
            azure_keyvault_skip_challenge_resource_check: true,
            ..Default::default()
        }
    }

    pub fn backend(&self) -> AzureKeyVaultBackend {
        AzureKeyVaultBackend::new(&self.args()).unwrap()
    }
}

/// The version segment of a kid.
pub fn version_of(kid: &str) -> &str {
    kid.rsplit('/').next().unwrap()
}
