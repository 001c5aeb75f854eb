//! The API client fluxctl uses: HTTP/1.1 over the local unix socket, over TCP (the read-only
//! listener), or over TLS with a bearer token (the remote API, `fluxd run --api-listen`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::views::ErrorBody;

/// Where the API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
    /// `https://HOST:PORT`: the remote API, TLS with a bearer token.
    Https(String),
}

impl Endpoint {
    /// `unix:///run/fluxd/fluxd.sock`, `http://HOST:PORT` or `https://HOST:PORT`.
    pub fn parse(s: &str) -> Result<Self, crate::model::InvalidInput> {
        if let Some(p) = s.strip_prefix("unix://") {
            if p.starts_with('/') {
                return Ok(Endpoint::Unix(PathBuf::from(p)));
            }
        } else if let Some(hp) = s.strip_prefix("http://") {
            let hp = hp.trim_end_matches('/');
            if !hp.is_empty() && !hp.contains('/') {
                return Ok(Endpoint::Tcp(hp.to_string()));
            }
        } else if let Some(hp) = s.strip_prefix("https://") {
            let hp = hp.trim_end_matches('/');
            if !hp.is_empty() && !hp.contains('/') && hp.contains(':') {
                return Ok(Endpoint::Https(hp.to_string()));
            }
        }
        Err(crate::model::InvalidInput::new(
            "api",
            "expected unix:///PATH, http://HOST:PORT or https://HOST:PORT",
        )
        .value(s))
    }

    fn display(&self) -> String {
        match self {
            Endpoint::Unix(p) => format!("unix://{}", p.display()),
            Endpoint::Tcp(a) => format!("http://{a}"),
            Endpoint::Https(a) => format!("https://{a}"),
        }
    }
}

/// What the remote API needs besides its address: the token sent as `Authorization: Bearer`,
/// and the CA that signed fluxd's certificate (the system's CAs when not given).
#[derive(Debug, Clone, Default)]
pub struct RemoteAuth {
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
}

/// The flags every client of the remote API takes (`fluxctl`, `fluxd debug`, `fluxd edge`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RemoteFlags {
    /// For https:// APIs: file holding the bearer token (or the token itself in FLUX_TOKEN).
    #[arg(long, global = true, env = "FLUX_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// For https:// APIs: PEM file of the CA that signed fluxd's certificate [default: the
    /// system's CAs].
    #[arg(long, global = true, env = "FLUX_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

impl RemoteFlags {
    /// The token from `--token-file`, else `FLUX_TOKEN`; the CA file as given. The error is
    /// one line naming the flag.
    pub fn auth(&self) -> Result<RemoteAuth, String> {
        let token = match &self.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| format!("token-file: cannot read {}: {e}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            None => std::env::var("FLUX_TOKEN")
                .ok()
                .map(|t| t.trim().to_string()),
        };
        Ok(RemoteAuth {
            token: token.filter(|t| !t.is_empty()),
            ca_file: self.ca_file.clone(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered: the daemon is down or the path is wrong.
    #[error("cannot reach fluxd at {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    /// The daemon refused the request (4xx): bad input, unknown name, conflict.
    #[error("{message}")]
    Rejected { status: u16, message: String },
    /// The daemon failed (5xx), e.g. its store is unavailable.
    #[error("fluxd: {message}")]
    Failed { status: u16, message: String },
    /// Not allowed: the socket's permissions, or the remote API's token.
    #[error("{message}")]
    Denied { message: String },
    /// The client cannot be set up (e.g. an unreadable CA file).
    #[error("{0}")]
    Setup(String),
}

pub struct Client {
    endpoint: Endpoint,
    token: Option<String>,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Self {
        Client {
            endpoint,
            token: None,
            tls: None,
        }
    }

    /// A client for any endpoint; for `https://` it trusts `auth.ca_file` (or the system's
    /// CAs) and sends `auth.token`.
    pub fn with_auth(endpoint: Endpoint, auth: &RemoteAuth) -> Result<Self, ClientError> {
        let tls = match endpoint {
            Endpoint::Https(_) => Some(tls_connector(auth.ca_file.as_deref())?),
            _ => None,
        };
        Ok(Client {
            endpoint,
            token: auth.token.clone(),
            tls,
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn put<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        self.call(Method::PUT, path, Some(body)).await
    }

    pub async fn patch<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        self.call(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::DELETE, path, None).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.send(method, path, body).await?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Failed {
                status: status.as_u16(),
                message: format!("unreadable answer: {e}"),
            });
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_string());
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            Err(ClientError::Denied { message })
        } else if status.is_client_error() {
            Err(ClientError::Rejected {
                status: status.as_u16(),
                message,
            })
        } else {
            Err(ClientError::Failed {
                status: status.as_u16(),
                message,
            })
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            endpoint: self.endpoint.display(),
            reason,
        };
        let (mut sender, host) = match &self.endpoint {
            Endpoint::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await;
                if let Err(e) = &s {
                    if e.kind() == std::io::ErrorKind::PermissionDenied {
                        return Err(socket_denied(p));
                    }
                }
                (
                    handshake(s).await.map_err(unreachable)?,
                    "localhost".to_string(),
                )
            }
            Endpoint::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await;
                (handshake(s).await.map_err(unreachable)?, a.clone())
            }
            Endpoint::Https(a) => {
                let connector = match &self.tls {
                    Some(c) => c.clone(),
                    None => tls_connector(None)?,
                };
                let name = server_name(a).map_err(unreachable)?;
                let tcp = tokio::net::TcpStream::connect(a)
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
                let tls = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    connector.connect(name, tcp),
                )
                .await
                .map_err(|_| unreachable("TLS handshake timed out".into()))?
                .map_err(|e| unreachable(format!("TLS: {e}")))?;
                (handshake(Ok(tls)).await.map_err(unreachable)?, a.clone())
            }
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .header("content-type", "application/json");
        if let (Endpoint::Https(_), Some(token)) = (&self.endpoint, &self.token) {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok((status, bytes))
    }
}

/// EACCES on the socket: this user is neither root nor in the socket's group.
fn socket_denied(path: &Path) -> ClientError {
    use std::os::unix::fs::MetadataExt;
    let group = std::fs::metadata(path)
        .ok()
        .and_then(|m| nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(m.gid())).ok())
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| crate::api::SOCKET_GROUP.to_string());
    ClientError::Denied {
        message: format!(
            "permission denied: the API socket {} is for root and group {group} (run as root or as a member of {group})",
            path.display()
        ),
    }
}

/// The TLS name to check fluxd's certificate against: the host part of `HOST:PORT`.
fn server_name(addr: &str) -> Result<tokio_rustls::rustls::pki_types::ServerName<'static>, String> {
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_start_matches('[')
        .trim_end_matches(']');
    tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|_| format!("not a host name or IP for TLS: {host}"))
}

/// Trusts the CAs in `ca_file` (PEM), or the system's bundle when none is given.
fn tls_connector(ca_file: Option<&Path>) -> Result<tokio_rustls::TlsConnector, ClientError> {
    let denied = ClientError::Setup;
    let path = ca_file.unwrap_or(Path::new("/etc/ssl/certs/ca-certificates.crt"));
    let pem = std::fs::read(path)
        .map_err(|e| denied(format!("cannot read CA file {}: {e}", path.display())))?;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| denied(format!("CA file {}: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| denied(format!("CA file {}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(denied(format!(
            "CA file {}: no PEM certificate in it",
            path.display()
        )));
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| denied(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// HTTP/1.1 over an already connected stream of either kind; the connection is driven by its
/// own task.
async fn handshake<S>(
    stream: std::io::Result<S>,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let stream = stream.map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}
