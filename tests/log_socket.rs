//! What an operator sees of a real `kms-plugin serve`: a log written to a file carries no ANSI colour
//! codes, and the listening socket is bound under the configured path (the name a peer, such as
//! kube-apiserver, sees and logs), with no temporary name left next to it.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kms-plugin");

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls until something accepts on `sock` (bounded), and returns that connection.
fn connect(sock: &Path, child: &mut Child, log: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) = UnixStream::connect(sock) {
            return c;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "plugin exited ({st}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no listener on {sock:?} after 30s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn serve(dir: &Path, extra_env: &[(&str, &str)]) -> (Killed, UnixStream) {
    let key = dir.join("kek.json");
    let st = Command::new(BIN).arg("keygen").arg(&key).output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let sock = dir.join("kms.sock");
    let log = dir.join("plugin.log");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--backend", "local", "--local-key-file"])
        .arg(&key)
        .arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .args(["--log-level", "debug", "--log-format", "text"])
        .env_remove("NO_COLOR")
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let conn = connect(&sock, &mut child, &log);
    (Killed(child), conn)
}

#[test]
fn log_file_has_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (plugin, _conn) = serve(dir.path(), &[]);
    drop(plugin);
    let log = std::fs::read(dir.path().join("plugin.log")).unwrap();
    let text = String::from_utf8_lossy(&log);
    assert!(
        text.lines().count() >= 1,
        "expected start-up log lines: {text}"
    );
    assert!(
        !log.contains(&0x1b),
        "ESC byte (ANSI colour) in a log written to a file:\n{text}"
    );
}

#[test]
fn socket_peer_name_is_the_configured_path() {
    let dir = tempfile::tempdir().unwrap();
    let (_plugin, conn) = serve(dir.path(), &[]);
    let peer = conn.peer_addr().unwrap();
    assert_eq!(
        peer.as_pathname(),
        Some(dir.path().join("kms.sock").as_path()),
        "a client sees the socket under {peer:?}"
    );
    let strays: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".kms-plugin-"))
        .collect();
    assert!(strays.is_empty(), "temporary socket names left: {strays:?}");
}
