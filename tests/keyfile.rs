//! The local key file through the real binary: concurrent `keygen --add`, file mode on rewrite,
//! reloads that remove keys or change their bytes (log + metric), the explicit development mode and
//! the `--kek-max-uses` cap.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;
use kms_plugin::cli::Cli;
use kms_plugin::protocol::socket::ListenAddr;
use serde_json::Value;
use support::external::free_port;
use support::plugin::{try_status, Plugin, BIN};

fn keygen(args: &[&str], file: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("keygen")
        .args(args)
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn key_names(file: &Path) -> Vec<String> {
    let v: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap().to_string())
        .collect()
}

/// Replaces the key file by a rename, the way an operator's tooling would.
fn rewrite(file: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    edit(&mut v);
    let tmp = file.with_extension("edited");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some(buf.split_once("\r\n\r\n")?.1.to_owned())
}

fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls until `cond` holds, failing with `what` after `limit`.
async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Status key_id is derived from the local key's name (the engine may decorate it).
async fn assert_key_id_names(addr: &ListenAddr, name: &str) {
    let key_id = try_status(addr).await.unwrap().key_id;
    assert!(
        key_id.contains(name),
        "key_id {key_id} is not for key {name}"
    );
}

#[test]
fn concurrent_keygen_add_processes_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kek.json");
    let (ok, err) = keygen(&[], &file);
    assert!(ok, "{err}");
    let mut expected = key_names(&file);
    for round in 0..4 {
        let children: Vec<_> = (0..6)
            .map(|_| {
                Command::new(BIN)
                    .args(["keygen", "--add"])
                    .arg(&file)
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "round {round}: {err}");
            let name = err
                .split_whitespace()
                .skip_while(|w| *w != "key")
                .nth(1)
                .unwrap_or_else(|| panic!("no key name in {err:?}"))
                .to_string();
            expected.push(name);
        }
        let mut have = key_names(&file);
        have.sort();
        let mut want = expected.clone();
        want.sort();
        assert_eq!(have, want, "round {round}: a concurrent addition was lost");
    }
    assert!(kms_plugin::backend::local::LocalBackend::open(&file).is_ok());
    // Only the key file: no temporary or lock file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["kek.json"]);
}

#[test]
fn keygen_add_keeps_the_operators_file_mode() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kek.json");
    let (ok, err) = keygen(&[], &file);
    assert!(ok, "{err}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (ok, err) = keygen(&["--add"], &file);
    assert!(ok, "{err}");
    assert_eq!(key_names(&file).len(), 2);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640, "keygen --add changed the file mode");
}

#[test]
fn keygen_add_keeps_the_files_owner() {
    // The rotation runbook has root rotate a file owned by the plugin's user (65532 in the images):
    // a rewrite owned by root would be unreadable to the plugin at its next reload or restart.
    if !nix::unistd::geteuid().is_root() {
        if support::external::opted_out("root") {
            return;
        }
        panic!("this test changes file owners and needs root; set KMS_TEST_OPT_OUT=root to skip");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kek.json");
    let (ok, err) = keygen(&[], &file);
    assert!(ok, "{err}");
    std::os::unix::fs::chown(&file, Some(65532), Some(65532)).unwrap();
    let (ok, err) = keygen(&["--add"], &file);
    assert!(ok, "{err}");
    let meta = std::fs::metadata(&file).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.gid()), (65532, 65532), "owner changed");
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!(key_names(&file).len(), 2);
}

/// Runs `serve` with no backend in the environment and returns (exit success, stderr).
fn serve_without_backend(extra: &[&str], env: &[(&str, &str)], data: &Path) -> (bool, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen"])
        .arg(format!("unix://{}", data.join("kms.sock").display()))
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .env_remove("KMS_PLUGIN_BACKEND")
        .env_remove("KMS_PLUGIN_LOCAL_KEY_FILE")
        .env_remove("AKEYLESS_KEY_ENCRYPTION_KEY")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve without a backend did not exit at once");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.success(), err)
}

#[test]
fn serve_without_backend_and_without_dev_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // An empty KMS_PLUGIN_BACKEND (a templating slip) must not select the development key either.
    for env in [vec![], vec![("KMS_PLUGIN_BACKEND", "")]] {
        let (ok, err) = serve_without_backend(&[], &env, &data);
        assert!(!ok, "serve started without a backend ({env:?}): {err}");
        assert!(err.contains("--backend"), "{err}");
        if env.is_empty() {
            assert!(err.contains("--dev"), "{err}");
        }
        assert!(
            !data.join("dev-kek.json").exists(),
            "a development key was created without --dev"
        );
    }
    // A typo in the backend name is an error, never a fallback.
    let (ok, err) = serve_without_backend(&["--dev"], &[("KMS_PLUGIN_BACKEND", "loacl")], &data);
    assert!(!ok);
    assert!(err.contains("loacl"), "{err}");
    assert!(!data.join("dev-kek.json").exists());
    // --dev together with a configured backend is refused too.
    let (ok, err) = serve_without_backend(&["--dev", "--backend", "local"], &[], &data);
    assert!(!ok);
    assert!(err.contains("--dev"), "{err}");
    assert!(!data.join("dev-kek.json").exists());
}

#[tokio::test]
async fn serve_dev_creates_and_serves_a_development_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let socket = dir.path().join("kms.sock");
    let args: Vec<String> = [
        "serve",
        "--dev",
        "--listen",
        &format!("unix://{}", socket.display()),
        "--data-dir",
        &data.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = Plugin::start(&args, ListenAddr::Path(socket), dir.path()).await;
    assert!(kms_plugin::backend::local::LocalBackend::open(data.join("dev-kek.json")).is_ok());
    assert!(
        p.log_text().contains("DEVELOPMENT MODE"),
        "{}",
        p.log_text()
    );
    assert!(p.terminate().success());
}

#[test]
fn kek_max_uses_is_capped_at_2_pow_32() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, err) =
        serve_without_backend(&["--dev", "--kek-max-uses", "4294967297"], &[], dir.path());
    assert!(!ok);
    assert!(
        err.contains("--kek-max-uses") && err.contains("2^32"),
        "{err}"
    );
    assert!(!dir.path().join("dev-kek.json").exists());
    let (ok, err) = serve_without_backend(
        &["--dev", "--kek-max-uses", "18446744073709551615"],
        &[],
        dir.path(),
    );
    assert!(!ok);
    assert!(err.contains("2^32"), "{err}");
    // The cap itself is accepted; above it is refused from a config file as well.
    let cli = Cli::try_parse_from(["kms-plugin", "serve", "--kek-max-uses", "4294967296"]).unwrap();
    let kms_plugin::cli::Command::Serve(args) = cli.command else {
        panic!("not serve")
    };
    assert_eq!(args.kek_max_uses, 1 << 32);
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "kek-max-uses: 4294967297\n").unwrap();
    let (ok, err) = serve_without_backend(
        &["--dev", "--config", &config.display().to_string()],
        &[],
        dir.path(),
    );
    assert!(!ok);
    assert!(err.contains("2^32"), "{err}");
}

#[tokio::test]
async fn reloads_report_removed_keys_and_refuse_changed_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kek.json");
    let (ok, err) = keygen(&[], &file);
    assert!(ok, "{err}");
    let (ok, err) = keygen(&["--add"], &file);
    assert!(ok, "{err}");
    let names = key_names(&file);
    let (old, primary) = (names[0].clone(), names[1].clone());
    let socket = dir.path().join("kms.sock");
    let addr = ListenAddr::Path(socket.clone());
    let http = format!("127.0.0.1:{}", free_port());
    let args: Vec<String> = [
        "serve",
        "--backend",
        "local",
        "--local-key-file",
        &file.display().to_string(),
        "--listen",
        &format!("unix://{}", socket.display()),
        "--probe-interval",
        "100ms",
        "--http",
        &http,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let p = Plugin::start(&args, addr.clone(), dir.path()).await;
    let metrics = || http_get(&http, "/metrics").unwrap_or_default();
    let missing = "kms_plugin_local_keys_missing_from_file";
    let refused = "kms_plugin_local_key_file_reload_refused";
    assert_eq!(gauge(&metrics(), missing), Some(0.0), "{}", metrics());
    assert_eq!(gauge(&metrics(), refused), Some(0.0));

    // The old key is removed: kept in memory, warned about by name, counted.
    let original = std::fs::read(&file).unwrap();
    rewrite(&file, |v| {
        v["keys"].as_array_mut().unwrap().remove(0);
    });
    eventually(Duration::from_secs(10), "missing-key gauge = 1", || {
        gauge(&metrics(), missing) == Some(1.0)
    })
    .await;
    let log = p.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("REMOVED"))
        .unwrap_or_else(|| panic!("no warning about the removed key:\n{log}"));
    assert!(
        warning.contains("WARN") && warning.contains(&old),
        "{warning}"
    );
    assert_key_id_names(&addr, &primary).await;

    // The primary key gets other bytes (and a new key is appended): the whole reload is refused.
    let mut stolen = Vec::new();
    rewrite(&file, |v| {
        let keys = v["keys"].as_array_mut().unwrap();
        let fresh = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        stolen.push(keys[0]["key"].as_str().unwrap().to_string());
        stolen.push(fresh.clone());
        keys[0]["key"] = Value::String(fresh);
        let mut extra = keys[0].clone();
        extra["name"] = Value::String("k-appended".into());
        extra["key"] = Value::String(base64::engine::general_purpose::STANDARD.encode([8u8; 32]));
        keys.push(extra);
    });
    eventually(Duration::from_secs(10), "reload-refused gauge = 1", || {
        gauge(&metrics(), refused) == Some(1.0)
    })
    .await;
    let log = p.log_text();
    let error = log
        .lines()
        .find(|l| l.contains("REFUSED"))
        .unwrap_or_else(|| panic!("no error about the refused reload:\n{log}"));
    assert!(
        error.contains("ERROR") && error.contains(&primary),
        "{error}"
    );
    for secret in &stolen {
        assert!(!log.contains(secret.as_str()), "key bytes in the log");
        assert!(!metrics().contains(secret.as_str()), "key bytes in metrics");
    }
    // Still the loaded keys: the appended key was not taken over either.
    assert_key_id_names(&addr, &primary).await;

    // The operator restores the original file: accepted, both gauges back to 0.
    let tmp = file.with_extension("restore");
    std::fs::write(&tmp, &original).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    eventually(Duration::from_secs(10), "gauges back to 0", || {
        let m = metrics();
        gauge(&m, refused) == Some(0.0) && gauge(&m, missing) == Some(0.0)
    })
    .await;
    assert_key_id_names(&addr, &primary).await;
}
