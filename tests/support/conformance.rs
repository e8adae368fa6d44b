//! The backend conformance suite: every backend must pass it unchanged.
//!
//! Call [`run`] with a backend under test and, where the backend can rotate its key from the test,
//! a rotation hook. It asserts on outputs only.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kms_plugin::backend::{Backend, BackendError};
use rand::RngCore;

/// Largest wrapped local KEK we accept: it must leave room in the 1024-byte v2 ciphertext.
pub const MAX_WRAPPED_LEN: usize = 700;

pub type RotateHook = Box<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

pub async fn run(backend: Arc<dyn Backend>, rotate: Option<RotateHook>) {
    // Identity: present, bounded, stable between calls.
    let id = backend.current_key().await.expect("current_key");
    assert!(
        !id.key_id.is_empty() && id.key_id.len() <= 900,
        "key_id length {}",
        id.key_id.len()
    );
    assert!(
        !id.key_ref.is_empty() && id.key_ref.len() <= 255,
        "key_ref length {}",
        id.key_ref.len()
    );
    assert_eq!(
        backend.current_key().await.expect("current_key again"),
        id,
        "identity must be stable"
    );
    assert!(!backend.kind().is_empty());

    // Round trip; randomised wrapping; bounded size.
    let secret = random32();
    let w1 = backend.wrap(&secret).await.expect("wrap");
    let w2 = backend.wrap(&secret).await.expect("wrap again");
    assert_ne!(w1.ciphertext, w2.ciphertext, "wrapping must be randomised");
    assert!(
        w1.ciphertext.len() <= MAX_WRAPPED_LEN,
        "wrapped key is {} bytes",
        w1.ciphertext.len()
    );
    // Measured sizes, for docs/escrow.md (what an escrow wrapping adds to each ciphertext).
    eprintln!(
        "wrapping size: backend {} key_ref {} bytes, wrapped local KEK {} bytes",
        backend.kind(),
        w1.key_ref.len(),
        w1.ciphertext.len()
    );
    assert!(
        !w1.ciphertext.windows(secret.len()).any(|w| w == secret),
        "plaintext visible in wrapped key"
    );
    assert_eq!(
        &backend
            .unwrap(&w1.key_ref, &w1.ciphertext)
            .await
            .expect("unwrap")[..],
        &secret[..]
    );
    assert_eq!(
        &backend
            .unwrap(&w2.key_ref, &w2.ciphertext)
            .await
            .expect("unwrap 2")[..],
        &secret[..]
    );

    // Tampering and garbage are refused with an error, never the secret.
    for pos in [0, w1.ciphertext.len() / 2, w1.ciphertext.len() - 1] {
        let mut bad = w1.ciphertext.clone();
        bad[pos] ^= 0x01;
        match backend.unwrap(&w1.key_ref, &bad).await {
            Err(e) => assert!(!e.to_string().is_empty()),
            Ok(got) => panic!("tampered byte {pos} unwrapped to {} bytes", got.len()),
        }
    }
    for garbage in [&b""[..], &b"x"[..], &[0u8; 64][..]] {
        assert!(
            backend.unwrap(&w1.key_ref, garbage).await.is_err(),
            "garbage of {} bytes",
            garbage.len()
        );
    }
    let unknown = backend.unwrap("no-such-key-ref", &w1.ciphertext).await;
    assert!(unknown.is_err(), "an unknown key_ref must not unwrap");

    // Concurrency.
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let b = backend.clone();
        tasks.push(tokio::spawn(async move {
            let s = random32();
            let w = b.wrap(&s).await?;
            let back = b.unwrap(&w.key_ref, &w.ciphertext).await?;
            assert_eq!(&back[..], &s[..]);
            Ok::<_, BackendError>(())
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("concurrent round trip");
    }

    // Rotation: a new identity, and data wrapped before still unwraps.
    if let Some(rotate) = rotate {
        rotate().await;
        let id2 = backend
            .current_key()
            .await
            .expect("current_key after rotation");
        assert_ne!(id2.key_id, id.key_id, "rotation must change key_id");
        assert_eq!(
            &backend
                .unwrap(&w1.key_ref, &w1.ciphertext)
                .await
                .expect("old unwrap")[..],
            &secret[..]
        );
        let w3 = backend.wrap(&secret).await.expect("wrap after rotation");
        assert_eq!(
            &backend
                .unwrap(&w3.key_ref, &w3.ciphertext)
                .await
                .expect("new unwrap")[..],
            &secret[..]
        );
    }
}
