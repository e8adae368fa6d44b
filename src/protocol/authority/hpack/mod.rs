//! A small HPACK (RFC 7541) implementation: a full decoder that mirrors a peer's encoder
//! (dynamic table, size updates, Huffman) and an encoder that never touches a dynamic table.

pub mod decoder;
pub mod encoder;
pub mod huffman;
pub mod table;

pub use decoder::Decoder;
pub use encoder::{encode_field, encode_int, encode_string};

/// Why a header block could not be decoded. Any of these is a connection error (COMPRESSION_ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("HPACK: header block truncated")]
    Truncated,
    #[error("HPACK: integer too large")]
    IntegerOverflow,
    #[error("HPACK: invalid table index {0}")]
    InvalidIndex(usize),
    #[error("HPACK: invalid Huffman code")]
    Huffman,
    #[error("HPACK: dynamic table size update to {0} exceeds the limit")]
    SizeUpdateTooLarge(usize),
    #[error("HPACK: dynamic table size update after a header field")]
    SizeUpdateNotAtStart,
    #[error("HPACK: decoded header list exceeds {0} bytes")]
    HeaderListTooLarge(usize),
}

/// Largest integer the decoder accepts; far above any legitimate length, index or table size,
/// and small enough that the arithmetic cannot overflow.
pub const MAX_INT: usize = 1 << 28;

/// Decodes an HPACK integer with an `n`-bit prefix (RFC 7541 §5.1) at `*pos`, advancing `*pos`.
pub fn decode_int(src: &[u8], pos: &mut usize, prefix_bits: u8) -> Result<usize, HpackError> {
    let mask = ((1u16 << prefix_bits) - 1) as u8;
    let first = *src.get(*pos).ok_or(HpackError::Truncated)?;
    *pos += 1;
    if first & mask < mask {
        return Ok(usize::from(first & mask));
    }
    // Accumulated in u64 so that neither the shift nor the sum can overflow, on 32-bit targets too.
    let mut value = u64::from(mask);
    let mut shift = 0u32;
    loop {
        let b = *src.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        value += u64::from(b & 0x7f) << shift;
        if value > MAX_INT as u64 {
            return Err(HpackError::IntegerOverflow);
        }
        if b & 0x80 == 0 {
            // At most MAX_INT (2^28), which fits a 32-bit usize.
            return usize::try_from(value).map_err(|_| HpackError::IntegerOverflow);
        }
        shift += 7;
        if shift > 28 {
            return Err(HpackError::IntegerOverflow);
        }
    }
}

/// Decodes an HPACK string literal (RFC 7541 §5.2) at `*pos`, appending it to `dst`.
pub fn decode_string(src: &[u8], pos: &mut usize, dst: &mut Vec<u8>) -> Result<(), HpackError> {
    let huffman = src.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = decode_int(src, pos, 7)?;
    let end = pos.checked_add(len).ok_or(HpackError::Truncated)?;
    let bytes = src.get(*pos..end).ok_or(HpackError::Truncated)?;
    *pos = end;
    if huffman {
        huffman::decode(bytes, dst)
    } else {
        dst.extend_from_slice(bytes);
        Ok(())
    }
}

/// One decoded header field, borrowed from a [`HeaderList`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: &'a [u8],
    pub value: &'a [u8],
    /// Sent as "never indexed" (RFC 7541 §6.2.3); an intermediary must keep that representation.
    pub never_indexed: bool,
}

#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    name_end: usize,
    end: usize,
    never_indexed: bool,
}

/// A decoded header list in one reusable byte buffer, so decoding a block allocates nothing once
/// the buffers have grown to the connection's usual header size.
#[derive(Debug, Default, Clone)]
pub struct HeaderList {
    buf: Vec<u8>,
    spans: Vec<Span>,
    /// Size as SETTINGS_MAX_HEADER_LIST_SIZE counts it: name + value + 32 per field, including
    /// fields dropped because the list went over size.
    list_size: usize,
    /// The decoder stopped storing fields because the list reached its size limit.
    over_size: bool,
}

impl HeaderList {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.spans.clear();
        self.list_size = 0;
        self.over_size = false;
    }

    /// Whether fields were dropped because the decoded list reached the decoder's limit.
    pub fn is_over_size(&self) -> bool {
        self.over_size
    }

    /// Drops the last field but keeps counting its size, once the list is over its limit.
    pub(crate) fn drop_last_over_size(&mut self) {
        if let Some(s) = self.spans.pop() {
            self.buf.truncate(s.start);
        }
        self.over_size = true;
    }

    /// Releases buffers grown beyond `keep` bytes by an unusually large block.
    pub fn shrink(&mut self, keep: usize) {
        if self.buf.capacity() > keep {
            self.buf = Vec::new();
        }
        if self.spans.capacity() * std::mem::size_of::<Span>() > keep {
            self.spans = Vec::new();
        }
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Decoded size: the sum of name + value + 32 over all fields.
    pub fn list_size(&self) -> usize {
        self.list_size
    }

    pub fn get(&self, i: usize) -> Option<Field<'_>> {
        self.spans.get(i).map(|s| Field {
            name: &self.buf[s.start..s.name_end],
            value: &self.buf[s.name_end..s.end],
            never_indexed: s.never_indexed,
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = Field<'_>> + '_ {
        (0..self.spans.len()).filter_map(move |i| self.get(i))
    }

    /// Appends a field from slices (for tests and callers building lists by hand).
    pub fn push(&mut self, name: &[u8], value: &[u8], never_indexed: bool) {
        let start = self.buf.len();
        self.buf.extend_from_slice(name);
        let name_end = self.buf.len();
        self.buf.extend_from_slice(value);
        self.finish_field(start, name_end, never_indexed);
    }

    /// Current end of the buffer: where the next field's name starts.
    pub(crate) fn mark(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn buf_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Records the field whose name is `buf[start..name_end]` and whose value runs to the end.
    pub(crate) fn finish_field(&mut self, start: usize, name_end: usize, never_indexed: bool) {
        let end = self.buf.len();
        self.list_size += end - start + table::ENTRY_OVERHEAD;
        self.spans.push(Span {
            start,
            name_end,
            end,
            never_indexed,
        });
    }

    /// The last field's name and value (used to insert it into the dynamic table).
    pub(crate) fn last(&self) -> Option<(&[u8], &[u8])> {
        self.spans
            .last()
            .map(|s| (&self.buf[s.start..s.name_end], &self.buf[s.name_end..s.end]))
    }

    /// Owned copy of the fields, convenient in tests.
    pub fn to_vec(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.iter()
            .map(|f| (f.name.to_vec(), f.value.to_vec()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_rfc_c1() {
        // C.1.1: 10 with a 5-bit prefix; C.1.2: 1337 with a 5-bit prefix; C.1.3: 42 at an octet boundary.
        let mut pos = 0;
        assert_eq!(decode_int(&[0b0000_1010], &mut pos, 5), Ok(10));
        pos = 0;
        assert_eq!(
            decode_int(&[0b0001_1111, 0x9a, 0x0a], &mut pos, 5),
            Ok(1337)
        );
        assert_eq!(pos, 3);
        pos = 0;
        assert_eq!(decode_int(&[42], &mut pos, 8), Ok(42));
        for v in [0usize, 30, 31, 127, 128, 1337, MAX_INT] {
            for prefix in 1..=8u8 {
                let mut out = vec![];
                encode_int(v, prefix, 0, &mut out);
                let mut pos = 0;
                assert_eq!(decode_int(&out, &mut pos, prefix), Ok(v), "{v} {prefix}");
                assert_eq!(pos, out.len());
            }
        }
    }

    #[test]
    fn integer_errors() {
        let mut pos = 0;
        assert_eq!(
            decode_int(&[0x1f, 0x80], &mut pos, 5),
            Err(HpackError::Truncated)
        );
        pos = 0;
        assert_eq!(
            decode_int(&[0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], &mut pos, 5),
            Err(HpackError::IntegerOverflow)
        );
        pos = 0;
        // Endless continuation bytes of zero value still stop.
        assert_eq!(
            decode_int(&[0x1f, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80], &mut pos, 5),
            Err(HpackError::IntegerOverflow)
        );
        pos = 0;
        assert_eq!(decode_int(&[], &mut pos, 5), Err(HpackError::Truncated));
    }

    #[test]
    fn strings() {
        let mut pos = 0;
        let mut dst = vec![];
        assert_eq!(
            decode_string(&[0x05, b'a'], &mut pos, &mut dst),
            Err(HpackError::Truncated)
        );
        let mut enc = vec![];
        encode_string(b"custom-key", true, &mut enc);
        encode_string(b"custom-value", false, &mut enc);
        pos = 0;
        decode_string(&enc, &mut pos, &mut dst).unwrap();
        decode_string(&enc, &mut pos, &mut dst).unwrap();
        assert_eq!(dst, b"custom-keycustom-value");
        assert_eq!(pos, enc.len());
    }
}
