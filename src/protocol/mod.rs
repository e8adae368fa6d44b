//! The gRPC side of the plugin: protocol adapters, socket listener and the `:authority` shim.
pub mod authority;
