//! Which parts of the desired state are safe to turn into rule text.
//!
//! Everything rendered is pasted into `iptables-restore` or `ipset restore` input (both
//! line-based), so a stray quote or newline in a name could inject rules or commands of its own; and anything iptables would rewrite on the way back
//! through `iptables-save` would show as permanent drift.

/// Why the VIP `vip` of `service` cannot be rendered, if it cannot. `proxy_port` is where it is
/// redirected to, `None` for a refusal or a kernel forward (which need no proxy); `taken_by` is
/// the service already holding the VIP.
pub(crate) fn redirect_problem(
    service: &str,
    vip: std::net::SocketAddrV4,
    proxy_port: Option<u16>,
    taken_by: Option<&str>,
) -> Option<String> {
    if let Some(reason) = service_name_problem(service) {
        return Some(reason.to_string());
    }
    if proxy_port == Some(0) {
        return Some("no proxy port to redirect to".to_string());
    }
    if vip.port() == 0 {
        return Some("port 0 matches no connection".to_string());
    }
    taken_by.map(|first| format!("{vip} is already taken by service {first:?}"))
}

/// Why `destination` of the kernel-forwarded `service` cannot be rendered, if it cannot: its
/// name goes into a comment beside the service's (`flux:SERVICE/INSTANCE`, at most 255 bytes),
/// and port 0 is no place to send a connection.
pub(crate) fn destination_problem(
    service: &str,
    destination: &crate::Destination,
) -> Option<String> {
    if let Some(reason) = service_name_problem(&destination.instance) {
        return Some(reason.replace("service name", "instance name"));
    }
    let comment = crate::SERVICE_COMMENT_PREFIX.len() + service.len() + 1;
    if comment + destination.instance.len() > 255 {
        return Some("service and instance names together longer than 249 bytes".to_string());
    }
    (destination.addr.port() == 0).then(|| "port 0 is no destination".to_string())
}

/// Only characters that need no quoting or escaping, so the name cannot break out of the
/// comment and reads back unchanged (`ipset save` prints comments without escaping); the
/// length leaves room in the 255-byte comments of iptables and ipset.
fn service_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty service name")
    } else if name.len() > 200 {
        Some("service name longer than 200 bytes")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("service name may hold only ASCII letters, digits, '-', '_' and '.'")
    } else {
        None
    }
}

/// The same safe characters as service names, within the kernel's 15-byte limit. A bare `+`
/// would match every interface, the LAN included, and let a VIP capture neighbours' traffic.
pub(crate) fn interface_problem(name: &str) -> Option<&'static str> {
    let stem = name.strip_suffix('+').unwrap_or(name);
    if name.len() > 15 {
        Some("interface names are at most 15 bytes")
    } else if stem.is_empty() {
        Some("a pattern matching every interface would redirect traffic from the LAN")
    } else if stem.starts_with('-') {
        Some("an interface name starting with '-' would read as an iptables option")
    } else if !stem
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("interface name may hold only ASCII letters, digits, '-', '_', '.' and a final '+'")
    } else {
        None
    }
}
