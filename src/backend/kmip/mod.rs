//! A KMIP key manager as the remote KEK (KMIP 1.4 over mutual TLS).
//!
//! - The key: a symmetric AES key found by Locate on its Name (object type Symmetric Key, state
//!   Active), or a fixed Unique Identifier (`--kmip-key-id`). Several Active keys with the name:
//!   the newest by Activation Date, then Initial Date, then unique identifier wins, so every
//!   replica picks the same one. key_id = key_ref = the key's Unique Identifier.
//! - current_key = Locate + Get Attributes (State, algorithm, dates): no cryptography.
//! - wrap = Encrypt with AES-GCM (server-chosen IV; a random client IV where the server does not
//!   choose one), unwrap = Decrypt with the unique identifier from the ciphertext. The wrapped
//!   blob keeps the IV and the tag next to the ciphertext.
//! - Rotation: create and activate a new key with the same name; older keys keep unwrapping as
//!   long as the server lets them decrypt (Re-key links are not needed: Locate finds the newest).
//! - Only a Response Message with Result Status Operation Failed can revoke, through the one table
//!   in [`messages::classify_failure`]; TLS failures, resets, timeouts and anything that is not a
//!   KMIP Response Message are outages.
//!
//! The TTLV codec is hand-written (src/backend/kmip/ttlv.rs): the maintained Rust KMIP crates
//! either lack Encrypt/Decrypt (kmip-protocol, which also pins an old rustls) or carry a licence
//! this project cannot ship (cosmian_kmip, BUSL-1.1).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use rand::RngCore;
use zeroize::Zeroizing;

use super::{Backend, BackendError, KeyIdentity, SecretBytes, WrappedKey};

pub mod client;
pub mod messages;
pub mod ttlv;

use messages::{KeyAttributes, Outcome, Request, State};

const KIND: &str = "kmip";
/// Format byte of the wrapped blob: 1 ‖ IV length ‖ IV ‖ tag length ‖ tag ‖ ciphertext.
const BLOB_V1: u8 = 1;
const CLIENT_IV_LEN: usize = 12;
/// Keys read per Locate; a name with more Active keys than this is an operator error.
const MAX_CANDIDATES: usize = 64;
const MAX_KEY_REF: usize = 255;
const VERIFIED_CAP: usize = 4096;
const MAX_REKEY_HOPS: usize = 16;

const TLS_FLAGS: super::tls::TlsFlags = super::tls::TlsFlags {
    ca_file: "--kmip-ca-file",
    client_cert_file: "--kmip-cert-file",
    client_key_file: "--kmip-key-file",
};

/// Command-line options of the KMIP backend (`--backend kmip`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KmipArgs {
    /// KMIP server, HOST:PORT (KMIP's port is 5696). HOST must be a name or IP address in the
    /// server's certificate.
    #[arg(
        long = "kmip-endpoint",
        env = "KMS_PLUGIN_KMIP_ENDPOINT",
        value_name = "HOST:PORT"
    )]
    pub kmip_endpoint: Option<String>,
    /// PEM bundle of the CA(s) that sign the KMIP server's certificate (added to the system trust
    /// store).
    #[arg(
        long = "kmip-ca-file",
        env = "KMS_PLUGIN_KMIP_CA_FILE",
        value_name = "FILE"
    )]
    pub kmip_ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) the plugin presents to the KMIP server.
    #[arg(
        long = "kmip-cert-file",
        env = "KMS_PLUGIN_KMIP_CERT_FILE",
        value_name = "FILE"
    )]
    pub kmip_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(
        long = "kmip-key-file",
        env = "KMS_PLUGIN_KMIP_KEY_FILE",
        value_name = "FILE"
    )]
    pub kmip_key_file: Option<PathBuf>,
    /// Name of the AES key; the newest Active key with this name is the current KEK.
    #[arg(
        long = "kmip-key-name",
        env = "KMS_PLUGIN_KMIP_KEY_NAME",
        value_name = "NAME",
        conflicts_with = "kmip_key_id"
    )]
    pub kmip_key_name: Option<String>,
    /// Unique Identifier of the AES key, instead of --kmip-key-name (rotation is then a
    /// configuration change).
    #[arg(
        long = "kmip-key-id",
        env = "KMS_PLUGIN_KMIP_KEY_ID",
        value_name = "UID"
    )]
    pub kmip_key_id: Option<String>,
    /// Time for one KMIP request, connecting and waiting for a free connection included.
    #[arg(
        long = "kmip-timeout",
        env = "KMS_PLUGIN_KMIP_TIMEOUT",
        default_value = "4s",
        value_parser = humantime::parse_duration
    )]
    pub kmip_timeout: Duration,
    /// Most connections kept open to the KMIP server (and requests in flight).
    #[arg(
        long = "kmip-pool-size",
        env = "KMS_PLUGIN_KMIP_POOL_SIZE",
        default_value_t = 4,
        value_parser = clap::value_parser!(u16).range(1..=64)
    )]
    pub kmip_pool_size: u16,
}

#[derive(Debug, Clone)]
enum Selector {
    Name(String),
    Id(String),
}

/// The KMIP backend.
#[derive(Debug)]
pub struct KmipBackend {
    pool: client::Pool,
    key: Selector,
    /// Unique identifiers whose Name was checked against --kmip-key-name.
    verified: Mutex<HashSet<String>>,
    /// Set once the server answered an Encrypt without choosing an IV.
    client_iv: AtomicBool,
}

fn config(msg: impl Into<String>) -> BackendError {
    BackendError::Config(msg.into())
}

impl KmipBackend {
    pub fn new(args: &KmipArgs) -> Result<KmipBackend, BackendError> {
        let endpoint = args
            .kmip_endpoint
            .as_deref()
            .filter(|e| !e.is_empty())
            .ok_or_else(|| config("the KMIP backend needs --kmip-endpoint HOST:PORT"))?;
        let key = match (&args.kmip_key_name, &args.kmip_key_id) {
            (Some(n), None) if !n.is_empty() => Selector::Name(n.clone()),
            (None, Some(id)) if valid_uid(id) => Selector::Id(id.clone()),
            (None, Some(_)) => {
                return Err(config(
                    "--kmip-key-id must be 1 to 255 printable characters",
                ))
            }
            _ => {
                return Err(config(
                    "the KMIP backend needs exactly one of --kmip-key-name or --kmip-key-id",
                ))
            }
        };
        if args.kmip_cert_file.is_none() || args.kmip_key_file.is_none() {
            return Err(config(
                "KMIP uses mutual TLS: give the client certificate and key with --kmip-cert-file and --kmip-key-file",
            ));
        }
        let tls = super::tls::TlsOptions {
            ca_file: args.kmip_ca_file.clone(),
            client_cert_file: args.kmip_cert_file.clone(),
            client_key_file: args.kmip_key_file.clone(),
        };
        let (tls_config, _roots) = super::tls::client_config(&tls, &TLS_FLAGS)?;
        let pool = client::Pool::new(
            endpoint,
            tls_config,
            usize::from(args.kmip_pool_size),
            args.kmip_timeout,
            args.kmip_timeout,
        )?;
        Ok(KmipBackend {
            pool,
            key,
            verified: Mutex::new(HashSet::new()),
            client_iv: AtomicBool::new(false),
        })
    }

    /// Sends `requests` as one message; one outcome per request.
    async fn batch(&self, requests: &[Request]) -> Result<Vec<Outcome>, BackendError> {
        let wire = Zeroizing::new(messages::request_message(requests));
        let mut answer = self.pool.call(&wire).await?;
        let ops: Vec<u32> = requests.iter().map(|r| r.operation).collect();
        let out = messages::parse_response(&answer, &ops);
        answer.wipe();
        let out = out?;
        if out.len() != requests.len() {
            // The server answered the whole message with one error (it could not parse it).
            return match out.into_iter().next() {
                Some(Outcome::Failed { reason, message }) => Err(messages::classify_failure(
                    reason,
                    &message,
                    "the request message",
                )),
                _ => Err(messages::not_kmip("batch items missing")),
            };
        }
        Ok(out)
    }

    /// One request; its success payload, or its failure through the table.
    /// The request's byte strings (a plaintext key for Encrypt) are wiped once it was sent.
    async fn one(&self, mut request: Request, what: &str) -> Result<ttlv::Item, BackendError> {
        let out = self.batch(std::slice::from_ref(&request)).await;
        request.payload.iter_mut().for_each(ttlv::Item::wipe);
        into_payload(out?.into_iter().next(), what)
    }

    async fn attributes(&self, uid: &str) -> Result<KeyAttributes, BackendError> {
        self.attributes_named(uid, messages::ATTRIBUTES).await
    }

    async fn attributes_named(
        &self,
        uid: &str,
        names: &[&str],
    ) -> Result<KeyAttributes, BackendError> {
        let payload = self
            .one(
                messages::get_attributes(uid, names),
                &format!("Get Attributes of key {uid:?}"),
            )
            .await?;
        Ok(messages::key_attributes(&payload))
    }

    /// Get Attributes of several keys in one message; keys the server refused are left out,
    /// unless all were refused.
    async fn attributes_of(
        &self,
        uids: &[String],
    ) -> Result<Vec<(String, KeyAttributes)>, BackendError> {
        let requests: Vec<Request> = uids
            .iter()
            .map(|u| messages::get_attributes(u, messages::ATTRIBUTES))
            .collect();
        let out = self.batch(&requests).await?;
        let mut found = Vec::new();
        let mut first_err = None;
        for (uid, o) in uids.iter().zip(out) {
            match into_payload(Some(o), &format!("Get Attributes of key {uid:?}")) {
                Ok(p) => found.push((uid.clone(), messages::key_attributes(&p))),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match (found.is_empty(), first_err) {
            (true, Some(e)) => Err(e),
            _ => Ok(found),
        }
    }

    async fn locate(&self, name: &str, active_only: bool) -> Result<Vec<String>, BackendError> {
        let payload = self
            .one(
                messages::locate(name, active_only),
                &format!("Locate of keys named {name:?}"),
            )
            .await?;
        let mut uids = messages::located(&payload);
        uids.retain(|u| valid_uid(u));
        uids.truncate(MAX_CANDIDATES);
        Ok(uids)
    }

    /// The current key's unique identifier, checked to be an Active AES key.
    async fn resolve(&self) -> Result<String, BackendError> {
        match &self.key {
            Selector::Id(uid) => {
                let a = self.attributes(uid).await?;
                usable(uid, &a)?;
                Ok(uid.clone())
            }
            Selector::Name(name) => {
                let uids = self.locate(name, true).await?;
                if uids.is_empty() {
                    return Err(self.why_none_active(name).await);
                }
                let mut candidates = self.attributes_of(&uids).await?;
                candidates.retain(|(_, a)| a.state == Some(State::Active));
                let (uid, attrs) = candidates
                    .into_iter()
                    .max_by(|(ua, a), (ub, b)| newest_order(ua, a, ub, b))
                    .ok_or_else(|| {
                        BackendError::KeyDisabled(format!(
                            "the KMIP server located keys named {name:?} but none is Active any more"
                        ))
                    })?;
                usable(&uid, &attrs)?;
                self.remember(&uid);
                Ok(uid)
            }
        }
    }

    /// Why Locate found no Active key named `name`: none at all, or only unusable ones.
    async fn why_none_active(&self, name: &str) -> BackendError {
        let any = match self.locate(name, false).await {
            Ok(u) => u,
            Err(e) => return e,
        };
        if any.is_empty() {
            return BackendError::KeyNotFound(format!(
                "the KMIP server has no symmetric key named {name:?} that this client may use; create an AES-256 key with that name (usage Encrypt and Decrypt), activate it, and make the client certificate's identity its owner or allow it by policy"
            ));
        }
        let states: Vec<String> = match self.attributes_of(&any).await {
            Ok(found) => found
                .iter()
                .map(|(u, a)| format!("{u}: {:?}", a.state.unwrap_or(State::Unknown(0))))
                .collect(),
            Err(e) => return e,
        };
        let all_destroyed = states.iter().all(|s| s.contains("Destroyed"));
        let detail = format!(
            "no key named {name:?} is Active on the KMIP server ({})",
            states.join(", ")
        );
        if all_destroyed {
            BackendError::KeyNotFound(detail)
        } else {
            BackendError::KeyDisabled(format!(
                "{detail}; activate a key with this name (a Pre-Active key needs Activate)"
            ))
        }
    }

    fn remember(&self, uid: &str) {
        let mut v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() >= VERIFIED_CAP {
            v.clear();
        }
        v.insert(uid.to_string());
    }

    /// With --kmip-key-name, a ciphertext may only name keys of that name: a crafted one must not
    /// make the plugin decrypt with another key the client can use.
    async fn check_owner(&self, uid: &str) -> Result<(), BackendError> {
        let Selector::Name(name) = &self.key else {
            return Ok(());
        };
        if self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(uid)
        {
            return Ok(());
        }
        // A Re-key moves the Name to the replacement key: follow Replacement Object Links to a
        // key that carries the Name.
        let mut at = uid.to_string();
        for _ in 0..MAX_REKEY_HOPS {
            let a = self.attributes_named(&at, &["Name", "Link"]).await?;
            if a.names.iter().any(|n| n == name) {
                self.remember(uid);
                return Ok(());
            }
            match a.replacement {
                Some(next) if valid_uid(&next) && next != at => at = next,
                _ => break,
            }
        }
        Err(BackendError::InvalidCiphertext(format!(
            "the ciphertext names KMIP key {uid:?}, which is not named {name:?} (nor replaced by a key of that name)"
        )))
    }

    async fn encrypt_once(
        &self,
        uid: &str,
        plaintext: &[u8],
        client_iv: bool,
    ) -> Result<messages::Encrypted, BackendError> {
        let iv = client_iv.then(|| {
            let mut iv = [0u8; CLIENT_IV_LEN];
            rand::thread_rng().fill_bytes(&mut iv);
            iv
        });
        let payload = self
            .one(
                messages::encrypt(uid, plaintext, iv.as_ref().map(|v| &v[..])),
                &format!("Encrypt with key {uid:?}"),
            )
            .await?;
        let mut e = messages::encrypted(&payload)
            .ok_or_else(|| BackendError::Other("the KMIP Encrypt answer has no Data".into()))?;
        if let Some(iv) = iv {
            e.iv = Some(iv.to_vec());
        }
        Ok(e)
    }
}

fn into_payload(o: Option<Outcome>, what: &str) -> Result<ttlv::Item, BackendError> {
    match o {
        Some(Outcome::Success(p)) => Ok(p),
        Some(Outcome::Failed { reason, message }) => {
            Err(messages::classify_failure(reason, &message, what))
        }
        Some(Outcome::Other(status)) => Err(BackendError::Unavailable(format!(
            "the KMIP server answered {what} with Result Status {status:#x} (pending or undone)"
        ))),
        None => Err(messages::not_kmip("no batch item")),
    }
}

fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= MAX_KEY_REF && uid.chars().all(|c| c.is_ascii_graphic())
}

/// Orders keys so that the newest is the greatest: Activation Date, then Initial Date, then the
/// unique identifier (numerically when both are numbers, as PyKMIP's and many servers' are).
fn newest_order(ua: &str, a: &KeyAttributes, ub: &str, b: &KeyAttributes) -> std::cmp::Ordering {
    a.activation_date
        .cmp(&b.activation_date)
        .then(a.initial_date.cmp(&b.initial_date))
        .then(ua.len().cmp(&ub.len()))
        .then(ua.cmp(ub))
}

/// The key lifecycle rules (docs/security.md) for a key the server described.
fn usable(uid: &str, a: &KeyAttributes) -> Result<(), BackendError> {
    match a.state {
        Some(State::Active) => {}
        Some(State::PreActive) => {
            return Err(BackendError::KeyDisabled(format!(
                "KMIP key {uid:?} is Pre-Active: activate it"
            )))
        }
        Some(s @ (State::Deactivated | State::Compromised)) => {
            return Err(BackendError::KeyDisabled(format!(
                "KMIP key {uid:?} is {s:?}"
            )))
        }
        Some(s @ (State::Destroyed | State::DestroyedCompromised)) => {
            return Err(BackendError::KeyNotFound(format!(
                "KMIP key {uid:?} is {s:?}"
            )))
        }
        Some(State::Unknown(n)) => {
            return Err(BackendError::Other(format!(
                "KMIP key {uid:?} is in unknown state {n}"
            )))
        }
        None => {
            return Err(BackendError::Other(format!(
                "the KMIP server did not return the State of key {uid:?}"
            )))
        }
    }
    match a.algorithm {
        Some(messages::ALGORITHM_AES) | None => Ok(()),
        Some(other) => Err(config(format!(
            "KMIP key {uid:?} has Cryptographic Algorithm {other:#x}; the plugin needs an AES key"
        ))),
    }
}

fn blob(iv: &[u8], tag: &[u8], data: &[u8]) -> Result<Vec<u8>, BackendError> {
    if iv.is_empty() || iv.len() > 64 || tag.len() < 12 || tag.len() > 16 {
        return Err(BackendError::Other(format!(
            "the KMIP server returned an IV of {} bytes and a tag of {} bytes; expected AES-GCM",
            iv.len(),
            tag.len()
        )));
    }
    let mut out = Vec::with_capacity(3 + iv.len() + tag.len() + data.len());
    out.push(BLOB_V1);
    out.push(iv.len() as u8);
    out.extend_from_slice(iv);
    out.push(tag.len() as u8);
    out.extend_from_slice(tag);
    out.extend_from_slice(data);
    Ok(out)
}

/// (IV, tag, ciphertext) of a wrapped blob.
fn parse_blob(b: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (&version, rest) = b.split_first()?;
    if version != BLOB_V1 {
        return None;
    }
    let (&iv_len, rest) = rest.split_first()?;
    let iv_len = usize::from(iv_len);
    if iv_len == 0 || rest.len() < iv_len {
        return None;
    }
    let (iv, rest) = rest.split_at(iv_len);
    let (&tag_len, rest) = rest.split_first()?;
    let tag_len = usize::from(tag_len);
    if !(12..=16).contains(&tag_len) || rest.len() <= tag_len {
        return None;
    }
    let (tag, data) = rest.split_at(tag_len);
    Some((iv, tag, data))
}

#[async_trait]
impl Backend for KmipBackend {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn current_key(&self) -> Result<KeyIdentity, BackendError> {
        let uid = self.resolve().await?;
        Ok(KeyIdentity {
            key_id: uid.clone(),
            key_ref: uid,
        })
    }

    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        let uid = self.resolve().await?;
        let client_iv = self.client_iv.load(Ordering::Relaxed);
        let mut e = self.encrypt_once(&uid, plaintext, client_iv).await;
        let fallback = match &e {
            Ok(enc) => !client_iv && enc.iv.is_none(),
            Err(BackendError::Config(_)) => !client_iv,
            Err(_) => false,
        };
        if fallback {
            tracing::warn!(endpoint = %self.pool.endpoint(), "the KMIP server does not choose AES-GCM IVs itself; using random 96-bit IVs from the plugin");
            self.client_iv.store(true, Ordering::Relaxed);
            e = self.encrypt_once(&uid, plaintext, true).await;
        }
        let e = e?;
        let (Some(iv), Some(tag)) = (e.iv.as_deref(), e.tag.as_deref()) else {
            return Err(BackendError::Other(
                "the KMIP Encrypt answer lacks the IV or the authentication tag; the server must support KMIP 1.4 AES-GCM".into(),
            ));
        };
        Ok(WrappedKey {
            key_ref: uid.clone(),
            key_id: uid,
            ciphertext: blob(iv, tag, &e.data)?,
        })
    }

    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError> {
        let (iv, tag, data) = parse_blob(ciphertext).ok_or_else(|| {
            BackendError::InvalidCiphertext("not a KMIP-wrapped key of this plugin".into())
        })?;
        if !valid_uid(key_ref) {
            return Err(BackendError::InvalidCiphertext(
                "the ciphertext's KMIP key reference is not a valid Unique Identifier".into(),
            ));
        }
        self.check_owner(key_ref).await?;
        let mut payload = self
            .one(
                messages::decrypt(key_ref, data, iv, tag),
                &format!("Decrypt with key {key_ref:?}"),
            )
            .await?;
        let plain = messages::decrypted(&payload).map(|p| Zeroizing::new(p.to_vec()));
        payload.wipe();
        plain.ok_or_else(|| BackendError::Other("the KMIP Decrypt answer has no Data".into()))
    }
}

/// `kms-plugin serve --backend kmip`: builds the backend and looks at the key once; an outage
/// leaves the plugin starting unhealthy, a permanent failure stops start-up with the cause.
pub async fn from_args(args: &KmipArgs) -> Result<std::sync::Arc<dyn Backend>, BackendError> {
    let backend = KmipBackend::new(args)?;
    match backend.current_key().await {
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, "the KMIP server is not reachable yet; starting unhealthy and retrying")
        }
        other => {
            other?;
        }
    }
    Ok(std::sync::Arc::new(backend))
}

/// Fuzzing entry point: arbitrary bytes through the TTLV decoder, Response Message parsing and
/// the result table for each operation, and the wrapped-blob parser. Never panics.
#[doc(hidden)]
pub fn interpret_response_for_fuzzing(bytes: &[u8]) -> Vec<String> {
    let mut out = vec![format!(
        "{:?}",
        parse_blob(bytes).map(|(i, t, d)| (i.len(), t.len(), d.len()))
    )];
    if let Ok(header) = <[u8; 8]>::try_from(bytes.get(..8).unwrap_or_default()) {
        out.push(format!("{:?}", ttlv::message_len(&header)));
    }
    let Ok(root) = ttlv::decode(bytes) else {
        out.push("not TTLV".into());
        return out;
    };
    let ops = [
        messages::op::LOCATE,
        messages::op::GET_ATTRIBUTES,
        messages::op::ENCRYPT,
        messages::op::DECRYPT,
    ];
    for op in ops {
        match messages::parse_response(&root, &[op]) {
            Ok(outcomes) => {
                for o in outcomes {
                    let text = match o {
                        Outcome::Success(p) => format!(
                            "{:?} {:?} {:?}",
                            messages::located(&p).len(),
                            messages::key_attributes(&p).state,
                            messages::encrypted(&p).map(|e| e.data.len())
                        ),
                        Outcome::Failed { reason, message } => {
                            messages::classify_failure(reason, &message, "fuzz").to_string()
                        }
                        Outcome::Other(s) => format!("status {s}"),
                    };
                    out.push(text);
                }
            }
            Err(e) => out.push(e.to_string()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip_and_reject_garbage() {
        let b = blob(&[1; 16], &[2; 16], &[3; 32]).unwrap();
        assert_eq!(
            parse_blob(&b),
            Some((&[1u8; 16][..], &[2u8; 16][..], &[3u8; 32][..]))
        );
        for cut in 0..b.len() - 32 {
            assert!(parse_blob(&b[..cut]).is_none(), "{cut}");
        }
        let mut other = b.clone();
        other[0] = 2;
        assert!(parse_blob(&other).is_none());
        assert!(parse_blob(&[]).is_none());
        assert!(blob(&[], &[0; 16], b"x").is_err());
        assert!(blob(&[0; 12], &[0; 8], b"x").is_err());
    }

    #[test]
    fn newest_key_wins() {
        let at = |act, init| KeyAttributes {
            activation_date: act,
            initial_date: init,
            ..Default::default()
        };
        use std::cmp::Ordering::*;
        assert_eq!(
            newest_order("1", &at(Some(5), Some(1)), "2", &at(Some(4), Some(2))),
            Greater
        );
        assert_eq!(
            newest_order("1", &at(Some(5), Some(1)), "2", &at(Some(5), Some(2))),
            Less
        );
        // Same second: the later unique identifier, numerically.
        assert_eq!(
            newest_order("9", &at(Some(5), Some(5)), "10", &at(Some(5), Some(5))),
            Less
        );
    }

    #[test]
    fn lifecycle_states() {
        let s = |st| KeyAttributes {
            state: Some(st),
            algorithm: Some(messages::ALGORITHM_AES),
            ..Default::default()
        };
        assert!(usable("1", &s(State::Active)).is_ok());
        for st in [State::PreActive, State::Deactivated, State::Compromised] {
            assert!(matches!(
                usable("1", &s(st)),
                Err(BackendError::KeyDisabled(_))
            ));
        }
        for st in [State::Destroyed, State::DestroyedCompromised] {
            assert!(matches!(
                usable("1", &s(st)),
                Err(BackendError::KeyNotFound(_))
            ));
        }
        let mut rsa = s(State::Active);
        rsa.algorithm = Some(4);
        assert!(matches!(usable("1", &rsa), Err(BackendError::Config(_))));
    }

    /// Every single-byte change and every truncation of a real-shaped answer is handled.
    #[test]
    fn mutated_answers_never_panic() {
        use messages::tag;
        use ttlv::{Item, Value};
        let answer = Item::structure(
            tag::RESPONSE_MESSAGE,
            vec![
                Item::structure(
                    tag::RESPONSE_HEADER,
                    vec![Item::new(tag::BATCH_COUNT, Value::Integer(1))],
                ),
                Item::structure(
                    tag::BATCH_ITEM,
                    vec![
                        Item::new(tag::OPERATION, Value::Enumeration(messages::op::ENCRYPT)),
                        Item::new(tag::RESULT_STATUS, Value::Enumeration(0)),
                        Item::structure(
                            tag::RESPONSE_PAYLOAD,
                            vec![
                                Item::new(tag::UNIQUE_IDENTIFIER, Value::TextString("1".into())),
                                Item::new(tag::DATA, Value::ByteString(vec![7; 32])),
                                Item::new(tag::IV_COUNTER_NONCE, Value::ByteString(vec![1; 16])),
                            ],
                        ),
                    ],
                ),
            ],
        )
        .encode();
        assert!(interpret_response_for_fuzzing(&answer)
            .iter()
            .any(|m| m.contains("Some(32)")));
        for i in 0..answer.len() {
            for bit in [0x01u8, 0x80, 0xFF] {
                let mut m = answer.clone();
                m[i] ^= bit;
                let _ = interpret_response_for_fuzzing(&m);
            }
            let _ = interpret_response_for_fuzzing(&answer[..i]);
        }
    }

    #[test]
    fn arguments_are_checked() {
        let base = KmipArgs {
            kmip_endpoint: Some("127.0.0.1:5696".into()),
            kmip_key_name: Some("k8s".into()),
            kmip_timeout: Duration::from_secs(1),
            kmip_pool_size: 1,
            ..Default::default()
        };
        let e = KmipBackend::new(&base).unwrap_err().to_string();
        assert!(e.contains("--kmip-cert-file"), "{e}");
        let e = KmipBackend::new(&KmipArgs {
            kmip_key_name: None,
            ..base.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--kmip-key-name"), "{e}");
        let e = KmipBackend::new(&KmipArgs {
            kmip_endpoint: None,
            ..base
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--kmip-endpoint"), "{e}");
    }
}
