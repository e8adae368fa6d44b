//! The command line: `serve`, `keygen`, `health`, `encrypt`, `decrypt`, `version`, `akeyless uid`.

#[cfg(feature = "akeyless")]
pub mod akeyless_uid;
pub mod client;
#[cfg(feature = "inventory")]
pub mod inventory;
#[cfg(feature = "inventory")]
pub mod recover;
pub mod serve;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::protocol::socket::ListenAddr;
use crate::protocol::v2::StatusVersion;

#[derive(Parser, Debug)]
#[command(
    name = "kms-plugin",
    version,
    about = "Kubernetes KMS v2/v1beta1 plugin with a local key hierarchy"
)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "KMS_PLUGIN_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `kms_plugin=debug`. Secrets are never logged at any level.
    #[arg(
        long,
        global = true,
        env = "KMS_PLUGIN_LOG_LEVEL",
        default_value = "info"
    )]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve KMS v2 and v1beta1 on a UNIX socket.
    Serve(Box<ServeArgs>),
    /// Create a local key file (mode 0600), or add a new primary key to one (`--add`).
    Keygen(KeygenArgs),
    /// Ask a running plugin for its Status; exits 0 only when it answers `ok` (usable as an exec probe).
    Health(HealthArgs),
    /// Encrypt stdin through a running plugin (debugging); prints JSON with the base64 ciphertext.
    Encrypt(EncryptArgs),
    /// Decrypt a base64 ciphertext from stdin through a running plugin (debugging); writes the plaintext.
    Decrypt(DecryptArgs),
    /// Count how the objects in etcd are stored (plaintext, other providers, KMS v1/v2 and under which
    /// key); read-only. With --require-key-id, exit 3 unless every object is under that key.
    #[cfg(feature = "inventory")]
    Inventory(Box<inventory::InventoryArgs>),
    /// Retire the running plugin's current local KEK now (e.g. after a suspected node compromise): the
    /// next Encrypt creates a new one; data under the old one still decrypts until it is rewritten.
    RotateLocal(ClientArgsOnly),
    /// Disaster recovery, offline: decrypt one value exported from etcd with one backend (usually an
    /// escrow backend, configured with its usual flags), no running plugin or apiserver needed.
    #[cfg(feature = "inventory")]
    Recover(Box<recover::RecoverArgs>),
    /// Print the version and the compiled-in backends.
    Version,
    /// Akeyless tools: `akeyless uid …` manages Universal Identity child tokens for the nodes.
    #[cfg(feature = "akeyless")]
    Akeyless(akeyless_uid::AkeylessArgs),
    /// Print the configuration reference (Markdown) generated from these definitions.
    #[command(hide = true)]
    ConfigReference,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 5m, 7d)"))
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!(
            "{s:?} is not an octal file mode such as 0600 or 0660"
        )),
    }
}

/// Most Encrypts under one local KEK: its AES-GCM nonces are random 96-bit values, and NIST SP 800-38D
/// bounds random-nonce use of one key at 2^32 messages.
pub const KEK_MAX_USES_CAP: u64 = 1 << 32;

fn parse_kek_max_uses(s: &str) -> Result<u64, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    if n > KEK_MAX_USES_CAP {
        return Err(format!(
            "{n} is above the cap of 4294967296 (2^32): a local KEK uses random 96-bit AES-GCM nonces, \
             which are safe for at most 2^32 encryptions under one key (NIST SP 800-38D); use 4294967296 or less"
        ));
    }
    Ok(n)
}

/// Which backend holds the remote KEK.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// A local key file (`--local-key-file`).
    Local,
    /// Akeyless (`--akeyless-*`).
    Akeyless,
    /// A PKCS#11 token (`--pkcs11-*`).
    Pkcs11,
    /// AWS KMS (`--aws-*`).
    AwsKms,
    /// HashiCorp Vault or OpenBao Transit (`--vault-*`).
    Vault,
    /// A KMIP key manager over mutual TLS (`--kmip-*`).
    Kmip,
    /// Google Cloud KMS (`--gcp-kms-*`).
    GcpKms,
    /// Azure Key Vault or Managed HSM (`--azure-*`).
    AzureKeyvault,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// YAML file with options (keys are flag names without dashes); flags and environment override it.
    #[arg(long, env = "KMS_PLUGIN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Socket to listen on: unix:///path/kms.sock, or unix:///@name for an abstract socket.
    /// Default /var/run/kms-plugin/kms.sock (drop-in Akeyless mode: $AKEYLESS_UNIX_SOCKET or /tmp/akeyless_kms_plugin.sock).
    #[arg(long, env = "KMS_PLUGIN_LISTEN")]
    pub listen: Option<ListenAddr>,
    /// File mode of the socket (octal).
    #[arg(long, env = "KMS_PLUGIN_SOCKET_MODE", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Group (name or id) to own the socket, for apiservers that do not run as root.
    #[arg(long, env = "KMS_PLUGIN_SOCKET_GROUP")]
    pub socket_group: Option<String>,
    /// Key backend. Without it: Akeyless if AKEYLESS_KEY_ENCRYPTION_KEY is set (drop-in mode), `local` if
    /// --local-key-file is given; otherwise serve refuses to start unless --dev is given.
    #[arg(long, env = "KMS_PLUGIN_BACKEND", value_enum)]
    pub backend: Option<BackendKind>,
    /// Decrypt-only backend for a live move between key managers: --backend wraps every new local KEK
    /// and gives the key_id; this one (configured with its own flags) only unwraps what --backend
    /// cannot, until a storage migration has moved all data (docs/migration.md). Must differ from
    /// --backend.
    #[arg(long, env = "KMS_PLUGIN_PREVIOUS_BACKEND", value_enum)]
    pub previous_backend: Option<BackendKind>,
    /// Escrow backends (comma-separated kinds, each configured with its own flags, all different from
    /// --backend and --previous-backend): every new local KEK is also wrapped by each, so Secrets stay
    /// readable if the primary loses its key or is gone (docs/escrow.md). Encrypt never waits on a
    /// failed escrow: that KEK is used for at most --escrow-retry, then a new one is made.
    #[arg(
        long,
        env = "KMS_PLUGIN_ESCROW_BACKEND",
        value_enum,
        value_delimiter = ','
    )]
    pub escrow_backend: Vec<BackendKind>,
    /// How long a local KEK that an escrow backend could not wrap keeps serving Encrypt.
    #[arg(long, env = "KMS_PLUGIN_ESCROW_RETRY", default_value = "60s", value_parser = parse_duration)]
    pub escrow_retry: Duration,
    /// Development only: with no backend configured, serve a throw-away local key created under
    /// --data-dir. Deliberately without an environment variable; refused together with a backend.
    #[arg(long)]
    pub dev: bool,
    /// Local backend: key file created by `kms-plugin keygen`. Never created implicitly.
    #[arg(long, env = "KMS_PLUGIN_LOCAL_KEY_FILE")]
    pub local_key_file: Option<PathBuf>,
    /// Directory for the development key (--dev); also the default --state-dir.
    #[arg(
        long,
        env = "KMS_PLUGIN_DATA_DIR",
        default_value = "/var/lib/kms-plugin"
    )]
    pub data_dir: PathBuf,
    /// Directory for state that must survive restarts (e.g. rotated Akeyless UID tokens); default --data-dir.
    #[arg(long, env = "KMS_PLUGIN_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// StatusResponse.version: v2 (Kubernetes 1.29+) or v2beta1 (1.27-1.28).
    #[arg(
        long,
        env = "KMS_PLUGIN_STATUS_VERSION",
        value_enum,
        default_value = "v2"
    )]
    pub status_version: StatusVersion,
    /// Interval of the cheap backend probe (key identity and state).
    #[arg(long, env = "KMS_PLUGIN_PROBE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub probe_interval: Duration,
    /// Interval of the deep probe (a wrap/unwrap round trip that also checks decrypt permission).
    #[arg(long, env = "KMS_PLUGIN_DEEP_PROBE_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub deep_probe_interval: Duration,
    /// Timeout of one backend call.
    #[arg(long, env = "KMS_PLUGIN_BACKEND_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub backend_timeout: Duration,
    /// Treat a confirmed authentication failure (credentials revoked or deleted) like a key
    /// revocation: drop the cached local KEKs and refuse Decrypts. Off: cached keys keep serving.
    #[arg(long, env = "KMS_PLUGIN_REVOKE_ON_AUTH_FAILURE")]
    pub revoke_on_auth_failure: bool,
    /// Write KMS v1 ciphertexts in the original Akeyless plugin's format (its `/encrypt` result
    /// per DEK, one Akeyless call per write), to prepare a rollback to that image. Reads accept
    /// both formats either way. See docs/akeyless.md.
    #[arg(long, env = "KMS_PLUGIN_LEGACY_V1_WRITES")]
    pub legacy_v1_writes: bool,
    /// Status turns unhealthy when no probe succeeded for this long; default 2 x probe interval + backend timeout.
    #[arg(long, env = "KMS_PLUGIN_STATUS_STALENESS", value_parser = parse_duration)]
    pub status_staleness: Option<Duration>,
    /// A local KEK is retired after this long.
    #[arg(long, env = "KMS_PLUGIN_KEK_MAX_AGE", default_value = "7d", value_parser = parse_duration)]
    pub kek_max_age: Duration,
    /// A local KEK is retired after this many Encrypts (1 to 4294967296 = 2^32, the AES-GCM random-nonce bound).
    #[arg(long, env = "KMS_PLUGIN_KEK_MAX_USES", default_value_t = 1 << 21, value_parser = parse_kek_max_uses)]
    pub kek_max_uses: u64,
    /// How many unwrapped local KEKs are kept in memory.
    #[arg(long, env = "KMS_PLUGIN_KEK_CACHE_SIZE", default_value_t = 1000)]
    pub kek_cache_size: usize,
    /// Backend calls in flight at once.
    #[arg(long, env = "KMS_PLUGIN_BACKEND_CONCURRENCY", default_value_t = 16)]
    pub backend_concurrency: usize,
    /// Largest gRPC request accepted, in bytes.
    #[arg(long, env = "KMS_PLUGIN_MAX_REQUEST_BYTES", default_value_t = 4 * 1024 * 1024 + 64 * 1024)]
    pub max_request_bytes: usize,
    /// Longest time from SIGTERM to exit: in-flight calls get all but the last second to finish,
    /// and a backend call that still hangs (an HSM that never answers) is abandoned in that second.
    #[arg(long, env = "KMS_PLUGIN_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Connections open at once on the socket; more are closed right after accept (metric kms_plugin_connections_refused).
    #[arg(long, env = "KMS_PLUGIN_MAX_CONNECTIONS", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// HTTP/2 streams (calls) one connection may have open at once; clients queue the rest.
    #[arg(long, env = "KMS_PLUGIN_MAX_CONCURRENT_STREAMS", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,
    /// Largest decoded request header list (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE); larger requests get 431 on their stream.
    #[arg(long, env = "KMS_PLUGIN_MAX_HEADER_LIST_BYTES", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1024..=1048576))]
    pub max_header_list_bytes: u32,
    /// A new connection must send the HTTP/2 preface within this time.
    #[arg(long, env = "KMS_PLUGIN_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// A connection without a call for this long is closed (clients reconnect on their next call); 0 = never.
    #[arg(long, env = "KMS_PLUGIN_IDLE_TIMEOUT", default_value = "15m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Interval of HTTP/2 PINGs that detect a hung client (closed after 20 s without an answer); 0 = off.
    #[arg(long, env = "KMS_PLUGIN_KEEPALIVE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,
    /// Address for /livez, /readyz, /healthz and /metrics, e.g. 127.0.0.1:8787 (off by default).
    #[arg(long, env = "KMS_PLUGIN_HTTP")]
    pub http: Option<std::net::SocketAddr>,
    /// Audit log: a file path, or `-` for stdout (off by default). Reopened on SIGHUP.
    #[arg(long, env = "KMS_PLUGIN_AUDIT_LOG")]
    pub audit_log: Option<String>,
    #[cfg(feature = "akeyless")]
    #[command(flatten)]
    pub akeyless: crate::backend::akeyless::config::AkeylessArgs,
    #[cfg(feature = "pkcs11")]
    #[command(flatten)]
    pub pkcs11: crate::backend::pkcs11::Pkcs11Args,
    #[cfg(feature = "aws-kms")]
    #[command(flatten)]
    pub aws: crate::backend::aws_kms::AwsKmsArgs,
    #[cfg(feature = "vault")]
    #[command(flatten)]
    pub vault: crate::backend::vault::VaultArgs,
    #[cfg(feature = "kmip")]
    #[command(flatten)]
    pub kmip: crate::backend::kmip::KmipArgs,
    #[cfg(feature = "gcp-kms")]
    #[command(flatten)]
    pub gcp: crate::backend::gcp_kms::GcpKmsArgs,
    #[cfg(feature = "azure-keyvault")]
    #[command(flatten)]
    pub azure: crate::backend::azure_keyvault::AzureKeyVaultArgs,
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Key file to create (refuses to overwrite) or, with --add, to extend.
    pub file: PathBuf,
    /// Add a new primary key to an existing file; older keys stay for decryption.
    #[arg(long)]
    pub add: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Socket of the running plugin.
    #[arg(
        long,
        env = "KMS_PLUGIN_LISTEN",
        default_value = "unix:///var/run/kms-plugin/kms.sock"
    )]
    pub listen: ListenAddr,
    /// Per-call timeout.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct ClientArgsOnly {
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct HealthArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print the version, health and key_id.
    #[arg(short, long)]
    pub verbose: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ApiChoice {
    V1,
    V2,
}

#[derive(Args, Debug)]
pub struct EncryptArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long, value_enum, default_value = "v2")]
    pub api: ApiChoice,
}

#[derive(Args, Debug)]
pub struct DecryptArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long, value_enum, default_value = "v2")]
    pub api: ApiChoice,
    /// key_id returned by Encrypt (v2 only).
    #[arg(long, default_value = "")]
    pub key_id: String,
}
