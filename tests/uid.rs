//! Universal Identity for a whole control plane, through the real binary against the fake Akeyless
//! (TTL minutes shrunk to seconds): the generator commands make one child token per node, each
//! plugin rotates its own token for longer than the parent's TTL, a revoked node is refused while
//! the others keep working, and neither a lost rotation answer nor a crash between rotate, save and
//! ack loses the identity.
#![cfg(feature = "akeyless")]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kms_plugin::protocol::socket::ListenAddr;
use serde_json::{json, Value};
use support::akeyless_fake::{Fake, KEY};
use support::plugin::{try_status, Plugin, BIN};
use tokio::time::Instant;

/// Fake with one TTL minute = one second and access tokens of 3 s (so plugins log in often).
fn fake() -> Option<Fake> {
    Fake::start(&["--uid-minute-seconds", "1", "--token-ttl", "3"])
}

/// The generator machine: a parent token file and the `kms-plugin akeyless uid` commands.
struct Generator {
    dir: tempfile::TempDir,
    url: String,
}

impl Generator {
    async fn new(fake: &Fake, ttl_minutes: u64) -> Generator {
        let dir = tempfile::tempdir().unwrap();
        let root = fake
            .control(
                "uid-method",
                json!({"name": "/kms/generator", "ttl": ttl_minutes}),
            )
            .await;
        std::fs::write(dir.path().join("parent"), root["token"].as_str().unwrap()).unwrap();
        Generator {
            dir,
            url: fake.url.clone(),
        }
    }

    /// Runs `kms-plugin akeyless uid ARGS --output json`: exit code and the JSON answer.
    fn run(&self, args: &[&str]) -> (i32, Value) {
        let out = Command::new(BIN)
            .args(["akeyless", "uid"])
            .args(args)
            .arg("--uid-token-file")
            .arg(self.dir.path().join("parent"))
            .args(["--output", "json", "--akeyless-url", &self.url])
            .env_remove("KMS_PLUGIN_AKEYLESS_UID_TOKEN")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
            panic!(
                "not JSON: {stdout:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), value)
    }
}

/// One control-plane node: its bootstrap token file, state directory and plugin.
struct Node {
    dir: tempfile::TempDir,
    url: String,
    plugin: Option<Plugin>,
}

impl Node {
    fn new(url: &str) -> Node {
        Node {
            dir: tempfile::tempdir().unwrap(),
            url: url.to_string(),
            plugin: None,
        }
    }

    fn init_file(&self) -> PathBuf {
        self.dir.path().join("bootstrap-token")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn saved(&self) -> PathBuf {
        self.state().join("akeyless-uid-token")
    }

    fn saved_token(&self) -> String {
        std::fs::read_to_string(self.saved())
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    fn addr(&self) -> ListenAddr {
        ListenAddr::Path(self.dir.path().join("kms.sock"))
    }

    fn args(&self, extra: &[String]) -> Vec<String> {
        let mut a: Vec<String> = [
            "serve",
            "--listen",
            &format!("unix://{}", self.dir.path().join("kms.sock").display()),
            "--backend",
            "akeyless",
            "--akeyless-url",
            &self.url,
            "--akeyless-key-name",
            KEY,
            "--akeyless-access-type",
            "universal_identity",
            "--akeyless-uid-token-file",
            &self.init_file().display().to_string(),
            "--state-dir",
            &self.state().display().to_string(),
            "--probe-interval",
            "200ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend_from_slice(extra);
        a
    }

    async fn start(&mut self, extra: &[String]) {
        let p = Plugin::start(&self.args(extra), self.addr(), self.dir.path()).await;
        self.plugin = Some(p);
    }

    fn kill9(&mut self) {
        if let Some(mut p) = self.plugin.take() {
            p.kill9();
        }
    }

    async fn healthz(&self) -> String {
        match try_status(&self.addr()).await {
            Ok(s) => s.healthz,
            Err(e) => format!("no answer: {e}"),
        }
    }

    fn log(&self) -> String {
        self.plugin
            .as_ref()
            .map(|p| p.log_text())
            .unwrap_or_default()
    }
}

async fn valid(fake: &Fake, token: &str) -> bool {
    fake.control("uid-valid", json!({ "token": token })).await["valid"] == true
}

/// Polls `cond` (async) until true; false after `limit`.
async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    buf
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_outlive_the_parent_ttl_and_a_revoked_node_is_refused() {
    let Some(fake) = fake() else { return };
    // Parent: 6 s, kept alive by `renew`; children: 4 s, rotated by their plugins.
    let generator = Generator::new(&fake, 6).await;
    let mut nodes: Vec<Node> = (0..3).map(|_| Node::new(&fake.url)).collect();
    for (i, node) in nodes.iter().enumerate() {
        let name = format!("cp-{i}");
        let out = node.init_file().display().to_string();
        let args = [
            "create-child",
            "--node",
            &name,
            "--ttl",
            "4m",
            "--out",
            &out,
        ];
        let (code, created) = generator.run(&args);
        assert_eq!(code, 0, "{created}");
        assert_eq!(created["created"], true);
        assert_eq!(created["ttl_minutes"], 4);
        assert_eq!(mode(&node.init_file()), 0o600);
        // Idempotent: a second run keeps the token in the file.
        let (code, again) = generator.run(&args);
        assert_eq!((code, &again["created"]), (0, &json!(false)), "{again}");
        assert_eq!(again["token_id"], created["token_id"]);
    }
    let (code, listed) = generator.run(&["list"]);
    assert_eq!(code, 0);
    let children = listed["children"].as_array().unwrap();
    assert_eq!(children.len(), 3, "{listed}");
    assert!(children
        .iter()
        .all(|c| c["state"] == "active" && c["ttl_minutes"] == 4 && c["deny_inheritance"] == true));

    let http = format!("127.0.0.1:{}", support::external::free_port());
    for (i, node) in nodes.iter_mut().enumerate() {
        let extra = if i == 0 {
            vec!["--http".to_string(), http.clone()]
        } else {
            vec![]
        };
        node.start(&extra).await;
    }
    let inits: Vec<String> = nodes
        .iter()
        .map(|n| {
            std::fs::read_to_string(n.init_file())
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();

    // 14 s: more than twice the parent's TTL and three times the children's.
    let until = Instant::now() + Duration::from_secs(14);
    let mut seen: Vec<Vec<String>> = vec![Vec::new(); 3];
    let mut last_renew = Instant::now();
    while Instant::now() < until {
        for (i, node) in nodes.iter().enumerate() {
            let h = node.healthz().await;
            assert_eq!(h, "ok", "node {i}: {h}\n{}", node.log());
            let t = node.saved_token();
            if !seen[i].contains(&t) {
                seen[i].push(t);
            }
        }
        if last_renew.elapsed() > Duration::from_secs(2) {
            let (code, r) = generator.run(&["renew"]);
            assert_eq!((code, &r["rotated"]), (0, &json!(true)), "{r}");
            last_renew = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (i, node) in nodes.iter().enumerate() {
        assert!(
            seen[i].len() >= 4,
            "node {i} rotated only {:?} times",
            seen[i].len()
        );
        assert!(valid(&fake, &node.saved_token()).await, "node {i}");
        assert!(
            !valid(&fake, &inits[i]).await,
            "the bootstrap token is rotated away"
        );
        assert!(!node.state().join("akeyless-uid-token.previous").exists());
    }
    let metrics = http_get(&http, "/metrics");
    let left = metric(
        &metrics,
        "kms_plugin_identity_token_expiry_seconds{backend=\"akeyless\"}",
    )
    .unwrap_or_else(|| panic!("no expiry gauge:\n{metrics}"));
    assert!(left > 0.0 && left <= 4.0, "{left}");

    // Node loss: revoke cp-1. Its plugin is refused; the others carry on past another child TTL.
    let (code, r) = generator.run(&["revoke", "--node", "cp-1"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["revoked"].as_array().unwrap().len(), 1);
    let (code, r) = generator.run(&["revoke", "--node", "cp-1"]);
    assert_eq!((code, r["revoked"].as_array().unwrap().len()), (0, 0));
    let refused = eventually(Duration::from_secs(10), || async {
        nodes[1].healthz().await.contains("authentication")
    })
    .await;
    assert!(refused, "revoked node: {}", nodes[1].healthz().await);
    assert_eq!(generator.run(&["renew"]).0, 0, "parent kept alive");
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        for i in [0, 2] {
            assert_eq!(nodes[i].healthz().await, "ok", "{}", nodes[i].log());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(generator.run(&["renew"]).0, 0, "parent kept alive");
    let (code, listed) = generator.run(&["list"]);
    assert_eq!(code, 0);
    let states: Vec<(String, String)> = listed["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["node"].as_str().unwrap().to_string(),
                c["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        states.contains(&("cp-1".into(), "revoked".into())),
        "{states:?}"
    );
    assert!(
        states.contains(&("cp-0".into(), "active".into())),
        "{states:?}"
    );

    // A parent left to expire is refused with exit code 3 and says how to recover.
    fake.control("uid-clock", json!({"advance": 3600})).await;
    let (code, r) = generator.run(&["renew"]);
    assert_eq!(code, 3, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("uid-generate-token"),
        "{r}"
    );
    assert_eq!(generator.run(&["list"]).0, 3);

    // Secrets never reach a log or the generator's output.
    let (_, listed_text) = generator.run(&["list"]);
    for (i, node) in nodes.iter().enumerate() {
        let log = node.log();
        for t in seen[i].iter().chain([&inits[i]]) {
            assert!(!log.contains(t.as_str()), "node {i} logged a UID token");
            assert!(!listed_text.to_string().contains(t.as_str()));
        }
    }
}

#[tokio::test]
async fn a_lost_rotation_answer_keeps_the_identity() {
    let Some(fake) = fake() else { return };
    let generator = Generator::new(&fake, 60).await;
    let mut node = Node::new(&fake.url);
    let out = node.init_file().display().to_string();
    let (code, r) = generator.run(&[
        "create-child",
        "--node",
        "cp-0",
        "--ttl",
        "4m",
        "--out",
        &out,
    ]);
    assert_eq!(code, 0, "{r}");
    node.start(&[]).await;
    assert!(eventually(Duration::from_secs(10), || async { node.saved().exists() }).await);
    let before = node.saved_token();

    // The next rotation is applied by the server, but its answer never arrives.
    fake.control("drop", json!({"command": "uid-rotate-token", "count": 1}))
        .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            fake.calls("dropped:uid-rotate-token").await == 1
        })
        .await
    );
    // A later rotation succeeds, the plugin never lost its identity, and a restart keeps it.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let t = node.saved_token();
            t != before && valid(&fake, &t).await
        })
        .await,
        "{}",
        node.log()
    );
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert_eq!(node.healthz().await, "ok", "{}", node.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    node.kill9();
    node.start(&[]).await;
    assert_eq!(node.healthz().await, "ok");
    assert!(valid(&fake, &node.saved_token()).await);
}

#[tokio::test]
async fn a_crash_between_rotate_save_and_ack_keeps_the_identity() {
    let Some(fake) = fake() else { return };
    let generator = Generator::new(&fake, 60).await;
    let mut node = Node::new(&fake.url);
    let out = node.init_file().display().to_string();
    let (code, r) = generator.run(&[
        "create-child",
        "--node",
        "cp-0",
        "--ttl",
        "6m",
        "--out",
        &out,
    ]);
    assert_eq!(code, 0, "{r}");
    node.start(&[]).await;
    assert!(eventually(Duration::from_secs(10), || async { node.saved().exists() }).await);
    let previous = node.state().join("akeyless-uid-token.previous");

    // 1. Crash after the server rotated, before the answer reached the plugin (nothing saved).
    let saved = node.saved_token();
    fake.control("stall", json!({"phase": "rotate", "seconds": 30}))
        .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            fake.calls("stalled:rotate").await == 1
        })
        .await
    );
    // A hung rotation does not hold up logins (access tokens live 3 s here): Status stays ok.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert_eq!(node.healthz().await, "ok", "{}", node.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    node.kill9();
    assert_eq!(node.saved_token(), saved, "nothing saved before the answer");
    assert!(
        valid(&fake, &saved).await,
        "unacknowledged: the old token lives"
    );
    node.start(&[]).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            let t = node.saved_token();
            t != saved && valid(&fake, &t).await
        })
        .await,
        "{}",
        node.log()
    );

    // 2. Crash after saving the new token, before the ack reached the server.
    // Every ack attempt stalls (the client retries an ack: it is idempotent).
    fake.control(
        "stall",
        json!({"phase": "ack", "seconds": 30, "count": 1000}),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            fake.calls("stalled:ack").await >= 1
        })
        .await
    );
    node.kill9();
    fake.control("uid-clear-faults", json!({})).await;
    let (old, new) = (
        std::fs::read_to_string(&previous)
            .unwrap()
            .trim()
            .to_string(),
        node.saved_token(),
    );
    assert_ne!(old, new);
    assert!(valid(&fake, &old).await && valid(&fake, &new).await);
    node.start(&[]).await;
    // Start-up finishes the interrupted rotation: the old token is retired, the new one works.
    assert!(
        eventually(Duration::from_secs(5), || async {
            !previous.exists() && !valid(&fake, &old).await
        })
        .await,
        "{}",
        node.log()
    );
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        assert_eq!(node.healthz().await, "ok", "{}", node.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(valid(&fake, &node.saved_token()).await);
    assert_eq!(mode(&node.saved()), 0o600);
}

#[tokio::test]
async fn status_warns_before_expiry_while_rotation_keeps_failing() {
    let Some(fake) = fake() else { return };
    let generator = Generator::new(&fake, 60).await;
    let mut node = Node::new(&fake.url);
    let out = node.init_file().display().to_string();
    let (code, r) = generator.run(&[
        "create-child",
        "--node",
        "cp-0",
        "--ttl",
        "9m",
        "--out",
        &out,
    ]);
    assert_eq!(code, 0, "{r}");
    node.start(&[]).await;
    assert!(eventually(Duration::from_secs(10), || async { node.saved().exists() }).await);
    fake.control(
        "fail",
        json!({"command": "uid-rotate-token", "status": 503, "count": 100000}),
    )
    .await;
    // Alerted with under a third of the TTL left, while the token still works.
    assert!(
        eventually(Duration::from_secs(12), || async {
            node.healthz().await.contains("rotation keeps failing")
        })
        .await,
        "{}",
        node.log()
    );
    let h = node.healthz().await;
    assert!(
        h.contains("expires in") && h.contains("create-child"),
        "{h}"
    );
    assert!(!h.contains(&node.saved_token()));
    // The cause goes away: the next retry rotates and Status recovers before expiry.
    fake.control("clear-faults", json!({})).await;
    assert!(
        eventually(Duration::from_secs(4), || async {
            node.healthz().await == "ok"
        })
        .await,
        "{}",
        node.log()
    );
    assert!(valid(&fake, &node.saved_token()).await);
}

#[tokio::test]
async fn generator_commands_are_idempotent_and_scriptable() {
    let Some(fake) = fake() else { return };
    let generator = Generator::new(&fake, 60).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cp-0.token");
    let out_s = out.display().to_string();
    let create = ["create-child", "--node", "cp-0", "--out", &out_s];
    let (code, first) = generator.run(&create);
    assert_eq!(code, 0, "{first}");
    let first_token = std::fs::read_to_string(&out).unwrap().trim().to_string();
    assert!(
        !first.to_string().contains(&first_token),
        "token only in the file"
    );

    // The file lost: a conflict (exit 4) until --replace, which revokes the old token.
    std::fs::remove_file(&out).unwrap();
    let (code, r) = generator.run(&create);
    assert_eq!(code, 4, "{r}");
    assert!(r["error"].as_str().unwrap().contains("--replace"));
    let mut replace = create.to_vec();
    replace.push("--replace");
    let (code, r) = generator.run(&replace);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["replaced"], json!([first["token_id"]]));
    assert!(!valid(&fake, &first_token).await);
    assert!(valid(&fake, std::fs::read_to_string(&out).unwrap().trim()).await);

    // --stdout prints the token and nothing else in text mode.
    let o = Command::new(BIN)
        .args([
            "akeyless",
            "uid",
            "create-child",
            "--node",
            "cp-9",
            "--stdout",
        ])
        .arg("--uid-token-file")
        .arg(generator.dir.path().join("parent"))
        .args(["--akeyless-url", &generator.url])
        .output()
        .unwrap();
    assert!(o.status.success());
    let printed = String::from_utf8(o.stdout).unwrap();
    assert!(printed.trim().starts_with("u-") && printed.trim().lines().count() == 1);
    assert!(valid(&fake, printed.trim()).await);
    assert!(!String::from_utf8_lossy(&o.stderr).contains(printed.trim()));

    // A bare TTL is minutes, the API's unit.
    let out7 = dir.path().join("cp-7.token").display().to_string();
    let (code, r) = generator.run(&[
        "create-child",
        "--node",
        "cp-7",
        "--ttl",
        "5",
        "--out",
        &out7,
    ]);
    assert_eq!((code, &r["ttl_minutes"]), (0, &json!(5)), "{r}");

    // Usage errors (2), unknown ids (4), the parent only from a file or the environment.
    assert_eq!(
        generator
            .run(&["create-child", "--node", "bad name", "--out", &out_s])
            .0,
        2
    );
    assert_eq!(generator.run(&["revoke", "--token-id", "uid-nope"]).0, 4);
    let o = Command::new(BIN)
        .args([
            "akeyless",
            "uid",
            "list",
            "--output",
            "json",
            "--akeyless-url",
            &generator.url,
        ])
        .env_remove("KMS_PLUGIN_AKEYLESS_UID_TOKEN")
        .env_remove("KMS_PLUGIN_AKEYLESS_UID_TOKEN_FILE")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let parent = std::fs::read_to_string(generator.dir.path().join("parent")).unwrap();
    let o = Command::new(BIN)
        .args([
            "akeyless",
            "uid",
            "list",
            "--output",
            "json",
            "--akeyless-url",
            &generator.url,
        ])
        .env("KMS_PLUGIN_AKEYLESS_UID_TOKEN", parent.trim())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed["children"].as_array().unwrap().len(), 4);

    // revoke --all: every child, the parent stays; a second run has nothing to do.
    let (code, r) = generator.run(&["revoke", "--all"]);
    assert_eq!(
        (code, r["revoked"].as_array().unwrap().len()),
        (0, 3),
        "{r}"
    );
    let (code, r) = generator.run(&["revoke", "--all"]);
    assert_eq!(
        (code, r["revoked"].as_array().unwrap().len()),
        (0, 0),
        "{r}"
    );
    assert!(valid(&fake, parent.trim()).await);
}

#[tokio::test]
async fn a_server_without_two_phase_rotation_still_works() {
    let Some(fake) = fake() else { return };
    // Ignores with-manual-ack (rotates at once) and treats an ack as a rotation of a dead token.
    fake.control("uid-manual-ack", json!({"supported": false}))
        .await;
    let generator = Generator::new(&fake, 60).await;
    let mut node = Node::new(&fake.url);
    let out = node.init_file().display().to_string();
    let (code, r) = generator.run(&[
        "create-child",
        "--node",
        "cp-0",
        "--ttl",
        "4m",
        "--out",
        &out,
    ]);
    assert_eq!(code, 0, "{r}");
    node.start(&[]).await;
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        assert_eq!(node.healthz().await, "ok", "{}", node.log());
        let t = node.saved_token();
        if !t.is_empty() && !seen.contains(&t) {
            seen.push(t);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        seen.len() >= 3,
        "rotated {} times\n{}",
        seen.len(),
        node.log()
    );
    assert!(valid(&fake, &node.saved_token()).await);
    assert!(!node.state().join("akeyless-uid-token.previous").exists());
    node.kill9();
    node.start(&[]).await;
    assert!(valid(&fake, &node.saved_token()).await);
}
