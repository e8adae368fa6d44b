//! HTTP/2 conformance (h2spec, Go module github.com/summerwind/h2spec) of the real plugin, through
//! a loopback TCP-to-UNIX bridge, compared with the shim-less floor: a tonic server with the same
//! HTTP/2 settings and no `:authority` shim. Every case that passes on the floor must pass on the
//! plugin. h2spec is found via $KMS_TEST_H2SPEC, PATH or ~/go/bin (`make h2spec-deps` installs it);
//! KMS_TEST_OPT_OUT=h2spec skips the test.
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kms_plugin::protocol::server::ServerOptions;
use support::plugin::{Plugin, Setup};
use tokio::net::{TcpListener, UnixListener, UnixStream};

fn h2spec_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("KMS_TEST_H2SPEC") {
        return Some(PathBuf::from(p));
    }
    let in_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("h2spec"))
            .find(|p| p.is_file())
    });
    in_path.or_else(|| {
        let p = PathBuf::from(std::env::var_os("HOME")?).join("go/bin/h2spec");
        p.is_file().then_some(p)
    })
}

/// Forwards every loopback TCP connection to the UNIX socket `target`; returns the port. When the
/// server closes, the bridge half-closes toward the client and keeps reading what the client
/// still sends, so that the TCP side does not turn the close into a reset (which would hide the
/// server's last frames from h2spec).
async fn bridge(target: PathBuf) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let Ok(unix) = UnixStream::connect(&target).await else {
                    return;
                };
                let (mut tcp_r, mut tcp_w) = tcp.into_split();
                let (mut unix_r, mut unix_w) = unix.into_split();
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut unix_r, &mut tcp_w).await;
                    let _ = tcp_w.shutdown().await;
                });
                let mut buf = vec![0u8; 16 * 1024];
                let mut forwarding = true;
                let drain_until = tokio::time::Instant::now() + Duration::from_secs(30);
                while let Ok(Ok(n)) =
                    tokio::time::timeout_at(drain_until, tcp_r.read(&mut buf)).await
                {
                    if n == 0 {
                        break;
                    }
                    if forwarding && unix_w.write_all(&buf[..n]).await.is_err() {
                        forwarding = false;
                    }
                }
                let _ = unix_w.shutdown().await;
                let _ = down.await;
            });
        }
    });
    port
}

/// The floor: tonic with the plugin's HTTP/2 settings and services that only answer Status-like
/// calls (h2spec tests framing, not KMS), no shim.
async fn start_floor(dir: &Path) -> PathBuf {
    let path = dir.join("floor.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let o = ServerOptions::default();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let router = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(o.concurrency_per_connection)
        .max_concurrent_streams(o.max_concurrent_streams)
        .http2_max_header_list_size(o.max_header_list_bytes)
        .max_frame_size(o.max_frame_size)
        .http2_keepalive_interval(o.keepalive_interval)
        .http2_keepalive_timeout(Some(o.keepalive_timeout))
        .http2_max_local_error_reset_streams(Some(o.max_local_error_resets))
        .http2_max_pending_accept_reset_streams(Some(o.max_pending_accept_resets))
        .add_service(health);
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    path
}

/// Runs h2spec against `port` (only the `sections`, such as `http2/5.1.2`, if any); returns the
/// failed cases' names and how many cases ran.
fn failed_cases(
    bin: &Path,
    port: u16,
    sections: &[&str],
    report: &Path,
) -> (BTreeSet<String>, usize) {
    let out = Command::new(bin)
        .args(sections)
        // 5 s per case: on a loaded CI machine the default 2 s makes timing-dependent cases flap.
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-o", "5", "-j"])
        .arg(report)
        .output()
        .expect("run h2spec");
    let summary = String::from_utf8_lossy(&out.stdout);
    let xml = std::fs::read_to_string(report).expect("h2spec JUnit report");
    // <testcase package="..." classname="..." time="..."> ... <failure .../> ... </testcase>
    let mut failed = BTreeSet::new();
    let mut total = 0;
    for case in xml.split("<testcase ").skip(1) {
        total += 1;
        let body = case.split("</testcase>").next().unwrap_or(case);
        if body.contains("<failure") || body.contains("<error") {
            let attr = |name: &str| {
                body.split(&format!("{name}=\"")[..])
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("")
                    .to_string()
            };
            failed.insert(format!("{} {}", attr("package"), attr("classname")));
            if std::env::var_os("KMS_TEST_H2SPEC_VERBOSE").is_some() {
                eprintln!("FAILED {body}");
            }
        }
    }
    let expected = if sections.is_empty() { 100 } else { 0 };
    assert!(
        total > expected,
        "h2spec ran only {total} cases:\n{summary}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (failed, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2spec_passes_everything_the_shimless_floor_passes() {
    if support::external::opted_out("h2spec") {
        return;
    }
    let bin = h2spec_bin().unwrap_or_else(|| {
        panic!("h2spec not found (make h2spec-deps, or set KMS_TEST_H2SPEC, or KMS_TEST_OPT_OUT=h2spec)")
    });
    let setup = Setup::new();
    let plugin = Plugin::start(&setup.args(), setup.addr(), setup.dir.path()).await;
    let floor = start_floor(setup.dir.path()).await;
    let plugin_port = bridge(setup.socket.clone()).await;
    let floor_port = bridge(floor).await;
    let dir = setup.dir.path().to_path_buf();
    // Some cases depend on timing and fail now and then on either server (5.1.2, for one, fails
    // when the server answers the first streams before the last HEADERS arrives: about one run in
    // four on both). A case counts as a regression only if the plugin fails it in both full runs
    // and in every one of RERUNS targeted runs, while the floor never failed it.
    const RERUNS: usize = 6;
    let (floor_failed, worse, total) = tokio::task::spawn_blocking(move || {
        let (f1, total) = failed_cases(&bin, floor_port, &[], &dir.join("floor1.xml"));
        let (p1, _) = failed_cases(&bin, plugin_port, &[], &dir.join("plugin1.xml"));
        let (f2, _) = failed_cases(&bin, floor_port, &[], &dir.join("floor2.xml"));
        let (p2, _) = failed_cases(&bin, plugin_port, &[], &dir.join("plugin2.xml"));
        let mut floor: BTreeSet<String> = f1.union(&f2).cloned().collect();
        let mut worse: BTreeSet<String> = p1
            .intersection(&p2)
            .filter(|case| !floor.contains(*case))
            .cloned()
            .collect();
        for i in 0..RERUNS {
            if worse.is_empty() {
                break;
            }
            // The case name starts with its section ("http2/5.1.2 Sends HEADERS ...").
            let sections: BTreeSet<&str> = worse
                .iter()
                .filter_map(|case| case.split(' ').next())
                .collect();
            let sections: Vec<&str> = sections.into_iter().collect();
            let (f, _) = failed_cases(
                &bin,
                floor_port,
                &sections,
                &dir.join(format!("floor-r{i}.xml")),
            );
            let (p, _) = failed_cases(
                &bin,
                plugin_port,
                &sections,
                &dir.join(format!("plugin-r{i}.xml")),
            );
            floor.extend(f);
            worse.retain(|case| p.contains(case) && !floor.contains(case));
        }
        (floor, worse, total)
    })
    .await
    .unwrap();
    eprintln!(
        "h2spec: {total} cases; floor fails {}, plugin fails {} more",
        floor_failed.len(),
        worse.len()
    );
    assert!(
        worse.is_empty(),
        "cases that pass on the floor but fail on the plugin every time: {worse:#?}"
    );
    // The plugin is still healthy afterwards.
    plugin.wait_healthy(Duration::from_secs(10)).await;
}
