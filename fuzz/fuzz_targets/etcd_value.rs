//! `kms-plugin inventory`'s classifier on arbitrary etcd values: never panics, and whatever it reads
//! out of a value (provider, key name, key_id, remote key) is text from that value.
#![no_main]

use kms_plugin::inventory::{classify, Storage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let from_input = |s: &str| s.is_empty() || text.contains(s);
    match classify(data) {
        Storage::KmsV2 { provider, plugin, .. } | Storage::KmsV1 { provider, plugin } => {
            assert!(from_input(&provider));
            if let Some(p) = plugin {
                assert!(from_input(&p.remote_key));
                assert_eq!(p.local_kek.len(), 12);
            }
        }
        Storage::LocalProvider { key_name, .. } => assert!(from_input(&key_name)),
        Storage::Plaintext | Storage::Unknown { .. } => {}
    }
});
