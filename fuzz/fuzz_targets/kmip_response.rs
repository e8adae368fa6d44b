//! KMIP answers: arbitrary bytes through the TTLV decoder, Response Message parsing for each
//! operation the plugin sends, the Result Reason table, and the wrapped-blob parser.
//! Oracle: no panic, and messages stay bounded.
#![no_main]

use kms_plugin::backend::kmip::interpret_response_for_fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for message in interpret_response_for_fuzzing(data) {
        assert!(message.chars().count() < 2000, "unbounded message");
    }
});
