//! HPACK static table (RFC 7541 Appendix A) and dynamic table (RFC 7541 §2.3.2, §4).

use std::collections::VecDeque;

use super::HpackError;

/// Per-entry overhead counted in the table size (RFC 7541 §4.1).
pub const ENTRY_OVERHEAD: usize = 32;

/// RFC 7541 Appendix A; index `i` is HPACK index `i + 1`.
#[rustfmt::skip]
pub const STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// Result of looking a field up in the static table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaticMatch {
    /// Name and value match this index.
    Full(usize),
    /// Only the name matches this (lowest) index.
    Name(usize),
    None,
}

/// Finds `(name, value)` in the static table. A linear scan: 61 short comparisons, cheaper than
/// hashing for the handful of fields a gRPC request carries.
pub fn static_lookup(name: &[u8], value: &[u8]) -> StaticMatch {
    let mut name_match = None;
    for (i, (n, v)) in STATIC_TABLE.iter().enumerate() {
        if *n == name {
            if *v == value {
                return StaticMatch::Full(i + 1);
            }
            name_match.get_or_insert(i + 1);
        } else if name_match.is_some() {
            // Entries with the same name are adjacent.
            break;
        }
    }
    name_match.map_or(StaticMatch::None, StaticMatch::Name)
}

struct Entry {
    /// Name followed by value, one allocation per entry.
    data: Box<[u8]>,
    name_len: usize,
}

/// The decoder's dynamic table: newest entry first, evicting the oldest to stay within `max_size`.
pub struct DynamicTable {
    entries: VecDeque<Entry>,
    size: usize,
    max_size: usize,
}

impl DynamicTable {
    pub fn new(max_size: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max_size,
        }
    }

    /// Current size as RFC 7541 §4.1 counts it.
    pub fn size(&self) -> usize {
        self.size
    }

    pub fn max_size(&self) -> usize {
        self.max_size
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Resolves an HPACK index (1-based, static then dynamic) to (name, value).
    pub fn get(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        if index == 0 {
            return Err(HpackError::InvalidIndex(index));
        }
        if index <= STATIC_TABLE.len() {
            return Ok(STATIC_TABLE[index - 1]);
        }
        let e = self
            .entries
            .get(index - STATIC_TABLE.len() - 1)
            .ok_or(HpackError::InvalidIndex(index))?;
        Ok(e.data.split_at(e.name_len))
    }

    /// Entry `pos` of the dynamic part, 0 being the newest, as (name, value).
    pub(crate) fn dynamic(&self, pos: usize) -> Option<(&[u8], &[u8])> {
        self.entries.get(pos).map(|e| e.data.split_at(e.name_len))
    }

    /// Adds an entry already laid out as name followed by value.
    pub(crate) fn insert_owned(&mut self, data: Box<[u8]>, name_len: usize) {
        let entry_size = data.len() + ENTRY_OVERHEAD;
        if entry_size > self.max_size {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max_size - entry_size);
        self.entries.push_front(Entry { data, name_len });
        self.size += entry_size;
    }

    /// Adds an entry; an entry larger than the whole table empties it and is not added (§4.4).
    pub fn insert(&mut self, name: &[u8], value: &[u8]) {
        let entry_size = name.len() + value.len() + ENTRY_OVERHEAD;
        if entry_size > self.max_size {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max_size - entry_size);
        let mut data = Vec::with_capacity(name.len() + value.len());
        data.extend_from_slice(name);
        data.extend_from_slice(value);
        self.entries.push_front(Entry {
            data: data.into_boxed_slice(),
            name_len: name.len(),
        });
        self.size += entry_size;
    }

    /// Applies a dynamic table size update (§4.3, §6.3); the caller checked it against the limit.
    pub fn set_max_size(&mut self, max_size: usize) {
        self.max_size = max_size;
        self.evict_to(max_size);
    }

    fn evict_to(&mut self, target: usize) {
        while self.size > target {
            match self.entries.pop_back() {
                Some(e) => self.size -= e.data.len() + ENTRY_OVERHEAD,
                None => {
                    self.size = 0;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_lookup_finds_full_and_name_matches() {
        assert_eq!(static_lookup(b":method", b"POST"), StaticMatch::Full(3));
        assert_eq!(static_lookup(b":method", b"PUT"), StaticMatch::Name(2));
        assert_eq!(static_lookup(b":authority", b"x"), StaticMatch::Name(1));
        assert_eq!(
            static_lookup(b"www-authenticate", b""),
            StaticMatch::Full(61)
        );
        assert_eq!(static_lookup(b"content-type", b"a"), StaticMatch::Name(31));
        assert_eq!(static_lookup(b"te", b"trailers"), StaticMatch::None);
    }

    #[test]
    fn eviction_and_oversized_entries() {
        let mut t = DynamicTable::new(100);
        t.insert(b"aaaa", b"bbbb"); // 40
        t.insert(b"cccc", b"dddd"); // 80
        assert_eq!(t.get(62).unwrap(), (&b"cccc"[..], &b"dddd"[..]));
        assert_eq!(t.get(63).unwrap(), (&b"aaaa"[..], &b"bbbb"[..]));
        t.insert(b"eeee", b"ffff"); // evicts the oldest
        assert_eq!(t.len(), 2);
        assert_eq!(t.size(), 80);
        assert_eq!(t.get(63).unwrap().0, b"cccc");
        assert_eq!(t.get(64), Err(HpackError::InvalidIndex(64)));
        t.insert(&[b'x'; 70], b""); // 102 > 100: empties the table
        assert!(t.is_empty());
        assert_eq!(t.size(), 0);
        t.insert(b"a", b"b");
        t.set_max_size(0);
        assert!(t.is_empty());
        assert_eq!(t.get(0), Err(HpackError::InvalidIndex(0)));
    }
}
