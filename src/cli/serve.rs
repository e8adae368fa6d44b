//! `kms-plugin serve`: build the backend, check it like the original plugin did (authenticate,
//! resolve the key, one round trip), then listen.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::{BackendKind, ServeArgs};
use crate::backend::local::{create_key_file, file_mode, LocalBackend};
use crate::backend::{Backend, BackendEvents};
use crate::engine::{Engine, EngineConfig, EngineError};
use crate::ops::audit::{self, AuditLog, AuditTarget};
use crate::ops::metrics::Metrics;
use crate::ops::{self as ops, OpsObserver};
use crate::protocol::observe::RequestObserver;
use crate::protocol::server::{self, ServerOptions};
use crate::protocol::socket::{self, ListenAddr, SocketOptions};

/// Environment variable that switches on drop-in compatibility with the original Akeyless plugin.
pub const AKEYLESS_DROP_IN_VAR: &str = "AKEYLESS_KEY_ENCRYPTION_KEY";
const AKEYLESS_DEFAULT_SOCKET: &str = "/tmp/akeyless_kms_plugin.sock";
const DEFAULT_SOCKET: &str = "/var/run/kms-plugin/kms.sock";

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// Resolves which backend to use when `--backend` is absent.
pub fn effective_backend(args: &ServeArgs) -> Option<BackendKind> {
    args.backend.or_else(|| {
        if args.local_key_file.is_some() {
            Some(BackendKind::Local)
        } else if env_set(AKEYLESS_DROP_IN_VAR) {
            Some(BackendKind::Akeyless)
        } else {
            None
        }
    })
}

pub fn effective_listen(args: &ServeArgs) -> anyhow::Result<ListenAddr> {
    if let Some(l) = &args.listen {
        return Ok(l.clone());
    }
    if args.backend.is_none() && env_set(AKEYLESS_DROP_IN_VAR) {
        let legacy = std::env::var("AKEYLESS_UNIX_SOCKET")
            .unwrap_or_else(|_| AKEYLESS_DEFAULT_SOCKET.to_string());
        return legacy
            .parse()
            .map_err(|e| anyhow::anyhow!("AKEYLESS_UNIX_SOCKET: {e}"));
    }
    Ok(ListenAddr::Path(DEFAULT_SOCKET.into()))
}

fn open_local(path: &Path, metrics: &Metrics) -> anyhow::Result<Arc<dyn Backend>> {
    if let Some(mode) = file_mode(path) {
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "key file is readable by group or others; chmod 600 it");
        }
    }
    let backend = Arc::new(LocalBackend::open(path)?);
    let weak = Arc::downgrade(&backend);
    metrics.add_scrape_hook(move |m| {
        if let Some(b) = weak.upgrade() {
            let report = b.key_file_report();
            m.set_local_key_file(report.missing.len(), report.reload_refused);
            m.set_local_unknown_keys(report.unknown_keys, report.unknown_key_unwraps);
        }
    });
    Ok(backend)
}

/// Without a configured backend, `serve` runs only when asked for the development mode: a typo
/// in the backend configuration must never end up encrypting under a fresh throw-away key.
fn check_dev_mode(args: &ServeArgs) -> anyhow::Result<()> {
    match (effective_backend(args), args.dev) {
        (None, false) => anyhow::bail!(
            "no key backend configured: give --backend (local with --local-key-file, akeyless, pkcs11, aws-kms, vault, kmip, gcp-kms or azure-keyvault; \
             see docs/backends.md), or pass --dev to run with a throw-away development key under --data-dir \
             (never for real Secrets)"
        ),
        (Some(kind), true) => anyhow::bail!(
            "--dev is only for running without a backend, but backend {} is configured \
             (--backend, --local-key-file or AKEYLESS_KEY_ENCRYPTION_KEY); remove --dev",
            clap::ValueEnum::to_possible_value(&kind)
                .map(|v| v.get_name().to_string())
                .unwrap_or_default()
        ),
        _ => Ok(()),
    }
}

/// Builds the backend named by `args`; backends that authenticate report it to `events`.
// Akeyless uses every parameter; other builds leave some unused.
#[cfg_attr(not(feature = "akeyless"), allow(unused_variables))]
async fn build_backend(
    args: &ServeArgs,
    metrics: &Metrics,
    events: Arc<dyn BackendEvents>,
) -> anyhow::Result<Arc<dyn Backend>> {
    let primary = match build_kind(args, effective_backend(args), metrics, events.clone()).await {
        Ok(primary) => primary,
        // With escrow the data stays readable without the primary (docs/escrow.md).
        Err(e) if !args.escrow_backend.is_empty() && effective_backend(args).is_some() => {
            tracing::error!(error = %format!("{e:#}"), "the primary backend could not be set up; serving as unhealthy, Decrypt goes through the escrow backends");
            let kind = effective_backend(args).map_or("unknown", kind_name);
            Arc::new(crate::backend::unreachable::Unreachable::new(
                kind,
                format!("{e:#}"),
            ))
        }
        Err(e) => return Err(e),
    };
    let Some(previous) = args.previous_backend else {
        return Ok(primary);
    };
    let name = |k: BackendKind| {
        clap::ValueEnum::to_possible_value(&k)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    };
    match effective_backend(args) {
        None => anyhow::bail!("--previous-backend needs --backend: the backend data moves to"),
        Some(kind) if kind == previous => anyhow::bail!(
            "--previous-backend {} is the same kind as --backend: within one key manager, rotate its key instead              (docs/rotation.md); a move between two configurations of the same kind is not supported",
            name(kind)
        ),
        Some(kind) => tracing::info!(
            backend = name(kind),
            previous = name(previous),
            "migration mode: new data under --backend; the previous backend only decrypts"
        ),
    }
    let previous = build_kind(args, Some(previous), metrics, events).await?;
    Ok(Arc::new(crate::backend::with_previous::WithPrevious::new(
        primary, previous,
    )))
}

/// Escrow takeover (docs/escrow.md): when the primary could not be set up, or its key answers with a
/// revocation or an authentication failure at start, the first escrow backend serves as primary, so
/// Status has a key_id and Encrypt works. A KMS v2 apiserver reads nothing until both do, so without
/// this a restarted apiserver could not read the Secrets the escrow protects. Transient failures do
/// not take over: the primary is only unreachable for now.
async fn escrow_takeover(
    primary: Arc<dyn Backend>,
    escrow: &[Arc<dyn Backend>],
    timeout: Duration,
) -> Arc<dyn Backend> {
    let Some(first) = escrow.first() else {
        return primary;
    };
    let failure = match tokio::time::timeout(timeout, primary.current_key()).await {
        Ok(Ok(_)) | Err(_) => return primary,
        Ok(Err(e)) if e.is_transient() => return primary,
        Ok(Err(e)) => e,
    };
    tracing::error!(
        primary = primary.kind(),
        escrow = first.kind(),
        error = %failure,
        "ESCROW TAKEOVER: the primary backend's key is not usable; the escrow backend wraps new local KEKs \
         and gives the key_id until the plugin is restarted with a working primary (docs/escrow.md)"
    );
    first.clone()
}

/// [`Backend::kind`] of the backend a [`BackendKind`] builds.
fn kind_name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Local => "local",
        BackendKind::Akeyless => "akeyless",
        BackendKind::Pkcs11 => "pkcs11",
        BackendKind::AwsKms => "aws-kms",
        BackendKind::Vault => "vault",
        BackendKind::Kmip => "kmip",
        BackendKind::GcpKms => "gcp-kms",
        BackendKind::AzureKeyvault => "azure-keyvault",
    }
}

/// The escrow backends of `--escrow-backend`, each built from its own flags.
async fn build_escrow(
    args: &ServeArgs,
    metrics: &Metrics,
    events: Arc<dyn BackendEvents>,
) -> anyhow::Result<Vec<Arc<dyn Backend>>> {
    let name = |k: BackendKind| {
        clap::ValueEnum::to_possible_value(&k)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    };
    let mut seen: Vec<BackendKind> = effective_backend(args).into_iter().collect();
    seen.extend(args.previous_backend);
    let mut out = Vec::new();
    for &kind in &args.escrow_backend {
        if effective_backend(args).is_none() {
            anyhow::bail!(
                "--escrow-backend needs --backend: escrow wrappings are made next to the primary's"
            );
        }
        if seen.contains(&kind) {
            anyhow::bail!(
                "--escrow-backend {} is the same kind as --backend, --previous-backend or another escrow: \
                 each backend kind is configured by its own flags, so each may appear once",
                name(kind)
            );
        }
        seen.push(kind);
        out.push(build_kind(args, Some(kind), metrics, events.clone()).await?);
    }
    if !out.is_empty() {
        tracing::info!(
            escrow = %args.escrow_backend.iter().map(|k| name(*k)).collect::<Vec<_>>().join(","),
            "escrow: every new local KEK is also wrapped by these backends (docs/escrow.md)"
        );
    }
    Ok(out)
}

#[cfg_attr(not(feature = "akeyless"), allow(unused_variables))]
pub(crate) async fn build_kind(
    args: &ServeArgs,
    kind: Option<BackendKind>,
    metrics: &Metrics,
    events: Arc<dyn BackendEvents>,
) -> anyhow::Result<Arc<dyn Backend>> {
    match kind {
        None => {
            // check_dev_mode ran first: this is an explicit --dev.
            let path = args.data_dir.join("dev-kek.json");
            if !path.exists() {
                let name = create_key_file(&path)?;
                tracing::warn!(path = %path.display(), key = %name, "created a NEW development key");
            }
            tracing::warn!(
                path = %path.display(),
                "DEVELOPMENT MODE (--dev): using a local key under --data-dir. Losing this file loses every \
                 Secret encrypted with it. For production use `kms-plugin keygen` + --backend local --local-key-file, or a KMS backend."
            );
            open_local(&path, metrics)
        }
        Some(BackendKind::Local) => {
            let path = args.local_key_file.as_deref().context(
                "--backend local needs --local-key-file (create one with `kms-plugin keygen FILE`)",
            )?;
            open_local(path, metrics)
        }
        #[cfg(feature = "akeyless")]
        Some(BackendKind::Akeyless) => {
            let state_dir = args
                .state_dir
                .clone()
                .unwrap_or_else(|| args.data_dir.clone());
            let backend = Arc::new(
                crate::backend::akeyless::AkeylessBackend::connect_from_env(
                    &args.akeyless,
                    Some(state_dir),
                    events,
                )
                .await?,
            );
            let weak = Arc::downgrade(&backend);
            metrics.add_scrape_hook(move |m| {
                if let Some(b) = weak.upgrade() {
                    m.set_backend_auth_calls(b.auth_calls());
                    if let Some(left) = b.uid_token_seconds_left() {
                        m.set_identity_token_expiry("akeyless", left);
                    }
                }
            });
            Ok(backend)
        }
        #[cfg(feature = "pkcs11")]
        Some(BackendKind::Pkcs11) => {
            Ok(crate::backend::pkcs11::from_args(&args.pkcs11, events).await?)
        }
        #[cfg(feature = "aws-kms")]
        Some(BackendKind::AwsKms) => {
            Ok(crate::backend::aws_kms::from_args(&args.aws, events).await?)
        }
        #[cfg(feature = "vault")]
        Some(BackendKind::Vault) => Ok(crate::backend::vault::from_args(&args.vault).await?),
        #[cfg(feature = "kmip")]
        Some(BackendKind::Kmip) => Ok(crate::backend::kmip::from_args(&args.kmip).await?),
        #[cfg(feature = "gcp-kms")]
        Some(BackendKind::GcpKms) => Ok(crate::backend::gcp_kms::from_args(&args.gcp).await?),
        #[cfg(feature = "azure-keyvault")]
        Some(BackendKind::AzureKeyvault) => {
            Ok(crate::backend::azure_keyvault::from_args(&args.azure).await?)
        }
        #[allow(unreachable_patterns)]
        Some(other) => anyhow::bail!("backend {other:?} is not compiled into this build"),
    }
}

/// Time the runtime gives tasks still running after `serve` returned (a hung backend call).
pub const EXIT_GRACE: Duration = Duration::from_secs(1);

fn engine_config(args: &ServeArgs) -> EngineConfig {
    EngineConfig {
        kek_max_uses: args.kek_max_uses.max(1),
        kek_max_age: args.kek_max_age,
        kek_cache_size: args.kek_cache_size.max(1),
        probe_interval: args.probe_interval,
        deep_probe_interval: args.deep_probe_interval,
        backend_timeout: args.backend_timeout,
        status_staleness: args
            .status_staleness
            .unwrap_or(args.probe_interval * 2 + args.backend_timeout),
        backend_concurrency: args.backend_concurrency.max(1),
        revoke_on_auth_failure: args.revoke_on_auth_failure,
        legacy_v1_writes: args.legacy_v1_writes,
        escrow_retry: args.escrow_retry,
        ..EngineConfig::default()
    }
}

fn validate(args: &ServeArgs) -> anyhow::Result<()> {
    if args.probe_interval < Duration::from_millis(100) {
        anyhow::bail!("--probe-interval must be at least 100ms");
    }
    if args.backend_timeout.is_zero() {
        anyhow::bail!("--backend-timeout must be greater than zero");
    }
    if args.kek_max_age.is_zero() {
        anyhow::bail!("--kek-max-age must be greater than zero");
    }
    check_dev_mode(args)
}

/// Writes out what is queued in the audit log before exiting.
async fn flush_audit(audit: Option<AuditLog>) {
    if let Some(log) = audit {
        let _ = tokio::task::spawn_blocking(move || log.flush()).await;
    }
}

/// Waits for SIGTERM or SIGINT.
async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("received SIGTERM"),
        _ = int.recv() => tracing::info!("received SIGINT"),
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<i32> {
    validate(&args)?;
    let listen = effective_listen(&args)?;
    let metrics = Metrics::new();
    // The audit log opens before the backend so the start-up authentication is recorded.
    let audit = match &args.audit_log {
        Some(target) => {
            let target: AuditTarget = target.parse()?;
            let log = AuditLog::open(target, Some(metrics.clone()))?;
            // logrotate: `postrotate kill -HUP`.
            audit::spawn_reopen_on_sighup(log.clone()).context("install SIGHUP handler")?;
            Some(log)
        }
        None => None,
    };
    let observer = Arc::new(OpsObserver::new(metrics.clone(), audit.clone()));
    let backend = match build_backend(&args, &metrics, observer.clone()).await {
        Ok(b) => b,
        Err(e) => {
            // Keep the audit lines of a failed start-up authentication.
            flush_audit(audit).await;
            return Err(e);
        }
    };
    let escrow = match build_escrow(&args, &metrics, observer.clone()).await {
        Ok(e) => e,
        Err(e) => {
            flush_audit(audit).await;
            return Err(e);
        }
    };
    let backend = escrow_takeover(backend, &escrow, args.backend_timeout).await;
    let engine = Engine::with_escrow(backend, escrow, engine_config(&args), observer.clone());
    let weak = Arc::downgrade(&engine);
    metrics.add_scrape_hook(move |m| {
        if let Some(engine) = weak.upgrade() {
            m.set_local_kek_cache_size(engine.cached_keks());
            m.set_escrow_up(&engine.escrow_health());
        }
    });

    // Bind first: a second instance fails fast, and the apiserver's connections wait in the backlog
    // instead of being refused while the backend is checked.
    let socket = socket::bind(
        &listen,
        &SocketOptions {
            mode: args.socket_mode,
            group: args.socket_group.clone(),
        },
    )?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The HTTP endpoint comes up before the start-up check so /livez answers while the backend is slow.
    let http_task = match args.http {
        Some(addr) => {
            let listener = ops::http::bind(addr).await?;
            tracing::info!(http = %addr, "serving /livez, /readyz, /healthz and /metrics");
            let detail_engine = engine.clone();
            let state = ops::http::HttpState::new(
                ops::liveness(&listen),
                ops::readiness(engine.clone()),
                Some(metrics.clone()),
            )
            .with_ready_detail(move || ops::escrow_detail(&detail_engine));
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(ops::http::serve(
                listener,
                state,
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            )))
        }
        None => None,
    };
    // Like the original plugin: resolve the key and do one round trip before listening. Permanent
    // failures stop here with the cause; transient ones start unhealthy and the probe keeps trying.
    match engine.probe(true).await {
        Ok(()) => {
            tracing::info!(key_id = %engine.status().key_id, backend = engine.backend_kind(), "backend check passed")
        }
        Err(e @ (EngineError::Backend(_) | EngineError::DeadlineExceeded(_)))
            if matches!(&e, EngineError::DeadlineExceeded(_))
                || matches!(&e, EngineError::Backend(b) if b.is_transient()) =>
        {
            tracing::warn!(error = %e, "backend not reachable at start; serving as unhealthy until it is");
        }
        // With escrow the data stays readable without the primary: serve Decrypts through the escrow
        // (Status unhealthy, so the apiserver writes nothing) instead of taking every Secret down.
        Err(e) if !args.escrow_backend.is_empty() => {
            tracing::error!(error = %e, "primary backend check failed; serving as unhealthy, Decrypt goes through the escrow backends (docs/escrow.md)");
        }
        Err(e) => {
            flush_audit(audit).await;
            return Err(anyhow::anyhow!("backend check failed: {e}"));
        }
    }

    let probes = tokio::spawn(engine.clone().run_probes(stop_rx));
    let observer: Arc<dyn RequestObserver> = observer;
    let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
    let options = ServerOptions {
        status_version: args.status_version,
        max_request_bytes: args.max_request_bytes,
        // The last EXIT_GRACE of --shutdown-timeout is for ending backend calls stuck in a token or
        // server that never answers (see main), so SIGTERM exits within --shutdown-timeout.
        shutdown_timeout: args.shutdown_timeout.saturating_sub(EXIT_GRACE),
        max_connections: args.max_connections as usize,
        max_concurrent_streams: args.max_concurrent_streams,
        max_header_list_bytes: args.max_header_list_bytes,
        handshake_timeout: args.handshake_timeout,
        idle_timeout: nonzero(args.idle_timeout),
        keepalive_interval: nonzero(args.keepalive_interval),
        ..ServerOptions::default()
    };
    let stats = options.stats.clone();
    metrics.add_scrape_hook(move |m| m.set_connection_stats(&stats));
    server::serve(engine, socket, options, observer, termination()).await?;
    let _ = stop_tx.send(true);
    probes.abort();
    if let Some(task) = http_task {
        let _ = task.await;
    }
    flush_audit(audit).await;
    tracing::info!("stopped");
    Ok(0)
}
