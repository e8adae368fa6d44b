//! The `:authority` shim: arbitrary client→server bytes through the HTTP/2 frame parser, HPACK decoder
//! and rewriter. Oracle: feeding the same bytes split at an arbitrary point gives the same result as
//! feeding them at once.
#![no_main]

use kms_plugin::protocol::authority::{rewrite_for_fuzzing, Limits, Rewriter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let whole = rewrite_for_fuzzing(input);
    let cut = (split as usize * input.len()) / 255;
    let mut rewriter = Rewriter::new(Limits::default());
    let mut out = Vec::new();
    let pieces = rewriter
        .feed(&input[..cut], &mut out)
        .and_then(|_| rewriter.feed(&input[cut..], &mut out))
        .map(|_| out);
    match (&whole, &pieces) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "split at {cut} changed the output"),
        (Err(_), Err(_)) => {}
        _ => panic!("split at {cut}: whole {whole:?} vs pieces {pieces:?}"),
    }
});
