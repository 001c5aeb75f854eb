//! The local routes that make VIPs this host's own: `local PREFIX dev lo` in the `local`
//! table, which is where the kernel looks when it checks that an address is local (for the
//! source of a reply, too: a route in any other table makes the VIP reachable but leaves the
//! SYN-ACK unroutable). flux's routes carry their own protocol number ([`PROTOCOL`]), so they
//! are read back, repaired and removed without touching anyone else's.
//!
//! `src 127.0.0.1` (`src ::1` for an IPv6 VIP): a host process connecting to a VIP gets the
//! loopback address as its own, as over loopback, rather than the VIP itself.

use std::collections::BTreeSet;
use std::net::IpAddr;

use netfilter::Runner;

use crate::Error;

/// The `proto` of flux's routes (`ip route show proto 171`); any number the kernel does not
/// use itself (0-4) and no routing daemon claims in iproute2's `rt_protos`.
pub const PROTOCOL: &str = "171";

/// A prefix routed locally: a VIP range, or a VIP as `/32` (IPv6: `/128`).
pub type Prefix = (IpAddr, u8);

/// The `ip -batch` lines that turn `installed` into `desired` (`ip` takes each line's family
/// from its address, so one batch holds both).
pub(crate) fn batch(installed: &BTreeSet<Prefix>, desired: &BTreeSet<Prefix>) -> String {
    let mut out = String::new();
    for (a, l) in desired.difference(installed) {
        let src = if a.is_ipv6() { "::1" } else { "127.0.0.1" };
        out.push_str(&format!(
            "route replace local {a}/{l} dev lo table local proto {PROTOCOL} src {src}\n"
        ));
    }
    for (a, l) in installed.difference(desired) {
        out.push_str(&format!(
            "route del local {a}/{l} dev lo table local proto {PROTOCOL}\n"
        ));
    }
    out
}

/// flux's routes as `ip -j route show table all proto 171` prints them: those of the `local`
/// table (a host route without its length: /32, or /128 for IPv6).
pub(crate) fn parse(json: &str) -> Result<BTreeSet<Prefix>, Error> {
    #[derive(serde::Deserialize)]
    struct Route {
        dst: String,
        table: Option<String>,
    }
    let routes: Vec<Route> = if json.trim().is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(json).map_err(|e| Error::Routes(e.to_string()))?
    };
    routes
        .into_iter()
        .filter(|r| r.table.as_deref() == Some("local"))
        .map(|r| {
            let (addr, len) = r.dst.split_once('/').unwrap_or((&r.dst, ""));
            let addr: Option<IpAddr> = addr.parse().ok();
            let max = match addr {
                Some(IpAddr::V6(_)) => 128,
                _ => 32,
            };
            let len = if len.is_empty() { Ok(max) } else { len.parse() };
            match (addr, len) {
                (Some(a), Ok(l)) if l <= max => Ok((a, l)),
                _ => Err(Error::Routes(format!("route to {:?}", r.dst))),
            }
        })
        .collect()
}

/// Reads flux's routes, both families in one `ip` process (`table all` lists IPv4 and IPv6;
/// a single table lists one family).
pub(crate) fn read(runner: &dyn Runner) -> Result<BTreeSet<Prefix>, Error> {
    parse(&runner.run(
        "ip",
        &["-j", "route", "show", "table", "all", "proto", PROTOCOL],
        None,
    )?)
}

/// Applies the lines of [`batch`] in one `ip` process; nothing to do costs no process.
pub(crate) fn apply(runner: &dyn Runner, lines: &str) -> Result<(), Error> {
    if !lines.is_empty() {
        runner.run("ip", &["-batch", "-"], Some(lines))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        let (a, l) = s.split_once('/').unwrap();
        (a.parse().unwrap(), l.parse().unwrap())
    }

    #[test]
    fn batch_adds_then_deletes() {
        let installed = [p("198.18.0.0/16"), p("10.0.0.9/32")].into_iter().collect();
        let desired = [p("198.18.0.0/16"), p("10.0.0.1/32"), p("fd00:18::a/128")]
            .into_iter()
            .collect();
        assert_eq!(
            batch(&installed, &desired),
            "route replace local 10.0.0.1/32 dev lo table local proto 171 src 127.0.0.1\n\
             route replace local fd00:18::a/128 dev lo table local proto 171 src ::1\n\
             route del local 10.0.0.9/32 dev lo table local proto 171\n"
        );
        assert_eq!(batch(&desired, &desired), "");
    }

    #[test]
    fn reads_what_ip_prints() {
        // Both families, as `ip -j route show table all proto 171` prints them; a route of
        // another table with that protocol (none of flux's) is left out.
        let json = r#"[{"type":"local","dst":"198.18.0.0/16","dev":"lo","table":"local","scope":"host","prefsrc":"127.0.0.1","flags":[]},{"type":"local","dst":"198.19.0.5","dev":"lo","table":"local","scope":"host","prefsrc":"127.0.0.1","flags":[]},{"dst":"10.9.0.0/16","dev":"eth0","scope":"link","flags":[]},{"type":"local","dst":"fd00:18::a","dev":"lo","table":"local","prefsrc":"::1","metric":1024,"flags":[],"pref":"medium"},{"dst":"fd00:19::/64","table":"local"}]"#;
        assert_eq!(
            parse(json).unwrap(),
            [
                p("198.18.0.0/16"),
                p("198.19.0.5/32"),
                p("fd00:18::a/128"),
                p("fd00:19::/64")
            ]
            .into_iter()
            .collect()
        );
        assert!(parse("").unwrap().is_empty());
        assert!(parse(r#"[{"dst":"default","table":"local"}]"#).is_err());
        assert!(parse(r#"[{"dst":"198.19.0.5/33","table":"local"}]"#).is_err());
    }
}
