//! kms-bench: load generator, floor server and scenario runner for kms-plugin benchmarks.
//!
//! `kms-bench run` starts the real `kms-plugin serve` (local key backend) and a floor server (`kms-bench
//! floor`: same tonic server set-up, handlers that echo their input), then measures each scenario on both,
//! alternating floor and plugin slices so machine noise hits both. Load is closed-loop: N workers, each
//! with one request in flight; by default each worker has its own connection (N independent clients),
//! and extra rows put N streams on one shared connection, as a single kube-apiserver does.
#![forbid(unsafe_code)]

mod cold;
mod floor;
mod latency;
mod load;
mod procinfo;
mod procs;
mod report;
mod shim;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use clap::{Parser, Subcommand};
use kms_plugin::cli::client;
use kms_plugin::proto::{v1beta1, v2};
use kms_plugin::protocol::socket::ListenAddr;
use rand::RngCore;
use serde::Serialize;

use load::{Op, Payloads, Sample};
use report::Row;

#[derive(Parser)]
#[command(name = "kms-bench", about = "Benchmarks for kms-plugin (not shipped)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the floor: a trivial KMS v2/v1beta1 echo server built like the plugin.
    Floor {
        #[arg(long)]
        listen: ListenAddr,
    },
    /// Run the scenarios against the plugin binary and the floor; write JSON and SVG.
    Run(RunArgs),
    /// What the `:authority` shim costs: raw Status calls with `localhost` and path authorities.
    Shim(shim::ShimArgs),
    /// Load one running server (for profiling): one operation, fixed concurrency and duration.
    Load {
        #[arg(long)]
        listen: ListenAddr,
        /// Take the request bodies from this server (a plugin) instead of `--listen`.
        #[arg(long)]
        payloads_from: Option<ListenAddr>,
        #[arg(long, default_value = "v2-decrypt")]
        op: String,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Connections (default: one per worker).
        #[arg(long)]
        connections: Option<usize>,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// The `kms-plugin` binary to benchmark (a release build for real numbers).
    #[arg(long)]
    plugin_bin: PathBuf,
    /// Recorded time per slice; each (scenario, concurrency) runs `rounds` slices on each server.
    #[arg(long, default_value = "750ms", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unrecorded warm-up at the start of each slice.
    #[arg(long, default_value = "150ms", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Floor/plugin alternations per measurement (order flips every round).
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// Concurrency levels also measured with all streams on ONE connection (Status and v2 Decrypt).
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    shared_connection: Vec<usize>,
    /// Cold start: ciphertexts made by the previous process.
    #[arg(long, default_value_t = 10_000)]
    cold_count: usize,
    /// Cold start: --kek-max-uses of the previous process (count / this = distinct local KEKs).
    #[arg(long, default_value_t = 500)]
    cold_kek_max_uses: u64,
    /// Cold start: latency injected into every backend call.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    cold_latency: Duration,
    /// Skip the load scenarios (1-3) or the cold start (4).
    #[arg(long)]
    skip_load: bool,
    #[arg(long)]
    skip_cold: bool,
    #[arg(long, default_value = "bench/results/latest.json")]
    out: PathBuf,
    #[arg(long, default_value = "bench/results/latency.svg")]
    svg: PathBuf,
    /// A few seconds in all: checks that the harness works (no errors, backend calls = distinct KEKs).
    #[arg(long)]
    smoke: bool,
}

#[derive(Serialize)]
struct Target {
    name: String,
    value: f64,
    limit: String,
    pass: bool,
}

#[derive(Serialize, Default)]
struct Memory {
    plugin_idle_rss_kib: u64,
    floor_idle_rss_kib: u64,
    plugin_rss_after_load_kib: u64,
    plugin_peak_rss_kib: u64,
    heaviest_scenario: String,
    heaviest_scenario_max_rss_kib: u64,
}

#[derive(Serialize)]
struct Results {
    generated_unix: u64,
    machine: procinfo::Machine,
    load_before: [f64; 3],
    load_after: [f64; 3],
    plugin_bin: String,
    settings: serde_json::Value,
    rows: Vec<Row>,
    cold_start: Vec<cold::ColdResult>,
    memory: Memory,
    targets: Vec<Target>,
    invariant_failures: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Floor { listen } => floor::run(listen),
        Cmd::Shim(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(shim::run(args)),
        Cmd::Load {
            listen,
            payloads_from,
            op,
            concurrency,
            connections,
            duration,
        } => {
            let op = Op::ALL
                .into_iter()
                .find(|o| o.name() == op)
                .with_context(|| format!("unknown --op {op}"))?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let p = Arc::new(payloads(payloads_from.as_ref().unwrap_or(&listen)).await?);
                let s = load::measure(
                    &listen,
                    op,
                    p,
                    concurrency,
                    connections.unwrap_or(concurrency),
                    Duration::from_millis(200),
                    duration,
                    None,
                )
                .await?;
                let st = report::Stats::from(&s);
                println!(
                    "{} x{concurrency}: {:.0} ops/s, p50 {:.1} us, p99 {:.1} us, p999 {:.1} us, errors {}",
                    op.name(),
                    st.ops_per_sec,
                    st.p50_us,
                    st.p99_us,
                    st.p999_us,
                    st.errors
                );
                anyhow::Ok(())
            })
        }
        Cmd::Run(mut args) => {
            if args.smoke {
                args.duration = Duration::from_millis(300);
                args.warmup = Duration::from_millis(50);
                args.rounds = 1;
                args.concurrency = vec![1, 4];
                args.shared_connection = vec![4];
                args.cold_count = 300;
                args.cold_kek_max_uses = 50;
            }
            // The load generator gets the same runtime shape as the servers (one worker per core).
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let failures = rt.block_on(run(args))?;
            if failures.is_empty() {
                Ok(())
            } else {
                for f in &failures {
                    eprintln!("INVARIANT FAILED: {f}");
                }
                std::process::exit(1);
            }
        }
    }
}

/// Encrypts one seed per API through the plugin and checks that Decrypt returns it.
async fn payloads(addr: &ListenAddr) -> anyhow::Result<Payloads> {
    let ch = client::connect(addr).await?;
    let mut c2 = v2::key_management_service_client::KeyManagementServiceClient::new(ch.clone());
    let mut c1 = v1beta1::key_management_service_client::KeyManagementServiceClient::new(ch);
    let mut seed = vec![0u8; 32];
    rand::thread_rng().fill_bytes(&mut seed);
    let e2 = c2
        .encrypt(v2::EncryptRequest {
            plaintext: seed.clone(),
            uid: "bench".into(),
        })
        .await?
        .into_inner();
    let d2 = c2
        .decrypt(v2::DecryptRequest {
            ciphertext: e2.ciphertext.clone(),
            uid: "bench".into(),
            key_id: e2.key_id.clone(),
            annotations: Default::default(),
        })
        .await?
        .into_inner();
    ensure!(
        d2.plaintext == seed,
        "v2 round trip returned the wrong plaintext"
    );
    let e1 = c1
        .encrypt(v1beta1::EncryptRequest {
            version: "v1beta1".into(),
            plain: seed.clone(),
        })
        .await?
        .into_inner();
    let d1 = c1
        .decrypt(v1beta1::DecryptRequest {
            version: "v1beta1".into(),
            cipher: e1.cipher.clone(),
        })
        .await?
        .into_inner();
    ensure!(
        d1.plain == seed,
        "v1 round trip returned the wrong plaintext"
    );
    Ok(Payloads {
        seed,
        v2_ciphertext: e2.ciphertext,
        v2_key_id: e2.key_id,
        v1_ciphertext: e1.cipher,
    })
}

/// One (scenario, concurrency, connections) cell: floor and plugin slices, alternating.
async fn cell(
    args: &RunArgs,
    plugin: &procs::Server,
    floor: &procs::Server,
    op: Op,
    payloads: &Arc<Payloads>,
    concurrency: usize,
    connections: usize,
) -> anyhow::Result<Row> {
    let (mut p, mut f) = (Sample::empty(), Sample::empty());
    for round in 0..args.rounds {
        let plugin_first = round % 2 == 1;
        for which in 0..2 {
            let on_plugin = (which == 0) == plugin_first;
            let (server, pid) = if on_plugin {
                (plugin, Some(plugin.pid()))
            } else {
                (floor, None)
            };
            let s = load::measure(
                &server.addr,
                op,
                payloads.clone(),
                concurrency,
                connections,
                args.warmup,
                args.duration,
                pid,
            )
            .await
            .with_context(|| format!("{} on {}", op.name(), server.name))?;
            if on_plugin {
                p.merge(s);
            } else {
                f.merge(s);
            }
        }
    }
    Ok(Row::new(op.name(), concurrency, connections, &p, &f))
}

async fn run(args: RunArgs) -> anyhow::Result<Vec<String>> {
    let load_before = procinfo::loadavg();
    let machine = procinfo::machine();
    eprintln!(
        "machine: {} x {}, {} MiB; load {:?}",
        machine.nproc, machine.cpu_model, machine.mem_total_mib, load_before
    );
    let dir = tempfile::Builder::new().prefix("kms-bench").tempdir()?;
    let key_file = dir.path().join("kek.json");
    procs::keygen(&args.plugin_bin, &key_file)?;
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    let mut memory = Memory::default();

    if !args.skip_load {
        let mut plugin =
            procs::start_plugin(&args.plugin_bin, dir.path(), "plugin", &key_file, &[])?;
        let mut floor = procs::start_floor(dir.path())?;
        plugin.wait_healthy(Duration::from_secs(30)).await?;
        floor.wait_healthy(Duration::from_secs(30)).await?;
        // Idle: healthy, one Status answered, nothing else; give start-up allocations a moment to settle.
        tokio::time::sleep(Duration::from_millis(500)).await;
        memory.plugin_idle_rss_kib = procinfo::rss_kib(plugin.pid()).unwrap_or(0);
        memory.floor_idle_rss_kib = procinfo::rss_kib(floor.pid()).unwrap_or(0);
        eprintln!(
            "idle RSS: plugin {} KiB, floor {} KiB",
            memory.plugin_idle_rss_kib, memory.floor_idle_rss_kib
        );
        let payloads = Arc::new(payloads(&plugin.addr).await?);
        eprintln!(
            "v2 ciphertext {} bytes, v1 ciphertext {} bytes",
            payloads.v2_ciphertext.len(),
            payloads.v1_ciphertext.len()
        );
        eprintln!("{}", report::table_header());
        for op in Op::ALL {
            let mut cells: Vec<(usize, usize)> = args.concurrency.iter().map(|&n| (n, n)).collect();
            if matches!(op, Op::Status | Op::V2Decrypt) {
                cells.extend(args.shared_connection.iter().map(|&n| (n, 1)));
            }
            for (n, conns) in cells {
                let row = cell(&args, &plugin, &floor, op, &payloads, n, conns).await?;
                eprintln!("{}", report::table_line(&row));
                rows.push(row);
            }
        }
        memory.plugin_rss_after_load_kib = procinfo::rss_kib(plugin.pid()).unwrap_or(0);
        memory.plugin_peak_rss_kib = procinfo::hwm_kib(plugin.pid()).unwrap_or(0);
        if let Some(r) = rows
            .iter()
            .max_by_key(|r| r.plugin.max_rss_kib.unwrap_or(0))
        {
            memory.heaviest_scenario = format!(
                "{} x{} ({} connections)",
                r.scenario, r.concurrency, r.connections
            );
            memory.heaviest_scenario_max_rss_kib = r.plugin.max_rss_kib.unwrap_or(0);
        }
        eprintln!(
            "RSS after load {} KiB, peak (VmHWM) {} KiB, heaviest {} at {} KiB",
            memory.plugin_rss_after_load_kib,
            memory.plugin_peak_rss_kib,
            memory.heaviest_scenario,
            memory.heaviest_scenario_max_rss_kib
        );
        plugin.stop();
        floor.stop();
        for r in &rows {
            if r.plugin.errors + r.floor.errors > 0 {
                failures.push(format!(
                    "{} x{}: {} plugin errors, {} floor errors",
                    r.scenario, r.concurrency, r.plugin.errors, r.floor.errors
                ));
            }
            if r.plugin.ops == 0 || r.floor.ops == 0 {
                failures.push(format!(
                    "{} x{}: no requests completed",
                    r.scenario, r.concurrency
                ));
            }
        }
    }

    let mut cold_results = Vec::new();
    if !args.skip_cold {
        let corpus = cold::make_corpus(
            &args.plugin_bin,
            dir.path(),
            &key_file,
            args.cold_count,
            args.cold_kek_max_uses,
        )
        .await?;
        eprintln!(
            "cold start: {} ciphertexts under {} distinct local KEKs, backend latency {:?}",
            corpus.items.len(),
            corpus.distinct_keks,
            args.cold_latency
        );
        let variants: &[(&'static str, usize)] = if args.smoke {
            &[("ordered", 1), ("shuffled", 4)]
        } else {
            &[("ordered", 1), ("ordered", 16), ("shuffled", 16)]
        };
        for &(order, conc) in variants {
            let r = cold::run_one(
                dir.path(),
                &key_file,
                &corpus,
                order,
                conc,
                args.cold_latency,
            )
            .await?;
            eprintln!(
                "cold start {order} x{conc}: cold {:.3} s (backend busy {:.3} s), warm {:.3} s, unwraps {} (distinct KEKs {}), KEKs x latency {:.3} s",
                r.cold_seconds,
                r.backend_busy_seconds,
                r.warm_seconds,
                r.decrypt_calls.unwraps,
                r.distinct_local_keks,
                r.expected_backend_seconds
            );
            if r.decrypt_calls.unwraps != r.distinct_local_keks as u64
                || r.decrypt_calls.wraps + r.decrypt_calls.probes != 0
            {
                failures.push(format!(
                    "cold start {order} x{conc}: backend calls {:?}, expected {} unwraps only",
                    r.decrypt_calls, r.distinct_local_keks
                ));
            }
            cold_results.push(r);
        }
    }

    let targets = targets(&rows, &cold_results, &memory);
    for t in &targets {
        eprintln!(
            "target {:<45} {:>10.2} (limit {}) {}",
            t.name,
            t.value,
            t.limit,
            if t.pass { "PASS" } else { "MISS" }
        );
    }
    let load_after = procinfo::loadavg();
    eprintln!("load after: {load_after:?}");
    let results = Results {
        generated_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        machine,
        load_before,
        load_after,
        plugin_bin: args.plugin_bin.display().to_string(),
        settings: serde_json::json!({
            "slice_seconds": args.duration.as_secs_f64(),
            "warmup_seconds": args.warmup.as_secs_f64(),
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "shared_connection": args.shared_connection,
            "request_timeout_seconds": load::REQUEST_TIMEOUT.as_secs_f64(),
            "cold_count": args.cold_count,
            "cold_kek_max_uses": args.cold_kek_max_uses,
            "cold_latency_ms": args.cold_latency.as_secs_f64() * 1e3,
            "smoke": args.smoke,
        }),
        rows,
        cold_start: cold_results,
        memory,
        targets,
        invariant_failures: failures.clone(),
    };
    for path in [&args.out, &args.svg] {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&results)? + "\n")?;
    if !results.rows.is_empty() {
        let title = format!(
            "kms-plugin vs floor: latency vs concurrency ({} x {}, load {:.1})",
            results.machine.nproc, results.machine.cpu_model, load_before[0]
        );
        std::fs::write(&args.svg, report::svg(&results.rows, &title))?;
    }
    eprintln!("wrote {} and {}", args.out.display(), args.svg.display());
    Ok(failures)
}

fn targets(rows: &[Row], cold: &[cold::ColdResult], memory: &Memory) -> Vec<Target> {
    let mut out = Vec::new();
    for r in rows
        .iter()
        .filter(|r| matches!(r.scenario, "status" | "v2-decrypt") && r.connections == r.concurrency)
    {
        out.push(Target {
            name: format!("{} x{} p50 plugin/floor", r.scenario, r.concurrency),
            value: r.p50_ratio,
            limit: "<= 1.5".into(),
            pass: r.p50_ratio <= 1.5,
        });
    }
    for r in rows
        .iter()
        .filter(|r| r.scenario == "v2-decrypt" && r.concurrency == 16)
    {
        out.push(Target {
            name: format!("v2-decrypt x16 ({} conns) ops/s", r.connections),
            value: r.plugin.ops_per_sec,
            limit: ">= 30000".into(),
            pass: r.plugin.ops_per_sec >= 30_000.0,
        });
    }
    for c in cold {
        // Cold start is dominated by the backend when the cold pass costs no more than the warm pass
        // plus the time spent waiting for the backend, and that wait is about KEKs x latency or less.
        let overhead = c.cold_seconds - c.warm_seconds - c.backend_busy_seconds;
        out.push(Target {
            name: format!(
                "cold start {} x{}: backend busy / (KEKs x latency)",
                c.order, c.concurrency
            ),
            value: c.backend_busy_seconds / c.expected_backend_seconds,
            limit: "<= 1.25".into(),
            pass: c.backend_busy_seconds <= c.expected_backend_seconds * 1.25,
        });
        out.push(Target {
            name: format!(
                "cold start {} x{}: cold - warm - backend busy (s)",
                c.order, c.concurrency
            ),
            value: overhead,
            limit: "~0 (<= 0.1 x cold)".into(),
            pass: overhead <= 0.1 * c.cold_seconds,
        });
    }
    if memory.plugin_idle_rss_kib > 0 {
        out.push(Target {
            name: "idle RSS MiB".into(),
            value: memory.plugin_idle_rss_kib as f64 / 1024.0,
            limit: "< 20".into(),
            pass: memory.plugin_idle_rss_kib < 20 * 1024,
        });
    }
    out
}
