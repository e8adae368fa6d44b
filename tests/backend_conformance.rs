//! Runs the shared backend conformance suite against the backends that need no server.
mod support;

use std::sync::Arc;

use kms_plugin::backend::local::{add_key, create_key_file, LocalBackend};
use kms_plugin::backend::memory::MemoryBackend;

#[tokio::test]
async fn memory_backend_conforms() {
    let backend = Arc::new(MemoryBackend::new("conformance"));
    let b2 = backend.clone();
    support::conformance::run(
        backend,
        Some(Box::new(move || {
            let b = b2.clone();
            Box::pin(async move {
                b.rotate();
            })
        })),
    )
    .await;
}

#[tokio::test]
async fn local_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kek.json");
    create_key_file(&path).unwrap();
    let backend = Arc::new(LocalBackend::open(&path).unwrap());
    let p = path.clone();
    support::conformance::run(
        backend,
        Some(Box::new(move || {
            let p = p.clone();
            Box::pin(async move {
                // Key names carry a second-resolution timestamp plus randomness; no wait needed.
                add_key(&p).unwrap();
            })
        })),
    )
    .await;
}
