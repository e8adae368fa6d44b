//! HPACK header block decoder (RFC 7541 §6) that keeps its dynamic table in step with the peer's
//! encoder.

use super::table::{DynamicTable, ENTRY_OVERHEAD, STATIC_TABLE};
use super::{decode_int, decode_string, HeaderList, HpackError};

/// h2 closes the connection (ENHANCE_YOUR_CALM) once a block decodes to more than this many
/// times its header list limit; below that, an over-size block only fails its stream.
pub const ABUSE_MULTIPLIER: usize = 4;

/// Decodes the header blocks of one direction of one connection, in order.
pub struct Decoder {
    table: DynamicTable,
    /// Largest dynamic table size the peer may select: our SETTINGS_HEADER_TABLE_SIZE.
    size_limit: usize,
    /// Decoded header list size (name + value + 32 per field) from which fields are no longer
    /// stored: h2's SETTINGS_MAX_HEADER_LIST_SIZE, past which it answers 431 on that stream.
    max_list_size: usize,
    /// Whether the last clean [`Decoder::scan`] saw an `:authority` field.
    scanned_authority: bool,
}

impl Decoder {
    /// `table_size_limit` is the SETTINGS_HEADER_TABLE_SIZE the receiver advertised (4096 by
    /// default); the table starts at that size, as RFC 7541 §4.2 says.
    pub fn new(table_size_limit: usize, max_list_size: usize) -> Self {
        Self {
            table: DynamicTable::new(table_size_limit),
            size_limit: table_size_limit,
            max_list_size,
            scanned_authority: false,
        }
    }

    /// The dynamic table, for inspection in tests.
    pub fn table(&self) -> &DynamicTable {
        &self.table
    }

    /// Decodes one complete header block into `out` (cleared first). Once the list reaches
    /// `max_list_size` further fields are decoded (the dynamic table must stay in step) but not
    /// stored, and `out.is_over_size()` is set: a stream error. Beyond
    /// [`ABUSE_MULTIPLIER`] times the limit decoding stops with `HeaderListTooLarge`, a connection
    /// error, as h2 does. On error the decoder's state is unspecified and the connection must be
    /// closed.
    pub fn decode(&mut self, block: &[u8], out: &mut HeaderList) -> Result<(), HpackError> {
        out.clear();
        let mut pos = 0;
        let mut size_update_allowed = true;
        while let Some(&first) = block.get(pos) {
            if first & 0x80 != 0 {
                // §6.1 indexed header field.
                let index = decode_int(block, &mut pos, 7)?;
                let (name, value) = self.table.get(index)?;
                out.push(name, value, false);
            } else if first & 0xe0 == 0x20 {
                // §6.3 dynamic table size update: only before the first field of a block.
                if !size_update_allowed {
                    return Err(HpackError::SizeUpdateNotAtStart);
                }
                let size = decode_int(block, &mut pos, 5)?;
                if size > self.size_limit {
                    return Err(HpackError::SizeUpdateTooLarge(size));
                }
                self.table.set_max_size(size);
                continue;
            } else {
                // §6.2 literals: with incremental indexing (01), without (0000), never (0001).
                let (prefix_bits, indexing, never_indexed) = if first & 0x40 != 0 {
                    (6, true, false)
                } else {
                    (4, false, first & 0x10 != 0)
                };
                let name_index = decode_int(block, &mut pos, prefix_bits)?;
                let start = out.mark();
                if name_index == 0 {
                    decode_string(block, &mut pos, out.buf_mut())?;
                } else {
                    let (name, _) = self.table.get(name_index)?;
                    out.buf_mut().extend_from_slice(name);
                }
                let name_end = out.mark();
                decode_string(block, &mut pos, out.buf_mut())?;
                out.finish_field(start, name_end, never_indexed);
                if indexing {
                    // Copied out of `out` first: the referenced name may be the entry this
                    // insertion evicts (§4.4).
                    if let Some((name, value)) = out.last() {
                        self.table.insert(name, value);
                    }
                }
            }
            size_update_allowed = false;
            if out.list_size() >= self.max_list_size {
                out.drop_last_over_size();
                if out.list_size() > self.max_list_size.saturating_mul(ABUSE_MULTIPLIER) {
                    return Err(HpackError::HeaderListTooLarge(self.max_list_size));
                }
            }
        }
        Ok(())
    }
}

/// One table change of a scanned block, applied once the block is known to need no rewrite.
enum Op {
    SizeUpdate(usize),
    /// Index into `Overlay::added`.
    Insert(usize),
}

/// The dynamic table as a block being scanned sees it, without changing the real one: entries the
/// block added (newest last) over the real table with its `evicted` oldest entries gone.
struct Overlay<'a> {
    table: &'a DynamicTable,
    added: Vec<(Box<[u8]>, usize)>,
    /// Oldest entry of `added` still in the table.
    added_start: usize,
    evicted: usize,
    size: usize,
    max_size: usize,
    ops: Vec<Op>,
}

impl Overlay<'_> {
    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        if index == 0 {
            return Err(HpackError::InvalidIndex(index));
        }
        if index <= STATIC_TABLE.len() {
            return Ok(STATIC_TABLE[index - 1]);
        }
        let pos = index - STATIC_TABLE.len() - 1;
        let live_added = self.added.len() - self.added_start;
        if pos < live_added {
            let (data, name_len) = &self.added[self.added.len() - 1 - pos];
            return Ok(data.split_at(*name_len));
        }
        let pos = pos - live_added;
        if pos < self.table.len() - self.evicted {
            return self
                .table
                .dynamic(pos)
                .ok_or(HpackError::InvalidIndex(index));
        }
        Err(HpackError::InvalidIndex(index))
    }

    fn evict_to(&mut self, target: usize) {
        while self.size > target {
            let live_table = self.table.len() - self.evicted;
            let freed = if live_table > 0 {
                self.evicted += 1;
                self.table
                    .dynamic(live_table - 1)
                    .map_or(0, |(n, v)| n.len() + v.len())
            } else if self.added_start < self.added.len() {
                self.added_start += 1;
                self.added[self.added_start - 1].0.len()
            } else {
                self.size = 0;
                break;
            };
            self.size -= freed + ENTRY_OVERHEAD;
        }
    }

    fn insert(&mut self, data: Box<[u8]>, name_len: usize) {
        let entry_size = data.len() + ENTRY_OVERHEAD;
        if entry_size > self.max_size {
            self.evict_to(0);
        } else {
            self.evict_to(self.max_size - entry_size);
            self.size += entry_size;
        }
        self.ops.push(Op::Insert(self.added.len()));
        self.added.push((data, name_len));
        if entry_size > self.max_size {
            // Not added (§4.4); keep it out of lookups.
            self.added_start = self.added.len();
        }
    }
}

impl Decoder {
    /// Whether `block` carries an `:authority` that is not a valid URI authority, found without
    /// decoding the block: only `:authority` values and entries added to the dynamic table are
    /// looked at; other literals are skipped unread (h2 decodes and checks them). If the answer is
    /// no, the table is updated as [`Decoder::decode`] would have; if yes, it is left unchanged so
    /// that the block can be decoded in full.
    pub fn scan(&mut self, block: &[u8], scratch: &mut Vec<u8>) -> Result<bool, HpackError> {
        self.scanned_authority = false;
        let mut authority = false;
        let mut ov = Overlay {
            table: &self.table,
            added: Vec::new(),
            added_start: 0,
            evicted: 0,
            size: self.table.size(),
            max_size: self.table.max_size(),
            ops: Vec::new(),
        };
        let mut pos = 0;
        let mut size_update_allowed = true;
        // A lower bound of the decoded list size (skipped Huffman strings count their shortest
        // decoding), so a reference bomb ends the connection here exactly as in `decode`.
        let mut list_size = 0usize;
        let abuse_limit = self.max_list_size.saturating_mul(ABUSE_MULTIPLIER);
        while let Some(&first) = block.get(pos) {
            if first & 0x80 != 0 {
                let index = decode_int(block, &mut pos, 7)?;
                let (name, value) = ov.get(index)?;
                if is_bad_authority(name, value) {
                    return Ok(true);
                }
                authority |= name == b":authority";
                list_size += name.len() + value.len() + ENTRY_OVERHEAD;
            } else if first & 0xe0 == 0x20 {
                if !size_update_allowed {
                    return Err(HpackError::SizeUpdateNotAtStart);
                }
                let size = decode_int(block, &mut pos, 5)?;
                if size > self.size_limit {
                    return Err(HpackError::SizeUpdateTooLarge(size));
                }
                ov.max_size = size;
                ov.evict_to(size);
                ov.ops.push(Op::SizeUpdate(size));
                continue;
            } else {
                let (prefix_bits, indexing) = if first & 0x40 != 0 {
                    (6, true)
                } else {
                    (4, false)
                };
                let name_index = decode_int(block, &mut pos, prefix_bits)?;
                scratch.clear();
                if name_index == 0 {
                    decode_string(block, &mut pos, scratch)?;
                } else {
                    scratch.extend_from_slice(ov.get(name_index)?.0);
                }
                let name_len = scratch.len();
                if indexing || scratch.as_slice() == b":authority" {
                    decode_string(block, &mut pos, scratch)?;
                    let (name, value) = scratch.split_at(name_len);
                    if is_bad_authority(name, value) {
                        return Ok(true);
                    }
                    authority |= name == b":authority";
                    list_size += scratch.len() + ENTRY_OVERHEAD;
                    if indexing {
                        ov.insert(scratch.as_slice().into(), name_len);
                    }
                } else {
                    list_size += name_len + skip_string(block, &mut pos)? + ENTRY_OVERHEAD;
                }
            }
            size_update_allowed = false;
            if list_size > abuse_limit {
                return Err(HpackError::HeaderListTooLarge(self.max_list_size));
            }
        }
        let Overlay { added, ops, .. } = ov;
        let mut added: Vec<Option<(Box<[u8]>, usize)>> = added.into_iter().map(Some).collect();
        for op in ops {
            match op {
                Op::SizeUpdate(size) => self.table.set_max_size(size),
                Op::Insert(i) => {
                    if let Some((data, name_len)) = added.get_mut(i).and_then(Option::take) {
                        self.table.insert_owned(data, name_len);
                    }
                }
            }
        }
        self.scanned_authority = authority;
        Ok(false)
    }

    /// Whether the last [`Decoder::scan`] that found no path authority saw a valid one.
    pub fn scanned_authority(&self) -> bool {
        self.scanned_authority
    }
}

fn is_bad_authority(name: &[u8], value: &[u8]) -> bool {
    name == b":authority" && !crate::protocol::authority::is_valid_authority(value)
}

/// Steps over a string literal without decoding it; returns the shortest length it can decode
/// to (Huffman codes are at most 30 bits).
fn skip_string(src: &[u8], pos: &mut usize) -> Result<usize, HpackError> {
    let huffman = src.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = decode_int(src, pos, 7)?;
    let end = pos.checked_add(len).ok_or(HpackError::Truncated)?;
    if end > src.len() {
        return Err(HpackError::Truncated);
    }
    *pos = end;
    Ok(if huffman { len * 8 / 30 } else { len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s.replace([' ', '\n'], "")).unwrap()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    /// Decodes RFC 7541 C.3 / C.4 (the same requests without and with Huffman coding).
    fn requests(blocks: [&str; 3]) {
        let mut d = Decoder::new(4096, 1 << 16);
        let mut out = HeaderList::new();
        d.decode(&h(blocks[0]), &mut out).unwrap();
        assert_eq!(
            out.to_vec(),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        assert_eq!(d.table().size(), 57);
        d.decode(&h(blocks[1]), &mut out).unwrap();
        assert_eq!(
            out.to_vec(),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache")
            ])
        );
        assert_eq!(d.table().size(), 110);
        d.decode(&h(blocks[2]), &mut out).unwrap();
        assert_eq!(
            out.to_vec(),
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert_eq!(d.table().size(), 164);
        assert_eq!(d.table().get(62).unwrap().0, b"custom-key");
        assert_eq!(d.table().get(64).unwrap().1, b"www.example.com");
    }

    #[test]
    fn rfc_c3_requests_without_huffman() {
        requests([
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "8286 84be 5808 6e6f 2d63 6163 6865",
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        ]);
    }

    #[test]
    fn rfc_c4_requests_with_huffman() {
        requests([
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ]);
    }

    /// RFC 7541 C.5 / C.6: responses with a 256-byte table, so entries are evicted.
    fn responses(blocks: [&str; 3]) {
        let mut d = Decoder::new(256, 1 << 16);
        let mut out = HeaderList::new();
        d.decode(&h(blocks[0]), &mut out).unwrap();
        assert_eq!(
            out.to_vec(),
            pairs(&[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com")
            ])
        );
        assert_eq!(d.table().size(), 222);
        assert_eq!(d.table().len(), 4);
        d.decode(&h(blocks[1]), &mut out).unwrap();
        assert_eq!(
            out.to_vec(),
            pairs(&[
                (":status", "307"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com")
            ])
        );
        // ":status: 302" was evicted to make room for ":status: 307".
        assert_eq!(d.table().size(), 222);
        assert_eq!(d.table().get(62).unwrap(), (&b":status"[..], &b"307"[..]));
        assert_eq!(d.table().get(65).unwrap().0, b"cache-control");
        d.decode(&h(blocks[2]), &mut out).unwrap();
        assert_eq!(
            out.to_vec(),
            pairs(&[
                (":status", "200"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
                ("location", "https://www.example.com"),
                ("content-encoding", "gzip"),
                (
                    "set-cookie",
                    "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
                )
            ])
        );
        assert_eq!(d.table().size(), 215);
        assert_eq!(d.table().len(), 3);
        assert_eq!(d.table().get(62).unwrap().0, b"set-cookie");
        assert_eq!(d.table().get(63).unwrap().1, b"gzip");
        assert_eq!(
            d.table().get(64).unwrap().1,
            b"Mon, 21 Oct 2013 20:13:22 GMT"
        );
        assert!(d.table().get(65).is_err());
    }

    #[test]
    fn rfc_c5_responses_without_huffman() {
        responses([
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
             2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
             6c65 2e63 6f6d",
            "4803 3330 37c1 c0bf",
            "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d
             54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049
             5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e
             3d31",
        ]);
    }

    #[test]
    fn rfc_c6_responses_with_huffman() {
        responses([
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6
             2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            "4883 640e ffc1 c0bf",
            "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab
             77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
             9587 3160 65c0 03ed 4ee5 b106 3d50 07",
        ]);
    }

    #[test]
    fn size_updates() {
        let mut d = Decoder::new(4096, 1 << 16);
        let mut out = HeaderList::new();
        // Two updates at the start are fine (§4.2), then a field.
        d.decode(&[0x20, 0x3f, 0xe1, 0x1f, 0x82], &mut out).unwrap();
        assert_eq!(d.table().max_size(), 4096);
        assert_eq!(
            d.decode(&[0x82, 0x20], &mut out),
            Err(HpackError::SizeUpdateNotAtStart)
        );
        let mut d = Decoder::new(4096, 1 << 16);
        // 4097 = 31 + 4066 → 0x3f, 0xe2, 0x1f
        assert_eq!(
            d.decode(&[0x3f, 0xe2, 0x1f], &mut out),
            Err(HpackError::SizeUpdateTooLarge(4097))
        );
    }

    #[test]
    fn errors_are_reported() {
        let mut d = Decoder::new(4096, 100);
        let mut out = HeaderList::new();
        assert_eq!(
            d.decode(&[0x80], &mut out),
            Err(HpackError::InvalidIndex(0))
        );
        assert_eq!(
            d.decode(&[0xbe], &mut out),
            Err(HpackError::InvalidIndex(62))
        );
        assert_eq!(d.decode(&[0x41], &mut out), Err(HpackError::Truncated));
        // A literal with a 200-byte value is over the 100-byte list limit: decoded, not kept.
        let mut block = vec![0x82, 0x01, 0x7f, 200 - 127];
        block.extend_from_slice(&[b'a'; 200]);
        d.decode(&block, &mut out).unwrap();
        assert!(out.is_over_size());
        assert_eq!(out.len(), 1);
        assert_eq!(out.list_size(), 42 + 10 + 200 + 32);
        // Past four times the limit it is a connection error.
        let mut block = vec![0x01];
        super::super::encode_int(500, 7, 0, &mut block);
        block.extend_from_slice(&[b'a'; 500]);
        assert_eq!(
            d.decode(&block, &mut out),
            Err(HpackError::HeaderListTooLarge(100))
        );
    }

    #[test]
    fn never_indexed_flag_is_kept() {
        let mut d = Decoder::new(4096, 1 << 16);
        let mut out = HeaderList::new();
        // C.2.3: literal never indexed "password: secret".
        d.decode(&h("1008 7061 7373 776f 7264 0673 6563 7265 74"), &mut out)
            .unwrap();
        let f = out.get(0).unwrap();
        assert_eq!(
            (f.name, f.value, f.never_indexed),
            (&b"password"[..], &b"secret"[..], true)
        );
        assert!(d.table().is_empty());
    }
}

#[cfg(test)]
mod scan_tests {
    use super::super::{encode_int, encode_string};
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Rep {
        Indexed(usize),
        Literal {
            incremental: bool,
            name_index: usize,
            name: String,
            value: String,
            huffman: bool,
        },
    }

    fn rep() -> impl Strategy<Value = Rep> {
        prop_oneof![
            (1usize..72).prop_map(Rep::Indexed),
            (
                any::<bool>(),
                prop_oneof![Just(0usize), Just(1usize), 2usize..72],
                "[a-z:]{1,12}",
                prop_oneof![
                    Just("localhost".to_string()),
                    Just("/run/kms.sock".to_string()),
                    "[ -~]{0,300}"
                ],
                any::<bool>()
            )
                .prop_map(|(incremental, name_index, name, value, huffman)| {
                    Rep::Literal {
                        incremental,
                        name_index,
                        name,
                        value,
                        huffman,
                    }
                }),
        ]
    }

    fn encode(block: &[Rep], size_update: Option<usize>) -> Vec<u8> {
        let mut out = vec![];
        if let Some(s) = size_update {
            encode_int(s, 5, 0x20, &mut out);
        }
        for r in block {
            match r {
                Rep::Indexed(i) => encode_int(*i, 7, 0x80, &mut out),
                Rep::Literal {
                    incremental,
                    name_index,
                    name,
                    value,
                    huffman,
                } => {
                    let (prefix, flags) = if *incremental { (6, 0x40) } else { (4, 0) };
                    encode_int(*name_index, prefix, flags, &mut out);
                    if *name_index == 0 {
                        encode_string(name.as_bytes(), *huffman, &mut out);
                    }
                    encode_string(value.as_bytes(), *huffman, &mut out);
                }
            }
        }
        out
    }

    fn entries(t: &DynamicTable) -> Vec<(Vec<u8>, Vec<u8>)> {
        (0..t.len())
            .filter_map(|p| t.dynamic(p))
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect()
    }

    proptest! {
        /// Scanning a clean block changes the table exactly as decoding it does, a block with a
        /// path authority is reported and leaves the table alone, and errors agree.
        #[test]
        fn scan_tracks_the_table_like_decode(blocks in proptest::collection::vec(
            (proptest::collection::vec(rep(), 0..12), proptest::option::of(0usize..4200)), 1..12)
        ) {
            let mut full = Decoder::new(512, 1 << 16);
            let mut scanned = Decoder::new(512, 1 << 16);
            let (mut list, mut scratch) = (HeaderList::new(), vec![]);
            for (reps, size_update) in &blocks {
                let block = encode(reps, *size_update);
                let want = full.decode(&block, &mut list);
                let bad = want.is_ok()
                    && list.iter().any(|f| f.name == b":authority"
                        && !crate::protocol::authority::is_valid_authority(f.value));
                match scanned.scan(&block, &mut scratch) {
                    Ok(true) => {
                        // The rewriter decodes such a block in full, which may then fail.
                        prop_assert!(bad || want.is_err());
                        prop_assert_eq!(scanned.decode(&block, &mut list), want);
                    }
                    Ok(false) => {
                        prop_assert!(!bad);
                        prop_assert!(want.is_ok(), "{:?}", want);
                    }
                    Err(e) => {
                        prop_assert_eq!(Err(e), want);
                        return Ok(());
                    }
                }
                if want.is_err() {
                    return Ok(());
                }
                prop_assert_eq!(entries(full.table()), entries(scanned.table()));
                prop_assert_eq!(full.table().size(), scanned.table().size());
            }
        }
    }
}
