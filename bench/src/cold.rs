//! Scenario 4, cold start: ciphertexts written by a previous plugin process (spanning several local
//! KEKs) are decrypted by a fresh engine whose backend answers after a fixed latency.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use kms_plugin::backend::local::LocalBackend;
use kms_plugin::engine::{format, kek, Engine, EngineConfig};
use kms_plugin::proto::v2;
use kms_plugin::protocol::observe::NoRequestObserver;
use kms_plugin::protocol::server::{self, ServerOptions};
use kms_plugin::protocol::socket::{self, ListenAddr, SocketOptions};
use rand::seq::SliceRandom;
use rand::RngCore;
use serde::Serialize;

use crate::latency::{Calls, LatencyBackend};
use crate::load::{connect_all, REQUEST_TIMEOUT};
use crate::procs;

/// (seed, ciphertext, key_id).
pub type Item = (Vec<u8>, Vec<u8>, String);

pub struct Corpus {
    /// In the order the previous process produced them.
    pub items: Vec<Item>,
    pub distinct_keks: usize,
}

#[derive(Debug, Serialize)]
pub struct ColdResult {
    pub order: &'static str,
    pub concurrency: usize,
    pub ciphertexts: usize,
    pub distinct_local_keks: usize,
    pub injected_latency_ms: f64,
    /// Backend calls made by the start-up check (`probe(true)`, as `serve` does), before serving.
    pub startup_calls: Calls,
    /// Backend calls made while decrypting all ciphertexts the first time.
    pub decrypt_calls: Calls,
    pub cold_seconds: f64,
    /// Wall time of the cold pass during which at least one backend call was in flight.
    pub backend_busy_seconds: f64,
    /// The same ciphertexts again on the same (now warm) process: the no-backend baseline.
    pub warm_seconds: f64,
    /// distinct_local_keks x injected latency: what a strictly sequential backend costs.
    pub expected_backend_seconds: f64,
}

fn v2_client(
    ch: tonic::transport::Channel,
) -> v2::key_management_service_client::KeyManagementServiceClient<tonic::transport::Channel> {
    v2::key_management_service_client::KeyManagementServiceClient::new(ch)
}

/// Runs the real plugin with a small `--kek-max-uses` and encrypts `count` seeds through it.
pub async fn make_corpus(
    plugin_bin: &Path,
    dir: &Path,
    key_file: &Path,
    count: usize,
    kek_max_uses: u64,
) -> anyhow::Result<Corpus> {
    let mut prev = procs::start_plugin(
        plugin_bin,
        dir,
        "previous",
        key_file,
        &["--kek-max-uses".into(), kek_max_uses.to_string()],
    )?;
    prev.wait_healthy(Duration::from_secs(30)).await?;
    let channels = connect_all(&prev.addr, 4).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let out = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let mut c = v2_client(channels[i % channels.len()].clone());
        let (next, out) = (next.clone(), out.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let mut seed = vec![0u8; 32];
                rand::thread_rng().fill_bytes(&mut seed);
                let mut r = tonic::Request::new(v2::EncryptRequest {
                    plaintext: seed.clone(),
                    uid: "cold-corpus".into(),
                });
                r.set_timeout(REQUEST_TIMEOUT);
                let resp = c.encrypt(r).await?.into_inner();
                out.lock()
                    .unwrap()
                    .push((seed, resp.ciphertext, resp.key_id));
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    prev.stop();
    let items = std::mem::take(&mut *out.lock().unwrap());
    ensure!(
        items.len() == count,
        "made {} of {count} ciphertexts",
        items.len()
    );
    let mut keks = HashSet::new();
    for (_, ct, _) in &items {
        let p = format::parse(ct).context("parse a ciphertext of the previous process")?;
        keks.insert(kek::digest_of(p.key_ref, p.wrapped));
    }
    Ok(Corpus {
        distinct_keks: keks.len(),
        items,
    })
}

/// Decrypts the whole corpus with `concurrency` workers; checks every plaintext.
async fn decrypt_all(
    addr: &ListenAddr,
    items: Arc<Vec<Item>>,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let channels = connect_all(addr, concurrency.min(4)).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let mut c = v2_client(channels[i % channels.len()].clone());
        let (next, items) = (next.clone(), items.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((seed, ct, key_id)) = items.get(i) else {
                    return anyhow::Ok(());
                };
                let mut r = tonic::Request::new(v2::DecryptRequest {
                    ciphertext: ct.clone(),
                    uid: "cold-start".into(),
                    key_id: key_id.clone(),
                    annotations: Default::default(),
                });
                r.set_timeout(REQUEST_TIMEOUT);
                let plain = c.decrypt(r).await?.into_inner().plaintext;
                ensure!(
                    &plain == seed,
                    "ciphertext {i} decrypted to the wrong plaintext"
                );
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// One fresh in-process plugin (engine + real gRPC server on its own 2-thread runtime) behind the latency
/// backend; decrypts the corpus cold, then warm.
pub async fn run_one(
    dir: &Path,
    key_file: &Path,
    corpus: &Corpus,
    order: &'static str,
    concurrency: usize,
    latency: Duration,
) -> anyhow::Result<ColdResult> {
    let mut items = corpus.items.clone();
    if order == "shuffled" {
        items.shuffle(&mut rand::thread_rng());
    }
    let items = Arc::new(items);
    let backend = LatencyBackend::new(
        Arc::new(LocalBackend::open(key_file).context("open key file")?),
        latency,
    );
    let engine = Engine::new(backend.clone(), EngineConfig::default());
    let addr = ListenAddr::Path(dir.join(format!("cold-{order}-{concurrency}.sock")));

    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let server_addr = addr.clone();
    let server = server_rt.spawn(async move {
        // Like `serve`: bind, check the backend (resolve key + one round trip), then serve.
        let bound = socket::bind(&server_addr, &SocketOptions::default())?;
        engine.probe(true).await?;
        let _ = ready_tx.send(());
        server::serve(
            engine,
            bound,
            ServerOptions::default(),
            Arc::new(NoRequestObserver),
            async move {
                let _ = stop_rx.await;
            },
        )
        .await?;
        anyhow::Ok(())
    });
    if ready_rx.await.is_err() {
        let err = server.await;
        server_rt.shutdown_background();
        bail!("cold-start server failed to start: {err:?}");
    }
    let startup_calls = backend.calls();
    let startup_busy = backend.busy();

    let result = async {
        let cold = decrypt_all(&addr, items.clone(), concurrency).await?;
        let after_cold = backend.calls();
        let busy = backend.busy() - startup_busy;
        let warm = decrypt_all(&addr, items.clone(), concurrency).await?;
        let after_warm = backend.calls();
        ensure!(after_warm == after_cold, "the warm pass called the backend");
        anyhow::Ok((cold, warm, after_cold, busy))
    }
    .await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(15), server).await;
    server_rt.shutdown_background();
    let (cold, warm, after_cold, busy) = result?;
    let decrypt_calls = Calls {
        probes: after_cold.probes - startup_calls.probes,
        wraps: after_cold.wraps - startup_calls.wraps,
        unwraps: after_cold.unwraps - startup_calls.unwraps,
    };
    Ok(ColdResult {
        order,
        concurrency,
        ciphertexts: items.len(),
        distinct_local_keks: corpus.distinct_keks,
        injected_latency_ms: latency.as_secs_f64() * 1e3,
        startup_calls,
        decrypt_calls,
        cold_seconds: cold,
        backend_busy_seconds: busy.as_secs_f64(),
        warm_seconds: warm,
        expected_backend_seconds: corpus.distinct_keks as f64 * latency.as_secs_f64(),
    })
}
