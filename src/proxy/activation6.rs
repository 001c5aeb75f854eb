//! The proxy's IPv6 listening socket from systemd, when `fluxd.socket` has an IPv6 line
//! (`ListenStream=[::]:PORT` with `BindIPv6Only=ipv6-only`, see README "IPv6 and dual
//! stack"): IPv6 VIP connections then wait in systemd's socket across restarts, as IPv4 ones
//! do. Optional: without it fluxd binds its own IPv6 listener (`listener::listen6`), and only
//! IPv6 connections made while fluxd restarts are refused.

use std::os::fd::{BorrowedFd, FromRawFd, RawFd};

use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, SockaddrStorage};

use super::activation::ListenEnv;

/// The passed IPv6 socket fit for the proxy on `port`, if there is one. Checked like the
/// IPv4 one: a listening TCP socket on `[::]:port`, IPv6-only (the IPv4 socket takes IPv4).
/// Other fds are left to [`super::activation::proxy_socket`], which already marked them all
/// close-on-exec.
pub fn proxy_socket6(env: &ListenEnv, port: u16) -> Option<std::net::TcpListener> {
    let passed = env.passed(std::process::id()).ok()?;
    let (fd, _) = passed.iter().find(|(fd, _)| check6(*fd, port).is_ok())?;
    tracing::info!(
        fd,
        port,
        "proxy: using the IPv6 listening socket passed by systemd"
    );
    // SAFETY: the fd was passed to this process for it to own (sd_listen_fds), is open and a
    // listening IPv6 TCP socket (checked), and is not the one `proxy_socket` took (that one
    // is IPv4).
    Some(unsafe { std::net::TcpListener::from_raw_fd(*fd) })
}

/// Why `fd` is no IPv6 proxy socket on `port`, if it is not.
fn check6(fd: RawFd, port: u16) -> Result<(), &'static str> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).map_err(|_| "not open")?;
    // SAFETY: the fd is open (checked above) and is only borrowed for these calls.
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    let addr: SockaddrStorage = getsockname(fd).map_err(|_| "not a socket")?;
    let v6 = addr.as_sockaddr_in6().ok_or("not IPv6")?;
    if getsockopt(&b, sockopt::SockType) != Ok(SockType::Stream) {
        return Err("not TCP");
    }
    if !getsockopt(&b, sockopt::AcceptConn).unwrap_or(false) {
        return Err("not listening");
    }
    if v6.port() != port || !v6.ip().is_unspecified() {
        return Err("not on [::]:port");
    }
    if !getsockopt(&b, sockopt::Ipv6V6Only).unwrap_or(false) {
        return Err("not IPv6-only");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn listener6(v6only: bool) -> socket2::Socket {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
        s.set_only_v6(v6only).unwrap();
        s.bind(&"[::]:0".parse::<std::net::SocketAddr>().unwrap().into())
            .unwrap();
        s.listen(1).unwrap();
        s
    }

    #[test]
    fn only_an_ipv6_only_listener_on_the_port_fits() {
        // Hosts without IPv6 cannot run this check; nothing to test there.
        let Ok(s) = std::panic::catch_unwind(|| listener6(true)) else {
            return;
        };
        let port = s.local_addr().unwrap().as_socket().unwrap().port();
        assert_eq!(check6(s.as_raw_fd(), port), Ok(()));
        assert_eq!(check6(s.as_raw_fd(), port + 1), Err("not on [::]:port"));
        let dual = listener6(false);
        let port = dual.local_addr().unwrap().as_socket().unwrap().port();
        assert_eq!(check6(dual.as_raw_fd(), port), Err("not IPv6-only"));
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(check6(v4.as_raw_fd(), 1), Err("not IPv6"));
    }
}
