//! Minimal HPACK encoder that never uses a dynamic table: static-table references and literals
//! without indexing only, so the receiving decoder's dynamic table is never read or changed.

use super::table::{static_lookup, StaticMatch};
use super::{huffman, HeaderList};

/// Appends `value` as an HPACK integer with an `n`-bit prefix; `flags` fills the high bits of the
/// first byte (RFC 7541 §5.1).
pub fn encode_int(value: usize, prefix_bits: u8, flags: u8, dst: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        dst.push(flags | value as u8);
        return;
    }
    dst.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        dst.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    dst.push(rest as u8);
}

/// Appends a string literal, Huffman-coded if `huffman` (RFC 7541 §5.2).
pub fn encode_string(s: &[u8], huffman: bool, dst: &mut Vec<u8>) {
    if huffman {
        encode_int(huffman::encoded_len(s), 7, 0x80, dst);
        huffman::encode(s, dst);
    } else {
        encode_int(s.len(), 7, 0, dst);
        dst.extend_from_slice(s);
    }
}

/// Appends one field: an indexed static entry when name and value match one, else a literal
/// without indexing (or never indexed, if the sender asked for that) with a static name index
/// where possible. Strings are sent raw: cheaper than Huffman, and the receiver is local.
pub fn encode_field(name: &[u8], value: &[u8], never_indexed: bool, dst: &mut Vec<u8>) {
    let flags = if never_indexed { 0x10 } else { 0x00 };
    match static_lookup(name, value) {
        StaticMatch::Full(i) if !never_indexed => encode_int(i, 7, 0x80, dst),
        StaticMatch::Full(i) | StaticMatch::Name(i) => {
            encode_int(i, 4, flags, dst);
            encode_string(value, false, dst);
        }
        StaticMatch::None => {
            dst.push(flags);
            encode_string(name, false, dst);
            encode_string(value, false, dst);
        }
    }
}

/// Encodes a whole header list (appending to `dst`).
pub fn encode_list(list: &HeaderList, dst: &mut Vec<u8>) {
    for f in list.iter() {
        encode_field(f.name, f.value, f.never_indexed, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::super::Decoder;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encodes_static_matches_compactly() {
        let mut out = vec![];
        encode_field(b":method", b"POST", false, &mut out);
        encode_field(b":authority", b"localhost", false, &mut out);
        encode_field(b"te", b"trailers", false, &mut out);
        encode_field(b"authorization", b"x", true, &mut out);
        let mut want = vec![0x83, 0x01, 9];
        want.extend_from_slice(b"localhost");
        want.extend_from_slice(&[0x00, 2, b't', b'e', 8]);
        want.extend_from_slice(b"trailers");
        want.extend_from_slice(&[0x1f, 0x08, 1, b'x']);
        assert_eq!(out, want);
    }

    #[test]
    fn round_trip_leaves_the_decoder_table_empty() {
        let mut list = HeaderList::new();
        list.push(b":method", b"POST", false);
        list.push(b":scheme", b"http", false);
        list.push(b":path", b"/v2.KeyManagementService/Status", false);
        list.push(b":authority", b"localhost", false);
        list.push(b"content-type", b"application/grpc", false);
        list.push(b"te", b"trailers", false);
        list.push(b"grpc-timeout", b"2999m", false);
        list.push(b"x-secret", b"s", true);
        let mut block = vec![];
        encode_list(&list, &mut block);
        let mut d = Decoder::new(4096, 1 << 16);
        let mut out = HeaderList::new();
        d.decode(&block, &mut out).unwrap();
        assert_eq!(out.to_vec(), list.to_vec());
        assert!(out.get(7).unwrap().never_indexed);
        assert!(d.table().is_empty());
    }

    proptest! {
        #[test]
        fn decode_of_encode_is_identity(
            fields in proptest::collection::vec(
                (prop_oneof![
                    prop::sample::select(vec![
                        &b":authority"[..], b":method", b":path", b"content-type", b"te", b""
                    ]).prop_map(<[u8]>::to_vec),
                    proptest::collection::vec(any::<u8>(), 0..20),
                ],
                 proptest::collection::vec(any::<u8>(), 0..300),
                 any::<bool>()),
                0..20)
        ) {
            let mut list = HeaderList::new();
            for (n, v, never) in &fields {
                list.push(n, v, *never);
            }
            let mut block = vec![];
            encode_list(&list, &mut block);
            let mut d = Decoder::new(4096, 1 << 20);
            let mut out = HeaderList::new();
            d.decode(&block, &mut out).unwrap();
            prop_assert_eq!(out.to_vec(), list.to_vec());
            for (a, b) in out.iter().zip(list.iter()) {
                prop_assert_eq!(a.never_indexed, b.never_indexed);
            }
            prop_assert!(d.table().is_empty());
        }

        #[test]
        fn huffman_strings_round_trip(s in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut enc = vec![];
            encode_string(&s, true, &mut enc);
            let mut pos = 0;
            let mut dec = vec![];
            super::super::decode_string(&enc, &mut pos, &mut dec).unwrap();
            prop_assert_eq!(dec, s);
        }
    }
}
