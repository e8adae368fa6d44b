//! A PKCS#11 token (HSM) as the remote KEK.
//!
//! - The token is chosen by label, the key by label (`CKO_SECRET_KEY`, `CKK_AES`); the key should be
//!   non-extractable and sensitive, and never leaves the token.
//! - Wrap = `CKM_AES_GCM` with a random 12-byte IV and the key label as associated data; the blob is
//!   `0x01 ‖ IV ‖ ciphertext ‖ tag`. Tokens without GCM can use `CKM_AES_KEY_WRAP_PAD` (RFC 5649)
//!   through `C_WrapKey`/`C_UnwrapKey` on a temporary session object holding 16 random bytes ‖ the
//!   secret: blob `0x02 ‖ wrapped`.
//! - key_id = `LABEL/HEX(CKA_ID)`; key_ref = label. Rotation = create a key under a new label and
//!   configure it; keep the old key on the token, since unwrap finds keys by the label stored in
//!   each ciphertext.
//! - PKCS#11 calls block, so they run on tokio's blocking pool; a pool of sessions (one per
//!   concurrent operation, up to `--pkcs11-sessions`) is shared. When the token drops sessions or
//!   the login (session closed, handle invalid, not logged in, library re-initialised, device
//!   removed), the pool is rebuilt and the operation retried once. A rejected PIN is fatal: it is
//!   reported and never tried again, because tokens lock the user after a few failures.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use super::{
    AuthEvent, AuthKind, Backend, BackendError, BackendEvents, KeyIdentity, SecretBytes, WrappedKey,
};

/// [`Backend::kind`] of this backend.
const KIND: &str = "pkcs11";

const GCM_TAG: u8 = 0x01;
const KWP_TAG: u8 = 0x02;
const IV_LEN: usize = 12;
const GCM_TAG_LEN: usize = 16;
/// Random prefix of the value wrapped with CKM_AES_KEY_WRAP_PAD.
const KWP_NONCE_LEN: usize = 16;

/// Which mechanism wraps.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pkcs11Mechanism {
    /// AES-GCM when the token offers it, else AES key wrap with padding.
    #[default]
    Auto,
    /// CKM_AES_GCM (encrypt/decrypt).
    AesGcm,
    /// CKM_AES_KEY_WRAP_PAD (wrap/unwrap of a temporary session object).
    AesKeyWrapPad,
}

/// Command-line options of the PKCS#11 backend (`--backend pkcs11`). The user PIN comes from
/// `--pkcs11-pin-file` or the environment variable `KMS_PLUGIN_PKCS11_PIN`, never from a flag.
#[derive(clap::Args, Debug, Clone, Default, serde::Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Pkcs11Args {
    /// Path of the token's PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so).
    #[arg(
        long = "pkcs11-module",
        env = "KMS_PLUGIN_PKCS11_MODULE",
        value_name = "PATH"
    )]
    pub pkcs11_module: Option<PathBuf>,
    /// Label of the token (selects the slot).
    #[arg(
        long = "pkcs11-token-label",
        env = "KMS_PLUGIN_PKCS11_TOKEN_LABEL",
        value_name = "LABEL"
    )]
    pub pkcs11_token_label: Option<String>,
    /// Label of the AES key that wraps. Rotate by creating a key with a new label and configuring it;
    /// keep the old key on the token.
    #[arg(
        long = "pkcs11-key-label",
        env = "KMS_PLUGIN_PKCS11_KEY_LABEL",
        value_name = "LABEL"
    )]
    pub pkcs11_key_label: Option<String>,
    /// File holding the user PIN (trailing newline ignored). Alternative: env KMS_PLUGIN_PKCS11_PIN.
    #[arg(
        long = "pkcs11-pin-file",
        env = "KMS_PLUGIN_PKCS11_PIN_FILE",
        value_name = "FILE"
    )]
    pub pkcs11_pin_file: Option<PathBuf>,
    /// Most PKCS#11 sessions (and so concurrent token operations) at once.
    #[arg(
        long = "pkcs11-sessions",
        env = "KMS_PLUGIN_PKCS11_SESSIONS",
        default_value_t = 8,
        value_name = "N"
    )]
    pub pkcs11_sessions: usize,
    /// Wrapping mechanism.
    #[arg(
        long = "pkcs11-mechanism",
        env = "KMS_PLUGIN_PKCS11_MECHANISM",
        value_enum,
        default_value_t
    )]
    pub pkcs11_mechanism: Pkcs11Mechanism,
}

/// Builds the PKCS#11 backend: loads the module, logs in, finds the key and checks one wrap/unwrap
/// round trip, so that every configuration mistake stops start-up with a clear error. Logins are
/// reported to `events`.
pub async fn from_args(
    args: &Pkcs11Args,
    events: Arc<dyn BackendEvents>,
) -> Result<Arc<dyn Backend>, BackendError> {
    let pin = read_pin(
        args.pkcs11_pin_file.as_deref(),
        std::env::var("KMS_PLUGIN_PKCS11_PIN").ok(),
    )?;
    let backend = Pkcs11Backend::open_with_events(args, pin, events).await?;
    let probe = backend.wrap(b"kms-plugin start-up check").await?;
    backend.unwrap(&probe.key_ref, &probe.ciphertext).await?;
    Ok(Arc::new(backend))
}

/// The PIN from the file (preferred) or the environment value.
pub fn read_pin(
    file: Option<&Path>,
    env: Option<String>,
) -> Result<Zeroizing<String>, BackendError> {
    let env = env.map(Zeroizing::new);
    if let Some(path) = file {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            BackendError::Config(format!(
                "cannot read the PKCS#11 PIN file {}: {e}",
                path.display()
            ))
        })?);
        let pin = text.trim_end_matches(['\r', '\n']);
        if pin.is_empty() {
            return Err(BackendError::Config(format!(
                "the PKCS#11 PIN file {} is empty",
                path.display()
            )));
        }
        return Ok(Zeroizing::new(pin.to_string()));
    }
    match env {
        Some(p) if !p.is_empty() => Ok(p),
        _ => Err(BackendError::Config(
            "no PKCS#11 PIN: pass --pkcs11-pin-file or set KMS_PLUGIN_PKCS11_PIN".into(),
        )),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mech {
    Gcm,
    KeyWrapPad,
}

struct State {
    ctx: Pkcs11,
    slot: Slot,
    /// Bumped on every pool rebuild, so that a stale session is never returned to the pool.
    epoch: u64,
    idle: Vec<Session>,
    logged_in: bool,
    /// Key handles by label; handles of token objects stay valid across sessions while logged in.
    keys: HashMap<String, ObjectHandle>,
}

struct Inner {
    module: PathBuf,
    token_label: String,
    key_label: Mutex<String>,
    pin: AuthPin,
    mech: Mech,
    state: Mutex<State>,
    /// Set once the token rejected the PIN; from then on nothing touches the token.
    fatal: Mutex<Option<BackendError>>,
    events: Arc<dyn BackendEvents>,
}

/// See the module documentation.
pub struct Pkcs11Backend {
    inner: Arc<Inner>,
    permits: Semaphore,
}

impl std::fmt::Debug for Pkcs11Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Backend")
            .field("module", &self.inner.module)
            .field("token_label", &self.inner.token_label)
            .field("key_label", &*self.inner.key_label.lock().unwrap())
            .field("mechanism", &self.inner.mech)
            .finish_non_exhaustive()
    }
}

fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// Errors after which a fresh session (and login) may succeed.
fn session_lost(e: &CkError) -> bool {
    matches!(
        rv(e),
        Some(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::CryptokiNotInitialized
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::DeviceError
                | RvError::SlotIdInvalid
        )
    )
}

fn pin_error(e: &CkError) -> bool {
    matches!(
        rv(e),
        Some(
            RvError::PinIncorrect
                | RvError::PinLocked
                | RvError::PinExpired
                | RvError::PinInvalid
                | RvError::PinLenRange
                | RvError::UserPinNotInitialized
        )
    )
}

fn map_err(what: &str, e: &CkError) -> BackendError {
    let msg = format!("PKCS#11 {what}: {e}");
    match rv(e) {
        _ if pin_error(e) => BackendError::Authentication(format!(
            "the token rejected the user PIN ({e}); not retrying, because tokens lock the user after \
             repeated failures. Fix the PIN file or KMS_PLUGIN_PKCS11_PIN and restart"
        )),
        Some(
            RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::DataInvalid
            | RvError::DataLenRange,
        ) => BackendError::InvalidCiphertext(msg),
        Some(
            RvError::MechanismInvalid
            | RvError::MechanismParamInvalid
            | RvError::KeyFunctionNotPermitted
            | RvError::KeyTypeInconsistent
            | RvError::KeySizeRange
            | RvError::WrappingKeyTypeInconsistent
            | RvError::UnwrappingKeyTypeInconsistent
            | RvError::TemplateInconsistent
            | RvError::TemplateIncomplete,
        ) => BackendError::Config(format!("{msg} (does the key allow this mechanism and operation?)")),
        _ if session_lost(e) => BackendError::Unavailable(msg),
        Some(RvError::DeviceMemory | RvError::HostMemory | RvError::SessionCount | RvError::GeneralError) => {
            BackendError::Unavailable(msg)
        }
        _ => BackendError::Other(msg),
    }
}

fn find_slot(ctx: &Pkcs11, token_label: &str) -> Result<Slot, BackendError> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| map_err("listing slots", &e))?;
    let mut labels = Vec::new();
    for slot in slots {
        if let Ok(info) = ctx.get_token_info(slot) {
            let label = info.label().trim_end().to_string();
            if label == token_label {
                return Ok(slot);
            }
            labels.push(label);
        }
    }
    Err(BackendError::Config(format!(
        "no PKCS#11 token labelled {token_label:?} (tokens present: {labels:?})"
    )))
}

fn initialize(ctx: &Pkcs11) -> Result<(), BackendError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Another part of this process (or a test) initialised the module already: share it.
        Err(e) if rv(&e) == Some(RvError::CryptokiAlreadyInitialized) => Ok(()),
        Err(e) => Err(map_err("C_Initialize", &e)),
        Ok(()) => Ok(()),
    }
}

impl Inner {
    fn check_fatal(&self) -> Result<(), BackendError> {
        match &*self.fatal.lock().unwrap() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// An idle session, or a new one (logging in first when needed).
    fn checkout(&self) -> Result<(Session, u64), BackendError> {
        self.check_fatal()?;
        let mut st = self.state.lock().unwrap();
        if let Some(s) = st.idle.pop() {
            return Ok((s, st.epoch));
        }
        // DoNotClose: after a re-initialisation a stale handle could name someone else's session,
        // so sessions are closed only explicitly, while known to be ours.
        let session = st
            .ctx
            .open_ro_session_no_drop(st.slot)
            .map_err(|e| map_err("C_OpenSession", &e))?;
        if !st.logged_in {
            let result = match session.login(UserType::User, Some(&self.pin)) {
                // The module's login is per application: someone else's login is ours too.
                Err(e) if rv(&e) == Some(RvError::UserAlreadyLoggedIn) => Ok(()),
                other => other.map_err(|e| (map_err("C_Login", &e), e)),
            };
            self.events.auth(AuthEvent {
                backend: KIND,
                kind: AuthKind::Login,
                outcome: result.as_ref().map(|_| ()).map_err(|(err, _)| err),
            });
            match result {
                Ok(()) => {}
                Err((err, e)) => {
                    if pin_error(&e) {
                        tracing::error!(error = %err, "PKCS#11 login refused; the backend stops using the token");
                        *self.fatal.lock().unwrap() = Some(err.clone());
                    }
                    let _ = session.close();
                    return Err(err);
                }
            }
            st.logged_in = true;
        }
        Ok((session, st.epoch))
    }

    fn checkin(&self, session: Session, epoch: u64) {
        let mut st = self.state.lock().unwrap();
        if st.epoch == epoch {
            st.idle.push(session);
        } else {
            // Opened before a rebuild: forget it without closing (see checkout).
            drop(session);
        }
    }

    /// Rebuilds the pool after `cause`, unless another thread already did for this epoch.
    fn reset(&self, epoch: u64, cause: &CkError) -> Result<(), BackendError> {
        let mut st = self.state.lock().unwrap();
        if st.epoch != epoch {
            return Ok(());
        }
        tracing::warn!(error = %cause, "PKCS#11 token dropped the session or login; reopening");
        let reinit = rv(cause) == Some(RvError::CryptokiNotInitialized);
        for s in st.idle.drain(..) {
            if !reinit {
                let _ = s.close();
            }
        }
        if reinit {
            initialize(&st.ctx)?;
        }
        st.slot = find_slot(&st.ctx, &self.token_label)?;
        st.epoch += 1;
        st.logged_in = false;
        st.keys.clear();
        Ok(())
    }

    fn find_key(&self, session: &Session, label: &str) -> Result<ObjectHandle, CkError> {
        if let Some(h) = self.state.lock().unwrap().keys.get(label) {
            return Ok(*h);
        }
        let handle = find_key_uncached(session, label)?;
        if let Some(h) = handle {
            self.state.lock().unwrap().keys.insert(label.to_string(), h);
        }
        // A missing key is reported by the caller; encode it as "no object" here.
        handle.ok_or(CkError::Pkcs11(
            RvError::KeyHandleInvalid,
            cryptoki::context::Function::FindObjects,
        ))
    }

    /// Runs `op` on a pooled session; rebuilds the pool and retries once when the token lost it.
    fn run<T>(
        &self,
        what: &str,
        op: impl Fn(&Inner, &Session) -> Result<T, OpError>,
    ) -> Result<T, BackendError> {
        for attempt in 0..2 {
            let (session, epoch) = self.checkout()?;
            match op(self, &session) {
                Ok(v) => {
                    self.checkin(session, epoch);
                    return Ok(v);
                }
                Err(OpError::Backend(e)) => {
                    self.checkin(session, epoch);
                    return Err(e);
                }
                Err(OpError::Ck(e)) if session_lost(&e) && attempt == 0 => {
                    drop(session);
                    self.reset(epoch, &e)?;
                }
                Err(OpError::Ck(e)) => {
                    if session_lost(&e) {
                        drop(session);
                    } else {
                        self.checkin(session, epoch);
                    }
                    return Err(map_err(what, &e));
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(st) = self.state.get_mut() {
            for s in st.idle.drain(..) {
                let _ = s.close();
            }
        }
    }
}

enum OpError {
    Ck(CkError),
    Backend(BackendError),
}

impl From<CkError> for OpError {
    fn from(e: CkError) -> Self {
        OpError::Ck(e)
    }
}

fn find_key_uncached(session: &Session, label: &str) -> Result<Option<ObjectHandle>, CkError> {
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    let found = session.find_objects(&template)?;
    Ok(found.first().copied())
}

fn key_missing(label: &str) -> BackendError {
    BackendError::KeyNotFound(format!(
        "no AES secret key labelled {label:?} on the PKCS#11 token"
    ))
}

/// key_id for a key: its label and CKA_ID (hex, or a digest of a long CKA_ID).
fn key_id(label: &str, id: &[u8]) -> String {
    if id.is_empty() {
        format!("{label}/-")
    } else if id.len() <= 32 {
        format!("{label}/{}", hex::encode(id))
    } else {
        format!("{label}/sha256:{}", &hex::encode(Sha256::digest(id))[..32])
    }
}

impl Pkcs11Backend {
    /// [`Pkcs11Backend::open_with_events`] without an event hook.
    pub async fn open(args: &Pkcs11Args, pin: Zeroizing<String>) -> Result<Self, BackendError> {
        Self::open_with_events(args, pin, super::no_events()).await
    }

    /// Loads the module, finds the token and the key, and logs in (blocking work on the blocking
    /// pool). Every login (the first one and those after the token dropped the session) is reported
    /// to `events`.
    pub async fn open_with_events(
        args: &Pkcs11Args,
        pin: Zeroizing<String>,
        events: Arc<dyn BackendEvents>,
    ) -> Result<Self, BackendError> {
        let module = args.pkcs11_module.clone().ok_or_else(|| {
            BackendError::Config("--pkcs11-module is required for --backend pkcs11".into())
        })?;
        let token_label = args
            .pkcs11_token_label
            .clone()
            .filter(|l| !l.is_empty())
            .ok_or_else(|| {
                BackendError::Config("--pkcs11-token-label is required for --backend pkcs11".into())
            })?;
        let key_label = args
            .pkcs11_key_label
            .clone()
            .filter(|l| !l.is_empty())
            .ok_or_else(|| {
                BackendError::Config("--pkcs11-key-label is required for --backend pkcs11".into())
            })?;
        if key_label.len() > 200 {
            return Err(BackendError::Config(
                "--pkcs11-key-label is longer than 200 bytes".into(),
            ));
        }
        let sessions = args.pkcs11_sessions.clamp(1, 256);
        let wanted = args.pkcs11_mechanism;
        let inner = tokio::task::spawn_blocking(move || -> Result<Inner, BackendError> {
            let ctx = Pkcs11::new(&module).map_err(|e| {
                BackendError::Config(format!("cannot load PKCS#11 module {}: {e}", module.display()))
            })?;
            initialize(&ctx)?;
            let slot = find_slot(&ctx, &token_label)?;
            let mechs = ctx.get_mechanism_list(slot).map_err(|e| map_err("C_GetMechanismList", &e))?;
            let has = |m: MechanismType| mechs.contains(&m);
            let mech = match wanted {
                Pkcs11Mechanism::AesGcm | Pkcs11Mechanism::Auto if has(MechanismType::AES_GCM) => Mech::Gcm,
                Pkcs11Mechanism::AesKeyWrapPad | Pkcs11Mechanism::Auto if has(MechanismType::AES_KEY_WRAP_PAD) => {
                    Mech::KeyWrapPad
                }
                _ => {
                    return Err(BackendError::Config(format!(
                        "token {token_label:?} offers neither CKM_AES_GCM nor CKM_AES_KEY_WRAP_PAD as requested \
                         ({wanted:?}); this backend needs one of them"
                    )))
                }
            };
            let pin = AuthPin::new(pin.as_str().into());
            Ok(Inner {
                module,
                token_label,
                key_label: Mutex::new(key_label),
                pin,
                mech,
                state: Mutex::new(State {
                    ctx,
                    slot,
                    epoch: 0,
                    idle: Vec::new(),
                    logged_in: false,
                    keys: HashMap::new(),
                }),
                fatal: Mutex::new(None),
                events,
            })
        })
        .await
        .map_err(|e| BackendError::Other(format!("PKCS#11 set-up task failed: {e}")))??;
        let backend = Pkcs11Backend {
            inner: Arc::new(inner),
            permits: Semaphore::new(sessions),
        };
        // Log in and find the key now, so that a wrong PIN or label fails start-up.
        backend.current_key().await?;
        tracing::info!(mechanism = ?backend.inner.mech, "PKCS#11 backend ready");
        Ok(backend)
    }

    /// Switches the wrapping key to another label on the same token (configuration reload). Data
    /// wrapped under earlier keys keeps unwrapping as long as those keys stay on the token.
    pub fn set_key_label(&self, label: impl Into<String>) {
        *self.inner.key_label.lock().unwrap() = label.into();
    }

    /// The mechanism in use (`CKM_AES_GCM` or `CKM_AES_KEY_WRAP_PAD`).
    pub fn mechanism_name(&self) -> &'static str {
        match self.inner.mech {
            Mech::Gcm => "CKM_AES_GCM",
            Mech::KeyWrapPad => "CKM_AES_KEY_WRAP_PAD",
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        self.inner.check_fatal()?;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| BackendError::Other("backend closed".into()))?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| BackendError::Other(format!("PKCS#11 task failed: {e}")))?
    }
}

fn seal(
    inner: &Inner,
    session: &Session,
    key: ObjectHandle,
    label: &str,
    pt: &[u8],
) -> Result<Vec<u8>, CkError> {
    match inner.mech {
        Mech::Gcm => {
            let mut iv = [0u8; IV_LEN];
            rand::thread_rng().fill_bytes(&mut iv);
            let mut iv_param = iv;
            let params = GcmParams::new(
                &mut iv_param,
                label.as_bytes(),
                ((GCM_TAG_LEN * 8) as u64).into(),
            )?;
            let ct = session.encrypt(&Mechanism::AesGcm(params), key, pt)?;
            let mut out = Vec::with_capacity(1 + IV_LEN + ct.len());
            out.push(GCM_TAG);
            out.extend_from_slice(&iv);
            out.extend_from_slice(&ct);
            Ok(out)
        }
        Mech::KeyWrapPad => {
            // RFC 5649 is deterministic: a random prefix makes equal secrets wrap differently.
            let mut value = Zeroizing::new(vec![0u8; KWP_NONCE_LEN]);
            rand::thread_rng().fill_bytes(&mut value);
            value.extend_from_slice(pt);
            // C_WrapKey wraps objects, not bytes: hold the secret briefly in a session object.
            let tmp = session.create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Value(value.to_vec()),
            ])?;
            let wrapped = session.wrap_key(&Mechanism::AesKeyWrapPad, key, tmp);
            let _ = session.destroy_object(tmp);
            let mut out = vec![KWP_TAG];
            out.extend_from_slice(&wrapped?);
            Ok(out)
        }
    }
}

fn open_blob(
    inner: &Inner,
    session: &Session,
    key: ObjectHandle,
    label: &str,
    blob: &[u8],
) -> Result<SecretBytes, OpError> {
    let bad = |m: &str| OpError::Backend(BackendError::InvalidCiphertext(m.to_string()));
    match (blob.first(), inner.mech) {
        (Some(&GCM_TAG), Mech::Gcm) => {
            if blob.len() < 1 + IV_LEN + GCM_TAG_LEN {
                return Err(bad("wrapped key too short"));
            }
            let mut iv = [0u8; IV_LEN];
            iv.copy_from_slice(&blob[1..1 + IV_LEN]);
            let params =
                GcmParams::new(&mut iv, label.as_bytes(), ((GCM_TAG_LEN * 8) as u64).into())?;
            match session.decrypt(&Mechanism::AesGcm(params), key, &blob[1 + IV_LEN..]) {
                Ok(pt) => Ok(SecretBytes::new(pt)),
                // SoftHSM (and others) report a GCM tag mismatch as CKR_GENERAL_ERROR.
                Err(e) if rv(&e) == Some(RvError::GeneralError) => Err(OpError::Backend(
                    BackendError::InvalidCiphertext(format!("the token refused to decrypt: {e}")),
                )),
                Err(e) => Err(e.into()),
            }
        }
        (Some(&KWP_TAG), Mech::KeyWrapPad) => {
            if blob.len() < 1 + 16 {
                return Err(bad("wrapped key too short"));
            }
            let tmp = session.unwrap_key(
                &Mechanism::AesKeyWrapPad,
                key,
                &blob[1..],
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::Token(false),
                    Attribute::Sensitive(false),
                    Attribute::Extractable(true),
                ],
            )?;
            let value = session.get_attributes(tmp, &[AttributeType::Value]);
            let _ = session.destroy_object(tmp);
            match value?.into_iter().next() {
                Some(Attribute::Value(v)) => {
                    let v = Zeroizing::new(v);
                    if v.len() < KWP_NONCE_LEN {
                        return Err(bad("unwrapped value too short"));
                    }
                    Ok(SecretBytes::new(v[KWP_NONCE_LEN..].to_vec()))
                }
                _ => Err(bad("token returned no value for the unwrapped key")),
            }
        }
        (Some(&GCM_TAG | &KWP_TAG), _) => Err(OpError::Backend(BackendError::Config(
            "wrapped key was made with another PKCS#11 mechanism than the one configured".into(),
        ))),
        _ => Err(bad("unknown wrapped-key format")),
    }
}

#[async_trait]
impl Backend for Pkcs11Backend {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn current_key(&self) -> Result<KeyIdentity, BackendError> {
        let label = self.inner.key_label.lock().unwrap().clone();
        self.blocking(move |inner| {
            inner.run("looking up the key", |inner, session| {
                // Always look again: the probe must notice a deleted key.
                let Some(handle) = find_key_uncached(session, &label)? else {
                    return Err(OpError::Backend(key_missing(&label)));
                };
                inner.state.lock().unwrap().keys.insert(label.clone(), handle);
                let attrs = session.get_attributes(
                    handle,
                    &[AttributeType::Id, AttributeType::Encrypt, AttributeType::Decrypt, AttributeType::Extractable],
                )?;
                let mut id = Vec::new();
                for a in attrs {
                    match a {
                        Attribute::Id(v) => id = v,
                        Attribute::Extractable(true) => {
                            tracing::warn!(key = %label, "the PKCS#11 key is extractable; mark it CKA_EXTRACTABLE=false")
                        }
                        Attribute::Encrypt(false) | Attribute::Decrypt(false) if inner.mech == Mech::Gcm => {
                            return Err(OpError::Backend(BackendError::Config(format!(
                                "PKCS#11 key {label:?} does not allow encrypt and decrypt (CKA_ENCRYPT/CKA_DECRYPT)"
                            ))))
                        }
                        _ => {}
                    }
                }
                Ok(KeyIdentity { key_id: key_id(&label, &id), key_ref: label.clone() })
            })
        })
        .await
    }

    async fn wrap(&self, plaintext: &[u8]) -> Result<WrappedKey, BackendError> {
        let label = self.inner.key_label.lock().unwrap().clone();
        let pt = Zeroizing::new(plaintext.to_vec());
        self.blocking(move |inner| {
            inner.run("wrapping", |inner, session| {
                let key = inner.find_key(session, &label).map_err(|e| match e {
                    CkError::Pkcs11(
                        RvError::KeyHandleInvalid,
                        cryptoki::context::Function::FindObjects,
                    ) => OpError::Backend(key_missing(&label)),
                    e => OpError::Ck(e),
                })?;
                let ct = seal(inner, session, key, &label, &pt)?;
                // Label the wrap with the CKA_ID of the object that actually wrapped.
                let id = match session.get_attributes(key, &[AttributeType::Id])?.pop() {
                    Some(Attribute::Id(id)) => id,
                    _ => Vec::new(),
                };
                Ok(WrappedKey {
                    key_ref: label.clone(),
                    key_id: key_id(&label, &id),
                    ciphertext: ct,
                })
            })
        })
        .await
    }

    async fn unwrap(&self, key_ref: &str, ciphertext: &[u8]) -> Result<SecretBytes, BackendError> {
        let label = key_ref.to_string();
        let blob = ciphertext.to_vec();
        self.blocking(move |inner| {
            inner.run("unwrapping", |inner, session| {
                let key = inner.find_key(session, &label).map_err(|e| match e {
                    CkError::Pkcs11(
                        RvError::KeyHandleInvalid,
                        cryptoki::context::Function::FindObjects,
                    ) => OpError::Backend(key_missing(&label)),
                    e => OpError::Ck(e),
                })?;
                open_blob(inner, session, key, &label, &blob)
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_sources() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pin");
        std::fs::write(&f, "1234\n").unwrap();
        assert_eq!(
            read_pin(Some(&f), Some("env".into())).unwrap().as_str(),
            "1234"
        );
        assert_eq!(read_pin(None, Some("env".into())).unwrap().as_str(), "env");
        assert!(matches!(read_pin(None, None), Err(BackendError::Config(_))));
        std::fs::write(&f, "\n").unwrap();
        let e = read_pin(Some(&f), None).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn key_ids() {
        assert_eq!(key_id("kek-1", &[0x01, 0xab]), "kek-1/01ab");
        assert_eq!(key_id("kek-1", &[]), "kek-1/-");
        assert!(key_id("k", &[7u8; 40]).starts_with("k/sha256:"));
    }

    #[test]
    fn error_mapping() {
        use cryptoki::context::Function;
        let e = |rv| map_err("x", &CkError::Pkcs11(rv, Function::Decrypt));
        assert!(matches!(
            e(RvError::PinIncorrect),
            BackendError::Authentication(_)
        ));
        assert!(e(RvError::PinIncorrect)
            .to_string()
            .contains("not retrying"));
        assert!(matches!(
            e(RvError::EncryptedDataInvalid),
            BackendError::InvalidCiphertext(_)
        ));
        assert!(matches!(
            e(RvError::SessionHandleInvalid),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(
            e(RvError::MechanismInvalid),
            BackendError::Config(_)
        ));
        assert!(session_lost(&CkError::Pkcs11(
            RvError::UserNotLoggedIn,
            Function::Encrypt
        )));
        assert!(!session_lost(&CkError::Pkcs11(
            RvError::PinIncorrect,
            Function::Login
        )));
    }
}
