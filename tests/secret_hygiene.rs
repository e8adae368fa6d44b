//! Secret hygiene of the real binary: a recognisable plaintext and the key material of the key file are
//! sent through every path (v1 and v2 Encrypt/Decrypt, the CLI client, failing requests, a broken key
//! file) at log level `trace`, in text and in JSON logs, and must appear — raw, hex or base64 — in no
//! log line, error message returned to a client, metric, audit line or panic message.
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use kms_plugin::proto::{v1beta1, v2};
use kms_plugin::protocol::socket::ListenAddr;
use support::plugin::{channel, v1_client, v2_client, BIN};

/// 32 bytes, like a real DEK.
const MARKER: &[u8; 32] = b"SECRET-MARKER-7f3a9c1e-PLAINTEXT";

/// Every form in which a secret could leak into text.
fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    let mut v = vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        hex::encode_upper(secret).into_bytes(),
        STANDARD.encode(secret).into_bytes(),
        STANDARD_NO_PAD.encode(secret).into_bytes(),
        URL_SAFE.encode(secret).into_bytes(),
        URL_SAFE_NO_PAD.encode(secret).into_bytes(),
        // Debug of a byte slice: [83, 69, 67, ...]
        format!("{:?}", &secret[..8])
            .trim_end_matches(']')
            .as_bytes()
            .to_vec(),
    ];
    // Base64 of the secret at any offset shares a long run with one of these three shifts.
    for shift in 1..3 {
        let s = STANDARD.encode(&secret[shift..]);
        v.push(s.as_bytes()[..s.len().min(24)].to_vec());
    }
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle)
}

fn assert_clean(what: &str, text: &[u8], secrets: &[(&str, Vec<u8>)]) {
    for (name, secret) in secrets {
        for form in forms(secret) {
            assert!(
                !contains(text, &form),
                "{name} leaked into {what} as {:?}:\n{}",
                String::from_utf8_lossy(&form),
                String::from_utf8_lossy(text)
            );
        }
    }
    let s = String::from_utf8_lossy(text);
    assert!(!s.contains("panicked"), "panic in {what}:\n{s}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    Some(buf)
}

struct Running {
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The key bytes of a key file made by `keygen` (the local backend's "credential").
fn key_material(path: &Path) -> Vec<Vec<u8>> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| STANDARD.decode(k["key"].as_str().unwrap()).unwrap())
        .collect()
}

/// Round trips of the marker on both APIs, then failing requests; returns the clients' error messages.
async fn round_trips_and_errors(addr: &ListenAddr, secrets: &[(&str, Vec<u8>)]) -> Vec<String> {
    let mut client_errors = Vec::new();
    let ch = channel(addr).await;
    let mut c2 = v2_client(ch.clone());
    let mut c1 = v1_client(ch);

    // Successful round trips on both APIs.
    let enc = c2
        .encrypt(v2::EncryptRequest {
            plaintext: MARKER.to_vec(),
            uid: "hygiene-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_clean("a v2 ciphertext", &enc.ciphertext, secrets);
    let dec = c2
        .decrypt(v2::DecryptRequest {
            ciphertext: enc.ciphertext.clone(),
            uid: "hygiene-2".into(),
            key_id: enc.key_id.clone(),
            annotations: enc.annotations.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dec.plaintext, MARKER.to_vec());
    let enc1 = c1
        .encrypt(v1beta1::EncryptRequest {
            version: "v1beta1".into(),
            plain: MARKER.to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    let dec1 = c1
        .decrypt(v1beta1::DecryptRequest {
            version: "v1beta1".into(),
            cipher: enc1.cipher.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dec1.plain, MARKER.to_vec());

    // Failures: tampered, wrong key_id, wrong API, oversized plaintext full of the marker, a
    // "ciphertext" that is the marker itself.
    let mut tampered = enc.ciphertext.clone();
    let n = tampered.len();
    tampered[n - 1] ^= 1;
    let bad_v2 = [
        (tampered, enc.key_id.clone()),
        (enc.ciphertext.clone(), "local:wrong".to_string()),
        (enc1.cipher.clone(), enc.key_id.clone()),
        (MARKER.to_vec(), enc.key_id.clone()),
    ];
    for (ciphertext, key_id) in bad_v2 {
        let e = c2
            .decrypt(v2::DecryptRequest {
                ciphertext,
                uid: "hygiene-bad".into(),
                key_id,
                annotations: Default::default(),
            })
            .await
            .unwrap_err();
        client_errors.push(e.message().to_string());
    }
    let e = c2
        .encrypt(v2::EncryptRequest {
            plaintext: MARKER.repeat(200),
            uid: "hygiene-big".into(),
        })
        .await
        .unwrap_err();
    client_errors.push(e.message().to_string());
    for cipher in [enc.ciphertext.clone(), MARKER.to_vec()] {
        let e = c1
            .decrypt(v1beta1::DecryptRequest {
                version: "v1beta1".into(),
                cipher,
            })
            .await
            .unwrap_err();
        client_errors.push(e.message().to_string());
    }
    let e = c1
        .encrypt(v1beta1::EncryptRequest {
            version: "v1beta1".into(),
            plain: MARKER.repeat(200),
        })
        .await
        .unwrap_err();
    client_errors.push(e.message().to_string());

    client_errors
}

async fn exercise(format: &str) {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("kek.json");
    let out = Command::new(BIN)
        .arg("keygen")
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut secrets: Vec<(&str, Vec<u8>)> = vec![("plaintext marker", MARKER.to_vec())];
    for k in key_material(&key_file) {
        secrets.push(("key file key", k));
    }
    let sock = dir.path().join("kms.sock");
    let addr = ListenAddr::Path(sock.clone());
    let http = format!("127.0.0.1:{}", free_port());
    let log = dir.path().join("plugin.log");
    let audit = dir.path().join("audit.log");
    let mut plugin = Running {
        child: Command::new(BIN)
            .args(["serve", "--backend", "local", "--local-key-file"])
            .arg(&key_file)
            .arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .args(["--http", &http, "--audit-log"])
            .arg(&audit)
            .args(["--probe-interval", "200ms", "--deep-probe-interval", "1s"])
            .env("KMS_PLUGIN_LOG_LEVEL", "trace")
            .env("KMS_PLUGIN_LOG_FORMAT", format)
            .env("RUST_BACKTRACE", "1")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .unwrap(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http_get(&http, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(Instant::now() < deadline, "plugin did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let client_errors = round_trips_and_errors(&addr, &secrets).await;

    // The CLI client at trace level (its own logs go to stderr; stdout carries the result).
    let mut cli = Command::new(BIN)
        .args(["encrypt", "--listen"])
        .arg(format!("unix://{}", sock.display()))
        .env("KMS_PLUGIN_LOG_LEVEL", "trace")
        .env("KMS_PLUGIN_LOG_FORMAT", format)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    cli.stdin.take().unwrap().write_all(MARKER).unwrap();
    let out = cli.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_clean("the CLI client's stderr", &out.stderr, &secrets);

    // Break the key file (probe errors are logged) and show the key file's path in errors.
    let original = std::fs::read(&key_file).unwrap();
    let mut broken = original.clone();
    broken.truncate(original.len() / 2);
    std::fs::write(&key_file, &broken).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(&http, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(Instant::now() < deadline, "broken key file not noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let readyz = http_get(&http, "/readyz").unwrap();
    std::fs::write(&key_file, &original).unwrap();
    let metrics = http_get(&http, "/metrics").unwrap();

    // SIGTERM so every buffered log and audit line is written.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(plugin.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while plugin.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "plugin did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut logs = std::fs::read(&log).unwrap();
    logs.extend(std::fs::read(dir.path().join("stderr.log")).unwrap());
    let audit_text = std::fs::read(&audit).unwrap();
    assert!(
        logs.len() > 10_000,
        "trace logging produced only {} bytes",
        logs.len()
    );
    assert!(!audit_text.is_empty(), "no audit lines");
    assert!(metrics.contains("kms_plugin"), "{metrics}");
    assert!(!client_errors.iter().any(|e| e.is_empty()));
    assert_clean(&format!("{format} logs"), &logs, &secrets);
    assert_clean("audit lines", &audit_text, &secrets);
    assert_clean("/metrics", metrics.as_bytes(), &secrets);
    assert_clean("/readyz", readyz.as_bytes(), &secrets);
    assert_clean(
        "error messages returned to clients",
        client_errors.join("\n").as_bytes(),
        &secrets,
    );
    eprintln!(
        "{format}: {} bytes of trace logs, {} bytes of audit, {} bytes of metrics, {} client errors: no secret in any form",
        logs.len(),
        audit_text.len(),
        metrics.len(),
        client_errors.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_text_logs_at_trace() {
    exercise("text").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_json_logs_at_trace() {
    exercise("json").await;
}

/// The first `t-`/`u-` token (32 lowercase hex digits, the shape the fake issues) in `text`.
fn find_token(text: &[u8]) -> Option<String> {
    (0..text.len().saturating_sub(33)).find_map(|i| {
        let starts = (text[i] == b't' || text[i] == b'u')
            && text[i + 1] == b'-'
            && (i == 0 || !text[i - 1].is_ascii_alphanumeric());
        let run = text[i + 2..]
            .iter()
            .take_while(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
            .count();
        (starts && run >= 32).then(|| String::from_utf8_lossy(&text[i..i + 2 + run]).into_owned())
    })
}

async fn wait_ready(http: &str, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(http, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) != want {
        assert!(Instant::now() < deadline, "readiness did not become {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Akeyless credentials (access key, Universal Identity tokens, the `t-` tokens the fake issues) and
/// the plaintext marker, through round trips, token expiry and re-authentication, a 503 outage and a
/// revoked permission, at trace level.
#[cfg(feature = "akeyless")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_akeyless_credential_or_token_in_any_output_at_trace() {
    use serde_json::json;
    use support::akeyless_fake::{Fake, ACCESS_ID, ACCESS_KEY, KEY};
    let Some(fake) = Fake::start(&[]) else { return };
    for (format, auth) in [("json", "access_key"), ("text", "universal_identity")] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("kms.sock");
        let addr = ListenAddr::Path(sock.clone());
        let http = format!("127.0.0.1:{}", free_port());
        let log = dir.path().join("plugin.log");
        let audit = dir.path().join("audit.log");
        let mut secrets: Vec<(&str, Vec<u8>)> = vec![("plaintext marker", MARKER.to_vec())];
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--backend", "akeyless", "--listen"])
            .arg(format!("unix://{}", sock.display()))
            .args(["--akeyless-url", &fake.url, "--akeyless-key-name", KEY])
            .args(["--http", &http, "--audit-log"])
            .arg(&audit)
            .args(["--probe-interval", "200ms", "--deep-probe-interval", "1s"])
            .arg("--data-dir")
            .arg(dir.path());
        if auth == "access_key" {
            let f = dir.path().join("access-key");
            std::fs::write(&f, ACCESS_KEY).unwrap();
            cmd.args([
                "--akeyless-access-id",
                ACCESS_ID,
                "--akeyless-access-key-file",
            ])
            .arg(&f);
            secrets.push(("access key", ACCESS_KEY.as_bytes().to_vec()));
        } else {
            let token = fake.control("uid-token", json!({"ttl": 3600})).await["token"]
                .as_str()
                .unwrap()
                .to_string();
            let f = dir.path().join("uid-token");
            std::fs::write(&f, &token).unwrap();
            cmd.arg("--akeyless-uid-token-file").arg(&f);
            secrets.push(("UID init token", token.into_bytes()));
        }
        let mut plugin = Running {
            child: cmd
                .env("KMS_PLUGIN_LOG_LEVEL", "trace")
                .env("KMS_PLUGIN_LOG_FORMAT", format)
                .env("RUST_BACKTRACE", "1")
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
                .spawn()
                .unwrap(),
        };
        wait_ready(&http, true).await;
        let mut client_errors = round_trips_and_errors(&addr, &secrets).await;

        // Expired tokens (re-authentication), an outage, a revoked permission.
        fake.control("expire-tokens", json!({})).await;
        fake.control(
            "fail",
            json!({"command": "*", "status": 503, "count": 1_000_000}),
        )
        .await;
        wait_ready(&http, false).await;
        fake.control("clear-faults", json!({})).await;
        wait_ready(&http, true).await;
        fake.control("key", json!({"name": KEY, "action": "deny"}))
            .await;
        wait_ready(&http, false).await;
        let e = v2_client(channel(&addr).await)
            .encrypt(v2::EncryptRequest {
                plaintext: MARKER.to_vec(),
                uid: "hygiene-denied".into(),
            })
            .await
            .unwrap_err();
        client_errors.push(e.message().to_string());
        let readyz = http_get(&http, "/readyz").unwrap();
        fake.control("key", json!({"name": KEY, "action": "allow"}))
            .await;
        wait_ready(&http, true).await;
        let metrics = http_get(&http, "/metrics").unwrap();

        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(plugin.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while plugin.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "plugin did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Tokens the plugin saved (rotated UID tokens) are secrets too.
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let p = entry.unwrap().path();
            if p.file_name().unwrap().to_string_lossy().contains("uid") && p.is_file() {
                let t = std::fs::read_to_string(&p).unwrap().trim().to_string();
                if t.starts_with("u-") {
                    secrets.push(("saved UID token", t.into_bytes()));
                }
            }
        }
        let mut logs = std::fs::read(&log).unwrap();
        logs.extend(std::fs::read(dir.path().join("stderr.log")).unwrap());
        let audit_text = std::fs::read(&audit).unwrap();
        let errors = client_errors.join("\n");
        let outputs: [(&str, &[u8]); 5] = [
            ("logs", &logs),
            ("audit lines", &audit_text),
            ("/metrics", metrics.as_bytes()),
            ("/readyz", readyz.as_bytes()),
            ("client errors", errors.as_bytes()),
        ];
        for (what, text) in outputs {
            assert_clean(&format!("{what} ({format}, {auth})"), text, &secrets);
            assert_eq!(
                find_token(text),
                None,
                "a token in {what} ({format}, {auth})"
            );
        }
        assert!(logs.len() > 10_000);
        eprintln!(
            "akeyless {auth}, {format}: {} bytes of trace logs, {} audit bytes, {} client errors; {} secrets in no output",
            logs.len(),
            audit_text.len(),
            client_errors.len(),
            secrets.len()
        );
    }
}

#[test]
fn the_detectors_find_what_they_look_for() {
    let token = "t-0123456789abcdef0123456789abcdef";
    assert_eq!(
        find_token(format!("{{\"token\":\"{token}\"}}").as_bytes()).as_deref(),
        Some(token)
    );
    assert_eq!(find_token(b"kek=0123456789ab key_id=local:k1"), None);
    let leaked = format!("error: {}", STANDARD.encode(&MARKER[1..]));
    assert!(forms(MARKER).iter().any(|f| contains(leaked.as_bytes(), f)));
    assert!(forms(MARKER)
        .iter()
        .any(|f| contains(format!("{:?}", &MARKER[..]).as_bytes(), f)));
}
