//! The `:authority` shim in front of a real tonic server on a UNIX socket, driven by a raw HTTP/2
//! client that sends exactly what kube-apiserver's older KMS clients send.
mod support;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use kms_plugin::proto::v2::key_management_service_client::KeyManagementServiceClient;
use kms_plugin::proto::v2::key_management_service_server::{
    KeyManagementService, KeyManagementServiceServer,
};
use kms_plugin::proto::v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use kms_plugin::protocol::authority::{AuthorityShim, Limits};
use prost::Message;
use support::raw_h2::*;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;
use tonic::transport::server::UdsConnectInfo;
use tonic::transport::{Endpoint, Server};
use tonic::{Request, Response as TonicResponse, Status};

const STATUS: &str = "/v2.KeyManagementService/Status";
const ENCRYPT: &str = "/v2.KeyManagementService/Encrypt";
const PATH_AUTHORITY: &str = "/tmp/x/kms.sock";
/// Bound on every network step, so a broken shim fails the test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);

/// A trivial KMS: Encrypt reverses the plaintext.
struct TestKms;

#[tonic::async_trait]
impl KeyManagementService for TestKms {
    async fn status(
        &self,
        r: Request<StatusRequest>,
    ) -> Result<TonicResponse<StatusResponse>, Status> {
        // The shim must hand tonic the socket's connect info (peer credentials) unchanged.
        let peer_uid = r
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| c.uid());
        let healthz = if peer_uid == Some(nix::unistd::getuid().as_raw()) {
            "ok".to_string()
        } else {
            format!("peer uid {peer_uid:?}")
        };
        Ok(TonicResponse::new(StatusResponse {
            version: "v2".into(),
            healthz,
            key_id: "test-key".into(),
        }))
    }

    async fn decrypt(
        &self,
        r: Request<DecryptRequest>,
    ) -> Result<TonicResponse<DecryptResponse>, Status> {
        let mut plaintext = r.into_inner().ciphertext;
        plaintext.reverse();
        Ok(TonicResponse::new(DecryptResponse { plaintext }))
    }

    async fn encrypt(
        &self,
        r: Request<EncryptRequest>,
    ) -> Result<TonicResponse<EncryptResponse>, Status> {
        let mut ciphertext = r.into_inner().plaintext;
        ciphertext.reverse();
        Ok(TonicResponse::new(EncryptResponse {
            ciphertext,
            key_id: "test-key".into(),
            annotations: Default::default(),
        }))
    }
}

struct TestServer {
    _dir: tempfile::TempDir,
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl TestServer {
    async fn start(shim: bool) -> Self {
        Self::start_with(shim, Limits::default()).await
    }

    async fn start_with(shim: bool, limits: Limits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let signal = async {
            let _ = stopped.await;
        };
        let router = Server::builder()
            .http2_max_header_list_size(64 * 1024)
            .add_service(KeyManagementServiceServer::new(TestKms));
        let incoming = UnixListenerStream::new(listener);
        let task = if shim {
            let incoming =
                incoming.map(move |conn| conn.map(|c| AuthorityShim::with_limits(c, limits)));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal))
        } else {
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal))
        };
        Self {
            _dir: dir,
            path,
            stop: Some(stop),
            task,
        }
    }

    async fn client(&self) -> RawH2 {
        within(RawH2::connect(&self.path)).await.unwrap()
    }

    async fn stop(mut self) {
        assert!(!self.task.is_finished(), "server task ended early");
        let _ = self.stop.take().unwrap().send(());
        within(&mut self.task).await.unwrap().unwrap();
    }
}

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

fn status_ok(outcome: Outcome) -> StatusResponse {
    match outcome {
        Outcome::Response(r) => {
            assert_eq!(r.grpc_status(), Some("0"), "{r:?}");
            let status = StatusResponse::decode(r.message().expect("no message")).unwrap();
            assert_eq!(status.healthz, "ok");
            status
        }
        other => panic!("call failed: {other:?}"),
    }
}

fn encrypt_ok(outcome: Outcome) -> EncryptResponse {
    match outcome {
        Outcome::Response(r) => {
            assert_eq!(r.grpc_status(), Some("0"), "{r:?}");
            EncryptResponse::decode(r.message().expect("no message")).unwrap()
        }
        other => panic!("call failed: {other:?}"),
    }
}

fn encrypt_request(plaintext: &[u8]) -> Vec<u8> {
    EncryptRequest {
        plaintext: plaintext.to_vec(),
        uid: "uid-1".into(),
    }
    .encode_to_vec()
}

#[tokio::test]
async fn path_authority_succeeds_through_the_shim() {
    let server = TestServer::start(true).await;
    let mut c = server.client().await;
    let resp = status_ok(
        within(c.unary(
            1,
            &grpc_request(STATUS, PATH_AUTHORITY),
            Framing::default(),
            &[],
        ))
        .await
        .unwrap(),
    );
    assert_eq!((resp.version.as_str(), resp.healthz.as_str()), ("v2", "ok"));
    assert_eq!(resp.key_id, "test-key");
    // Abstract-socket style and other invalid values, on the same connection.
    for (sid, authority) in [(3, "@kms-plugin"), (5, "unix:///var/run/kms.sock"), (7, "")] {
        let out = within(c.unary(
            sid,
            &grpc_request(ENCRYPT, authority),
            Framing::default(),
            &encrypt_request(b"abc"),
        ))
        .await
        .unwrap();
        assert_eq!(encrypt_ok(out).ciphertext, b"cba", "{authority}");
    }
    drop(c); // graceful shutdown waits for open connections
    server.stop().await;
}

#[tokio::test]
async fn path_authority_is_reset_without_the_shim() {
    // Proves the raw client reproduces the failure the shim exists for.
    let server = TestServer::start(false).await;
    let mut c = server.client().await;
    let out = within(c.unary(
        1,
        &grpc_request(STATUS, PATH_AUTHORITY),
        Framing::default(),
        &[],
    ))
    .await
    .unwrap();
    assert!(
        matches!(out, Outcome::Reset(1)),
        "expected RST_STREAM(PROTOCOL_ERROR), got {out:?}"
    );
    // The same client with `localhost` works, so nothing else about the request is wrong.
    status_ok(
        within(c.unary(
            3,
            &grpc_request(STATUS, "localhost"),
            Framing::default(),
            &[],
        ))
        .await
        .unwrap(),
    );
    drop(c); // graceful shutdown waits for open connections
    server.stop().await;
}

#[tokio::test]
async fn localhost_authority_works() {
    let server = TestServer::start(true).await;
    let mut c = server.client().await;
    for sid in [1, 3] {
        status_ok(
            within(c.unary(
                sid,
                &grpc_request(STATUS, "localhost"),
                Framing::default(),
                &[],
            ))
            .await
            .unwrap(),
        );
    }
    drop(c); // graceful shutdown waits for open connections
    server.stop().await;
}

#[tokio::test]
async fn authorities_from_the_clients_dynamic_table() {
    // A connection that opens with `localhost` is normally bypassed after its first block (see
    // the next test); keep scanning so that the switch to re-encoding mid-connection is covered.
    let limits = Limits {
        bypass_after_valid_authority: false,
        ..Limits::default()
    };
    let server = TestServer::start_with(true, limits).await;
    let mut c = server.client().await;
    // 1: a valid authority indexed into the client's table (passes through untouched) → 62.
    let first = pseudo(STATUS)
        .literal(
            Indexing::Incremental,
            Name::Index(AUTHORITY),
            "localhost",
            false,
        )
        .grpc_tail();
    status_ok(
        within(c.unary(1, &first, Framing::default(), &[]))
            .await
            .unwrap(),
    );
    // 2: a path authority indexed → 62 (localhost moves to 63); the shim starts re-encoding.
    let second = pseudo(STATUS)
        .literal(
            Indexing::Incremental,
            Name::Index(AUTHORITY),
            PATH_AUTHORITY,
            false,
        )
        .literal(
            Indexing::Incremental,
            Name::Index(CONTENT_TYPE),
            "application/grpc",
            false,
        )
        .literal(
            Indexing::Incremental,
            Name::Literal("te"),
            "trailers",
            false,
        );
    status_ok(
        within(c.unary(3, &second, Framing::default(), &[]))
            .await
            .unwrap(),
    );
    // Table now: 62 te, 63 content-type, 64 path authority, 65 localhost.
    for (sid, index) in [(5, 64), (7, 65), (9, 64)] {
        let block = pseudo(ENCRYPT).indexed(index).indexed(63).indexed(62);
        let out = within(c.unary(sid, &block, Framing::default(), &encrypt_request(b"xyz")))
            .await
            .unwrap();
        assert_eq!(encrypt_ok(out).ciphertext, b"zyx", "index {index}");
    }
    // A table size update that evicts everything, then fresh literals.
    let block = Block::new()
        .size_update(0)
        .size_update(4096)
        .raw(&grpc_request(STATUS, PATH_AUTHORITY).0);
    status_ok(
        within(c.unary(11, &block, Framing::default(), &[]))
            .await
            .unwrap(),
    );
    drop(c); // graceful shutdown waits for open connections
    server.stop().await;
}

/// A connection whose first request names a valid authority is forwarded untouched from then on:
/// a later path authority gets h2's own answer (a stream reset, as without the shim) and the
/// connection keeps serving.
#[tokio::test]
async fn a_connection_that_opens_with_localhost_is_bypassed() {
    let server = TestServer::start(true).await;
    let mut c = server.client().await;
    let localhost = grpc_request(STATUS, "localhost");
    let path = grpc_request(STATUS, PATH_AUTHORITY);
    status_ok(
        within(c.unary(1, &localhost, Framing::default(), &[]))
            .await
            .unwrap(),
    );
    let later = within(c.unary(3, &path, Framing::default(), &[]))
        .await
        .unwrap();
    assert!(matches!(later, Outcome::Reset(1)), "{later:?}");
    status_ok(
        within(c.unary(5, &localhost, Framing::default(), &[]))
            .await
            .unwrap(),
    );
    // A new connection that opens with a path authority is still rewritten.
    let mut d = server.client().await;
    status_ok(
        within(d.unary(1, &path, Framing::default(), &[]))
            .await
            .unwrap(),
    );
    status_ok(
        within(d.unary(3, &localhost, Framing::default(), &[]))
            .await
            .unwrap(),
    );
    drop((c, d));
    server.stop().await;
}

#[tokio::test]
async fn huffman_encoded_authority_works() {
    let server = TestServer::start(true).await;
    let mut c = server.client().await;
    let block = pseudo(STATUS)
        .literal(
            Indexing::Incremental,
            Name::Index(AUTHORITY),
            PATH_AUTHORITY,
            true,
        )
        .literal(
            Indexing::Never,
            Name::Index(CONTENT_TYPE),
            "application/grpc",
            true,
        )
        .literal(Indexing::Never, Name::Literal("te"), "trailers", true);
    status_ok(
        within(c.unary(1, &block, Framing::default(), &[]))
            .await
            .unwrap(),
    );
    let block = pseudo(STATUS).indexed(62).grpc_tail();
    status_ok(
        within(c.unary(3, &block, Framing::default(), &[]))
            .await
            .unwrap(),
    );
    drop(c); // graceful shutdown waits for open connections
    server.stop().await;
}

#[tokio::test]
async fn header_block_split_across_continuation_frames() {
    let server = TestServer::start(true).await;
    let mut c = server.client().await;
    let framing = Framing {
        fragments: 4,
        ..Framing::default()
    };
    status_ok(
        within(c.unary(1, &grpc_request(STATUS, PATH_AUTHORITY), framing, &[]))
            .await
            .unwrap(),
    );
    // A 20 KiB metadata value: the re-encoded block needs HEADERS + CONTINUATION toward h2.
    let big = "v".repeat(20 * 1024); // the test server accepts 64 KiB header lists
    let block = grpc_request(STATUS, PATH_AUTHORITY).literal(
        Indexing::Without,
        Name::Literal("x-big"),
        &big,
        false,
    );
    let framing = Framing {
        fragments: 3,
        ..Framing::default()
    };
    status_ok(within(c.unary(3, &block, framing, &[])).await.unwrap());
    drop(c); // graceful shutdown waits for open connections
    server.stop().await;
}

#[tokio::test]
async fn padded_headers_frame_works() {
    let server = TestServer::start(true).await;
    let mut c = server.client().await;
    let framing = Framing {
        padding: Some(17),
        ..Framing::default()
    };
    status_ok(
        within(c.unary(1, &grpc_request(STATUS, PATH_AUTHORITY), framing, &[]))
            .await
            .unwrap(),
    );
    let framing = Framing {
        padding: Some(3),
        priority: true,
        fragments: 2,
    };
    status_ok(
        within(c.unary(3, &grpc_request(STATUS, PATH_AUTHORITY), framing, &[]))
            .await
            .unwrap(),
    );
    drop(c); // graceful shutdown waits for open connections
    server.stop().await;
}

/// What a fresh connection to `server` gets for `block` as the first request.
async fn outcome_of(server: &TestServer, block: &Block) -> String {
    let mut c = server.client().await;
    within(c.send_headers(1, block, Framing::default()))
        .await
        .unwrap();
    // The server may already have closed the connection: a failed write is fine here.
    let _ = within(c.send_message(1, &[])).await;
    format!("{:?}", within(c.response(1)).await.unwrap())
}

#[tokio::test]
async fn malformed_hpack_closes_the_connection_and_the_server_keeps_serving() {
    let server = TestServer::start(true).await;
    let plain = TestServer::start(false).await;
    let bad_blocks = [
        Block::new().indexed(METHOD_POST).indexed(70), // index beyond the dynamic table
        Block::new().raw(&[0x41, 0x85, 0xff, 0xff, 0xff, 0xff, 0xff]), // Huffman EOS
        Block::new().raw(&[0x82, 0x3f, 0xe1, 0x1f]),   // size update after a field
        Block::new().raw(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]), // integer overflow
        Block::new().raw(&[0x04, 0x7f]),               // truncated string
    ];
    for block in &bad_blocks {
        // The connection ends as it would without the shim: h2's GOAWAY with h2's code.
        let out = outcome_of(&server, block).await;
        assert!(out.starts_with("GoAway("), "{out}");
        assert_eq!(out, outcome_of(&plain, block).await, "{block:?}");
    }
    // Garbage instead of a preface, and a PUSH_PROMISE from the client.
    let mut c = within(UnixStream::connect(&server.path)).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut c, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut sink = vec![];
    let _ = within(tokio::io::AsyncReadExt::read_to_end(&mut c, &mut sink)).await;
    let mut outcomes = vec![];
    for s in [&server, &plain] {
        let mut c = s.client().await;
        within(c.send_frame(0x5, 0x4, 1, &[0, 0, 0, 2, 0x82]))
            .await
            .unwrap();
        outcomes.push(format!("{:?}", within(c.response(1)).await.unwrap()));
    }
    assert!(
        outcomes[0] == outcomes[1] && outcomes[0].starts_with("GoAway("),
        "{outcomes:?}"
    );

    let mut c = server.client().await;
    status_ok(
        within(c.unary(
            1,
            &grpc_request(STATUS, PATH_AUTHORITY),
            Framing::default(),
            &[],
        ))
        .await
        .unwrap(),
    );
    drop(c); // graceful shutdown waits for open connections
    server.stop().await;
    plain.stop().await;
}

async fn tonic_client(path: &Path) -> KeyManagementServiceClient<tonic::transport::Channel> {
    let path = path.to_path_buf();
    let channel = Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap();
    KeyManagementServiceClient::new(channel)
}

#[tokio::test]
async fn tonic_client_works_through_the_shim() {
    let server = TestServer::start(true).await;
    let client = tonic_client(&server.path).await;
    let status = within(client.clone().status(StatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.healthz, "ok");
    // Concurrent calls on one connection: many HEADERS and DATA frames interleave.
    let calls = (0..64u32).map(|i| {
        let mut c = client.clone();
        tokio::spawn(async move {
            let plaintext = i.to_be_bytes().repeat(1000);
            let resp = c
                .encrypt(EncryptRequest {
                    plaintext: plaintext.clone(),
                    uid: format!("uid-{i}"),
                })
                .await
                .unwrap()
                .into_inner();
            let mut want = plaintext;
            want.reverse();
            assert_eq!(resp.ciphertext, want);
        })
    });
    for call in calls.collect::<Vec<_>>() {
        within(call).await.unwrap();
    }
    // A message larger than one frame and the flow-control window streams through.
    let big = vec![7u8; 300 * 1024];
    let resp = within(client.clone().decrypt(DecryptRequest {
        ciphertext: big.clone(),
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(resp.plaintext, big);
    drop(client); // graceful shutdown waits for open connections
    server.stop().await;
}

/// Rough end-to-end overhead of the shim; run with
/// `cargo test --test authority_shim measure_call_overhead -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn measure_call_overhead() {
    const CALLS: u32 = 2000;
    for shim in [false, true] {
        let server = TestServer::start(shim).await;
        let mut client = tonic_client(&server.path).await;
        let start = std::time::Instant::now();
        for _ in 0..CALLS {
            within(client.status(StatusRequest {})).await.unwrap();
        }
        let elapsed = start.elapsed();
        eprintln!(
            "shim={shim}: {CALLS} sequential Status calls in {elapsed:?} ({:.1} µs/call)",
            elapsed.as_micros() as f64 / f64::from(CALLS)
        );
        drop(client);
        server.stop().await;
    }
}

/// CPU time of this process so far (user + system), from /proc (clock ticks of 10 ms).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The shim's end-to-end cost: Status calls from `clients` raw connections (each sequential, one
/// call in flight), against a server without the shim (`localhost`) and with it (`localhost` and
/// a socket path). Prints p50 latency and CPU per call (client and server are this process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_shim_cost() {
    const CALLS: usize = 3000;
    for clients in [1usize, 16] {
        for (shim, authority) in [
            (false, "localhost"),
            (true, "localhost"),
            (true, PATH_AUTHORITY),
            (false, "localhost"),
            (true, "localhost"),
            (true, PATH_AUTHORITY),
        ] {
            let server = TestServer::start(shim).await;
            let per_client = CALLS / clients;
            let ticks = cpu_ticks();
            let tasks: Vec<_> = (0..clients)
                .map(|_| {
                    let path = server.path.clone();
                    tokio::spawn(async move {
                        let mut c = within(RawH2::connect(&path)).await.unwrap();
                        // Open the connection window wide: the raw client never returns it.
                        within(c.send_frame(0x8, 0, 0, &0x7fff_0000u32.to_be_bytes()))
                            .await
                            .unwrap();
                        let block = grpc_request(STATUS, authority);
                        let mut lat = Vec::with_capacity(per_client);
                        for i in 0..per_client {
                            let t = std::time::Instant::now();
                            let out =
                                within(c.unary(2 * i as u32 + 1, &block, Framing::default(), &[]))
                                    .await
                                    .unwrap();
                            lat.push(t.elapsed());
                            status_ok(out);
                        }
                        lat
                    })
                })
                .collect();
            let mut lat = vec![];
            for t in tasks {
                lat.extend(t.await.unwrap());
            }
            let cpu_ms = (cpu_ticks() - ticks) * 10;
            lat.sort();
            eprintln!(
                "clients={clients:2} shim={shim:5} authority={authority:28}: p50 {:6.1} µs, CPU {:5.1} µs/call",
                lat[lat.len() / 2].as_secs_f64() * 1e6,
                cpu_ms as f64 * 1000.0 / lat.len() as f64
            );
            server.stop().await;
        }
    }
}
