//! The CLI's side of the local API: HTTP/1.1 over the unix socket in the data directory.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(data: &Path) -> Self {
        Client { socket: data.join("coyote.sock") }
    }

    async fn connect(&self) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            let data = self.socket.parent().unwrap_or(Path::new(".")).display().to_string();
            match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    anyhow!("no coyote node is running on {data} (start one with `coyote up --data {data}`)")
                }
                _ => anyhow!("cannot reach the node at {}: {e}", self.socket.display()),
            }
        })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("the node's API did not answer")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let mut sender = self.connect().await?;
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "coyote")
            .header("content-type", "application/json")
            .body(Full::new(bytes))
            .expect("valid request");
        sender.send_request(request).await.context("the node's API dropped the request")
    }

    /// One request, one JSON answer; an error status becomes an error with the node's message.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await.context("reading the node's answer")?.to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("the node answered {status} with something that is not JSON"))?;
        if !status.is_success() {
            let msg = value.get("error").and_then(|e| e.as_str()).unwrap_or("unknown error");
            bail!("{msg}");
        }
        Ok(value)
    }

    /// A streaming request: calls `line` with each JSON line until the node closes the stream.
    pub async fn stream(&self, path: &str, mut line: impl FnMut(Value) -> Result<()>) -> Result<()> {
        let response = self.send(Method::GET, path, None).await?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            let value: Value = serde_json::from_slice(&bytes).unwrap_or_default();
            bail!("{}", value.get("error").and_then(|e| e.as_str()).unwrap_or("unknown error"));
        }
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("the node closed the event stream")?;
            let Some(data) = frame.data_ref() else { continue };
            buf.extend_from_slice(data);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let raw: Vec<u8> = buf.drain(..=pos).collect();
                let text = std::str::from_utf8(&raw[..raw.len() - 1]).unwrap_or("").trim();
                if text.is_empty() {
                    continue; // heartbeat
                }
                let value: Value =
                    serde_json::from_str(text).context("malformed event line from the node")?;
                if let Some(e) = value.get("error").and_then(|e| e.as_str()) {
                    bail!("{e}");
                }
                line(value)?;
            }
        }
        bail!("the node stopped; the event stream ended")
    }
}
