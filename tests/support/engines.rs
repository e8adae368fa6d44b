//! Engine set-up shared by the engine-level tests.

use std::sync::Arc;
use std::time::Duration;

use kms_plugin::backend::Backend;
use kms_plugin::engine::{Engine, EngineConfig};

/// The default engine configuration with a backend timeout short enough for tests.
pub fn config() -> EngineConfig {
    EngineConfig {
        backend_timeout: Duration::from_secs(2),
        ..EngineConfig::default()
    }
}

/// An engine that has completed its first (deep) probe.
pub async fn ready(backend: Arc<dyn Backend>, config: EngineConfig) -> Arc<Engine> {
    let engine = Engine::new(backend, config);
    engine.probe(true).await.expect("initial probe");
    engine
}

/// A distinct 32-byte seed for each `i`.
pub fn seed(i: u32) -> Vec<u8> {
    let mut s = vec![0xA5u8; 32];
    s[..4].copy_from_slice(&i.to_be_bytes());
    s
}
