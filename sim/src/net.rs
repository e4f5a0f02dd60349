//! A node's network over turmoil: a dialer for [`coyote_log::tls::Connector`], the listener peers
//! connect to ([`PeerListener`]), and the activator's sockets ([`Sockets`]). TLS runs on top exactly
//! as in production.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use coyote_log::tls::{self, Dial, DynDial, TlsConn};
use coyote_nodes::sockets;
use futures::future::BoxFuture;
use futures::Stream;

/// Dials with `turmoil::net::TcpStream`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TurmoilDial;

impl Dial for TurmoilDial {
    type Io = turmoil::net::TcpStream;

    fn dial(&self, addr: String) -> BoxFuture<'static, io::Result<Self::Io>> {
        Box::pin(async move { turmoil::net::TcpStream::connect(addr).await })
    }
}

/// The dialer a simulated node gets.
pub fn dial() -> DynDial {
    DynDial::new(TurmoilDial)
}

/// The listener a simulated node's peers connect to.
pub struct PeerListener(pub turmoil::net::TcpListener);

impl coyote_nodes::node::PeerListener for PeerListener {
    type Io = turmoil::net::TcpStream;

    fn incoming(
        self,
        tls: Arc<rustls::ServerConfig>,
    ) -> futures::stream::BoxStream<'static, io::Result<TlsConn<Self::Io>>> {
        Box::pin(incoming(self.0, tls))
    }
}

/// The activator's listening sockets and connections, in turmoil's network.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sockets;

struct Listener(turmoil::net::TcpListener);

impl sockets::Listener for Listener {
    fn accept(&self) -> BoxFuture<'_, io::Result<(sockets::BoxStream, SocketAddr)>> {
        Box::pin(async move {
            let (stream, peer) = self.0.accept().await?;
            Ok((Box::new(stream) as sockets::BoxStream, peer))
        })
    }
}

impl sockets::Sockets for Sockets {
    fn listen(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<Box<dyn sockets::Listener>>> {
        Box::pin(async move {
            let listener = turmoil::net::TcpListener::bind(addr).await?;
            Ok(Box::new(Listener(listener)) as Box<dyn sockets::Listener>)
        })
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<sockets::BoxStream>> {
        Box::pin(async move {
            let stream = turmoil::net::TcpStream::connect(addr).await?;
            Ok(Box::new(stream) as sockets::BoxStream)
        })
    }
}

/// TLS connections accepted on a turmoil listener.
fn incoming(
    listener: turmoil::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = io::Result<TlsConn<turmoil::net::TcpStream>>> + Send + 'static {
    let accepted = futures::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await;
        Some((next, listener))
    });
    tls::incoming(accepted, config)
}
