//! TTLV, the binary encoding of KMIP: a 3-byte tag, a 1-byte type, a 4-byte big-endian length,
//! then the value padded with zeros to a multiple of 8 bytes. Structures nest items.
//!
//! The decoder takes bytes from the network: it checks every length against the buffer and the
//! fixed sizes of the fixed-size types, limits nesting depth and message size, and returns an
//! error (never panics) on anything malformed.

/// Largest message the decoder accepts (and the client reads): far above any answer the plugin
/// asks for (a few hundred bytes), small enough to bound memory per connection.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Deepest structure nesting accepted. KMIP answers the plugin reads nest 5 levels.
pub const MAX_DEPTH: usize = 16;

const T_STRUCTURE: u8 = 0x01;
const T_INTEGER: u8 = 0x02;
const T_LONG: u8 = 0x03;
const T_BIG: u8 = 0x04;
const T_ENUM: u8 = 0x05;
const T_BOOL: u8 = 0x06;
const T_TEXT: u8 = 0x07;
const T_BYTES: u8 = 0x08;
const T_DATETIME: u8 = 0x09;
const T_INTERVAL: u8 = 0x0A;
/// KMIP 2.0: microseconds since the epoch.
const T_DATETIME_EXT: u8 = 0x0B;

/// One TTLV value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Structure(Vec<Item>),
    Integer(i32),
    LongInteger(i64),
    /// Two's complement, big-endian, a multiple of 8 bytes.
    BigInteger(Vec<u8>),
    Enumeration(u32),
    Boolean(bool),
    TextString(String),
    ByteString(Vec<u8>),
    /// Seconds since the epoch.
    DateTime(i64),
    /// Seconds.
    Interval(u32),
    DateTimeExtended(i64),
}

/// A tagged value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub tag: u32,
    pub value: Value,
}

/// Why bytes are not a valid TTLV message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TtlvError {
    #[error("truncated TTLV: {0}")]
    Truncated(&'static str),
    #[error("TTLV item of type {typ:#04x} has length {len}, which that type cannot have")]
    BadLength { typ: u8, len: u32 },
    #[error("unknown TTLV item type {0:#04x}")]
    UnknownType(u8),
    #[error("TTLV boolean with a value other than 0 or 1")]
    BadBoolean,
    #[error("TTLV text string is not UTF-8")]
    BadText,
    #[error("TTLV structures nest deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("TTLV message of {0} bytes is above the {MAX_MESSAGE}-byte cap")]
    TooLarge(usize),
    #[error("{0} trailing bytes after the TTLV message")]
    Trailing(usize),
    #[error("TTLV tag {0:#08x} is not in KMIP's 0x42xxxx / 0x54xxxx ranges")]
    BadTag(u32),
}

impl Item {
    pub fn new(tag: u32, value: Value) -> Self {
        Item { tag, value }
    }

    pub fn structure(tag: u32, items: Vec<Item>) -> Self {
        Item::new(tag, Value::Structure(items))
    }

    /// The children of a structure; empty for any other type.
    pub fn children(&self) -> &[Item] {
        match &self.value {
            Value::Structure(items) => items,
            _ => &[],
        }
    }

    /// The first child with `tag`.
    pub fn child(&self, tag: u32) -> Option<&Item> {
        self.children().iter().find(|i| i.tag == tag)
    }

    /// Every child with `tag`.
    pub fn all(&self, tag: u32) -> impl Iterator<Item = &Item> {
        self.children().iter().filter(move |i| i.tag == tag)
    }

    pub fn as_enum(&self) -> Option<u32> {
        match self.value {
            Value::Enumeration(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i32> {
        match self.value {
            Value::Integer(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_text(&self) -> Option<&str> {
        match &self.value {
            Value::TextString(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match &self.value {
            Value::ByteString(b) => Some(b),
            _ => None,
        }
    }

    /// Seconds since the epoch from either date-time type.
    pub fn as_datetime(&self) -> Option<i64> {
        match self.value {
            Value::DateTime(v) => Some(v),
            Value::DateTimeExtended(us) => Some(us.div_euclid(1_000_000)),
            _ => None,
        }
    }

    /// Appends the encoding of this item to `out`, writing values in place (no temporary copy
    /// of a byte string that may hold key material).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.tag.to_be_bytes()[1..]);
        out.push(self.type_byte());
        out.extend_from_slice(&[0; 4]);
        let body = out.len();
        match &self.value {
            Value::Structure(items) => {
                for i in items {
                    i.encode_into(out);
                }
            }
            Value::Integer(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::LongInteger(v) | Value::DateTime(v) | Value::DateTimeExtended(v) => {
                out.extend_from_slice(&v.to_be_bytes())
            }
            Value::BigInteger(b) | Value::ByteString(b) => out.extend_from_slice(b),
            Value::Enumeration(v) | Value::Interval(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Boolean(v) => out.extend_from_slice(&u64::from(*v).to_be_bytes()),
            Value::TextString(t) => out.extend_from_slice(t.as_bytes()),
        }
        let len = out.len() - body;
        out[start + 4..body].copy_from_slice(&(len as u32).to_be_bytes());
        out.resize(out.len() + padding(len), 0);
    }

    fn type_byte(&self) -> u8 {
        match self.value {
            Value::Structure(_) => T_STRUCTURE,
            Value::Integer(_) => T_INTEGER,
            Value::LongInteger(_) => T_LONG,
            Value::BigInteger(_) => T_BIG,
            Value::Enumeration(_) => T_ENUM,
            Value::Boolean(_) => T_BOOL,
            Value::TextString(_) => T_TEXT,
            Value::ByteString(_) => T_BYTES,
            Value::DateTime(_) => T_DATETIME,
            Value::Interval(_) => T_INTERVAL,
            Value::DateTimeExtended(_) => T_DATETIME_EXT,
        }
    }

    /// Overwrites every byte and text string in this item (and its children) with zeros and
    /// empties it: for messages that carried a plaintext key.
    pub fn wipe(&mut self) {
        use zeroize::Zeroize;
        match &mut self.value {
            Value::Structure(items) => items.iter_mut().for_each(Item::wipe),
            Value::ByteString(b) | Value::BigInteger(b) => b.zeroize(),
            Value::TextString(t) => t.zeroize(),
            _ => {}
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Room for every request the plugin sends, so the buffer is not reallocated (and copied).
        let mut out = Vec::with_capacity(1024);
        self.encode_into(&mut out);
        out
    }
}

fn padding(len: usize) -> usize {
    (8 - len % 8) % 8
}

/// The total length of the message whose first 8 bytes are `header`: what a reader must read.
pub fn message_len(header: &[u8; 8]) -> Result<usize, TtlvError> {
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let total = 8usize.saturating_add(len).saturating_add(padding(len));
    if total > MAX_MESSAGE {
        return Err(TtlvError::TooLarge(total));
    }
    Ok(total)
}

/// Decodes exactly one item filling `buf`.
pub fn decode(buf: &[u8]) -> Result<Item, TtlvError> {
    if buf.len() > MAX_MESSAGE {
        return Err(TtlvError::TooLarge(buf.len()));
    }
    let (item, used) = decode_at(buf, 0)?;
    if used != buf.len() {
        return Err(TtlvError::Trailing(buf.len() - used));
    }
    Ok(item)
}

/// Decodes the item at the start of `buf`; returns it and the bytes it used (padding included).
fn decode_at(buf: &[u8], depth: usize) -> Result<(Item, usize), TtlvError> {
    if depth > MAX_DEPTH {
        return Err(TtlvError::TooDeep);
    }
    let header = buf
        .get(..8)
        .ok_or(TtlvError::Truncated("item header needs 8 bytes"))?;
    let tag = u32::from_be_bytes([0, header[0], header[1], header[2]]);
    if !matches!(tag >> 16, 0x42 | 0x54) {
        return Err(TtlvError::BadTag(tag));
    }
    let typ = header[3];
    let len32 = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let len = len32 as usize;
    let padded = len
        .checked_add(padding(len))
        .ok_or(TtlvError::Truncated("length overflows"))?;
    let body = buf
        .get(8..8usize.saturating_add(padded))
        .ok_or(TtlvError::Truncated("value is shorter than its length"))?;
    let v = &body[..len];
    let fixed = |n: usize| {
        if len == n {
            Ok(())
        } else {
            Err(TtlvError::BadLength { typ, len: len32 })
        }
    };
    let value = match typ {
        T_STRUCTURE => {
            let mut items = Vec::new();
            let mut at = 0;
            while at < v.len() {
                let (item, used) = decode_at(&v[at..], depth + 1)?;
                items.push(item);
                at += used;
            }
            if padded != len {
                // A structure's length is the sum of padded children: always a multiple of 8.
                return Err(TtlvError::BadLength { typ, len: len32 });
            }
            Value::Structure(items)
        }
        T_INTEGER => {
            fixed(4)?;
            Value::Integer(i32::from_be_bytes([v[0], v[1], v[2], v[3]]))
        }
        T_ENUM => {
            fixed(4)?;
            Value::Enumeration(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
        }
        T_INTERVAL => {
            fixed(4)?;
            Value::Interval(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
        }
        T_LONG | T_DATETIME | T_DATETIME_EXT | T_BOOL => {
            fixed(8)?;
            let mut b = [0u8; 8];
            b.copy_from_slice(v);
            let n = i64::from_be_bytes(b);
            match typ {
                T_LONG => Value::LongInteger(n),
                T_DATETIME => Value::DateTime(n),
                T_DATETIME_EXT => Value::DateTimeExtended(n),
                _ => match n {
                    0 => Value::Boolean(false),
                    1 => Value::Boolean(true),
                    _ => return Err(TtlvError::BadBoolean),
                },
            }
        }
        T_BIG => {
            if !len.is_multiple_of(8) || len == 0 {
                return Err(TtlvError::BadLength { typ, len: len32 });
            }
            Value::BigInteger(v.to_vec())
        }
        T_TEXT => Value::TextString(
            std::str::from_utf8(v)
                .map_err(|_| TtlvError::BadText)?
                .to_string(),
        ),
        T_BYTES => Value::ByteString(v.to_vec()),
        other => return Err(TtlvError::UnknownType(other)),
    };
    Ok((Item { tag, value }, 8 + padded))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s.replace([' ', '|'], "")).unwrap()
    }

    /// The primitive-type examples of the KMIP specification's TTLV encoding section (tag 0x420020).
    #[test]
    fn spec_examples_encode_and_decode() {
        let t = 0x420020;
        let cases = [
            (Value::Integer(8), "420020|02|00000004|00000008 00000000"),
            (
                Value::LongInteger(123_456_789_000_000_000),
                "420020|03|00000008|01B69B4BA5749200",
            ),
            (
                Value::BigInteger(unhex("0000000003FD35EB 6BC2DF4618080000")),
                "420020|04|00000010|0000000003FD35EB6BC2DF4618080000",
            ),
            (
                Value::Enumeration(255),
                "420020|05|00000004|000000FF 00000000",
            ),
            (Value::Boolean(true), "420020|06|00000008|0000000000000001"),
            (
                Value::TextString("Hello World".into()),
                "420020|07|0000000B|48656C6C6F20576F726C640000000000",
            ),
            (
                Value::ByteString(vec![1, 2, 3]),
                "420020|08|00000003|0102030000000000",
            ),
            (
                Value::DateTime(0x47DA_67F8),
                "420020|09|00000008|0000000047DA67F8",
            ),
            (
                Value::Interval(864_000),
                "420020|0A|00000004|000D2F0000000000",
            ),
        ];
        for (value, wire) in cases {
            let item = Item::new(t, value);
            assert_eq!(hex::encode(item.encode()), hex::encode(unhex(wire)));
            assert_eq!(decode(&unhex(wire)).unwrap(), item);
        }
        // The structure example: an enumeration 254 (tag 0x420004) and an integer 255 (0x420005).
        let s = Item::structure(
            t,
            vec![
                Item::new(0x420004, Value::Enumeration(254)),
                Item::new(0x420005, Value::Integer(255)),
            ],
        );
        let wire = "420020|01|00000020|420004|05|00000004|000000FE00000000|420005|02|00000004|000000FF00000000";
        assert_eq!(hex::encode(s.encode()), hex::encode(unhex(wire)));
        assert_eq!(decode(&unhex(wire)).unwrap(), s);
    }

    #[test]
    fn malformed_input_is_an_error() {
        let ok = unhex("420020|02|00000004|0000000800000000");
        assert!(decode(&ok).is_ok());
        for cut in 0..ok.len() {
            assert!(decode(&ok[..cut]).is_err(), "truncated at {cut}");
        }
        let mut trailing = ok.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(TtlvError::Trailing(1)));
        assert!(matches!(
            decode(&unhex("420020|02|00000008|0000000800000000")),
            Err(TtlvError::BadLength { .. })
        ));
        assert_eq!(
            decode(&unhex("420020|06|00000008|0000000000000002")),
            Err(TtlvError::BadBoolean)
        );
        assert_eq!(
            decode(&unhex("420020|07|00000002|FFFE000000000000")),
            Err(TtlvError::BadText)
        );
        assert_eq!(
            decode(&unhex("420020|0C|00000000")),
            Err(TtlvError::UnknownType(0x0C))
        );
        assert_eq!(
            decode(&unhex("010020|02|00000004|0000000800000000")),
            Err(TtlvError::BadTag(0x010020))
        );
        // A length of 4 GiB must not be trusted.
        assert!(decode(&unhex("420020|08|FFFFFFFF|00")).is_err());
        assert!(matches!(
            message_len(&[0x42, 0, 0x7B, 1, 0xFF, 0xFF, 0xFF, 0xFF]),
            Err(TtlvError::TooLarge(_))
        ));
        assert_eq!(message_len(&[0x42, 0, 0x7B, 1, 0, 0, 0, 0x20]).unwrap(), 40);
    }

    #[test]
    fn wipe_zeroes_byte_and_text_strings() {
        let mut item = Item::structure(
            0x420020,
            vec![
                Item::new(0x4200C2, Value::ByteString(vec![0xAB; 32])),
                Item::new(0x420094, Value::TextString("secret".into())),
                Item::new(0x420021, Value::Integer(7)),
            ],
        );
        item.wipe();
        let c = item.children();
        // zeroize overwrites the whole allocation, then empties the string.
        assert_eq!(c[0].as_bytes(), Some(&[][..]));
        assert_eq!(c[1].as_text(), Some(""));
        assert_eq!(c[2].as_int(), Some(7));
    }

    #[test]
    fn nesting_is_bounded() {
        let mut item = Item::new(0x420020, Value::Integer(1));
        for _ in 0..=MAX_DEPTH {
            item = Item::structure(0x420020, vec![item]);
        }
        assert_eq!(decode(&item.encode()), Err(TtlvError::TooDeep));
        let mut item = Item::new(0x420020, Value::Integer(1));
        for _ in 0..MAX_DEPTH {
            item = Item::structure(0x420020, vec![item]);
        }
        assert!(decode(&item.encode()).is_ok());
    }

    fn arb_item() -> impl Strategy<Value = Item> {
        let tag = prop_oneof![0x420000u32..0x4201FF, 0x540000u32..0x5400FF];
        let leaf = prop_oneof![
            any::<i32>().prop_map(Value::Integer),
            any::<i64>().prop_map(Value::LongInteger),
            proptest::collection::vec(any::<u8>(), 1..4).prop_map(|w| Value::BigInteger(
                w.repeat(8).into_iter().take(8 * w.len()).collect()
            )),
            any::<u32>().prop_map(Value::Enumeration),
            any::<bool>().prop_map(Value::Boolean),
            ".{0,20}".prop_map(Value::TextString),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::ByteString),
            any::<i64>().prop_map(Value::DateTime),
            any::<u32>().prop_map(Value::Interval),
            any::<i64>().prop_map(Value::DateTimeExtended),
        ];
        let leaf_item = (tag.clone(), leaf).prop_map(|(t, v)| Item::new(t, v));
        leaf_item.prop_recursive(4, 32, 6, move |inner| {
            (tag.clone(), proptest::collection::vec(inner, 0..6))
                .prop_map(|(t, items)| Item::structure(t, items))
        })
    }

    proptest! {
        #[test]
        fn round_trip(item in arb_item()) {
            let wire = item.encode();
            prop_assert_eq!(wire.len() % 8, 0);
            prop_assert_eq!(decode(&wire).unwrap(), item);
            let header: [u8; 8] = wire[..8].try_into().unwrap();
            prop_assert_eq!(message_len(&header).unwrap(), wire.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }
    }
}
