//! The HTTP/2 front door of the real `kms-plugin serve` under hostile clients (issue 18): each
//! attack runs for a bounded time next to a legitimate client, and the test asserts the plugin's
//! peak memory (VmHWM), that the legitimate calls keep succeeding, and how the attacker's
//! connection or stream ends.
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::plugin::{Plugin, Setup, BIN};
use support::raw_h2::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const STATUS: &str = "/v2.KeyManagementService/Status";
const PATH_AUTHORITY: &str = "/var/run/kms-plugin/kms.sock";
/// Bound on every network step.
const STEP: Duration = Duration::from_secs(10);
/// How long each attack runs.
const ATTACK: Duration = Duration::from_secs(2);
/// GOAWAY / RST_STREAM codes (RFC 9113 §7).
const PROTOCOL_ERROR: u32 = 0x1;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

struct Served {
    setup: Setup,
    plugin: Plugin,
    http: String,
}

impl Served {
    /// The binary with the local backend, /metrics on loopback and `extra` flags.
    async fn start(extra: &[&str]) -> Served {
        Self::start_with(extra, None).await
    }

    /// As [`Served::start`], with the file descriptor limit set to `nofile` if given.
    async fn start_with(extra: &[&str], nofile: Option<u32>) -> Served {
        let setup = Setup::new();
        let http = format!("127.0.0.1:{}", support::external::free_port());
        let mut args = setup.args();
        args.extend(["--http".to_string(), http.clone()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let plugin = match nofile {
            None => Plugin::start(&args, setup.addr(), setup.dir.path()).await,
            Some(n) => {
                let log = setup.dir.path().join("plugin.log");
                let file = std::fs::File::create(&log).unwrap();
                let child = Command::new("sh")
                    .arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(BIN)
                    .args(&args)
                    .env("KMS_PLUGIN_LOG_LEVEL", "debug")
                    .stdout(Stdio::from(file.try_clone().unwrap()))
                    .stderr(Stdio::from(file))
                    .spawn()
                    .unwrap();
                let p = Plugin {
                    child,
                    addr: setup.addr(),
                    log,
                };
                p.wait_healthy(Duration::from_secs(20)).await;
                p
            }
        };
        Served {
            setup,
            plugin,
            http,
        }
    }

    fn socket(&self) -> &Path {
        &self.setup.socket
    }

    fn pid(&self) -> u32 {
        self.plugin.child.id()
    }

    /// A `/proc/PID/status` field in KiB.
    fn proc_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    fn peak_mib(&self) -> u64 {
        self.proc_kib("VmHWM:") / 1024
    }

    /// CPU time the plugin used so far (user + system), in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    /// The value of `kms_plugin_NAME` (counters: `_total`) on /metrics.
    fn metric(&self, name: &str) -> f64 {
        let mut s = TcpStream::connect(&self.http).unwrap();
        s.set_read_timeout(Some(STEP)).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body.lines()
            .find_map(|l| {
                let (n, v) = l.rsplit_once(' ')?;
                (n == format!("kms_plugin_{name}") || n == format!("kms_plugin_{name}_total"))
                    .then(|| v.parse().ok())?
            })
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }

    async fn raw(&self) -> RawH2 {
        within(RawH2::connect(self.socket())).await.unwrap()
    }

    /// Status calls on one ordinary gRPC connection until `stop`; counts successes and failures.
    fn legit_client(&self) -> Legit {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let addr = self.setup.addr();
        let task = tokio::spawn({
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            async move {
                let ch = support::plugin::channel(&addr).await;
                let mut c = support::plugin::v2_client(ch);
                while !stop.load(Ordering::Relaxed) {
                    let r = tokio::time::timeout(
                        Duration::from_secs(3),
                        c.status(kms_plugin::proto::v2::StatusRequest {}),
                    )
                    .await;
                    match r {
                        Ok(Ok(_)) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    // About what an apiserver sends; leaves the CPU to the attack under test.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        Legit {
            stop,
            ok,
            failed,
            task,
        }
    }
}

struct Legit {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Legit {
    /// Stops the client and asserts that it made calls and none failed.
    async fn finish(self, what: &str) -> u64 {
        // At least one call must have had the chance to complete.
        let ok = self.ok.clone();
        support::wait_until(STEP, || ok.load(Ordering::Relaxed) > 0).await;
        self.stop.store(true, Ordering::Relaxed);
        within(self.task).await.unwrap();
        let (ok, failed) = (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        );
        assert!(
            ok > 0 && failed == 0,
            "{what}: legit calls ok {ok}, failed {failed}"
        );
        ok
    }
}

/// A Status request whose `:authority` is added to the client's dynamic table, followed by a
/// 3.9 KiB entry that later blocks refer to with one byte (index 62); both fit the 4 KiB table.
fn bomb_setup(authority: &str) -> Block {
    pseudo(STATUS)
        .literal(
            Indexing::Incremental,
            Name::Index(AUTHORITY),
            authority,
            false,
        )
        .grpc_tail()
        .literal(
            Indexing::Incremental,
            Name::Literal("x-big"),
            &"v".repeat(3900),
            false,
        )
}

/// A request that refers to the authority (index 63) and `refs` times to the 4 KiB entry.
fn bomb(refs: usize) -> Block {
    let mut b = pseudo(STATUS).indexed(63).grpc_tail();
    for _ in 0..refs {
        b = b.indexed(62);
    }
    b
}

fn status_ok(out: Outcome, what: &str) {
    match out {
        Outcome::Response(r) => assert_eq!(r.grpc_status(), Some("0"), "{what}: {r:?}"),
        other => panic!("{what}: {other:?}"),
    }
}

/// Reads until the connection ends; returns the GOAWAY code, if one came.
async fn goaway_code(c: &mut RawH2) -> Option<u32> {
    loop {
        match within(c.read_frame()).await {
            Ok(Some(f)) if f.kind == 0x7 => {
                return Some(u32::from_be_bytes(f.payload[4..8].try_into().unwrap()))
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn hpack_reference_bombs_are_bounded() {
    let p = Served::start(&[]).await;
    for authority in [PATH_AUTHORITY, "localhost"] {
        let legit = p.legit_client();
        let deadline = tokio::time::Instant::now() + ATTACK;
        let mut goaways = 0;
        while tokio::time::Instant::now() < deadline {
            let mut c = p.raw().await;
            let out = within(c.unary(1, &bomb_setup(authority), Framing::default(), &[]))
                .await
                .unwrap();
            status_ok(out, authority);
            // 1000 one-byte references: 4 MB of headers per request, past h2's abuse limit.
            for sid in (3..40).step_by(2) {
                if c.send_headers(sid, &bomb(1000), Framing::default())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            if goaway_code(&mut c).await == Some(ENHANCE_YOUR_CALM) {
                goaways += 1;
            }
        }
        assert!(goaways > 0, "{authority}: no GOAWAY ENHANCE_YOUR_CALM");
        let ok = legit.finish(authority).await;
        eprintln!("reference bombs, {authority}: {goaways} attack connections ended by GOAWAY, {ok} legit calls ok");
    }
    let peak = p.peak_mib();
    eprintln!("reference bombs: VmHWM {peak} MiB");
    assert!(peak < 64, "peak RSS {peak} MiB");
}

#[tokio::test]
async fn an_over_limit_block_after_a_rewrite_fails_only_its_stream() {
    let p = Served::start(&[]).await;
    for authority in [PATH_AUTHORITY, "localhost"] {
        let mut c = p.raw().await;
        let out = within(c.unary(1, &bomb_setup(authority), Framing::default(), &[]))
            .await
            .unwrap();
        status_ok(out, authority);
        // 12 references to the 4 KiB entry: 48 KiB of headers, over the 16 KiB limit but not
        // abusive. h2 answers 431 on the stream; the connection keeps serving.
        let out = within(c.unary(3, &bomb(12), Framing::default(), &[]))
            .await
            .unwrap();
        match &out {
            Outcome::Response(r) => assert_eq!(r.field(":status"), Some("431"), "{r:?}"),
            Outcome::Reset(code) => assert_eq!(*code, REFUSED_STREAM),
            other => panic!("{authority}: {other:?}"),
        }
        let out = within(c.unary(5, &bomb(0), Framing::default(), &[]))
            .await
            .unwrap();
        status_ok(out, authority);
    }
    assert!(p.metric("authority_rewrites") >= 2.0);
    assert_eq!(p.metric("authority_shim_errors"), 0.0);
}

#[tokio::test]
async fn shim_errors_end_the_connection_with_goaway_log_and_metric() {
    let p = Served::start(&[]).await;
    let mut c = p.raw().await;
    let out = within(c.unary(
        1,
        &grpc_request(STATUS, PATH_AUTHORITY),
        Framing::default(),
        &[],
    ))
    .await
    .unwrap();
    status_ok(out, "rewritten call");
    // A reference past the end of the dynamic table.
    within(c.send_headers(
        3,
        &Block::new().indexed(METHOD_POST).indexed(99),
        Framing::default(),
    ))
    .await
    .unwrap();
    assert_eq!(goaway_code(&mut c).await, Some(PROTOCOL_ERROR));
    assert_eq!(p.metric("authority_shim_errors"), 1.0);
    assert_eq!(p.metric("authority_rewrites"), 1.0);
    assert_eq!(p.metric("authority_shim_rewriting_connections"), 1.0);
    support::wait_until(STEP, || {
        p.plugin.log_text().contains("violated the protocol")
    })
    .await;
}

#[tokio::test]
async fn continuation_floods_are_refused_like_h2() {
    let p = Served::start(&[]).await;
    for authority in [PATH_AUTHORITY, "localhost"] {
        let legit = p.legit_client();
        let mut c = p.raw().await;
        let framing = Framing {
            fragments: 64,
            ..Framing::default()
        };
        let block = grpc_request(STATUS, authority);
        within(c.send_headers(1, &block, framing)).await.unwrap();
        assert_eq!(
            goaway_code(&mut c).await,
            Some(ENHANCE_YOUR_CALM),
            "{authority}"
        );
        // Within h2's allowance (5 CONTINUATIONs) the same block is served.
        let mut c = p.raw().await;
        let framing = Framing {
            fragments: 6,
            ..Framing::default()
        };
        let out = within(c.unary(1, &block, framing, &[])).await.unwrap();
        status_ok(out, authority);
        legit.finish(authority).await;
    }
}

#[tokio::test]
async fn pipelined_calls_without_flow_control_window_are_bounded() {
    let p = Served::start(&[]).await;
    let legit = p.legit_client();
    let block = grpc_request(STATUS, "localhost");
    let deadline = tokio::time::Instant::now() + ATTACK;
    let (mut refused, mut streams) = (0, 0u64);
    while tokio::time::Instant::now() < deadline {
        let mut c = p.raw().await;
        // SETTINGS_INITIAL_WINDOW_SIZE = 0: the server may never send response DATA.
        within(c.send_frame(0x4, 0, 0, &[0, 4, 0, 0, 0, 0]))
            .await
            .unwrap();
        let mut sid = 1u32;
        'conn: while tokio::time::Instant::now() < deadline && sid < 1 << 20 {
            let mut buf = RawFrames::default();
            for _ in 0..100 {
                buf.headers(sid, &block.0);
                buf.data_end(sid, &[0, 0, 0, 0, 0]);
                sid += 2;
                streams += 1;
            }
            if within(c.send_raw(&buf.0)).await.is_err() {
                break;
            }
            // Drain what the server sent so far (resets of the streams beyond the cap).
            while let Ok(r) = tokio::time::timeout(Duration::from_millis(1), c.read_frame()).await {
                match r {
                    Ok(Some(f)) if f.kind == 0x3 || f.kind == 0x7 => refused += 1,
                    Ok(Some(_)) => {}
                    _ => break 'conn,
                }
            }
        }
    }
    eprintln!("{streams} streams sent, {refused} resets or GOAWAYs");
    assert!(refused > 0, "no stream was refused beyond the cap");
    let ok = legit.finish("pipelined").await;
    let peak = p.peak_mib();
    eprintln!("pipelined: VmHWM {peak} MiB, {ok} legit calls ok");
    assert!(peak < 64, "peak RSS {peak} MiB");
}

#[tokio::test]
async fn requests_h2_resets_itself_end_in_goaway() {
    let p = Served::start(&[]).await;
    let legit = p.legit_client();
    let mut c = p.raw().await;
    // `te: gzip` is malformed in HTTP/2: h2 resets each such stream itself.
    let block = pseudo(STATUS)
        .literal(
            Indexing::Without,
            Name::Index(AUTHORITY),
            "localhost",
            false,
        )
        .literal(Indexing::Without, Name::Literal("te"), "gzip", false);
    let mut sid = 1u32;
    let mut code = None;
    while sid < 8000 && code.is_none() {
        let mut buf = RawFrames::default();
        for _ in 0..200 {
            buf.headers(sid, &block.0);
            sid += 2;
        }
        if c.send_raw(&buf.0).await.is_err() {
            code = goaway_code(&mut c).await;
            break;
        }
        while let Ok(r) = tokio::time::timeout(Duration::from_millis(20), c.read_frame()).await {
            match r {
                Ok(Some(f)) if f.kind == 0x7 => {
                    code = Some(u32::from_be_bytes(f.payload[4..8].try_into().unwrap()));
                    break;
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }
    assert_eq!(code, Some(ENHANCE_YOUR_CALM), "after {} streams", sid / 2);
    eprintln!("self resets: GOAWAY after at most {} streams", sid / 2);
    legit.finish("self resets").await;
}

#[tokio::test]
async fn idle_connections_cost_little_and_buffers_shrink_after_a_burst() {
    let p = Served::start(&["--max-connections", "5000"]).await;
    let n = 1000;
    let before = p.proc_kib("VmRSS:");
    let mut conns = Vec::with_capacity(n);
    // Half make one rewritten call with 6 KiB of headers (a burst through the shim's buffers),
    // half only say hello; then all sit idle.
    let big = "y".repeat(6000);
    for i in 0..n {
        let mut c = p.raw().await;
        if i % 2 == 0 {
            let block = pseudo(STATUS)
                .literal(
                    Indexing::Without,
                    Name::Index(AUTHORITY),
                    PATH_AUTHORITY,
                    false,
                )
                .grpc_tail()
                .literal(Indexing::Without, Name::Literal("x-pad"), &big, false);
            let sid = 1;
            let out = within(c.unary(sid, &block, Framing::default(), &[]))
                .await
                .unwrap();
            status_ok(out, "burst");
        }
        conns.push(c);
    }
    let legit = p.legit_client();
    support::wait_until(STEP, || p.metric("connections_open") >= n as f64).await;
    let after = p.proc_kib("VmRSS:");
    let per_conn = after.saturating_sub(before) * 1024 / n as u64;
    eprintln!("idle connections: {per_conn} bytes of RSS per connection");
    assert!(per_conn < 48 * 1024, "{per_conn} bytes per idle connection");
    legit.finish("idle connections").await;
    drop(conns);
}

#[tokio::test]
async fn connections_beyond_the_cap_are_refused_and_counted() {
    let p = Served::start(&["--max-connections", "4"]).await;
    // The start-up health checks' connections are gone first.
    support::wait_until(STEP, || p.metric("connections_open") == 0.0).await;
    let mut held = vec![];
    for _ in 0..4 {
        let mut c = p.raw().await;
        let block = grpc_request(STATUS, "localhost");
        status_ok(
            within(c.unary(1, &block, Framing::default(), &[]))
                .await
                .unwrap(),
            "within the cap",
        );
        held.push(c);
    }
    assert_eq!(p.metric("connections_open"), 4.0);
    // The fifth is accepted by the kernel, then closed without a byte.
    let mut extra = within(UnixStream::connect(p.socket())).await.unwrap();
    let mut buf = [0u8; 64];
    let n = within(extra.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0);
    assert!(p.metric("connections_refused") >= 1.0);
    drop(held);
    support::wait_until(STEP, || p.metric("connections_open") < 4.0).await;
    let legit = p.legit_client();
    tokio::time::sleep(Duration::from_millis(50)).await;
    legit.finish("after the cap").await;
}

#[tokio::test]
async fn fd_exhaustion_pauses_accept_instead_of_spinning() {
    let p = Served::start_with(&["--max-connections", "1000"], Some(64)).await;
    let legit = p.legit_client();
    // Wait until the legit client is connected, so its connection exists before fds run out.
    support::wait_until(STEP, || legit.ok.load(Ordering::Relaxed) > 0).await;
    let mut idle = vec![];
    for _ in 0..100 {
        match within(UnixStream::connect(p.socket())).await {
            Ok(c) => idle.push(c),
            // The listen backlog is full: the plugin is not accepting.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(idle.len() > 64, "only {} connections", idle.len());
    for c in &mut idle {
        let _ = c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    }
    // /metrics cannot accept either while descriptors are exhausted: watch the log instead.
    support::wait_until(STEP, || p.plugin.log_text().contains("pausing accept")).await;
    let ticks = p.cpu_ticks();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = p.cpu_ticks() - ticks;
    eprintln!("fd exhaustion: {used} CPU ticks in 1 s");
    // A spinning accept loop burns a whole core (100 ticks per second).
    assert!(used < 50, "{used} ticks of CPU in 1 s");
    // The /metrics listener runs out too: it pauses and says so once, not once per attempt.
    let mut http_conns = vec![];
    for _ in 0..4 {
        if let Ok(Ok(c)) = tokio::time::timeout(STEP, tokio::net::TcpStream::connect(&p.http)).await
        {
            http_conns.push(c);
        }
    }
    support::wait_until(STEP, || p.plugin.log_text().contains("http accept failed")).await;
    let ticks = p.cpu_ticks();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = p.cpu_ticks() - ticks;
    assert!(
        used < 50,
        "{used} ticks of CPU in 1 s with /metrics out of descriptors too"
    );
    let warnings = p.plugin.log_text().matches("http accept failed").count();
    assert_eq!(warnings, 1, "one warning per episode, not one per attempt");
    drop(http_conns);
    drop(idle);
    legit.finish("fd exhaustion").await;
    // New connections are served again once descriptors are free.
    support::wait_until(STEP, || {
        std::os::unix::net::UnixStream::connect(p.socket()).is_ok()
    })
    .await;
    let mut c = p.raw().await;
    let out = within(c.unary(
        1,
        &grpc_request(STATUS, "localhost"),
        Framing::default(),
        &[],
    ))
    .await
    .unwrap();
    status_ok(out, "after fds are free");
    // And /metrics answers again, counting the gRPC listener's pauses.
    assert!(p.metric("accept_backoffs") >= 1.0);
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed() {
    let p = Served::start(&["--handshake-timeout", "300ms", "--idle-timeout", "700ms"]).await;
    // No preface: closed after the handshake timeout.
    let mut silent = within(UnixStream::connect(p.socket())).await.unwrap();
    let mut sink = vec![];
    // The server's SETTINGS, then the end of the connection.
    let _ = within(silent.read_to_end(&mut sink)).await;
    assert_eq!(p.metric("connection_handshake_timeouts"), 1.0);
    // One call, then silence: closed after the idle timeout.
    let mut c = p.raw().await;
    let out = within(c.unary(
        1,
        &grpc_request(STATUS, "localhost"),
        Framing::default(),
        &[],
    ))
    .await
    .unwrap();
    status_ok(out, "before idling");
    // The server ends the connection (bounded by STEP inside).
    let _ = goaway_code(&mut c).await;
    assert!(p.metric("connections_idle_closed") >= 1.0);
}

/// Frames built in one buffer, to send many at once.
#[derive(Default)]
struct RawFrames(Vec<u8>);

impl RawFrames {
    fn frame(&mut self, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        kms_plugin::protocol::authority::frame::FrameHeader {
            len: payload.len() as u32,
            kind,
            flags,
            stream_id,
        }
        .write(&mut self.0);
        self.0.extend_from_slice(payload);
    }

    /// HEADERS with END_HEADERS.
    fn headers(&mut self, stream_id: u32, block: &[u8]) {
        self.frame(0x1, 0x4, stream_id, block);
    }

    /// DATA with END_STREAM.
    fn data_end(&mut self, stream_id: u32, payload: &[u8]) {
        self.frame(0x0, 0x1, stream_id, payload);
    }
}
