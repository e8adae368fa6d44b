//! Request deadlines from the `grpc-timeout` header.
//!
//! tonic enforces the header itself but answers CANCELLED when it expires; we stop a little earlier
//! so the apiserver sees DEADLINE_EXCEEDED with a reason instead.

use std::time::Duration;

use tonic::metadata::MetadataMap;

/// Used when a client sends no deadline, so no call can hang forever.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The time this request may take: its deadline less a margin for the reply, capped at the default.
pub fn budget(metadata: &MetadataMap) -> Duration {
    let requested = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or(DEFAULT_DEADLINE)
        .min(DEFAULT_DEADLINE);
    let margin = (requested / 20).min(Duration::from_millis(100));
    requested - margin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_rejects_garbage() {
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_grpc_timeout("2999m"),
            Some(Duration::from_millis(2999))
        );
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        for bad in ["", "S", "3", "3s", "123456789S", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn budget_keeps_a_margin_and_a_cap() {
        let mut md = MetadataMap::new();
        assert_eq!(budget(&md), DEFAULT_DEADLINE - Duration::from_millis(100));
        md.insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(budget(&md), Duration::from_millis(2900));
        md.insert("grpc-timeout", "100m".parse().unwrap());
        assert_eq!(budget(&md), Duration::from_millis(95));
    }
}
