//! The PKCS#11 backend against a real SoftHSM2 token created by the test.
//!
//! One test function on purpose: a PKCS#11 module is initialised once per process, and the
//! scenarios below log the token out and finalise the module under the backend's feet.
#![cfg(feature = "pkcs11")]
#[path = "pkcs11/softhsm.rs"]
mod softhsm;
mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use kms_plugin::backend::pkcs11::{Pkcs11Args, Pkcs11Backend, Pkcs11Mechanism};
use kms_plugin::backend::{AuthKind, Backend, BackendError};
use support::events::Recorder;
use support::external::opted_out;
use zeroize::Zeroizing;

const TOKEN: &str = "kms-plugin-test";
const PIN: &str = "48151623";
const SO_PIN: &str = "12345678";

fn args(module: &Path, key: &str, mech: Pkcs11Mechanism) -> Pkcs11Args {
    Pkcs11Args {
        pkcs11_module: Some(module.to_path_buf()),
        pkcs11_token_label: Some(TOKEN.into()),
        pkcs11_key_label: Some(key.into()),
        pkcs11_pin_file: None,
        pkcs11_sessions: 4,
        pkcs11_mechanism: mech,
    }
}

fn create_key(session: &Session, label: &str, id: u8) {
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::ValueLen(32u64.into()),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(vec![id]),
            ],
        )
        .expect("generate AES key on the token");
}

fn pin(p: &str) -> Zeroizing<String> {
    Zeroizing::new(p.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn softhsm_token() {
    if opted_out("softhsm") {
        return;
    }
    let module = softhsm::module();
    // A private token directory; must be in place before the module is initialised.
    let token = softhsm::TokenDir::new(TOKEN, SO_PIN, PIN);
    std::env::set_var("SOFTHSM2_CONF", &token.conf);

    // Administrative access through cryptoki, as an operator's tool would have.
    let admin_ctx = Pkcs11::new(&module).unwrap();
    admin_ctx
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = admin_ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| admin_ctx.get_token_info(*s).unwrap().label().trim_end() == TOKEN)
        .unwrap();
    let admin = admin_ctx.open_rw_session(slot).unwrap();
    admin
        .login(UserType::User, Some(&AuthPin::new(PIN.into())))
        .unwrap();
    create_key(&admin, "kek-1", 1);
    create_key(&admin, "kek-kwp", 9);
    create_key(&admin, "kek-dup", 3);
    create_key(&admin, "kek-dup", 4);
    admin.logout().unwrap();

    // A wrong PIN stops with a clear error (and leaves the token usable: SoftHSM counts failures).
    let rec = Arc::new(Recorder::new("pkcs11"));
    let err = Pkcs11Backend::open_with_events(
        &args(&module, "kek-1", Pkcs11Mechanism::Auto),
        pin("0000"),
        rec.clone(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, BackendError::Authentication(_)), "{err:?}");
    assert_eq!(rec.take(), [(AuthKind::Login, "authentication")]);
    let msg = err.to_string();
    assert!(msg.contains("PIN") && msg.contains("not retrying"), "{msg}");
    assert!(
        !msg.contains("0000") && !msg.contains(PIN),
        "PIN in error: {msg}"
    );

    // A token that is not there (yet) is transient: the backend is built, and says what it waits for.
    let mut bad = args(&module, "kek-1", Pkcs11Mechanism::Auto);
    bad.pkcs11_token_label = Some("no-such-token".into());
    let absent = Pkcs11Backend::open(&bad, pin(PIN)).await.unwrap();
    let err = absent.current_key().await.unwrap_err();
    assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("no-such-token"), "{err}");
    // Misconfiguration is named: a key missing from a logged-in session, a label on two keys.
    let err = Pkcs11Backend::open(
        &args(&module, "missing-key", Pkcs11Mechanism::Auto),
        pin(PIN),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, BackendError::KeyNotFound(_)), "{err:?}");
    let err = Pkcs11Backend::open(&args(&module, "kek-dup", Pkcs11Mechanism::Auto), pin(PIN))
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::Config(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("\"kek-dup\"") && msg.contains("03, 04") && msg.contains("label of its own"),
        "{msg}"
    );

    // Conformance, rotating to a new key label mid-run.
    let backend = Arc::new(
        Pkcs11Backend::open_with_events(
            &args(&module, "kek-1", Pkcs11Mechanism::Auto),
            pin(PIN),
            rec.clone(),
        )
        .await
        .unwrap(),
    );
    assert_eq!(rec.take(), [(AuthKind::Login, "ok")], "one login");
    assert_eq!(backend.mechanism_name(), "CKM_AES_GCM");
    let id1 = backend.current_key().await.unwrap();
    assert_eq!(
        (id1.key_id.as_str(), id1.key_ref.as_str()),
        ("kek-1/01", "kek-1")
    );
    let old = backend.wrap(b"wrapped under kek-1").await.unwrap();
    let admin = Arc::new(Mutex::new(admin));
    let (a, b) = (admin.clone(), backend.clone());
    support::conformance::run(
        backend.clone(),
        Some(Box::new(move || {
            let (a, b) = (a.clone(), b.clone());
            Box::pin(async move {
                // The backend's login is the application's login, so the admin session may create keys.
                create_key(&a.lock().unwrap(), "kek-2", 2);
                b.set_key_label("kek-2");
            })
        })),
    )
    .await;
    assert_eq!(backend.current_key().await.unwrap().key_id, "kek-2/02");

    // "Restart" configured with the new label: old data still unwraps (the old key stays on the token).
    let restarted = Pkcs11Backend::open(&args(&module, "kek-2", Pkcs11Mechanism::Auto), pin(PIN))
        .await
        .unwrap();
    assert_eq!(
        &restarted
            .unwrap(&old.key_ref, &old.ciphertext)
            .await
            .unwrap()[..],
        b"wrapped under kek-1"
    );
    let err = restarted
        .unwrap("kek-unknown", &old.ciphertext)
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::KeyNotFound(_)), "{err:?}");
    // A blob is bound to its key label.
    let err = restarted
        .unwrap("kek-2", &old.ciphertext)
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::InvalidCiphertext(_)), "{err:?}");

    // The token drops the login (another user of the module logs out): the backend logs in again.
    // The probe's search then finds nothing and reports no error; that is not a missing key.
    assert_eq!(rec.take(), [], "no login while the session lasts");
    admin.lock().unwrap().logout().unwrap();
    assert_eq!(backend.current_key().await.unwrap().key_id, "kek-2/02");
    assert_eq!(
        rec.take(),
        [(AuthKind::Login, "ok")],
        "re-login for the probe"
    );
    admin.lock().unwrap().logout().unwrap();
    let w = backend.wrap(b"after logout").await.unwrap();
    assert_eq!(
        &backend.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"after logout"
    );
    assert_eq!(rec.take(), [(AuthKind::Login, "ok")], "re-login");

    // The module is finalised under the backend (all sessions gone): it re-initialises and recovers.
    let session = Arc::try_unwrap(admin).ok().unwrap().into_inner().unwrap();
    drop(session);
    admin_ctx.finalize().unwrap();
    let w = backend.wrap(b"after finalize").await.unwrap();
    assert_eq!(
        &backend.unwrap(&w.key_ref, &w.ciphertext).await.unwrap()[..],
        b"after finalize"
    );
    assert_eq!(
        &backend.unwrap(&old.key_ref, &old.ciphertext).await.unwrap()[..],
        b"wrapped under kek-1"
    );

    // The PIN changes under the running backend and the token drops the login: the re-login is
    // refused, which is fatal and sticky: no further login attempt, even once the PIN works again.
    let ctx = Pkcs11::new(&module).unwrap();
    // Already initialised by the backend's recovery above; sharing the module is the point.
    let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == TOKEN)
        .unwrap();
    let admin = ctx.open_rw_session(slot).unwrap();
    let (old_pin, new_pin) = (AuthPin::new(PIN.into()), AuthPin::new("99999999".into()));
    admin.set_pin(&old_pin, &new_pin).unwrap(); // the backend's login covers this session
    admin.logout().unwrap();
    rec.take(); // the recovery from finalize logged in again
    let err = backend.wrap(b"pin changed").await.unwrap_err();
    assert!(matches!(err, BackendError::Authentication(_)), "{err:?}");
    assert_eq!(rec.take(), [(AuthKind::Login, "authentication")]);
    admin.login(UserType::User, Some(&new_pin)).unwrap();
    admin.set_pin(&new_pin, &old_pin).unwrap();
    // Logged in again and the configured PIN is right again, yet the backend stays stopped.
    let err = backend.current_key().await.unwrap_err();
    assert!(matches!(err, BackendError::Authentication(_)), "{err:?}");
    assert!(err.to_string().contains("not retrying"), "{err}");
    assert_eq!(rec.take(), [], "no login attempt after a refused PIN");
    // A restart with the right PIN works.
    let fresh = Pkcs11Backend::open(&args(&module, "kek-2", Pkcs11Mechanism::Auto), pin(PIN))
        .await
        .unwrap();
    assert_eq!(
        &fresh.unwrap(&old.key_ref, &old.ciphertext).await.unwrap()[..],
        b"wrapped under kek-1"
    );

    // AES key wrap with padding (for tokens without GCM), forced on SoftHSM.
    let kwp = Arc::new(
        Pkcs11Backend::open(
            &args(&module, "kek-kwp", Pkcs11Mechanism::AesKeyWrapPad),
            pin(PIN),
        )
        .await
        .unwrap(),
    );
    assert_eq!(kwp.mechanism_name(), "CKM_AES_KEY_WRAP_PAD");
    support::conformance::run(kwp, None).await;
}
