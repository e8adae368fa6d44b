//! `kms-plugin inventory`: where every stored object stands, read from etcd without decrypting
//! anything. Each value is classified by its storage prefix (the apiserver's, see
//! docs/inventory.md); for this plugin's ciphertexts the header also names the remote key and the
//! local KEK, which need no key to read.

pub mod etcd;

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::engine::{format, kek};

/// How one stored value is protected.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "storage", rename_all = "kebab-case")]
pub enum Storage {
    /// No encryption provider (identity): the object as the apiserver serialised it.
    Plaintext,
    /// A KMS v2 provider; `plugin` when the DEK source is this plugin's ciphertext.
    KmsV2 {
        provider: String,
        key_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        plugin: Option<PluginKey>,
    },
    /// A KMS v1 provider; `plugin` when the encrypted DEK is this plugin's ciphertext.
    KmsV1 {
        provider: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        plugin: Option<PluginKey>,
    },
    /// aescbc, aesgcm or secretbox with a key from the EncryptionConfiguration.
    LocalProvider { provider: String, key_name: String },
    /// A `k8s:enc:` prefix this build does not know, or a known prefix whose body does not parse.
    Unknown { detail: String },
}

/// What this plugin's ciphertext header says: which remote key wrapped which local KEK.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PluginKey {
    pub remote_key: String,
    /// The local KEK's short reference, as in the plugin's logs and audit lines (empty in a
    /// group, whose KEKs are listed in [`Group::local_keks`]).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub local_kek: String,
}

impl Storage {
    /// One line for the human table.
    pub fn describe(&self) -> String {
        match self {
            Storage::Plaintext => "plaintext (identity)".into(),
            Storage::KmsV2 {
                provider, key_id, ..
            } => {
                format!("kms v2 provider={provider} key_id={key_id}")
            }
            Storage::KmsV1 { provider, .. } => format!("kms v1 provider={provider}"),
            Storage::LocalProvider { provider, key_name } => format!("{provider} key={key_name}"),
            Storage::Unknown { detail } => format!("unknown ({detail})"),
        }
    }

    fn plugin(&self) -> Option<&PluginKey> {
        match self {
            Storage::KmsV2 { plugin, .. } | Storage::KmsV1 { plugin, .. } => plugin.as_ref(),
            _ => None,
        }
    }

    /// Grouping key: the storage with the local KEK left out (KEKs are counted per group).
    fn group(&self) -> Storage {
        let strip = |p: &Option<PluginKey>| {
            p.as_ref().map(|p| PluginKey {
                remote_key: p.remote_key.clone(),
                local_kek: String::new(),
            })
        };
        match self {
            Storage::KmsV2 {
                provider,
                key_id,
                plugin,
            } => Storage::KmsV2 {
                provider: provider.clone(),
                key_id: key_id.clone(),
                plugin: strip(plugin),
            },
            Storage::KmsV1 { provider, plugin } => Storage::KmsV1 {
                provider: provider.clone(),
                plugin: strip(plugin),
            },
            other => other.clone(),
        }
    }
}

/// The KMS v2 storage envelope (fields as in k8s.io/apiserver's kmsv2 API).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct EncryptedObject {
    #[prost(bytes = "vec", tag = "1")]
    pub encrypted_data: Vec<u8>,
    #[prost(string, tag = "2")]
    pub key_id: String,
    #[prost(bytes = "vec", tag = "3")]
    pub encrypted_dek_source: Vec<u8>,
    /// 0 = the DEK source is an AES-GCM key, 1 = a seed for HKDF-SHA256 with an extended nonce.
    #[prost(int32, tag = "5")]
    pub encrypted_dek_source_type: i32,
}

/// `k8s:enc:` then `<provider…>:` fields; returns the fields and the rest.
pub(crate) fn split_fields(rest: &[u8], n: usize) -> Option<(Vec<String>, &[u8])> {
    let mut fields = Vec::with_capacity(n);
    let mut rest = rest;
    for _ in 0..n {
        let end = rest.iter().position(|&b| b == b':')?;
        fields.push(String::from_utf8_lossy(&rest[..end]).into_owned());
        rest = &rest[end + 1..];
    }
    Some((fields, rest))
}

fn plugin_key(ciphertext: &[u8]) -> Option<PluginKey> {
    let parsed = format::parse(ciphertext).ok()?;
    Some(PluginKey {
        remote_key: parsed.key_ref.to_string(),
        local_kek: kek::short_ref(&kek::digest_of(parsed.key_ref, parsed.wrapped)),
    })
}

/// Classifies one etcd value. Never fails: what cannot be read is [`Storage::Unknown`].
pub fn classify(value: &[u8]) -> Storage {
    let Some(rest) = value.strip_prefix(b"k8s:enc:") else {
        return Storage::Plaintext;
    };
    let unknown = |detail: &str| Storage::Unknown {
        detail: detail.to_string(),
    };
    let Some((head, _)) = split_fields(rest, 2) else {
        return unknown("truncated k8s:enc: prefix");
    };
    match (head[0].as_str(), head[1].as_str()) {
        ("kms", "v2") => {
            let Some((f, body)) = split_fields(rest, 3) else {
                return unknown("kms v2 without a provider name");
            };
            match <EncryptedObject as prost::Message>::decode(body) {
                Ok(o) => Storage::KmsV2 {
                    provider: f[2].clone(),
                    plugin: plugin_key(&o.encrypted_dek_source),
                    key_id: o.key_id,
                },
                Err(_) => unknown("kms v2 body is not an EncryptedObject"),
            }
        }
        ("kms", "v1") => {
            let Some((f, body)) = split_fields(rest, 3) else {
                return unknown("kms v1 without a provider name");
            };
            let dek = body.get(..2).and_then(|len| {
                let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
                body.get(2..2 + len)
            });
            match dek {
                Some(dek) => Storage::KmsV1 {
                    provider: f[2].clone(),
                    plugin: plugin_key(dek),
                },
                None => unknown("kms v1 body shorter than its DEK length"),
            }
        }
        (provider @ ("aescbc" | "aesgcm" | "secretbox"), "v1") => match split_fields(rest, 3) {
            Some((f, _)) => Storage::LocalProvider {
                provider: provider.to_string(),
                key_name: f[2].clone(),
            },
            None => unknown("local provider without a key name"),
        },
        (p, v) => Storage::Unknown {
            detail: format!("k8s:enc:{p}:{v}"),
        },
    }
}

/// Objects of one storage group.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Group {
    pub objects: u64,
    /// Distinct local KEKs (this plugin's ciphertexts only).
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub local_keks: BTreeSet<String>,
}

/// Counts per resource and storage group.
#[derive(Debug, Default)]
pub struct Inventory {
    pub resources: BTreeMap<String, BTreeMap<Storage, Group>>,
}

/// A condition every checked object must meet (`--require-key-id`, `--require-remote-key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// KMS v2 with this key_id. v1 objects carry no key_id and never meet it.
    KeyId(String),
    /// This plugin's ciphertext (v1 or v2) under this remote key reference.
    RemoteKey(String),
}

impl Requirement {
    pub fn met_by(&self, s: &Storage) -> bool {
        match (self, s) {
            (Requirement::KeyId(want), Storage::KmsV2 { key_id, .. }) => key_id == want,
            (Requirement::RemoteKey(want), s) => s.plugin().is_some_and(|p| &p.remote_key == want),
            _ => false,
        }
    }
}

impl Inventory {
    pub fn add(&mut self, resource: &str, value: &[u8]) {
        let storage = classify(value);
        let group = self
            .resources
            .entry(resource.to_string())
            .or_default()
            .entry(storage.group())
            .or_default();
        group.objects += 1;
        if let Some(p) = storage.plugin() {
            group.local_keks.insert(p.local_kek.clone());
        }
    }

    /// Objects that do not meet `req`, per resource.
    pub fn violations(&self, req: &Requirement) -> BTreeMap<String, u64> {
        self.resources
            .iter()
            .map(|(r, groups)| {
                let bad = groups
                    .iter()
                    .filter(|(s, _)| !req.met_by(s))
                    .map(|(_, g)| g.objects)
                    .sum();
                (r.clone(), bad)
            })
            .collect()
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut rows = vec![[
            "RESOURCE".to_string(),
            "OBJECTS".to_string(),
            "STORAGE".to_string(),
            "THIS PLUGIN".to_string(),
        ]];
        for (resource, groups) in &self.resources {
            for (storage, g) in groups {
                let plugin = match storage.plugin() {
                    Some(p) => format!(
                        "remote key {}, {} local KEK{}",
                        p.remote_key,
                        g.local_keks.len(),
                        if g.local_keks.len() == 1 { "" } else { "s" }
                    ),
                    None => "-".to_string(),
                };
                rows.push([
                    resource.clone(),
                    g.objects.to_string(),
                    storage.describe(),
                    plugin,
                ]);
            }
        }
        let widths: Vec<usize> = (0..4)
            .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for r in &rows {
            let line = (0..4)
                .map(|i| format!("{:<w$}", r[i], w = widths[i]))
                .collect::<Vec<_>>()
                .join("  ");
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// The JSON report: `{"resources": {"secrets": {"total": n, "groups": [...]}}}`.
    pub fn json(&self) -> serde_json::Value {
        let resources: serde_json::Map<String, serde_json::Value> = self
            .resources
            .iter()
            .map(|(r, groups)| {
                let total: u64 = groups.values().map(|g| g.objects).sum();
                let groups: Vec<serde_json::Value> = groups
                    .iter()
                    .map(|(s, g)| {
                        let mut v = serde_json::to_value(s).unwrap_or_default();
                        if let (Some(obj), Ok(serde_json::Value::Object(extra))) =
                            (v.as_object_mut(), serde_json::to_value(g))
                        {
                            obj.extend(extra);
                        }
                        v
                    })
                    .collect();
                (
                    r.clone(),
                    serde_json::json!({ "total": total, "groups": groups }),
                )
            })
            .collect();
        serde_json::json!({ "resources": resources })
    }
}

#[cfg(test)]
mod tests;
