//! Unit tests of the rewriter on byte buffers (the socket-level tests are in tests/authority_shim.rs).

use super::frame::{flag, kind, FrameHeader, HEADER_LEN, PREFACE};
use super::hpack::{encode_int, encode_string, Decoder, HeaderList};
use super::*;
use proptest::prelude::*;

fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    FrameHeader {
        len: payload.len() as u32,
        kind,
        flags,
        stream_id,
    }
    .write(&mut out);
    out.extend_from_slice(payload);
    out
}

fn with_preface(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    for f in frames {
        out.extend_from_slice(f);
    }
    out
}

/// Literal with incremental indexing, new name.
fn lit_inc(name: &str, value: &str, out: &mut Vec<u8>) {
    out.push(0x40);
    encode_string(name.as_bytes(), false, out);
    encode_string(value.as_bytes(), false, out);
}

/// Literal with incremental indexing, static name index.
fn lit_inc_idx(index: usize, value: &str, huffman: bool, out: &mut Vec<u8>) {
    encode_int(index, 6, 0x40, out);
    encode_string(value.as_bytes(), huffman, out);
}

fn indexed(index: usize, out: &mut Vec<u8>) {
    encode_int(index, 7, 0x80, out);
}

/// A gRPC request header block whose `:authority` is added with incremental indexing.
fn request_block(authority: &str) -> Vec<u8> {
    let mut b = vec![];
    indexed(3, &mut b); // :method POST
    indexed(6, &mut b); // :scheme http
    lit_inc_idx(4, "/v2.KeyManagementService/Status", false, &mut b);
    lit_inc_idx(1, authority, false, &mut b);
    lit_inc_idx(31, "application/grpc", false, &mut b);
    lit_inc("te", "trailers", &mut b);
    b
}

/// What h2 would see: frames after the preface, header blocks decoded by a decoder whose state
/// only the output determines.
#[derive(Debug, PartialEq)]
enum Seen {
    Headers {
        stream_id: u32,
        end_stream: bool,
        priority: Option<[u8; 5]>,
        fields: Vec<(String, String)>,
    },
    Other(u8, Vec<u8>),
}

fn h2_view(out: &[u8]) -> (Vec<Seen>, Decoder) {
    assert_eq!(&out[..24], PREFACE);
    let mut rest = &out[24..];
    let mut seen = vec![];
    let mut dec = Decoder::new(4096, 1 << 20);
    let mut block: Option<(FrameHeader, Option<[u8; 5]>, Vec<u8>)> = None;
    while !rest.is_empty() {
        let h = FrameHeader::parse(rest[..HEADER_LEN].try_into().unwrap());
        let payload = &rest[HEADER_LEN..HEADER_LEN + h.len as usize];
        rest = &rest[HEADER_LEN + h.len as usize..];
        assert!(h.len <= 16384);
        let end_headers = match h.kind {
            kind::HEADERS => {
                assert!(block.is_none());
                assert_eq!(h.flags & flag::PADDED, 0);
                let (prio, frag) = if h.flags & flag::PRIORITY != 0 {
                    (Some(payload[..5].try_into().unwrap()), &payload[5..])
                } else {
                    (None, payload)
                };
                block = Some((h, prio, frag.to_vec()));
                h.flags & flag::END_HEADERS != 0
            }
            kind::CONTINUATION => {
                block.as_mut().unwrap().2.extend_from_slice(payload);
                h.flags & flag::END_HEADERS != 0
            }
            k => {
                assert!(block.is_none());
                seen.push(Seen::Other(k, payload.to_vec()));
                false
            }
        };
        if end_headers {
            let (h, priority, frag) = block.take().unwrap();
            let mut list = HeaderList::new();
            dec.decode(&frag, &mut list).unwrap();
            seen.push(Seen::Headers {
                stream_id: h.stream_id,
                end_stream: h.flags & flag::END_STREAM != 0,
                priority,
                fields: list
                    .iter()
                    .map(|f| {
                        (
                            String::from_utf8_lossy(f.name).into_owned(),
                            String::from_utf8_lossy(f.value).into_owned(),
                        )
                    })
                    .collect(),
            });
        }
    }
    (seen, dec)
}

fn authority_of(seen: &Seen) -> &str {
    match seen {
        Seen::Headers { fields, .. } => fields
            .iter()
            .find(|(n, _)| n == ":authority")
            .map(|(_, v)| v.as_str())
            .unwrap(),
        Seen::Other(..) => panic!("not headers"),
    }
}

#[test]
fn valid_authorities_pass_through_byte_for_byte() {
    let input = with_preface(&[
        frame(kind::SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]),
        frame(
            kind::HEADERS,
            flag::END_HEADERS,
            1,
            &request_block("localhost"),
        ),
        frame(kind::DATA, flag::END_STREAM, 1, &[0, 0, 0, 0, 0]),
        frame(
            kind::HEADERS,
            flag::END_HEADERS,
            3,
            &[0x82, 0x86, 0xc0, 0xbf],
        ),
    ]);
    assert_eq!(rewrite_for_fuzzing(&input).unwrap(), input);
}

#[test]
fn a_valid_first_authority_switches_the_connection_to_bypass() {
    let mut rw = Rewriter::new(Limits::default());
    let mut out = vec![];
    let opening = with_preface(&[frame(
        kind::HEADERS,
        flag::END_HEADERS,
        1,
        &request_block("localhost"),
    )]);
    rw.feed_all(&opening, &mut out).unwrap();
    assert_eq!(rw.mode(), Mode::Bypass);
    assert_eq!(rw.passthrough_remaining(), usize::MAX);
    // From here on nothing is parsed: a path authority, and bytes that are not even frames,
    // reach h2 as they came, for h2 to judge.
    let later = [
        frame(
            kind::HEADERS,
            flag::END_HEADERS,
            3,
            &request_block("/tmp/kms.sock"),
        ),
        vec![0xff; 7],
    ]
    .concat();
    out.clear();
    rw.feed_all(&later, &mut out).unwrap();
    assert_eq!(out, later);
    assert_eq!(rw.authorities_rewritten(), 0);

    // A first block without any `:authority` decides nothing: scanning goes on.
    let mut rw = Rewriter::new(Limits::default());
    let mut block = vec![];
    indexed(3, &mut block);
    indexed(6, &mut block);
    indexed(4, &mut block);
    let opening = with_preface(&[frame(kind::HEADERS, flag::END_HEADERS, 1, &block)]);
    rw.feed_all(&opening, &mut vec![]).unwrap();
    assert_eq!(rw.mode(), Mode::Scan);
    // Nor does a first block with a path authority: that connection is re-encoded.
    let mut rw = Rewriter::new(Limits::default());
    let opening = with_preface(&[frame(
        kind::HEADERS,
        flag::END_HEADERS,
        1,
        &request_block("/tmp/kms.sock"),
    )]);
    rw.feed_all(&opening, &mut vec![]).unwrap();
    assert_eq!(rw.mode(), Mode::Reencode);
}

#[test]
fn path_authority_becomes_localhost_and_other_fields_stay_in_order() {
    let input = with_preface(&[
        frame(
            kind::HEADERS,
            flag::END_HEADERS,
            1,
            &request_block("/tmp/x/kms.sock"),
        ),
        frame(kind::DATA, flag::END_STREAM, 1, &[0, 0, 0, 0, 0]),
    ]);
    let mut rw = Rewriter::new(Limits::default());
    let mut out = vec![];
    rw.feed_all(&input, &mut out).unwrap();
    assert_eq!(rw.authorities_rewritten(), 1);
    let (seen, dec) = h2_view(&out);
    assert_eq!(
        seen[0],
        Seen::Headers {
            stream_id: 1,
            end_stream: false,
            priority: None,
            fields: [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/v2.KeyManagementService/Status"),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
        }
    );
    assert_eq!(seen[1], Seen::Other(kind::DATA, vec![0, 0, 0, 0, 0]));
    // h2's table is never written by re-encoded blocks.
    assert!(dec.table().is_empty());
}

#[test]
fn blocks_after_a_rewrite_are_reencoded_even_when_valid() {
    // Request 1 indexes a path authority (dynamic index 62 after the later inserts shift it),
    // request 2 refers to the client's table only.
    let mut second = vec![];
    indexed(3, &mut second);
    indexed(6, &mut second);
    for i in 62..=65 {
        indexed(i, &mut second); // te, content-type, :authority, :path in the client's table
    }
    let input = with_preface(&[
        frame(kind::HEADERS, flag::END_HEADERS, 1, &request_block("@kms")),
        frame(kind::HEADERS, flag::END_HEADERS, 3, &second),
        frame(
            kind::HEADERS,
            flag::END_HEADERS,
            5,
            &request_block("localhost:1"),
        ),
    ]);
    let out = rewrite_for_fuzzing(&input).unwrap();
    let (seen, dec) = h2_view(&out);
    assert_eq!(authority_of(&seen[0]), "localhost");
    assert_eq!(authority_of(&seen[1]), "localhost");
    assert_eq!(authority_of(&seen[2]), "localhost:1");
    assert!(dec.table().is_empty());
}

#[test]
fn padded_and_priority_headers() {
    let block = request_block("/var/run/kms.sock");
    let mut payload = vec![7]; // pad length
    payload.extend_from_slice(&[0x80, 0, 0, 0, 16]); // exclusive, depends on 0, weight 17
    payload.extend_from_slice(&block);
    payload.extend_from_slice(&[0; 7]);
    let flags = flag::END_HEADERS | flag::PADDED | flag::PRIORITY | flag::END_STREAM;
    let out =
        rewrite_for_fuzzing(&with_preface(&[frame(kind::HEADERS, flags, 1, &payload)])).unwrap();
    let (seen, _) = h2_view(&out);
    match &seen[0] {
        Seen::Headers {
            end_stream,
            priority,
            ..
        } => {
            assert!(*end_stream);
            assert_eq!(*priority, Some([0x80, 0, 0, 0, 16]));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(authority_of(&seen[0]), "localhost");
}

#[test]
fn bad_padding_is_an_error() {
    for payload in [vec![], vec![5, 0x82], vec![0]] {
        let flags =
            flag::END_HEADERS | flag::PADDED | if payload == [0] { flag::PRIORITY } else { 0 };
        let input = with_preface(&[frame(kind::HEADERS, flags, 1, &payload)]);
        assert_eq!(
            rewrite_for_fuzzing(&input),
            Err(ShimError::BadHeadersPayload)
        );
    }
}

#[test]
fn continuation_frames_are_joined_and_large_blocks_split() {
    let mut block = request_block("/k.sock");
    // A 40 KiB header forces the re-encoded block over 16 KiB frames.
    block.push(0x00);
    encode_string(b"x-big", false, &mut block);
    encode_string(&[b'v'; 40 * 1024], false, &mut block);
    let chunks: Vec<&[u8]> = block.chunks(16384).collect();
    let mut frames = vec![frame(kind::HEADERS, 0, 1, chunks[0])];
    for (i, c) in chunks[1..].iter().enumerate() {
        let last = i + 2 == chunks.len();
        frames.push(frame(
            kind::CONTINUATION,
            if last { flag::END_HEADERS } else { 0 },
            1,
            c,
        ));
    }
    let out = rewrite_for_fuzzing(&with_preface(&frames)).unwrap();
    let (seen, _) = h2_view(&out);
    assert_eq!(seen.len(), 1);
    assert_eq!(authority_of(&seen[0]), "localhost");
    match &seen[0] {
        Seen::Headers { fields, .. } => assert_eq!(fields[6].1.len(), 40 * 1024),
        other => panic!("{other:?}"),
    }
}

#[test]
fn protocol_errors() {
    let block = request_block("localhost");
    let cases: Vec<(Vec<u8>, ShimError)> = vec![
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), ShimError::BadPreface),
        (
            with_preface(&[frame(
                kind::PUSH_PROMISE,
                flag::END_HEADERS,
                1,
                &[0, 0, 0, 2],
            )]),
            ShimError::PushPromise,
        ),
        (
            with_preface(&[frame(kind::CONTINUATION, flag::END_HEADERS, 1, &block)]),
            ShimError::UnexpectedContinuation,
        ),
        (
            with_preface(&[
                frame(kind::HEADERS, 0, 1, &block),
                frame(kind::DATA, 0, 1, &[]),
            ]),
            ShimError::ExpectedContinuation(1),
        ),
        (
            with_preface(&[
                frame(kind::HEADERS, 0, 1, &block),
                frame(kind::CONTINUATION, flag::END_HEADERS, 3, &[]),
            ]),
            ShimError::ExpectedContinuation(1),
        ),
        (
            with_preface(&[frame(kind::HEADERS, flag::END_HEADERS, 0, &block)]),
            ShimError::HeadersOnStreamZero,
        ),
        (
            with_preface(&[frame(kind::DATA, 0, 1, &vec![0; 16385])]),
            ShimError::FrameTooLarge(16385),
        ),
        (
            with_preface(&[frame(
                kind::HEADERS,
                flag::END_HEADERS,
                1,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            )]),
            ShimError::Hpack(HpackError::IntegerOverflow),
        ),
        (
            with_preface(&[frame(kind::HEADERS, flag::END_HEADERS, 1, &[0xbe])]),
            ShimError::Hpack(HpackError::InvalidIndex(62)),
        ),
    ];
    for (input, want) in cases {
        assert_eq!(rewrite_for_fuzzing(&input), Err(want));
    }
}

#[test]
fn header_block_and_continuation_count_are_bounded() {
    let limits = Limits::default();
    let mut frames = vec![frame(kind::HEADERS, 0, 1, &[])];
    for _ in 0..limits.max_continuation_frames {
        frames.push(frame(kind::CONTINUATION, 0, 1, &[]));
    }
    frames.push(frame(kind::CONTINUATION, 0, 1, &[]));
    assert_eq!(
        rewrite_for_fuzzing(&with_preface(&frames)),
        Err(ShimError::TooManyContinuations)
    );
    let mut frames = vec![frame(kind::HEADERS, 0, 1, &[0x82; 16384])];
    for _ in 0..3 {
        frames.push(frame(kind::CONTINUATION, 0, 1, &[0x82; 16384]));
    }
    frames.push(frame(kind::CONTINUATION, flag::END_HEADERS, 1, &[0x82]));
    assert_eq!(
        rewrite_for_fuzzing(&with_preface(&frames)),
        Err(ShimError::HeaderBlockTooLarge(64 * 1024))
    );
    // 65536 one-byte indexed fields of 42 bytes each decode far past the list limit.
    let mut frames = vec![frame(kind::HEADERS, 0, 1, &[0x82; 16384])];
    for i in 0..3 {
        frames.push(frame(
            kind::CONTINUATION,
            if i == 2 { flag::END_HEADERS } else { 0 },
            1,
            &[0x82; 16384],
        ));
    }
    assert_eq!(
        rewrite_for_fuzzing(&with_preface(&frames)),
        Err(ShimError::Hpack(HpackError::HeaderListTooLarge(64 * 1024)))
    );
}

#[test]
fn output_per_feed_is_bounded_despite_expansion() {
    // After a rewrite, 15 one-byte references to a 4 KiB entry expand to 60 KiB per block.
    let mut first = vec![];
    lit_inc_idx(1, "/kms.sock", false, &mut first);
    lit_inc("x-big", &"v".repeat(4000), &mut first);
    let mut frames = vec![frame(kind::HEADERS, flag::END_HEADERS, 1, &first)];
    for i in 1..200u32 {
        frames.push(frame(
            kind::HEADERS,
            flag::END_HEADERS,
            2 * i + 1,
            &[0xbe; 15],
        ));
    }
    let input = with_preface(&frames);
    let mut rw = Rewriter::new(Limits::default());
    let mut out = vec![];
    let mut rest = input.as_slice();
    let (mut largest, mut total) = (0, 0);
    while !rest.is_empty() {
        out.clear();
        let n = rw.feed(rest, &mut out).unwrap();
        assert!(n > 0);
        rest = &rest[n..];
        largest = largest.max(out.len());
        total += out.len();
    }
    assert!(total > 199 * 15 * 4000);
    assert!(
        largest <= OUTPUT_SOFT_LIMIT + 64 * 1024 + 5 * HEADER_LEN,
        "{largest}"
    );
}

#[test]
fn authority_validation() {
    for ok in [
        "localhost",
        "localhost:8080",
        "kms.example.com",
        "127.0.0.1:1",
        "[::1]",
        "[::1]:443",
        "a-b_c~d!$&'()*+,;=",
    ] {
        assert!(is_valid_authority(ok.as_bytes()), "{ok}");
    }
    for bad in [
        "",
        "/var/run/kms.sock",
        "@abstract",
        "user@host",
        "host:",
        "host:123456",
        "host:1:2",
        "[::1",
        "[]",
        "[::1]x",
        "[fe80::1%eth0]",
        "a b",
        "a/b",
        "a?b",
        "h%41",
        "unix:///x",
        "é",
    ] {
        assert!(!is_valid_authority(bad.as_bytes()), "{bad}");
    }
    assert!(!is_valid_authority(&[b'a'; 1025]));
}

proptest! {
    #[test]
    fn accepted_authorities_are_accepted_by_http(a in proptest::collection::vec(
        prop::sample::select(b"ab0:[].-_~!$&'()*+,;=@/%?#f ".to_vec()), 0..24)) {
        if is_valid_authority(&a) {
            prop_assert!(http::uri::Authority::try_from(a.as_slice()).is_ok(), "{:?}", String::from_utf8_lossy(&a));
        }
    }

    #[test]
    fn random_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = rewrite_for_fuzzing(&input);
        let mut with = PREFACE.to_vec();
        with.extend_from_slice(&input);
        let _ = rewrite_for_fuzzing(&with);
    }

    #[test]
    fn random_frames_never_panic(frames in proptest::collection::vec(
        (0u8..11, any::<u8>(), 0u32..4, proptest::collection::vec(any::<u8>(), 0..64)), 0..16)) {
        let frames: Vec<Vec<u8>> = frames.iter().map(|(k, f, s, p)| frame(*k, *f, *s, p)).collect();
        let _ = rewrite_for_fuzzing(&with_preface(&frames));
    }

    #[test]
    fn output_does_not_depend_on_how_input_is_split(
        cuts in proptest::collection::vec(1usize..200, 1..50),
        authority in prop::sample::select(vec!["localhost", "/tmp/kms.sock", "@a", "x:1"]),
    ) {
        let mut padded = vec![3];
        padded.extend_from_slice(&request_block(authority));
        padded.extend_from_slice(&[0; 3]);
        let block = request_block(authority);
        let (a, b) = block.split_at(block.len() / 2);
        let input = with_preface(&[
            frame(kind::SETTINGS, 0, 0, &[]),
            frame(kind::HEADERS, flag::END_HEADERS | flag::PADDED, 1, &padded),
            frame(kind::DATA, 0, 1, &[7; 300]),
            frame(kind::HEADERS, 0, 3, a),
            frame(kind::CONTINUATION, flag::END_HEADERS, 3, b),
            frame(kind::WINDOW_UPDATE, 0, 0, &[0, 0, 1, 0]),
        ]);
        let whole = rewrite_for_fuzzing(&input).unwrap();
        let mut rw = Rewriter::new(Limits::default());
        let mut out = vec![];
        let mut rest = input.as_slice();
        for c in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (now, later) = rest.split_at((*c).min(rest.len()));
            // Also use the zero-copy path for passthrough payloads, as the socket wrapper does.
            let direct = rw.passthrough_remaining().min(now.len());
            out.extend_from_slice(&now[..direct]);
            rw.consume_passthrough(direct);
            rw.feed_all(&now[direct..], &mut out).unwrap();
            rest = later;
        }
        prop_assert_eq!(out, whole);
    }
}

/// Rough cost per request; run with
/// `cargo test --lib authority::tests::measure_rewrite_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_rewrite_cost() {
    const N: u32 = 20_000;
    for authority in ["localhost", "/var/run/kms.sock"] {
        // Like grpc-go: the first request indexes its fields, later ones refer to the table and
        // carry a fresh grpc-timeout literal.
        let mut frames = vec![frame(
            kind::HEADERS,
            flag::END_HEADERS,
            1,
            &request_block(authority),
        )];
        for i in 1..N {
            let mut b = vec![];
            for idx in [3, 6, 65, 64, 63, 62] {
                indexed(idx, &mut b);
            }
            b.push(0x00);
            encode_string(b"grpc-timeout", false, &mut b);
            encode_string(format!("{}m", 2000 + i % 999).as_bytes(), false, &mut b);
            frames.push(frame(kind::HEADERS, flag::END_HEADERS, 2 * i + 1, &b));
            frames.push(frame(kind::DATA, flag::END_STREAM, 2 * i + 1, &[0; 45]));
        }
        let input = with_preface(&frames);
        let mut rw = Rewriter::new(Limits::default());
        let mut out = Vec::with_capacity(input.len() * 2);
        let start = std::time::Instant::now();
        rw.feed_all(&input, &mut out).unwrap();
        let elapsed = start.elapsed();
        eprintln!(
            "{authority}: {N} requests in {elapsed:?}: {:.0} ns/request, {} bytes in, {} bytes out",
            elapsed.as_nanos() as f64 / f64::from(N),
            input.len(),
            out.len()
        );
    }
}

/// The socket wrapper gives exactly the rewriter's output, whatever the read sizes, including
/// the zero-copy DATA path and input held back by the output limit.
#[tokio::test]
async fn shim_reads_match_the_rewriter() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut first = vec![];
    lit_inc_idx(1, "/kms.sock", false, &mut first);
    lit_inc("x-big", &"v".repeat(4000), &mut first);
    let mut frames = vec![frame(kind::HEADERS, flag::END_HEADERS, 1, &first)];
    for i in 1..60u32 {
        frames.push(frame(
            kind::HEADERS,
            flag::END_HEADERS,
            2 * i + 1,
            &[0xbe; 15],
        ));
        let data: Vec<u8> = (0..(i * 397) % 16384).map(|b| b as u8).collect();
        frames.push(frame(kind::DATA, flag::END_STREAM, 2 * i + 1, &data));
    }
    let input = with_preface(&frames);
    let want = rewrite_for_fuzzing(&input).unwrap();

    for (pipe, read_size) in [(13usize, 7usize), (1000, 4096), (64 * 1024, 100_000)] {
        let (mut client, server) = tokio::io::duplex(pipe);
        let mut shim = AuthorityShim::new(server);
        let input = input.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&input).await.unwrap();
            client.shutdown().await.unwrap();
        });
        let mut got = vec![];
        let mut buf = vec![0; read_size];
        loop {
            let n = shim.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        writer.await.unwrap();
        assert_eq!(got.len(), want.len(), "pipe {pipe}, reads of {read_size}");
        assert!(got == want, "pipe {pipe}, reads of {read_size}");
        assert_eq!(shim.authorities_rewritten(), 1);
    }
}

#[tokio::test]
async fn shim_read_fails_on_a_protocol_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (mut client, server) = tokio::io::duplex(1024);
    let mut shim = AuthorityShim::new(server);
    let good = frame(kind::SETTINGS, 0, 0, &[]);
    client
        .write_all(&with_preface(&[
            good.clone(),
            frame(kind::PUSH_PROMISE, 0, 1, &[]),
        ]))
        .await
        .unwrap();
    let mut got = vec![0; PREFACE.len() + good.len()];
    shim.read_exact(&mut got).await.unwrap();
    assert_eq!(got, with_preface(&[good]));
    // h2 is handed a frame it fails the connection on with the same code (a CONTINUATION
    // without HEADERS: PROTOCOL_ERROR), so it sends the GOAWAY; then reads fail.
    let mut provocation = [0; 9];
    shim.read_exact(&mut provocation).await.unwrap();
    assert_eq!(
        provocation,
        frame(kind::CONTINUATION, flag::END_HEADERS, 1, &[])[..]
    );
    let err = shim.read(&mut [0; 16]).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert_eq!(shim.error(), Some(&ShimError::PushPromise));
    assert!(shim.read(&mut [0; 16]).await.is_err());
}
