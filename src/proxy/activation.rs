//! The proxy's listening socket passed in by systemd's socket activation (`fluxd.socket`):
//! `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` as `sd_listen_fds(3)` reads them, with the
//! fds from 3 on. A socket that comes from systemd outlives fluxd: between a stop and the next
//! start, new connections wait in its backlog instead of being refused.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{BorrowedFd, FromRawFd, RawFd};

use anyhow::bail;
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, SockaddrLike, SockaddrStorage};

/// The first passed fd (`SD_LISTEN_FDS_START`).
pub const FIRST_FD: RawFd = 3;

/// The fd name that marks the proxy socket when several are passed (`FileDescriptorName=`).
pub const PROXY_FD_NAME: &str = "proxy";

/// The socket-activation variables of this process.
#[derive(Debug, Default, Clone)]
pub struct ListenEnv {
    pub pid: Option<String>,
    pub fds: Option<String>,
    pub names: Option<String>,
}

impl ListenEnv {
    pub fn from_process() -> ListenEnv {
        ListenEnv {
            pid: std::env::var("LISTEN_PID").ok(),
            fds: std::env::var("LISTEN_FDS").ok(),
            names: std::env::var("LISTEN_FDNAMES").ok(),
        }
    }

    /// The fds passed to process `me`, with their names: none when the variables are absent or
    /// meant for another process (as `sd_listen_fds` decides).
    pub fn passed(&self, me: u32) -> anyhow::Result<Vec<(RawFd, Option<String>)>> {
        let Some(fds) = &self.fds else {
            return Ok(Vec::new());
        };
        match self.pid.as_deref().map(str::parse::<u32>) {
            Some(Ok(pid)) if pid == me => {}
            Some(Err(_)) => bail!(
                "LISTEN_PID: not a process id (got \"{}\")",
                self.pid.as_deref().unwrap_or_default()
            ),
            // Absent, or for another process (a parent that did not clear them): not ours.
            _ => return Ok(Vec::new()),
        }
        let n: RawFd = match fds.parse() {
            Ok(n) if (0..=1024).contains(&n) => n,
            _ => bail!("LISTEN_FDS: expected a number of fds (got \"{fds}\")"),
        };
        let names: Vec<&str> = self
            .names
            .as_deref()
            .map(|n| n.split(':').collect())
            .unwrap_or_default();
        Ok((0..n)
            .map(|i| (FIRST_FD + i, names.get(i as usize).map(|s| s.to_string())))
            .collect())
    }
}

/// The proxy's listening socket if systemd passed one to this process, checked to be a
/// listening IPv4 TCP socket on `0.0.0.0:port`; `Ok(None)` when nothing was passed. With
/// several fds, the one named [`PROXY_FD_NAME`] is taken if there is one, else the first that
/// fits. A passed socket that does not fit is an error (one line saying what it is), not a
/// reason to bind another: a second socket would not survive a restart.
pub fn proxy_socket(env: &ListenEnv, port: u16) -> anyhow::Result<Option<std::net::TcpListener>> {
    let passed = env.passed(std::process::id())?;
    if passed.is_empty() {
        return Ok(None);
    }
    // fluxd runs iptables and ipset: none of them should hold the proxy socket.
    for (fd, _) in &passed {
        let _ = nix::fcntl::fcntl(
            *fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
    let named: Vec<_> = passed
        .iter()
        .filter(|(_, n)| n.as_deref() == Some(PROXY_FD_NAME))
        .collect();
    let candidates = if named.is_empty() {
        passed.iter().collect()
    } else {
        named
    };
    let mut first_error = None;
    for (fd, name) in candidates {
        match check(*fd, port) {
            Ok(()) => {
                tracing::info!(
                    fd,
                    name = name.as_deref().unwrap_or(""),
                    port,
                    "proxy: using the listening socket passed by systemd"
                );
                // SAFETY: the fd was passed to this process for it to own (sd_listen_fds), and
                // it is open and a listening TCP socket (checked above).
                return Ok(Some(unsafe { std::net::TcpListener::from_raw_fd(*fd) }));
            }
            Err(why) => {
                first_error.get_or_insert_with(|| {
                    let label = match name {
                        Some(n) if !n.is_empty() => format!("fd {fd} (\"{n}\")"),
                        _ => format!("fd {fd}"),
                    };
                    format!("{label} {why}")
                });
            }
        }
    }
    bail!(
        "LISTEN_FDS: {}; expected a listening TCP socket on 0.0.0.0:{port} (ListenStream=0.0.0.0:{port} in fluxd.socket)",
        first_error.unwrap_or_default()
    )
}

/// Why `fd` cannot serve as the proxy socket on `port`, as the end of a sentence.
fn check(fd: RawFd, port: u16) -> Result<(), String> {
    if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
        return Err("is not open".into());
    }
    // SAFETY: the fd is open (checked above) and is only borrowed for these calls.
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    let addr: SockaddrStorage = match getsockname(fd) {
        Ok(a) => a,
        Err(_) => return Err("is not a socket".into()),
    };
    let Some(v4) = addr.as_sockaddr_in() else {
        let family = match addr.family() {
            Some(nix::sys::socket::AddressFamily::Inet6) => "an IPv6",
            Some(nix::sys::socket::AddressFamily::Unix) => "a unix",
            _ => "a non-IPv4",
        };
        return Err(format!(
            "is {family} socket (the proxy reads the original destination of IPv4 connections)"
        ));
    };
    let kind = match getsockopt(&b, sockopt::SockType) {
        Ok(SockType::Stream) => "TCP",
        Ok(SockType::Datagram) => return Err(format!("is a UDP socket on {}", fmt(v4))),
        Ok(other) => return Err(format!("is a {other:?} socket on {}", fmt(v4))),
        Err(e) => return Err(format!("cannot be inspected: {e}")),
    };
    if !getsockopt(&b, sockopt::AcceptConn).unwrap_or(false) {
        return Err(format!(
            "is a {kind} socket on {} that is not listening",
            fmt(v4)
        ));
    }
    if v4.port() != port {
        return Err(format!(
            "listens on {}, not on the proxy port {port}",
            fmt(v4)
        ));
    }
    if v4.ip() != Ipv4Addr::UNSPECIFIED {
        return Err(format!(
            "listens on {} only: redirected connections arrive on every local address",
            fmt(v4)
        ));
    }
    Ok(())
}

fn fmt(a: &nix::sys::socket::SockaddrIn) -> SocketAddr {
    SocketAddr::from((a.ip(), a.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> ListenEnv {
        ListenEnv {
            pid: pid.map(Into::into),
            fds: fds.map(Into::into),
            names: names.map(Into::into),
        }
    }

    #[test]
    fn fds_for_this_process_only() {
        assert!(env(None, None, None).passed(7).unwrap().is_empty());
        assert!(env(Some("8"), Some("1"), None)
            .passed(7)
            .unwrap()
            .is_empty());
        assert!(env(None, Some("1"), None).passed(7).unwrap().is_empty());
        assert_eq!(
            env(Some("7"), Some("2"), Some("proxy:other"))
                .passed(7)
                .unwrap(),
            vec![(3, Some("proxy".into())), (4, Some("other".into()))]
        );
        assert_eq!(
            env(Some("7"), Some("1"), None).passed(7).unwrap(),
            vec![(3, None)]
        );
        assert!(env(Some("7"), Some("x"), None).passed(7).is_err());
        assert!(env(Some("x"), Some("1"), None).passed(7).is_err());
    }

    #[test]
    fn checks_what_the_socket_is() {
        use std::os::fd::AsRawFd;
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = check(udp.as_raw_fd(), 7171).unwrap_err();
        assert!(e.contains("UDP"), "{e}");
        let tcp = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        assert_eq!(check(tcp.as_raw_fd(), port), Ok(()));
        let e = check(tcp.as_raw_fd(), port.wrapping_add(1)).unwrap_err();
        assert!(e.contains("not on the proxy port"), "{e}");
        let lo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = check(lo.as_raw_fd(), lo.local_addr().unwrap().port()).unwrap_err();
        assert!(e.contains("only"), "{e}");
        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(
            check(file.as_raw_fd(), 7171).unwrap_err(),
            "is not a socket"
        );
    }
}
