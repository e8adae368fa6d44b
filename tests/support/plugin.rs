//! Runs the real `kms-plugin` binary for integration tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use kms_plugin::cli::client;
use kms_plugin::proto::{v1beta1, v2};
use kms_plugin::protocol::socket::ListenAddr;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_kms-plugin");

pub struct Plugin {
    pub child: Child,
    pub addr: ListenAddr,
    pub log: PathBuf,
}

/// A temporary directory holding a key file, ready for `serve`.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub key_file: PathBuf,
    pub socket: PathBuf,
}

impl Setup {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("kek.json");
        let out = Command::new(BIN)
            .arg("keygen")
            .arg(&key_file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let socket = dir.path().join("kms.sock");
        Setup {
            dir,
            key_file,
            socket,
        }
    }

    pub fn args(&self) -> Vec<String> {
        vec![
            "serve".into(),
            "--listen".into(),
            format!("unix://{}", self.socket.display()),
            "--backend".into(),
            "local".into(),
            "--local-key-file".into(),
            self.key_file.display().to_string(),
            "--probe-interval".into(),
            "200ms".into(),
        ]
    }

    pub fn addr(&self) -> ListenAddr {
        ListenAddr::Path(self.socket.clone())
    }
}

impl Plugin {
    /// Starts the binary and waits until Status says ok.
    pub async fn start(args: &[String], addr: ListenAddr, log_dir: &Path) -> Plugin {
        let p = Self::spawn(args, addr, log_dir);
        p.wait_healthy(Duration::from_secs(20)).await;
        p
    }

    pub fn spawn(args: &[String], addr: ListenAddr, log_dir: &Path) -> Plugin {
        Self::spawn_with_env(args, &[], addr, log_dir)
    }

    /// [`Plugin::spawn`] with extra environment variables for the child only.
    pub fn spawn_with_env(
        args: &[String],
        env: &[(&str, &str)],
        addr: ListenAddr,
        log_dir: &Path,
    ) -> Plugin {
        let log = log_dir.join(format!("plugin-{}.log", rand::random::<u32>()));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .env("KMS_PLUGIN_LOG_LEVEL", "debug")
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn kms-plugin");
        Plugin { child, addr, log }
    }

    /// [`Plugin::spawn_with_env`] without any `AWS_*` variable of the test process: the child sees
    /// only the AWS set-up the test gives it.
    pub fn spawn_aws_isolated(
        args: &[String],
        env: &[(&str, &str)],
        addr: ListenAddr,
        log_dir: &Path,
    ) -> Plugin {
        let log = log_dir.join(format!("plugin-{}.log", rand::random::<u32>()));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(BIN);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AWS_") {
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
        Plugin { child, addr, log }
    }

    pub async fn wait_healthy(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(s) = try_status(&self.addr).await {
                if s.healthz == "ok" {
                    return;
                }
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "plugin not healthy within {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.wait_exit(Duration::from_secs(15))
    }

    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "plugin did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn channel(addr: &ListenAddr) -> Channel {
    client::connect(addr).await.expect("connect to plugin")
}

pub async fn try_status(addr: &ListenAddr) -> anyhow::Result<v2::StatusResponse> {
    let ch = client::connect(addr).await?;
    let mut c = v2::key_management_service_client::KeyManagementServiceClient::new(ch);
    Ok(c.status(v2::StatusRequest {}).await?.into_inner())
}

pub fn v2_client(
    ch: Channel,
) -> v2::key_management_service_client::KeyManagementServiceClient<Channel> {
    v2::key_management_service_client::KeyManagementServiceClient::new(ch)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20)
}

pub fn v1_client(
    ch: Channel,
) -> v1beta1::key_management_service_client::KeyManagementServiceClient<Channel> {
    v1beta1::key_management_service_client::KeyManagementServiceClient::new(ch)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20)
}

/// The socket-level conformance run every backend's served plugin must pass: v2 Status, Encrypt and
/// Decrypt with the apiserver's limits, v1 round trips including the health check's "ping",
/// tampering refused, and the same calls with a path-valued `:authority`.
pub async fn socket_conformance(addr: &ListenAddr, socket: &Path) {
    use prost::Message;
    let mut c = v2_client(channel(addr).await);
    let st = c.status(v2::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((st.version.as_str(), st.healthz.as_str()), ("v2", "ok"));
    assert!(!st.key_id.is_empty() && st.key_id.len() <= 1024);
    let mut seen = std::collections::HashSet::new();
    for i in 0..8u8 {
        let plaintext = vec![i; 32];
        let e = c
            .encrypt(v2::EncryptRequest {
                plaintext: plaintext.clone(),
                uid: format!("uid-{i}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(e.key_id, st.key_id);
        assert!(
            !e.ciphertext.is_empty() && e.ciphertext.len() <= 1024,
            "{} bytes",
            e.ciphertext.len()
        );
        assert!(
            seen.insert(e.ciphertext.clone()),
            "ciphertexts must be distinct"
        );
        let d = c
            .decrypt(v2::DecryptRequest {
                ciphertext: e.ciphertext.clone(),
                uid: "d".into(),
                key_id: e.key_id.clone(),
                annotations: e.annotations.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(d.plaintext, plaintext);
        let mut bad = e.ciphertext;
        let n = bad.len() - 1;
        bad[n] ^= 1;
        let err = c
            .decrypt(v2::DecryptRequest {
                ciphertext: bad,
                uid: "t".into(),
                key_id: e.key_id,
                annotations: e.annotations,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
    let mut c1 = v1_client(channel(addr).await);
    for plain in [b"ping".to_vec(), vec![9u8; 32]] {
        let cipher = c1
            .encrypt(v1beta1::EncryptRequest {
                version: "v1beta1".into(),
                plain: plain.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .cipher;
        let back = c1
            .decrypt(v1beta1::DecryptRequest {
                version: "v1beta1".into(),
                cipher,
            })
            .await
            .unwrap()
            .into_inner()
            .plain;
        assert_eq!(back, plain);
    }
    // What pre-1.32 apiservers send.
    let mut raw = super::raw_h2::RawH2::connect(socket).await.unwrap();
    let authority = socket.display().to_string();
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        raw.unary(
            1,
            &super::raw_h2::grpc_request("/v2.KeyManagementService/Status", &authority),
            Default::default(),
            &[],
        ),
    )
    .await
    .unwrap()
    .unwrap();
    match out {
        super::raw_h2::Outcome::Response(r) => {
            assert_eq!(r.grpc_status(), Some("0"));
            assert_eq!(
                v2::StatusResponse::decode(r.message().unwrap())
                    .unwrap()
                    .healthz,
                "ok"
            );
        }
        other => panic!("path authority refused: {other:?}"),
    }
}

/// Polls Status until its key_id differs from `before` (a rotation reached the plugin) and returns
/// the new key_id; fails the test after `limit`.
pub async fn wait_for_key_id_change(addr: &ListenAddr, before: &str, limit: Duration) -> String {
    let mut c = v2_client(channel(addr).await);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let now = c
            .status(v2::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .key_id;
        if now != before {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "key_id still {before} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
