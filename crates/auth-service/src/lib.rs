//! Portico's auth-service: storage with a change feed, users and login,
//! join tokens, RBAC on every call, and the audit log, served over gRPC.

pub mod storage;
