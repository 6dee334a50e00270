//! The one place where `portico_core::Error` meets `tonic::Status`.

use portico_core::{Code, Error};

pub fn to_status(e: Error) -> tonic::Status {
    let code = match e.code {
        Code::NotFound => tonic::Code::NotFound,
        Code::AlreadyExists => tonic::Code::AlreadyExists,
        Code::BadRequest => tonic::Code::InvalidArgument,
        Code::Unauthenticated => tonic::Code::Unauthenticated,
        Code::Forbidden => tonic::Code::PermissionDenied,
        Code::Unavailable => tonic::Code::Unavailable,
        Code::TooOld => tonic::Code::OutOfRange,
        Code::TooManyRequests => tonic::Code::ResourceExhausted,
        Code::Internal => tonic::Code::Internal,
    };
    tonic::Status::new(code, e.message)
}

pub fn from_status(s: &tonic::Status) -> Error {
    let code = match s.code() {
        tonic::Code::NotFound => Code::NotFound,
        tonic::Code::AlreadyExists => Code::AlreadyExists,
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => Code::BadRequest,
        tonic::Code::Unauthenticated => Code::Unauthenticated,
        tonic::Code::PermissionDenied => Code::Forbidden,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            Code::Unavailable
        }
        tonic::Code::OutOfRange => Code::TooOld,
        tonic::Code::ResourceExhausted => Code::TooManyRequests,
        _ => Code::Internal,
    };
    let message = if code == Code::Unavailable && s.message().is_empty() {
        "the auth service is unavailable".to_string()
    } else {
        s.message().to_string()
    };
    Error::new(code, message)
}
