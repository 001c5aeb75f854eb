//! etcd's failures sorted by what the caller can do about them.

use std::future::Future;

use crate::store::{Result, StoreError};

/// gRPC status codes (fixed by the gRPC spec); named here because the crate does not re-export
/// tonic's `Code`.
pub(super) mod grpc {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const ABORTED: i32 = 10;
    pub const OUT_OF_RANGE: i32 = 11;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
    pub const DATA_LOSS: i32 = 15;
}

/// As `map_err`, with the cause of a transport failure spelt out (a refused TLS handshake,
/// say), which the crate's own message ("transport error") leaves out.
pub(super) fn map_connect_err(e: etcd_client::Error) -> StoreError {
    let mut chain = Vec::new();
    let mut source = match &e {
        etcd_client::Error::GRpcStatus(status) => std::error::Error::source(status),
        other => std::error::Error::source(other),
    };
    while let Some(s) = source {
        let m = s.to_string();
        if !chain.contains(&m) {
            chain.push(m);
        }
        source = s.source();
    }
    match map_err(e) {
        StoreError::Unavailable(m) if !chain.is_empty() => {
            StoreError::Unavailable(format!("{m}: {}", chain.join(": ")))
        }
        other => other,
    }
}

/// Sorts etcd's failures by what the caller can do: retry later (`Unavailable`), fix the request
/// (`Invalid`), or get an operator (`Storage`).
pub(super) fn map_err(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(ref status) if is_token_refused(&e) => {
            StoreError::Unavailable(format!("etcd: {}", status.message()))
        }
        E::GRpcStatus(status) => {
            let message = format!("etcd: {}", status.message());
            match status.code() as i32 {
                grpc::CANCELLED
                | grpc::UNKNOWN
                | grpc::DEADLINE_EXCEEDED
                | grpc::ABORTED
                | grpc::INTERNAL
                | grpc::UNAVAILABLE => StoreError::Unavailable(message),
                // Also the NOSPACE alarm, which no retry or smaller request fixes.
                grpc::RESOURCE_EXHAUSTED if status.message().contains("space exceeded") => {
                    StoreError::Storage(message)
                }
                grpc::DATA_LOSS => StoreError::Storage(message),
                // Invalid argument (too large, too many operations, duplicate key in a
                // transaction), too large for the gRPC limit, compacted, permissions, ...
                _ => StoreError::Invalid(message),
            }
        }
        E::InvalidArgs(m) | E::EndpointError(m) => StoreError::Invalid(m),
        E::InvalidUri(e) => StoreError::Invalid(format!("bad etcd endpoint: {e}")),
        E::Utf8Error(e) => StoreError::Storage(e.to_string()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// etcd no longer accepts our token (restarted, or the token's TTL ran out), or got a request
/// without one (another task was just logging in again): both pass once we log in again.
pub(super) fn is_token_refused(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => is_token_refusal(s.message()),
        _ => false,
    }
}

fn is_token_refusal(message: &str) -> bool {
    message.contains("invalid auth token") || message.contains("user name is empty")
}

/// Makes a request once more if etcd refused it for a stale token: `Core::fail` has logged in
/// again by then, so a caller (`fluxctl`, the API) does not see a failure etcd's restart caused.
pub(super) async fn once_more_if_token_refused<T, F>(request: impl Fn() -> F) -> Result<T>
where
    F: Future<Output = Result<T>>,
{
    match request().await {
        Err(StoreError::Unavailable(m)) if is_token_refusal(&m) => request().await,
        other => other,
    }
}

pub(super) fn is_compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() as i32 == grpc::OUT_OF_RANGE && s.message().contains("compacted"))
}

/// The crate reports a vanished lease as its own error from `keep_alive`, etcd as NOT_FOUND from
/// a put or revoke.
pub(super) fn is_lease_gone(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => {
            s.code() as i32 == grpc::NOT_FOUND && s.message().contains("lease not found")
        }
        _ => false,
    }
}
