//! The acceptance checks on the real binary with the Akeyless backend against the fake
//! Akeyless API, at a 1 s probe interval: a 503 outage keeps cached Decrypts at 0 failures and turns
//! Status unhealthy and back; disabling the key (or denying access) stops Decrypts within 5 s;
//! re-enabling restores service without a restart. A proxy in front of Akeyless answering 404/403
//! with an HTML page or an empty body is an outage, not a revocation. A private-CA HTTPS fake is
//! reached with --akeyless-ca-file or SSL_CERT_FILE and refused without either; a transient failure
//! at start-up leaves the process up and unhealthy until Akeyless is back; slow logins succeed.
#![cfg(feature = "akeyless")]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use kms_plugin::proto::{v1beta1, v2};
use kms_plugin::protocol::socket::ListenAddr;
use serde_json::json;
use support::akeyless_fake::{make_certs, Fake, ACCESS_ID, ACCESS_KEY, KEY};
use support::plugin::{channel, try_status, v1_client, v2_client, Plugin};
use tonic::transport::Channel;
use tonic::Code;

const PROBE: Duration = Duration::from_secs(1);
/// --akeyless-timeout: one backend operation including its retries.
const AKEYLESS_BUDGET: Duration = Duration::from_millis(2500);

fn serve_args(url: &str, dir: &Path, extra: &[&str]) -> (Vec<String>, ListenAddr) {
    let key_file = dir.join("access-key");
    std::fs::write(&key_file, ACCESS_KEY).unwrap();
    let socket = dir.join("kms.sock");
    let mut args: Vec<String> = [
        "serve",
        "--backend",
        "akeyless",
        "--listen",
        &format!("unix://{}", socket.display()),
        "--akeyless-url",
        url,
        "--akeyless-access-id",
        ACCESS_ID,
        "--akeyless-key-name",
        KEY,
        "--akeyless-access-key-file",
        &key_file.display().to_string(),
        "--probe-interval",
        "1s",
        "--data-dir",
        &dir.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    (args, ListenAddr::Path(socket))
}

async fn start(fake: &Fake, dir: &Path) -> (Plugin, ListenAddr) {
    let (args, addr) = serve_args(&fake.url, dir, &[]);
    let p = Plugin::start(&args, addr.clone(), dir).await;
    (p, addr)
}

enum Sample {
    V2(v2::EncryptResponse, Vec<u8>),
    V1(Vec<u8>, Vec<u8>),
}

async fn samples(ch: &Channel) -> Vec<Sample> {
    let mut out = Vec::new();
    for i in 0..8u8 {
        let pt = vec![i; 32];
        let r = v2_client(ch.clone())
            .encrypt(v2::EncryptRequest {
                plaintext: pt.clone(),
                uid: format!("prime-{i}"),
            })
            .await
            .unwrap()
            .into_inner();
        out.push(Sample::V2(r, pt));
        let pt = vec![i + 100; 32];
        let r = v1_client(ch.clone())
            .encrypt(v1beta1::EncryptRequest {
                version: "v1beta1".into(),
                plain: pt.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        out.push(Sample::V1(r.cipher, pt));
    }
    out
}

async fn decrypt(ch: &Channel, s: &Sample) -> Result<(), tonic::Status> {
    let req_v2 = |r: &v2::EncryptResponse| {
        let mut q = tonic::Request::new(v2::DecryptRequest {
            ciphertext: r.ciphertext.clone(),
            uid: "fault".into(),
            key_id: r.key_id.clone(),
            annotations: r.annotations.clone(),
        });
        q.set_timeout(Duration::from_secs(3));
        q
    };
    match s {
        Sample::V2(r, pt) => {
            let got = v2_client(ch.clone())
                .decrypt(req_v2(r))
                .await?
                .into_inner()
                .plaintext;
            assert_eq!(&got, pt);
        }
        Sample::V1(c, pt) => {
            let mut q = tonic::Request::new(v1beta1::DecryptRequest {
                version: "v1beta1".into(),
                cipher: c.clone(),
            });
            q.set_timeout(Duration::from_secs(3));
            let got = v1_client(ch.clone()).decrypt(q).await?.into_inner().plain;
            assert_eq!(&got, pt);
        }
    }
    Ok(())
}

async fn status(ch: &Channel) -> v2::StatusResponse {
    v2_client(ch.clone())
        .status(v2::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn akeyless_503_outage_keeps_cached_decrypts_and_status_recovers() {
    let Some(fake) = Fake::start(&[]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (mut p, addr) = start(&fake, dir.path()).await;
    let ch = channel(&addr).await;
    let known = samples(&ch).await;
    for s in &known {
        decrypt(&ch, s).await.unwrap();
    }
    let key_id = status(&ch).await.key_id;

    fake.control(
        "fail",
        json!({"command": "*", "status": 503, "count": 1_000_000}),
    )
    .await;
    let outage = Instant::now();
    let (mut ok, mut failed, mut encrypts) = (0u64, Vec::new(), 0u64);
    let mut unhealthy_after = None;
    // The compressed "minute": 6 s of outage under continuous load.
    while outage.elapsed() < Duration::from_secs(6) {
        for s in &known {
            match decrypt(&ch, s).await {
                Ok(()) => ok += 1,
                Err(e) => failed.push(format!("{:?} {}", e.code(), e.message())),
            }
        }
        // Encrypt keeps working with the current local KEK.
        match v2_client(ch.clone())
            .encrypt(v2::EncryptRequest {
                plaintext: vec![9; 32],
                uid: "during".into(),
            })
            .await
        {
            Ok(_) => encrypts += 1,
            Err(e) => failed.push(format!("encrypt {:?} {}", e.code(), e.message())),
        }
        let st = status(&ch).await;
        if st.healthz != "ok" && unhealthy_after.is_none() {
            assert_eq!(st.key_id, key_id, "key_id kept during the outage");
            unhealthy_after = Some(outage.elapsed());
        }
    }
    assert!(
        failed.is_empty(),
        "{} failures during the outage, first: {:?}",
        failed.len(),
        failed.first()
    );
    let unhealthy_after = unhealthy_after.expect("Status never turned unhealthy during the outage");
    assert!(
        unhealthy_after <= PROBE + AKEYLESS_BUDGET + Duration::from_secs(1),
        "unhealthy only after {unhealthy_after:?}"
    );
    assert!(
        fake.calls("injected:describe-item").await > 0 || fake.calls("injected:auth").await > 0
    );

    fake.control("clear-faults", json!({})).await;
    let healed = Instant::now();
    while status(&ch).await.healthz != "ok" {
        assert!(
            healed.elapsed() < PROBE * 3 + AKEYLESS_BUDGET,
            "Status not ok again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered_after = healed.elapsed();
    assert!(p.child.try_wait().unwrap().is_none(), "no restart");
    eprintln!(
        "akeyless 503 outage (probe 1 s): {ok} cached Decrypts and {encrypts} Encrypts, 0 failures; \
         Status unhealthy after {unhealthy_after:?}, ok {recovered_after:?} after the fake recovered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_or_denied_key_stops_decrypts_within_5s_and_recovers_without_restart() {
    let Some(fake) = Fake::start(&[]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (mut p, addr) = start(&fake, dir.path()).await;
    let ch = channel(&addr).await;
    let known = samples(&ch).await;
    for s in &known {
        decrypt(&ch, s).await.unwrap();
    }
    for (off, on, code) in [
        ("disable", "enable", Code::FailedPrecondition),
        ("deny", "allow", Code::PermissionDenied),
    ] {
        fake.control("key", json!({"name": KEY, "action": off}))
            .await;
        let t = Instant::now();
        let err = loop {
            // Cached data: only the revocation can stop these.
            match decrypt(&ch, &known[0]).await {
                Ok(()) => {
                    assert!(
                        t.elapsed() < Duration::from_secs(5),
                        "{off}: Decrypts still succeed after {:?}",
                        t.elapsed()
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => break e,
            }
        };
        let stopped_after = t.elapsed();
        assert!(
            err.code() == code || err.code() == Code::FailedPrecondition,
            "{off}: {err:?}"
        );
        for s in &known {
            assert!(decrypt(&ch, s).await.is_err(), "{off}: a Decrypt succeeded");
        }
        let st = status(&ch).await;
        assert!(st.healthz.starts_with("key revoked"), "{off}: {st:?}");

        fake.control("key", json!({"name": KEY, "action": on}))
            .await;
        let t = Instant::now();
        while decrypt(&ch, &known[1]).await.is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{on}: Decrypts not restored"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let restored_after = t.elapsed();
        for s in &known {
            decrypt(&ch, s).await.unwrap();
        }
        assert_eq!(status(&ch).await.healthz, "ok");
        assert!(p.child.try_wait().unwrap().is_none(), "no restart");
        eprintln!(
            "akeyless {off} (probe 1 s): Decrypts refused after {stopped_after:?} ({:?}); {on}: restored after {restored_after:?}",
            err.code()
        );
    }
}

/// Waits (bounded) until Status answers and `cond` holds for it.
async fn wait_status(
    addr: &ListenAddr,
    limit: Duration,
    what: &str,
    p: &Plugin,
    cond: impl Fn(&v2::StatusResponse) -> bool,
) -> v2::StatusResponse {
    let t = Instant::now();
    loop {
        if let Ok(st) = try_status(addr).await {
            if cond(&st) {
                return st;
            }
        }
        assert!(
            t.elapsed() < limit,
            "{what} not seen within {limit:?}; log:\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_404_and_403_with_html_or_empty_bodies_are_an_outage_not_a_revocation() {
    let Some(fake) = Fake::start(&[]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (mut p, addr) = start(&fake, dir.path()).await;
    let ch = channel(&addr).await;
    let known = samples(&ch).await;
    for s in &known {
        decrypt(&ch, s).await.unwrap();
    }
    let key_id = status(&ch).await.key_id;
    let html = "<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>item not found, key is disabled, access denied</body></html>";
    for (status_code, body, content_type) in [
        (404, html, "text/html"),
        (403, "", "text/plain"),
        (404, "", "text/plain"),
        (
            403,
            "<html><body><h1>403 Forbidden</h1></body></html>",
            "text/html",
        ),
    ] {
        fake.control(
            "fail",
            json!({"command": "*", "status": status_code, "count": -1, "body": body, "content_type": content_type}),
        )
        .await;
        let t = Instant::now();
        let (mut ok, mut failed, mut unhealthy) = (0u64, Vec::new(), None);
        // Two probe intervals and then some: long enough for the engine to see the answers.
        while t.elapsed() < PROBE * 3 || unhealthy.is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{status_code}: Status never unhealthy"
            );
            for s in &known {
                match decrypt(&ch, s).await {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(format!("{:?} {}", e.code(), e.message())),
                }
            }
            let st = status(&ch).await;
            if st.healthz != "ok" {
                assert!(
                    !st.healthz.contains("revoked"),
                    "{status_code} {body:?}: {st:?}"
                );
                assert_eq!(st.key_id, key_id);
                unhealthy.get_or_insert(st.healthz);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            failed.is_empty(),
            "{status_code} {body:?}: {} cached Decrypts failed, first {:?}",
            failed.len(),
            failed.first()
        );
        assert!(fake.calls("injected:describe-item").await > 0);
        fake.control("clear-faults", json!({})).await;
        wait_status(
            &addr,
            PROBE * 3 + AKEYLESS_BUDGET * 2,
            "healthy again",
            &p,
            |st| st.healthz == "ok",
        )
        .await;
        for s in &known {
            decrypt(&ch, s).await.unwrap();
        }
        assert!(p.child.try_wait().unwrap().is_none(), "no restart");
        eprintln!(
            "proxy {status_code} {content_type} ({} bytes): {ok} cached Decrypts, 0 failed; Status {:?}; recovered by itself",
            body.len(),
            unhealthy.unwrap()
        );
    }
    let log = p.log_text();
    assert!(
        log.contains("not an Akeyless answer"),
        "the log names the cause"
    );
    p.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_ca_gateway_is_reached_with_ca_file_or_ssl_cert_file_and_refused_without() {
    let tls = tempfile::tempdir().unwrap();
    if !make_certs(tls.path()) {
        return;
    }
    let Some(fake) = Fake::start_tls(tls.path(), &[]) else {
        return;
    };
    assert!(fake.url.starts_with("https://127.0.0.1:"));
    let ca = tls.path().join("ca.pem").display().to_string();

    let dir = tempfile::tempdir().unwrap();
    let (args, addr) = serve_args(&fake.url, dir.path(), &["--akeyless-ca-file", &ca]);
    let mut p = Plugin::start(&args, addr, dir.path()).await;
    p.terminate();

    let dir = tempfile::tempdir().unwrap();
    let (args, addr) = serve_args(&fake.url, dir.path(), &[]);
    let p = Plugin::spawn_with_env(&args, &[("SSL_CERT_FILE", &ca)], addr, dir.path());
    p.wait_healthy(Duration::from_secs(20)).await;
    drop(p);

    // Neither: start-up stops, naming the options that fix it.
    let dir = tempfile::tempdir().unwrap();
    let (args, addr) = serve_args(&fake.url, dir.path(), &[]);
    let mut p = Plugin::spawn_with_env(
        &args,
        &[("SSL_CERT_FILE", ""), ("SSL_CERT_DIR", "")],
        addr,
        dir.path(),
    );
    let st = p.wait_exit(Duration::from_secs(20));
    assert!(!st.success());
    let log = p.log_text();
    assert!(
        log.contains("not trusted")
            && log.contains("--akeyless-ca-file")
            && log.contains("SSL_CERT_FILE"),
        "{log}"
    );
    assert!(!log.contains(ACCESS_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failure_at_start_up_keeps_the_process_up_until_akeyless_is_back() {
    // 1. Nothing listens yet at the Akeyless URL.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let (args, addr) = serve_args(&format!("http://127.0.0.1:{port}"), dir.path(), &[]);
    let mut p = Plugin::spawn(&args, addr.clone(), dir.path());
    let st = wait_status(
        &addr,
        Duration::from_secs(30),
        "an unhealthy Status",
        &p,
        |st| st.healthz != "ok",
    )
    .await;
    eprintln!("start-up with Akeyless away: Status {:?}", st.healthz);
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "the process stays up"
    );
    let port_s = port.to_string();
    let Some(fake) = Fake::start(&["--port", &port_s]) else {
        return;
    };
    let t = Instant::now();
    wait_status(
        &addr,
        Duration::from_secs(20),
        "healthy once Akeyless is back",
        &p,
        |st| st.healthz == "ok",
    )
    .await;
    eprintln!("healthy {:?} after the fake came up", t.elapsed());
    let ch = channel(&addr).await;
    for s in &samples(&ch).await {
        decrypt(&ch, s).await.unwrap();
    }
    p.terminate();

    // 2. Akeyless answers 503 (its own error) to everything, then recovers.
    fake.control("fail", json!({"command": "*", "status": 503, "count": -1}))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let (args, addr) = serve_args(&fake.url, dir.path(), &[]);
    let p = Plugin::spawn(&args, addr.clone(), dir.path());
    wait_status(
        &addr,
        Duration::from_secs(40),
        "an unhealthy Status",
        &p,
        |st| st.healthz != "ok",
    )
    .await;
    fake.control("clear-faults", json!({})).await;
    wait_status(
        &addr,
        Duration::from_secs(20),
        "healthy after the 503s stop",
        &p,
        |st| st.healthz == "ok",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_logins_at_start_up_succeed() {
    let Some(fake) = Fake::start(&[]) else { return };
    // Every login takes 3.5 s (a cloud login where Akeyless asks the cloud provider): longer than
    // the whole 2.5 s request budget.
    fake.control(
        "latency",
        json!({"command": "auth", "seconds": 3.5, "count": -1}),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (args, addr) = serve_args(&fake.url, dir.path(), &[]);
    let t = Instant::now();
    let p = Plugin::start(&args, addr.clone(), dir.path()).await;
    eprintln!(
        "start-up with 3.5 s logins: healthy after {:?}",
        t.elapsed()
    );
    assert_eq!(
        fake.calls("auth").await,
        1,
        "one login, not retried after a cut-off"
    );
    let ch = channel(&addr).await;
    for s in &samples(&ch).await {
        decrypt(&ch, s).await.unwrap();
    }
    assert!(
        !p.log_text().contains("did not answer within"),
        "no login timed out"
    );
}
