//! Small TCP backends for data plane tests. Each answers a new connection with its name and a
//! newline, then echoes what it reads until end of stream, then closes: enough to tell which
//! instance served a connection, to check integrity both ways, and to check half-close.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::netns::Netns;

pub struct Backend {
    pub name: String,
    pub addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    pub accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Listens on 127.0.0.1:`port` inside `ns`.
    pub fn start(ns: &Netns, name: &str, port: u16) -> Backend {
        let addr = SocketAddrV4::new([127, 0, 0, 1].into(), port);
        let listener = ns.run(move || {
            let l = TcpListener::bind(addr).expect("bind backend");
            l.set_nonblocking(true).unwrap();
            l
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (n, s, a) = (name.to_string(), stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || serve(listener, n, s, a));
        Backend {
            name: name.into(),
            addr,
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    /// Closes the listening socket: new connections are refused, as after a crash.
    pub fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn serve(listener: TcpListener, name: String, stop: Arc<AtomicBool>, accepted: Arc<AtomicU64>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((s, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                let name = name.clone();
                std::thread::spawn(move || echo(s, &name));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn echo(mut s: TcpStream, name: &str) {
    let _ = s.set_nonblocking(false);
    if s.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// Connects (from the calling thread's namespace), reads the serving backend's name, closes.
pub fn who_serves(vip: SocketAddrV4) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&vip.into(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte)? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed before a name",
                ))
            }
            _ if byte[0] == b'\n' => break,
            _ => name.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&name).into_owned())
}
