//! Serves the API on a unix socket (the local API fluxctl uses), read-only over plain TCP
//! (`--http`), and in full over TLS with a bearer token (`--api-listen`), until shutdown.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::watch;

use super::handlers::{handle, Api};

pub use super::SOCKET_GROUP;

/// Binds the API socket: refuses to steal it from a running fluxd, replaces a stale file left by
/// a crash, and restricts it to root and `group` (mode 0660; root only if there is no such
/// group).
pub fn bind_unix(path: &Path, group: &str) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "api: another fluxd is already serving {}; stop it first",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", path.display()))?;
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => nix::unistd::chown(path, None, Some(g.gid))
            .with_context(|| format!("chown {} to group {group}", path.display()))?,
        _ => tracing::warn!(
            socket = %path.display(),
            "api: group {group} does not exist: the API socket is for root only"
        ),
    }
    Ok(listener)
}

/// The remote API (`--api-listen`): TLS with a bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteApi {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub token_file: PathBuf,
}

/// The remote API's TLS acceptor and token, read from the files named by `--api-*-file`.
pub struct RemoteTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub token: Arc<Vec<u8>>,
}

/// The shortest token accepted: long enough that guessing is hopeless.
const MIN_TOKEN_LEN: usize = 16;

impl RemoteTls {
    pub fn load(r: &RemoteApi) -> anyhow::Result<RemoteTls> {
        use tokio_rustls::rustls;
        let read = |p: &Path, key: &str| {
            std::fs::read(p).with_context(|| format!("{key}: cannot read {}", p.display()))
        };
        let cert_pem = read(&r.cert_file, "api_cert_file")?;
        let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("api_cert_file: {}", r.cert_file.display()))?;
        if certs.is_empty() {
            bail!(
                "api_cert_file: no PEM certificate in {}",
                r.cert_file.display()
            );
        }
        let key_pem = read(&r.key_file, "api_key_file")?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .with_context(|| format!("api_key_file: {}", r.key_file.display()))?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "api_key_file: no PEM private key in {}",
                    r.key_file.display()
                )
            })?;
        let token = String::from_utf8(read(&r.token_file, "api_token_file")?)
            .map_err(|_| anyhow::anyhow!("api_token_file: not text"))?
            .trim()
            .to_string();
        if token.len() < MIN_TOKEN_LEN || token.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            bail!(
                "api_token_file: {} must hold one token of at least {MIN_TOKEN_LEN} characters without spaces",
                r.token_file.display()
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("api_cert_file: certificate and key do not form a usable pair")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(RemoteTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            token: Arc::new(token.into_bytes()),
        })
    }
}

/// Serves the full API over TLS (`--api-listen`) until `shutdown`; every request must carry
/// `Authorization: Bearer TOKEN`. There is no plain-text fallback: a client that does not speak
/// TLS fails the handshake and gets nothing.
pub async fn serve_remote(
    listener: tokio::net::TcpListener,
    tls: RemoteTls,
    api: Arc<Api>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let acceptor = tls.acceptor.clone();
                    let token = tls.token.clone();
                    let api = api.clone();
                    tokio::spawn(async move {
                        let handshake = tokio::time::timeout(
                            std::time::Duration::from_secs(10),
                            acceptor.accept(stream),
                        );
                        match handshake.await {
                            Ok(Ok(stream)) => spawn_conn(stream, api, Access::Token(token)),
                            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "remote api: TLS handshake failed"),
                            Err(_) => tracing::debug!(%peer, "remote api: TLS handshake timed out"),
                        }
                    });
                }
                Err(e) => accept_failed(e).await,
            },
            _ = shutdown.changed() => break,
        }
    }
}

/// Accepts connections until `shutdown` turns true, then removes the socket file.
pub async fn serve_unix(
    listener: UnixListener,
    path: PathBuf,
    api: Arc<Api>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => spawn_conn(stream, api.clone(), Access::Full),
                Err(e) => accept_failed(e).await,
            },
            _ = shutdown.changed() => break,
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Serves the web UI, `/metrics` and the read-only part of the API over TCP (`--http`) until
/// `shutdown`. Only GET and HEAD are answered: this socket has no access control, so nothing
/// that changes state is reachable through it.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => spawn_conn(stream, api.clone(), Access::ReadOnly),
                Err(e) => accept_failed(e).await,
            },
            _ = shutdown.changed() => break,
        }
    }
}

/// What a listener lets its clients do.
#[derive(Clone)]
enum Access {
    /// The unix socket: file permissions are the access control.
    Full,
    /// TCP: GET and HEAD, and the UI's files.
    ReadOnly,
    /// TLS: everything, for requests that carry this bearer token.
    Token(Arc<Vec<u8>>),
}

/// Serves HTTP/1.1 on one accepted connection in its own task.
fn spawn_conn<S>(stream: S, api: Arc<Api>, access: Access)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = service_fn(move |req| {
            let api = api.clone();
            let access = access.clone();
            async move {
                Ok::<_, std::convert::Infallible>(match access {
                    Access::Full => handle(api, req).await,
                    Access::ReadOnly => read_only(api, req).await,
                    Access::Token(token) => {
                        if bearer_matches(&req, &token) {
                            handle(api, req).await
                        } else {
                            unauthorized()
                        }
                    }
                })
            }
        });
        if let Err(e) = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), svc)
            .await
        {
            tracing::debug!(error = %e, "api connection ended with an error");
        }
    });
}

/// Out of fds or similar: back off instead of spinning on the error.
/// Out of fds, say: back off, and warn once per 10 s rather than at every retry.
async fn accept_failed(e: std::io::Error) {
    static WARNINGS: crate::throttle::Throttle = crate::throttle::Throttle::new();
    if let Some(suppressed) = WARNINGS.check(crate::proxy::health::now_ms(), 10_000) {
        tracing::warn!(error = %e, suppressed, "api accept failed; backing off");
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

async fn read_only(
    api: Arc<Api>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<super::handlers::Body> {
    use hyper::{Method, Response, StatusCode};
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header("allow", "GET, HEAD")
            .body(super::handlers::Body::from(
                "read-only: use fluxctl on the host\n",
            ))
            .expect("static headers are valid");
    }
    if let Some((content_type, bytes)) = crate::ui::asset(req.uri().path()) {
        return Response::builder()
            .status(StatusCode::OK)
            .header("content-type", content_type)
            .header("cache-control", "no-cache")
            .body(super::handlers::Body::from(bytes))
            .expect("static headers are valid");
    }
    handle(api, req).await
}

/// Whether the request carries `Authorization: Bearer TOKEN` with the right token, compared in
/// constant time (only the length can be learnt from timing).
fn bearer_matches<B>(req: &hyper::Request<B>, token: &[u8]) -> bool {
    let Some(value) = req.headers().get(hyper::header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    if value.len() < 7 || !value[..7].eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    constant_time_eq(value[7..].trim_ascii(), token)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn unauthorized() -> hyper::Response<super::handlers::Body> {
    let body = serde_json::to_vec(&super::views::ErrorBody {
        error: "unauthorized: missing or wrong API token (--token-file or FLUX_TOKEN)".into(),
        field: None,
    })
    .unwrap_or_default();
    hyper::Response::builder()
        .status(hyper::StatusCode::UNAUTHORIZED)
        .header("www-authenticate", "Bearer")
        .header("content-type", "application/json")
        .body(super::handlers::Body::from(body))
        .expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let token = b"0123456789abcdef";
        let req = |h: Option<&str>| {
            let mut b = hyper::Request::builder();
            if let Some(h) = h {
                b = b.header("authorization", h);
            }
            b.body(()).unwrap()
        };
        assert!(bearer_matches(&req(Some("Bearer 0123456789abcdef")), token));
        assert!(bearer_matches(&req(Some("bearer 0123456789abcdef")), token));
        assert!(!bearer_matches(&req(None), token));
        assert!(!bearer_matches(
            &req(Some("Bearer 0123456789abcdeX")),
            token
        ));
        assert!(!bearer_matches(&req(Some("Bearer 0123456789abcde")), token));
        assert!(!bearer_matches(&req(Some("Basic 0123456789abcdef")), token));
        assert!(!bearer_matches(&req(Some("Bearer")), token));
    }
}
