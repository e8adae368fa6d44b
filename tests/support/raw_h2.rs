//! A tiny raw HTTP/2 client over a UNIX socket for the `:authority` tests: it sends exactly the
//! frames and HPACK representations a test asks for (path authorities, dynamic-table references,
//! Huffman strings, CONTINUATION, padding), which no real client library lets a test control.

use std::io;
use std::path::Path;

use kms_plugin::protocol::authority::frame::{flag, kind, FrameHeader, HEADER_LEN, PREFACE};
use kms_plugin::protocol::authority::hpack::{encode_int, encode_string, Decoder, HeaderList};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How a literal field is indexed (RFC 7541 §6.2).
#[derive(Debug, Clone, Copy)]
pub enum Indexing {
    Incremental,
    Without,
    Never,
}

/// The name of a literal field: a table index or a literal string.
#[derive(Debug, Clone, Copy)]
pub enum Name<'a> {
    Index(usize),
    Literal(&'a str),
}

/// Builds an HPACK header block one representation at a time.
#[derive(Debug, Clone, Default)]
pub struct Block(pub Vec<u8>);

impl Block {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn indexed(mut self, index: usize) -> Self {
        encode_int(index, 7, 0x80, &mut self.0);
        self
    }

    pub fn literal(
        mut self,
        indexing: Indexing,
        name: Name<'_>,
        value: &str,
        huffman: bool,
    ) -> Self {
        let (prefix, flags) = match indexing {
            Indexing::Incremental => (6, 0x40),
            Indexing::Without => (4, 0x00),
            Indexing::Never => (4, 0x10),
        };
        match name {
            Name::Index(i) => encode_int(i, prefix, flags, &mut self.0),
            Name::Literal(n) => {
                encode_int(0, prefix, flags, &mut self.0);
                encode_string(n.as_bytes(), huffman, &mut self.0);
            }
        }
        encode_string(value.as_bytes(), huffman, &mut self.0);
        self
    }

    pub fn size_update(mut self, size: usize) -> Self {
        encode_int(size, 5, 0x20, &mut self.0);
        self
    }

    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
}

/// Static table indexes used by the tests.
pub const AUTHORITY: usize = 1;
pub const METHOD_POST: usize = 3;
pub const PATH: usize = 4;
pub const SCHEME_HTTP: usize = 6;
pub const CONTENT_TYPE: usize = 31;

/// A gRPC request header block with `authority` as given (literal without indexing).
pub fn grpc_request(path: &str, authority: &str) -> Block {
    pseudo(path)
        .literal(Indexing::Without, Name::Index(AUTHORITY), authority, false)
        .grpc_tail()
}

/// `:method`, `:scheme` and `:path` of a gRPC request; `:authority` comes next.
pub fn pseudo(path: &str) -> Block {
    Block::new()
        .indexed(METHOD_POST)
        .indexed(SCHEME_HTTP)
        .literal(Indexing::Without, Name::Index(PATH), path, false)
}

impl Block {
    /// The regular fields of a gRPC request: `content-type` and `te`.
    pub fn grpc_tail(self) -> Self {
        self.literal(
            Indexing::Without,
            Name::Index(CONTENT_TYPE),
            "application/grpc",
            false,
        )
        .literal(Indexing::Without, Name::Literal("te"), "trailers", false)
    }
}

/// How a header block is framed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Framing {
    /// Number of frames (HEADERS + CONTINUATIONs) the block is split into; 0 or 1 = one frame.
    pub fragments: usize,
    /// Pad the HEADERS frame with this many bytes.
    pub padding: Option<u8>,
    /// Send a PRIORITY section in the HEADERS frame.
    pub priority: bool,
}

/// One received frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream_id: u32,
    pub payload: Vec<u8>,
}

/// How a call ended.
#[derive(Debug)]
pub enum Outcome {
    Response(Response),
    /// RST_STREAM with this error code (1 = PROTOCOL_ERROR).
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
    /// The server closed the connection.
    Closed,
}

#[derive(Debug, Default)]
pub struct Response {
    /// All header fields of the response, headers then trailers.
    pub fields: Vec<(String, String)>,
    pub data: Vec<u8>,
}

impl Response {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn grpc_status(&self) -> Option<&str> {
        self.field("grpc-status")
    }

    /// The single gRPC message of a unary response, without its 5-byte prefix.
    pub fn message(&self) -> Option<&[u8]> {
        let len = u32::from_be_bytes(self.data.get(1..5)?.try_into().ok()?) as usize;
        self.data.get(5..5 + len)
    }
}

pub struct RawH2 {
    io: UnixStream,
    decoder: Decoder,
}

impl RawH2 {
    /// Connects, sends the preface and an empty SETTINGS frame.
    pub async fn connect(path: &Path) -> io::Result<Self> {
        let mut io = UnixStream::connect(path).await?;
        let mut hello = PREFACE.to_vec();
        write_frame(&mut hello, kind::SETTINGS, 0, 0, &[]);
        io.write_all(&hello).await?;
        Ok(Self {
            io,
            decoder: Decoder::new(4096, 1 << 20),
        })
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await
    }

    pub async fn send_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream_id: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut buf = vec![];
        write_frame(&mut buf, kind, flags, stream_id, payload);
        self.send_raw(&buf).await
    }

    /// Sends a header block framed as asked (END_STREAM unset: a DATA frame follows).
    pub async fn send_headers(
        &mut self,
        stream_id: u32,
        block: &Block,
        framing: Framing,
    ) -> io::Result<()> {
        let block = &block.0;
        let parts = framing.fragments.max(1);
        let step = block.len().div_ceil(parts).max(1);
        let mut chunks: Vec<&[u8]> = block.chunks(step).collect();
        while chunks.len() < parts {
            chunks.push(&[]);
        }
        let mut buf = vec![];
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let mut flags = if last { flag::END_HEADERS } else { 0 };
            if i == 0 {
                let mut payload = vec![];
                if let Some(pad) = framing.padding {
                    flags |= flag::PADDED;
                    payload.push(pad);
                }
                if framing.priority {
                    flags |= flag::PRIORITY;
                    payload.extend_from_slice(&[0, 0, 0, 0, 15]);
                }
                payload.extend_from_slice(chunk);
                payload.extend(std::iter::repeat_n(
                    0u8,
                    framing.padding.unwrap_or(0) as usize,
                ));
                write_frame(&mut buf, kind::HEADERS, flags, stream_id, &payload);
            } else {
                write_frame(&mut buf, kind::CONTINUATION, flags, stream_id, chunk);
            }
        }
        self.send_raw(&buf).await
    }

    /// Sends one length-prefixed gRPC message and ends the stream.
    pub async fn send_message(&mut self, stream_id: u32, message: &[u8]) -> io::Result<()> {
        let mut payload = vec![0];
        payload.extend_from_slice(&(message.len() as u32).to_be_bytes());
        payload.extend_from_slice(message);
        self.send_frame(kind::DATA, flag::END_STREAM, stream_id, &payload)
            .await
    }

    /// A unary call: headers, message, then the response.
    pub async fn unary(
        &mut self,
        stream_id: u32,
        block: &Block,
        framing: Framing,
        message: &[u8],
    ) -> io::Result<Outcome> {
        self.send_headers(stream_id, block, framing).await?;
        self.send_message(stream_id, message).await?;
        self.response(stream_id).await
    }

    /// Reads the next frame; `None` at end of stream or when the server reset the connection.
    pub async fn read_frame(&mut self) -> io::Result<Option<Frame>> {
        let mut head = [0u8; HEADER_LEN];
        match self.io.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        }
        let h = FrameHeader::parse(&head);
        let mut payload = vec![0; h.len as usize];
        self.io.read_exact(&mut payload).await?;
        Ok(Some(Frame {
            kind: h.kind,
            flags: h.flags,
            stream_id: h.stream_id,
            payload,
        }))
    }

    /// Reads frames until stream `stream_id` ends, answering SETTINGS and PING on the way.
    pub async fn response(&mut self, stream_id: u32) -> io::Result<Outcome> {
        let mut resp = Response::default();
        let mut block: Vec<u8> = vec![];
        let mut list = HeaderList::new();
        let mut ending = false;
        loop {
            let Some(f) = self.read_frame().await? else {
                return Ok(Outcome::Closed);
            };
            match f.kind {
                kind::SETTINGS if f.flags & flag::ACK == 0 => {
                    // Best effort: the server may already have closed its side.
                    let _ = self.send_frame(kind::SETTINGS, flag::ACK, 0, &[]).await;
                }
                kind::PING if f.flags & flag::ACK == 0 => {
                    let _ = self.send_frame(kind::PING, flag::ACK, 0, &f.payload).await;
                }
                kind::GOAWAY => {
                    let code = u32::from_be_bytes(f.payload[4..8].try_into().unwrap_or_default());
                    return Ok(Outcome::GoAway(code));
                }
                kind::RST_STREAM if f.stream_id == stream_id => {
                    let code = u32::from_be_bytes(f.payload[..4].try_into().unwrap_or_default());
                    return Ok(Outcome::Reset(code));
                }
                kind::HEADERS | kind::CONTINUATION if f.stream_id == stream_id => {
                    assert_eq!(
                        f.flags & (flag::PADDED | flag::PRIORITY),
                        0,
                        "server sent padding/priority"
                    );
                    block.extend_from_slice(&f.payload);
                    if f.kind == kind::HEADERS {
                        ending = f.flags & flag::END_STREAM != 0;
                    }
                    if f.flags & flag::END_HEADERS != 0 {
                        self.decoder
                            .decode(&block, &mut list)
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        block.clear();
                        for fld in list.iter() {
                            resp.fields.push((
                                String::from_utf8_lossy(fld.name).into_owned(),
                                String::from_utf8_lossy(fld.value).into_owned(),
                            ));
                        }
                        if ending {
                            return Ok(Outcome::Response(resp));
                        }
                    }
                }
                kind::DATA if f.stream_id == stream_id => {
                    resp.data.extend_from_slice(&f.payload);
                    if f.flags & flag::END_STREAM != 0 {
                        return Ok(Outcome::Response(resp));
                    }
                }
                _ => {}
            }
        }
    }
}

fn write_frame(buf: &mut Vec<u8>, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
    FrameHeader {
        len: payload.len() as u32,
        kind,
        flags,
        stream_id,
    }
    .write(buf);
    buf.extend_from_slice(payload);
}
