//! Fault injection. The engine and the real gRPC server (in process, over a UNIX socket) in front of a
//! backend that goes down, slows past the apiserver's deadline, flaps or throttles, all under load;
//! `kill -9` of the real binary under load; a full and a read-only state directory.
//!
//! A "minute" of outage is compressed to a few seconds with a 200 ms probe interval.
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_plugin::backend::memory::MemoryBackend;
use kms_plugin::backend::BackendError;
use kms_plugin::engine::{Api, Binding, Engine, EngineConfig, EngineError};
use kms_plugin::proto::{v1beta1, v2};
use kms_plugin::protocol::observe::NoRequestObserver;
use kms_plugin::protocol::server::{serve, ServerOptions};
use kms_plugin::protocol::socket::{bind, ListenAddr, SocketOptions};
use support::faulty::{Faults, FaultyBackend};
use support::plugin::{channel, v1_client, v2_client, Plugin, Setup, BIN};
use tonic::transport::Channel;
use tonic::Code;

const PROBE: Duration = Duration::from_millis(200);
/// Scheduling slack on a loaded 2-core machine, on top of the probe interval.
const SLACK: Duration = Duration::from_millis(400);
/// The compressed "minute" of outage.
const OUTAGE: Duration = Duration::from_secs(5);

fn fast_config() -> EngineConfig {
    EngineConfig {
        probe_interval: PROBE,
        deep_probe_interval: Duration::from_secs(2),
        backend_timeout: Duration::from_secs(1),
        status_staleness: PROBE * 2 + Duration::from_secs(1),
        backend_concurrency: 4,
        ..EngineConfig::default()
    }
}

fn dek(i: u64) -> Vec<u8> {
    let mut d: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
    d[..8].copy_from_slice(&i.to_be_bytes());
    d
}

fn req<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// Sends the deadline in `grpc-timeout` like the apiserver, without the client enforcing it, so the
/// test sees what the server answers and when.
fn server_deadline<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "grpc-timeout",
        format!("{}m", timeout.as_millis()).parse().unwrap(),
    );
    r
}

fn opted_out(name: &str) -> bool {
    std::env::var("KMS_TEST_OPT_OUT")
        .unwrap_or_default()
        .split(',')
        .any(|n| n.trim() == name)
}

/// The real server (protocol::server::serve) in this process, over an engine on a FaultyBackend.
struct Server {
    _dir: tempfile::TempDir,
    addr: ListenAddr,
    engine: Arc<Engine>,
    faulty: Arc<FaultyBackend>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    stop_probes: tokio::sync::watch::Sender<bool>,
}

impl Server {
    async fn start(mem: Arc<MemoryBackend>, config: EngineConfig) -> Server {
        let faulty = FaultyBackend::new(mem);
        let engine = Engine::new(faulty.clone(), config);
        engine.probe(true).await.expect("initial probe");
        let dir = tempfile::tempdir().unwrap();
        let addr = ListenAddr::Path(dir.path().join("kms.sock"));
        let socket = bind(
            &addr,
            &SocketOptions {
                mode: 0o600,
                group: None,
            },
        )
        .unwrap();
        let (stop_probes, probes_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(engine.clone().run_probes(probes_rx));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let e = engine.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            serve(
                e,
                socket,
                ServerOptions::default(),
                Arc::new(NoRequestObserver),
                shutdown,
            )
            .await
            .expect("serve");
        });
        Server {
            _dir: dir,
            addr,
            engine,
            faulty,
            stop: Some(stop),
            stop_probes,
        }
    }

    async fn status(&self) -> v2::StatusResponse {
        v2_client(channel(&self.addr).await)
            .status(req(v2::StatusRequest {}, Duration::from_secs(3)))
            .await
            .expect("Status never fails")
            .into_inner()
    }

    /// Polls Status until `pred` holds; returns how long it took.
    async fn wait_status(
        &self,
        limit: Duration,
        pred: impl Fn(&v2::StatusResponse) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            let s = self.status().await;
            if pred(&s) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "Status did not change within {limit:?}; last: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop_probes.send(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A ciphertext some client got back, with what it needs to be decrypted.
#[derive(Clone, Debug)]
struct Sample {
    api: Api,
    ciphertext: Vec<u8>,
    key_id: String,
    plaintext: Vec<u8>,
}

async fn encrypt(ch: &Channel, api: Api, plaintext: Vec<u8>) -> Result<Sample, tonic::Status> {
    match api {
        Api::V2 => {
            let r = v2_client(ch.clone())
                .encrypt(req(
                    v2::EncryptRequest {
                        plaintext: plaintext.clone(),
                        uid: "fault-test".into(),
                    },
                    Duration::from_secs(3),
                ))
                .await?
                .into_inner();
            Ok(Sample {
                api,
                ciphertext: r.ciphertext,
                key_id: r.key_id,
                plaintext,
            })
        }
        Api::V1 => {
            let r = v1_client(ch.clone())
                .encrypt(req(
                    v1beta1::EncryptRequest {
                        version: "v1beta1".into(),
                        plain: plaintext.clone(),
                    },
                    Duration::from_secs(3),
                ))
                .await?
                .into_inner();
            Ok(Sample {
                api,
                ciphertext: r.cipher,
                key_id: String::new(),
                plaintext,
            })
        }
    }
}

async fn decrypt(ch: &Channel, s: &Sample, timeout: Duration) -> Result<Vec<u8>, tonic::Status> {
    match s.api {
        Api::V2 => Ok(v2_client(ch.clone())
            .decrypt(req(
                v2::DecryptRequest {
                    ciphertext: s.ciphertext.clone(),
                    uid: "fault-test".into(),
                    key_id: s.key_id.clone(),
                    annotations: Default::default(),
                },
                timeout,
            ))
            .await?
            .into_inner()
            .plaintext),
        Api::V1 => Ok(v1_client(ch.clone())
            .decrypt(req(
                v1beta1::DecryptRequest {
                    version: "v1beta1".into(),
                    cipher: s.ciphertext.clone(),
                },
                timeout,
            ))
            .await?
            .into_inner()
            .plain),
    }
}

/// Ciphertexts under `n` distinct local KEKs, made by another plugin instance on the same backend
/// (as after restarts): the server under test has none of them cached.
async fn foreign_samples(mem: &Arc<MemoryBackend>, n: u64, api: Api) -> Vec<Sample> {
    let producer = Engine::new(
        mem.clone(),
        EngineConfig {
            kek_max_uses: 1,
            ..EngineConfig::default()
        },
    );
    producer.probe(false).await.unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let plaintext = dek(i);
        let s = producer.encrypt(&plaintext, api).await.unwrap();
        out.push(Sample {
            api,
            ciphertext: s.ciphertext,
            key_id: if api == Api::V2 {
                s.key_id
            } else {
                String::new()
            },
            plaintext,
        });
    }
    out
}

#[derive(Default)]
struct LoadStats {
    decrypts: AtomicU64,
    encrypts: AtomicU64,
    decrypt_failures: AtomicU64,
    encrypt_failures: AtomicU64,
    first_error: Mutex<Option<String>>,
    written: Mutex<Vec<Sample>>,
}

impl LoadStats {
    fn fail(&self, what: &str, e: &tonic::Status) {
        let mut first = self.first_error.lock().unwrap();
        if first.is_none() {
            *first = Some(format!("{what}: {:?} {}", e.code(), e.message()));
        }
    }
}

/// Paced load of cached Decrypts (every sample in `known`) and fresh Encrypts on both APIs until
/// `stop`, bounded in count as well as time.
fn start_load(
    ch: Channel,
    known: Arc<Vec<Sample>>,
    stats: Arc<LoadStats>,
    stop: Arc<AtomicBool>,
    workers: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|w| {
            let (ch, known, stats, stop) = (ch.clone(), known.clone(), stats.clone(), stop.clone());
            tokio::spawn(async move {
                let mut pace = tokio::time::interval(Duration::from_millis(4));
                pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for i in 0..50_000u64 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    pace.tick().await;
                    let s = &known[(i as usize * 7 + w) % known.len()];
                    match decrypt(&ch, s, Duration::from_secs(3)).await {
                        Ok(p) if p == s.plaintext => {
                            stats.decrypts.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => panic!("Decrypt returned a different plaintext"),
                        Err(e) => {
                            stats.decrypt_failures.fetch_add(1, Ordering::SeqCst);
                            stats.fail("decrypt", &e);
                        }
                    }
                    if i % 4 == 0 {
                        let api = if i % 8 == 0 { Api::V1 } else { Api::V2 };
                        match encrypt(&ch, api, dek(i)).await {
                            Ok(s) => {
                                stats.encrypts.fetch_add(1, Ordering::SeqCst);
                                stats.written.lock().unwrap().push(s);
                            }
                            Err(e) => {
                                stats.encrypt_failures.fetch_add(1, Ordering::SeqCst);
                                stats.fail("encrypt", &e);
                            }
                        }
                    }
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_outage_under_load_keeps_cached_decrypts_and_encrypts_and_status_recovers() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let srv = Server::start(mem.clone(), fast_config()).await;
    let ch = channel(&srv.addr).await;

    // Known data: under two backend key versions and many local KEKs, both APIs, all of it seen
    // (so cached) by the server before the outage.
    let mut known = foreign_samples(&mem, 10, Api::V2).await;
    known.extend(foreign_samples(&mem, 10, Api::V1).await);
    mem.rotate();
    srv.wait_status(Duration::from_secs(5), |s| s.key_id == "memory:t:v2")
        .await;
    known.extend(foreign_samples(&mem, 10, Api::V2).await);
    for i in 0..10 {
        known.push(encrypt(&ch, Api::V2, dek(100 + i)).await.unwrap());
        known.push(encrypt(&ch, Api::V1, dek(200 + i)).await.unwrap());
    }
    for s in &known {
        assert_eq!(
            decrypt(&ch, s, Duration::from_secs(3)).await.unwrap(),
            s.plaintext
        );
    }
    let uncached = foreign_samples(&mem, 1, Api::V2).await.remove(0);
    let cached_before = srv.engine.cached_keks();

    let stats = Arc::new(LoadStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(ch.clone(), Arc::new(known), stats.clone(), stop.clone(), 4);
    support::wait_until(Duration::from_secs(10), || {
        stats.decrypts.load(Ordering::SeqCst) >= 100
    })
    .await;

    srv.faulty.set(Faults {
        fail_with: Some(BackendError::Unavailable("injected outage".into())),
        ..Faults::default()
    });
    let ops_at_outage = stats.decrypts.load(Ordering::SeqCst);
    let detected = srv
        .wait_status(PROBE + SLACK * 3, |s| s.healthz != "ok")
        .await;
    let during = srv.status().await;
    assert!(during.healthz.contains("unavailable"), "{}", during.healthz);
    assert_eq!(during.key_id, "memory:t:v2", "key_id kept during an outage");
    // The outage is real: data under a local KEK the server never saw cannot be opened.
    let err = decrypt(&ch, &uncached, Duration::from_secs(3))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("injected outage"), "{err:?}");

    tokio::time::sleep(OUTAGE).await; // the outage itself, not a synchronisation
    let ops_during = stats.decrypts.load(Ordering::SeqCst) - ops_at_outage;
    assert_eq!(
        srv.engine.cached_keks(),
        cached_before,
        "no purge on an outage"
    );
    srv.faulty.heal();
    let recovered = srv
        .wait_status(PROBE + SLACK * 3, |s| s.healthz == "ok")
        .await;
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    let first_error = stats.first_error.lock().unwrap().clone();
    assert_eq!(
        stats.decrypt_failures.load(Ordering::SeqCst),
        0,
        "cached Decrypts failed: {first_error:?}"
    );
    assert_eq!(
        stats.encrypt_failures.load(Ordering::SeqCst),
        0,
        "Encrypts failed: {first_error:?}"
    );
    assert!(
        ops_during >= 100,
        "too little load during the outage: {ops_during}"
    );
    // Everything written during the outage decrypts afterwards, also on a fresh instance.
    let written = stats.written.lock().unwrap().clone();
    let fresh = Server::start(mem.clone(), fast_config()).await;
    let fresh_ch = channel(&fresh.addr).await;
    for s in &written {
        assert_eq!(
            decrypt(&fresh_ch, s, Duration::from_secs(3)).await.unwrap(),
            s.plaintext
        );
    }
    assert_eq!(
        decrypt(&ch, &uncached, Duration::from_secs(3))
            .await
            .unwrap(),
        uncached.plaintext
    );
    eprintln!(
        "outage: unhealthy after {detected:?}, ok again {recovered:?} after recovery (probe interval {PROBE:?}); \
         {} cached decrypts ({ops_during} during the {OUTAGE:?} outage) and {} encrypts, 0 failures",
        stats.decrypts.load(Ordering::SeqCst),
        stats.encrypts.load(Ordering::SeqCst)
    );
    assert!(
        detected <= PROBE + SLACK,
        "unhealthy only after {detected:?}"
    );
    assert!(
        recovered <= PROBE + SLACK,
        "recovered only after {recovered:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn encrypt_keeps_the_current_local_kek_during_an_outage_until_its_maximum_age() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let faulty = FaultyBackend::new(mem.clone());
    let engine = Engine::new(
        faulty.clone(),
        EngineConfig {
            kek_max_age: Duration::from_secs(60),
            ..fast_config()
        },
    );
    engine.probe(true).await.unwrap();
    let first = engine.encrypt(&dek(1), Api::V2).await.unwrap();
    faulty.set(Faults {
        fail_with: Some(BackendError::Unavailable("injected outage".into())),
        ..Faults::default()
    });
    assert!(engine.probe(false).await.is_err());
    tokio::time::advance(Duration::from_secs(59)).await;
    let plaintext = dek(2);
    let during = engine.encrypt(&plaintext, Api::V2).await.unwrap();
    assert_eq!(during.kek_ref, first.kek_ref, "same local KEK");
    assert!(!during.backend_call);
    tokio::time::advance(Duration::from_secs(2)).await;
    // Past its maximum age a new local KEK is needed, which needs the backend: a clear error.
    let err = engine.encrypt(&dek(3), Api::V2).await.unwrap_err();
    assert!(
        matches!(err, EngineError::Backend(BackendError::Unavailable(_))),
        "{err}"
    );
    // Decrypts of existing data still work.
    let out = engine
        .decrypt(
            &during.ciphertext,
            Binding::V2 {
                key_id: &during.key_id,
            },
        )
        .await
        .unwrap();
    assert_eq!(&out.plaintext[..], &plaintext[..]);
    faulty.heal();
    let after = engine.encrypt(&dek(4), Api::V2).await.unwrap();
    assert_ne!(after.kek_ref, first.kek_ref);
    assert!(after.backend_call);
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_honours_deadlines_bounds_concurrency_and_leaves_no_pile_up() {
    let mem = Arc::new(MemoryBackend::new("t"));
    // The backend call limit is above the request deadline, so the request deadline is what fires.
    let config = EngineConfig {
        backend_timeout: Duration::from_secs(3),
        status_staleness: Duration::from_secs(4),
        ..fast_config()
    };
    let srv = Server::start(mem.clone(), config.clone()).await;
    let ch = channel(&srv.addr).await;
    let cached = encrypt(&ch, Api::V2, dek(1)).await.unwrap();
    let uncached = foreign_samples(&mem, 64, Api::V1).await;
    assert!(srv.status().await.healthz == "ok");
    let baseline = alive_tasks();

    srv.faulty.set(Faults {
        delay: Some(Duration::from_secs(10)),
        ..Faults::default()
    });
    srv.faulty.reset_max_in_flight();
    let deadline = Duration::from_secs(1);
    for round in 0..3 {
        let started = Instant::now();
        let mut calls = Vec::new();
        for s in &uncached {
            let ch = ch.clone();
            let request = server_deadline(
                v1beta1::DecryptRequest {
                    version: "v1beta1".into(),
                    cipher: s.ciphertext.clone(),
                },
                deadline,
            );
            calls.push(tokio::spawn(async move {
                let t = Instant::now();
                let r = v1_client(ch).decrypt(request).await;
                (r, t.elapsed())
            }));
        }
        // Cached data and the current local KEK need no backend: unaffected by the slow backend.
        for _ in 0..16 {
            assert_eq!(
                decrypt(&ch, &cached, Duration::from_secs(3)).await.unwrap(),
                cached.plaintext
            );
            encrypt(&ch, Api::V2, dek(2)).await.unwrap();
        }
        let (mut slowest, mut by_server) = (Duration::ZERO, 0);
        for c in calls {
            let (result, took) = c.await.unwrap();
            let err = result.expect_err("a Decrypt needing a 10 s backend call within 1 s");
            // The server answers DEADLINE_EXCEEDED a margin before the deadline; tonic's client also
            // enforces the header and reports CANCELLED when the answer is later than that (loaded
            // machine). Either way nothing waits past the deadline.
            match err.code() {
                Code::DeadlineExceeded => by_server += 1,
                Code::Cancelled if err.message() == "Timeout expired" => {}
                other => panic!("unexpected {other:?}: {err:?}"),
            }
            slowest = slowest.max(took);
        }
        assert!(
            by_server > 0,
            "round {round}: no DEADLINE_EXCEEDED from the server"
        );
        assert!(
            slowest < deadline + SLACK,
            "round {round}: a call took {slowest:?} with a {deadline:?} deadline"
        );
        // Every detached unwrap gives up after backend_timeout: no tasks or backend calls pile up.
        let limit = config.backend_timeout * 2 + SLACK;
        support::wait_until(limit, || srv.faulty.in_flight() == 0).await;
        support::wait_until(limit, || alive_tasks() <= baseline + 8).await;
        eprintln!(
            "slow backend round {round}: 64 Decrypts with a {deadline:?} deadline all ended within {slowest:?} \
             ({by_server} DEADLINE_EXCEEDED from the server, the rest timed out in the client); \
             drained after {:?}; backend peak concurrency {}",
            started.elapsed(),
            srv.faulty.max_in_flight()
        );
    }
    assert!(
        srv.faulty.max_in_flight() <= config.backend_concurrency as u64,
        "backend concurrency {} > {}",
        srv.faulty.max_in_flight(),
        config.backend_concurrency
    );
    // Probes time out too: Status turns unhealthy.
    srv.wait_status(config.backend_timeout + PROBE + SLACK * 3, |s| {
        s.healthz.contains("did not answer")
    })
    .await;
    srv.faulty.heal();
    srv.wait_status(PROBE + SLACK * 3, |s| s.healthz == "ok")
        .await;
    for s in &uncached {
        assert_eq!(
            decrypt(&ch, s, Duration::from_secs(3)).await.unwrap(),
            s.plaintext
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_backend_never_purges_and_every_call_eventually_succeeds() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let srv = Server::start(mem.clone(), fast_config()).await;
    let ch = channel(&srv.addr).await;
    let mut cached = Vec::new();
    for i in 0..8 {
        cached.push(encrypt(&ch, Api::V2, dek(i)).await.unwrap());
    }
    let uncached = foreign_samples(&mem, 32, Api::V2).await;
    let cached_keks = srv.engine.cached_keks();
    srv.faulty.set(Faults {
        flap_every: Some(2),
        ..Faults::default()
    });
    let mut transient = 0u32;
    let mut tasks = Vec::new();
    for s in uncached {
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            let mut errors = 0u32;
            for _attempt in 0..20 {
                match decrypt(&ch, &s, Duration::from_secs(3)).await {
                    Ok(p) => {
                        assert_eq!(p, s.plaintext);
                        return errors;
                    }
                    Err(e) => {
                        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                        errors += 1;
                    }
                }
            }
            panic!("20 attempts failed at 50% backend errors");
        }));
    }
    for _ in 0..300 {
        let s = &cached[rand::random::<usize>() % cached.len()];
        assert_eq!(
            decrypt(&ch, s, Duration::from_secs(3)).await.unwrap(),
            s.plaintext,
            "a cached Decrypt failed while the backend flapped"
        );
    }
    for t in tasks {
        transient += t.await.unwrap();
    }
    let status = srv.status().await;
    assert!(!status.healthz.starts_with("key revoked"), "{status:?}");
    assert_eq!(
        srv.engine.cached_keks(),
        cached_keks + 32,
        "flapping purged the cache"
    );
    eprintln!("flapping: 32 uncached Decrypts succeeded after {transient} UNAVAILABLE answers; 300 cached Decrypts, 0 failures");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_transient_and_bounded_concurrency_stays_under_the_rate_limit() {
    let mem = Arc::new(MemoryBackend::new("t"));
    let config = fast_config();
    let srv = Server::start(mem.clone(), config.clone()).await;
    let ch = channel(&srv.addr).await;
    let cached = encrypt(&ch, Api::V1, dek(1)).await.unwrap();
    let cached_keks = srv.engine.cached_keks();

    // A backend that throttles everything: clear transient error, cache kept, Status unhealthy.
    srv.faulty.set(Faults {
        fail_with: Some(BackendError::Throttled("injected 429".into())),
        ..Faults::default()
    });
    let one = foreign_samples(&mem, 1, Api::V2).await.remove(0);
    let err = decrypt(&ch, &one, Duration::from_secs(3))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("throttling"), "{err:?}");
    srv.wait_status(PROBE + SLACK * 3, |s| s.healthz.contains("throttling"))
        .await;
    for _ in 0..50 {
        assert_eq!(
            decrypt(&ch, &cached, Duration::from_secs(3)).await.unwrap(),
            cached.plaintext
        );
    }
    assert_eq!(srv.engine.cached_keks(), cached_keks, "no purge on a 429");

    // A backend that throttles above `backend_concurrency` calls at once never throttles us: 64
    // simultaneous Decrypts needing 64 unwraps queue in the engine instead.
    srv.faulty.set(Faults {
        throttle_above: Some(config.backend_concurrency as u64),
        delay: Some(Duration::from_millis(30)),
        ..Faults::default()
    });
    srv.wait_status(PROBE + SLACK * 3, |s| s.healthz == "ok")
        .await;
    srv.faulty.reset_max_in_flight();
    let many = foreign_samples(&mem, 64, Api::V2).await;
    let mut calls = Vec::new();
    for s in many {
        let ch = ch.clone();
        calls.push(tokio::spawn(async move {
            let p = decrypt(&ch, &s, Duration::from_secs(3)).await;
            (p, s.plaintext)
        }));
    }
    for c in calls {
        let (p, want) = c.await.unwrap();
        assert_eq!(p.expect("no 429 reaches the client"), want);
    }
    assert!(srv.faulty.max_in_flight() <= config.backend_concurrency as u64);
}

/// `kill -9` of the real binary while clients encrypt on both APIs (and the key is rotated); after a
/// restart every ciphertext any client got back decrypts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_then_every_returned_ciphertext_decrypts() {
    let s = Setup::new();
    let mut p = Plugin::start(&s.args(), s.addr(), s.dir.path()).await;
    let ch = channel(&s.addr()).await;
    let returned: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..4u64 {
        let (ch, returned, stop) = (ch.clone(), returned.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(2));
            for i in 0..20_000u64 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                pace.tick().await;
                let api = if (i + w) % 2 == 0 { Api::V2 } else { Api::V1 };
                // Errors are expected once the process is killed; only returned ciphertexts count.
                if let Ok(sample) = encrypt(&ch, api, dek(i * 4 + w)).await {
                    returned.lock().unwrap().push(sample);
                }
            }
        }));
    }
    let count = || returned.lock().unwrap().len();
    support::wait_until(Duration::from_secs(20), || count() >= 300).await;
    let first_key_id = returned
        .lock()
        .unwrap()
        .iter()
        .find(|s| s.api == Api::V2)
        .unwrap()
        .key_id
        .clone();
    let out = Command::new(BIN)
        .args(["keygen", "--add"])
        .arg(&s.key_file)
        .output()
        .unwrap();
    assert!(out.status.success());
    support::wait_until(Duration::from_secs(20), || {
        returned
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.api == Api::V2 && s.key_id != first_key_id)
    })
    .await;
    let n = count();
    support::wait_until(Duration::from_secs(20), || count() >= n + 200).await;
    p.kill9();
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    let returned = returned.lock().unwrap().clone();

    let _p = Plugin::start(&s.args(), s.addr(), s.dir.path()).await;
    let ch = channel(&s.addr()).await;
    for sample in &returned {
        assert_eq!(
            decrypt(&ch, sample, Duration::from_secs(3)).await.unwrap(),
            sample.plaintext
        );
    }
    eprintln!(
        "kill -9 under load: all {} ciphertexts returned before the kill decrypt after the restart",
        returned.len()
    );
}

/// A size-limited tmpfs, unmounted when dropped. `None` when mounting is impossible and the test
/// was opted out (KMS_TEST_OPT_OUT=mount).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                if opted_out("mount") {
                    eprintln!("skipped (KMS_TEST_OPT_OUT=mount): cannot mount a tmpfs: {why}");
                    None
                } else {
                    panic!("cannot mount a tmpfs (needs root; set KMS_TEST_OPT_OUT=mount to skip): {why}");
                }
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, opt: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{opt}")])
            .arg(self.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Fills the filesystem: appends to a filler file until the disk refuses.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path().join("filler")).unwrap();
        let chunk = vec![0u8; 4096];
        for _ in 0..100_000 {
            if f.write_all(&chunk).and_then(|_| f.sync_all()).is_err() {
                return;
            }
        }
        panic!("the tmpfs never filled up");
    }

    fn free(&self) {
        std::fs::remove_file(self.path().join("filler")).unwrap();
    }

    fn listing(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn run(args: &[&str], paths: &[&Path]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .args(paths)
        .env("KMS_PLUGIN_LOG_FORMAT", "text")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn key_file_is_valid(path: &Path) -> bool {
    kms_plugin::backend::local::LocalBackend::open(path).is_ok()
}

#[test]
fn full_disk_gives_a_clear_error_and_never_a_corrupt_key_file() {
    let Some(fs) = Tmpfs::mount("64k") else {
        return;
    };
    let key: PathBuf = fs.path().join("kek.json");
    let (ok, err) = run(&["keygen"], &[&key]);
    assert!(ok, "{err}");
    let before = std::fs::read(&key).unwrap();
    fs.fill();

    // Rotation on a full disk: refused with the cause, old file intact, no temporary left behind.
    let (ok, err) = run(&["keygen", "--add"], &[&key]);
    assert!(!ok);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("kek.json"), "{err}");
    assert_eq!(std::fs::read(&key).unwrap(), before, "key file changed");
    assert_eq!(fs.listing(), ["filler", "kek.json"]);

    // A new key file on a full disk: refused, and nothing (in particular no empty or truncated key
    // file that a later start would trip over) is left at the path.
    let new_key = fs.path().join("new.json");
    let (ok, err) = run(&["keygen"], &[&new_key]);
    assert!(!ok);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        !new_key.exists() || key_file_is_valid(&new_key),
        "a corrupt key file was left behind: {:?}",
        std::fs::read(&new_key)
    );

    // The development mode creates its key under --data-dir: same guarantee.
    let data = fs.path().join("data");
    let (ok, err) = run(
        &[
            "serve",
            "--dev",
            "--listen",
            "unix:///@kms-plugin-faults-full-disk",
            "--data-dir",
        ],
        &[&data],
    );
    assert!(!ok);
    assert!(err.contains("No space left on device"), "{err}");
    let dev_key = data.join("dev-kek.json");
    assert!(!dev_key.exists() || key_file_is_valid(&dev_key));

    // With space again everything works, and the rotation refused earlier succeeds.
    fs.free();
    let (ok, err) = run(&["keygen", "--add"], &[&key]);
    assert!(ok, "{err}");
    assert!(key_file_is_valid(&key));
    let (ok, err) = run(&["keygen"], &[&new_key]);
    assert!(ok, "{err}");
    assert!(key_file_is_valid(&new_key));
}

#[test]
fn read_only_state_directory_gives_a_clear_error_and_leaves_files_alone() {
    let Some(fs) = Tmpfs::mount("1m") else {
        return;
    };
    let key = fs.path().join("kek.json");
    let (ok, err) = run(&["keygen"], &[&key]);
    assert!(ok, "{err}");
    let before = std::fs::read(&key).unwrap();
    fs.remount("ro");

    let (ok, err) = run(&["keygen", "--add"], &[&key]);
    assert!(!ok);
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(std::fs::read(&key).unwrap(), before);

    let (ok, err) = run(&["keygen"], &[&fs.path().join("new.json")]);
    assert!(!ok);
    assert!(err.contains("Read-only file system"), "{err}");

    let (ok, err) = run(
        &[
            "serve",
            "--dev",
            "--listen",
            "unix:///@kms-plugin-faults-ro",
            "--data-dir",
        ],
        &[&fs.path().join("data")],
    );
    assert!(!ok);
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(fs.listing(), ["kek.json"]);

    // An existing key file on a read-only filesystem is all the local backend needs to serve.
    let backend = kms_plugin::backend::local::LocalBackend::open(&key);
    assert!(backend.is_ok());
    fs.remount("rw");
}
