//! The ciphertext format, versions 1 and 2.
//!
//! ```text
//! offset  size  field
//! 0       1     magic 0x4B ('K')
//! 1       1     format version (1, or 2 with escrow wrappings)
//! 2       1     length R of the backend key reference (1..=255)
//! 3       R     backend key reference (UTF-8; which remote key wrapped the local KEK)
//! 3+R     2     length W of the wrapped local KEK, big-endian (1..=4096)
//! 5+R     W     wrapped local KEK (opaque, produced by the backend)
//! -- version 2 only: the same local KEK wrapped by each escrow backend --
//! 5+R+W   1     number E of escrow wrappings (1..=8)
//!         E x   { 1: length K of the escrow backend kind (1..=32), K: kind (ASCII),
//!                 1: length of its key reference (1..=255), the reference,
//!                 2: length of its wrapped KEK, big-endian (1..=4096), the wrapped KEK }
//! --
//! h       12    AES-GCM nonce
//! h+12    ..    AES-256-GCM ciphertext of the DEK/seed, then the 16-byte tag
//! ```
//!
//! The associated data of the AES-GCM operation is everything before the nonce (the header, escrow
//! wrappings included), followed by the API binding (`v1`, or `v2` and the key_id). Changing any header
//! byte or presenting the ciphertext under another key_id or API therefore fails authentication.
//! Version 1 is written when no escrow backend is configured, so such ciphertexts stay byte-for-byte
//! what earlier releases wrote.

use super::EngineError;

pub const MAGIC: u8 = 0x4B;
pub const VERSION: u8 = 1;
/// Format version of ciphertexts that carry escrow wrappings.
pub const VERSION_ESCROW: u8 = 2;
pub const MAX_ESCROWS: usize = 8;
pub const MAX_ESCROW_KIND_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
pub const MAX_KEY_REF_LEN: usize = 255;
pub const MAX_WRAPPED_LEN: usize = 4096;
/// Smallest possible well-formed ciphertext: header with 1-byte ref and 1-byte wrapped key, nonce, tag.
pub const MIN_LEN: usize = 3 + 1 + 2 + 1 + NONCE_LEN + TAG_LEN;

/// A parsed ciphertext; borrows from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub key_ref: &'a str,
    pub wrapped: &'a [u8],
    /// The escrow wrappings section (version 2; empty for version 1), already validated: read it
    /// with [`Parsed::escrows`].
    escrow: &'a [u8],
    /// Header bytes (magic to end of wrapped key): the first part of the associated data.
    pub header: &'a [u8],
    pub nonce: &'a [u8; NONCE_LEN],
    /// AES-GCM ciphertext with the tag.
    pub sealed: &'a [u8],
}

fn malformed(reason: &str) -> EngineError {
    EngineError::InvalidInput(format!("ciphertext is malformed: {reason}"))
}

/// Parses without decrypting. Never panics, whatever the input.
pub fn parse(input: &[u8]) -> Result<Parsed<'_>, EngineError> {
    if input.len() < MIN_LEN {
        return Err(malformed(&format!(
            "{} bytes is shorter than the minimum of {MIN_LEN}",
            input.len()
        )));
    }
    if input[0] != MAGIC {
        return Err(malformed(
            "unknown leading byte; it was not produced by kms-plugin",
        ));
    }
    if input[1] != VERSION && input[1] != VERSION_ESCROW {
        return Err(EngineError::InvalidInput(format!(
            "ciphertext format version {} is not supported by this build (supports {VERSION} and {VERSION_ESCROW}); upgrade kms-plugin",
            input[1]
        )));
    }
    let ref_len = input[2] as usize;
    if ref_len == 0 {
        return Err(malformed("empty key reference"));
    }
    let rest = &input[3..];
    let (key_ref, rest) =
        split(rest, ref_len).ok_or_else(|| malformed("truncated key reference"))?;
    let key_ref =
        std::str::from_utf8(key_ref).map_err(|_| malformed("key reference is not UTF-8"))?;
    let (len, rest) = split(rest, 2).ok_or_else(|| malformed("truncated wrapped key length"))?;
    let wrapped_len = u16::from_be_bytes([len[0], len[1]]) as usize;
    if wrapped_len == 0 || wrapped_len > MAX_WRAPPED_LEN {
        return Err(malformed("wrapped key length out of range"));
    }
    let (wrapped, rest) =
        split(rest, wrapped_len).ok_or_else(|| malformed("truncated wrapped key"))?;
    let (escrow, rest) = if input[1] == VERSION_ESCROW {
        let len = escrow_section_len(rest).map_err(malformed)?;
        rest.split_at(len)
    } else {
        (&rest[..0], rest)
    };
    let header_len = 3 + ref_len + 2 + wrapped_len + escrow.len();
    let (nonce, sealed) = split(rest, NONCE_LEN).ok_or_else(|| malformed("truncated nonce"))?;
    if sealed.len() < TAG_LEN {
        return Err(malformed("truncated authentication tag"));
    }
    Ok(Parsed {
        key_ref,
        wrapped,
        escrow,
        header: &input[..header_len],
        nonce: nonce.try_into().expect("split gave NONCE_LEN bytes"),
        sealed,
    })
}

fn split(input: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    (input.len() >= n).then(|| input.split_at(n))
}

/// One escrow wrapping of a local KEK (format version 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EscrowWrapping<'a> {
    /// [`crate::backend::Backend::kind`] of the escrow backend that wrapped.
    pub kind: &'a str,
    pub key_ref: &'a str,
    pub wrapped: &'a [u8],
}

impl<'a> Parsed<'a> {
    /// The escrow wrappings, in the order they were written (none for format version 1).
    pub fn escrows(&self) -> Vec<EscrowWrapping<'a>> {
        let mut out = Vec::new();
        let Some((&count, mut rest)) = self.escrow.split_first() else {
            return out;
        };
        for _ in 0..count {
            match next_escrow(rest) {
                Ok((w, r)) => {
                    out.push(w);
                    rest = r;
                }
                Err(_) => break, // validated by parse: unreachable
            }
        }
        out
    }
}

/// Reads one escrow wrapping; the rest after it.
fn next_escrow(input: &[u8]) -> Result<(EscrowWrapping<'_>, &[u8]), &'static str> {
    let (len, rest) = split(input, 1).ok_or("truncated escrow backend kind")?;
    let kind_len = len[0] as usize;
    if kind_len == 0 || kind_len > MAX_ESCROW_KIND_LEN {
        return Err("escrow backend kind length out of range");
    }
    let (kind, rest) = split(rest, kind_len).ok_or("truncated escrow backend kind")?;
    let kind = std::str::from_utf8(kind)
        .ok()
        .filter(|k| k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .ok_or("escrow backend kind is not a backend name")?;
    let (len, rest) = split(rest, 1).ok_or("truncated escrow key reference")?;
    let ref_len = len[0] as usize;
    if ref_len == 0 {
        return Err("empty escrow key reference");
    }
    let (key_ref, rest) = split(rest, ref_len).ok_or("truncated escrow key reference")?;
    let key_ref = std::str::from_utf8(key_ref).map_err(|_| "escrow key reference is not UTF-8")?;
    let (len, rest) = split(rest, 2).ok_or("truncated escrow wrapped key length")?;
    let wrapped_len = u16::from_be_bytes([len[0], len[1]]) as usize;
    if wrapped_len == 0 || wrapped_len > MAX_WRAPPED_LEN {
        return Err("escrow wrapped key length out of range");
    }
    let (wrapped, rest) = split(rest, wrapped_len).ok_or("truncated escrow wrapped key")?;
    Ok((
        EscrowWrapping {
            kind,
            key_ref,
            wrapped,
        },
        rest,
    ))
}

/// Length of a valid escrow section at the start of `input`.
fn escrow_section_len(input: &[u8]) -> Result<usize, &'static str> {
    let (count, mut rest) = split(input, 1).ok_or("truncated escrow count")?;
    let count = count[0] as usize;
    if count == 0 || count > MAX_ESCROWS {
        return Err("escrow count out of range");
    }
    for _ in 0..count {
        rest = next_escrow(rest)?.1;
    }
    Ok(input.len() - rest.len())
}

/// Writes the header of a local KEK wrapped by the primary and by escrow backends (format version
/// 2, or version 1 when `escrows` is empty); the caller appends nonce and sealed data.
pub fn encode_header_with_escrow(
    key_ref: &str,
    wrapped: &[u8],
    escrows: &[EscrowWrapping<'_>],
) -> Result<Vec<u8>, EngineError> {
    let mut out = encode_header(key_ref, wrapped)?;
    if escrows.is_empty() {
        return Ok(out);
    }
    if escrows.len() > MAX_ESCROWS {
        return Err(EngineError::Internal(format!(
            "{} escrow wrappings; at most {MAX_ESCROWS} fit the format",
            escrows.len()
        )));
    }
    out[1] = VERSION_ESCROW;
    out.push(escrows.len() as u8);
    for e in escrows {
        let ok = !e.kind.is_empty()
            && e.kind.len() <= MAX_ESCROW_KIND_LEN
            && e.kind
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !e.key_ref.is_empty()
            && e.key_ref.len() <= MAX_KEY_REF_LEN
            && !e.wrapped.is_empty()
            && e.wrapped.len() <= MAX_WRAPPED_LEN;
        if !ok {
            return Err(EngineError::Internal(format!(
                "escrow backend {:?} returned a key reference of {} bytes and a wrapped key of {} bytes; \
                 they must be 1..={MAX_KEY_REF_LEN} and 1..={MAX_WRAPPED_LEN}",
                e.kind,
                e.key_ref.len(),
                e.wrapped.len()
            )));
        }
        out.push(e.kind.len() as u8);
        out.extend_from_slice(e.kind.as_bytes());
        out.push(e.key_ref.len() as u8);
        out.extend_from_slice(e.key_ref.as_bytes());
        out.extend_from_slice(&(e.wrapped.len() as u16).to_be_bytes());
        out.extend_from_slice(e.wrapped);
    }
    Ok(out)
}

/// Writes the header for a local KEK; the caller appends nonce and sealed data.
pub fn encode_header(key_ref: &str, wrapped: &[u8]) -> Result<Vec<u8>, EngineError> {
    if key_ref.is_empty() || key_ref.len() > MAX_KEY_REF_LEN {
        return Err(EngineError::Internal(format!(
            "backend key reference is {} bytes; it must be 1..={MAX_KEY_REF_LEN}",
            key_ref.len()
        )));
    }
    if wrapped.is_empty() || wrapped.len() > MAX_WRAPPED_LEN {
        return Err(EngineError::Internal(format!(
            "backend wrapped key is {} bytes; it must be 1..={MAX_WRAPPED_LEN}",
            wrapped.len()
        )));
    }
    let mut out = Vec::with_capacity(5 + key_ref.len() + wrapped.len());
    out.push(MAGIC);
    out.push(VERSION);
    out.push(key_ref.len() as u8);
    out.extend_from_slice(key_ref.as_bytes());
    out.extend_from_slice(&(wrapped.len() as u16).to_be_bytes());
    out.extend_from_slice(wrapped);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        let mut ct = encode_header("key-1", &[7u8; 40]).unwrap();
        ct.extend_from_slice(&[1u8; NONCE_LEN]);
        ct.extend_from_slice(&[2u8; 32 + TAG_LEN]);
        ct
    }

    #[test]
    fn round_trip() {
        let ct = sample();
        let p = parse(&ct).unwrap();
        assert_eq!(p.key_ref, "key-1");
        assert_eq!(p.wrapped, &[7u8; 40]);
        assert_eq!(p.nonce, &[1u8; NONCE_LEN]);
        assert_eq!(p.sealed.len(), 48);
        assert_eq!(p.header.len(), 3 + 5 + 2 + 40);
    }

    #[test]
    fn refuses_every_truncation_and_bad_header() {
        let ct = sample();
        for n in 0..(3 + 5 + 2 + 40 + NONCE_LEN + TAG_LEN) {
            assert!(
                parse(&ct[..n]).is_err(),
                "truncated to {n} bytes was accepted"
            );
        }
        let mut bad = ct.clone();
        bad[0] = 0;
        assert!(parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("not produced by kms-plugin"));
        let mut bad = ct.clone();
        bad[1] = 9;
        assert!(parse(&bad).unwrap_err().to_string().contains("version 9"));
        let mut bad = ct;
        bad[2] = 0;
        assert!(parse(&bad).is_err());
    }

    fn escrow_sample() -> Vec<u8> {
        let escrows = [
            EscrowWrapping {
                kind: "local",
                key_ref: "k2026",
                wrapped: &[5u8; 60],
            },
            EscrowWrapping {
                kind: "aws-kms",
                key_ref: "arn:aws:kms:eu-west-1:1:key/x",
                wrapped: &[6u8; 180],
            },
        ];
        let mut ct = encode_header_with_escrow("key-1", &[7u8; 40], &escrows).unwrap();
        ct.extend_from_slice(&[1u8; NONCE_LEN]);
        ct.extend_from_slice(&[2u8; 32 + TAG_LEN]);
        ct
    }

    #[test]
    fn escrow_round_trip_and_version() {
        let ct = escrow_sample();
        assert_eq!(ct[1], VERSION_ESCROW);
        let p = parse(&ct).unwrap();
        assert_eq!((p.key_ref, p.wrapped), ("key-1", &[7u8; 40][..]));
        let e = p.escrows();
        assert_eq!(e.len(), 2);
        assert_eq!(
            (e[0].kind, e[0].key_ref, e[0].wrapped),
            ("local", "k2026", &[5u8; 60][..])
        );
        assert_eq!(e[1].kind, "aws-kms");
        assert_eq!(e[1].wrapped.len(), 180);
        assert_eq!(p.sealed.len(), 48);
        // The header (the associated data) covers the escrow wrappings.
        assert_eq!(p.header.len(), ct.len() - NONCE_LEN - 48);
        // Without escrows the header is version 1, byte for byte.
        assert_eq!(
            encode_header_with_escrow("key-1", &[7u8; 40], &[]).unwrap(),
            encode_header("key-1", &[7u8; 40]).unwrap()
        );
        assert!(parse(&sample()).unwrap().escrows().is_empty());
    }

    #[test]
    fn escrow_refuses_every_truncation_and_bad_section() {
        let ct = escrow_sample();
        let header = parse(&ct).unwrap().header.len();
        for n in 0..(header + NONCE_LEN + TAG_LEN) {
            assert!(
                parse(&ct[..n]).is_err(),
                "truncated to {n} bytes was accepted"
            );
        }
        let count_at = 3 + 5 + 2 + 40;
        for bad_count in [0u8, 9] {
            let mut bad = ct.clone();
            bad[count_at] = bad_count;
            assert!(parse(&bad).is_err(), "escrow count {bad_count} accepted");
        }
        let mut bad = ct.clone();
        bad[count_at + 2] = b' '; // kind "l cal"
        assert!(parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("backend name"));
        assert!(encode_header_with_escrow(
            "k",
            &[1],
            &[EscrowWrapping {
                kind: "",
                key_ref: "r",
                wrapped: &[1]
            }]
        )
        .is_err());
    }

    proptest! {
        #[test]
        fn escrow_header_round_trips(
            refs in proptest::collection::vec(("[a-z-]{1,32}", "[a-z0-9:/@.-]{1,255}", proptest::collection::vec(any::<u8>(), 1..300)), 1..=MAX_ESCROWS)
        ) {
            let escrows: Vec<_> = refs.iter().map(|(k, r, w)| EscrowWrapping { kind: k, key_ref: r, wrapped: w }).collect();
            let mut ct = encode_header_with_escrow("primary", &[9u8; 32], &escrows).unwrap();
            ct.extend_from_slice(&[0u8; NONCE_LEN + TAG_LEN]);
            let p = parse(&ct).unwrap();
            prop_assert_eq!(p.escrows(), escrows);
        }

        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse(&data);
        }

        #[test]
        fn header_round_trips(key_ref in "[a-z0-9:/@.-]{1,255}", wrapped in proptest::collection::vec(any::<u8>(), 1..600)) {
            let mut ct = encode_header(&key_ref, &wrapped).unwrap();
            ct.extend_from_slice(&[0u8; NONCE_LEN + TAG_LEN]);
            let p = parse(&ct).unwrap();
            prop_assert_eq!(p.key_ref, key_ref.as_str());
            prop_assert_eq!(p.wrapped, &wrapped[..]);
        }
    }
}
