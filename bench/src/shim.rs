//! What the `:authority` shim costs: Status calls from raw HTTP/2 clients that send either
//! `localhost` (1.32+ apiservers) or a socket path (older ones) as `:authority`, against the real
//! plugin and the shim-less floor, alternating slices as in `run`. The floor (plain h2) refuses a
//! path authority, so it is always called with `localhost`: the baseline is what the call would
//! cost if the apiserver had never sent a path.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use kms_plugin::protocol::authority::frame::kind;
use kms_plugin::protocol::socket::ListenAddr;

use crate::procs::{self, Server};

#[path = "../../tests/support/raw_h2.rs"]
#[allow(dead_code)]
mod raw_h2;
use raw_h2::{grpc_request, Framing, Outcome, RawH2};

const STATUS: &str = "/v2.KeyManagementService/Status";
const PATH_AUTHORITY: &str = "/var/run/kmsplugin/socket.sock";

#[derive(clap::Args, Clone)]
pub struct ShimArgs {
    /// The `kms-plugin` binary (a release build for real numbers).
    #[arg(long)]
    plugin_bin: PathBuf,
    /// Recorded time per slice.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Floor/plugin alternations per cell (order flips every round).
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    clients: Vec<usize>,
}

/// One server's share of a cell: latencies, calls and the server's CPU time.
struct Slice {
    hist: Histogram<u64>,
    calls: u64,
    cpu: Duration,
}

impl Slice {
    fn new() -> Self {
        Self {
            hist: crate::load::new_hist(),
            calls: 0,
            cpu: Duration::ZERO,
        }
    }

    fn merge(&mut self, other: Slice) {
        self.hist.add(&other.hist).expect("same histogram bounds");
        self.calls += other.calls;
        self.cpu += other.cpu;
    }
}

/// User + system CPU time of a process so far.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command name.
    let total = ticks(11) + ticks(12);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
    Ok(Duration::from_micros(total * 1_000_000 / hz))
}

/// `clients` connections, each making Status calls back to back for `duration`.
async fn slice(
    server: &Server,
    authority: &'static str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Slice> {
    let ListenAddr::Path(path) = &server.addr else {
        bail!("the shim benchmark needs a path socket");
    };
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut c = RawH2::connect(path).await?;
        // The raw client never returns flow-control credit: give the server all of it up front.
        c.send_frame(
            kind::WINDOW_UPDATE,
            0,
            0,
            &(i32::MAX as u32 - 65_535).to_be_bytes(),
        )
        .await?;
        conns.push(c);
    }
    let block = grpc_request(STATUS, authority);
    let cpu_before = cpu_time(server.pid())?;
    let end = Instant::now() + duration;
    let mut tasks = Vec::with_capacity(clients);
    for mut c in conns {
        let block = block.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = Slice::new();
            let mut stream_id = 1u32;
            while Instant::now() < end {
                let start = Instant::now();
                let out = c.unary(stream_id, &block, Framing::default(), &[]).await?;
                match out {
                    Outcome::Response(r) if r.grpc_status() == Some("0") => {}
                    other => bail!("Status call failed: {other:?}"),
                }
                s.hist.record(start.elapsed().as_nanos() as u64).ok();
                s.calls += 1;
                stream_id += 2;
            }
            Ok(s)
        }));
    }
    let mut total = Slice::new();
    for t in tasks {
        total.merge(t.await.context("client task")??);
    }
    total.cpu = cpu_time(server.pid())?.saturating_sub(cpu_before);
    Ok(total)
}

pub async fn run(args: ShimArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("keys");
    procs::keygen(&args.plugin_bin, &key_file)?;
    let mut plugin = procs::start_plugin(&args.plugin_bin, dir.path(), "plugin", &key_file, &[])?;
    let mut floor = procs::start_floor(dir.path())?;
    plugin.wait_healthy(Duration::from_secs(30)).await?;
    floor.wait_healthy(Duration::from_secs(30)).await?;
    let load_before = crate::procinfo::loadavg();
    println!(
        "| authority | clients | plugin p50 (µs) | floor p50 (µs) | p50 ratio | plugin CPU/call (µs) | floor CPU/call (µs) | CPU ratio | plugin calls/s | floor calls/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for authority in ["localhost", PATH_AUTHORITY] {
        for &clients in &args.clients {
            let (mut p, mut f) = (Slice::new(), Slice::new());
            for round in 0..args.rounds {
                // Warm-up slices are not recorded.
                let order: [bool; 2] = if round % 2 == 0 {
                    [true, false]
                } else {
                    [false, true]
                };
                for plugin_first in order {
                    if plugin_first {
                        slice(&plugin, authority, clients, args.duration / 10).await?;
                        p.merge(slice(&plugin, authority, clients, args.duration).await?);
                    } else {
                        slice(&floor, "localhost", clients, args.duration / 10).await?;
                        f.merge(slice(&floor, "localhost", clients, args.duration).await?);
                    }
                }
            }
            let us = |ns: u64| ns as f64 / 1000.0;
            let per_call = |s: &Slice| s.cpu.as_secs_f64() * 1e6 / s.calls.max(1) as f64;
            let rate =
                |s: &Slice| s.calls as f64 / (args.duration.as_secs_f64() * args.rounds as f64);
            let name = if authority == "localhost" {
                "`localhost`"
            } else {
                "path"
            };
            println!(
                "| {name} | {clients} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} | {:.0} | {:.0} |",
                us(p.hist.value_at_quantile(0.5)),
                us(f.hist.value_at_quantile(0.5)),
                p.hist.value_at_quantile(0.5) as f64 / f.hist.value_at_quantile(0.5).max(1) as f64,
                per_call(&p),
                per_call(&f),
                per_call(&p) / per_call(&f).max(f64::MIN_POSITIVE),
                rate(&p),
                rate(&f),
            );
        }
    }
    let load_after = crate::procinfo::loadavg();
    println!(
        "load average before {:.2}, after {:.2}; {} rounds of {:?} per server and cell",
        load_before[0], load_after[0], args.rounds, args.duration
    );
    plugin.stop();
    floor.stop();
    Ok(())
}
