//! Prometheus metrics of the plugin.
//!
//! [`Metrics`] is a cheap handle (`Arc` inside) that every layer records into. Label values come only
//! from small closed enums (API version, method, gRPC code, backend operation, error label), so the
//! number of series is bounded; uids, key material and key_ids never become labels.
//!
//! Hot-path recording does not allocate: every labelled child is resolved once (on first use, then
//! kept in a `OnceLock`) and afterwards an increment is an atomic add on a shared handle.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::backend::BackendError;
pub use crate::engine::{Api, RetireReason};

/// Content type of [`Metrics::encode`]'s output (OpenMetrics text, which Prometheus scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const APIS: [Api; 2] = [Api::V1, Api::V2];

/// gRPC method of the KMS services (v1: Version/Encrypt/Decrypt, v2: Status/Encrypt/Decrypt).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Status,
    Version,
    Encrypt,
    Decrypt,
}

impl Method {
    const ALL: [Method; 4] = [
        Method::Status,
        Method::Version,
        Method::Encrypt,
        Method::Decrypt,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Status => "Status",
            Method::Version => "Version",
            Method::Encrypt => "Encrypt",
            Method::Decrypt => "Decrypt",
        }
    }

    /// The method named by a gRPC method name (`"Encrypt"`, ...).
    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// Whether the method exists on that API.
    fn exists_on(self, api: Api) -> bool {
        !matches!(
            (api, self),
            (Api::V1, Method::Status) | (Api::V2, Method::Version)
        )
    }
}

/// What the engine asked the key backend to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendOp {
    /// `current_key`: the periodic health/key_id probe.
    Probe,
    Wrap,
    Unwrap,
    /// Authentication / token acquisition (backends with sessions).
    Auth,
    Other,
}

impl BackendOp {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendOp::Probe => "probe",
            BackendOp::Wrap => "wrap",
            BackendOp::Unwrap => "unwrap",
            BackendOp::Auth => "auth",
            BackendOp::Other => "other",
        }
    }
}

impl From<crate::engine::BackendOp> for BackendOp {
    fn from(op: crate::engine::BackendOp) -> Self {
        match op {
            crate::engine::BackendOp::Probe => BackendOp::Probe,
            crate::engine::BackendOp::Wrap => BackendOp::Wrap,
            crate::engine::BackendOp::Unwrap => BackendOp::Unwrap,
        }
    }
}

const RETIRE_REASONS: [RetireReason; 6] = [
    RetireReason::MaxUses,
    RetireReason::MaxAge,
    RetireReason::KeyIdChanged,
    RetireReason::Revoked,
    RetireReason::Operator,
    RetireReason::EscrowIncomplete,
];

/// Which credential a backend renewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// A session/access token (e.g. an Akeyless `t-` token from `/auth`).
    Access,
    /// A long-lived identity token that is itself rotated (e.g. an Akeyless Universal Identity token).
    Identity,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Access => "access",
            TokenKind::Identity => "identity",
        }
    }
}

/// gRPC status code names as Go's `codes.Code.String()` prints them (the usual `grpc_code` values).
const GRPC_CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// `ok` followed by every [`BackendError::label`]; anything unknown is counted as `other`.
const OUTCOMES: [&str; 11] = [
    "ok",
    "unavailable",
    "throttled",
    "timeout",
    "authentication",
    "permission_denied",
    "key_disabled",
    "key_not_found",
    "invalid_ciphertext",
    "config",
    "other",
];
const OUTCOME_OTHER: usize = OUTCOMES.len() - 1;

fn outcome_index(result: Result<(), &BackendError>) -> usize {
    match result {
        Ok(()) => 0,
        Err(e) => {
            let label = e.label();
            OUTCOMES
                .iter()
                .position(|o| *o == label)
                .unwrap_or(OUTCOME_OTHER)
        }
    }
}

fn code_index(code: tonic::Code) -> usize {
    // tonic::Code's discriminants are the wire values 0..=16.
    let i = code as usize;
    if i < GRPC_CODES.len() {
        i
    } else {
        2 // Unknown
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    api: &'static str,
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    api: &'static str,
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EscrowLabels {
    escrow: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EscrowUpLabels {
    escrow: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Latency buckets from 0.25 ms to ~16 s: local operations take microseconds to a millisecond, remote
/// KMS calls tens to hundreds of milliseconds, and the apiserver's deadline is a few seconds.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.00025, 2.0, 17)
}

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_slots: [[[OnceLock<Counter>; 17]; 4]; 2],
    request_latency_family: Family<MethodLabels, Histogram>,
    request_latency: [[OnceLock<Histogram>; 4]; 2],
    backend_calls: Family<BackendLabels, Counter>,
    backend_slots: [[OnceLock<Counter>; OUTCOMES.len()]; 5],
    backend_latency_family: Family<OperationLabels, Histogram>,
    backend_latency: [OnceLock<Histogram>; 5],
    kek_hits: Counter,
    kek_misses: Counter,
    kek_size: Gauge,
    kek_retired: [Counter; RETIRE_REASONS.len()],
    key_id_changes: Counter,
    key_state_changes: Family<ReasonLabels, Counter>,
    legacy_decrypts: Family<ReasonLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    token_slots: [[OnceLock<Counter>; OUTCOMES.len()]; 2],
    backend_healthy: Gauge,
    last_good_probe_unix_ms: AtomicU64,
    last_good_probe_ts: FloatGauge,
    since_good_probe: FloatGauge,
    started: Instant,
    /// Monotonic time of the last good probe as nanoseconds since `started`, plus one (0 = never).
    last_good_probe_mono: AtomicU64,
    audit_dropped: Counter,
    audit_write_errors: Counter,
    identity_expiry: Family<IdentityLabels, FloatGauge>,
    auth_calls: Counter,
    local_keys_missing: Gauge,
    local_key_file_refused: Gauge,
    local_keys_unknown: Gauge,
    local_unknown_key_unwraps: Counter,
    escrow_wraps: Family<EscrowLabels, Counter>,
    escrow_unwraps: Family<EscrowLabels, Counter>,
    escrow_up: Family<EscrowUpLabels, Gauge>,
    scrape_hooks: std::sync::Mutex<Vec<ScrapeHook>>,
    connections: ConnectionMetrics,
}

/// Mirrors of the socket's connection counters (`ConnectionStats`), updated at scrape time.
struct ConnectionMetrics {
    open: Gauge,
    accepted: Counter,
    refused: Counter,
    accept_backoffs: Counter,
    handshake_timeouts: Counter,
    idle_closed: Counter,
    authorities_rewritten: Counter,
    shim_errors: Counter,
    reencoding: Counter,
}

impl ConnectionMetrics {
    fn register(registry: &mut Registry) -> Self {
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let accepted = counter(
            "connections_accepted",
            "Connections accepted on the KMS socket",
        );
        let refused = counter(
            "connections_refused",
            "Connections closed right after accept because --max-connections were open",
        );
        let accept_backoffs = counter(
            "accept_backoffs",
            "Pauses of the accept loop because file descriptors or socket memory ran out (EMFILE, ENFILE, ENOBUFS, ENOMEM)",
        );
        let handshake_timeouts = counter(
            "connection_handshake_timeouts",
            "Connections closed because no HTTP/2 preface arrived within --handshake-timeout",
        );
        let idle_closed = counter(
            "connections_idle_closed",
            "Connections closed after --idle-timeout without a call",
        );
        let authorities_rewritten = counter(
            "authority_rewrites",
            "HTTP/2 :authority values (socket paths) replaced with localhost by the shim",
        );
        let shim_errors = counter(
            "authority_shim_errors",
            "Connections ended by the :authority shim for a framing or HPACK error (GOAWAY sent)",
        );
        let reencoding = counter(
            "authority_shim_rewriting_connections",
            "Connections that sent a socket path as :authority: every header block re-encoded",
        );
        let open = Gauge::default();
        registry.register(
            "connections_open",
            "Connections open on the KMS socket",
            open.clone(),
        );
        Self {
            open,
            accepted,
            refused,
            accept_backoffs,
            handshake_timeouts,
            idle_closed,
            authorities_rewritten,
            shim_errors,
            reencoding,
        }
    }
}

/// Raises a mirrored counter to `total` (counters only go up).
fn mirror(counter: &Counter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

type ScrapeHook = Box<dyn Fn(&Metrics) + Send + Sync>;

/// Shared metrics handle. Clone freely; all clones record into the same registry.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every plugin metric, prefixed `kms_plugin_`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kms_plugin");

        let build = Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]);
        registry.register("build", "Build information of the running plugin", build);

        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "grpc_requests",
            "KMS gRPC requests by API version (v1|v2), method and gRPC status code",
            requests.clone(),
        );
        let request_latency_family =
            Family::<MethodLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(latency_buckets())
            });
        registry.register_with_unit(
            "grpc_request_duration",
            "Time to answer a KMS gRPC request, by API version and method",
            Unit::Seconds,
            request_latency_family.clone(),
        );

        let backend_calls = Family::<BackendLabels, Counter>::default();
        registry.register(
            "backend_calls",
            "Calls to the key backend by operation and outcome (ok or the error class)",
            backend_calls.clone(),
        );
        let backend_latency_family =
            Family::<OperationLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(latency_buckets())
            });
        registry.register_with_unit(
            "backend_call_duration",
            "Latency of key backend calls by operation",
            Unit::Seconds,
            backend_latency_family.clone(),
        );

        let kek_hits = Counter::default();
        registry.register(
            "local_kek_cache_hits",
            "Local KEK lookups answered from the cache",
            kek_hits.clone(),
        );
        let kek_misses = Counter::default();
        registry.register(
            "local_kek_cache_misses",
            "Local KEK lookups that needed the key backend (unwrap)",
            kek_misses.clone(),
        );
        let kek_size = Gauge::default();
        registry.register(
            "local_kek_cache_size",
            "Local KEKs currently held in memory",
            kek_size.clone(),
        );
        let kek_retired_family = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "local_kek_retirements",
            "Local KEKs retired from encryption or dropped from the cache, by reason",
            kek_retired_family.clone(),
        );

        let key_id_changes = Counter::default();
        registry.register(
            "key_id_changes",
            "Times the reported key_id changed (remote KEK rotated or replaced)",
            key_id_changes.clone(),
        );

        let key_state_changes = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "remote_key_state_changes",
            "Remote keys entering a lifecycle state (suspect: one revocation answer; revoked: confirmed, its local KEKs dropped; active: accepted again)",
            key_state_changes.clone(),
        );

        let legacy_decrypts = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "legacy_v1_decrypts",
            "KMS v1 Decrypts of ciphertexts written by the plugin this one replaced (drop-in mode), by outcome; when it stops growing after a full re-encryption, no legacy data is left",
            legacy_decrypts.clone(),
        );

        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "token_refreshes",
            "Backend authentications and credential renewals (access: session token logins and refreshes; identity: identity token rotations) by outcome",
            tokens.clone(),
        );

        let backend_healthy = Gauge::default();
        registry.register(
            "backend_healthy",
            "1 if the last backend probe succeeded, 0 otherwise",
            backend_healthy.clone(),
        );
        let last_good_probe_ts = FloatGauge::default();
        registry.register_with_unit(
            "last_good_probe_timestamp",
            "Unix time of the last successful backend probe (0 if none yet)",
            Unit::Seconds,
            last_good_probe_ts.clone(),
        );
        let since_good_probe = FloatGauge::default();
        registry.register_with_unit(
            "since_last_good_probe",
            "Seconds since the last successful backend probe (since start-up if none yet)",
            Unit::Seconds,
            since_good_probe.clone(),
        );

        let audit_dropped = Counter::default();
        registry.register(
            "audit_lines_dropped",
            "Audit lines dropped because the audit writer fell behind (queue full)",
            audit_dropped.clone(),
        );
        let auth_calls = Counter::default();
        registry.register(
            "backend_auth_calls",
            "Authentications to the key backend (e.g. Akeyless /auth), successful or not",
            auth_calls.clone(),
        );
        let identity_expiry = Family::<IdentityLabels, FloatGauge>::default();
        registry.register_with_unit(
            "identity_token_expiry",
            "Time until the backend's long-lived identity credential (Akeyless Universal Identity \
             token) expires unless rotated; alert well before 0",
            Unit::Seconds,
            identity_expiry.clone(),
        );
        let connections = ConnectionMetrics::register(&mut registry);
        let audit_write_errors = Counter::default();
        registry.register(
            "audit_write_errors",
            "Failed writes or reopens of the audit log",
            audit_write_errors.clone(),
        );

        let local_keys_missing = Gauge::default();
        registry.register(
            "local_keys_missing_from_file",
            "Local backend: keys removed from the key file but still used from memory; they are lost at the next restart (the log names them)",
            local_keys_missing.clone(),
        );
        let local_key_file_refused = Gauge::default();
        registry.register(
            "local_key_file_reload_refused",
            "Local backend: 1 while the key file on disk gives a loaded key name different bytes and was therefore not loaded (the log names the keys)",
            local_key_file_refused.clone(),
        );
        let local_keys_unknown = Gauge::default();
        registry.register(
            "local_keys_unknown",
            "Local backend: key names that Decrypts asked for and the key file lacks, typically because another node already writes with a key not yet copied here (copy the key file; 0 again once it has them)",
            local_keys_unknown.clone(),
        );
        let local_unknown_key_unwraps = Counter::default();
        registry.register(
            "local_unknown_key_unwraps",
            "Local backend: Decrypts refused because the key file lacked the key they name",
            local_unknown_key_unwraps.clone(),
        );

        let escrow_wraps = Family::<EscrowLabels, Counter>::default();
        registry.register(
            "escrow_wraps",
            "New local KEKs wrapped (outcome ok) or not (the error label) by each escrow backend",
            escrow_wraps.clone(),
        );
        let escrow_unwraps = Family::<EscrowLabels, Counter>::default();
        registry.register(
            "escrow_unwraps",
            "Local KEKs the primary backend could not unwrap, unwrapped (ok) or not by an escrow backend: any ok here means the primary has lost keys or is down (docs/escrow.md)",
            escrow_unwraps.clone(),
        );
        let escrow_up = Family::<EscrowUpLabels, Gauge>::default();
        registry.register(
            "escrow_up",
            "1 when the escrow backend's last wrap or check succeeded, 0 otherwise",
            escrow_up.clone(),
        );

        // Resolve the children that should exist from the start (value 0, so rate() works before the
        // first request); the others are resolved on first use.
        let request_latency: [[OnceLock<Histogram>; 4]; 2] =
            std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new()));
        let request_slots: [[[OnceLock<Counter>; 17]; 4]; 2] = std::array::from_fn(|_| {
            std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new()))
        });
        for (a, api) in APIS.iter().enumerate() {
            for (m, method) in Method::ALL.iter().enumerate() {
                if method.exists_on(*api) {
                    let c = requests.get_or_create_owned(&RequestLabels {
                        api: api.as_str(),
                        method: method.as_str(),
                        code: GRPC_CODES[0],
                    });
                    let _ = request_slots[a][m][0].set(c);
                    let h = request_latency_family.get_or_create_owned(&MethodLabels {
                        api: api.as_str(),
                        method: method.as_str(),
                    });
                    let _ = request_latency[a][m].set(h);
                }
            }
        }
        let backend_latency: [OnceLock<Histogram>; 5] = std::array::from_fn(|_| OnceLock::new());
        for op in [BackendOp::Probe, BackendOp::Wrap, BackendOp::Unwrap] {
            let h = backend_latency_family.get_or_create_owned(&OperationLabels {
                operation: op.as_str(),
            });
            let _ = backend_latency[op as usize].set(h);
        }
        let kek_retired = RETIRE_REASONS
            .map(|r| kek_retired_family.get_or_create_owned(&ReasonLabels { reason: r.as_str() }));

        Metrics(Arc::new(Inner {
            registry,
            requests,
            request_slots,
            request_latency_family,
            request_latency,
            backend_calls,
            backend_slots: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            backend_latency_family,
            backend_latency,
            kek_hits,
            kek_misses,
            kek_size,
            kek_retired,
            key_id_changes,
            key_state_changes,
            legacy_decrypts,
            tokens,
            token_slots: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            backend_healthy,
            last_good_probe_unix_ms: AtomicU64::new(0),
            last_good_probe_ts,
            since_good_probe,
            started: Instant::now(),
            last_good_probe_mono: AtomicU64::new(0),
            audit_dropped,
            audit_write_errors,
            identity_expiry,
            auth_calls,
            local_keys_missing,
            local_key_file_refused,
            local_keys_unknown,
            local_unknown_key_unwraps,
            escrow_wraps,
            escrow_unwraps,
            escrow_up,
            scrape_hooks: std::sync::Mutex::new(Vec::new()),
            connections,
        }))
    }

    /// Records one answered KMS gRPC request.
    pub fn grpc_request(&self, api: Api, method: Method, code: tonic::Code, elapsed: Duration) {
        let (a, m, c) = (api as usize, method as usize, code_index(code));
        let inner = &*self.0;
        inner.request_slots[a][m][c]
            .get_or_init(|| {
                inner.requests.get_or_create_owned(&RequestLabels {
                    api: api.as_str(),
                    method: method.as_str(),
                    code: GRPC_CODES[c],
                })
            })
            .inc();
        inner.request_latency[a][m]
            .get_or_init(|| {
                inner
                    .request_latency_family
                    .get_or_create_owned(&MethodLabels {
                        api: api.as_str(),
                        method: method.as_str(),
                    })
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Records one key backend call and its outcome.
    pub fn backend_call(
        &self,
        op: BackendOp,
        result: Result<(), &BackendError>,
        elapsed: Duration,
    ) {
        let (o, r) = (op as usize, outcome_index(result));
        let inner = &*self.0;
        inner.backend_slots[o][r]
            .get_or_init(|| {
                inner.backend_calls.get_or_create_owned(&BackendLabels {
                    operation: op.as_str(),
                    outcome: OUTCOMES[r],
                })
            })
            .inc();
        inner.backend_latency[o]
            .get_or_init(|| {
                inner
                    .backend_latency_family
                    .get_or_create_owned(&OperationLabels {
                        operation: op.as_str(),
                    })
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Records the result of a whole backend health probe (its backend calls are recorded separately
    /// with [`Metrics::backend_call`]); a successful one resets "seconds since last good probe".
    pub fn probe_result(&self, ok: bool) {
        self.0.backend_healthy.set(i64::from(ok));
        if ok {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            self.0
                .last_good_probe_unix_ms
                .store(now_ms, Ordering::Relaxed);
            let mono =
                u64::try_from(self.0.started.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1;
            self.0.last_good_probe_mono.store(mono, Ordering::Relaxed);
        }
    }

    pub fn local_kek_cache_hit(&self) {
        self.0.kek_hits.inc();
    }

    pub fn local_kek_cache_miss(&self) {
        self.0.kek_misses.inc();
    }

    pub fn set_local_kek_cache_size(&self, size: usize) {
        self.0.kek_size.set(i64::try_from(size).unwrap_or(i64::MAX));
    }

    pub fn local_kek_retired(&self, reason: RetireReason) {
        let i = RETIRE_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.0.kek_retired[i].inc();
    }

    pub fn key_id_changed(&self) {
        self.0.key_id_changes.inc();
    }

    /// A legacy v1 ciphertext was decrypted (`ok`) or could not be.
    pub fn legacy_decrypt(&self, ok: bool) {
        let reason = if ok { "ok" } else { "error" };
        self.0
            .legacy_decrypts
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A remote key entered `state` (`active`, `suspect`, `revoked`).
    pub fn key_state_changed(&self, state: &'static str) {
        self.0
            .key_state_changes
            .get_or_create(&ReasonLabels { reason: state })
            .inc();
    }

    /// Records a credential renewal attempt (`Ok` = renewed).
    pub fn token_refresh(&self, kind: TokenKind, result: Result<(), &BackendError>) {
        let (k, r) = (kind as usize, outcome_index(result));
        let inner = &*self.0;
        inner.token_slots[k][r]
            .get_or_init(|| {
                inner.tokens.get_or_create_owned(&TokenLabels {
                    kind: kind.as_str(),
                    outcome: OUTCOMES[r],
                })
            })
            .inc();
    }

    /// Counts an audit line that was dropped instead of blocking the request path.
    pub fn audit_line_dropped(&self) {
        self.0.audit_dropped.inc();
    }

    /// Mirrors a backend's own running count of authentications (read at scrape time).
    pub fn set_backend_auth_calls(&self, total: u64) {
        let seen = self.0.auth_calls.get();
        if total > seen {
            self.0.auth_calls.inc_by(total - seen);
        }
    }

    /// Seconds until `backend`'s identity credential expires (set at scrape time by a hook).
    pub fn set_identity_token_expiry(&self, backend: &'static str, seconds: f64) {
        self.0
            .identity_expiry
            .get_or_create(&IdentityLabels { backend })
            .set(seconds);
    }

    /// Mirrors the local backend's view of its key file (read at scrape time).
    pub fn set_local_key_file(&self, missing_keys: usize, reload_refused: bool) {
        let inner = &*self.0;
        inner
            .local_keys_missing
            .set(i64::try_from(missing_keys).unwrap_or(i64::MAX));
        inner.local_key_file_refused.set(i64::from(reload_refused));
    }

    /// Mirrors the local backend's unknown-key signal (read at scrape time).
    pub fn set_local_unknown_keys(&self, unknown_keys: usize, unwraps: u64) {
        let inner = &*self.0;
        inner
            .local_keys_unknown
            .set(i64::try_from(unknown_keys).unwrap_or(i64::MAX));
        mirror(&inner.local_unknown_key_unwraps, unwraps);
    }

    /// One escrow wrap of a new local KEK.
    pub fn escrow_wrap(&self, escrow: &str, outcome: Result<(), &crate::backend::BackendError>) {
        self.0
            .escrow_wraps
            .get_or_create(&EscrowLabels {
                escrow: escrow.to_string(),
                outcome: outcome.err().map_or("ok", |e| e.label()),
            })
            .inc();
    }

    /// One escrow unwrap attempt (the primary could not unwrap).
    pub fn escrow_unwrap(&self, escrow: &str, outcome: Result<(), &crate::backend::BackendError>) {
        self.0
            .escrow_unwraps
            .get_or_create(&EscrowLabels {
                escrow: escrow.to_string(),
                outcome: outcome.err().map_or("ok", |e| e.label()),
            })
            .inc();
    }

    /// Whether each escrow backend's last operation succeeded (read at scrape time).
    pub fn set_escrow_up(&self, health: &[(&'static str, Result<(), String>)]) {
        for (escrow, outcome) in health {
            self.0
                .escrow_up
                .get_or_create(&EscrowUpLabels { escrow })
                .set(i64::from(outcome.is_ok()));
        }
    }

    pub fn audit_write_error(&self) {
        self.0.audit_write_errors.inc();
    }

    /// Mirrors the socket's connection and `:authority` shim counters (read at scrape time).
    pub fn set_connection_stats(&self, stats: &crate::protocol::socket::ConnectionStats) {
        let c = &self.0.connections;
        c.open.set(stats.open() as i64);
        mirror(&c.accepted, stats.accepted());
        mirror(&c.refused, stats.refused());
        mirror(&c.accept_backoffs, stats.accept_backoffs());
        mirror(&c.handshake_timeouts, stats.handshake_timeouts());
        mirror(&c.idle_closed, stats.idle_closed());
        mirror(&c.authorities_rewritten, stats.shim.authorities_rewritten());
        mirror(&c.shim_errors, stats.shim.errors());
        mirror(&c.reencoding, stats.shim.reencoding_connections());
    }

    /// Runs `hook` before every [`Metrics::encode`], to set gauges from state owned elsewhere (e.g.
    /// the engine's cache size). Hold only weak references to things that own this `Metrics`.
    pub fn add_scrape_hook(&self, hook: impl Fn(&Metrics) + Send + Sync + 'static) {
        if let Ok(mut hooks) = self.0.scrape_hooks.lock() {
            hooks.push(Box::new(hook));
        }
    }

    /// The whole registry in the OpenMetrics text format (see [`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        if let Ok(hooks) = self.0.scrape_hooks.lock() {
            for hook in hooks.iter() {
                hook(self);
            }
        }
        let inner = &*self.0;
        // Time-derived gauges are computed at scrape time rather than by a ticking task.
        let last_ms = inner.last_good_probe_unix_ms.load(Ordering::Relaxed);
        inner.last_good_probe_ts.set(last_ms as f64 / 1000.0);
        let now = inner.started.elapsed();
        let since = match inner.last_good_probe_mono.load(Ordering::Relaxed) {
            0 => now,
            mono => now.saturating_sub(Duration::from_nanos(mono - 1)),
        };
        inner.since_good_probe.set(since.as_secs_f64());

        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &inner.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_value(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn records_requests_by_api_method_code() {
        let m = Metrics::new();
        m.grpc_request(
            Api::V2,
            Method::Encrypt,
            tonic::Code::Ok,
            Duration::from_millis(2),
        );
        m.grpc_request(
            Api::V2,
            Method::Encrypt,
            tonic::Code::Ok,
            Duration::from_millis(3),
        );
        m.grpc_request(
            Api::V1,
            Method::Decrypt,
            tonic::Code::Unavailable,
            Duration::from_millis(40),
        );
        let text = m.encode();
        assert_eq!(
            line_value(
                &text,
                r#"kms_plugin_grpc_requests_total{api="v2",method="Encrypt",code="OK"}"#
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            line_value(
                &text,
                r#"kms_plugin_grpc_requests_total{api="v1",method="Decrypt",code="Unavailable"}"#
            ),
            Some(1.0)
        );
        // Every method's series exists at zero from the start; methods an API lacks have none.
        assert_eq!(
            line_value(
                &text,
                r#"kms_plugin_grpc_requests_total{api="v2",method="Decrypt",code="OK"}"#
            ),
            Some(0.0)
        );
        assert!(!text.contains(r#"api="v1",method="Status""#));
        assert!(!text.contains(r#"api="v2",method="Version""#));
        assert_eq!(Method::from_name("Decrypt"), Some(Method::Decrypt));
        assert_eq!(Method::from_name("Nope"), None);
        assert_eq!(
            line_value(
                &text,
                r#"kms_plugin_grpc_request_duration_seconds_count{api="v2",method="Encrypt"}"#
            ),
            Some(2.0)
        );
        assert!(text.contains("# TYPE kms_plugin_grpc_request_duration_seconds histogram"));
        assert!(text.contains(r#"kms_plugin_build_info{version=""#));
        assert!(text.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn records_backend_calls_with_error_labels() {
        let m = Metrics::new();
        m.backend_call(BackendOp::Wrap, Ok(()), Duration::from_millis(30));
        m.backend_call(
            BackendOp::Unwrap,
            Err(&BackendError::KeyDisabled("k".into())),
            Duration::from_millis(30),
        );
        m.backend_call(
            BackendOp::Unwrap,
            Err(&BackendError::Timeout(Duration::from_secs(1))),
            Duration::from_secs(1),
        );
        let text = m.encode();
        assert_eq!(
            line_value(
                &text,
                r#"kms_plugin_backend_calls_total{operation="wrap",outcome="ok"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            line_value(
                &text,
                r#"kms_plugin_backend_calls_total{operation="unwrap",outcome="key_disabled"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            line_value(
                &text,
                r#"kms_plugin_backend_calls_total{operation="unwrap",outcome="timeout"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            line_value(
                &text,
                r#"kms_plugin_backend_call_duration_seconds_count{operation="unwrap"}"#
            ),
            Some(2.0)
        );
        // Error messages never leak into labels.
        assert!(!text.contains("\"k\""));
    }

    #[test]
    fn every_backend_error_label_is_a_known_outcome() {
        let all = [
            BackendError::Unavailable(String::new()),
            BackendError::Throttled(String::new()),
            BackendError::Timeout(Duration::ZERO),
            BackendError::Authentication(String::new()),
            BackendError::PermissionDenied(String::new()),
            BackendError::KeyDisabled(String::new()),
            BackendError::KeyNotFound(String::new()),
            BackendError::InvalidCiphertext(String::new()),
            BackendError::Config(String::new()),
            BackendError::Other(String::new()),
        ];
        for e in &all {
            assert_eq!(OUTCOMES[outcome_index(Err(e))], e.label());
        }
    }

    #[test]
    fn local_unknown_key_signal_follows_the_backend_report() {
        let m = Metrics::new();
        let check = |keys: f64, unwraps: f64| {
            let text = m.encode();
            assert_eq!(
                line_value(&text, "kms_plugin_local_keys_unknown "),
                Some(keys)
            );
            assert_eq!(
                line_value(&text, "kms_plugin_local_unknown_key_unwraps_total "),
                Some(unwraps)
            );
        };
        check(0.0, 0.0);
        m.set_local_unknown_keys(1, 3);
        check(1.0, 3.0);
        m.set_local_unknown_keys(0, 3);
        check(0.0, 3.0);
    }

    #[test]
    fn local_key_file_gauges_follow_the_backend_report() {
        let m = Metrics::new();
        let text = m.encode();
        assert_eq!(
            line_value(&text, "kms_plugin_local_keys_missing_from_file "),
            Some(0.0)
        );
        assert_eq!(
            line_value(&text, "kms_plugin_local_key_file_reload_refused "),
            Some(0.0)
        );
        m.set_local_key_file(2, true);
        let text = m.encode();
        assert_eq!(
            line_value(&text, "kms_plugin_local_keys_missing_from_file "),
            Some(2.0)
        );
        assert_eq!(
            line_value(&text, "kms_plugin_local_key_file_reload_refused "),
            Some(1.0)
        );
        m.set_local_key_file(0, false);
        assert_eq!(
            line_value(&m.encode(), "kms_plugin_local_key_file_reload_refused "),
            Some(0.0)
        );
    }

    #[test]
    fn cache_key_id_token_probe_and_audit_series() {
        let m = Metrics::new();
        m.local_kek_cache_hit();
        m.local_kek_cache_hit();
        m.local_kek_cache_miss();
        m.set_local_kek_cache_size(7);
        m.local_kek_retired(RetireReason::MaxUses);
        m.key_id_changed();
        m.token_refresh(TokenKind::Access, Ok(()));
        m.token_refresh(
            TokenKind::Identity,
            Err(&BackendError::Authentication("x".into())),
        );
        m.audit_line_dropped();
        m.set_backend_auth_calls(3);
        m.set_backend_auth_calls(2);
        let text = m.encode();
        assert_eq!(
            line_value(&text, "kms_plugin_backend_auth_calls_total "),
            Some(3.0)
        );
        assert_eq!(
            line_value(&text, "kms_plugin_local_kek_cache_hits_total "),
            Some(2.0)
        );
        assert_eq!(
            line_value(&text, "kms_plugin_local_kek_cache_misses_total "),
            Some(1.0)
        );
        assert_eq!(
            line_value(&text, "kms_plugin_local_kek_cache_size "),
            Some(7.0)
        );
        assert_eq!(
            line_value(
                &text,
                r#"kms_plugin_local_kek_retirements_total{reason="max_uses"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            line_value(
                &text,
                r#"kms_plugin_local_kek_retirements_total{reason="max_age"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            line_value(&text, "kms_plugin_key_id_changes_total "),
            Some(1.0)
        );
        assert_eq!(
            line_value(
                &text,
                r#"kms_plugin_token_refreshes_total{kind="access",outcome="ok"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            line_value(
                &text,
                r#"kms_plugin_token_refreshes_total{kind="identity",outcome="authentication"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            line_value(&text, "kms_plugin_audit_lines_dropped_total "),
            Some(1.0)
        );

        // No good probe yet: timestamp 0, "since" counts from start-up.
        assert_eq!(
            line_value(&text, "kms_plugin_last_good_probe_timestamp_seconds "),
            Some(0.0)
        );
        assert_eq!(line_value(&text, "kms_plugin_backend_healthy "), Some(0.0));
        m.backend_call(BackendOp::Probe, Ok(()), Duration::from_millis(1));
        m.probe_result(true);
        let text = m.encode();
        assert_eq!(line_value(&text, "kms_plugin_backend_healthy "), Some(1.0));
        let ts = line_value(&text, "kms_plugin_last_good_probe_timestamp_seconds ").unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((now - ts).abs() < 60.0, "{ts} vs {now}");
        let since = line_value(&text, "kms_plugin_since_last_good_probe_seconds ").unwrap();
        assert!((0.0..60.0).contains(&since));
        assert_eq!(
            line_value(
                &text,
                r#"kms_plugin_backend_calls_total{operation="probe",outcome="ok"}"#
            ),
            Some(1.0)
        );
        m.probe_result(false);
        assert_eq!(
            line_value(&m.encode(), "kms_plugin_backend_healthy "),
            Some(0.0)
        );
    }

    #[test]
    fn scrape_hooks_run_before_encoding() {
        let m = Metrics::new();
        let n = Arc::new(AtomicU64::new(3));
        let n2 = n.clone();
        m.add_scrape_hook(move |m| m.set_local_kek_cache_size(n2.load(Ordering::Relaxed) as usize));
        assert_eq!(
            line_value(&m.encode(), "kms_plugin_local_kek_cache_size "),
            Some(3.0)
        );
        n.store(5, Ordering::Relaxed);
        assert_eq!(
            line_value(&m.encode(), "kms_plugin_local_kek_cache_size "),
            Some(5.0)
        );
        // Histograms of unused operations are not exported until used.
        assert!(!m.encode().contains(r#"operation="auth""#));
        m.backend_call(BackendOp::Auth, Ok(()), Duration::from_millis(5));
        assert!(m
            .encode()
            .contains(r#"kms_plugin_backend_call_duration_seconds_count{operation="auth"} 1"#));
    }

    #[test]
    fn clones_share_state_across_threads() {
        let m = Metrics::new();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        m.grpc_request(
                            Api::V1,
                            Method::Encrypt,
                            tonic::Code::Ok,
                            Duration::from_micros(50),
                        );
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(
            line_value(
                &m.encode(),
                r#"kms_plugin_grpc_requests_total{api="v1",method="Encrypt",code="OK"}"#
            ),
            Some(4000.0)
        );
    }
}
