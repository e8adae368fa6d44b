//! HPACK Huffman code (RFC 7541 Appendix B): decoding with RFC 7541 §5.2 padding rules, and encoding.
//!
//! The code is canonical (codes of one length are consecutive and ordered by symbol, shorter codes
//! come first), so decoding needs only, per code length, the first code and the symbols of that
//! length in order. Those tables are computed at compile time from the RFC's code lengths.

use super::HpackError;

/// The end-of-string symbol; it must never appear inside a decoded string.
const EOS: usize = 256;
const MIN_LEN: usize = 5;
const MAX_LEN: usize = 30;

/// RFC 7541 Appendix B, "code as hex (aligned to LSB)", indexed by symbol (256 = EOS).
#[rustfmt::skip]
const CODES: [u32; 257] = [
    0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5, 0xfffffe6, 0xfffffe7,
    0xfffffe8, 0xffffea, 0x3ffffffc, 0xfffffe9, 0xfffffea, 0x3ffffffd, 0xfffffeb, 0xfffffec,
    0xfffffed, 0xfffffee, 0xfffffef, 0xffffff0, 0xffffff1, 0xffffff2, 0x3ffffffe, 0xffffff3,
    0xffffff4, 0xffffff5, 0xffffff6, 0xffffff7, 0xffffff8, 0xffffff9, 0xffffffa, 0xffffffb,
    0x14, 0x3f8, 0x3f9, 0xffa, 0x1ff9, 0x15, 0xf8, 0x7fa,
    0x3fa, 0x3fb, 0xf9, 0x7fb, 0xfa, 0x16, 0x17, 0x18,
    0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b, 0x1c, 0x1d,
    0x1e, 0x1f, 0x5c, 0xfb, 0x7ffc, 0x20, 0xffb, 0x3fc,
    0x1ffa, 0x21, 0x5d, 0x5e, 0x5f, 0x60, 0x61, 0x62,
    0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a,
    0x6b, 0x6c, 0x6d, 0x6e, 0x6f, 0x70, 0x71, 0x72,
    0xfc, 0x73, 0xfd, 0x1ffb, 0x7fff0, 0x1ffc, 0x3ffc, 0x22,
    0x7ffd, 0x3, 0x23, 0x4, 0x24, 0x5, 0x25, 0x26,
    0x27, 0x6, 0x74, 0x75, 0x28, 0x29, 0x2a, 0x7,
    0x2b, 0x76, 0x2c, 0x8, 0x9, 0x2d, 0x77, 0x78,
    0x79, 0x7a, 0x7b, 0x7ffe, 0x7fc, 0x3ffd, 0x1ffd, 0xffffffc,
    0xfffe6, 0x3fffd2, 0xfffe7, 0xfffe8, 0x3fffd3, 0x3fffd4, 0x3fffd5, 0x7fffd9,
    0x3fffd6, 0x7fffda, 0x7fffdb, 0x7fffdc, 0x7fffdd, 0x7fffde, 0xffffeb, 0x7fffdf,
    0xffffec, 0xffffed, 0x3fffd7, 0x7fffe0, 0xffffee, 0x7fffe1, 0x7fffe2, 0x7fffe3,
    0x7fffe4, 0x1fffdc, 0x3fffd8, 0x7fffe5, 0x3fffd9, 0x7fffe6, 0x7fffe7, 0xffffef,
    0x3fffda, 0x1fffdd, 0xfffe9, 0x3fffdb, 0x3fffdc, 0x7fffe8, 0x7fffe9, 0x1fffde,
    0x7fffea, 0x3fffdd, 0x3fffde, 0xfffff0, 0x1fffdf, 0x3fffdf, 0x7fffeb, 0x7fffec,
    0x1fffe0, 0x1fffe1, 0x3fffe0, 0x1fffe2, 0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef,
    0xfffea, 0x3fffe2, 0x3fffe3, 0x3fffe4, 0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1,
    0x3ffffe0, 0x3ffffe1, 0xfffeb, 0x7fff1, 0x3fffe7, 0x7ffff2, 0x3fffe8, 0x1ffffec,
    0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde, 0x7ffffdf, 0x3ffffe5, 0xfffff1, 0x1ffffed,
    0x7fff2, 0x1fffe3, 0x3ffffe6, 0x7ffffe0, 0x7ffffe1, 0x3ffffe7, 0x7ffffe2, 0xfffff2,
    0x1fffe4, 0x1fffe5, 0x3ffffe8, 0x3ffffe9, 0xffffffd, 0x7ffffe3, 0x7ffffe4, 0x7ffffe5,
    0xfffec, 0xfffff3, 0xfffed, 0x1fffe6, 0x3fffe9, 0x1fffe7, 0x1fffe8, 0x7ffff3,
    0x3fffea, 0x3fffeb, 0x1ffffee, 0x1ffffef, 0xfffff4, 0xfffff5, 0x3ffffea, 0x7ffff4,
    0x3ffffeb, 0x7ffffe6, 0x3ffffec, 0x3ffffed, 0x7ffffe7, 0x7ffffe8, 0x7ffffe9, 0x7ffffea,
    0x7ffffeb, 0xffffffe, 0x7ffffec, 0x7ffffed, 0x7ffffee, 0x7ffffef, 0x7fffff0, 0x3ffffee,
    0x3fffffff,
];

/// RFC 7541 Appendix B, "len in bits", indexed by symbol (256 = EOS).
#[rustfmt::skip]
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    30,
];

/// Canonical-code decoding tables, derived from [`LENGTHS`] at compile time.
struct DecodeTables {
    /// First code of each length (only meaningful where `count[len] > 0`).
    first_code: [u32; MAX_LEN + 1],
    /// Number of codes of each length.
    count: [u16; MAX_LEN + 1],
    /// Index into `symbols` of the first symbol of each length.
    first_index: [u16; MAX_LEN + 1],
    /// Symbols ordered by (code length, symbol value), i.e. by code.
    symbols: [u16; 257],
}

const fn build_tables() -> DecodeTables {
    let mut t = DecodeTables {
        first_code: [0; MAX_LEN + 1],
        count: [0; MAX_LEN + 1],
        first_index: [0; MAX_LEN + 1],
        symbols: [0; 257],
    };
    let mut code: u32 = 0;
    let mut n: usize = 0;
    let mut len = 1;
    while len <= MAX_LEN {
        t.first_code[len] = code;
        t.first_index[len] = n as u16;
        let mut sym = 0;
        while sym < 257 {
            if LENGTHS[sym] as usize == len {
                t.symbols[n] = sym as u16;
                n += 1;
                t.count[len] += 1;
                code += 1;
            }
            sym += 1;
        }
        code <<= 1;
        len += 1;
    }
    t
}

static TABLES: DecodeTables = build_tables();

/// Appends the Huffman decoding of `src` to `dst`.
///
/// Errors on the EOS symbol, on padding longer than 7 bits and on padding that is not a prefix of
/// EOS (all ones), as RFC 7541 §5.2 requires.
pub fn decode(src: &[u8], dst: &mut Vec<u8>) -> Result<(), HpackError> {
    let t = &TABLES;
    dst.reserve(src.len() + src.len() / 2);
    let mut code: u32 = 0;
    let mut len: usize = 0;
    for &byte in src {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len += 1;
            if len < MIN_LEN {
                continue;
            }
            if let Some(offset) = code.checked_sub(t.first_code[len]) {
                if offset < u32::from(t.count[len]) {
                    let sym = t.symbols[t.first_index[len] as usize + offset as usize] as usize;
                    if sym == EOS {
                        return Err(HpackError::Huffman);
                    }
                    dst.push(sym as u8);
                    code = 0;
                    len = 0;
                    continue;
                }
            }
            if len >= MAX_LEN {
                return Err(HpackError::Huffman);
            }
        }
    }
    // Leftover bits are padding: fewer than 8, all ones (the high bits of EOS).
    if len > 7 || code != (1u32 << len) - 1 {
        return Err(HpackError::Huffman);
    }
    Ok(())
}

/// Number of bytes the Huffman encoding of `src` takes.
pub fn encoded_len(src: &[u8]) -> usize {
    let bits: usize = src.iter().map(|&b| LENGTHS[b as usize] as usize).sum();
    bits.div_ceil(8)
}

/// Appends the Huffman encoding of `src` to `dst`, padded with the high bits of EOS.
pub fn encode(src: &[u8], dst: &mut Vec<u8>) {
    dst.reserve(encoded_len(src));
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    for &b in src {
        let len = u32::from(LENGTHS[b as usize]);
        acc = (acc << len) | u64::from(CODES[b as usize]);
        bits += len;
        while bits >= 8 {
            bits -= 8;
            dst.push((acc >> bits) as u8);
        }
        // Keep only the bits not yet written, so `acc` never overflows.
        acc &= (1u64 << bits) - 1;
    }
    if bits > 0 {
        let pad = 8 - bits;
        dst.push(((acc << pad) as u8) | ((1u8 << pad) - 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_the_canonical_code_of_its_lengths() {
        // Two independent transcriptions of the RFC (codes and lengths) must agree.
        let t = &TABLES;
        for len in MIN_LEN..=MAX_LEN {
            for i in 0..t.count[len] {
                let sym = t.symbols[(t.first_index[len] + i) as usize] as usize;
                assert_eq!(CODES[sym], t.first_code[len] + u32::from(i), "symbol {sym}");
                assert_eq!(LENGTHS[sym] as usize, len);
            }
        }
        // Kraft equality: the code is complete.
        let kraft: u64 = LENGTHS
            .iter()
            .map(|&l| 1u64 << (MAX_LEN - l as usize))
            .sum();
        assert_eq!(kraft, 1u64 << MAX_LEN);
        assert_eq!(CODES[EOS], (1 << 30) - 1);
    }

    #[test]
    fn every_byte_round_trips() {
        let all: Vec<u8> = (0..=255u8).collect();
        let mut enc = Vec::new();
        encode(&all, &mut enc);
        assert_eq!(enc.len(), encoded_len(&all));
        let mut dec = Vec::new();
        decode(&enc, &mut dec).unwrap();
        assert_eq!(dec, all);
    }

    #[test]
    fn rfc_c4_www_example_com() {
        let enc = hex::decode("f1e3c2e5f23a6ba0ab90f4ff").unwrap();
        let mut dec = Vec::new();
        decode(&enc, &mut dec).unwrap();
        assert_eq!(dec, b"www.example.com");
        let mut again = Vec::new();
        encode(b"www.example.com", &mut again);
        assert_eq!(again, enc);
    }

    #[test]
    fn rejects_bad_padding_and_eos() {
        let mut d = Vec::new();
        // "a" is 00011; padding with zeros is not a prefix of EOS.
        assert_eq!(decode(&[0b0001_1000], &mut d), Err(HpackError::Huffman));
        // A whole byte of ones is padding longer than 7 bits.
        assert_eq!(
            decode(&[0b0001_1111, 0xff], &mut d),
            Err(HpackError::Huffman)
        );
        // EOS itself (30 ones) inside the string.
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff], &mut d),
            Err(HpackError::Huffman)
        );
        d.clear();
        assert_eq!(decode(&[0b0001_1111], &mut d), Ok(()));
        assert_eq!(d, b"a");
        d.clear();
        assert_eq!(decode(&[], &mut d), Ok(()));
        assert!(d.is_empty());
    }
}
