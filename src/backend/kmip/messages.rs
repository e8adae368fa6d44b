//! The KMIP 1.4 messages the plugin sends (Locate, Get Attributes, Encrypt, Decrypt) and the
//! parsing of the server's Response Message. Tag and enumeration values are the KMIP
//! specification's.
//!
//! 1.4 rather than 1.2: the Authenticated Encryption Tag that AES-GCM needs is a 1.4 field.

use super::ttlv::{Item, Value};
use crate::backend::BackendError;

pub mod tag {
    pub const ACTIVATION_DATE: u32 = 0x420001;
    pub const ATTRIBUTE: u32 = 0x420008;
    pub const ATTRIBUTE_NAME: u32 = 0x42000A;
    pub const ATTRIBUTE_VALUE: u32 = 0x42000B;
    pub const BATCH_COUNT: u32 = 0x42000D;
    pub const BATCH_ITEM: u32 = 0x42000F;
    pub const BLOCK_CIPHER_MODE: u32 = 0x420011;
    pub const CRYPTOGRAPHIC_ALGORITHM: u32 = 0x420028;
    pub const CRYPTOGRAPHIC_PARAMETERS: u32 = 0x42002B;
    pub const INITIAL_DATE: u32 = 0x420039;
    pub const LINK_TYPE: u32 = 0x42004B;
    pub const LINKED_OBJECT_IDENTIFIER: u32 = 0x42004C;
    pub const IV_COUNTER_NONCE: u32 = 0x42003D;
    pub const MAXIMUM_RESPONSE_SIZE: u32 = 0x420050;
    pub const NAME: u32 = 0x420053;
    pub const NAME_TYPE: u32 = 0x420054;
    pub const NAME_VALUE: u32 = 0x420055;
    pub const OBJECT_TYPE: u32 = 0x420057;
    pub const OPERATION: u32 = 0x42005C;
    pub const PROTOCOL_VERSION: u32 = 0x420069;
    pub const PROTOCOL_VERSION_MAJOR: u32 = 0x42006A;
    pub const PROTOCOL_VERSION_MINOR: u32 = 0x42006B;
    pub const REQUEST_HEADER: u32 = 0x420077;
    pub const REQUEST_MESSAGE: u32 = 0x420078;
    pub const REQUEST_PAYLOAD: u32 = 0x420079;
    pub const RESPONSE_HEADER: u32 = 0x42007A;
    pub const RESPONSE_MESSAGE: u32 = 0x42007B;
    pub const RESPONSE_PAYLOAD: u32 = 0x42007C;
    pub const RESULT_MESSAGE: u32 = 0x42007D;
    pub const RESULT_REASON: u32 = 0x42007E;
    pub const RESULT_STATUS: u32 = 0x42007F;
    pub const STATE: u32 = 0x42008D;
    pub const UNIQUE_BATCH_ITEM_ID: u32 = 0x420093;
    pub const UNIQUE_IDENTIFIER: u32 = 0x420094;
    pub const DATA: u32 = 0x4200C2;
    pub const RANDOM_IV: u32 = 0x4200C5;
    pub const TAG_LENGTH: u32 = 0x4200CE;
    pub const AUTHENTICATED_ENCRYPTION_TAG: u32 = 0x4200FF;
}

/// Operation enumeration values.
pub mod op {
    pub const LOCATE: u32 = 0x08;
    pub const GET_ATTRIBUTES: u32 = 0x0B;
    pub const ENCRYPT: u32 = 0x1F;
    pub const DECRYPT: u32 = 0x20;
}

const OBJECT_TYPE_SYMMETRIC_KEY: u32 = 0x02;
const NAME_TYPE_TEXT: u32 = 0x01;
pub const ALGORITHM_AES: u32 = 0x03;
const MODE_GCM: u32 = 0x09;
pub const GCM_TAG_LEN: usize = 16;
const RESULT_SUCCESS: u32 = 0x00;
const RESULT_FAILED: u32 = 0x01;
/// Bytes the plugin lets the server answer with; our answers are a few hundred bytes.
const MAX_RESPONSE_SIZE: i32 = 64 * 1024;

/// Lifecycle state of a managed object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    PreActive,
    Active,
    Deactivated,
    Compromised,
    Destroyed,
    DestroyedCompromised,
    Unknown(u32),
}

impl State {
    pub fn from_wire(v: u32) -> State {
        match v {
            1 => State::PreActive,
            2 => State::Active,
            3 => State::Deactivated,
            4 => State::Compromised,
            5 => State::Destroyed,
            6 => State::DestroyedCompromised,
            n => State::Unknown(n),
        }
    }
    pub fn wire(self) -> u32 {
        match self {
            State::PreActive => 1,
            State::Active => 2,
            State::Deactivated => 3,
            State::Compromised => 4,
            State::Destroyed => 5,
            State::DestroyedCompromised => 6,
            State::Unknown(n) => n,
        }
    }
}

/// A request body: one batch item's operation and payload.
pub struct Request {
    pub operation: u32,
    pub payload: Vec<Item>,
}

fn attribute(name: &str, value: Value) -> Item {
    Item::structure(
        tag::ATTRIBUTE,
        vec![
            Item::new(tag::ATTRIBUTE_NAME, Value::TextString(name.into())),
            Item::new(tag::ATTRIBUTE_VALUE, value),
        ],
    )
}

/// Locate symmetric keys named `name`, Active only when `active_only`.
pub fn locate(name: &str, active_only: bool) -> Request {
    let mut payload = vec![
        attribute("Object Type", Value::Enumeration(OBJECT_TYPE_SYMMETRIC_KEY)),
        attribute(
            "Name",
            Value::Structure(vec![
                Item::new(tag::NAME_VALUE, Value::TextString(name.into())),
                Item::new(tag::NAME_TYPE, Value::Enumeration(NAME_TYPE_TEXT)),
            ]),
        ),
    ];
    if active_only {
        payload.push(attribute("State", Value::Enumeration(State::Active.wire())));
    }
    Request {
        operation: op::LOCATE,
        payload,
    }
}

/// The attributes the plugin reads.
pub const ATTRIBUTES: &[&str] = &[
    "State",
    "Cryptographic Algorithm",
    "Activation Date",
    "Initial Date",
    "Name",
];

pub fn get_attributes(uid: &str, names: &[&str]) -> Request {
    let mut payload = vec![Item::new(
        tag::UNIQUE_IDENTIFIER,
        Value::TextString(uid.into()),
    )];
    payload.extend(
        names
            .iter()
            .map(|n| Item::new(tag::ATTRIBUTE_NAME, Value::TextString((*n).into()))),
    );
    Request {
        operation: op::GET_ATTRIBUTES,
        payload,
    }
}

fn gcm_parameters(random_iv: bool) -> Item {
    let mut p = vec![
        Item::new(tag::BLOCK_CIPHER_MODE, Value::Enumeration(MODE_GCM)),
        Item::new(
            tag::CRYPTOGRAPHIC_ALGORITHM,
            Value::Enumeration(ALGORITHM_AES),
        ),
    ];
    // KMIP fixes the order of the fields: Random IV comes before Tag Length.
    if random_iv {
        p.push(Item::new(tag::RANDOM_IV, Value::Boolean(true)));
    }
    p.push(Item::new(
        tag::TAG_LENGTH,
        Value::Integer(GCM_TAG_LEN as i32),
    ));
    Item::structure(tag::CRYPTOGRAPHIC_PARAMETERS, p)
}

/// AES-GCM Encrypt; with `iv` None the server picks the IV (Random IV).
pub fn encrypt(uid: &str, plaintext: &[u8], iv: Option<&[u8]>) -> Request {
    let mut payload = vec![
        Item::new(tag::UNIQUE_IDENTIFIER, Value::TextString(uid.into())),
        gcm_parameters(iv.is_none()),
        Item::new(tag::DATA, Value::ByteString(plaintext.to_vec())),
    ];
    if let Some(iv) = iv {
        payload.push(Item::new(
            tag::IV_COUNTER_NONCE,
            Value::ByteString(iv.to_vec()),
        ));
    }
    Request {
        operation: op::ENCRYPT,
        payload,
    }
}

pub fn decrypt(uid: &str, ciphertext: &[u8], iv: &[u8], auth_tag: &[u8]) -> Request {
    Request {
        operation: op::DECRYPT,
        payload: vec![
            Item::new(tag::UNIQUE_IDENTIFIER, Value::TextString(uid.into())),
            gcm_parameters(false),
            Item::new(tag::DATA, Value::ByteString(ciphertext.to_vec())),
            Item::new(tag::IV_COUNTER_NONCE, Value::ByteString(iv.to_vec())),
            Item::new(
                tag::AUTHENTICATED_ENCRYPTION_TAG,
                Value::ByteString(auth_tag.to_vec()),
            ),
        ],
    }
}

/// The encoded Request Message with one batch item per request.
pub fn request_message(requests: &[Request]) -> Vec<u8> {
    let header = Item::structure(
        tag::REQUEST_HEADER,
        vec![
            Item::structure(
                tag::PROTOCOL_VERSION,
                vec![
                    Item::new(tag::PROTOCOL_VERSION_MAJOR, Value::Integer(1)),
                    Item::new(tag::PROTOCOL_VERSION_MINOR, Value::Integer(4)),
                ],
            ),
            Item::new(
                tag::MAXIMUM_RESPONSE_SIZE,
                Value::Integer(MAX_RESPONSE_SIZE),
            ),
            Item::new(tag::BATCH_COUNT, Value::Integer(requests.len() as i32)),
        ],
    );
    let mut items = vec![header];
    for (i, r) in requests.iter().enumerate() {
        let mut item = vec![Item::new(tag::OPERATION, Value::Enumeration(r.operation))];
        // Required once a message has more than one batch item.
        if requests.len() > 1 {
            item.push(Item::new(
                tag::UNIQUE_BATCH_ITEM_ID,
                Value::ByteString(batch_id(i)),
            ));
        }
        item.push(Item::structure(tag::REQUEST_PAYLOAD, r.payload.clone()));
        items.push(Item::structure(tag::BATCH_ITEM, item));
    }
    let mut message = Item::structure(tag::REQUEST_MESSAGE, items);
    let wire = message.encode();
    // The copy of the payloads may hold a plaintext key.
    message.wipe();
    wire
}

fn batch_id(i: usize) -> Vec<u8> {
    (i as u32).to_be_bytes().to_vec()
}

/// One batch item of a Response Message.
#[derive(Debug)]
pub enum Outcome {
    /// Result Status Success; the Response Payload (an empty structure when absent).
    Success(Item),
    /// Result Status Operation Failed: the server's own typed refusal.
    Failed {
        reason: Option<u32>,
        message: String,
    },
    /// Pending or Undone: the plugin never asks for asynchronous operations.
    Other(u32),
}

/// A Response Message that is not one: what a proxy, a non-KMIP service or a broken server sent.
/// Always an outage, never a statement about the key.
pub fn not_kmip(what: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable(format!(
        "the KMIP server's answer is not a valid KMIP response ({what}); is --kmip-endpoint a KMIP server (usually port 5696)?"
    ))
}

/// Parses a Response Message into one outcome per batch item, in order. A message that does not
/// have the shape of a Response Message (or whose operations do not match the request) is
/// [`not_kmip`].
pub fn parse_response(root: &Item, operations: &[u32]) -> Result<Vec<Outcome>, BackendError> {
    if root.tag != tag::RESPONSE_MESSAGE || !matches!(root.value, Value::Structure(_)) {
        return Err(not_kmip(format!("top-level tag {:#08x}", root.tag)));
    }
    root.child(tag::RESPONSE_HEADER)
        .ok_or_else(|| not_kmip("no Response Header"))?;
    let items: Vec<&Item> = root.all(tag::BATCH_ITEM).collect();
    let single_error = items.len() == 1 && operations.len() > 1;
    if items.len() != operations.len() && !single_error {
        return Err(not_kmip(format!(
            "{} batch items for {} requests",
            items.len(),
            operations.len()
        )));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        // A server that failed to parse the request answers without an operation.
        if let Some(got) = item.child(tag::OPERATION) {
            if !single_error && got.as_enum() != Some(operations[i]) {
                return Err(not_kmip("batch item for another operation"));
            }
        }
        if let Some(id) = item.child(tag::UNIQUE_BATCH_ITEM_ID) {
            if !single_error && operations.len() > 1 && id.as_bytes() != Some(&batch_id(i)[..]) {
                return Err(not_kmip("batch items out of order"));
            }
        }
        let status = item
            .child(tag::RESULT_STATUS)
            .and_then(Item::as_enum)
            .ok_or_else(|| not_kmip("batch item without Result Status"))?;
        out.push(match status {
            RESULT_SUCCESS => Outcome::Success(
                item.child(tag::RESPONSE_PAYLOAD)
                    .cloned()
                    .unwrap_or_else(|| Item::structure(tag::RESPONSE_PAYLOAD, vec![])),
            ),
            RESULT_FAILED => Outcome::Failed {
                reason: item.child(tag::RESULT_REASON).and_then(Item::as_enum),
                message: item
                    .child(tag::RESULT_MESSAGE)
                    .and_then(Item::as_text)
                    .map(bounded)
                    .unwrap_or_default(),
            },
            other => Outcome::Other(other),
        });
    }
    Ok(out)
}

/// Server text in our errors stays short and printable.
fn bounded(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(300).collect()
}

/// Result Reason values (KMIP 1.x and 2.0) the table below names.
pub mod reason {
    pub const ITEM_NOT_FOUND: u32 = 0x01;
    pub const RESPONSE_TOO_LARGE: u32 = 0x02;
    pub const AUTHENTICATION_NOT_SUCCESSFUL: u32 = 0x03;
    pub const INVALID_MESSAGE: u32 = 0x04;
    pub const OPERATION_NOT_SUPPORTED: u32 = 0x05;
    pub const MISSING_DATA: u32 = 0x06;
    pub const INVALID_FIELD: u32 = 0x07;
    pub const FEATURE_NOT_SUPPORTED: u32 = 0x08;
    pub const CRYPTOGRAPHIC_FAILURE: u32 = 0x0A;
    pub const ILLEGAL_OPERATION: u32 = 0x0B;
    pub const PERMISSION_DENIED: u32 = 0x0C;
    pub const OBJECT_ARCHIVED: u32 = 0x0D;
    pub const BAD_CRYPTOGRAPHIC_PARAMETERS: u32 = 0x24;
    pub const INCOMPATIBLE_CRYPTOGRAPHIC_USAGE_MASK: u32 = 0x29;
    pub const INTERNAL_SERVER_ERROR: u32 = 0x2A;
    pub const WRONG_KEY_LIFECYCLE_STATE: u32 = 0x43;
    pub const GENERAL_FAILURE: u32 = 0x100;
}

/// The one table from a KMIP refusal (Result Status Operation Failed) to a backend error. Only
/// this function produces revocation-class errors for KMIP; `what` names the operation and key.
pub fn classify_failure(reason: Option<u32>, message: &str, what: &str) -> BackendError {
    use reason::*;
    let detail = match reason {
        Some(r) => format!(
            "KMIP server refused {what}: reason {r:#x} ({})",
            reason_name(r)
        ),
        None => format!("KMIP server refused {what} without a Result Reason"),
    };
    let detail = if message.is_empty() {
        detail
    } else {
        format!("{detail}: {message}")
    };
    match reason {
        Some(ITEM_NOT_FOUND) => BackendError::KeyNotFound(detail),
        Some(PERMISSION_DENIED) => BackendError::PermissionDenied(format!(
            "{detail} (the client certificate's identity needs access to the key, and the key must be Active with Encrypt and Decrypt in its usage mask)"
        )),
        Some(WRONG_KEY_LIFECYCLE_STATE) | Some(OBJECT_ARCHIVED) => BackendError::KeyDisabled(detail),
        Some(AUTHENTICATION_NOT_SUCCESSFUL) => BackendError::Authentication(format!(
            "{detail} (check --kmip-cert-file/--kmip-key-file: the server must trust the client certificate, and it must allow TLS client authentication)"
        )),
        Some(CRYPTOGRAPHIC_FAILURE) => BackendError::InvalidCiphertext(detail),
        Some(INCOMPATIBLE_CRYPTOGRAPHIC_USAGE_MASK) => BackendError::Config(format!(
            "{detail} (give the key the Encrypt and Decrypt usage mask bits)"
        )),
        Some(OPERATION_NOT_SUPPORTED | FEATURE_NOT_SUPPORTED | BAD_CRYPTOGRAPHIC_PARAMETERS) => {
            BackendError::Config(format!(
                "{detail} (the KMIP server must support KMIP 1.4 Encrypt/Decrypt with AES-GCM)"
            ))
        }
        Some(INTERNAL_SERVER_ERROR) => BackendError::Unavailable(detail),
        _ => BackendError::Other(detail),
    }
}

fn reason_name(r: u32) -> &'static str {
    use reason::*;
    match r {
        ITEM_NOT_FOUND => "Item Not Found",
        RESPONSE_TOO_LARGE => "Response Too Large",
        AUTHENTICATION_NOT_SUCCESSFUL => "Authentication Not Successful",
        INVALID_MESSAGE => "Invalid Message",
        OPERATION_NOT_SUPPORTED => "Operation Not Supported",
        MISSING_DATA => "Missing Data",
        INVALID_FIELD => "Invalid Field",
        FEATURE_NOT_SUPPORTED => "Feature Not Supported",
        CRYPTOGRAPHIC_FAILURE => "Cryptographic Failure",
        ILLEGAL_OPERATION => "Illegal Operation",
        PERMISSION_DENIED => "Permission Denied",
        OBJECT_ARCHIVED => "Object Archived",
        BAD_CRYPTOGRAPHIC_PARAMETERS => "Bad Cryptographic Parameters",
        INCOMPATIBLE_CRYPTOGRAPHIC_USAGE_MASK => "Incompatible Cryptographic Usage Mask",
        INTERNAL_SERVER_ERROR => "Internal Server Error",
        WRONG_KEY_LIFECYCLE_STATE => "Wrong Key Lifecycle State",
        GENERAL_FAILURE => "General Failure",
        _ => "other",
    }
}

/// What Get Attributes said about a key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyAttributes {
    pub state: Option<State>,
    pub algorithm: Option<u32>,
    pub activation_date: Option<i64>,
    pub initial_date: Option<i64>,
    pub names: Vec<String>,
    /// Replacement Object Link: the key that a Re-key made from this one.
    pub replacement: Option<String>,
}

const LINK_REPLACEMENT_OBJECT: u32 = 0x106;

/// Reads a Get Attributes payload (KMIP 1.x Attribute structures).
pub fn key_attributes(payload: &Item) -> KeyAttributes {
    let mut a = KeyAttributes::default();
    for attr in payload.all(tag::ATTRIBUTE) {
        let (Some(name), Some(value)) = (
            attr.child(tag::ATTRIBUTE_NAME).and_then(Item::as_text),
            attr.child(tag::ATTRIBUTE_VALUE),
        ) else {
            continue;
        };
        match name {
            "State" => a.state = value.as_enum().map(State::from_wire),
            "Cryptographic Algorithm" => a.algorithm = value.as_enum(),
            "Activation Date" => a.activation_date = value.as_datetime(),
            "Initial Date" => a.initial_date = value.as_datetime(),
            "Name" => {
                if let Some(n) = value.child(tag::NAME_VALUE).and_then(Item::as_text) {
                    a.names.push(n.to_string());
                }
            }
            "Link"
                if value.child(tag::LINK_TYPE).and_then(Item::as_enum)
                    == Some(LINK_REPLACEMENT_OBJECT) =>
            {
                a.replacement = value
                    .child(tag::LINKED_OBJECT_IDENTIFIER)
                    .and_then(Item::as_text)
                    .map(str::to_string);
            }
            _ => {}
        }
    }
    a
}

/// The unique identifiers of a Locate payload.
pub fn located(payload: &Item) -> Vec<String> {
    payload
        .all(tag::UNIQUE_IDENTIFIER)
        .filter_map(Item::as_text)
        .map(str::to_string)
        .collect()
}

/// An Encrypt payload: the ciphertext, the IV (when the server chose it) and the tag.
pub struct Encrypted {
    pub data: Vec<u8>,
    pub iv: Option<Vec<u8>>,
    pub tag: Option<Vec<u8>>,
}

pub fn encrypted(payload: &Item) -> Option<Encrypted> {
    Some(Encrypted {
        data: payload.child(tag::DATA)?.as_bytes()?.to_vec(),
        iv: payload
            .child(tag::IV_COUNTER_NONCE)
            .and_then(Item::as_bytes)
            .map(<[u8]>::to_vec),
        tag: payload
            .child(tag::AUTHENTICATED_ENCRYPTION_TAG)
            .and_then(Item::as_bytes)
            .map(<[u8]>::to_vec),
    })
}

pub fn decrypted(payload: &Item) -> Option<&[u8]> {
    payload.child(tag::DATA)?.as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::kmip::ttlv;

    fn response(items: Vec<Item>) -> Item {
        let mut all = vec![Item::structure(
            tag::RESPONSE_HEADER,
            vec![Item::new(
                tag::BATCH_COUNT,
                Value::Integer(items.len() as i32),
            )],
        )];
        all.extend(items);
        Item::structure(tag::RESPONSE_MESSAGE, all)
    }

    fn failed(op: u32, reason: u32) -> Item {
        Item::structure(
            tag::BATCH_ITEM,
            vec![
                Item::new(tag::OPERATION, Value::Enumeration(op)),
                Item::new(tag::RESULT_STATUS, Value::Enumeration(RESULT_FAILED)),
                Item::new(tag::RESULT_REASON, Value::Enumeration(reason)),
                Item::new(tag::RESULT_MESSAGE, Value::TextString("no\nway".into())),
            ],
        )
    }

    #[test]
    fn request_messages_decode_as_ttlv() {
        let wire = request_message(&[locate("k8s", true), get_attributes("1", ATTRIBUTES)]);
        let root = ttlv::decode(&wire).unwrap();
        assert_eq!(root.tag, tag::REQUEST_MESSAGE);
        assert_eq!(root.all(tag::BATCH_ITEM).count(), 2);
        let count = root
            .child(tag::REQUEST_HEADER)
            .and_then(|h| h.child(tag::BATCH_COUNT))
            .and_then(Item::as_int);
        assert_eq!(count, Some(2));
    }

    #[test]
    fn only_operation_failed_reaches_the_table() {
        let r = response(vec![failed(op::DECRYPT, reason::PERMISSION_DENIED)]);
        let out = parse_response(&r, &[op::DECRYPT]).unwrap();
        let Outcome::Failed { reason, message } = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(message, "noway");
        assert!(classify_failure(*reason, message, "decrypt").is_revocation());
        // Not a Response Message at all, or one for another operation: an outage.
        let e = parse_response(
            &Item::structure(tag::REQUEST_MESSAGE, vec![]),
            &[op::DECRYPT],
        )
        .unwrap_err();
        assert!(e.is_transient(), "{e:?}");
        let e = parse_response(&r, &[op::ENCRYPT]).unwrap_err();
        assert!(e.is_transient(), "{e:?}");
        let e = parse_response(&response(vec![]), &[op::ENCRYPT]).unwrap_err();
        assert!(e.is_transient(), "{e:?}");
    }

    #[test]
    fn result_reason_table() {
        let c = |r| classify_failure(Some(r), "", "decrypt with key 1");
        assert!(matches!(
            c(reason::ITEM_NOT_FOUND),
            BackendError::KeyNotFound(_)
        ));
        assert!(matches!(
            c(reason::PERMISSION_DENIED),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(
            c(reason::WRONG_KEY_LIFECYCLE_STATE),
            BackendError::KeyDisabled(_)
        ));
        assert!(matches!(
            c(reason::OBJECT_ARCHIVED),
            BackendError::KeyDisabled(_)
        ));
        assert!(matches!(
            c(reason::AUTHENTICATION_NOT_SUCCESSFUL),
            BackendError::Authentication(_)
        ));
        assert!(matches!(
            c(reason::CRYPTOGRAPHIC_FAILURE),
            BackendError::InvalidCiphertext(_)
        ));
        assert!(matches!(
            c(reason::INTERNAL_SERVER_ERROR),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(
            c(reason::FEATURE_NOT_SUPPORTED),
            BackendError::Config(_)
        ));
        for r in [reason::GENERAL_FAILURE, reason::INVALID_MESSAGE, 0xdead] {
            assert!(matches!(c(r), BackendError::Other(_)), "{r:#x}");
        }
        assert!(matches!(
            classify_failure(None, "", "x"),
            BackendError::Other(_)
        ));
    }

    #[test]
    fn attributes_are_read() {
        let attr = |n: &str, v| attribute(n, v);
        let payload = Item::structure(
            tag::RESPONSE_PAYLOAD,
            vec![
                Item::new(tag::UNIQUE_IDENTIFIER, Value::TextString("7".into())),
                attr("State", Value::Enumeration(3)),
                attr("Cryptographic Algorithm", Value::Enumeration(3)),
                attr("Activation Date", Value::DateTime(100)),
                attr("Initial Date", Value::DateTime(99)),
                attr(
                    "Link",
                    Value::Structure(vec![
                        Item::new(tag::LINK_TYPE, Value::Enumeration(LINK_REPLACEMENT_OBJECT)),
                        Item::new(tag::LINKED_OBJECT_IDENTIFIER, Value::TextString("8".into())),
                    ]),
                ),
                attr(
                    "Name",
                    Value::Structure(vec![
                        Item::new(tag::NAME_VALUE, Value::TextString("k8s".into())),
                        Item::new(tag::NAME_TYPE, Value::Enumeration(1)),
                    ]),
                ),
            ],
        );
        let a = key_attributes(&payload);
        assert_eq!(a.state, Some(State::Deactivated));
        assert_eq!(a.algorithm, Some(ALGORITHM_AES));
        assert_eq!((a.activation_date, a.initial_date), (Some(100), Some(99)));
        assert_eq!(a.names, vec!["k8s".to_string()]);
        assert_eq!(a.replacement.as_deref(), Some("8"));
    }
}
