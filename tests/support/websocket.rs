//! WebSocket instances and clients for tests of upgrades on `http` services: an aiohttp server
//! and `websockets` clients (Debian's python3-aiohttp and python3-websockets), run inside the
//! test's namespace. The scripts are in `websocket/` beside this file; each says what it does.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddrV4, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::fluxd::wait_until;
use super::netns::Netns;

fn script(name: &str) -> String {
    format!(
        "{}/tests/support/websocket/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// One aiohttp instance on 127.0.0.1:`port` inside the namespace; killed when dropped.
pub struct WsInstance {
    pub name: String,
    pub addr: SocketAddrV4,
    child: Child,
    /// What it printed so far, a line each ("closed CODE" when a WebSocket ended).
    lines: Arc<Mutex<Vec<String>>>,
}

impl WsInstance {
    pub fn start(ns: &Netns, name: &str, port: u16) -> WsInstance {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "/usr/bin/python3"])
            .arg(script("instance.py"))
            .args([name, &port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 (scripts/deps --test installs python3-aiohttp)");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let seen = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                seen.lock().unwrap().push(l);
            }
        });
        let addr = SocketAddrV4::new([127, 0, 0, 1].into(), port);
        let up = ns.run(move || {
            wait_until(Duration::from_secs(20), || {
                TcpStream::connect_timeout(&addr.into(), Duration::from_secs(1)).is_ok()
            })
        });
        assert!(up.is_some(), "instance {name} did not start listening");
        WsInstance {
            name: name.into(),
            addr,
            child,
            lines,
        }
    }

    /// The close codes of the WebSockets this instance saw end, in order.
    pub fn closes(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix("closed ").map(str::to_string))
            .collect()
    }
}

impl Drop for WsInstance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `client.py ARGS` inside the namespace and returns the JSON it printed; panics with its
/// error output if it failed.
pub fn client(ns: &Netns, args: &[&str]) -> serde_json::Value {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "/usr/bin/python3"])
        .arg(script("client.py"))
        .args(args)
        .output()
        .expect("python3 (scripts/deps --test installs python3-websockets)");
    assert!(
        out.status.success(),
        "client {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("client {args:?} printed no JSON ({e}): {out:?}"))
}
