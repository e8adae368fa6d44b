//! AWS credentials renewed in the background while the current ones are still good
//! (stale-while-revalidate).
//!
//! The SDK's own lazy cache renews temporary credentials 10-15 s before they expire, on the
//! calling request, and does not keep serving the old ones when that renewal fails. An STS or
//! IMDS hiccup in those seconds would then fail or stall every KMS call. This cache instead:
//! - serves the current credentials from memory while they are valid for long enough;
//! - inside the renewal window (the last 5 minutes, or the last half of a shorter lifetime) it
//!   still serves them at once, and starts one renewal in the background;
//! - when a background renewal fails it keeps serving the current credentials and retries with
//!   a back-off, until they are about to expire;
//! - only then, or when it holds nothing, does a caller wait for a load, one at a time, bounded
//!   by a timeout; callers queued behind a failed load get that failure instead of one more
//!   load each.
//!
//! No lock is held across a network call except the one that serialises loads.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{future, ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;

use crate::backend::{AuthEvent, AuthKind, BackendError, BackendEvents};

/// When renewals start and how they are bounded. [`Timing::default`] is what the plugin uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Renew in the background when the credentials expire within this (or within half their
    /// lifetime, whichever is shorter).
    pub renew_ahead: Duration,
    /// Callers wait for a load when the credentials expire within this (or within a fifth of
    /// their lifetime): a request signed now must still be valid when AWS checks it.
    pub must_load: Duration,
    /// Bound on one load (the SDK's own default load timeout is 5 s).
    pub load_timeout: Duration,
    /// First pause after a failed background renewal; doubles up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            renew_ahead: Duration::from_secs(300),
            must_load: Duration::from_secs(10),
            load_timeout: Duration::from_secs(5),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// What a caller does with the cache's current state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    Serve,
    ServeAndRenew,
    Load,
}

struct Held {
    creds: Credentials,
    obtained: SystemTime,
}

#[derive(Default)]
struct State {
    current: Option<Held>,
    renewing: bool,
    retry_at: Option<Instant>,
    failures: u32,
    /// Counts finished loads; a caller that queued before a load and finds it failed gives up.
    loads: u64,
    last_error: Option<String>,
}

/// Where the current credentials stand, by their expiry alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Window {
    Fresh,
    Renew,
    Load,
}

impl State {
    fn window(&self, timing: &Timing, now: SystemTime) -> Window {
        let Some(held) = &self.current else {
            return Window::Load;
        };
        let Some(expiry) = held.creds.expiry() else {
            return Window::Fresh; // long-term keys do not expire
        };
        let lifetime = expiry.duration_since(held.obtained).unwrap_or_default();
        let left = expiry.duration_since(now).unwrap_or_default();
        if left <= timing.must_load.min(lifetime / 5) {
            Window::Load
        } else if left <= timing.renew_ahead.min(lifetime / 2) {
            Window::Renew
        } else {
            Window::Fresh
        }
    }

    fn plan(&self, timing: &Timing, now: SystemTime, clock: Instant) -> Plan {
        match self.window(timing, now) {
            Window::Fresh => Plan::Serve,
            Window::Load => Plan::Load,
            Window::Renew if self.renewing || self.retry_at.is_some_and(|t| clock < t) => {
                Plan::Serve
            }
            Window::Renew => Plan::ServeAndRenew,
        }
    }

    /// The current credentials if they have not expired yet.
    fn unexpired(&self, now: SystemTime) -> Option<Credentials> {
        self.current
            .as_ref()
            .filter(|h| h.creds.expiry().is_none_or(|e| e > now))
            .map(|h| h.creds.clone())
    }
}

struct Shared {
    source: SharedCredentialsProvider,
    state: Mutex<State>,
    load: Arc<tokio::sync::Mutex<()>>,
    events: Arc<dyn BackendEvents>,
    backend: &'static str,
    timing: Timing,
}

/// A [`ProvideCredentials`] over `source` with the behaviour described in the module docs. Give
/// it to the SDK together with `IdentityCache::no_cache()`, so that this is the only cache.
#[derive(Clone)]
pub struct RenewingCredentials {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RenewingCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenewingCredentials")
            .field("source", &self.shared.source)
            .field("timing", &self.shared.timing)
            .finish_non_exhaustive()
    }
}

impl RenewingCredentials {
    /// Wraps `source`; renewals are reported to `events` as `backend`'s token refreshes (the
    /// first load as a login).
    pub fn new(
        source: SharedCredentialsProvider,
        timing: Timing,
        events: Arc<dyn BackendEvents>,
        backend: &'static str,
    ) -> Self {
        RenewingCredentials {
            shared: Arc::new(Shared {
                source,
                state: Mutex::new(State::default()),
                load: Arc::new(tokio::sync::Mutex::new(())),
                events,
                backend,
                timing,
            }),
        }
    }

    async fn resolve(&self) -> Result<Credentials, CredentialsError> {
        let (plan, current) = {
            let state = self.shared.lock();
            let plan = state.plan(&self.shared.timing, SystemTime::now(), Instant::now());
            (plan, state.current.as_ref().map(|h| h.creds.clone()))
        };
        match (plan, current) {
            (Plan::Serve, Some(c)) => Ok(c),
            (Plan::ServeAndRenew, Some(c)) => {
                self.renew_in_background();
                Ok(c)
            }
            _ => self.load_now().await,
        }
    }

    /// Starts one background renewal unless one runs already. Without a runtime to run it on,
    /// the next caller past `must_load` loads instead.
    fn renew_in_background(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        {
            let mut state = self.shared.lock();
            if state.renewing {
                return;
            }
            state.renewing = true;
        }
        let this = self.clone();
        rt.spawn(async move {
            let _load = this.shared.load.clone().lock_owned().await;
            // A caller may have loaded while this task waited for the lock.
            let still_needed = this.shared.lock().window(&this.shared.timing, SystemTime::now())
                != Window::Fresh;
            let outcome = if still_needed {
                Some(this.fetch().await)
            } else {
                None
            };
            let mut state = this.shared.lock();
            state.renewing = false;
            match outcome {
                Some(Ok(creds)) => this.store(&mut state, creds, AuthKind::TokenRefresh),
                Some(Err(e)) => {
                    let valid_for = state
                        .current
                        .as_ref()
                        .and_then(|h| h.creds.expiry())
                        .and_then(|e| e.duration_since(SystemTime::now()).ok())
                        .unwrap_or_default();
                    this.failed(&mut state, &e, AuthKind::TokenRefresh);
                    tracing::warn!(
                        backend = this.shared.backend,
                        error = %super::error_chain(&e),
                        valid_for_s = valid_for.as_secs(),
                        retry_in_ms = state
                            .retry_at
                            .map(|t| t.saturating_duration_since(Instant::now()).as_millis() as u64),
                        "renewing the AWS credentials failed; the current ones are still valid and stay in use"
                    );
                }
                None => {}
            }
        });
    }

    async fn load_now(&self) -> Result<Credentials, CredentialsError> {
        let queued_at = self.shared.lock().loads;
        let _load = self.shared.load.lock().await;
        {
            let state = self.shared.lock();
            match state.plan(&self.shared.timing, SystemTime::now(), Instant::now()) {
                Plan::Load => {}
                _ => {
                    if let Some(h) = &state.current {
                        return Ok(h.creds.clone());
                    }
                }
            }
            if state.loads != queued_at {
                // A load finished while this caller waited, and it did not help.
                if let Some(c) = state.unexpired(SystemTime::now()) {
                    return Ok(c);
                }
                if let Some(msg) = &state.last_error {
                    return Err(CredentialsError::provider_error(msg.clone()));
                }
            }
        }
        let kind = if self.shared.lock().current.is_some() {
            AuthKind::TokenRefresh
        } else {
            AuthKind::Login
        };
        let outcome = self.fetch().await;
        let mut state = self.shared.lock();
        match outcome {
            Ok(creds) => {
                self.store(&mut state, creds.clone(), kind);
                Ok(creds)
            }
            Err(e) => {
                self.failed(&mut state, &e, kind);
                match state.unexpired(SystemTime::now()) {
                    Some(c) => {
                        tracing::warn!(
                            backend = self.shared.backend,
                            error = %super::error_chain(&e),
                            "renewing the AWS credentials failed shortly before they expire; using them while they last"
                        );
                        Ok(c)
                    }
                    None => Err(e),
                }
            }
        }
    }

    /// One call to the source, bounded by the load timeout. The error keeps only the chain's
    /// `Display` text: the SDK's `Debug` forms can hold raw responses.
    async fn fetch(&self) -> Result<Credentials, CredentialsError> {
        let t = self.shared.timing.load_timeout;
        match tokio::time::timeout(t, self.shared.source.provide_credentials()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(CredentialsError::provider_error(super::error_chain(&e))),
            Err(_) => Err(CredentialsError::provider_timed_out(t)),
        }
    }

    fn store(&self, state: &mut State, creds: Credentials, kind: AuthKind) {
        if state.failures > 0 {
            tracing::info!(
                backend = self.shared.backend,
                failures = state.failures,
                "AWS credentials renewed again"
            );
        }
        state.current = Some(Held {
            creds,
            obtained: SystemTime::now(),
        });
        state.failures = 0;
        state.retry_at = None;
        state.loads += 1;
        state.last_error = None;
        self.shared.events.auth(AuthEvent {
            backend: self.shared.backend,
            kind,
            outcome: Ok(()),
        });
    }

    fn failed(&self, state: &mut State, e: &CredentialsError, kind: AuthKind) {
        state.failures = state.failures.saturating_add(1);
        let t = &self.shared.timing;
        let pause = t
            .retry_min
            .saturating_mul(1u32 << (state.failures - 1).min(16))
            .min(t.retry_max);
        state.retry_at = Some(Instant::now() + pause);
        state.loads += 1;
        let msg = super::error_chain(e);
        let err = BackendError::Authentication(format!("AWS credentials: {msg}"));
        state.last_error = Some(msg);
        self.shared.events.auth(AuthEvent {
            backend: self.shared.backend,
            kind,
            outcome: Err(&err),
        });
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a few plain fields written in one go: a panic elsewhere cannot leave it
        // half-updated, so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ProvideCredentials for RenewingCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(self.resolve())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers from a script; each answer is `Ok(lifetime)` or `Err(())`. Counts calls.
    #[derive(Debug)]
    struct Script {
        answers: Mutex<VecDeque<Result<Duration, ()>>>,
        calls: AtomicUsize,
        entered: AtomicUsize,
        gate: tokio::sync::Semaphore,
    }

    impl Script {
        fn new(answers: &[Result<u64, ()>]) -> Arc<Self> {
            Arc::new(Script {
                answers: Mutex::new(answers.iter().map(|a| a.map(Duration::from_secs)).collect()),
                calls: AtomicUsize::new(0),
                entered: AtomicUsize::new(0),
                gate: tokio::sync::Semaphore::new(1_000),
            })
        }
    }

    #[derive(Debug, Clone)]
    struct Source(Arc<Script>);

    impl ProvideCredentials for Source {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            future::ProvideCredentials::new(async move {
                self.0.entered.fetch_add(1, Ordering::SeqCst);
                let _permit = self.0.gate.acquire().await.unwrap();
                let n = self.0.calls.fetch_add(1, Ordering::SeqCst);
                match self.0.answers.lock().unwrap().pop_front() {
                    Some(Ok(life)) => Ok(Credentials::new(
                        format!("ASIA{n}"),
                        "secret",
                        Some("token".into()),
                        Some(SystemTime::now() + life),
                        "script",
                    )),
                    _ => Err(CredentialsError::provider_error("sts said no")),
                }
            })
        }
    }

    fn cache(script: &Arc<Script>, timing: Timing) -> RenewingCredentials {
        RenewingCredentials::new(
            SharedCredentialsProvider::new(Source(script.clone())),
            timing,
            crate::backend::no_events(),
            "aws-kms",
        )
    }

    fn timing() -> Timing {
        Timing {
            renew_ahead: Duration::from_secs(300),
            must_load: Duration::from_secs(10),
            load_timeout: Duration::from_millis(500),
            retry_min: Duration::from_millis(1),
            retry_max: Duration::from_millis(1),
        }
    }

    fn state_with(lifetime: u64, left: u64) -> State {
        let now = SystemTime::now();
        let expiry = now + Duration::from_secs(left);
        State {
            current: Some(Held {
                creds: Credentials::new("a", "s", None, Some(expiry), "t"),
                obtained: expiry - Duration::from_secs(lifetime),
            }),
            ..State::default()
        }
    }

    #[test]
    fn plan_follows_the_windows() {
        let t = Timing::default();
        let (now, clock) = (SystemTime::now(), Instant::now());
        assert_eq!(State::default().plan(&t, now, clock), Plan::Load);
        // One hour credentials: serve until 5 min left, renew until 10 s left, then load.
        assert_eq!(state_with(3600, 1000).plan(&t, now, clock), Plan::Serve);
        assert_eq!(
            state_with(3600, 200).plan(&t, now, clock),
            Plan::ServeAndRenew
        );
        assert_eq!(state_with(3600, 5).plan(&t, now, clock), Plan::Load);
        // 20 s credentials: the windows shrink to half and a fifth of the lifetime.
        assert_eq!(state_with(20, 15).plan(&t, now, clock), Plan::Serve);
        assert_eq!(state_with(20, 8).plan(&t, now, clock), Plan::ServeAndRenew);
        assert_eq!(state_with(20, 3).plan(&t, now, clock), Plan::Load);
        // A renewal in flight, or a back-off after a failure: serve without a second one.
        let mut s = state_with(3600, 200);
        s.renewing = true;
        assert_eq!(s.plan(&t, now, clock), Plan::Serve);
        s.renewing = false;
        s.retry_at = Some(clock + Duration::from_secs(1));
        assert_eq!(s.plan(&t, now, clock), Plan::Serve);
        // Long-term keys are never renewed.
        let s = State {
            current: Some(Held {
                creds: Credentials::new("a", "s", None, None, "t"),
                obtained: now,
            }),
            ..State::default()
        };
        assert_eq!(s.plan(&t, now, clock), Plan::Serve);
    }

    /// Puts credentials that expire in `left` s, obtained an hour ago, in `c`: inside the
    /// renewal window and outside the load window.
    fn seed(c: &RenewingCredentials, left: u64) {
        c.shared.lock().current = Some(Held {
            creds: Credentials::new(
                "SEED",
                "s",
                None,
                Some(SystemTime::now() + Duration::from_secs(left)),
                "t",
            ),
            obtained: SystemTime::now() - Duration::from_secs(3600),
        });
    }

    #[tokio::test]
    async fn fresh_credentials_are_served_from_memory() {
        let script = Script::new(&[Ok(3600)]);
        let c = cache(&script, timing());
        let a = c.provide_credentials().await.unwrap();
        for _ in 0..100 {
            let b = c.provide_credentials().await.unwrap();
            assert_eq!(a.access_key_id(), b.access_key_id());
        }
        assert_eq!(script.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failing_renewal_keeps_the_current_credentials_in_use() {
        let script = Script::new(&[Err(()), Err(()), Err(()), Ok(3600)]);
        let c = cache(&script, timing());
        seed(&c, 60);
        // Every call answers at once with the current credentials while renewals fail behind it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut renewed = None;
        while Instant::now() < deadline {
            let got = c.provide_credentials().await.unwrap();
            if got.access_key_id() != "SEED" {
                renewed = Some(got.access_key_id().to_string());
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(renewed.as_deref(), Some("ASIA3"));
        assert_eq!(script.calls.load(Ordering::SeqCst), 4);
        assert_eq!(c.shared.lock().failures, 0);
    }

    #[tokio::test]
    async fn a_renewal_that_hangs_does_not_stall_callers() {
        let script = Script::new(&[Ok(3600)]);
        let c = cache(&script, timing());
        seed(&c, 60);
        // Hold the source: the background renewal blocks inside it.
        let hold = script.gate.acquire_many(1_000).await.unwrap();
        for _ in 0..50 {
            let got = tokio::time::timeout(Duration::from_millis(200), c.provide_credentials())
                .await
                .expect("a caller waited for the hanging renewal")
                .unwrap();
            assert_eq!(got.access_key_id(), "SEED");
            tokio::task::yield_now().await;
        }
        assert!(c.shared.lock().renewing);
        drop(hold);
    }

    #[tokio::test]
    async fn callers_queued_behind_a_failed_load_get_its_error_without_loading_again() {
        let script = Script::new(&[Err(()), Ok(3600)]);
        let c = cache(&script, timing());
        let hold = script.gate.acquire_many(1_000).await.unwrap();
        let spawn = |c: &RenewingCredentials| {
            let c = c.clone();
            tokio::spawn(async move { c.provide_credentials().await })
        };
        let mut waiters = vec![spawn(&c)];
        // The first caller holds the load lock and waits inside the source.
        while script.entered.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        waiters.extend((0..7).map(|_| spawn(&c)));
        // On this single-threaded runtime one yield lets each new caller run up to the lock.
        tokio::task::yield_now().await;
        drop(hold);
        for w in waiters {
            let e = w.await.unwrap().unwrap_err();
            assert!(super::super::error_chain(&e).contains("sts said no"), "{e}");
        }
        assert_eq!(script.calls.load(Ordering::SeqCst), 1);
        // The next caller tries again, and succeeds.
        let c2 = c.provide_credentials().await.unwrap();
        assert_eq!(c2.access_key_id(), "ASIA1");
    }

    #[tokio::test]
    async fn a_load_that_hangs_is_bounded_by_the_timeout() {
        let script = Script::new(&[Ok(3600)]);
        let c = cache(&script, timing());
        let _hold = script.gate.acquire_many(1_000).await.unwrap();
        let e = c.provide_credentials().await.unwrap_err();
        assert!(matches!(e, CredentialsError::ProviderTimedOut(_)), "{e:?}");
    }

    #[tokio::test]
    async fn near_expiry_a_failed_load_still_hands_out_the_unexpired_credentials() {
        let script = Script::new(&[Err(())]);
        let c = cache(&script, timing());
        seed(&c, 5); // inside the 10 s load window
        let got = c.provide_credentials().await.unwrap();
        assert_eq!(got.access_key_id(), "SEED");
        assert_eq!(script.calls.load(Ordering::SeqCst), 1);
    }
}
