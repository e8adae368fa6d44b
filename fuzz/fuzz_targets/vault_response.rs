//! Vault answer parsing: an arbitrary HTTP status and body through the Vault backend's error-shape
//! detection, its classification table for every operation, and the ciphertext-version parser.
//! Oracle: no panic, and messages stay bounded.
#![no_main]

use kms_plugin::backend::vault::interpret_response_for_fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((status, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let raw = u16::from_be_bytes(*status);
    let status = if raw & 0x8000 == 0 { 100 + raw % 500 } else { raw & 0x7fff };
    for message in interpret_response_for_fuzzing(status, body) {
        assert!(message.chars().count() < 2000, "unbounded message");
    }
});
