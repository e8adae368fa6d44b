//! Lets requests with a path-valued HTTP/2 `:authority` reach tonic.
//!
//! kube-apiserver's KMS v1beta1 client, and its v2 client before 1.32, send the UNIX socket path
//! (`/var/run/kms.sock`, `@abstract`) as `:authority`. h2 refuses such a request with
//! PROTOCOL_ERROR. [`AuthorityShim`] sits between the accepted socket and h2. Header blocks are
//! scanned (not decoded) and forwarded as they came until one carries a path authority; from
//! then on they are decoded and re-encoded with `localhost` in place of any `:authority` that is
//! not a valid URI authority. Everything else passes through unchanged. See
//! docs/authority-shim.md.

pub mod frame;
pub mod hpack;
mod rewriter;
mod shim;

pub use rewriter::{provoke_connection_error, GoAwayReason, Mode, Rewriter, OUTPUT_SOFT_LIMIT};
pub use shim::{AuthorityShim, ShimCounters};

use hpack::HpackError;

/// What an invalid `:authority` becomes: the value kube-apiserver sends itself since 1.32.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// Longest `:authority` kept as is (a DNS name is at most 253 bytes, plus a port).
const MAX_AUTHORITY_LEN: usize = 1024;

/// Resource bounds of one shimmed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest HPACK-encoded header block (HEADERS + CONTINUATION fragments).
    pub max_header_block: usize,
    /// The server's SETTINGS_MAX_HEADER_LIST_SIZE (name + value + 32 per field). A re-encoded
    /// block over it becomes one h2 rejects on its stream (431); over 4 times it, a connection
    /// error, as in h2.
    pub max_header_list: usize,
    /// Largest frame payload accepted. Must not be below the server's SETTINGS_MAX_FRAME_SIZE:
    /// tonic keeps the protocol default of 16384 unless `Server::max_frame_size` is set.
    pub max_frame_len: u32,
    /// The server's SETTINGS_HEADER_TABLE_SIZE, the largest dynamic table the client may use.
    /// h2 advertises the protocol default, 4096.
    pub header_table_size: usize,
    /// CONTINUATION frames without END_HEADERS allowed in one block: h2's own limit for the
    /// server's settings, see [`Limits::for_server`].
    pub max_continuation_frames: usize,
    /// Forward a connection untouched once its first header block carried a valid
    /// `:authority` ([`Mode::Bypass`](rewriter::Mode::Bypass)). Off only in tests of the scan path.
    pub bypass_after_valid_authority: bool,
}

impl Limits {
    /// The limits that match an h2 server with these settings, so the shim refuses exactly what
    /// h2 would refuse, and no more.
    pub fn for_server(max_header_list: u32, max_frame_size: u32) -> Self {
        let (list, frame) = (max_header_list as usize, max_frame_size as usize);
        let continuations = h2_max_continuation_frames(list, frame);
        Self {
            // HEADERS plus h2's CONTINUATION allowance, all full: larger blocks never reach h2.
            max_header_block: (continuations + 2) * frame,
            max_header_list: list,
            max_frame_len: max_frame_size,
            header_table_size: 4096,
            max_continuation_frames: continuations,
            bypass_after_valid_authority: true,
        }
    }
}

/// h2 0.4's CONTINUATION flood limit: the frames a full header list needs, plus a quarter, at
/// least 5.
fn h2_max_continuation_frames(max_header_list: usize, max_frame_size: usize) -> usize {
    let frames = (max_header_list / max_frame_size.max(1)).max(1);
    (frames + frames / 4).max(5)
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_block: 64 * 1024,
            max_header_list: 64 * 1024,
            max_frame_len: frame::DEFAULT_MAX_FRAME_SIZE,
            header_table_size: 4096,
            max_continuation_frames: h2_max_continuation_frames(
                64 * 1024,
                frame::DEFAULT_MAX_FRAME_SIZE as usize,
            ),
            bypass_after_valid_authority: true,
        }
    }
}

/// Why the shim closed a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShimError {
    #[error("not an HTTP/2 connection: bad client preface")]
    BadPreface,
    #[error("frame of {0} bytes exceeds the maximum frame size")]
    FrameTooLarge(u32),
    #[error("header block exceeds {0} bytes")]
    HeaderBlockTooLarge(usize),
    #[error("header block split into too many CONTINUATION frames")]
    TooManyContinuations,
    #[error("expected a CONTINUATION frame for stream {0}")]
    ExpectedContinuation(u32),
    #[error("CONTINUATION frame without an open header block")]
    UnexpectedContinuation,
    #[error("HEADERS frame on stream 0")]
    HeadersOnStreamZero,
    #[error("HEADERS frame with invalid padding or priority")]
    BadHeadersPayload,
    #[error("PUSH_PROMISE frame from a client")]
    PushPromise,
    #[error(transparent)]
    Hpack(#[from] HpackError),
}

/// Whether `a` may be passed to h2 as `:authority`: `host` or `host:port`, where host is a
/// registered name (RFC 3986 unreserved and sub-delims characters) or a bracketed IPv6 literal.
/// Stricter than the `http` crate h2 uses (no userinfo, no percent-encoding), so anything
/// accepted here h2 accepts too; everything else is replaced.
pub fn is_valid_authority(a: &[u8]) -> bool {
    if a.is_empty() || a.len() > MAX_AUTHORITY_LEN {
        return false;
    }
    let rest = if a[0] == b'[' {
        let Some(close) = a.iter().position(|&b| b == b']') else {
            return false;
        };
        let inner = &a[1..close];
        let colons = inner.iter().filter(|&&b| b == b':').count();
        if inner.is_empty()
            || colons > 7
            || !inner
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        &a[close + 1..]
    } else {
        let end = a.iter().position(|&b| b == b':').unwrap_or(a.len());
        let host = &a[..end];
        if host.is_empty() || !host.iter().all(|&b| is_reg_name_byte(b)) {
            return false;
        }
        &a[end..]
    };
    match rest {
        [] => true,
        [b':', port @ ..] => (1..=5).contains(&port.len()) && port.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

fn is_reg_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b)
}

/// Runs the whole rewriter over `input` as one connection's client→server bytes. For fuzzing:
/// any input must give `Ok` or `Err`, never a panic, and memory bounded by [`Limits`].
pub fn rewrite_for_fuzzing(input: &[u8]) -> Result<Vec<u8>, ShimError> {
    let mut rewriter = Rewriter::new(Limits::default());
    let mut out = Vec::new();
    rewriter.feed_all(input, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests;
