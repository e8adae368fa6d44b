//! Shared set-up for the fuzz targets: one runtime and one engine per process, over a local key file
//! with a fixed key so that the committed seed corpus holds ciphertexts that really decrypt (the
//! fuzzer then starts from inputs that reach AES-GCM, not only the parser).

use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use kms_plugin::backend::local::LocalBackend;
use kms_plugin::engine::{Engine, EngineConfig};

/// Name of the fixed local key; key_id is `local:<name>`.
pub const KEY_NAME: &str = "kfuzz";
pub const KEY_ID: &str = "local:kfuzz";

pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// The engine over the fixed key (a test key: 32 bytes 0x42, never used anywhere else).
pub fn engine() -> &'static Arc<Engine> {
    static ENGINE: OnceLock<(tempdir::Dir, Arc<Engine>)> = OnceLock::new();
    &ENGINE
        .get_or_init(|| {
            let dir = tempdir::Dir::new();
            let path = dir.0.join("kek.json");
            let key = base64::engine::general_purpose::STANDARD.encode([0x42u8; 32]);
            let json = format!(
                "{{\"version\":1,\"keys\":[{{\"name\":\"{KEY_NAME}\",\"created\":\"2026-01-01T00:00:00Z\",\"key\":\"{key}\"}}]}}"
            );
            std::fs::write(&path, json).expect("write fuzz key file");
            let backend = LocalBackend::open(&path).expect("open fuzz key file");
            let engine = Engine::new(Arc::new(backend), EngineConfig::default());
            (dir, engine)
        })
        .1
}

mod tempdir {
    /// A private directory removed at exit (best effort).
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            let p = std::env::temp_dir().join(format!("kms-plugin-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&p).expect("fuzz temp dir");
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
