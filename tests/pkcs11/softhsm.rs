//! A SoftHSM2 token in a temporary directory, for the PKCS#11 tests (tests/pkcs11_softhsm.rs,
//! tests/pkcs11_serve.rs). Included with `#[path]`; test-only, never part of the plugin.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::external::which;

/// The SoftHSM2 module: $KMS_TEST_PKCS11_MODULE, or where Debian and source builds put it.
pub fn module() -> PathBuf {
    if let Ok(p) = std::env::var("KMS_TEST_PKCS11_MODULE") {
        return PathBuf::from(p);
    }
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .expect(
        "libsofthsm2.so not found: install softhsm2 (make deps) or set KMS_TEST_OPT_OUT=softhsm",
    )
}

/// An initialised token in its own directory. `conf` is its SOFTHSM2_CONF; SoftHSM's own log goes
/// to syslog at ERROR level.
pub struct TokenDir {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub label: String,
    pub pin: String,
}

impl TokenDir {
    pub fn new(label: &str, so_pin: &str, pin: &str) -> TokenDir {
        let util = which("softhsm2-util").expect(
            "softhsm2-util not found: install softhsm2 (make deps) or set KMS_TEST_OPT_OUT=softhsm",
        );
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let token = TokenDir {
            dir,
            conf,
            label: label.into(),
            pin: pin.into(),
        };
        token.run(Command::new(util).args([
            "--init-token",
            "--free",
            "--label",
            label,
            "--so-pin",
            so_pin,
            "--pin",
            pin,
        ]));
        token
    }

    /// Creates a sensitive, private AES-256 key with `pkcs11-tool` (as docs/backends.md does).
    pub fn keygen(&self, module: &Path, label: &str, hex_id: &str) {
        let tool = which("pkcs11-tool").expect(
            "pkcs11-tool (opensc) not found: install opensc (make deps) or set KMS_TEST_OPT_OUT=softhsm",
        );
        self.run(
            Command::new(tool)
                .arg("--module")
                .arg(module)
                .args(["--token-label", &self.label, "--login", "--pin", &self.pin])
                .args([
                    "--keygen",
                    "--key-type",
                    "AES:32",
                    "--label",
                    label,
                    "--id",
                    hex_id,
                ])
                .args(["--sensitive", "--private", "--usage-decrypt"]),
        );
    }

    fn run(&self, cmd: &mut Command) {
        let out = cmd.env("SOFTHSM2_CONF", &self.conf).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
