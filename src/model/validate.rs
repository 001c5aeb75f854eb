//! Field checks shared by every type of the model. Each returns an [`InvalidInput`] naming the
//! field, so callers only pass the field name down.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV6};

use super::InvalidInput;

/// Longest label or env value a selector may hold; Docker allows more, but a selector value
/// this long is a mistake, and store records must stay well under etcd's request limit.
pub const MAX_VALUE_LEN: usize = 4096;
/// Longest label or env key.
pub const MAX_KEY_LEN: usize = 255;
/// Most entries in one `k=v` list.
pub const MAX_PAIRS: usize = 64;

/// Names of services, rules and static instances: `[a-z0-9][a-z0-9-]{0,62}`, so that they are
/// safe as store key segments, iptables comments and DNS labels.
pub fn name(field: &str, s: &str) -> Result<(), InvalidInput> {
    let bad = || InvalidInput::new(field, "must match [a-z0-9][a-z0-9-]{0,62}").value(s);
    let bytes = s.as_bytes();
    if bytes.is_empty() || bytes.len() > 63 {
        return Err(bad());
    }
    if !(bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit()) {
        return Err(bad());
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
    {
        return Err(bad());
    }
    Ok(())
}

/// Host names as the OS gives them: letters, digits, dots, dashes, underscores; no `/` so they
/// are safe as a key segment.
pub fn host_name(field: &str, s: &str) -> Result<(), InvalidInput> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(InvalidInput::new(
            field,
            "must be 1-253 letters, digits, '.', '-' or '_', starting with a letter or digit",
        )
        .value(s))
    }
}

/// A service VIP: an IPv4 or IPv6 address that no real traffic uses, and a port 1-65535.
/// The per-host guard (local interfaces, gateway, resolvers, VIP ranges) runs in the daemon.
pub fn vip(field: &str, addr: &SocketAddr) -> Result<(), InvalidInput> {
    let why = match addr {
        SocketAddr::V4(a) => vip_v4(a.ip()),
        SocketAddr::V6(a) => vip_v6(a),
    };
    if let Some(why) = why {
        return Err(InvalidInput::new(field, why).value(addr.to_string()));
    }
    port(field, addr.port())
}

fn vip_v4(ip: &Ipv4Addr) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("must not be a loopback address")
    } else if ip.is_unspecified() {
        Some("must not be the unspecified address")
    } else if ip.is_multicast() {
        Some("must not be a multicast address")
    } else if ip.is_broadcast() {
        Some("must not be the broadcast address")
    } else if ip.is_link_local() {
        Some("must not be a link-local address (169.254.0.0/16)")
    } else if ip.octets()[0] == 0 || ip.octets()[0] >= 240 {
        Some("must not be in 0.0.0.0/8 or the reserved 240.0.0.0/4")
    } else {
        None
    }
}

/// IPv6 VIPs: unicast global or unique-local addresses only. Link-local ones need a scope
/// (an interface), which a VIP the same on every host cannot have; v4-mapped ones would be a
/// second spelling of an IPv4 VIP, so the IPv4 form is asked for instead.
fn vip_v6(a: &SocketAddrV6) -> Option<&'static str> {
    let ip = a.ip();
    if let Some(why) = v6_common(a) {
        Some(why)
    } else if ip.is_loopback() {
        Some("must not be a loopback address")
    } else if ip.is_unspecified() {
        Some("must not be the unspecified address")
    } else if (ip.segments()[0] & 0xffc0) == 0xfe80 {
        Some("must not be a link-local address (fe80::/10)")
    } else {
        None
    }
}

/// What no IPv6 address in flux may be, VIP or backend: multicast, v4-mapped (write the IPv4
/// form), scoped or flow-labelled (records carry neither).
fn v6_common(a: &SocketAddrV6) -> Option<&'static str> {
    let ip = a.ip();
    if ip.is_multicast() {
        Some("must not be a multicast address")
    } else if ip.to_ipv4_mapped().is_some() {
        Some("must not be an IPv4-mapped address (::ffff:a.b.c.d): write the IPv4 address")
    } else if a.scope_id() != 0 {
        Some("must not carry a scope id (%zone)")
    } else if a.flowinfo() != 0 {
        Some("must not carry flow info")
    } else {
        None
    }
}

/// A backend address: any unicast address (loopback included, for local backends); IPv6
/// link-local backends are refused, as they need a scope records cannot carry.
pub fn backend(field: &str, addr: &SocketAddr) -> Result<(), InvalidInput> {
    let why = match addr {
        SocketAddr::V4(a) => {
            let ip = a.ip();
            (ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast())
                .then_some("must be a unicast address")
        }
        SocketAddr::V6(a) => v6_common(a).or_else(|| {
            if a.ip().is_unspecified() {
                Some("must be a unicast address")
            } else if (a.ip().segments()[0] & 0xffc0) == 0xfe80 {
                Some("must not be a link-local address (fe80::/10)")
            } else {
                None
            }
        }),
    };
    if let Some(why) = why {
        return Err(InvalidInput::new(field, why).value(addr.to_string()));
    }
    port(field, addr.port())
}

pub fn port(field: &str, port: u16) -> Result<(), InvalidInput> {
    if port == 0 {
        Err(InvalidInput::new(field, "port must be 1-65535").value("0"))
    } else {
        Ok(())
    }
}

/// Parses `IP:PORT` (IPv4) or `[IPV6]:PORT` with messages that say what is wrong. Only the
/// canonical bracketed form is taken for IPv6, so a record or a flag has one spelling.
pub fn parse_socket_addr(field: &str, s: &str) -> Result<SocketAddr, InvalidInput> {
    let shape = || {
        InvalidInput::new(
            field,
            "expected IP address and port like 10.128.0.1:80 or [fd00::1]:80",
        )
    };
    let (ip, port) = s.rsplit_once(':').ok_or_else(|| shape().value(s))?;
    let ip: IpAddr = match ip.strip_prefix('[').and_then(|i| i.strip_suffix(']')) {
        Some(v6) => IpAddr::V6(v6.parse().map_err(|_| shape().value(s))?),
        None => IpAddr::V4(ip.parse().map_err(|_| shape().value(s))?),
    };
    let port: u32 = port.parse().map_err(|_| shape().value(s))?;
    if port == 0 || port > 65535 {
        return Err(InvalidInput::new(field, "port must be 1-65535").value(s));
    }
    Ok(SocketAddr::new(ip, port as u16))
}

/// Parses a port given as text (a CLI flag), naming the field on error.
pub fn parse_port(field: &str, s: &str) -> Result<u16, InvalidInput> {
    match s.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(InvalidInput::new(field, "port must be 1-65535").value(s)),
    }
}

/// Image repository as Docker spells it: optional `registry[:port]/`, then lowercase path
/// components. A tag or digest is refused here because the tag is its own selector field.
pub fn image(field: &str, s: &str) -> Result<(), InvalidInput> {
    let bad = |why: &str| Err(InvalidInput::new(field, why.to_string()).value(s));
    if s.is_empty() || s.len() > 255 {
        return bad("must be 1-255 characters");
    }
    if s.contains('@') {
        return bad("give the repository without a digest");
    }
    let mut parts: Vec<&str> = s.split('/').collect();
    // A first component with '.' or ':' or equal to localhost is a registry host[:port].
    if parts.len() > 1
        && (parts[0].contains('.') || parts[0].contains(':') || parts[0] == "localhost")
    {
        let registry = parts.remove(0);
        if !registry_ok(registry) {
            return bad("registry must be host or host:port");
        }
    }
    if parts.iter().any(|p| p.contains(':')) {
        return bad("give the repository without a tag; select the tag with the tag field");
    }
    if !parts.iter().all(|p| path_component_ok(p)) {
        return bad("path components must be lowercase letters and digits separated by '.', '_', '__' or '-'");
    }
    Ok(())
}

fn registry_ok(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let host_ok = !host.is_empty()
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    host_ok && port_ok
}

fn path_component_ok(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    b.iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-'))
        && !s.contains("..")
}

/// Docker tag grammar: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn tag(field: &str, s: &str) -> Result<(), InvalidInput> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(InvalidInput::new(field, "must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}").value(s))
    }
}

/// A map of label or env pairs: printable keys without `=` or `,`, values without control
/// characters, within the length limits above.
pub fn pairs(field: &str, map: &BTreeMap<String, String>) -> Result<(), InvalidInput> {
    if map.len() > MAX_PAIRS {
        return Err(
            InvalidInput::new(field, format!("at most {MAX_PAIRS} entries"))
                .value(map.len().to_string()),
        );
    }
    for (k, v) in map {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_KEY_LEN
            && !k.contains(['=', ','])
            && !k.chars().any(|c| c.is_control() || c.is_whitespace());
        if !key_ok {
            return Err(InvalidInput::new(
                field,
                format!("keys must be 1-{MAX_KEY_LEN} characters without '=', ',', spaces or control characters"),
            )
            .value(k));
        }
        if v.len() > MAX_VALUE_LEN || v.chars().any(char::is_control) {
            return Err(InvalidInput::new(
                field,
                format!(
                    "value of {k} must be at most {MAX_VALUE_LEN} bytes without control characters"
                ),
            )
            .value(v));
        }
    }
    Ok(())
}

/// Parses a command-line `k=v,k=v` list. Values may contain `=`; empty entries are refused
/// rather than ignored, because `a=1,,b=2` is more likely a typo than a wish.
pub fn parse_pairs(field: &str, s: &str) -> Result<BTreeMap<String, String>, InvalidInput> {
    let mut map = BTreeMap::new();
    for item in s.split(',') {
        let (k, v) = item.split_once('=').ok_or_else(|| {
            InvalidInput::new(field, "expected a comma-separated list of key=value").value(item)
        })?;
        if map.insert(k.to_string(), v.to_string()).is_some() {
            return Err(InvalidInput::new(field, "key given twice").value(k));
        }
    }
    pairs(field, &map)?;
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "web", "web-1", "0", &"a".repeat(63)] {
            assert!(name("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "Web", "a_b", "a.b", "é", &"a".repeat(64), "a/b"] {
            assert!(name("name", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vips() {
        let ok = |s: &str| vip("address", &s.parse().unwrap()).is_ok();
        assert!(ok("10.128.0.1:80"));
        assert!(ok("198.18.0.10:443"));
        for bad in [
            "127.0.0.1:80",
            "0.0.0.0:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "169.254.169.254:80",
            "10.0.0.1:0",
            "240.0.0.1:80",
        ] {
            assert!(!ok(bad), "{bad}");
        }
    }

    #[test]
    fn socket_addrs() {
        assert!(parse_socket_addr("a", "10.0.0.1:80").is_ok());
        for bad in [
            "10.0.0.1",
            "10.0.0.1:",
            "10.0.0.1:70000",
            "x:80",
            "::1:80",
            "[::1]",
            "[10.0.0.1]:80",
            ":80",
        ] {
            let e = parse_socket_addr("address", bad).unwrap_err();
            assert_eq!(e.field, "address");
        }
    }

    #[test]
    fn images() {
        for ok in [
            "nginx",
            "library/nginx",
            "registry.example.com:5000/team/app",
            "localhost/app",
            "a__b",
        ] {
            assert!(image("image", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Nginx",
            "nginx:1.25",
            "nginx@sha256:abc",
            "a//b",
            "-a",
            "reg:0/x",
        ] {
            assert!(image("image", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kv_lists() {
        let m = parse_pairs("labels", "tier=front,a=b=c").unwrap();
        assert_eq!(m["tier"], "front");
        assert_eq!(m["a"], "b=c");
        for bad in ["tier", "=x", "a=1,,b=2", "a=1,a=2", "a b=1", "a=\u{7}"] {
            let e = parse_pairs("labels", bad).unwrap_err();
            assert_eq!(e.field, "labels", "{bad}");
        }
    }
}
