use super::*;
use crate::engine::format;
use proptest::prelude::*;

/// A well-formed plugin ciphertext (header + nonce + sealed bytes) under `key_ref`.
fn plugin_ciphertext(key_ref: &str, wrapped: &[u8]) -> Vec<u8> {
    let mut c = format::encode_header(key_ref, wrapped).unwrap();
    c.extend_from_slice(&[7u8; format::NONCE_LEN]);
    c.extend_from_slice(&[9u8; 32 + format::TAG_LEN]);
    c
}

fn v2_value(provider: &str, key_id: &str, dek_source: &[u8]) -> Vec<u8> {
    let o = EncryptedObject {
        encrypted_data: b"sealed object".to_vec(),
        key_id: key_id.into(),
        encrypted_dek_source: dek_source.to_vec(),
        encrypted_dek_source_type: 1,
    };
    let mut v = format!("k8s:enc:kms:v2:{provider}:").into_bytes();
    v.extend(prost::Message::encode_to_vec(&o));
    v
}

fn v1_value(provider: &str, dek: &[u8]) -> Vec<u8> {
    let mut v = format!("k8s:enc:kms:v1:{provider}:").into_bytes();
    v.extend_from_slice(&(dek.len() as u16).to_be_bytes());
    v.extend_from_slice(dek);
    v.extend_from_slice(b"nonce+sealed object");
    v
}

#[test]
fn every_storage_kind_is_told_apart() {
    let ours = plugin_ciphertext("k2", &[1; 60]);
    let kek = hex::encode(&kek::digest_of("k2", &[1; 60])[..6]);
    let plugin = Some(PluginKey {
        remote_key: "k2".into(),
        local_kek: kek,
    });
    assert_eq!(classify(b"k8s\0\x0a\x0cpayload"), Storage::Plaintext);
    assert_eq!(classify(br#"{"kind":"Secret"}"#), Storage::Plaintext);
    assert_eq!(
        classify(b"k8s:enc:aescbc:v1:key1:\x00\x01"),
        Storage::LocalProvider {
            provider: "aescbc".into(),
            key_name: "key1".into()
        }
    );
    assert_eq!(
        classify(b"k8s:enc:secretbox:v1:sb:xyz"),
        Storage::LocalProvider {
            provider: "secretbox".into(),
            key_name: "sb".into()
        }
    );
    assert_eq!(
        classify(&v2_value("main", "local:k2", &ours)),
        Storage::KmsV2 {
            provider: "main".into(),
            key_id: "local:k2".into(),
            plugin: plugin.clone()
        }
    );
    // Another plugin's v2 object: its DEK source is not our format.
    assert_eq!(
        classify(&v2_value("other", "arn:x", b"opaque dek")),
        Storage::KmsV2 {
            provider: "other".into(),
            key_id: "arn:x".into(),
            plugin: None
        }
    );
    assert_eq!(
        classify(&v1_value("old", &ours)),
        Storage::KmsV1 {
            provider: "old".into(),
            plugin
        }
    );
    assert!(matches!(
        classify(b"k8s:enc:kms:v1:old:\x00\xffshort"),
        Storage::Unknown { .. }
    ));
    assert!(matches!(
        classify(b"k8s:enc:kms:v2:p:\xff\xff\xff"),
        Storage::Unknown { .. }
    ));
    assert_eq!(
        classify(b"k8s:enc:future:v9:x:"),
        Storage::Unknown {
            detail: "k8s:enc:future:v9".into()
        }
    );
}

#[test]
fn requirements_and_grouping() {
    let mut inv = Inventory::default();
    for (i, key) in ["k1", "k1", "k2"].iter().enumerate() {
        let c = plugin_ciphertext(key, &[i as u8 + 1; 60]);
        inv.add("secrets", &v2_value("main", &format!("local:{key}"), &c));
    }
    inv.add("secrets", br#"{"plaintext":true}"#);
    inv.add(
        "configmaps",
        &v1_value("main", &plugin_ciphertext("k2", &[5; 60])),
    );
    let groups = &inv.resources["secrets"];
    assert_eq!(groups.len(), 3, "{groups:?}");
    let k1 = groups
        .iter()
        .find(|(s, _)| matches!(s, Storage::KmsV2 { key_id, .. } if key_id == "local:k1"))
        .unwrap()
        .1;
    assert_eq!((k1.objects, k1.local_keks.len()), (2, 2));

    let by_id = inv.violations(&Requirement::KeyId("local:k2".into()));
    assert_eq!(by_id["secrets"], 3); // two under k1, one plaintext
    assert_eq!(by_id["configmaps"], 1); // v1 has no key_id
    let by_ref = inv.violations(&Requirement::RemoteKey("k2".into()));
    assert_eq!((by_ref["secrets"], by_ref["configmaps"]), (3, 0));

    let table = inv.table();
    assert!(table.contains("remote key k1, 2 local KEKs"), "{table}");
    assert!(table.contains("plaintext (identity)"), "{table}");
    let json = inv.json();
    assert_eq!(json["resources"]["secrets"]["total"], 4);
    assert_eq!(
        json["resources"]["configmaps"]["groups"][0]["storage"],
        "kms-v1"
    );
}

proptest! {
    /// Any value classifies without a panic; a value with our header keeps its remote key.
    #[test]
    fn classify_never_panics(value in proptest::collection::vec(any::<u8>(), 0..600),
                             prefix in prop_oneof![Just(""), Just("k8s:enc:"), Just("k8s:enc:kms:v2:p:"),
                                                   Just("k8s:enc:kms:v1:p:"), Just("k8s:enc:aesgcm:v1:")]) {
        let mut v = prefix.as_bytes().to_vec();
        v.extend(value);
        let _ = classify(&v);
    }
}
