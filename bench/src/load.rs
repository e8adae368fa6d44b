//! Closed-loop load: N workers, each with one request in flight, spread over C connections.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kms_plugin::cli::client;
use kms_plugin::proto::v1beta1::key_management_service_client::KeyManagementServiceClient as V1Client;
use kms_plugin::proto::v2::key_management_service_client::KeyManagementServiceClient as V2Client;
use kms_plugin::proto::{v1beta1, v2};
use kms_plugin::protocol::socket::ListenAddr;
use serde::Serialize;
use tonic::transport::Channel;

/// The deadline every request carries, like the apiserver's default `timeout: 3s`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// A fixed UUID-shaped uid: the apiserver sends a fresh one per call; generating it is client cost.
const UID: &str = "6c1f4a52-8d4e-4b8e-9a53-0d2f4c7e1a90";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    Status,
    V2Decrypt,
    V2Encrypt,
    V1Encrypt,
    V1Decrypt,
}

impl Op {
    pub const ALL: [Op; 5] = [
        Op::Status,
        Op::V2Decrypt,
        Op::V2Encrypt,
        Op::V1Encrypt,
        Op::V1Decrypt,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Status => "status",
            Op::V2Decrypt => "v2-decrypt",
            Op::V2Encrypt => "v2-encrypt",
            Op::V1Encrypt => "v1-encrypt",
            Op::V1Decrypt => "v1-decrypt",
        }
    }
}

/// Request bodies. The floor gets exactly the same bytes as the plugin.
#[derive(Clone)]
pub struct Payloads {
    pub seed: Vec<u8>,
    pub v2_ciphertext: Vec<u8>,
    pub v2_key_id: String,
    pub v1_ciphertext: Vec<u8>,
}

fn req<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(REQUEST_TIMEOUT);
    r
}

pub struct Clients {
    pub v2: V2Client<Channel>,
    pub v1: V1Client<Channel>,
}

impl Clients {
    pub fn new(ch: Channel) -> Self {
        Clients {
            v2: V2Client::new(ch.clone()),
            v1: V1Client::new(ch),
        }
    }

    /// One call; the response is checked only for being non-empty (correctness is checked up front).
    pub async fn call(&mut self, op: Op, p: &Payloads) -> Result<(), tonic::Status> {
        let ok = match op {
            Op::Status => !self
                .v2
                .status(req(v2::StatusRequest {}))
                .await?
                .into_inner()
                .key_id
                .is_empty(),
            Op::V2Decrypt => !self
                .v2
                .decrypt(req(v2::DecryptRequest {
                    ciphertext: p.v2_ciphertext.clone(),
                    uid: UID.into(),
                    key_id: p.v2_key_id.clone(),
                    annotations: Default::default(),
                }))
                .await?
                .into_inner()
                .plaintext
                .is_empty(),
            Op::V2Encrypt => !self
                .v2
                .encrypt(req(v2::EncryptRequest {
                    plaintext: p.seed.clone(),
                    uid: UID.into(),
                }))
                .await?
                .into_inner()
                .ciphertext
                .is_empty(),
            Op::V1Encrypt => !self
                .v1
                .encrypt(req(v1beta1::EncryptRequest {
                    version: "v1beta1".into(),
                    plain: p.seed.clone(),
                }))
                .await?
                .into_inner()
                .cipher
                .is_empty(),
            Op::V1Decrypt => !self
                .v1
                .decrypt(req(v1beta1::DecryptRequest {
                    version: "v1beta1".into(),
                    cipher: p.v1_ciphertext.clone(),
                }))
                .await?
                .into_inner()
                .plain
                .is_empty(),
        };
        if ok {
            Ok(())
        } else {
            Err(tonic::Status::internal("empty response"))
        }
    }
}

/// What one slice of load measured.
pub struct Sample {
    pub hist: Histogram<u64>,
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub max_rss_kib: Option<u64>,
}

pub fn new_hist() -> Histogram<u64> {
    // 1 ns .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

impl Sample {
    pub fn empty() -> Self {
        Sample {
            hist: new_hist(),
            ops: 0,
            errors: 0,
            seconds: 0.0,
            max_rss_kib: None,
        }
    }

    pub fn merge(&mut self, other: Sample) {
        self.hist.add(&other.hist).expect("same histogram bounds");
        self.ops += other.ops;
        self.errors += other.errors;
        self.seconds += other.seconds;
        self.max_rss_kib = match (self.max_rss_kib, other.max_rss_kib) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

/// Opens `connections` channels (each its own UNIX socket connection and HTTP/2 connection).
pub async fn connect_all(addr: &ListenAddr, connections: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(connections);
    for _ in 0..connections {
        out.push(client::connect(addr).await?);
    }
    Ok(out)
}

/// Runs `concurrency` closed-loop workers over `connections` connections: `warmup` unrecorded, then
/// `duration` recorded. While it runs, samples the RSS of `pid` (if given) every 50 ms.
#[allow(clippy::too_many_arguments)] // one flat call site per scenario reads better than a struct
pub async fn measure(
    addr: &ListenAddr,
    op: Op,
    payloads: Arc<Payloads>,
    concurrency: usize,
    connections: usize,
    warmup: Duration,
    duration: Duration,
    pid: Option<u32>,
) -> anyhow::Result<Sample> {
    let channels = connect_all(addr, connections.clamp(1, concurrency)).await?;
    let start = Instant::now();
    let record_from = start + warmup;
    let end = record_from + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let max_rss = Arc::new(AtomicU64::new(0));
    let sampler = pid.map(|pid| {
        let stop = stop.clone();
        let max_rss = max_rss.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some(kib) = crate::procinfo::rss_kib(pid) {
                    max_rss.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    });
    let mut tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let mut clients = Clients::new(channels[i % channels.len()].clone());
        let payloads = payloads.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = new_hist();
            let (mut ops, mut errors) = (0u64, 0u64);
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let result = clients.call(op, &payloads).await;
                let elapsed = t0.elapsed();
                if t0 >= record_from {
                    match result {
                        Ok(()) => {
                            ops += 1;
                            let ns = (elapsed.as_nanos() as u64).max(1);
                            hist.saturating_record(ns);
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            (hist, ops, errors)
        }));
    }
    let mut sample = Sample::empty();
    for t in tasks {
        let (hist, ops, errors) = t.await?;
        sample.hist.add(&hist).expect("same bounds");
        sample.ops += ops;
        sample.errors += errors;
    }
    sample.seconds = duration.as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    if let Some(s) = sampler {
        let _ = s.await;
        sample.max_rss_kib = Some(max_rss.load(Ordering::Relaxed));
    }
    Ok(sample)
}
