//! RabbitMQ's management HTTP API on loopback: plain HTTP/1.1 over hyper's
//! client connection (hyper is already in the tree for the dashboard; a
//! connection per request is fine for the few bulk calls a sync makes).

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// How long one call may take. Importing thousands of users is one call of
/// a few seconds; a node that takes longer is treated as down.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum MgmtError {
    #[error("no management API answered (tried {tried}): {last}")]
    Unreachable { tried: String, last: String },
    #[error("{method} {path}: HTTP {status}: {body}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("{method} {path}: the answer is not JSON: {source}")]
    NotJson {
        method: Method,
        path: String,
        source: serde_json::Error,
    },
}

/// A client of the management API of any node of one cluster. Every call
/// tries the nodes in order until one answers, so a sync still works with
/// one node of three down.
#[derive(Clone)]
pub struct Mgmt {
    nodes: Vec<SocketAddr>,
    authorization: String,
}

// The password must never reach a log line.
impl std::fmt::Debug for Mgmt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mgmt").field("nodes", &self.nodes).finish()
    }
}

impl Mgmt {
    pub fn new(nodes: Vec<SocketAddr>, user: &str, password: &str) -> Mgmt {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Mgmt {
            nodes,
            authorization: format!("Basic {basic}"),
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value, MgmtError> {
        let body = self.call(Method::GET, path, None).await?;
        serde_json::from_slice(&body).map_err(|source| MgmtError::NotJson {
            method: Method::GET,
            path: path.to_owned(),
            source,
        })
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<(), MgmtError> {
        self.call(Method::POST, path, Some(body.to_string()))
            .await?;
        Ok(())
    }

    /// `Ok(false)` when there was nothing to delete (404).
    pub async fn delete(&self, path: &str) -> Result<bool, MgmtError> {
        match self.call(Method::DELETE, path, None).await {
            Ok(_) => Ok(true),
            Err(MgmtError::Status {
                status: StatusCode::NOT_FOUND,
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Bytes, MgmtError> {
        let mut last = String::from("no node configured");
        for addr in &self.nodes {
            match tokio::time::timeout(CALL_TIMEOUT, self.once(*addr, &method, path, &body)).await {
                Ok(Ok((status, bytes))) if status.is_success() => return Ok(bytes),
                // 5xx from one node (e.g. it is shutting down): try another.
                Ok(Ok((status, bytes))) if !status.is_server_error() => {
                    return Err(MgmtError::Status {
                        method,
                        path: path.to_owned(),
                        status,
                        body: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
                    })
                }
                Ok(Ok((status, _))) => last = format!("{addr}: HTTP {status}"),
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: no answer within {CALL_TIMEOUT:?}"),
            }
        }
        let tried = self
            .nodes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        Err(MgmtError::Unreachable { tried, last })
    }

    async fn once(
        &self,
        addr: SocketAddr,
        method: &Method,
        path: &str,
        body: &Option<String>,
    ) -> Result<(StatusCode, Bytes), Box<dyn std::error::Error + Send + Sync>> {
        let stream = TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(conn);
        let request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::AUTHORIZATION, &self.authorization)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.clone().unwrap_or_default())))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        driver.abort();
        Ok((status, bytes))
    }
}

/// `name` as one path segment: everything but letters, digits, `-`, `_`
/// and `~` percent-encoded, so a hostile user name (`..`, `/`, `%`, `?`)
/// names only itself.
pub fn segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn hostile_names_stay_one_segment() {
        assert_eq!(super::segment("lamp-01"), "lamp-01");
        assert_eq!(super::segment("/"), "%2F");
        assert_eq!(super::segment("../x?y"), "%2E%2E%2Fx%3Fy");
    }
}
