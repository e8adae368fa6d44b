//! Child processes: the real `kms-plugin serve` and the floor server.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kms_plugin::cli::client;
use kms_plugin::proto::v2;
use kms_plugin::protocol::socket::ListenAddr;

pub struct Server {
    pub name: &'static str,
    pub child: Child,
    pub addr: ListenAddr,
    pub log: PathBuf,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(
        name: &'static str,
        mut cmd: Command,
        addr: ListenAddr,
        log: PathBuf,
    ) -> anyhow::Result<Server> {
        let file = std::fs::File::create(&log)?;
        let child = cmd
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Server {
            name,
            child,
            addr,
            log,
        })
    }

    /// Polls Status until it says ok, with a deadline.
    pub async fn wait_healthy(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(2), status(&self.addr)).await
            {
                if s.healthz == "ok" {
                    return Ok(());
                }
            }
            if let Some(exit) = self.child.try_wait()? {
                bail!(
                    "{} exited ({exit}) before it was healthy; log:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("{} not healthy within {limit:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then a bounded wait; SIGKILL if it does not exit.
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub async fn status(addr: &ListenAddr) -> anyhow::Result<v2::StatusResponse> {
    let ch = client::connect(addr).await?;
    let mut c = v2::key_management_service_client::KeyManagementServiceClient::new(ch);
    Ok(c.status(v2::StatusRequest {}).await?.into_inner())
}

/// Creates a key file with the plugin's own `keygen`.
pub fn keygen(plugin_bin: &Path, key_file: &Path) -> anyhow::Result<()> {
    let out = Command::new(plugin_bin)
        .arg("keygen")
        .arg(key_file)
        .output()
        .with_context(|| format!("run {} keygen", plugin_bin.display()))?;
    if !out.status.success() {
        bail!("keygen failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Starts `kms-plugin serve` with the local backend and the default settings (log level info).
pub fn start_plugin(
    plugin_bin: &Path,
    dir: &Path,
    name: &str,
    key_file: &Path,
    extra: &[String],
) -> anyhow::Result<Server> {
    let socket = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(plugin_bin);
    cmd.arg("serve")
        .arg("--listen")
        .arg(format!("unix://{}", socket.display()))
        .arg("--backend")
        .arg("local")
        .arg("--local-key-file")
        .arg(key_file)
        .arg("--data-dir")
        .arg(dir)
        .args(extra)
        .env_remove("KMS_PLUGIN_LOG_LEVEL")
        .env_remove("RUST_LOG");
    Server::spawn(
        "kms-plugin",
        cmd,
        ListenAddr::Path(socket),
        dir.join(format!("{name}.log")),
    )
}

/// Starts this binary's `floor` subcommand.
pub fn start_floor(dir: &Path) -> anyhow::Result<Server> {
    let socket = dir.join("floor.sock");
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("floor")
        .arg("--listen")
        .arg(format!("unix://{}", socket.display()));
    Server::spawn(
        "floor",
        cmd,
        ListenAddr::Path(socket),
        dir.join("floor.log"),
    )
}
