//! The log's network over turmoil: a dialer for [`coyote_log::tls::Connector`] and an accepted-stream
//! source for [`coyote_log::tls::incoming`]. TLS runs on top exactly as in production.

use std::io;
use std::sync::Arc;

use coyote_log::tls::{self, Dial, DynDial, TlsConn};
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

/// TLS connections accepted on a turmoil listener.
pub fn incoming(
    listener: turmoil::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = io::Result<TlsConn<turmoil::net::TcpStream>>> + Send + 'static {
    let accepted = futures::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await;
        Some((next, listener))
    });
    tls::incoming(accepted, config)
}
