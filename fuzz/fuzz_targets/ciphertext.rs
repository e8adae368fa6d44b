//! Ciphertext parsing and opening: `format::parse` (formats 1 and 2, escrow wrappings included) and
//! `Engine::decrypt` on arbitrary bytes.
//! First byte: 0 = v1 binding, otherwise v2 with the fixed key_id. Must never panic; whatever parses
//! must describe a sub-slice of the input.
#![no_main]

use kms_plugin::engine::{format, Binding};
use kms_plugin_fuzz::{engine, runtime, KEY_ID};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, ciphertext)) = data.split_first() else {
        return;
    };
    if let Ok(p) = format::parse(ciphertext) {
        assert_eq!(
            p.header.len() + format::NONCE_LEN + p.sealed.len(),
            ciphertext.len()
        );
        assert!(p.sealed.len() >= format::TAG_LEN);
        // Escrow wrappings (format 2) lie inside the header.
        for e in p.escrows() {
            assert!(e.wrapped.len() + e.key_ref.len() + e.kind.len() < p.header.len());
        }
    }
    let binding = if selector == 0 {
        Binding::V1
    } else {
        Binding::V2 { key_id: KEY_ID }
    };
    let _ = runtime().block_on(engine().decrypt(ciphertext, binding));
});
