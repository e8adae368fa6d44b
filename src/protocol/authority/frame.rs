//! The bits of HTTP/2 framing (RFC 9113 §3.4, §4, §6) the shim needs.

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Every frame starts with a 9-byte header.
pub const HEADER_LEN: usize = 9;

/// SETTINGS_MAX_FRAME_SIZE's initial value, and what h2 (so tonic) keeps unless configured.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;

pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    /// Stream identifier with the reserved bit cleared.
    pub stream_id: u32,
}

impl FrameHeader {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Self {
        Self {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream_id: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    /// Appends the 9-byte encoding; `len` must fit in 24 bits.
    pub fn write(&self, dst: &mut Vec<u8>) {
        let len = self.len.to_be_bytes();
        dst.extend_from_slice(&len[1..]);
        dst.push(self.kind);
        dst.push(self.flags);
        dst.extend_from_slice(&(self.stream_id & 0x7fff_ffff).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_clears_reserved_bit() {
        let raw = [0x01, 0x02, 0x03, kind::HEADERS, 0x25, 0x80, 0, 0, 5];
        let h = FrameHeader::parse(&raw);
        assert_eq!(
            h,
            FrameHeader {
                len: 0x010203,
                kind: kind::HEADERS,
                flags: 0x25,
                stream_id: 5
            }
        );
        let mut out = vec![];
        h.write(&mut out);
        assert_eq!(out, [0x01, 0x02, 0x03, kind::HEADERS, 0x25, 0, 0, 0, 5]);
    }
}
