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

/// The test Python: $KMS_TEST_PYTHON, else the repository's `.venv` if it exists.
pub fn test_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KMS_TEST_PYTHON").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    venv.exists().then_some(venv)
}

/// Starts the stand-in `script` (under tests/fakes) with the test Python, `args` and a piped stdin
/// (the stand-ins exit when it closes); returns the child and its stdout, where it prints its
/// ports. `missing` is the panic message when there is no test Python.
pub fn spawn_fake(
    script: &str,
    args: &[&std::ffi::OsStr],
    missing: &str,
) -> (Child, std::io::BufReader<std::process::ChildStdout>) {
    let py = test_python().expect(missing);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fakes")
        .join(script);
    let mut child = Command::new(&py)
        .arg(path)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", py.display()));
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

/// POSTs `body` to a stand-in's `/__control/ACTION` and returns its JSON answer.
pub async fn fake_control(
    http: &reqwest::Client,
    url: &str,
    action: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let r = http
        .post(format!("{url}/__control/{action}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "control {action}: {}", r.status());
    r.json().await.unwrap()
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

/// A loopback port that was free a moment ago, picked below the kernel's ephemeral range: a port from
/// bind(0) lies in that range, where any outgoing connection may take it before the server it is
/// handed to binds.
pub fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&low| low > 10_001)
        .unwrap_or(32_768);
    for _ in 0..500 {
        let port = rand::Rng::gen_range(&mut rand::thread_rng(), 10_000..low);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below the ephemeral range");
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

/// Spawns `cmd` (named `bin` in errors) and waits up to `limit` until `ready` holds; returns the
/// child if it is ready and still running, `None` if it exited or never got ready (the caller
/// retries on another port or fails).
pub fn spawn_until_ready(
    cmd: &mut Command,
    bin: &std::path::Path,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
) -> Option<ChildGuard> {
    let child = cmd
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let mut guard = ChildGuard(child);
    let up = wait_until(limit, || {
        ready() || guard.0.try_wait().ok().flatten().is_some()
    });
    (up && guard.0.try_wait().ok().flatten().is_none()).then_some(guard)
}

/// Whether something accepts TCP connections on the loopback `port`.
pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
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
        let mut cmd = Command::new(&bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(guard) =
            spawn_until_ready(&mut cmd, &bin, Duration::from_secs(60), || port_open(port))
        {
            return Some(Moto {
                url: format!("http://127.0.0.1:{port}"),
                _child: guard,
            });
        }
        // Lost the port race or moto died: try another port.
    }
    panic!("moto_server did not start");
}

/// A real Vault dev server (in-memory storage, unsealed, root token `root`) on loopback.
pub struct Vault {
    pub url: String,
    pub root_token: String,
    /// The dev server's unseal key, for tests that seal and unseal it.
    pub unseal_key: String,
    /// With [`start_vault_tls`]: the CA of the dev server's certificate (PEM).
    pub ca_file: Option<PathBuf>,
    _child: ChildGuard,
    _log: tempfile::TempDir,
}

/// The Vault binary: $KMS_TEST_VAULT_BIN, the one `make deps-vault` caches, or `vault` on PATH.
pub fn vault_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KMS_TEST_VAULT_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(dir) = std::env::var_os("KMS_TEST_CACHE_DIR") {
        let p = PathBuf::from(dir).join("vault/v1.21.0/vault");
        if p.is_file() {
            return Some(p);
        }
    }
    which("vault")
}

/// Starts `vault server -dev` on a free loopback port, or returns None when opted out
/// (KMS_TEST_OPT_OUT contains `vault`). Panics (fails the test) when Vault is missing otherwise.
pub fn start_vault() -> Option<Vault> {
    start_vault_with(false)
}

/// As [`start_vault`], with an HTTPS listener (`-dev-tls`: Vault makes its own CA, in
/// [`Vault::ca_file`]) that asks clients for a certificate, as TLS certificate auth needs.
pub fn start_vault_tls() -> Option<Vault> {
    start_vault_with(true)
}

fn start_vault_with(tls: bool) -> Option<Vault> {
    if opted_out("vault") {
        return None;
    }
    let bin = vault_binary().unwrap_or_else(|| {
        panic!("the Vault server binary was not found: run `make deps-vault` (builds it with ../shared/servers/build-vault.sh), set KMS_TEST_VAULT_BIN, or set KMS_TEST_OPT_OUT=vault")
    });
    for _ in 0..3 {
        let port = free_port();
        let log = tempfile::tempdir().unwrap();
        let out = std::fs::File::create(log.path().join("vault.log")).unwrap();
        let tls_args = if tls {
            vec![
                "-dev-tls".to_string(),
                format!("-dev-tls-cert-dir={}", log.path().display()),
            ]
        } else {
            vec![]
        };
        let mut cmd = Command::new(&bin);
        cmd.args([
            "server",
            "-dev",
            "-dev-root-token-id=root",
            "-dev-no-store-token",
            &format!("-dev-listen-address=127.0.0.1:{port}"),
        ])
        .args(&tls_args)
        .env("VAULT_DISABLE_MLOCK", "true")
        .env_remove("VAULT_ADDR")
        .env_remove("VAULT_TOKEN")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out));
        let text = || std::fs::read_to_string(log.path().join("vault.log")).unwrap_or_default();
        if let Some(guard) = spawn_until_ready(&mut cmd, &bin, Duration::from_secs(60), || {
            text().contains("Unseal Key:") && port_open(port)
        }) {
            let unseal_key = text()
                .lines()
                .find_map(|l| l.trim().strip_prefix("Unseal Key:"))
                .map(|k| k.trim().to_string())
                .unwrap_or_default();
            let scheme = if tls { "https" } else { "http" };
            return Some(Vault {
                url: format!("{scheme}://127.0.0.1:{port}"),
                root_token: "root".into(),
                unseal_key,
                ca_file: tls.then(|| log.path().join("vault-ca.pem")),
                _child: guard,
                _log: log,
            });
        }
    }
    panic!("vault server -dev did not start");
}

/// A real etcd (the e2e harness's `e2ehelper serve`, which embeds etcd's server) on loopback.
pub struct Etcd {
    pub url: String,
    _child: ChildGuard,
    _dir: tempfile::TempDir,
}

/// The e2ehelper binary that `make deps-k8s` builds into the cache (any release's will do).
fn e2ehelper_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KMS_TEST_E2EHELPER").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let dir = PathBuf::from(std::env::var_os("KMS_TEST_CACHE_DIR")?).join("k8s");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("e2ehelper")))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

/// Starts etcd on free loopback ports, or returns None when opted out (KMS_TEST_OPT_OUT contains
/// `etcd`). Panics (fails the test) when the binary is missing otherwise.
pub fn start_etcd() -> Option<Etcd> {
    if opted_out("etcd") {
        return None;
    }
    let bin = e2ehelper_binary().unwrap_or_else(|| {
        panic!("etcd (tests/k8s e2ehelper) was not found: run `make deps-k8s`, set KMS_TEST_E2EHELPER, or set KMS_TEST_OPT_OUT=etcd")
    });
    for _ in 0..3 {
        let (port, peer) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap();
        let out = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--client-url", &url])
            .args(["--peer-url", &format!("http://127.0.0.1:{peer}")])
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out));
        if let Some(guard) =
            spawn_until_ready(&mut cmd, &bin, Duration::from_secs(30), || port_open(port))
        {
            return Some(Etcd {
                url,
                _child: guard,
                _dir: dir,
            });
        }
    }
    panic!("etcd (e2ehelper serve) did not start");
}

/// A real PyKMIP server (`pykmip-server` from the test venv) on loopback, over mutual TLS with a
/// test CA: server and client certificates from `tests/fakes/akeyless_fake.py --make-certs`
/// (`ca.pem`, `server.pem`, `client.pem` and their keys in [`PyKmip::certs`]), its SQLite
/// database in a temporary directory. [`PyKmip::stop`] and [`PyKmip::start_again`] take it down
/// and bring it back on the same port with the same keys.
pub struct PyKmip {
    pub endpoint: String,
    pub port: u16,
    pub certs: PathBuf,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<ChildGuard>,
}

/// Starts a PyKMIP server, or returns None when opted out (KMS_TEST_OPT_OUT contains `pykmip`).
/// Panics (fails the test) when PyKMIP is missing otherwise.
pub fn start_pykmip() -> Option<PyKmip> {
    if opted_out("pykmip") {
        return None;
    }
    let bin = venv_program("pykmip-server").unwrap_or_else(|| {
        panic!("pykmip-server not found (install tests/python/requirements.txt with `make deps`, or set KMS_TEST_OPT_OUT=pykmip)")
    });
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    run_python(
        "tests/fakes/akeyless_fake.py",
        &["--make-certs", certs.to_str().unwrap()],
    );
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    let port = free_port();
    let mut k = PyKmip {
        endpoint: format!("127.0.0.1:{port}"),
        port,
        certs,
        bin,
        dir,
        child: None,
    };
    for _ in 0..3 {
        if k.start_again() {
            return Some(k);
        }
        // Lost the port race or the server died: try another port.
        k.port = free_port();
        k.endpoint = format!("127.0.0.1:{}", k.port);
    }
    panic!(
        "pykmip-server did not start; its log:\n{}",
        std::fs::read_to_string(k.dir.path().join("stdout.log")).unwrap_or_default()
    );
}

impl PyKmip {
    /// (Re)starts the server on [`PyKmip::port`] with the same database; true once it accepts
    /// connections.
    pub fn start_again(&mut self) -> bool {
        self.stop();
        let d = self.dir.path();
        let c = &self.certs;
        let conf = d.join("server.conf");
        std::fs::write(
            &conf,
            format!(
                "[server]\nhostname=127.0.0.1\nport={}\ncertificate_path={}\nkey_path={}\nca_path={}\n\
                 auth_suite=TLS1.2\nenable_tls_client_auth=True\nlogging_level=INFO\n\
                 database_path={}\npolicy_path={}\n",
                self.port,
                c.join("server.pem").display(),
                c.join("server-key.pem").display(),
                c.join("ca.pem").display(),
                d.join("pykmip.sqlite").display(),
                d.join("policies").display(),
            ),
        )
        .unwrap();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("stdout.log"))
            .unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-f")
            .arg(&conf)
            .arg("-l")
            .arg(d.join("server.log"))
            .env("PYTHONWARNINGS", "ignore")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out));
        let port = self.port;
        self.child = spawn_until_ready(&mut cmd, &self.bin, Duration::from_secs(60), || {
            port_open(port)
        });
        self.child.is_some()
    }

    /// Kills the server (connections are reset).
    pub fn stop(&mut self) {
        self.child = None;
    }

    /// Runs `tests/python/kmip_admin.py` (PyKMIP's own client, with the test client
    /// certificate, so keys it creates belong to the plugin's identity); returns its output.
    pub fn admin(&self, args: &[&str]) -> String {
        let port = self.port.to_string();
        let mut all = vec!["127.0.0.1", port.as_str(), self.certs.to_str().unwrap()];
        all.extend_from_slice(args);
        run_python("tests/python/kmip_admin.py", &all)
            .trim()
            .to_string()
    }

    /// A new AES-256 key named `name`, activated; its unique identifier.
    pub fn create_key(&self, name: &str) -> String {
        self.admin(&["create", name])
    }
}

/// Runs a script of the repository with the test Python; returns its standard output.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let py = test_python().unwrap_or_else(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")
    });
    let out = Command::new(&py)
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "run {script} with {} (make deps, or set KMS_TEST_PYTHON): {e}",
                py.display()
            )
        });
    assert!(
        out.status.success(),
        "{script} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
