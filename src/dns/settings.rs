//! `--dns-listen`, `--dns-domain` and `--dns-forward`, checked before fluxd starts: a bad
//! value is one line naming the setting.

use std::net::{IpAddr, SocketAddr};

use anyhow::bail;

/// The domain names are answered under unless `--dns-domain` says otherwise.
pub const DEFAULT_DOMAIN: &str = "flux";

/// The value `--dns-forward` takes when given without one: the host's resolvers.
pub const FORWARD_HOST: &str = "host";

/// What the DNS responder serves, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Every address is served on both UDP and TCP.
    pub listen: Vec<SocketAddr>,
    /// Lower case, without the trailing dot (`flux`, `svc.example`).
    pub domain: String,
    /// What happens to queries for names outside `domain`.
    pub forward: Forward,
}

/// Queries for other zones: refused, or relayed to resolvers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// REFUSED: fluxd is authoritative for its domain only.
    Off,
    /// The `nameserver` lines of /etc/resolv.conf, read at start.
    Host,
    /// These resolvers (`--dns-forward=IP[:PORT]`).
    To(Vec<SocketAddr>),
}

impl Settings {
    /// None when no `--dns-listen` is given (the responder is off by default); the other two
    /// settings make no sense without it and are refused alone, so a typo is not ignored.
    pub fn parse(
        listen: Vec<String>,
        domain: Option<String>,
        forward: Option<Vec<String>>,
    ) -> anyhow::Result<Option<Settings>> {
        if listen.is_empty() {
            if domain.is_some() {
                bail!("dns_domain: needs dns_listen (the DNS responder is off without it)");
            }
            if forward.is_some() {
                bail!("dns_forward: needs dns_listen (the DNS responder is off without it)");
            }
            return Ok(None);
        }
        let listen = listen
            .iter()
            .map(|s| parse_listen(s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let domain = parse_domain(domain.as_deref().unwrap_or(DEFAULT_DOMAIN))?;
        let forward = match forward {
            None => Forward::Off,
            Some(v) if v.iter().all(|s| s == FORWARD_HOST) => Forward::Host,
            Some(v) => Forward::To(
                v.iter()
                    .map(|s| parse_upstream(s))
                    .collect::<anyhow::Result<Vec<_>>>()?,
            ),
        };
        Ok(Some(Settings {
            listen,
            domain,
            forward,
        }))
    }
}

fn parse_listen(s: &str) -> anyhow::Result<SocketAddr> {
    match s.trim().parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Ok(a),
        _ => bail!("dns_listen: expected ADDR:PORT with a port other than 0 (got \"{s}\")"),
    }
}

/// `IP:PORT`, or an IP for port 53.
fn parse_upstream(s: &str) -> anyhow::Result<SocketAddr> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        if a.port() != 0 && !a.ip().is_unspecified() {
            return Ok(a);
        }
    } else if let Ok(ip) = s.parse::<IpAddr>() {
        if !ip.is_unspecified() {
            return Ok(SocketAddr::new(ip, 53));
        }
    }
    bail!("dns_forward: expected \"{FORWARD_HOST}\", IP or IP:PORT of a resolver (got \"{s}\")")
}

/// A domain of one or more labels of letters, digits and `-` (not the root: fluxd would then
/// claim every name).
fn parse_domain(s: &str) -> anyhow::Result<String> {
    let d = s.trim().trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if d.is_empty() || d.len() > 200 || !d.split('.').all(label_ok) {
        bail!(
            "dns_domain: expected a domain such as \"flux\" or \"svc.example\": labels of letters, digits and '-' (got \"{s}\")"
        );
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(
        listen: &[&str],
        domain: Option<&str>,
        forward: Option<&[&str]>,
    ) -> anyhow::Result<Option<Settings>> {
        Settings::parse(
            listen.iter().map(|s| s.to_string()).collect(),
            domain.map(str::to_string),
            forward.map(|f| f.iter().map(|s| s.to_string()).collect()),
        )
    }

    #[test]
    fn off_by_default() {
        assert_eq!(parse(&[], None, None).unwrap(), None);
    }

    #[test]
    fn defaults_and_values() {
        let s = parse(&["127.0.0.1:5353", "[::1]:53"], None, None)
            .unwrap()
            .unwrap();
        assert_eq!(s.domain, "flux");
        assert_eq!(s.forward, Forward::Off);
        assert_eq!(s.listen.len(), 2);
        let s = parse(&["127.0.0.1:53"], Some("Svc.Example."), Some(&["host"]))
            .unwrap()
            .unwrap();
        assert_eq!(s.domain, "svc.example");
        assert_eq!(s.forward, Forward::Host);
        let s = parse(
            &["127.0.0.1:53"],
            None,
            Some(&["10.0.0.1", "127.0.0.1:5300"]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            s.forward,
            Forward::To(vec![
                "10.0.0.1:53".parse().unwrap(),
                "127.0.0.1:5300".parse().unwrap()
            ])
        );
    }

    #[test]
    fn bad_values_name_their_setting() {
        let err = |l: &[&str], d: Option<&str>, f: Option<&[&str]>| {
            parse(l, d, f).unwrap_err().to_string()
        };
        assert!(err(&["localhost:53"], None, None).starts_with("dns_listen:"));
        assert!(err(&["127.0.0.1:0"], None, None).starts_with("dns_listen:"));
        assert!(err(&["127.0.0.1:53"], Some("."), None).starts_with("dns_domain:"));
        assert!(err(&["127.0.0.1:53"], Some("a..b"), None).starts_with("dns_domain:"));
        assert!(err(&["127.0.0.1:53"], Some("a_b"), None).starts_with("dns_domain:"));
        assert!(err(&["127.0.0.1:53"], None, Some(&["x"])).starts_with("dns_forward:"));
        assert!(err(&["127.0.0.1:53"], None, Some(&["0.0.0.0:53"])).starts_with("dns_forward:"));
        assert!(err(&[], Some("flux"), None).starts_with("dns_domain:"));
        assert!(err(&[], None, Some(&["host"])).starts_with("dns_forward:"));
    }
}
