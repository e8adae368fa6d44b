//! The I/O wrapper: reads go through the [`Rewriter`], writes go straight to the socket.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use super::{provoke_connection_error, Limits, Rewriter, ShimError};

/// Socket reads go through a buffer of this size on the stack; large DATA payloads bypass it
/// (they are read straight into the caller's buffer).
const READ_CHUNK: usize = 8 * 1024;

/// Heap buffers larger than this are released once drained.
const KEEP_CAPACITY: usize = 4 * 1024;

/// Counters shared by all shimmed connections of a server, read by the metrics.
#[derive(Debug, Default)]
pub struct ShimCounters {
    rewritten: AtomicU64,
    errors: AtomicU64,
    reencoding: AtomicU64,
}

impl ShimCounters {
    /// `:authority` values replaced with `localhost`.
    pub fn authorities_rewritten(&self) -> u64 {
        self.rewritten.load(Ordering::Relaxed)
    }

    /// Connections the shim ended because of a framing or HPACK error.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Connections that sent a path authority: every header block is re-encoded.
    pub fn reencoding_connections(&self) -> u64 {
        self.reencoding.load(Ordering::Relaxed)
    }
}

/// Wraps one accepted connection (for example a `tokio::net::UnixStream`) so that h2 sees the
/// client's HTTP/2 stream with every invalid `:authority` replaced by `localhost`.
///
/// Until a path authority shows up, header blocks are only scanned and forwarded as they came;
/// other frames pass without being copied through the shim. A protocol or HPACK error hands h2 a frame that makes it fail the connection with the
/// code it would have used on the client's bytes (so h2 sends the GOAWAY); later reads fail with
/// `InvalidData`.
pub struct AuthorityShim<S> {
    inner: S,
    /// `None` once the connection failed.
    rewriter: Option<Box<Rewriter>>,
    /// Socket bytes not yet fed to the rewriter (held back by its output limit):
    /// `pending[pending_pos..]`.
    pending: Vec<u8>,
    pending_pos: usize,
    /// Bytes for h2 not yet handed to the reader: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    failed: Option<ShimError>,
    rewritten: u64,
    counters: Option<Arc<ShimCounters>>,
}

impl<S> AuthorityShim<S> {
    pub fn new(inner: S) -> Self {
        Self::with_limits(inner, Limits::default())
    }

    pub fn with_limits(inner: S, limits: Limits) -> Self {
        Self {
            inner,
            rewriter: Some(Box::new(Rewriter::new(limits))),
            pending: Vec::new(),
            pending_pos: 0,
            out: Vec::new(),
            out_pos: 0,
            failed: None,
            rewritten: 0,
            counters: None,
        }
    }

    /// Also counts this connection's rewrites and errors in `counters`.
    pub fn with_counters(mut self, counters: Arc<ShimCounters>) -> Self {
        self.counters = Some(counters);
        self
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    /// How many `:authority` values this connection had replaced so far.
    pub fn authorities_rewritten(&self) -> u64 {
        self.rewritten
    }

    /// The error that stopped this connection, if any.
    pub fn error(&self) -> Option<&ShimError> {
        self.failed.as_ref()
    }

    /// Feeds `input` to the rewriter and returns how much it took; on an error, queues the bytes
    /// that make h2 end the connection the way it would have, and records the error.
    fn feed(&mut self, input: &[u8]) -> usize {
        let Some(rw) = self.rewriter.as_mut() else {
            return 0;
        };
        let preface_sent = rw.preface_forwarded();
        let result = rw.feed(input, &mut self.out);
        let total = rw.authorities_rewritten();
        if total > self.rewritten {
            if self.rewritten == 0 {
                self.count(|c| &c.reencoding, 1);
            }
            self.count(|c| &c.rewritten, total - self.rewritten);
            self.rewritten = total;
        }
        match result {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, reason = e.label(), "HTTP/2 client violated the protocol; closing its connection");
                self.count(|c| &c.errors, 1);
                if let Some(rw) = self.rewriter.take() {
                    provoke_connection_error(&e, rw.limits(), preface_sent, &mut self.out);
                }
                self.failed = Some(e);
                input.len()
            }
        }
    }

    fn count(&self, field: impl Fn(&ShimCounters) -> &AtomicU64, n: u64) {
        if let Some(c) = &self.counters {
            field(c).fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityShim<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Each pass returns, or feeds pending input (which consumes some or produces output, or
        // fails), or reads from the socket; so the loop ends once the socket has nothing more
        // (Pending) or there is output or an error to return.
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    release(&mut this.out, &mut this.out_pos);
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = &this.failed {
                let e = e.clone();
                this.drain(cx);
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let Some(rw) = this.rewriter.as_mut() else {
                return Poll::Ready(Ok(())); // failed: `failed` is set
            };
            if this.pending_pos < this.pending.len() {
                // Input left over because the last feed stopped at the output limit.
                let pending = std::mem::take(&mut this.pending);
                let n = this.feed(&pending[this.pending_pos..]);
                this.pending = pending;
                this.pending_pos += n;
                if this.pending_pos == this.pending.len() {
                    release(&mut this.pending, &mut this.pending_pos);
                }
                continue;
            }
            let direct = rw.passthrough_remaining();
            if direct > 0 {
                // Payload of a non-header frame: read it straight into the caller's buffer.
                let dst = buf.initialize_unfilled_to(direct.min(buf.remaining()));
                let mut rb = ReadBuf::new(dst);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                let n = rb.filled().len();
                buf.advance(n);
                rw.consume_passthrough(n);
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let input = rb.filled();
            if input.is_empty() {
                return Poll::Ready(Ok(())); // EOF
            }
            let n = this.feed(input);
            if n < input.len() {
                this.pending.extend_from_slice(&input[n..]);
            }
            if this.failed.is_some() {
                // Read what the client already sent: closing a socket with unread input resets
                // it, and the client could lose the GOAWAY.
                this.drain(cx);
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AuthorityShim<S> {
    /// Discards what the socket has ready, up to [`DRAIN_LIMIT`] bytes per call.
    fn drain(&mut self, cx: &mut Context<'_>) {
        let mut chunk = [0u8; READ_CHUNK];
        let mut total = 0;
        while total < DRAIN_LIMIT {
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => total += rb.filled().len(),
                _ => return,
            }
        }
    }
}

/// Input discarded per read after an error: enough for what a client has in flight.
const DRAIN_LIMIT: usize = 256 * 1024;

/// Empties a drained buffer, giving its memory back if a burst made it large.
fn release(buf: &mut Vec<u8>, pos: &mut usize) {
    if buf.capacity() > KEEP_CAPACITY {
        *buf = Vec::new();
    } else {
        buf.clear();
    }
    *pos = 0;
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityShim<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for AuthorityShim<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
