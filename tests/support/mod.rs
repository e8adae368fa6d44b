//! Test-only helpers shared by the integration tests. Never part of the shipped binary.
#![allow(dead_code)]

#[cfg(feature = "akeyless")]
pub mod akeyless_fake;
#[cfg(feature = "aws-kms")]
pub mod aws;
#[cfg(feature = "azure-keyvault")]
pub mod azure_fake;
pub mod conformance;
pub mod engines;
pub mod etcd_values;
pub mod events;
pub mod external;
pub mod fault_proxy;
pub mod faulty;
#[cfg(feature = "gcp-kms")]
pub mod gcp_fake;
pub mod http_fake;
pub mod plugin;
pub mod raw_h2;

use std::time::Duration;

/// Polls `cond` until it holds, failing the test after `limit`. For conditions that have no event to
/// wait on; the poll period only bounds how late we notice.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
