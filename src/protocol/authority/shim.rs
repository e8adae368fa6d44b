//! The I/O wrapper: reads go through the [`Rewriter`], writes go straight to the socket.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use super::{Limits, Rewriter, ShimError};

/// Read buffer size: frame headers and header blocks are read through it; large DATA payloads
/// bypass it (they are read straight into the caller's buffer).
const READ_CHUNK: usize = 16 * 1024;

/// Wraps one accepted connection (for example a `tokio::net::UnixStream`) so that h2 sees the
/// client's HTTP/2 stream with every invalid `:authority` replaced by `localhost`.
///
/// A protocol or HPACK error makes reads fail with `InvalidData`, which closes the connection.
pub struct AuthorityShim<S> {
    inner: S,
    rewriter: Rewriter,
    /// Bytes read from the socket; `inbuf[in_pos..in_len]` are not yet fed to the rewriter.
    inbuf: Box<[u8]>,
    in_pos: usize,
    in_len: usize,
    /// Rewritten bytes not yet handed to the reader: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    failed: Option<ShimError>,
}

impl<S> AuthorityShim<S> {
    pub fn new(inner: S) -> Self {
        Self::with_limits(inner, Limits::default())
    }

    pub fn with_limits(inner: S, limits: Limits) -> Self {
        Self {
            inner,
            rewriter: Rewriter::new(limits),
            inbuf: vec![0; READ_CHUNK].into_boxed_slice(),
            in_pos: 0,
            in_len: 0,
            out: Vec::new(),
            out_pos: 0,
            failed: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    /// How many `:authority` values this connection had replaced so far.
    pub fn authorities_rewritten(&self) -> u64 {
        self.rewriter.authorities_rewritten()
    }

    /// The error that stopped this connection, if any.
    pub fn error(&self) -> Option<&ShimError> {
        self.failed.as_ref()
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
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = &this.failed {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e.clone())));
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.in_pos < this.in_len {
                // Input left over because the last feed stopped at the output limit.
                match this
                    .rewriter
                    .feed(&this.inbuf[this.in_pos..this.in_len], &mut this.out)
                {
                    Ok(n) => this.in_pos += n,
                    Err(e) => this.failed = Some(e),
                }
                continue;
            }
            let direct = this.rewriter.passthrough_remaining();
            if direct > 0 {
                // Payload of a non-header frame: read it straight into the caller's buffer.
                let dst = buf.initialize_unfilled_to(direct.min(buf.remaining()));
                let mut rb = ReadBuf::new(dst);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                let n = rb.filled().len();
                buf.advance(n);
                this.rewriter.consume_passthrough(n);
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut this.inbuf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(())); // EOF
            }
            this.in_pos = 0;
            this.in_len = n;
        }
    }
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
