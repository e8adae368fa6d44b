//! etcd values as the apiserver stores them under KMS v1 and v2 (docs/inventory.md), for tests that
//! write etcd directly.

/// The EncryptedObject the apiserver stores for KMS v2 (fields 1-3 of k8s.io/apiserver's kmsv2 API).
pub fn v2_value(provider: &str, key_id: &str, dek_source: &[u8]) -> Vec<u8> {
    fn field(tag: u8, bytes: &[u8], out: &mut Vec<u8>) {
        out.push(tag << 3 | 2);
        prost::encoding::encode_varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }
    let mut v = format!("k8s:enc:kms:v2:{provider}:").into_bytes();
    field(1, b"the sealed object", &mut v);
    field(2, key_id.as_bytes(), &mut v);
    field(3, dek_source, &mut v);
    v
}

pub fn v1_value(provider: &str, dek: &[u8]) -> Vec<u8> {
    let mut v = format!("k8s:enc:kms:v1:{provider}:").into_bytes();
    v.extend_from_slice(&(dek.len() as u16).to_be_bytes());
    v.extend_from_slice(dek);
    v.extend_from_slice(b"nonce and sealed object");
    v
}
