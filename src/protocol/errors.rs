//! The one place where engine errors become gRPC status codes.

use tonic::{Code, Status};

use crate::backend::BackendError;
use crate::engine::EngineError;

pub fn code_for(err: &EngineError) -> Code {
    match err {
        EngineError::InvalidInput(_) => Code::InvalidArgument,
        EngineError::NotReady(_) => Code::Unavailable,
        EngineError::Revoked(_) => Code::FailedPrecondition,
        EngineError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        EngineError::Internal(_) => Code::Internal,
        EngineError::Backend(b) => match b {
            BackendError::Unavailable(_) | BackendError::Throttled(_) => Code::Unavailable,
            BackendError::Timeout(_) => Code::DeadlineExceeded,
            BackendError::PermissionDenied(_) => Code::PermissionDenied,
            BackendError::KeyDisabled(_)
            | BackendError::KeyNotFound(_)
            | BackendError::Authentication(_)
            | BackendError::Config(_) => Code::FailedPrecondition,
            BackendError::InvalidCiphertext(_) => Code::InvalidArgument,
            BackendError::Other(_) => Code::Internal,
        },
    }
}

pub fn to_status(err: &EngineError) -> Status {
    Status::new(code_for(err), err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_maps_to_the_documented_code() {
        let cases = [
            (EngineError::InvalidInput("x".into()), Code::InvalidArgument),
            (EngineError::NotReady("x".into()), Code::Unavailable),
            (EngineError::Revoked("x".into()), Code::FailedPrecondition),
            (
                EngineError::Backend(BackendError::Unavailable("x".into())),
                Code::Unavailable,
            ),
            (
                EngineError::Backend(BackendError::Throttled("x".into())),
                Code::Unavailable,
            ),
            (
                EngineError::Backend(BackendError::Timeout(std::time::Duration::from_secs(1))),
                Code::DeadlineExceeded,
            ),
            (
                EngineError::Backend(BackendError::PermissionDenied("x".into())),
                Code::PermissionDenied,
            ),
            (
                EngineError::Backend(BackendError::KeyDisabled("x".into())),
                Code::FailedPrecondition,
            ),
            (
                EngineError::Backend(BackendError::InvalidCiphertext("x".into())),
                Code::InvalidArgument,
            ),
            (
                EngineError::DeadlineExceeded(std::time::Duration::from_secs(1)),
                Code::DeadlineExceeded,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(code_for(&err), code, "{err}");
        }
    }
}
