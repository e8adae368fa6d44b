//! `kms-plugin rotate-local` against the real binary: the current local KEK is retired at once, the
//! next Encrypt wraps a new one, and data under the old one still decrypts.
mod support;

use std::process::Command;

use kms_plugin::engine::{format, kek};
use kms_plugin::proto::v2;
use support::plugin::{channel, v2_client, Plugin, Setup, BIN};

fn kek_of(ciphertext: &[u8]) -> String {
    let p = format::parse(ciphertext).unwrap();
    hex::encode(&kek::digest_of(p.key_ref, p.wrapped)[..6])
}

fn rotate_local(setup: &Setup) -> String {
    let out = Command::new(BIN)
        .args(["rotate-local", "--listen"])
        .arg(format!("unix://{}", setup.socket.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn rotate_local_retires_the_current_kek_and_old_data_still_decrypts() {
    let setup = Setup::new();
    let plugin = Plugin::start(&setup.args(), setup.addr(), setup.dir.path()).await;
    let mut c = v2_client(channel(&setup.addr()).await);
    let enc = |p: &[u8]| v2::EncryptRequest {
        plaintext: p.to_vec(),
        uid: "rotate-local".into(),
    };
    let a = c.encrypt(enc(b"seed-a")).await.unwrap().into_inner();
    let a2 = c.encrypt(enc(b"seed-a2")).await.unwrap().into_inner();
    assert_eq!(
        kek_of(&a.ciphertext),
        kek_of(&a2.ciphertext),
        "one KEK before the rotation"
    );

    let said = rotate_local(&setup);
    assert!(
        said.contains(&format!("retired local KEK {}", kek_of(&a.ciphertext))),
        "{said}"
    );
    // Nothing in use until the next Encrypt: a second request has nothing to retire.
    assert!(rotate_local(&setup).contains("no local KEK was in use"));
    let b = c.encrypt(enc(b"seed-b")).await.unwrap().into_inner();
    assert_ne!(
        kek_of(&a.ciphertext),
        kek_of(&b.ciphertext),
        "a new KEK after the rotation"
    );
    assert_eq!(a.key_id, b.key_id, "the remote key is unchanged");
    for (sealed, plain) in [(&a, &b"seed-a"[..]), (&b, &b"seed-b"[..])] {
        let out = c
            .decrypt(v2::DecryptRequest {
                ciphertext: sealed.ciphertext.clone(),
                uid: "rotate-local".into(),
                key_id: sealed.key_id.clone(),
                annotations: Default::default(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(out.plaintext, plain);
    }
    assert!(plugin.log_text().contains("local KEK retired on request"));
}
