//! The API client fluxctl uses: HTTP/1.1 over the local unix socket, or over TCP.

use std::path::PathBuf;

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
}

impl Endpoint {
    /// `unix:///run/fluxd/fluxd.sock` or `http://HOST:PORT`.
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
        }
        Err(
            crate::model::InvalidInput::new("api", "expected unix:///PATH or http://HOST:PORT")
                .value(s),
        )
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
}

pub struct Client {
    endpoint: Endpoint,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Self {
        Client { endpoint }
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
        if status.is_client_error() {
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
            endpoint: match &self.endpoint {
                Endpoint::Unix(p) => format!("unix://{}", p.display()),
                Endpoint::Tcp(a) => format!("http://{a}"),
            },
            reason,
        };
        let (mut sender, host) = match &self.endpoint {
            Endpoint::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await;
                (
                    handshake(s).await.map_err(unreachable)?,
                    "localhost".to_string(),
                )
            }
            Endpoint::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await;
                (handshake(s).await.map_err(unreachable)?, a.clone())
            }
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .header("content-type", "application/json")
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
