//! The committed seed corpus of the fuzz targets (fuzz/corpus/<target>/).
//!
//! `KMS_WRITE_FUZZ_CORPUS=1 cargo test --test fuzz_corpus` (or `make fuzz-corpus`) rewrites it; plain
//! runs check that the committed seeds still mean what they should: ciphertexts that decrypt under the
//! fuzz targets' fixed key (fuzz/src/lib.rs), and well-formed request messages.
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use kms_plugin::backend::local::LocalBackend;
use kms_plugin::engine::{Api, Binding, Engine, EngineConfig};
use kms_plugin::proto::{v1beta1, v2};
use prost::Message;

/// Must match fuzz/src/lib.rs.
const KEY_NAME: &str = "kfuzz";
const KEY_ID: &str = "local:kfuzz";
const KEY_BYTE: u8 = 0x42;
const DEK: [u8; 32] = [7u8; 32];

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

fn fixed_engine(dir: &Path) -> Arc<Engine> {
    let path = dir.join("kek.json");
    let key = base64::engine::general_purpose::STANDARD.encode([KEY_BYTE; 32]);
    std::fs::write(
        &path,
        format!("{{\"version\":1,\"keys\":[{{\"name\":\"{KEY_NAME}\",\"created\":\"2026-01-01T00:00:00Z\",\"key\":\"{key}\"}}]}}"),
    )
    .unwrap();
    Engine::new(
        Arc::new(LocalBackend::open(&path).unwrap()),
        EngineConfig::default(),
    )
}

fn with(selector: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![selector];
    v.extend_from_slice(body);
    v
}

/// An HTTP/2 frame: length, type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK block of a gRPC request: indexed :method POST and :scheme http, literals (without
/// indexing, static-table names) for :path, :authority and content-type.
fn request_headers(authority: &[u8], path: &[u8]) -> Vec<u8> {
    let mut block = vec![0x83, 0x86];
    for (name_prefix, value) in [(&[0x04u8][..], path), (&[0x01][..], authority)] {
        block.extend_from_slice(name_prefix);
        block.push(value.len() as u8);
        block.extend_from_slice(value);
    }
    // content-type is static index 31: 4-bit prefix 15, then 16.
    block.extend([0x0f, 0x10, 16]);
    block.extend_from_slice(b"application/grpc");
    block
}

async fn seeds(engine: &Engine) -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let v2c = engine.encrypt(&DEK, Api::V2).await.unwrap();
    let v1c = engine.encrypt(b"ping", Api::V1).await.unwrap();
    assert_eq!(v2c.key_id, KEY_ID);
    let mut s = vec![
        (
            "etcd_value",
            "kms_v2",
            support::etcd_values::v2_value("kms", KEY_ID, &v2c.ciphertext),
        ),
        (
            "etcd_value",
            "kms_v1",
            support::etcd_values::v1_value("kms", &v1c.ciphertext),
        ),
        (
            "etcd_value",
            "aescbc",
            b"k8s:enc:aescbc:v1:key1:\x01\x02".to_vec(),
        ),
        (
            "etcd_value",
            "plaintext",
            b"k8s\x00\x0a\x0c\x0a\x02v1\x12\x06Secret".to_vec(),
        ),
        ("ciphertext", "v2", with(1, &v2c.ciphertext)),
        ("ciphertext", "v1", with(0, &v1c.ciphertext)),
        ("ciphertext", "truncated", with(1, &v2c.ciphertext[..40])),
        (
            "ciphertext",
            "garbage",
            b"\x01K\x01\x05hello\x00\x01x0123456789012345678901234567".to_vec(),
        ),
    ];
    let dec = v2::DecryptRequest {
        ciphertext: v2c.ciphertext.clone(),
        uid: "6f1c6f1c-0000-4000-8000-000000000001".into(),
        key_id: KEY_ID.into(),
        annotations: Default::default(),
    };
    let mut wrong = dec.clone();
    wrong.key_id = "local:other".into();
    s.push(("v2_request", "decrypt", with(0, &dec.encode_to_vec())));
    s.push((
        "v2_request",
        "decrypt_wrong_key_id",
        with(0, &wrong.encode_to_vec()),
    ));
    let enc = v2::EncryptRequest {
        plaintext: DEK.to_vec(),
        uid: "6f1c6f1c-0000-4000-8000-000000000002".into(),
    };
    s.push(("v2_request", "encrypt", with(1, &enc.encode_to_vec())));
    s.push(("v2_request", "status", vec![2]));
    let dec1 = v1beta1::DecryptRequest {
        version: "v1beta1".into(),
        cipher: v1c.ciphertext.clone(),
    };
    s.push(("v1_request", "decrypt", with(0, &dec1.encode_to_vec())));
    let enc1 = v1beta1::EncryptRequest {
        version: "v1beta1".into(),
        plain: b"ping".to_vec(),
    };
    s.push(("v1_request", "encrypt", with(1, &enc1.encode_to_vec())));
    let ver = v1beta1::VersionRequest {
        version: "v1beta1".into(),
    };
    s.push(("v1_request", "version", with(2, &ver.encode_to_vec())));
    for (name, text) in [
        ("typical.yaml", "listen: unix:///var/run/kms-plugin/kms.sock\nbackend: local\nlocal-key-file: /etc/kms-plugin/kek.json\nprobe-interval: 30s\nsocket-mode: \"0600\"\n"),
        ("underscores_and_numbers.yaml", "kek_cache_size: 42\nkek-max-uses: 1000\nstatus-version: v2beta1\nkek-max-age: 7d\n"),
        ("list_and_bool.yaml", "log-level: debug\nprobe-interval: [1s, 2s]\n"),
        ("bad.yaml", "probe-interval: {a: 1}\n- x\n"),
    ] {
        s.push(("config", name, text.as_bytes().to_vec()));
    }
    let mut conn = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    conn.extend(frame(4, 0, 0, &[])); // SETTINGS
    let mut path_authority = conn.clone();
    path_authority.extend(frame(
        1,
        0x04,
        1,
        &request_headers(
            b"/var/run/kms-plugin/kms.sock",
            b"/v2.KeyManagementService/Status",
        ),
    ));
    s.push(("authority", "path_authority", with(128, &path_authority)));
    let mut localhost = conn.clone();
    localhost.extend(frame(
        1,
        0x04,
        1,
        &request_headers(b"localhost", b"/v1beta1.KeyManagementService/Version"),
    ));
    s.push(("authority", "localhost", with(40, &localhost)));
    let block = request_headers(
        b"/tmp/akeyless_kms_plugin.sock",
        b"/v2.KeyManagementService/Decrypt",
    );
    let mut split = conn.clone();
    split.extend(frame(1, 0, 3, &block[..10]));
    split.extend(frame(9, 0x04, 3, &block[10..]));
    s.push(("authority", "continuation", with(200, &split)));
    s.push(("authority", "preface_only", with(10, &conn)));
    // Akeyless answers: two status bytes (`100 + n % 500` for n < 0x8000), then the body.
    let answer = |status: u16, body: &str| {
        let mut v = (status - 100).to_be_bytes().to_vec();
        v.extend_from_slice(body.as_bytes());
        v
    };
    for (name, status, body) in [
        (
            "describe_item",
            200,
            r#"{"item_name":"/k8s/kek","item_id":1234,"item_type":"AES256GCM","is_enabled":true,"item_state":"Enabled","last_version":2,"item_versions":[{"version":1},{"version":2}]}"#,
        ),
        ("encrypt_result", 200, r#"{"result":"akv2:AAAAAQ=="}"#),
        (
            "token_expired",
            401,
            r#"{"error":"Unauthorized","message":"access denied. token is expired"}"#,
        ),
        (
            "not_found",
            404,
            r#"{"error":"ItemNotFound","message":"item /k8s/kek was not found"}"#,
        ),
        ("throttled", 429, "Too Many Requests"),
        (
            "gateway_html",
            503,
            "<html><body>503 Service Unavailable</body></html>",
        ),
        (
            "disabled",
            200,
            r#"{"item_name":"/k8s/kek","item_id":"i-1","is_enabled":false,"item_state":"Disabled"}"#,
        ),
    ] {
        s.push(("akeyless_response", name, answer(status, body)));
    }
    for (name, status, body) in [
        (
            "encrypted",
            200,
            r#"{"data":{"ciphertext":"vault:v3:c2VhbGVk","key_version":3}}"#,
        ),
        (
            "too_old",
            400,
            r#"{"errors":["ciphertext or signature version is disallowed by policy (too old)"]}"#,
        ),
        ("sealed", 503, r#"{"errors":["Vault is sealed"]}"#),
        ("proxy_html", 403, "<html><body>403 Forbidden</body></html>"),
    ] {
        s.push(("vault_response", name, answer(status, body)));
    }
    s.extend(kmip_seeds());
    s
}

/// KMIP Response Messages as PyKMIP sends them: a Locate result, a Get Attributes result, an
/// Encrypt result, a Permission Denied refusal; and a wrapped blob.
fn kmip_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    use kms_plugin::backend::kmip::messages::{op, tag};
    use kms_plugin::backend::kmip::ttlv::{Item, Value};
    let text = |t, s: &str| Item::new(t, Value::TextString(s.into()));
    let response = |op: u32, status: u32, rest: Vec<Item>| {
        let mut item = vec![
            Item::new(tag::OPERATION, Value::Enumeration(op)),
            Item::new(tag::RESULT_STATUS, Value::Enumeration(status)),
        ];
        item.extend(rest);
        Item::structure(
            tag::RESPONSE_MESSAGE,
            vec![
                Item::structure(
                    tag::RESPONSE_HEADER,
                    vec![
                        Item::structure(
                            tag::PROTOCOL_VERSION,
                            vec![
                                Item::new(tag::PROTOCOL_VERSION_MAJOR, Value::Integer(1)),
                                Item::new(tag::PROTOCOL_VERSION_MINOR, Value::Integer(4)),
                            ],
                        ),
                        Item::new(0x420092, Value::DateTime(1_780_000_000)),
                        Item::new(tag::BATCH_COUNT, Value::Integer(1)),
                    ],
                ),
                Item::structure(tag::BATCH_ITEM, item),
            ],
        )
        .encode()
    };
    let payload = |items| vec![Item::structure(tag::RESPONSE_PAYLOAD, items)];
    let attr = |name: &str, value| {
        Item::structure(
            tag::ATTRIBUTE,
            vec![
                text(tag::ATTRIBUTE_NAME, name),
                Item::new(tag::ATTRIBUTE_VALUE, value),
            ],
        )
    };
    let mut blob = vec![1u8, 16];
    blob.extend([0xA5; 16]);
    blob.push(16);
    blob.extend([0x5A; 16]);
    blob.extend([0x33; 32]);
    vec![
        (
            "kmip_response",
            "locate",
            response(
                op::LOCATE,
                0,
                payload(vec![
                    text(tag::UNIQUE_IDENTIFIER, "2"),
                    text(tag::UNIQUE_IDENTIFIER, "1"),
                ]),
            ),
        ),
        (
            "kmip_response",
            "get_attributes",
            response(
                op::GET_ATTRIBUTES,
                0,
                payload(vec![
                    text(tag::UNIQUE_IDENTIFIER, "2"),
                    attr("State", Value::Enumeration(2)),
                    attr("Cryptographic Algorithm", Value::Enumeration(3)),
                    attr("Initial Date", Value::DateTime(1_780_000_000)),
                    attr(
                        "Name",
                        Value::Structure(vec![
                            text(tag::NAME_VALUE, "k8s"),
                            Item::new(tag::NAME_TYPE, Value::Enumeration(1)),
                        ]),
                    ),
                ]),
            ),
        ),
        (
            "kmip_response",
            "encrypt",
            response(
                op::ENCRYPT,
                0,
                payload(vec![
                    text(tag::UNIQUE_IDENTIFIER, "2"),
                    Item::new(tag::DATA, Value::ByteString(vec![0x33; 32])),
                    Item::new(tag::IV_COUNTER_NONCE, Value::ByteString(vec![0xA5; 16])),
                    Item::new(
                        tag::AUTHENTICATED_ENCRYPTION_TAG,
                        Value::ByteString(vec![0x5A; 16]),
                    ),
                ]),
            ),
        ),
        (
            "kmip_response",
            "permission_denied",
            response(
                op::DECRYPT,
                1,
                vec![
                    Item::new(tag::RESULT_REASON, Value::Enumeration(0x0C)),
                    text(
                        tag::RESULT_MESSAGE,
                        "The decryption key must be in the Active state",
                    ),
                ],
            ),
        ),
        ("kmip_response", "blob", blob),
    ]
}

#[tokio::test]
async fn committed_seed_corpus_is_meaningful() {
    let dir = tempfile::tempdir().unwrap();
    let engine = fixed_engine(dir.path());
    let root = corpus();
    if std::env::var_os("KMS_WRITE_FUZZ_CORPUS").is_some() {
        for (target, name, bytes) in seeds(&engine).await {
            std::fs::create_dir_all(root.join(target)).unwrap();
            std::fs::write(root.join(target).join(name), bytes).unwrap();
        }
    }
    let read = |target: &str, name: &str| {
        std::fs::read(root.join(target).join(name)).unwrap_or_else(|e| {
            panic!("fuzz/corpus/{target}/{name}: {e} (KMS_WRITE_FUZZ_CORPUS=1 regenerates it)")
        })
    };
    // The etcd seeds are what the inventory reads as this plugin's KMS v1 and v2 objects.
    for (name, want) in [("kms_v2", "kms-v2"), ("kms_v1", "kms-v1")] {
        let storage = kms_plugin::inventory::classify(&read("etcd_value", name));
        let json = serde_json::to_value(&storage).unwrap();
        assert_eq!(json["storage"], want, "{json}");
        assert_eq!(json["plugin"]["remote_key"], KEY_NAME, "{json}");
    }
    let v2c = read("ciphertext", "v2");
    let out = engine
        .decrypt(&v2c[1..], Binding::V2 { key_id: KEY_ID })
        .await
        .expect("the v2 seed decrypts under the fixed fuzz key");
    assert_eq!(&out.plaintext[..], &DEK[..]);
    let v1c = read("ciphertext", "v1");
    let out = engine.decrypt(&v1c[1..], Binding::V1).await.unwrap();
    assert_eq!(&out.plaintext[..], b"ping");
    let req = v2::DecryptRequest::decode(&read("v2_request", "decrypt")[1..]).unwrap();
    assert_eq!(req.key_id, KEY_ID);
    engine
        .decrypt(&req.ciphertext, Binding::V2 { key_id: KEY_ID })
        .await
        .unwrap();
    let req = v1beta1::DecryptRequest::decode(&read("v1_request", "decrypt")[1..]).unwrap();
    engine.decrypt(&req.cipher, Binding::V1).await.unwrap();
    for target in [
        "ciphertext",
        "v2_request",
        "v1_request",
        "config",
        "authority",
        "vault_response",
        "etcd_value",
        "kmip_response",
    ] {
        let n = std::fs::read_dir(root.join(target)).unwrap().count();
        assert!(n >= 3, "fuzz/corpus/{target} has {n} seeds");
    }
    // The KMIP seeds parse as the Response Messages they are.
    for (name, expect) in [
        ("locate", "2 "),
        ("encrypt", "Some(32)"),
        ("permission_denied", "permission denied"),
    ] {
        let out =
            kms_plugin::backend::kmip::interpret_response_for_fuzzing(&read("kmip_response", name));
        assert!(out.iter().any(|m| m.contains(expect)), "{name}: {out:?}");
    }
    // The authority seeds are accepted by the shim (so fuzzing starts past the preface).
    for name in ["path_authority", "localhost", "continuation"] {
        let input = read("authority", name);
        let out = kms_plugin::protocol::authority::rewrite_for_fuzzing(&input[1..])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!out.is_empty());
    }
}
