//! The ciphertext format, version 1.
//!
//! ```text
//! offset  size  field
//! 0       1     magic 0x4B ('K')
//! 1       1     format version (1)
//! 2       1     length R of the backend key reference (1..=255)
//! 3       R     backend key reference (UTF-8; which remote key wrapped the local KEK)
//! 3+R     2     length W of the wrapped local KEK, big-endian (1..=4096)
//! 5+R     W     wrapped local KEK (opaque, produced by the backend)
//! 5+R+W   12    AES-GCM nonce
//! 17+R+W  ..    AES-256-GCM ciphertext of the DEK/seed, then the 16-byte tag
//! ```
//!
//! The associated data of the AES-GCM operation is everything before the nonce (the header), followed
//! by the API binding (`v1`, or `v2` and the key_id). Changing any header byte or presenting the
//! ciphertext under another key_id or API therefore fails authentication.

use super::EngineError;

pub const MAGIC: u8 = 0x4B;
pub const VERSION: u8 = 1;
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
    if input[1] != VERSION {
        return Err(EngineError::InvalidInput(format!(
            "ciphertext format version {} is not supported by this build (supports {VERSION}); upgrade kms-plugin",
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
    let header_len = 3 + ref_len + 2 + wrapped_len;
    let (nonce, sealed) = split(rest, NONCE_LEN).ok_or_else(|| malformed("truncated nonce"))?;
    if sealed.len() < TAG_LEN {
        return Err(malformed("truncated authentication tag"));
    }
    Ok(Parsed {
        key_ref,
        wrapped,
        header: &input[..header_len],
        nonce: nonce.try_into().expect("split gave NONCE_LEN bytes"),
        sealed,
    })
}

fn split(input: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    (input.len() >= n).then(|| input.split_at(n))
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

    proptest! {
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
