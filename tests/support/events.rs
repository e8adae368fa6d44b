//! A [`BackendEvents`] hook for tests: records every authentication event.

use std::sync::Mutex;

use kms_plugin::backend::{AuthEvent, AuthKind, BackendError, BackendEvents};

/// Keeps each event as (step, outcome label); checks the backend kind on the way in.
#[derive(Debug)]
pub struct Recorder {
    backend: &'static str,
    events: Mutex<Vec<(AuthKind, &'static str)>>,
}

impl Recorder {
    pub fn new(backend: &'static str) -> Self {
        Recorder {
            backend,
            events: Mutex::new(Vec::new()),
        }
    }

    /// The events so far, clearing the list.
    pub fn take(&self) -> Vec<(AuthKind, &'static str)> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }

    /// Whether `event` was seen (without clearing).
    pub fn saw(&self, event: (AuthKind, &'static str)) -> bool {
        self.events.lock().unwrap().contains(&event)
    }
}

impl BackendEvents for Recorder {
    fn auth(&self, event: AuthEvent<'_>) {
        assert_eq!(event.backend, self.backend);
        let outcome = event.outcome.map_or_else(BackendError::label, |()| "ok");
        self.events.lock().unwrap().push((event.kind, outcome));
    }
}
