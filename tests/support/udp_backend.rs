//! Small UDP backends for udp service tests: each answers every datagram with its name, a
//! colon and the datagram, to the address it came from: enough to tell which instance served a
//! flow and that the payload went through whole.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::netns::Netns;

pub struct UdpBackend {
    pub name: String,
    pub addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpBackend {
    /// Listens on 127.0.0.1:`port` inside `ns`.
    pub fn start(ns: &Netns, name: &str, port: u16) -> UdpBackend {
        let addr = SocketAddrV4::new([127, 0, 0, 1].into(), port);
        let socket = ns.run(move || UdpSocket::bind(addr).expect("bind udp backend"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (n, s) = (name.to_string(), stop.clone());
        let thread = std::thread::spawn(move || serve(socket, n, s));
        UdpBackend {
            name: name.into(),
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// Closes the socket: datagrams to it get ICMP port unreachable, as after a crash.
    pub fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn serve(socket: UdpSocket, name: String, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let mut reply = format!("{name}:").into_bytes();
        reply.extend_from_slice(&buf[..n]);
        let _ = socket.send_to(&reply, from);
    }
}

/// A client socket inside `ns` *connected* to `vip` (so it takes replies from the VIP alone),
/// from `port` (0: any).
pub fn client(ns: &Netns, vip: SocketAddr, port: u16) -> UdpSocket {
    let c = ns.run(move || {
        let c = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port))).expect("bind client");
        c.connect(vip).expect("connect client");
        c
    });
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    c
}

/// Sends `msg` and returns the instance that answered (the reply's prefix), None when no
/// reply came within the socket's timeout. Panics if the reply does not carry `msg` whole.
pub fn ask(c: &UdpSocket, msg: &[u8]) -> Option<String> {
    c.send(msg).ok()?;
    let mut buf = vec![0u8; 70000];
    let n = c.recv(&mut buf).ok()?;
    let reply = &buf[..n];
    let colon = reply.iter().position(|b| *b == b':')?;
    assert_eq!(&reply[colon + 1..], msg, "payload changed on the way");
    Some(String::from_utf8_lossy(&reply[..colon]).into_owned())
}
