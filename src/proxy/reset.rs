//! Ending a connection with a reset, the one way both the listener and the `tcp` path refuse.

use std::time::Duration;

use tokio::net::TcpStream;

/// Closes with RST, so the peer learns at once that nothing serves it (no FIN, no hang).
pub(super) fn reset(socket: TcpStream) {
    let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
    drop(socket);
}
