//! Finding and starting external programs that tests depend on, honouring KMS_TEST_OPT_OUT.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// True when KMS_TEST_OPT_OUT (comma-separated) names `name`: the caller then skips its test.
pub fn opted_out(name: &str) -> bool {
    let opted = std::env::var("KMS_TEST_OPT_OUT")
        .unwrap_or_default()
        .split(',')
        .any(|n| n.trim() == name);
    if opted {
        eprintln!("SKIPPED: KMS_TEST_OPT_OUT names {name:?}");
    }
    opted
}

/// A program from the test venv (next to $KMS_TEST_PYTHON) or, failing that, from PATH.
pub fn venv_program(name: &str) -> Option<PathBuf> {
    if let Ok(py) = std::env::var("KMS_TEST_PYTHON") {
        if let Some(dir) = PathBuf::from(py).parent() {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    which(name)
}

/// A program on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// A child process killed when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running moto server (AWS API mock) on loopback.
pub struct Moto {
    pub url: String,
    _child: ChildGuard,
}

/// Starts `moto_server` on a free loopback port, or returns None when opted out (KMS_TEST_OPT_OUT
/// contains `moto`). Panics (fails the test) when moto is missing otherwise.
pub fn start_moto() -> Option<Moto> {
    if opted_out("moto") {
        return None;
    }
    let bin = venv_program("moto_server").unwrap_or_else(|| {
        panic!("moto_server not found (install tests/python/requirements.txt with `make deps`, or set KMS_TEST_OPT_OUT=moto)")
    });
    for _ in 0..3 {
        let port = free_port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut guard = ChildGuard(child);
        let up = wait_until(Duration::from_secs(60), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                || guard.0.try_wait().ok().flatten().is_some()
        });
        if up && guard.0.try_wait().ok().flatten().is_none() {
            return Some(Moto {
                url: format!("http://127.0.0.1:{port}"),
                _child: guard,
            });
        }
        // Lost the port race or moto died: try another port.
    }
    panic!("moto_server did not start");
}
