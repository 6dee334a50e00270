//! The one error code every Portico service speaks, whatever the transport.

use std::fmt;

/// What kind of failure happened; maps to one gRPC code and one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    NotFound,
    AlreadyExists,
    BadRequest,
    Unauthenticated,
    Forbidden,
    Unavailable,
    /// A watcher asked for events older than the compaction horizon.
    TooOld,
    /// A caller is being rate limited.
    TooManyRequests,
    Internal,
}

impl Code {
    pub fn http_status(self) -> u16 {
        match self {
            Code::NotFound => 404,
            Code::AlreadyExists => 409,
            Code::BadRequest => 400,
            Code::Unauthenticated => 401,
            Code::Forbidden => 403,
            Code::Unavailable => 503,
            Code::TooOld => 410,
            Code::TooManyRequests => 429,
            Code::Internal => 500,
        }
    }
}

/// An error meant for people: `message` says what went wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: Code,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(Code::AlreadyExists, message)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(Code::BadRequest, message)
    }
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(Code::Unauthenticated, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(Code::Forbidden, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, message)
    }
    /// The message clients see for failures whose cause is logged, not shown.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}
