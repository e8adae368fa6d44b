//! `kms-plugin serve --backend pkcs11` against SoftHSM2: directly, and through a test-only
//! forwarding PKCS#11 module (tests/pkcs11/forward.c, compiled here with `cc`) that injects what a
//! real HSM does to its clients: a login dropped behind the plugin's back, calls that never return,
//! a token that is not there yet at start-up.
//!
//! Every test makes its own token in a temporary directory and runs its own plugin process, so
//! the tests of this file share no PKCS#11 state.
#![cfg(feature = "pkcs11")]
#[path = "pkcs11/softhsm.rs"]
mod softhsm;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kms_plugin::proto::v2;
use kms_plugin::protocol::socket::ListenAddr;
use support::external::{opted_out, which};
use support::plugin::{channel, try_status, v2_client, Plugin, BIN};

const TOKEN: &str = "kms";
const PIN: &str = "48151623";
const SO_PIN: &str = "12345678";

/// A fresh SoftHSM2 token with AES keys, and a place for one plugin's socket and logs.
struct Token {
    token: softhsm::TokenDir,
    /// The real SoftHSM2 module.
    softhsm: PathBuf,
    pin_file: PathBuf,
    socket: PathBuf,
}

impl Token {
    /// `keys` are (label, hex CKA_ID). None when SoftHSM2 is opted out (KMS_TEST_OPT_OUT=softhsm).
    fn new(keys: &[(&str, &str)]) -> Option<Token> {
        if opted_out("softhsm") {
            return None;
        }
        let softhsm = softhsm::module();
        let token = softhsm::TokenDir::new(TOKEN, SO_PIN, PIN);
        for (label, id) in keys {
            token.keygen(&softhsm, label, id);
        }
        let pin_file = token.dir.path().join("pin");
        std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
        let socket = token.dir.path().join("kms.sock");
        Some(Token {
            token,
            softhsm,
            pin_file,
            socket,
        })
    }

    fn dir(&self) -> &Path {
        self.token.dir.path()
    }

    /// Compiles the forwarding module into the token's directory.
    fn forwarding_module(&self) -> PathBuf {
        let cc = which("cc").expect("cc not found: a C compiler builds the test's PKCS#11 module");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pkcs11/forward.c");
        let out = self.dir().join("libforward.so");
        let result = Command::new(cc)
            .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
            .arg(&out)
            .arg(&source)
            .arg("-ldl")
            .output()
            .unwrap();
        assert!(
            result.status.success(),
            "cc {}: {}",
            source.display(),
            String::from_utf8_lossy(&result.stderr)
        );
        std::fs::create_dir_all(self.control_dir()).unwrap();
        out
    }

    fn control_dir(&self) -> PathBuf {
        self.dir().join("control")
    }

    /// Creates (`on`) or removes a control file of the forwarding module.
    fn set(&self, name: &str, on: bool) {
        let path = self.control_dir().join(name);
        if on {
            std::fs::write(path, "").unwrap();
        } else {
            std::fs::remove_file(path).unwrap();
        }
    }

    /// How many events of this kind the forwarding module recorded (`C_OpenSession`, ...).
    fn count(&self, event: &str) -> usize {
        std::fs::read_to_string(self.control_dir().join("events"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split(' ').next() == Some(event))
            .count()
    }

    fn addr(&self) -> ListenAddr {
        ListenAddr::Path(self.socket.clone())
    }

    fn args(&self, module: &Path, key: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("unix://{}", self.socket.display()),
            "--log-format".into(),
            "json".into(),
            "--backend".into(),
            "pkcs11".into(),
            "--pkcs11-module".into(),
            module.display().to_string(),
            "--pkcs11-token-label".into(),
            TOKEN.into(),
            "--pkcs11-key-label".into(),
            key.into(),
            "--pkcs11-pin-file".into(),
            self.pin_file.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        // The test's own idle client connections would otherwise hold SIGTERM up for the default 10 s.
        if !extra.contains(&"--shutdown-timeout") {
            args.extend(["--shutdown-timeout".into(), "2s".into()]);
        }
        args
    }

    /// Starts the plugin with this token's SoftHSM configuration and forwarding-module controls.
    fn spawn(&self, args: &[String]) -> Plugin {
        let log = self
            .dir()
            .join(format!("plugin-{}.log", rand::random::<u32>()));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(args)
            .env("SOFTHSM2_CONF", &self.token.conf)
            .env("KMS_TEST_FWD_MODULE", &self.softhsm)
            .env("KMS_TEST_FWD_DIR", self.control_dir())
            .env_remove("KMS_PLUGIN_LOG_LEVEL")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn kms-plugin");
        Plugin {
            child,
            addr: self.addr(),
            log,
        }
    }
}

/// Waits until Status answers and `pred` holds for its healthz; fails early if the plugin exits.
async fn wait_status(p: &mut Plugin, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    let mut last = None;
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            panic!(
                "plugin exited ({status}) while waiting; last Status {last:?}; log:\n{}",
                p.log_text()
            );
        }
        if let Ok(s) = try_status(&p.addr).await {
            if pred(&s.healthz) {
                return s.healthz;
            }
            last = Some(s.healthz);
        }
        assert!(
            Instant::now() < deadline,
            "Status not as expected within {limit:?}; last {last:?}; log:\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `cond` until it holds; fails naming `what`, with the plugin's log, after `limit`.
async fn wait_for(p: &Plugin, limit: Duration, what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}; log:\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One v2 Encrypt and Decrypt through the socket.
async fn round_trip(addr: &ListenAddr) {
    let mut c = v2_client(channel(addr).await);
    let plaintext = rand::random::<[u8; 32]>().to_vec();
    let e = c
        .encrypt(v2::EncryptRequest {
            plaintext: plaintext.clone(),
            uid: "pkcs11-serve".into(),
        })
        .await
        .expect("Encrypt")
        .into_inner();
    let d = c
        .decrypt(v2::DecryptRequest {
            ciphertext: e.ciphertext,
            uid: "pkcs11-serve".into(),
            key_id: e.key_id,
            annotations: e.annotations,
        })
        .await
        .expect("Decrypt")
        .into_inner();
    assert_eq!(d.plaintext, plaintext);
}

fn threads(p: &Plugin) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", p.child.id()))
        .unwrap()
        .count()
}

fn error_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(r#""level":"ERROR""#))
        .collect()
}

#[tokio::test]
async fn healthy_start_logs_no_error_and_a_duplicate_label_stops_start_up() {
    let Some(t) = Token::new(&[("kek-1", "01"), ("kek-dup", "02"), ("kek-dup", "03")]) else {
        return;
    };
    let mut p = t.spawn(&t.args(&t.softhsm, "kek-1", &[]));
    p.wait_healthy(Duration::from_secs(20)).await;
    round_trip(&p.addr).await;
    assert!(p.terminate().success());
    let log = p.log_text();
    assert!(log.contains("backend check passed"), "{log}");
    let errors = error_lines(&log);
    assert!(
        errors.is_empty(),
        "a healthy start logged at ERROR level:\n{}",
        errors.join("\n")
    );

    // A label on two keys: which one wraps would depend on the token's listing order.
    let mut p = t.spawn(&t.args(&t.softhsm, "kek-dup", &[]));
    let status = p.wait_exit(Duration::from_secs(20));
    let log = p.log_text();
    assert!(!status.success(), "started with a duplicate label:\n{log}");
    assert!(
        log.contains(r#"labelled \"kek-dup\" (CKA_ID 02, 03)"#) && log.contains("label of its own"),
        "{log}"
    );
}

#[tokio::test]
async fn a_login_dropped_behind_the_plugins_back_is_recovered_by_logging_in_again() {
    let Some(t) = Token::new(&[("kek-1", "01")]) else {
        return;
    };
    let module = t.forwarding_module();
    // Cheap probe (key search) every 100 ms, deep probe (wrap + unwrap) every 300 ms.
    let mut p = t.spawn(&t.args(
        &module,
        "kek-1",
        &[
            "--probe-interval",
            "100ms",
            "--deep-probe-interval",
            "300ms",
        ],
    ));
    p.wait_healthy(Duration::from_secs(20)).await;
    let key_id = try_status(&p.addr).await.unwrap().key_id;
    assert_eq!(t.count("C_Login"), 1);

    // Status is sampled throughout: recovery happens inside the probe's own call, so it never
    // reports anything but ok (on the old code the probe's empty search became "key revoked").
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let addr = p.addr.clone();
    let watcher = tokio::spawn(async move {
        let mut seen = Vec::new();
        while !*stop_rx.borrow() {
            let s = try_status(&addr).await.unwrap();
            if s.healthz != "ok" {
                seen.push(s.healthz);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = stop_rx.changed() => {}
            }
        }
        seen
    });
    // The probe's key search, the deep probe's wrap, and its unwrap.
    for (i, at) in ["C_FindObjectsInit", "C_EncryptInit", "C_DecryptInit"]
        .into_iter()
        .enumerate()
    {
        t.set(&format!("logout-at-{at}"), true);
        let limit = Duration::from_secs(10);
        wait_for(&p, limit, &format!("logout injected at {at}"), || {
            t.count("C_Logout(injected)") == i + 1
        })
        .await;
        wait_for(
            &p,
            limit,
            &format!("login again after the logout at {at}"),
            || t.count("C_Login") == i + 2,
        )
        .await;
    }
    round_trip(&p.addr).await;
    // A few more probes after the last re-login.
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop_tx.send(true).unwrap();
    let unhealthy = watcher.await.unwrap();
    assert!(
        unhealthy.is_empty(),
        "Status was not ok after a dropped login: {unhealthy:?}\n{}",
        p.log_text()
    );
    let status = try_status(&p.addr).await.unwrap();
    assert_eq!((status.healthz.as_str(), status.key_id), ("ok", key_id));
    assert_eq!(t.count("C_Login"), 4, "exactly one login per dropped login");
    let log = p.log_text();
    assert!(
        !log.contains("key was not found") && !log.contains("revoked"),
        "{log}"
    );
    assert!(p.terminate().success());
}

#[tokio::test]
async fn a_hung_token_ties_up_at_most_its_sessions_and_sigterm_still_exits() {
    let Some(t) = Token::new(&[("kek-1", "01")]) else {
        return;
    };
    let module = t.forwarding_module();
    let sessions = 2;
    let shutdown = Duration::from_secs(3);
    // --kek-max-uses 1: every Encrypt wraps a new local KEK, i.e. calls the token.
    let mut p = t.spawn(&t.args(
        &module,
        "kek-1",
        &[
            "--pkcs11-sessions",
            &sessions.to_string(),
            "--backend-timeout",
            "300ms",
            "--probe-interval",
            "100ms",
            "--kek-max-uses",
            "1",
            "--shutdown-timeout",
            "3s",
        ],
    ));
    p.wait_healthy(Duration::from_secs(20)).await;
    round_trip(&p.addr).await;
    let threads_before = threads(&p);

    // The token stops answering C_Encrypt, C_Decrypt and C_FindObjects.
    t.set("hang", true);
    let c = v2_client(channel(&p.addr).await);
    let mut calls = Vec::new();
    for i in 0..16u8 {
        let mut c = c.clone();
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let result = tokio::time::timeout(
                Duration::from_secs(10),
                c.encrypt(v2::EncryptRequest {
                    plaintext: vec![i; 32],
                    uid: format!("hung-{i}"),
                }),
            )
            .await
            .expect("an Encrypt on a hung token did not return within 10 s");
            (result.map(|_| ()), started.elapsed())
        }));
    }
    for call in calls {
        let (result, took) = call.await.unwrap();
        let code = result
            .expect_err("Encrypt succeeded on a hung token")
            .code();
        assert!(
            matches!(
                code,
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ),
            "{code:?}"
        );
        assert!(took < Duration::from_secs(3), "an Encrypt took {took:?}");
    }
    drop(c);
    // Probes keep failing meanwhile; none of it opens sessions or threads beyond the bound.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_ne!(try_status(&p.addr).await.unwrap().healthz, "ok");
    assert!(t.count("hang:C_Encrypt") + t.count("hang:C_FindObjects") >= 1);
    let opened = t.count("C_OpenSession");
    assert!(
        opened <= sessions,
        "{opened} sessions opened with --pkcs11-sessions {sessions}"
    );
    let now = threads(&p);
    assert!(
        now <= threads_before + sessions + 2,
        "{now} threads, {threads_before} before the token hung"
    );

    // The token answers again: the stuck calls return and the plugin is healthy by itself.
    t.set("hang", false);
    p.wait_healthy(Duration::from_secs(10)).await;
    round_trip(&p.addr).await;

    // Hung again, SIGTERM: the process exits within --shutdown-timeout all the same.
    let hung = t.count("hang:C_Encrypt") + t.count("hang:C_FindObjects");
    t.set("hang", true);
    wait_for(
        &p,
        Duration::from_secs(5),
        "a call into the hung token",
        || t.count("hang:C_Encrypt") + t.count("hang:C_FindObjects") > hung,
    )
    .await;
    let started = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = started + shutdown;
    let status = loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "no exit within --shutdown-timeout {shutdown:?} of SIGTERM; log:\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = started.elapsed();
    assert!(status.success(), "{status}: {}", p.log_text());
    assert!(took < shutdown, "exit took {took:?}");
    assert!(!t.socket.exists(), "socket left behind");
}

#[tokio::test]
async fn a_token_missing_at_start_up_is_waited_for() {
    let Some(t) = Token::new(&[("kek-1", "01")]) else {
        return;
    };
    let module = t.forwarding_module();
    // C_Initialize fails with CKR_DEVICE_ERROR, and once it works, no slot has a token.
    t.set("fail-init", true);
    t.set("no-token", true);
    let mut p = t.spawn(&t.args(&module, "kek-1", &["--probe-interval", "100ms"]));
    let healthz = wait_status(&mut p, Duration::from_secs(20), |h| h != "ok").await;
    assert!(healthz.contains("C_Initialize"), "{healthz}");

    t.set("fail-init", false);
    let healthz = wait_status(&mut p, Duration::from_secs(10), |h| {
        h.contains("no PKCS#11 token labelled")
    })
    .await;
    assert!(healthz.contains(r#""kms""#), "{healthz}");
    assert_eq!(t.count("C_Login"), 0);

    // The token appears: healthy without a restart.
    t.set("no-token", false);
    wait_status(&mut p, Duration::from_secs(10), |h| h == "ok").await;
    round_trip(&p.addr).await;
    assert_eq!(t.count("C_Login"), 1);
    assert!(p.terminate().success());
}
