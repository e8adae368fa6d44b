//! A PKCS#11 token (HSM) as the remote KEK.
//!
//! - Wrap = `CKM_AES_GCM` with a random 12-byte IV and the key label as associated data; the blob is
//!   `0x01 ‖ IV ‖ ciphertext ‖ tag`. Tokens without GCM can use `CKM_AES_KEY_WRAP_PAD` (RFC 5649)
//!   through `C_WrapKey`/`C_UnwrapKey` on a temporary session object holding 16 random bytes ‖ the
//!   secret: blob `0x02 ‖ wrapped`.
//! - The token is chosen by label, the key by label (`CKO_SECRET_KEY`, `CKK_AES`); the key should be
//!   non-extractable and sensitive, and never leaves the token. A label that matches two or more
//!   keys is refused (which one wraps would depend on the order the token lists them in).
//! - key_id = `LABEL/HEX(CKA_ID)`; key_ref = label. Rotation = create a key under a new label and
//!   configure it; keep the old key on the token, since unwrap finds keys by the label stored in
//!   each ciphertext.
//! - PKCS#11 calls block, so they run on tokio's blocking pool; a pool of sessions (one per
//!   concurrent operation, up to `--pkcs11-sessions`) is shared. A call holds its session permit
//!   until the token returns, even when its caller timed out, so a hung token ties up at most
//!   `--pkcs11-sessions` threads and sessions; once all of them are stuck, calls fail at once.
//! - The login belongs to the application and the token can drop it (another user of the module
//!   logs out, the token resets its state). A search from a session that is not logged in finds
//!   no private key and reports no error, so an empty search is "key not found" only from a
//!   session that C_GetSessionInfo shows logged in; otherwise the backend logs in again and
//!   retries once. When the token drops sessions (session closed, handle invalid, library
//!   re-initialised, device removed), the pool is rebuilt and the operation retried once.
//! - A rejected PIN is fatal: it is reported and never tried again, because tokens lock the user
//!   after a few failures.
//! - The token may be absent at start-up: the constructor fails only for mistakes that cannot fix
//!   themselves; otherwise the engine's probe reports the token's absence and the backend connects
//!   (initialise, find the token, choose the mechanism, log in) once it is there.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicIsize, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
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

/// Builds the PKCS#11 backend (see [`Pkcs11Backend::open_with_events`]); logins are reported to
/// `events`. The wrap/unwrap round trip of the start-up check is the engine's start-up probe.
pub async fn from_args(
    args: &Pkcs11Args,
    events: Arc<dyn BackendEvents>,
) -> Result<Arc<dyn Backend>, BackendError> {
    let pin = read_pin(
        args.pkcs11_pin_file.as_deref(),
        std::env::var("KMS_PLUGIN_PKCS11_PIN").ok(),
    )?;
    Ok(Arc::new(
        Pkcs11Backend::open_with_events(args, pin, events).await?,
    ))
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

/// Calls that may wait for a session on top of the `--pkcs11-sessions` running ones; more are
/// refused at once (see [`Gate`]).
const QUEUE: usize = 32;
/// How long the constructor waits for its first contact with the token before leaving the token
/// to the engine's probe.
const FIRST_CONTACT_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mech {
    Gcm,
    KeyWrapPad,
}

impl Mech {
    fn name(self) -> &'static str {
        match self {
            Mech::Gcm => "CKM_AES_GCM",
            Mech::KeyWrapPad => "CKM_AES_KEY_WRAP_PAD",
        }
    }
}

/// Everything that changes as the token comes and goes. Guarded by one mutex; PKCS#11 calls that
/// open sessions, log in or find the token run under it, so they never race each other.
struct State {
    ctx: Pkcs11,
    /// C_Initialize succeeded, and the module has not answered CKR_CRYPTOKI_NOT_INITIALIZED since.
    initialized: bool,
    /// Bumped when the module has to be initialised again. Sessions of an older generation may
    /// name someone else's session by now: they are forgotten, never closed.
    generation: u64,
    /// The token's slot and the mechanism chosen for it, once found (again after a rebuild).
    token: Option<(Slot, Mech)>,
    /// Bumped on every pool rebuild, so that a stale session is never returned to the pool.
    epoch: u64,
    idle: Vec<Session>,
    /// This pool logged in. The login belongs to the application, so every session shares it,
    /// and the token (or anyone else using the module in this process) can drop it for all.
    logged_in: bool,
    /// Bumped on every login of ours: an empty search is only an answer if no login of ours
    /// happened while it ran (it may have run while logged out).
    logins: u64,
    /// Key handles by label; handles of private token objects stay valid while logged in.
    keys: HashMap<String, ObjectHandle>,
}

/// A session checked out of the pool, with what was true when it was.
struct Lease {
    session: Session,
    epoch: u64,
    generation: u64,
    logins: u64,
    mech: Mech,
}

struct Inner {
    module: PathBuf,
    token_label: String,
    key_label: Mutex<String>,
    pin: AuthPin,
    wanted: Pkcs11Mechanism,
    /// The mechanism of the last token found (0: none yet), readable without the state lock.
    mech_seen: AtomicU8,
    state: Mutex<State>,
    /// Set once the token rejected the PIN; from then on nothing touches the token.
    fatal: Mutex<Option<BackendError>>,
    events: Arc<dyn BackendEvents>,
}

/// Admission of calls to the token. A call holds a session permit for as long as its PKCS#11
/// work runs on the blocking pool, even after its caller gave up (timeout): a token that hangs
/// ties up at most `--pkcs11-sessions` threads and sessions. At most [`QUEUE`] more calls wait
/// for a permit; beyond that, and whenever every permit is held by a call whose caller already
/// gave up (the token is not answering), calls fail at once with `Unavailable`.
struct Gate {
    sessions: usize,
    permits: Arc<Semaphore>,
    /// Calls admitted and not finished: waiting for a permit, or running.
    pending: AtomicUsize,
    /// Running calls whose caller gave up (signed: see [`Caller`]).
    abandoned: AtomicIsize,
}

/// One admitted call, counted in [`Gate::pending`] until dropped.
struct Admitted(Arc<Gate>);

impl Admitted {
    fn new(gate: &Arc<Gate>) -> Result<Self, BackendError> {
        let before = gate.pending.fetch_add(1, Ordering::SeqCst);
        let admitted = Admitted(gate.clone());
        if before >= gate.sessions + QUEUE {
            return Err(BackendError::Unavailable(format!(
                "{before} PKCS#11 operations are already running or waiting (--pkcs11-sessions {} \
                 plus a queue of {QUEUE}); refusing more until the token catches up",
                gate.sessions
            )));
        }
        Ok(admitted)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

const RUNNING: u8 = 0;
const ABANDONED: u8 = 1;
const DONE: u8 = 2;

/// Marks a running call abandoned when its caller drops it before it finished.
struct Caller {
    gate: Arc<Gate>,
    call: Arc<AtomicU8>,
}

impl Drop for Caller {
    fn drop(&mut self) {
        // The count may dip below the truth for an instant (the worker can finish between these
        // two steps), never above it: a call is never refused because of a call that returned.
        if self
            .call
            .compare_exchange(RUNNING, ABANDONED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.gate.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Marks a call done when its PKCS#11 work returns (or panics), on the blocking thread.
struct Worker {
    gate: Arc<Gate>,
    call: Arc<AtomicU8>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.call.swap(DONE, Ordering::SeqCst) == ABANDONED {
            self.gate.abandoned.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// What a running call holds until its PKCS#11 work returns (dropped in this order).
struct Held {
    _worker: Worker,
    _admitted: Admitted,
    _permit: OwnedSemaphorePermit,
}

impl Gate {
    fn new(sessions: usize) -> Arc<Self> {
        Arc::new(Gate {
            sessions,
            permits: Arc::new(Semaphore::new(sessions)),
            pending: AtomicUsize::new(0),
            abandoned: AtomicIsize::new(0),
        })
    }

    /// Admits one call: a session permit, after waiting for one if need be. The [`Caller`] stays
    /// with the caller (dropping it early marks the call abandoned), the [`Held`] goes with the
    /// work.
    async fn enter(self: &Arc<Self>) -> Result<(Caller, Held), BackendError> {
        let closed = || BackendError::Other("backend closed".into());
        let admitted = Admitted::new(self)?;
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(closed()),
            Err(TryAcquireError::NoPermits) => {
                let stuck = self.abandoned.load(Ordering::SeqCst);
                if stuck >= self.sessions as isize {
                    return Err(BackendError::Unavailable(format!(
                        "the PKCS#11 token is not answering: all {stuck} sessions are still in calls \
                         that their callers gave up on; failing at once until one returns (check \
                         the HSM, its connection and its logs)"
                    )));
                }
                self.permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| closed())?
            }
        };
        let call = Arc::new(AtomicU8::new(RUNNING));
        let caller = Caller {
            gate: self.clone(),
            call: call.clone(),
        };
        let held = Held {
            _worker: Worker {
                gate: self.clone(),
                call,
            },
            _admitted: admitted,
            _permit: permit,
        };
        Ok((caller, held))
    }
}

/// See the module documentation.
pub struct Pkcs11Backend {
    inner: Arc<Inner>,
    gate: Arc<Gate>,
}

impl std::fmt::Debug for Pkcs11Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Backend")
            .field("module", &self.inner.module)
            .field("token_label", &self.inner.token_label)
            .field("key_label", &*self.inner.key_label.lock().unwrap())
            .field("mechanism", &self.mechanism_name())
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
                | RvError::TokenNotRecognized
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
        Some(
            RvError::DeviceMemory
            | RvError::HostMemory
            | RvError::SessionCount
            | RvError::GeneralError
            | RvError::FunctionFailed,
        ) => BackendError::Unavailable(msg),
        _ => BackendError::Other(msg),
    }
}

/// The slot holding the token labelled `token_label`, or the labels of the tokens present.
fn find_slot(ctx: &Pkcs11, token_label: &str) -> Result<Result<Slot, Vec<String>>, CkError> {
    let mut labels = Vec::new();
    for slot in ctx.get_slots_with_token()? {
        if let Ok(info) = ctx.get_token_info(slot) {
            let label = info.label().trim_end().to_string();
            if label == token_label {
                return Ok(Ok(slot));
            }
            labels.push(label);
        }
    }
    Ok(Err(labels))
}

/// The mechanism to wrap with. Asks the token about the two this backend can use and nothing
/// else: listing every mechanism makes cryptoki log each type it does not know at ERROR level.
fn choose_mechanism(
    ctx: &Pkcs11,
    slot: Slot,
    wanted: Pkcs11Mechanism,
) -> Result<Option<Mech>, CkError> {
    let offers = |mech: Mech| -> Result<bool, CkError> {
        let ty = match mech {
            Mech::Gcm => MechanismType::AES_GCM,
            Mech::KeyWrapPad => MechanismType::AES_KEY_WRAP_PAD,
        };
        match ctx.get_mechanism_info(slot, ty) {
            Ok(info) => Ok(match mech {
                Mech::Gcm => info.encrypt() && info.decrypt(),
                Mech::KeyWrapPad => info.wrap() && info.unwrap(),
            }),
            Err(e) if rv(&e) == Some(RvError::MechanismInvalid) => Ok(false),
            Err(e) => Err(e),
        }
    };
    let candidates: &[Mech] = match wanted {
        Pkcs11Mechanism::Auto => &[Mech::Gcm, Mech::KeyWrapPad],
        Pkcs11Mechanism::AesGcm => &[Mech::Gcm],
        Pkcs11Mechanism::AesKeyWrapPad => &[Mech::KeyWrapPad],
    };
    for &mech in candidates {
        if offers(mech)? {
            return Ok(Some(mech));
        }
    }
    Ok(None)
}

fn initialize(ctx: &Pkcs11) -> Result<(), CkError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Another part of this process (or a test) initialised the module already: share it.
        Err(e) if rv(&e) == Some(RvError::CryptokiAlreadyInitialized) => Ok(()),
        other => other,
    }
}

impl Inner {
    fn check_fatal(&self) -> Result<(), BackendError> {
        match &*self.fatal.lock().unwrap() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Initialises the module and finds the token when that is not done yet (at start-up, after
    /// a rebuild). The token's absence is transient: it may be plugged in or come up later.
    fn connect(&self, st: &mut State) -> Result<(Slot, Mech), BackendError> {
        if let (true, Some(token)) = (st.initialized, st.token) {
            return Ok(token);
        }
        let lost = |st: &mut State, what: &str, e: CkError| {
            if rv(&e) == Some(RvError::CryptokiNotInitialized) {
                st.initialized = false;
                st.generation += 1;
            }
            map_err(what, &e)
        };
        if !st.initialized {
            initialize(&st.ctx).map_err(|e| map_err("C_Initialize", &e))?;
            st.initialized = true;
        }
        let slot = match find_slot(&st.ctx, &self.token_label) {
            Ok(Ok(slot)) => slot,
            Ok(Err(labels)) => {
                return Err(BackendError::Unavailable(format!(
                    "no PKCS#11 token labelled {:?} is present (tokens present: {labels:?}); \
                     waiting for it. If it never appears, check --pkcs11-token-label and the \
                     module's configuration",
                    self.token_label
                )))
            }
            Err(e) => return Err(lost(st, "listing slots", e)),
        };
        let mech = match choose_mechanism(&st.ctx, slot, self.wanted) {
            Ok(Some(mech)) => mech,
            Ok(None) => {
                return Err(BackendError::Config(format!(
                    "token {:?} offers neither CKM_AES_GCM nor CKM_AES_KEY_WRAP_PAD as requested \
                     ({:?}); this backend needs one of them",
                    self.token_label, self.wanted
                )))
            }
            Err(e) => return Err(lost(st, "C_GetMechanismInfo", e)),
        };
        self.mech_seen.store(
            match mech {
                Mech::Gcm => 1,
                Mech::KeyWrapPad => 2,
            },
            Ordering::Relaxed,
        );
        tracing::info!(token = %self.token_label, mechanism = mech.name(), "PKCS#11 token found");
        st.token = Some((slot, mech));
        Ok((slot, mech))
    }

    /// Logs in with the user PIN on `session` (the login covers every session of this process).
    /// A rejected PIN is fatal: it is remembered and the token is never asked again.
    fn login(&self, st: &mut State, session: &Session) -> Result<(), BackendError> {
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
            Ok(()) => {
                st.logged_in = true;
                st.logins += 1;
                // Handles of private objects do not survive a logout.
                st.keys.clear();
                Ok(())
            }
            Err((err, e)) => {
                if pin_error(&e) {
                    tracing::error!(error = %err, "PKCS#11 login refused; the backend stops using the token");
                    *self.fatal.lock().unwrap() = Some(err.clone());
                }
                Err(err)
            }
        }
    }

    /// An idle session, or a new one (connecting and logging in first when needed).
    fn checkout(&self) -> Result<Lease, BackendError> {
        self.check_fatal()?;
        let mut st = self.state.lock().unwrap();
        let (slot, mech) = self.connect(&mut st)?;
        let session = match st.idle.pop() {
            Some(s) => s,
            None => {
                // DoNotClose: after a re-initialisation a stale handle could name someone else's
                // session, so sessions are closed only explicitly, while known to be ours.
                let session = match st.ctx.open_ro_session_no_drop(slot) {
                    Ok(s) => s,
                    Err(e) => {
                        if session_lost(&e) {
                            self.forget(&mut st, &e);
                        }
                        return Err(map_err("C_OpenSession", &e));
                    }
                };
                if !st.logged_in {
                    if let Err(e) = self.login(&mut st, &session) {
                        let _ = session.close();
                        return Err(e);
                    }
                }
                session
            }
        };
        Ok(Lease {
            session,
            epoch: st.epoch,
            generation: st.generation,
            logins: st.logins,
            mech,
        })
    }

    fn checkin(&self, lease: Lease) {
        let mut st = self.state.lock().unwrap();
        if st.epoch == lease.epoch {
            st.idle.push(lease.session);
        } else {
            Self::retire(&st, lease, true);
        }
    }

    /// Takes a session out of use: closed when it is known to be ours and alive, else forgotten
    /// (see `checkout`).
    fn retire(st: &State, lease: Lease, alive: bool) {
        if alive && st.generation == lease.generation {
            let _ = lease.session.close();
        }
    }

    /// Rebuilds the pool after `cause`: the next checkout finds the token (initialising the
    /// module again if it lost its initialisation), opens a session and logs in.
    fn forget(&self, st: &mut State, cause: &CkError) {
        tracing::warn!(error = %cause, "PKCS#11 token dropped the session; reopening");
        let reinit = rv(cause) == Some(RvError::CryptokiNotInitialized);
        for s in st.idle.drain(..) {
            if !reinit {
                let _ = s.close();
            }
        }
        if reinit {
            st.initialized = false;
            st.generation += 1;
        }
        st.token = None;
        st.epoch += 1;
        st.logged_in = false;
        st.keys.clear();
    }

    /// [`Inner::forget`], unless another thread already rebuilt the pool `lease` came from.
    fn reset(&self, lease: Lease, alive: bool, cause: &CkError) {
        let mut st = self.state.lock().unwrap();
        if st.epoch == lease.epoch {
            self.forget(&mut st, cause);
        }
        Self::retire(&st, lease, alive);
    }

    /// Logs in again after the token dropped the login under `lease`. Once per drop: nothing to
    /// do when the pool was rebuilt or another thread logged in since the lease was taken.
    fn relogin(&self, lease: &Lease) -> Result<(), BackendError> {
        let mut st = self.state.lock().unwrap();
        self.check_fatal()?;
        if st.epoch != lease.epoch || st.logins != lease.logins {
            return Ok(());
        }
        tracing::warn!(
            "the PKCS#11 session is no longer logged in (the token, or another user of the \
             module in this process, logged out); logging in again"
        );
        self.login(&mut st, &lease.session)
    }

    fn find_key(&self, session: &Session, label: &str) -> Result<ObjectHandle, OpError> {
        if let Some(h) = self.state.lock().unwrap().keys.get(label) {
            return Ok(*h);
        }
        let handle = find_key_uncached(session, label)?;
        self.state
            .lock()
            .unwrap()
            .keys
            .insert(label.to_string(), handle);
        Ok(handle)
    }

    /// Runs `op` on a pooled session. When it fails because the session lost its login (seen
    /// with C_GetSessionInfo), logs in again and retries once; when the session or the token is
    /// gone, rebuilds the pool and retries once. An empty search is a missing key only when the
    /// session was logged in throughout.
    fn run<T>(
        &self,
        what: &str,
        op: impl Fn(&Inner, &Session, Mech) -> Result<T, OpError>,
    ) -> Result<T, BackendError> {
        let mut retried = false;
        loop {
            let lease = self.checkout()?;
            let failure = match op(self, &lease.session, lease.mech) {
                Ok(v) => {
                    self.checkin(lease);
                    return Ok(v);
                }
                Err(OpError::Backend(e)) => {
                    self.checkin(lease);
                    return Err(e);
                }
                Err(OpError::Ck(e)) if !session_lost(&e) => {
                    self.checkin(lease);
                    return Err(map_err(what, &e));
                }
                Err(OpError::Ck(e)) => Failure::Lost(e),
                Err(OpError::KeyMissing(label)) => Failure::KeyMissing(label),
            };
            let state = lease.session.get_session_info().map(|i| i.session_state());
            let logged_in = matches!(state, Ok(SessionState::RoUser | SessionState::RwUser));
            if let Failure::KeyMissing(label) = &failure {
                if logged_in && self.state.lock().unwrap().logins == lease.logins {
                    self.checkin(lease);
                    return Err(key_missing(label));
                }
            }
            if retried {
                return Err(match failure {
                    Failure::KeyMissing(label) => {
                        self.checkin(lease);
                        BackendError::Unavailable(format!(
                            "PKCS#11 {what}: the search for key {label:?} found nothing, but the \
                             session was not logged in throughout, twice (the token keeps dropping \
                             the login), so that is not taken as an answer"
                        ))
                    }
                    Failure::Lost(e) => {
                        self.reset(lease, state.is_ok(), &e);
                        map_err(what, &e)
                    }
                });
            }
            retried = true;
            match (state, failure) {
                // Logged out under us: the session itself is fine.
                (Ok(_), _) if !logged_in => {
                    let relogged = self.relogin(&lease);
                    self.checkin(lease);
                    relogged?;
                }
                // Another thread logged in while this search ran: search again.
                (Ok(_), Failure::KeyMissing(_)) => self.checkin(lease),
                (Ok(_), Failure::Lost(e)) => self.reset(lease, true, &e),
                (Err(info), failure) => {
                    let cause = match failure {
                        Failure::Lost(e) if rv(&info) != Some(RvError::CryptokiNotInitialized) => e,
                        _ => info,
                    };
                    self.reset(lease, false, &cause);
                }
            }
        }
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
    /// A search found no key with this label; an answer only from a logged-in session (`run`).
    KeyMissing(String),
}

/// An [`OpError`] that `run` may recover from.
enum Failure {
    KeyMissing(String),
    /// A PKCS#11 error after which a new login or session may succeed ([`session_lost`]).
    Lost(CkError),
}

impl From<CkError> for OpError {
    fn from(e: CkError) -> Self {
        OpError::Ck(e)
    }
}

fn key_template(label: &str) -> [Attribute; 3] {
    [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// The one AES secret key labelled `label`. Two or more are refused: which one wraps would
/// depend on the order the token lists them in.
fn find_key_uncached(session: &Session, label: &str) -> Result<ObjectHandle, OpError> {
    let template = key_template(label);
    let mut found =
        session.iter_objects_with_cache_size(&template, NonZeroUsize::MIN.saturating_add(1))?;
    let first = found.next().transpose()?;
    let second = found.next().transpose()?;
    drop(found);
    match (first, second) {
        (None, _) => Err(OpError::KeyMissing(label.to_string())),
        (Some(h), None) => Ok(h),
        (Some(_), Some(_)) => Err(OpError::Backend(duplicate_label(session, label)?)),
    }
}

fn duplicate_label(session: &Session, label: &str) -> Result<BackendError, CkError> {
    let mut ids = Vec::new();
    for h in session.find_objects(&key_template(label))? {
        ids.push(
            match session.get_attributes(h, &[AttributeType::Id])?.pop() {
                Some(Attribute::Id(id)) if !id.is_empty() => hex::encode(id),
                _ => "none".to_string(),
            },
        );
    }
    ids.sort();
    Ok(BackendError::Config(format!(
        "{} AES secret keys on the PKCS#11 token are labelled {label:?} (CKA_ID {}), so the plugin \
         cannot tell which one to use. Give every key a label of its own: keep {label:?} on the key \
         whose CKA_ID appears in the plugin's key_id ({label}/HEX(CKA_ID)) and relabel or delete \
         the others",
        ids.len(),
        ids.join(", ")
    )))
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

    /// Loads the module, then tries once to reach the token: initialise the module, find the
    /// token, log in and find the key. A mistake that cannot fix itself (module path, PIN, a key
    /// missing from a logged-in session, key attributes, missing mechanisms, a duplicate label)
    /// is returned. A token that is not there yet or fails transiently (no token, device error,
    /// no answer within 10 s) is not: the backend is returned, the engine's probe reports the
    /// failure in Status and the backend connects when the token is back. Every login (the first
    /// one and those after the token dropped the session or the login) is reported to `events`.
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
                BackendError::Config(format!(
                    "cannot load PKCS#11 module {}: {e}",
                    module.display()
                ))
            })?;
            Ok(Inner {
                module,
                token_label,
                key_label: Mutex::new(key_label),
                pin: AuthPin::new(pin.as_str().into()),
                wanted,
                mech_seen: AtomicU8::new(0),
                state: Mutex::new(State {
                    ctx,
                    initialized: false,
                    generation: 0,
                    token: None,
                    epoch: 0,
                    idle: Vec::new(),
                    logged_in: false,
                    logins: 0,
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
            gate: Gate::new(sessions),
        };
        match tokio::time::timeout(FIRST_CONTACT_WAIT, backend.current_key()).await {
            Ok(Ok(_)) => {
                tracing::info!(
                    mechanism = backend.mechanism_name(),
                    "PKCS#11 backend ready"
                )
            }
            Ok(Err(e)) if e.is_transient() => tracing::warn!(
                error = %e,
                "PKCS#11 token not usable yet; starting anyway, Status reports it until it is"
            ),
            Ok(Err(e)) => return Err(e),
            Err(_) => tracing::warn!(
                "PKCS#11 token did not answer within {FIRST_CONTACT_WAIT:?}; starting anyway, \
                 Status reports it until it does"
            ),
        }
        Ok(backend)
    }

    /// Switches the wrapping key to another label on the same token (configuration reload). Data
    /// wrapped under earlier keys keeps unwrapping as long as those keys stay on the token.
    pub fn set_key_label(&self, label: impl Into<String>) {
        *self.inner.key_label.lock().unwrap() = label.into();
    }

    /// The mechanism in use (`CKM_AES_GCM` or `CKM_AES_KEY_WRAP_PAD`), once the token was found.
    pub fn mechanism_name(&self) -> &'static str {
        match self.inner.mech_seen.load(Ordering::Relaxed) {
            1 => Mech::Gcm.name(),
            2 => Mech::KeyWrapPad.name(),
            _ => "none yet (the token was not reached)",
        }
    }

    /// Runs `f` on the blocking pool under the [`Gate`].
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        self.inner.check_fatal()?;
        let (_caller, held) = self.gate.enter().await?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            // Released when the token call returns, not when the caller stops waiting for it.
            let _held = held;
            f(&inner)
        })
        .await
        .map_err(|e| BackendError::Other(format!("PKCS#11 task failed: {e}")))?
    }
}

fn seal(
    mech: Mech,
    session: &Session,
    key: ObjectHandle,
    label: &str,
    pt: &[u8],
) -> Result<Vec<u8>, CkError> {
    match mech {
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
    mech: Mech,
    session: &Session,
    key: ObjectHandle,
    label: &str,
    blob: &[u8],
) -> Result<SecretBytes, OpError> {
    let bad = |m: &str| OpError::Backend(BackendError::InvalidCiphertext(m.to_string()));
    match (blob.first(), mech) {
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
            inner.run("looking up the key", |inner, session, mech| {
                // Always look again: the probe must notice a deleted (or duplicated) key.
                let handle = find_key_uncached(session, &label)?;
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
                        Attribute::Encrypt(false) | Attribute::Decrypt(false) if mech == Mech::Gcm => {
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
            inner.run("wrapping", |inner, session, mech| {
                let key = inner.find_key(session, &label)?;
                let ct = seal(mech, session, key, &label, &pt)?;
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
            inner.run("unwrapping", |inner, session, mech| {
                let key = inner.find_key(session, &label)?;
                open_blob(mech, session, key, &label, &blob)
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

    /// A call keeps its session permit after its caller gave up; once every session is held like
    /// that, calls fail at once; the work returning frees everything.
    #[tokio::test]
    async fn gate_holds_permits_for_abandoned_calls() {
        let gate = Gate::new(1);
        let (caller, held) = gate.enter().await.unwrap();
        // Another call waits for the session (its caller gives up: nothing stays behind).
        let waited = tokio::time::timeout(Duration::from_millis(20), gate.enter()).await;
        assert!(waited.is_err(), "a second call got the only session");
        assert_eq!(gate.pending.load(Ordering::SeqCst), 1);
        // The first caller gives up while its work still runs: the session stays taken.
        drop(caller);
        assert_eq!(gate.abandoned.load(Ordering::SeqCst), 1);
        let err = gate.enter().await.err().expect("admitted on a stuck token");
        assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
        assert!(err.to_string().contains("not answering"), "{err}");
        // The token answers.
        drop(held);
        assert_eq!(gate.abandoned.load(Ordering::SeqCst), 0);
        assert_eq!(gate.pending.load(Ordering::SeqCst), 0);
        let (caller, held) = gate.enter().await.unwrap();
        drop((held, caller));
        assert_eq!(gate.abandoned.load(Ordering::SeqCst), 0);
    }

    /// At most sessions + QUEUE calls are admitted at once; the next is refused without waiting.
    #[tokio::test]
    async fn gate_bounds_waiting_calls() {
        let gate = Gate::new(2);
        let running = [gate.enter().await.unwrap(), gate.enter().await.unwrap()];
        let mut waiting = Vec::new();
        for _ in 0..QUEUE {
            let gate = gate.clone();
            waiting.push(tokio::spawn(async move { gate.enter().await.map(|_| ()) }));
        }
        while gate.pending.load(Ordering::SeqCst) < 2 + QUEUE {
            tokio::task::yield_now().await;
        }
        let err = gate.enter().await.err().expect("admitted beyond the queue");
        assert!(err.to_string().contains("queue of 32"), "{err}");
        drop(running);
        for w in waiting {
            w.await.unwrap().unwrap();
        }
        assert_eq!(gate.pending.load(Ordering::SeqCst), 0);
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
