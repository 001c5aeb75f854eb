//! Real TCP connections through the redirect, to prove the rules route traffic and not just
//! that they read back as written.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// How long a connection through a working redirect may take inside one machine.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// Connects to `vip` and sends a greeting; `Err` if the connection could not be made.
pub fn connect(vip: SocketAddrV4) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(vip), TIMEOUT)?;
    stream.write_all(b"ping")?;
    Ok(stream)
}

/// Accepts one connection within [`TIMEOUT`], checks the greeting arrived and returns the
/// destination the client originally asked for (what fluxd's listener will read).
pub fn accept_original_dst(listener: &TcpListener) -> Option<SocketAddrV4> {
    listener
        .set_nonblocking(true)
        .expect("listener can be non-blocking");
    let deadline = Instant::now() + TIMEOUT;
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
            Err(e) => panic!("accept failed: {e}"),
        }
    };
    stream
        .set_nonblocking(false)
        .expect("stream can be blocking");
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout can be set");
    let mut greeting = [0u8; 4];
    stream
        .read_exact(&mut greeting)
        .expect("greeting arrives through the redirect");
    assert_eq!(&greeting, b"ping");
    Some(original_dst(&stream))
}

fn original_dst(stream: &TcpStream) -> SocketAddrV4 {
    let addr = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst)
        .expect("SO_ORIGINAL_DST on a redirected connection");
    SocketAddrV4::new(
        u32::from_be(addr.sin_addr.s_addr).into(),
        u16::from_be(addr.sin_port),
    )
}
