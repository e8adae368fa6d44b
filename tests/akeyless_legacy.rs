//! Drop-in means existing Secrets keep working: KMS v1 ciphertexts written by the original Akeyless
//! plugin (Akeyless's own `/encrypt` result for each DEK) decrypt through the real binary in drop-in
//! mode, in every plausible encoding, and are counted so operators see when the last one is gone.
#![cfg(feature = "akeyless")]
mod support;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use kms_plugin::proto::v1beta1;
use kms_plugin::protocol::socket::ListenAddr;
use serde_json::{json, Value};
use support::akeyless_fake::{Fake, ACCESS_ID, ACCESS_KEY, KEY};
use support::plugin::{channel, v1_client, Plugin};

/// The original plugin's access-key login.
async fn original_login(fake: &Fake) -> Value {
    let auth: Value = fake
        .http
        .post(format!("{}/auth", fake.url))
        .json(&json!({ "access-type": "access_key", "access-id": ACCESS_ID, "access-key": ACCESS_KEY }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    auth["token"].clone()
}

/// What the original plugin did for a v1 Encrypt: authenticate, then `/encrypt` the DEK.
async fn original_encrypt(fake: &Fake, dek: &[u8], input_format: bool) -> String {
    let token = original_login(fake).await;
    let mut body = json!({
        "key-name": KEY,
        "plaintext": B64.encode(dek),
        "token": token,
    });
    if input_format {
        body["input-format"] = json!("base64");
    }
    let r: Value = fake
        .http
        .post(format!("{}/encrypt", fake.url))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["result"]
        .as_str()
        .expect("an /encrypt result")
        .to_string()
}

fn http_port() -> u16 {
    support::external::free_port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ciphertexts_of_the_original_plugin_decrypt_after_an_image_swap() {
    let Some(fake) = Fake::start(&[]) else { return };
    let deks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![0x40 + i; 32]).collect();
    // The three encodings of the original's stored cipher: the result string as sent back, the
    // DEK sent as base64 text (no input-format: the key manager returns base64 of the base64), and
    // the result string inside one more base64 layer.
    let legacy: Vec<Vec<u8>> = vec![
        original_encrypt(&fake, &deks[0], true).await.into_bytes(),
        original_encrypt(&fake, &deks[1], false).await.into_bytes(),
        B64.encode(original_encrypt(&fake, &deks[2], true).await)
            .into_bytes(),
    ];

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("akeyless_kms_plugin.sock");
    let port = http_port();
    let args: Vec<String> = ["serve", "--http", &format!("127.0.0.1:{port}")]
        .iter()
        .map(|s| s.to_string())
        .collect();
    std::env::set_var("AKEYLESS_URL", &fake.url);
    std::env::set_var("AKEYLESS_UNIX_SOCKET", &socket);
    std::env::set_var("AKEYLESS_KEY_ENCRYPTION_KEY", KEY);
    std::env::set_var("AKEYLESS_ACCESS_ID", ACCESS_ID);
    std::env::set_var("AKEYLESS_ACCESS_KEY", ACCESS_KEY);
    std::env::set_var("KMS_PLUGIN_DATA_DIR", dir.path());
    let addr = ListenAddr::Path(socket.clone());
    let plugin = Plugin::start(&args, addr.clone(), dir.path()).await;
    let mut c = v1_client(channel(&addr).await);
    for (cipher, dek) in legacy.iter().zip(&deks) {
        let plain = c
            .decrypt(v1beta1::DecryptRequest {
                version: "v1beta1".into(),
                cipher: cipher.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("legacy cipher refused: {e}\n{}", plugin.log_text()))
            .into_inner()
            .plain;
        assert_eq!(&plain, dek);
    }
    // New writes are in the plugin's own format, and read back.
    let fresh = c
        .encrypt(v1beta1::EncryptRequest {
            version: "v1beta1".into(),
            plain: vec![9; 32],
        })
        .await
        .unwrap()
        .into_inner()
        .cipher;
    assert_eq!(fresh[0], 0x4B, "new data uses kms-plugin's format");
    // Something that is neither: a clear error, no panic.
    let junk = c
        .decrypt(v1beta1::DecryptRequest {
            version: "v1beta1".into(),
            cipher: b"not-a-ciphertext-of-anyone".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(junk.code(), tonic::Code::InvalidArgument, "{junk}");
    assert!(
        junk.message().contains("original plugin"),
        "{}",
        junk.message()
    );
    // A value that decrypts but is no AES key (the original's health check "ping"): refused.
    let ping = original_encrypt(&fake, b"ping", true).await.into_bytes();
    let err = c
        .decrypt(v1beta1::DecryptRequest {
            version: "v1beta1".into(),
            cipher: ping,
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("AES key"), "{}", err.message());

    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let ok_line = metrics
        .lines()
        .find(|l| l.starts_with("kms_plugin_legacy_v1_decrypts_total{reason=\"ok\"}"))
        .unwrap_or_else(|| panic!("no legacy metric:\n{metrics}"));
    assert!(ok_line.ends_with(" 3"), "{ok_line}");
}

/// What the original plugin would do for a v1 Decrypt of what it wrote.
async fn original_decrypt(fake: &Fake, cipher: &[u8]) -> Vec<u8> {
    let token = original_login(fake).await;
    let r: Value = fake
        .http
        .post(format!("{}/decrypt", fake.url))
        .json(&json!({
            "key-name": KEY,
            "ciphertext": std::str::from_utf8(cipher).unwrap(),
            "output-format": "base64",
            "token": token,
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    B64.decode(r["result"].as_str().expect("a /decrypt result"))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_writes_prepare_a_rollback_to_the_original_image() {
    let Some(fake) = Fake::start(&[]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("akeyless_kms_plugin.sock");
    let args: Vec<String> = [
        "serve",
        "--backend",
        "akeyless",
        "--akeyless-url",
        &fake.url,
        "--akeyless-access-id",
        ACCESS_ID,
        "--akeyless-key-name",
        KEY,
        "--listen",
        &format!("unix://{}", socket.display()),
        "--legacy-v1-writes",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    std::env::set_var("KMS_PLUGIN_AKEYLESS_ACCESS_KEY", ACCESS_KEY);
    let addr = ListenAddr::Path(socket.clone());
    let mut plugin = Plugin::start(&args, addr.clone(), dir.path()).await;
    let mut c = v1_client(channel(&addr).await);
    let dek = vec![0x77u8; 32];
    let cipher = c
        .encrypt(v1beta1::EncryptRequest {
            version: "v1beta1".into(),
            plain: dek.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .cipher;
    assert_ne!(cipher[0], 0x4B, "written in the original's format");
    assert_eq!(
        original_decrypt(&fake, &cipher).await,
        dek,
        "the original image can read it"
    );
    plugin.terminate();
    // Without the flag, the plugin still reads it (and writes its own format again).
    let args: Vec<String> = args
        .into_iter()
        .filter(|a| a != "--legacy-v1-writes")
        .collect();
    let _plugin = Plugin::start(&args, addr.clone(), dir.path()).await;
    let mut c = v1_client(channel(&addr).await);
    let back = c
        .decrypt(v1beta1::DecryptRequest {
            version: "v1beta1".into(),
            cipher,
        })
        .await
        .unwrap()
        .into_inner()
        .plain;
    assert_eq!(back, dek);
}
