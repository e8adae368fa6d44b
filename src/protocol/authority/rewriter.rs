//! The sans-IO core of the shim: consumes the client→server bytes of one HTTP/2 connection and
//! produces the bytes h2 should see instead.

use super::frame::{flag, kind, FrameHeader, DEFAULT_MAX_FRAME_SIZE, HEADER_LEN, PREFACE};
use super::hpack::{encode_field, Decoder, HeaderList, HpackError};
use super::{is_valid_authority, Limits, ShimError, REPLACEMENT_AUTHORITY};

/// Largest prefix (pad length + priority) and suffix (padding) a HEADERS frame adds to its
/// header block fragment.
const HEADERS_OVERHEAD: usize = 1 + 5 + 255;

/// [`Rewriter::feed`] stops consuming input once its output reaches this size (one more header
/// block, at most the header list limit plus framing, may take it beyond).
pub const OUTPUT_SOFT_LIMIT: usize = 64 * 1024;

/// Buffers above this size are released after the block that needed them, so a burst of large
/// blocks does not pin memory for the connection's life.
const KEEP_CAPACITY: usize = 4 * 1024;

/// Static table entry 16, `accept-encoding: gzip, deflate`: one byte that h2 counts as 60 bytes
/// of header list (15 + 13 + 32).
const BIG_STATIC_REF: u8 = 0x80 | 16;
const BIG_STATIC_REF_SIZE: usize = 60;

/// What the rewriter does with header blocks on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No path authority seen yet: each block is scanned (only `:authority` values and dynamic
    /// table insertions are looked at, nothing is decoded into a header list) and forwarded as
    /// it came. This is the mode of every client that sends `localhost`.
    Scan,
    /// A block carried a path authority: every block from then on is decoded and re-encoded.
    Reencode,
    /// The connection's first header block carried a valid `:authority`: every later byte goes
    /// to h2 untouched, without framing or HPACK work. A gRPC client sends the same authority on
    /// every stream of a connection (1.32+ apiservers send `localhost`), so the first block
    /// decides; a client that later sends a path authority gets h2's own answer to it, as it
    /// would from a server without the shim.
    Bypass,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Bytes of the connection preface seen so far.
    Preface(usize),
    /// Collecting a 9-byte frame header.
    Header,
    /// Payload bytes of a frame forwarded verbatim.
    Passthrough(u32),
    /// Payload bytes of a HEADERS or CONTINUATION frame still to be collected.
    HeaderPayload(u32),
    /// [`Mode::Bypass`]: everything is forwarded verbatim.
    Bypass,
}

/// A header block that started with HEADERS and waits for END_HEADERS.
#[derive(Debug, Clone, Copy)]
struct OpenBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    /// CONTINUATION frames without END_HEADERS so far, counted as h2 counts them.
    continuations: usize,
}

/// Rewrites the client side of one HTTP/2 connection. Feed it bytes in any split.
pub struct Rewriter {
    limits: Limits,
    state: State,
    head: [u8; HEADER_LEN],
    head_len: usize,
    frame: FrameHeader,
    open: Option<OpenBlock>,
    /// The current header block: the first HEADERS payload (prefix and padding removed once the
    /// frame is complete, see `block_start`) followed by CONTINUATION payloads.
    block: Vec<u8>,
    block_start: usize,
    decoder: Decoder,
    fields: HeaderList,
    encoded: Vec<u8>,
    /// Once a block has been re-encoded, every later block is re-encoded too: the client's
    /// encoder may have added entries to its dynamic table in the block we rewrote (h2 never saw
    /// them, because our encoding does not index), so later blocks may refer to table indexes
    /// that mean nothing, or something else, to h2's decoder. Re-encoded blocks use only the
    /// static table, so h2's dynamic table is frozen from that point and cannot go out of step.
    /// Before the first rewrite both decoders saw the same bytes and agree, so blocks without a
    /// path authority are forwarded unchanged:
    /// [`Mode::Scan`].
    mode: Mode,
    /// Reused for the strings [`Decoder::scan`] needs.
    scratch: Vec<u8>,
    authorities_rewritten: u64,
}

impl Rewriter {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: State::Preface(0),
            head: [0; HEADER_LEN],
            head_len: 0,
            frame: FrameHeader {
                len: 0,
                kind: 0,
                flags: 0,
                stream_id: 0,
            },
            open: None,
            block: Vec::new(),
            block_start: 0,
            decoder: Decoder::new(limits.header_table_size, limits.max_header_list),
            fields: HeaderList::new(),
            encoded: Vec::new(),
            mode: Mode::Scan,
            scratch: Vec::new(),
            authorities_rewritten: 0,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// How many bytes of the client preface have been forwarded.
    pub fn preface_forwarded(&self) -> usize {
        match self.state {
            State::Preface(done) => done,
            _ => PREFACE.len(),
        }
    }

    /// How many `:authority` values were replaced so far.
    pub fn authorities_rewritten(&self) -> u64 {
        self.authorities_rewritten
    }

    /// Bytes that may be forwarded verbatim without going through [`Rewriter::feed`] (the rest
    /// of the current frame's payload, or everything in [`Mode::Bypass`]); the caller reports
    /// them with [`Rewriter::consume_passthrough`].
    pub fn passthrough_remaining(&self) -> usize {
        match self.state {
            State::Passthrough(n) => n as usize,
            State::Bypass => usize::MAX,
            _ => 0,
        }
    }

    /// Records that `n` (at most [`Rewriter::passthrough_remaining`]) bytes were forwarded.
    pub fn consume_passthrough(&mut self, n: usize) {
        if let State::Passthrough(rem) = self.state {
            let left = (rem as usize).saturating_sub(n) as u32;
            self.state = if left == 0 {
                State::Header
            } else {
                State::Passthrough(left)
            };
        }
    }

    /// Consumes bytes from `input`, appending the bytes for h2 to `out`, and returns how many it
    /// consumed. It stops early once it has appended [`OUTPUT_SOFT_LIMIT`] bytes: header blocks that
    /// refer to the dynamic table expand (a 1-byte reference can stand for a 4 KiB entry), so
    /// the caller must hand `out` on before feeding the rest. After an error the connection must
    /// be closed; `out` then holds the output of the frames before the bad one.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<usize, ShimError> {
        let total = input.len();
        let start = out.len();
        while !input.is_empty() && out.len() - start < OUTPUT_SOFT_LIMIT {
            match self.state {
                State::Preface(done) => {
                    let n = (PREFACE.len() - done).min(input.len());
                    if input[..n] != PREFACE[done..done + n] {
                        return Err(ShimError::BadPreface);
                    }
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if done + n == PREFACE.len() {
                        State::Header
                    } else {
                        State::Preface(done + n)
                    };
                }
                State::Header => {
                    let n = (HEADER_LEN - self.head_len).min(input.len());
                    self.head[self.head_len..self.head_len + n].copy_from_slice(&input[..n]);
                    self.head_len += n;
                    input = &input[n..];
                    if self.head_len == HEADER_LEN {
                        self.head_len = 0;
                        self.on_frame_header(out)?;
                    }
                }
                State::Passthrough(rem) => {
                    let n = (rem as usize).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.consume_passthrough(n);
                }
                State::Bypass => {
                    out.extend_from_slice(input);
                    input = &[];
                }
                State::HeaderPayload(rem) => {
                    let n = (rem as usize).min(input.len());
                    self.block.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    let left = rem - n as u32;
                    if left == 0 {
                        self.state = State::Header;
                        self.on_header_payload(out)?;
                    } else {
                        self.state = State::HeaderPayload(left);
                    }
                }
            }
        }
        Ok(total - input.len())
    }

    /// [`Rewriter::feed`] until all of `input` is consumed, for callers that buffer everything.
    pub fn feed_all(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), ShimError> {
        while !input.is_empty() {
            let n = self.feed(input, out)?;
            input = &input[n..];
        }
        Ok(())
    }

    fn on_frame_header(&mut self, out: &mut Vec<u8>) -> Result<(), ShimError> {
        let h = FrameHeader::parse(&self.head);
        if h.len > self.limits.max_frame_len {
            return Err(ShimError::FrameTooLarge(h.len));
        }
        // RFC 9113 §6.10: nothing may come between HEADERS and its last CONTINUATION.
        if let Some(open) = &self.open {
            if h.kind != kind::CONTINUATION || h.stream_id != open.stream_id {
                return Err(ShimError::ExpectedContinuation(open.stream_id));
            }
        }
        match h.kind {
            kind::HEADERS => {
                if h.stream_id == 0 {
                    return Err(ShimError::HeadersOnStreamZero);
                }
                if h.len as usize > self.limits.max_header_block + HEADERS_OVERHEAD {
                    return Err(ShimError::HeaderBlockTooLarge(self.limits.max_header_block));
                }
                self.block.clear();
                self.block_start = 0;
                self.open = Some(OpenBlock {
                    stream_id: h.stream_id,
                    end_stream: h.flags & flag::END_STREAM != 0,
                    priority: None,
                    continuations: 0,
                });
                self.begin_header_payload(h, out)
            }
            kind::CONTINUATION => {
                let max = self.limits.max_continuation_frames;
                let open = self
                    .open
                    .as_mut()
                    .ok_or(ShimError::UnexpectedContinuation)?;
                // h2 counts the frames without END_HEADERS; we count the client's, not ours.
                if h.flags & flag::END_HEADERS == 0 {
                    open.continuations += 1;
                    if open.continuations > max {
                        return Err(ShimError::TooManyContinuations);
                    }
                }
                if self.block.len() - self.block_start + h.len as usize
                    > self.limits.max_header_block
                {
                    return Err(ShimError::HeaderBlockTooLarge(self.limits.max_header_block));
                }
                self.begin_header_payload(h, out)
            }
            // A server-only frame (RFC 9113 §8.4); a client sending it is a connection error, and
            // decoding its header block would be needed to keep the HPACK state in step.
            kind::PUSH_PROMISE => Err(ShimError::PushPromise),
            _ => {
                out.extend_from_slice(&self.head);
                self.state = if h.len == 0 {
                    State::Header
                } else {
                    State::Passthrough(h.len)
                };
                Ok(())
            }
        }
    }

    fn begin_header_payload(&mut self, h: FrameHeader, out: &mut Vec<u8>) -> Result<(), ShimError> {
        self.frame = h;
        if h.len == 0 {
            self.on_header_payload(out)
        } else {
            self.state = State::HeaderPayload(h.len);
            Ok(())
        }
    }

    /// A HEADERS or CONTINUATION payload is complete.
    fn on_header_payload(&mut self, out: &mut Vec<u8>) -> Result<(), ShimError> {
        let h = self.frame;
        if h.kind == kind::HEADERS {
            let len = self.block.len();
            let mut off = 0;
            let mut pad = 0;
            if h.flags & flag::PADDED != 0 {
                pad = usize::from(*self.block.first().ok_or(ShimError::BadHeadersPayload)?);
                off = 1;
            }
            if h.flags & flag::PRIORITY != 0 {
                let p: [u8; 5] = self
                    .block
                    .get(off..off + 5)
                    .and_then(|p| p.try_into().ok())
                    .ok_or(ShimError::BadHeadersPayload)?;
                if let Some(open) = self.open.as_mut() {
                    open.priority = Some(p);
                }
                off += 5;
            }
            if off > len || pad > len - off {
                return Err(ShimError::BadHeadersPayload);
            }
            self.block.truncate(len - pad);
            self.block_start = off;
            if self.block.len() - off > self.limits.max_header_block {
                return Err(ShimError::HeaderBlockTooLarge(self.limits.max_header_block));
            }
        }
        if h.flags & flag::END_HEADERS != 0 {
            self.finish_block(out)?;
        }
        Ok(())
    }

    /// A whole header block is here: scan or decode it, rewrite it if needed, and emit it.
    fn finish_block(&mut self, out: &mut Vec<u8>) -> Result<(), ShimError> {
        let open = self.open.take().ok_or(ShimError::UnexpectedContinuation)?;
        let fragment = &self.block[self.block_start..];
        if self.mode == Mode::Scan && !self.decoder.scan(fragment, &mut self.scratch)? {
            // Both decoders agree and nothing needs replacing: h2 gets the block as it came
            // (and judges its size and fields itself).
            emit_block(out, &open, fragment);
            if self.limits.bypass_after_valid_authority && self.decoder.scanned_authority() {
                self.enter_bypass();
            } else {
                self.shrink();
            }
            return Ok(());
        }
        self.mode = Mode::Reencode;
        self.decoder.decode(fragment, &mut self.fields)?;
        self.authorities_rewritten += self
            .fields
            .iter()
            .filter(|f| f.name == b":authority" && !is_valid_authority(f.value))
            .count() as u64;
        self.encoded.clear();
        if self.fields.is_over_size() {
            // Re-encoding would pass h2 only what is under the limit. Send a block that h2
            // itself finds over its limit, so it answers as it would have: 431 and
            // REFUSED_STREAM for this stream, the connection stays up.
            let refs = self.limits.max_header_list / BIG_STATIC_REF_SIZE + 1;
            self.encoded.resize(refs, BIG_STATIC_REF);
        } else {
            for f in self.fields.iter() {
                let value = if f.name == b":authority" && !is_valid_authority(f.value) {
                    REPLACEMENT_AUTHORITY
                } else {
                    f.value
                };
                encode_field(f.name, value, f.never_indexed, &mut self.encoded);
            }
        }
        emit_block(out, &open, &self.encoded);
        self.shrink();
        Ok(())
    }

    /// [`Mode::Bypass`]: nothing of the HPACK state is needed any more.
    fn enter_bypass(&mut self) {
        self.mode = Mode::Bypass;
        self.state = State::Bypass;
        self.decoder = Decoder::new(0, 0);
        self.fields = HeaderList::new();
        self.block = Vec::new();
        self.encoded = Vec::new();
        self.scratch = Vec::new();
    }

    /// Gives back memory a large block needed.
    fn shrink(&mut self) {
        for buf in [&mut self.block, &mut self.encoded, &mut self.scratch] {
            if buf.capacity() > KEEP_CAPACITY {
                *buf = Vec::new();
            }
        }
        self.fields.shrink(KEEP_CAPACITY);
    }
}

/// The connection error h2 answers a given violation with (the GOAWAY code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoAwayReason {
    Protocol,
    FrameSize,
    EnhanceYourCalm,
    /// The HPACK decoder failed; h2 itself reports this as PROTOCOL_ERROR.
    Hpack,
    /// Not HTTP/2 at all; h2 closes without a GOAWAY.
    Preface,
}

impl ShimError {
    pub fn goaway_reason(&self) -> GoAwayReason {
        match self {
            ShimError::BadPreface => GoAwayReason::Preface,
            ShimError::FrameTooLarge(_) => GoAwayReason::FrameSize,
            ShimError::HeaderBlockTooLarge(_)
            | ShimError::TooManyContinuations
            | ShimError::Hpack(HpackError::HeaderListTooLarge(_)) => GoAwayReason::EnhanceYourCalm,
            ShimError::Hpack(_) => GoAwayReason::Hpack,
            ShimError::ExpectedContinuation(_)
            | ShimError::UnexpectedContinuation
            | ShimError::HeadersOnStreamZero
            | ShimError::BadHeadersPayload
            | ShimError::PushPromise => GoAwayReason::Protocol,
        }
    }

    /// A short stable label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self.goaway_reason() {
            GoAwayReason::Protocol => "protocol_error",
            GoAwayReason::FrameSize => "frame_size_error",
            GoAwayReason::EnhanceYourCalm => "enhance_your_calm",
            GoAwayReason::Hpack => "hpack_error",
            GoAwayReason::Preface => "bad_preface",
        }
    }
}

/// Bytes that make h2 fail the connection exactly as it would have on the client's input: it then
/// sends the GOAWAY (with the last stream it processed, RFC 9113 §5.4.1) itself. Only valid at a
/// frame boundary with no header block open toward h2, which is where the rewriter stops on an
/// error: it forwards whole frames and collects a header block before emitting any of it.
/// `preface_sent` is how many preface bytes h2 has already been given.
pub fn provoke_connection_error(
    err: &ShimError,
    limits: &Limits,
    preface_sent: usize,
    out: &mut Vec<u8>,
) {
    let frame = |out: &mut Vec<u8>, len: u32, kind: u8, flags: u8| {
        FrameHeader {
            len,
            kind,
            flags,
            stream_id: 1,
        }
        .write(out)
    };
    match err.goaway_reason() {
        GoAwayReason::Preface => {
            // A preface that cannot match: h2 rejects the connection as without the shim.
            out.extend(std::iter::repeat_n(
                0u8,
                PREFACE.len().saturating_sub(preface_sent),
            ));
        }
        // A CONTINUATION with no HEADERS before it.
        GoAwayReason::Protocol => frame(out, 0, kind::CONTINUATION, flag::END_HEADERS),
        // Only the header: h2 checks the length before it waits for a payload.
        GoAwayReason::FrameSize => frame(out, limits.max_frame_len + 1, kind::DATA, 0),
        GoAwayReason::EnhanceYourCalm => {
            frame(out, 0, kind::HEADERS, 0);
            for _ in 0..=limits.max_continuation_frames {
                frame(out, 0, kind::CONTINUATION, 0);
            }
        }
        GoAwayReason::Hpack => {
            // Index 0 is invalid in every HPACK state.
            frame(out, 1, kind::HEADERS, flag::END_HEADERS);
            out.push(0x80);
        }
    }
}

/// Writes a header block as HEADERS (+ CONTINUATION) frames no larger than the protocol's
/// default maximum frame size, which every HTTP/2 server accepts. Padding is dropped; priority
/// and END_STREAM are kept.
fn emit_block(out: &mut Vec<u8>, open: &OpenBlock, block: &[u8]) {
    let max = DEFAULT_MAX_FRAME_SIZE as usize;
    let prio_len = if open.priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = block.split_at(block.len().min(max - prio_len));
    let mut flags = 0;
    if open.end_stream {
        flags |= flag::END_STREAM;
    }
    if open.priority.is_some() {
        flags |= flag::PRIORITY;
    }
    if rest.is_empty() {
        flags |= flag::END_HEADERS;
    }
    out.reserve(block.len() + HEADER_LEN + prio_len + rest.len().div_ceil(max) * HEADER_LEN);
    FrameHeader {
        len: (first.len() + prio_len) as u32,
        kind: kind::HEADERS,
        flags,
        stream_id: open.stream_id,
    }
    .write(out);
    if let Some(p) = &open.priority {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(max));
        rest = tail;
        FrameHeader {
            len: chunk.len() as u32,
            kind: kind::CONTINUATION,
            flags: if rest.is_empty() {
                flag::END_HEADERS
            } else {
                0
            },
            stream_id: open.stream_id,
        }
        .write(out);
        out.extend_from_slice(chunk);
    }
}
