//! Test-only helpers shared by the integration tests. Never part of the shipped binary.
#![allow(dead_code)]

pub mod conformance;
pub mod raw_h2;
