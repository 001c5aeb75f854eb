//! Serves the API on a unix socket (the local API fluxctl uses) until shutdown.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::watch;

use super::routes::{handle, Api};

/// Group allowed to use the socket besides root; created by `scripts/install`.
pub const SOCKET_GROUP: &str = "flux";

/// Binds the API socket: refuses to steal it from a running fluxd, replaces a stale file left by
/// a crash, and restricts it to root and the `flux` group (mode 0660).
pub fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
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
    if let Ok(Some(group)) = nix::unistd::Group::from_name(SOCKET_GROUP) {
        nix::unistd::chown(path, None, Some(group.gid))
            .with_context(|| format!("chown {} to group {SOCKET_GROUP}", path.display()))?;
    }
    Ok(listener)
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
#[derive(Clone, Copy)]
enum Access {
    /// The unix socket: file permissions are the access control.
    Full,
    /// TCP: GET and HEAD, and the UI's files.
    ReadOnly,
}

/// Serves HTTP/1.1 on one accepted connection in its own task.
fn spawn_conn<S>(stream: S, api: Arc<Api>, access: Access)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = service_fn(move |req| {
            let api = api.clone();
            async move {
                Ok::<_, std::convert::Infallible>(match access {
                    Access::Full => handle(api, req).await,
                    Access::ReadOnly => read_only(api, req).await,
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
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "api accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

async fn read_only(
    api: Arc<Api>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<super::routes::Body> {
    use hyper::{Method, Response, StatusCode};
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header("allow", "GET, HEAD")
            .body(super::routes::Body::from(
                "read-only: use fluxctl on the host\n",
            ))
            .expect("static headers are valid");
    }
    if let Some((content_type, bytes)) = crate::ui::asset(req.uri().path()) {
        return Response::builder()
            .status(StatusCode::OK)
            .header("content-type", content_type)
            .header("cache-control", "no-cache")
            .body(super::routes::Body::from(bytes))
            .expect("static headers are valid");
    }
    handle(api, req).await
}
