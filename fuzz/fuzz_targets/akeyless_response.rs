//! Akeyless response parsing: an arbitrary HTTP status and body through the backend's error
//! extraction, sanitising and classification (every command) and its describe-item interpretation.
//! Oracle: credentials we sent never come back in an error message; key_ids stay bounded.
#![no_main]

use kms_plugin::backend::akeyless::{fuzz_sent_secrets, interpret_response_for_fuzzing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((status, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    // Mostly the statuses servers really send, sometimes anything.
    let raw = u16::from_be_bytes(*status);
    let status = if raw & 0x8000 == 0 { 100 + raw % 500 } else { raw & 0x7fff };
    let out = interpret_response_for_fuzzing(status, body);
    for e in &out.errors {
        for secret in fuzz_sent_secrets() {
            assert!(!e.contains(secret), "a sent credential came back: {e}");
        }
        assert!(e.chars().count() < 2000, "unbounded error text");
    }
    if let Some(id) = out.key_id {
        assert!(id.len() <= 1000, "key_id of {} bytes", id.len());
    }
});
