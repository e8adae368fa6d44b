//! `kms-plugin inventory` against a real etcd holding plaintext, aescbc and secretbox values and the
//! real plugin's KMS v1 and v2 ciphertexts under two keys: exact counts per storage, pagination,
//! `--require-key-id current` failing until every Secret is under the current key, and a clear error
//! when etcd cannot be reached.
#![cfg(feature = "inventory")]
mod support;

use std::process::Command;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use kms_plugin::proto::{v1beta1, v2};
use serde_json::{json, Value};
use support::etcd_values::{v1_value, v2_value};
use support::external::start_etcd;
use support::plugin::{channel, v1_client, v2_client, Plugin, Setup, BIN};

async fn etcd_call(url: &str, op: &str, body: Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v3/kv/{op}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{op}: {}", r.status());
}

async fn put(url: &str, key: &str, value: &[u8]) {
    etcd_call(
        url,
        "put",
        json!({ "key": B64.encode(key), "value": B64.encode(value) }),
    )
    .await;
}

fn inventory(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("inventory")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn count(report: &Value, resource: &str, pred: impl Fn(&Value) -> bool) -> u64 {
    report["resources"][resource]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| pred(g))
        .map(|g| g["objects"].as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_reports_every_storage_exactly_and_require_key_id_can_fail() {
    let Some(etcd) = start_etcd() else { return };
    let setup = Setup::new();
    let plugin = Plugin::start(&setup.args(), setup.addr(), setup.dir.path()).await;
    let mut c2 = v2_client(channel(&setup.addr()).await);
    let mut c1 = v1_client(channel(&setup.addr()).await);
    let enc = |p: &[u8]| v2::EncryptRequest {
        plaintext: p.to_vec(),
        uid: "inventory".into(),
    };
    let old = c2.encrypt(enc(b"seed-old")).await.unwrap().into_inner();

    // Plaintext, aescbc, secretbox, v1 and v2 under the first key; 130 v2 objects for pagination.
    put(
        &etcd.url,
        "/registry/secrets/ns/plain",
        br#"{"kind":"Secret"}"#,
    )
    .await;
    put(
        &etcd.url,
        "/registry/secrets/ns/cbc",
        b"k8s:enc:aescbc:v1:key1:\x01\x02",
    )
    .await;
    put(
        &etcd.url,
        "/registry/secrets/ns/box",
        b"k8s:enc:secretbox:v1:sb1:\x01",
    )
    .await;
    let v1 = c1
        .encrypt(v1beta1::EncryptRequest {
            version: "v1beta1".into(),
            plain: b"0123456789abcdef0123456789abcdef".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    put(
        &etcd.url,
        "/registry/secrets/ns/v1",
        &v1_value("kms1", &v1.cipher),
    )
    .await;
    for i in 0..130 {
        let v = v2_value("kms2", &old.key_id, &old.ciphertext);
        put(&etcd.url, &format!("/registry/secrets/ns/old-{i:03}"), &v).await;
    }
    // Not a Secret: outside the default --resources.
    put(&etcd.url, "/registry/configmaps/ns/cm", b"plain configmap").await;

    // Rotate the plugin's key, then write one object under the new key.
    let out = Command::new(BIN)
        .args(["keygen", "--add"])
        .arg(&setup.key_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_id = support::plugin::wait_for_key_id_change(
        &setup.addr(),
        &old.key_id,
        std::time::Duration::from_secs(20),
    )
    .await;
    let new = c2.encrypt(enc(b"seed-new")).await.unwrap().into_inner();
    assert_eq!(new.key_id, new_id);
    put(
        &etcd.url,
        "/registry/secrets/ns/new",
        &v2_value("kms2", &new.key_id, &new.ciphertext),
    )
    .await;

    let listen = format!("unix://{}", setup.socket.display());
    let base = [
        "--etcd-endpoints",
        etcd.url.as_str(),
        "--page-size",
        "50",
        "--listen",
        listen.as_str(),
    ];
    let (code, stdout, stderr) = inventory(&[&base[..], &["--output", "json"]].concat());
    assert_eq!(code, 0, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["resources"]["secrets"]["total"], 135, "{report:#}");
    assert!(report["resources"]["configmaps"].is_null(), "{report:#}");
    fn s(name: &'static str) -> impl Fn(&Value) -> bool {
        move |g| g["storage"] == name
    }
    assert_eq!(count(&report, "secrets", s("plaintext")), 1);
    assert_eq!(count(&report, "secrets", s("local-provider")), 2);
    assert_eq!(count(&report, "secrets", s("kms-v1")), 1);
    let old_group = |g: &Value| g["storage"] == "kms-v2" && g["key_id"] == old.key_id.as_str();
    assert_eq!(count(&report, "secrets", old_group), 130);
    assert_eq!(
        count(&report, "secrets", |g| g["key_id"] == new.key_id.as_str()),
        1
    );
    // The plugin's own ciphertexts name the remote key and one local KEK per key.
    let groups = report["resources"]["secrets"]["groups"].as_array().unwrap();
    let old_g = groups.iter().find(|g| old_group(g)).unwrap();
    assert_eq!(old_g["local_keks"].as_array().unwrap().len(), 1, "{old_g}");
    assert!(old_g["plugin"]["remote_key"].is_string(), "{old_g}");

    // The check a rotation runbook ends with: fails while anything is not under the current key.
    let (code, stdout, stderr) = inventory(&[&base[..], &["--require-key-id", "current"]].concat());
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("134 secrets not under KMS v2 key_id {new_id}")),
        "{stderr}"
    );
    assert!(stdout.contains("plaintext (identity)"), "{stdout}");
    // After the "migration" (everything rewritten under the new key), it passes.
    let ns_end = "/registry/secrets/ns0"; // '0' follows '/': the end of the ns/ prefix
    etcd_call(
        &etcd.url,
        "deleterange",
        json!({ "key": B64.encode("/registry/secrets/ns/"), "range_end": B64.encode(ns_end) }),
    )
    .await;
    let current = v2_value("kms2", &new.key_id, &new.ciphertext);
    for name in ["plain", "v1", "old-000"] {
        put(&etcd.url, &format!("/registry/secrets/ns/{name}"), &current).await;
    }
    let (code, _, stderr) = inventory(&[&base[..], &["--require-key-id", "current"]].concat());
    assert_eq!(code, 0, "{stderr}");
    drop(plugin);

    // etcd down: an error that names the endpoint and the flags, exit 1.
    let url = etcd.url.clone();
    drop(etcd);
    let (code, _, stderr) = inventory(&["--etcd-endpoints", &url]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&url) && stderr.contains("--etcd-endpoints"),
        "{stderr}"
    );
}
