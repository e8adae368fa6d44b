//! The real binary on a real socket: conformance for v2 and v1beta1, bad input, concurrency,
//! restarts, stale sockets, second instances and shutdown.
mod support;

use std::time::Duration;

use kms_plugin::proto::{v1beta1, v2};
use support::plugin::{channel, v1_client, v2_client, Plugin, Setup, BIN};
use tonic::Code;

fn dek(i: u32) -> Vec<u8> {
    let mut d = vec![0x5Au8; 32];
    d[..4].copy_from_slice(&i.to_be_bytes());
    d
}

#[tokio::test]
async fn v2_conformance_and_bad_input() {
    let s = Setup::new();
    let _p = Plugin::start(&s.args(), s.addr(), s.dir.path()).await;
    let mut c = v2_client(channel(&s.addr()).await);

    let status = c.status(v2::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.version, "v2");
    assert_eq!(status.healthz, "ok");
    assert!(status.key_id.starts_with("local:") && status.key_id.len() <= 1024);

    let enc = c
        .encrypt(v2::EncryptRequest {
            plaintext: dek(1),
            uid: "uid-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        enc.key_id, status.key_id,
        "Encrypt key_id equals Status key_id"
    );
    assert!(!enc.ciphertext.is_empty() && enc.ciphertext.len() <= 1024);
    for k in enc.annotations.keys() {
        assert!(
            k.contains('.')
                && k.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        );
    }
    let dec = c
        .decrypt(v2::DecryptRequest {
            ciphertext: enc.ciphertext.clone(),
            uid: "uid-2".into(),
            key_id: enc.key_id.clone(),
            annotations: enc.annotations.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dec.plaintext, dek(1));

    let mut tampered = enc.ciphertext.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let random: Vec<u8> = (0..200).map(|_| rand::random::<u8>()).collect();
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        ("tampered", tampered, enc.key_id.clone()),
        ("random", random, enc.key_id.clone()),
        ("empty", Vec::new(), enc.key_id.clone()),
        ("4 MiB", vec![0u8; 4 << 20], enc.key_id.clone()),
        (
            "wrong key_id",
            enc.ciphertext.clone(),
            "local:not-the-key".into(),
        ),
        ("empty key_id", enc.ciphertext.clone(), String::new()),
    ];
    for (name, ciphertext, key_id) in cases {
        let err = c
            .decrypt(v2::DecryptRequest {
                ciphertext,
                uid: "bad".into(),
                key_id,
                annotations: Default::default(),
            })
            .await
            .expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(!err.message().is_empty());
    }
    // Still serving after all that.
    let again = c
        .decrypt(v2::DecryptRequest {
            ciphertext: enc.ciphertext,
            uid: "u".into(),
            key_id: enc.key_id,
            annotations: Default::default(),
        })
        .await
        .unwrap();
    assert_eq!(again.into_inner().plaintext, dek(1));
    let err = c
        .encrypt(v2::EncryptRequest {
            plaintext: vec![],
            uid: "u".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn v1_conformance_including_ping() {
    let s = Setup::new();
    let _p = Plugin::start(&s.args(), s.addr(), s.dir.path()).await;
    let mut c = v1_client(channel(&s.addr()).await);
    let v = c
        .version(v1beta1::VersionRequest {
            version: "v1beta1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.version, "v1beta1");
    assert_eq!(v.runtime_name, "kms-plugin");
    assert_eq!(
        v.runtime_version.split('.').count(),
        3,
        "semver: {}",
        v.runtime_version
    );
    for plain in [b"ping".to_vec(), dek(7), vec![3u8; 1000]] {
        let cipher = c
            .encrypt(v1beta1::EncryptRequest {
                version: "v1beta1".into(),
                plain: plain.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .cipher;
        let back = c
            .decrypt(v1beta1::DecryptRequest {
                version: "v1beta1".into(),
                cipher,
            })
            .await
            .unwrap()
            .into_inner()
            .plain;
        assert_eq!(back, plain);
    }
    for cipher in [Vec::new(), vec![1u8; 100], vec![0u8; 4 << 20]] {
        let err = c
            .decrypt(v1beta1::DecryptRequest {
                version: "v1beta1".into(),
                cipher,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    let err = c
        .encrypt(v1beta1::EncryptRequest {
            version: "v9".into(),
            plain: b"x".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn concurrent_round_trips_on_both_apis() {
    let s = Setup::new();
    let _p = Plugin::start(&s.args(), s.addr(), s.dir.path()).await;
    let ch = channel(&s.addr()).await;
    let mut tasks = Vec::new();
    for i in 0..512u32 {
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let mut c = v2_client(ch);
                let e = c
                    .encrypt(v2::EncryptRequest {
                        plaintext: dek(i),
                        uid: format!("u{i}"),
                    })
                    .await?
                    .into_inner();
                let d = c
                    .decrypt(v2::DecryptRequest {
                        ciphertext: e.ciphertext,
                        uid: format!("u{i}"),
                        key_id: e.key_id,
                        annotations: e.annotations,
                    })
                    .await?
                    .into_inner();
                assert_eq!(d.plaintext, dek(i));
            } else {
                let mut c = v1_client(ch);
                let e = c
                    .encrypt(v1beta1::EncryptRequest {
                        version: "v1beta1".into(),
                        plain: dek(i),
                    })
                    .await?
                    .into_inner();
                let d = c
                    .decrypt(v1beta1::DecryptRequest {
                        version: "v1beta1".into(),
                        cipher: e.cipher,
                    })
                    .await?
                    .into_inner();
                assert_eq!(d.plain, dek(i));
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn survives_kill_9_restart_refuses_second_instance_and_cleans_up_on_sigterm() {
    let s = Setup::new();
    let mut p = Plugin::start(&s.args(), s.addr(), s.dir.path()).await;
    let mut c = v2_client(channel(&s.addr()).await);
    let mut saved = Vec::new();
    for i in 0..20 {
        let e = c
            .encrypt(v2::EncryptRequest {
                plaintext: dek(i),
                uid: "u".into(),
            })
            .await
            .unwrap()
            .into_inner();
        saved.push((i, e));
    }
    let mut c1 = v1_client(channel(&s.addr()).await);
    let v1_cipher = c1
        .encrypt(v1beta1::EncryptRequest {
            version: "v1beta1".into(),
            plain: dek(99),
        })
        .await
        .unwrap()
        .into_inner()
        .cipher;

    // A second instance on the same socket is refused and leaves the first one alone.
    let out = std::process::Command::new(BIN)
        .args(s.args())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another kms-plugin instance") || stderr.contains("refusing to take over"),
        "{stderr}"
    );
    assert_eq!(
        support::plugin::try_status(&s.addr())
            .await
            .unwrap()
            .healthz,
        "ok"
    );

    // kill -9 leaves a stale socket; the restart replaces it and decrypts everything.
    p.kill9();
    assert!(s.socket.exists(), "kill -9 leaves the socket file behind");
    let mut p = Plugin::start(&s.args(), s.addr(), s.dir.path()).await;
    let mut c = v2_client(channel(&s.addr()).await);
    for (i, e) in &saved {
        let d = c
            .decrypt(v2::DecryptRequest {
                ciphertext: e.ciphertext.clone(),
                uid: "u".into(),
                key_id: e.key_id.clone(),
                annotations: e.annotations.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(d.plaintext, dek(*i));
    }
    let mut c1 = v1_client(channel(&s.addr()).await);
    assert_eq!(
        c1.decrypt(v1beta1::DecryptRequest {
            version: "v1beta1".into(),
            cipher: v1_cipher
        })
        .await
        .unwrap()
        .into_inner()
        .plain,
        dek(99)
    );

    let status = p.terminate();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    assert!(!s.socket.exists(), "socket removed after SIGTERM");
}

#[tokio::test]
async fn key_rotation_in_the_key_file_is_picked_up_without_restart() {
    let s = Setup::new();
    let _p = Plugin::start(&s.args(), s.addr(), s.dir.path()).await;
    let mut c = v2_client(channel(&s.addr()).await);
    let before = c
        .status(v2::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .key_id;
    let old = c
        .encrypt(v2::EncryptRequest {
            plaintext: dek(1),
            uid: "u".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let out = std::process::Command::new(BIN)
        .args(["keygen", "--add"])
        .arg(&s.key_file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let after =
        support::plugin::wait_for_key_id_change(&s.addr(), &before, Duration::from_secs(10)).await;
    let new = c
        .encrypt(v2::EncryptRequest {
            plaintext: dek(2),
            uid: "u".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(new.key_id, after);
    let d = c
        .decrypt(v2::DecryptRequest {
            ciphertext: old.ciphertext,
            uid: "u".into(),
            key_id: old.key_id,
            annotations: Default::default(),
        })
        .await
        .unwrap();
    assert_eq!(d.into_inner().plaintext, dek(1));
}

#[tokio::test]
async fn health_command_and_v2beta1_and_abstract_socket() {
    let s = Setup::new();
    let name = format!("kms-plugin-test-{}", rand::random::<u32>());
    let mut args = s.args();
    args[2] = format!("unix:///@{name}");
    args.extend(["--status-version".into(), "v2beta1".into()]);
    let addr = kms_plugin::protocol::socket::ListenAddr::Abstract(name.clone());
    let _p = Plugin::start(&args, addr.clone(), s.dir.path()).await;
    let st = support::plugin::try_status(&addr).await.unwrap();
    assert_eq!(st.version, "v2beta1");
    let ok = std::process::Command::new(BIN)
        .args(["health", "-v", "--listen", &format!("unix:///@{name}")])
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("healthz: ok"));
    // Removing the key file makes the probe fail; health then exits non-zero with the reason.
    std::fs::remove_file(&s.key_file).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = std::process::Command::new(BIN)
            .args(["health", "--listen", &format!("unix:///@{name}")])
            .output()
            .unwrap();
        if !out.status.success() {
            assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read local key file"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never turned bad"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn missing_key_file_is_a_clear_error_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("typo-kek.json");
    let out = std::process::Command::new(BIN)
        .args(["serve", "--backend", "local", "--listen"])
        .arg(format!("unix://{}/kms.sock", dir.path().display()))
        .arg("--local-key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read local key file") && stderr.contains("keygen"),
        "{stderr}"
    );
    assert!(
        !key.exists(),
        "a missing key file must never be created implicitly"
    );
    assert!(
        !dir.path().join("kms.sock").exists(),
        "no socket left behind"
    );
}

#[test]
fn invalid_options_name_the_option() {
    for (args, needle) in [
        (
            vec!["serve", "--probe-interval", "soon"],
            "--probe-interval",
        ),
        (vec!["serve", "--socket-mode", "999"], "--socket-mode"),
        (vec!["serve", "--listen", "tcp://1.2.3.4:5"], "--listen"),
    ] {
        let out = std::process::Command::new(BIN)
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// Exactly what kube-apiserver's v1 client (and its v2 client before 1.32) sends: the socket path as
/// the HTTP/2 `:authority`. Also `localhost` (1.32+) and an abstract-socket style name.
#[tokio::test]
async fn path_valued_authority_is_served_on_v1_and_v2() {
    use prost::Message;
    use support::raw_h2::{grpc_request, Framing, Outcome, RawH2};
    let s = Setup::new();
    let _p = Plugin::start(&s.args(), s.addr(), s.dir.path()).await;
    let path_authority = s.socket.display().to_string();
    let mut c = RawH2::connect(&s.socket).await.unwrap();
    let mut sid = 1;
    let mut call = async |c: &mut RawH2, method: &str, authority: &str, msg: Vec<u8>| {
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            c.unary(
                sid,
                &grpc_request(method, authority),
                Framing::default(),
                &msg,
            ),
        )
        .await
        .expect("call timed out")
        .unwrap();
        sid += 2;
        match out {
            Outcome::Response(r) => {
                assert_eq!(
                    r.grpc_status(),
                    Some("0"),
                    "{method} with authority {authority:?}: {r:?}"
                );
                r.message().expect("message").to_vec()
            }
            other => panic!("{method} with authority {authority:?} failed: {other:?}"),
        }
    };
    for authority in [path_authority.as_str(), "localhost", "@kms-plugin"] {
        let st = v2::StatusResponse::decode(
            &call(&mut c, "/v2.KeyManagementService/Status", authority, vec![]).await[..],
        )
        .unwrap();
        assert_eq!(st.healthz, "ok");
        let e = v2::EncryptResponse::decode(
            &call(
                &mut c,
                "/v2.KeyManagementService/Encrypt",
                authority,
                v2::EncryptRequest {
                    plaintext: dek(5),
                    uid: "u".into(),
                }
                .encode_to_vec(),
            )
            .await[..],
        )
        .unwrap();
        let d = v2::DecryptResponse::decode(
            &call(
                &mut c,
                "/v2.KeyManagementService/Decrypt",
                authority,
                v2::DecryptRequest {
                    ciphertext: e.ciphertext,
                    uid: "u".into(),
                    key_id: e.key_id,
                    annotations: e.annotations,
                }
                .encode_to_vec(),
            )
            .await[..],
        )
        .unwrap();
        assert_eq!(d.plaintext, dek(5));
        let v = v1beta1::VersionResponse::decode(
            &call(
                &mut c,
                "/v1beta1.KeyManagementService/Version",
                authority,
                v1beta1::VersionRequest {
                    version: "v1beta1".into(),
                }
                .encode_to_vec(),
            )
            .await[..],
        )
        .unwrap();
        assert_eq!(v.version, "v1beta1");
        let e = v1beta1::EncryptResponse::decode(
            &call(
                &mut c,
                "/v1beta1.KeyManagementService/Encrypt",
                authority,
                v1beta1::EncryptRequest {
                    version: "v1beta1".into(),
                    plain: b"ping".to_vec(),
                }
                .encode_to_vec(),
            )
            .await[..],
        )
        .unwrap();
        let d = v1beta1::DecryptResponse::decode(
            &call(
                &mut c,
                "/v1beta1.KeyManagementService/Decrypt",
                authority,
                v1beta1::DecryptRequest {
                    version: "v1beta1".into(),
                    cipher: e.cipher,
                }
                .encode_to_vec(),
            )
            .await[..],
        )
        .unwrap();
        assert_eq!(d.plain, b"ping");
    }
}
