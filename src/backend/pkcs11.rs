//! PKCS#11 (placeholder while being written).
