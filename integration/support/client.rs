//! The client side of the fault suite: connections to a VIP (from a thread inside a host's
//! namespace) and what a client sees on them, named so that assertions say it plainly. Every
//! call is bounded in time.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

/// What a client saw when it waited for the first bytes of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The first line (without its newline).
    Line(String),
    /// A clean end of stream (FIN) before anything.
    Eof,
    /// The connection was reset (RST).
    Reset,
    /// The connect was refused (RST to the SYN).
    Refused,
    /// Nothing within the wait: silence.
    Silence,
    /// Anything else (a connect timeout, an unreachable network...).
    Other(String),
}

/// Connects (5 s bound); the stream has a 5 s read timeout.
pub fn connect(vip: SocketAddrV4) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&vip.into(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// Connects and waits up to `wait` for the first line; how long it took, and what came.
pub fn first_line(vip: SocketAddrV4, wait: Duration) -> (Duration, Seen) {
    let started = Instant::now();
    let seen = match connect(vip) {
        Ok(mut s) => read_line(&mut s, wait),
        Err(e) => classify(&e),
    };
    (started.elapsed(), seen)
}

/// Reads one line from `s`, waiting at most `wait` in all.
pub fn read_line(s: &mut TcpStream, wait: Duration) -> Seen {
    let deadline = Instant::now() + wait;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Seen::Silence;
        }
        if s.set_read_timeout(Some(left)).is_err() {
            return Seen::Other("set_read_timeout".into());
        }
        match s.read(&mut byte) {
            Ok(0) if line.is_empty() => return Seen::Eof,
            Ok(0) => return Seen::Other(format!("EOF after {line:?}")),
            Ok(_) if byte[0] == b'\n' => {
                return Seen::Line(String::from_utf8_lossy(&line).into_owned())
            }
            Ok(_) => line.push(byte[0]),
            Err(e) => return classify(&e),
        }
    }
}

/// Whether a stream, without waiting, has nothing to read and is neither reset nor closed.
pub fn is_silent(s: &TcpStream) -> Result<(), Seen> {
    s.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let r = match s.peek(&mut byte) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
        Ok(0) => Err(Seen::Eof),
        Ok(_) => Err(Seen::Other("data".into())),
        Err(e) => Err(classify(&e)),
    };
    s.set_nonblocking(false).unwrap();
    r
}

pub fn classify(e: &std::io::Error) -> Seen {
    match e.kind() {
        ErrorKind::ConnectionReset => Seen::Reset,
        ErrorKind::ConnectionRefused => Seen::Refused,
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Seen::Silence,
        _ => Seen::Other(e.to_string()),
    }
}

/// Reads until end of stream, within `wait`; Err with what was seen otherwise.
pub fn read_to_eof(s: &mut TcpStream, wait: Duration) -> Result<Vec<u8>, Seen> {
    let deadline = Instant::now() + wait;
    let mut all = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Seen::Silence);
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Ok(all),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) => return Err(classify(&e)),
        }
    }
}
