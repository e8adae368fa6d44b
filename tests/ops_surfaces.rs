//! The operational surfaces of a real `kms-plugin serve` process: /livez, /readyz, /metrics after
//! traffic, one audit line per operation with its uid, SIGHUP reopen, and a plaintext marker sent
//! through v1 Encrypt appearing in no log, metric or audit line.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[cfg(feature = "akeyless")]
mod support;

const BIN: &str = env!("CARGO_BIN_EXE_kms-plugin");
const MARKER: &str = "PLAINTEXT-MARKER-7f3a9c";

struct Plugin {
    child: Child,
    dir: tempfile::TempDir,
    http: String,
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Plugin {
    fn sock(&self) -> String {
        format!("unix://{}", self.dir.path().join("kms.sock").display())
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    Some((head.split(' ').nth(1)?.parse().ok()?, body.to_owned()))
}

fn start() -> Plugin {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("kek.json");
    let st = Command::new(BIN).arg("keygen").arg(&key).output().unwrap();
    assert!(
        st.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let http = format!("127.0.0.1:{}", free_port());
    let child = Command::new(BIN)
        .args(["serve", "--backend", "local", "--local-key-file"])
        .arg(&key)
        .arg("--listen")
        .arg(format!("unix://{}", dir.path().join("kms.sock").display()))
        .args(["--http", &http, "--audit-log"])
        .arg(dir.path().join("audit.log"))
        .args(["--log-level", "debug"])
        .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let p = Plugin { child, dir, http };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http_get(&p.http, "/readyz"), Some((200, _))) {
        assert!(Instant::now() < deadline, "plugin did not become ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

fn client(p: &Plugin, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let mut child = Command::new(BIN)
        .args(args)
        .args(["--listen", &p.sock()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON: {l}: {e}"))
        })
        .collect()
}

/// Polls until the audit file holds a line matching `pred` (the writer is asynchronous).
fn wait_for_line(path: &Path, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = audit_lines(path).into_iter().find(&pred) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no matching audit line in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn http_metrics_and_audit_of_a_running_plugin() {
    let p = start();
    assert_eq!(http_get(&p.http, "/livez").unwrap().0, 200);
    assert_eq!(http_get(&p.http, "/healthz").unwrap().0, 200);

    // v1 Encrypt of a marker, then Decrypt it back.
    let out = client(&p, &["encrypt", "--api", "v1"], MARKER.as_bytes());
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let ct = v["ciphertext"].as_str().unwrap().to_owned();
    let plain = client(&p, &["decrypt", "--api", "v1"], ct.as_bytes());
    assert_eq!(plain, MARKER.as_bytes());
    // v2 round trip: the CLI sends a uid.
    let out = client(&p, &["encrypt"], &[7u8; 32]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let key_id = v["key_id"].as_str().unwrap().to_owned();
    client(
        &p,
        &["decrypt", "--key-id", &key_id],
        v["ciphertext"].as_str().unwrap().as_bytes(),
    );

    client(&p, &["health"], b"");
    let (code, metrics) = http_get(&p.http, "/metrics").unwrap();
    assert_eq!(code, 200);
    for series in [
        r#"kms_plugin_grpc_requests_total{api="v1",method="Encrypt",code="OK"} 1"#,
        r#"kms_plugin_grpc_requests_total{api="v1",method="Decrypt",code="OK"} 1"#,
        r#"kms_plugin_grpc_requests_total{api="v2",method="Encrypt",code="OK"} 1"#,
        r#"kms_plugin_grpc_requests_total{api="v2",method="Decrypt",code="OK"} 1"#,
        r#"kms_plugin_grpc_requests_total{api="v2",method="Status",code="OK"} 1"#,
        r#"kms_plugin_backend_calls_total{operation="wrap",outcome="ok"}"#,
        "kms_plugin_backend_healthy 1",
        "kms_plugin_key_id_changes_total 1",
        "kms_plugin_local_kek_cache_size 1",
    ] {
        assert!(metrics.contains(series), "missing {series}\n{metrics}");
    }

    let audit = p.path("audit.log");
    let l = wait_for_line(&audit, |l| l["operation"] == "decrypt" && l["api"] == "v2");
    assert_eq!(l["key_id"], key_id.as_str());
    assert!(l["uid"].as_str().is_some_and(|u| !u.is_empty()), "{l}");
    assert_eq!(l["outcome"], "ok");
    assert!(l["local_kek"].as_str().is_some_and(|r| r.len() == 12));
    for op in ["encrypt", "decrypt"] {
        wait_for_line(&audit, |l| l["operation"] == op && l["api"] == "v1");
    }
    wait_for_line(&audit, |l| l["operation"] == "key_rotation");

    // logrotate: rename, SIGHUP, the next line lands in a new file.
    std::fs::rename(&audit, p.path("audit.log.1")).unwrap();
    let st = Command::new("kill")
        .args(["-HUP", &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        client(&p, &["encrypt", "--api", "v1"], b"after-rotate");
        if !audit_lines(&audit).is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "audit log not reopened after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The marker is nowhere: not in logs (at debug level), metrics or audit lines.
    assert!(!metrics.contains(MARKER));
    for f in ["audit.log", "audit.log.1", "stdout.log", "stderr.log"] {
        let text = std::fs::read_to_string(p.path(f)).unwrap_or_default();
        assert!(!text.contains(MARKER), "marker found in {f}");
    }
}

/// The Akeyless variant of the static pod: drop-in `AKEYLESS_*` variables with the access key in a
/// file (deploy/static-pod-akeyless.yaml), against the fake Akeyless server.
#[cfg(feature = "akeyless")]
mod akeyless {
    use super::*;

    use crate::support::akeyless_fake::{Fake, ACCESS_ID, ACCESS_KEY, KEY};

    /// Neither the access key nor anything shaped like a fake-issued token (`t-` + 32 hex digits).
    fn assert_no_secret(text: &str) {
        assert!(!text.contains(ACCESS_KEY), "access key leaked: {text}");
        let tokenish = text.match_indices("t-").any(|(i, _)| {
            text[i + 2..]
                .get(..32)
                .is_some_and(|t| t.bytes().all(|b| b.is_ascii_hexdigit()))
        });
        assert!(!tokenish, "token leaked: {text}");
    }

    #[test]
    fn akeyless_drop_in_env_with_access_key_file() {
        let Some(fake) = Fake::start(&[]) else { return };
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("akeyless-access-key");
        std::fs::write(&key_file, ACCESS_KEY).unwrap();
        let http = format!("127.0.0.1:{}", free_port());
        let child = Command::new(BIN)
            .arg("serve")
            .arg(format!(
                "--listen=unix://{}",
                dir.path().join("kms.sock").display()
            ))
            .arg(format!("--http={http}"))
            .arg("--audit-log=-")
            .env("AKEYLESS_URL", &fake.url)
            .env("AKEYLESS_KEY_ENCRYPTION_KEY", KEY)
            .env("AKEYLESS_ACCESS_ID", ACCESS_ID)
            .env("AKEYLESS_ACCESS_TYPE", "access_key")
            .env("KMS_PLUGIN_AKEYLESS_ACCESS_KEY_FILE", &key_file)
            .env("KMS_PLUGIN_STATE_DIR", dir.path())
            .env("KMS_PLUGIN_DATA_DIR", dir.path())
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        let p = Plugin { child, dir, http };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(http_get(&p.http, "/readyz"), Some((200, _))) {
            let stderr = std::fs::read_to_string(p.path("stderr.log")).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "plugin did not become ready:\n{stderr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = client(&p, &["encrypt"], &[9u8; 32]);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(
            v["key_id"].as_str().unwrap().starts_with("akeyless:"),
            "{v}"
        );

        let (_, metrics) = http_get(&p.http, "/metrics").unwrap();
        let auth: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("kms_plugin_backend_auth_calls_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no auth counter\n{metrics}"));
        assert!(auth >= 1.0, "{metrics}");
        assert!(
            metrics.contains(r#"kms_plugin_backend_calls_total{operation="wrap",outcome="ok"}"#)
        );
        // The start-up login, counted as an access token acquisition.
        let logins: f64 = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(r#"kms_plugin_token_refreshes_total{kind="access",outcome="ok"} "#)
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no token refresh series\n{metrics}"));
        assert!(logins >= 1.0, "{metrics}");

        // The audit log on stdout has the encrypt line with the CLI's uid; the access key is nowhere.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stdout = std::fs::read_to_string(p.path("stdout.log")).unwrap();
            if stdout
                .lines()
                .any(|l| l.contains(r#""operation":"encrypt""#) && l.contains("kms-plugin-cli"))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no encrypt audit line on stdout:\n{stdout}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // ... and the start-up authentication, with the backend kind and no credential.
        let stdout = std::fs::read_to_string(p.path("stdout.log")).unwrap();
        let auth: serde_json::Value = stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .find(|l: &serde_json::Value| l["operation"] == "auth")
            .unwrap_or_else(|| panic!("no auth audit line on stdout:\n{stdout}"));
        assert_eq!(auth["backend"], "akeyless", "{auth}");
        assert_eq!(auth["outcome"], "ok", "{auth}");
        assert_no_secret(&metrics);
        for f in ["stdout.log", "stderr.log"] {
            let text = std::fs::read_to_string(p.path(f)).unwrap();
            assert_no_secret(&text);
        }
    }
}
