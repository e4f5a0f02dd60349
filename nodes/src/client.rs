//! The CLI's side of the local API: HTTP/1.1 over the unix socket in the data directory.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use coyote_nodes::wire::{ErrorAnswer, EventView};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
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
        body: Option<Bytes>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let mut sender = self.connect().await?;
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "coyote")
            .header("content-type", "application/json")
            .body(Full::new(body.unwrap_or_default()))
            .expect("valid request");
        sender.send_request(request).await.context("the node's API dropped the request")
    }

    /// `GET path`: the answer, as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::GET, path, None).await
    }

    /// A request without a body (`POST .../clear`, `DELETE ...`): the answer, as `T`.
    pub async fn act<T: DeserializeOwned>(&self, method: Method, path: &str) -> Result<T> {
        self.call(method, path, None).await
    }

    /// A request with a JSON body: the answer, as `T`.
    pub async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let body = serde_json::to_vec(body).context("encoding the request")?;
        self.call(method, path, Some(Bytes::from(body))).await
    }

    /// One request, one JSON answer; an error status becomes an error with the node's message, and an
    /// answer that is not a `T` (a field missing or of another type) is an error too.
    async fn call<T: DeserializeOwned>(&self, method: Method, path: &str, body: Option<Bytes>) -> Result<T> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await.context("reading the node's answer")?.to_bytes();
        if !status.is_success() {
            bail!("{}", error_message(status, &bytes));
        }
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the node's answer to {path} is not what this coyote expects (is the node another version?)"
            )
        })
    }

    /// `GET path`, for a body read as it arrives; an error status becomes an error with the node's
    /// message.
    async fn get_stream(&self, path: &str) -> Result<hyper::body::Incoming> {
        let response = self.send(Method::GET, path, None).await?;
        let status = response.status();
        let body = response.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            bail!("{}", error_message(status, &bytes));
        }
        Ok(body)
    }

    /// `GET path`, its body written to `out` as it arrives; the number of bytes written.
    pub async fn download(&self, path: &str, out: &mut impl std::io::Write) -> Result<u64> {
        let mut body = self.get_stream(path).await?;
        let mut written = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.context("the node broke off the transfer")?;
            let Some(data) = frame.data_ref() else { continue };
            out.write_all(data).context("cannot write the output")?;
            written += data.len() as u64;
        }
        out.flush().context("cannot write the output")?;
        Ok(written)
    }

    /// A streaming request: calls `line` with each event until the node closes the stream.
    pub async fn stream_events(
        &self,
        path: &str,
        mut line: impl FnMut(EventView) -> Result<()>,
    ) -> Result<()> {
        let mut body = self.get_stream(path).await?;
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
                if let Ok(e) = serde_json::from_str::<ErrorAnswer>(text) {
                    bail!("{}", e.error);
                }
                let event: EventView =
                    serde_json::from_str(text).context("malformed event line from the node")?;
                line(event)?;
            }
        }
        bail!("the node stopped; the event stream ended")
    }
}

/// The message of an error answer: the node's words, or its status when the body is not an
/// [`ErrorAnswer`].
fn error_message(status: hyper::StatusCode, body: &[u8]) -> String {
    serde_json::from_slice::<ErrorAnswer>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| format!("the node answered {status}"))
}
