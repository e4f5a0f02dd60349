//! The sockets a node's parts open to serve traffic: a trait, so that `coyote node` hands in the
//! operating system's TCP and the simulator hands in turmoil's.
//!
//! The activator listens on the published ports of on-demand services and dials their containers
//! through [`Sockets`]. (The log's own network has its own seam, `coyote_log::tls::Dial`, because its
//! streams carry TLS of the log's making.) A stream is boxed: one indirect call per read or write,
//! beside a system call each.

use std::io;
use std::net::SocketAddr;

use futures::future::BoxFuture;

/// A byte stream (a TCP connection, or the simulator's), as the proxy takes it too.
pub use coyote_proxy::{BoxStream, Stream};

/// A listening socket.
pub trait Listener: Send + Sync + 'static {
    /// The next connection, with its peer's address.
    fn accept(&self) -> BoxFuture<'_, io::Result<(BoxStream, SocketAddr)>>;
}

/// Opens listening sockets and connections.
pub trait Sockets: Send + Sync + 'static {
    fn listen(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<Box<dyn Listener>>>;
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<BoxStream>>;
}

/// The operating system's TCP (tokio), with Nagle's algorithm off on every connection: the
/// activator splices request/response traffic, where a delayed small write costs a round trip.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpSockets;

struct TcpListener(tokio::net::TcpListener);

impl Listener for TcpListener {
    fn accept(&self) -> BoxFuture<'_, io::Result<(BoxStream, SocketAddr)>> {
        Box::pin(async move {
            let (stream, peer) = self.0.accept().await?;
            let _ = stream.set_nodelay(true);
            Ok((Box::new(stream) as BoxStream, peer))
        })
    }
}

impl Sockets for TcpSockets {
    fn listen(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<Box<dyn Listener>>> {
        Box::pin(async move {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            Ok(Box::new(TcpListener(listener)) as Box<dyn Listener>)
        })
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<BoxStream>> {
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream) as BoxStream)
        })
    }
}
