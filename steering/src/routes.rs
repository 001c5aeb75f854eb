//! The local routes that make VIPs this host's own: `local PREFIX dev lo` in the `local`
//! table, which is where the kernel looks when it checks that an address is local (for the
//! source of a reply, too: a route in any other table makes the VIP reachable but leaves the
//! SYN-ACK unroutable). flux's routes carry their own protocol number ([`PROTOCOL`]), so they
//! are read back, repaired and removed without touching anyone else's.
//!
//! `src 127.0.0.1`: a host process connecting to a VIP gets 127.0.0.1 as its address, as over
//! loopback, rather than the VIP itself.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use netfilter::Runner;

use crate::Error;

/// The `proto` of flux's routes (`ip route show proto 171`); any number the kernel does not
/// use itself (0-4) and no routing daemon claims in iproute2's `rt_protos`.
pub const PROTOCOL: &str = "171";

/// A prefix routed locally: a VIP range, or a VIP as `/32`.
pub type Prefix = (Ipv4Addr, u8);

/// The `ip -batch` lines that turn `installed` into `desired`.
pub(crate) fn batch(installed: &BTreeSet<Prefix>, desired: &BTreeSet<Prefix>) -> String {
    let mut out = String::new();
    for (a, l) in desired.difference(installed) {
        out.push_str(&format!(
            "route replace local {a}/{l} dev lo table local proto {PROTOCOL} src 127.0.0.1\n"
        ));
    }
    for (a, l) in installed.difference(desired) {
        out.push_str(&format!(
            "route del local {a}/{l} dev lo table local proto {PROTOCOL}\n"
        ));
    }
    out
}

/// flux's routes as `ip -j route show table local proto 171` prints them.
pub(crate) fn parse(json: &str) -> Result<BTreeSet<Prefix>, Error> {
    #[derive(serde::Deserialize)]
    struct Route {
        dst: String,
    }
    let routes: Vec<Route> = if json.trim().is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(json).map_err(|e| Error::Routes(e.to_string()))?
    };
    routes
        .into_iter()
        .map(|r| {
            let (addr, len) = r.dst.split_once('/').unwrap_or((&r.dst, "32"));
            match (addr.parse(), len.parse()) {
                (Ok(a), Ok(l)) if l <= 32 => Ok((a, l)),
                _ => Err(Error::Routes(format!("route to {:?}", r.dst))),
            }
        })
        .collect()
}

/// Reads flux's routes.
pub(crate) fn read(runner: &dyn Runner) -> Result<BTreeSet<Prefix>, Error> {
    let out = runner.run(
        "ip",
        &["-j", "route", "show", "table", "local", "proto", PROTOCOL],
        None,
    )?;
    parse(&out)
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
        let desired = [p("198.18.0.0/16"), p("10.0.0.1/32")].into_iter().collect();
        assert_eq!(
            batch(&installed, &desired),
            "route replace local 10.0.0.1/32 dev lo table local proto 171 src 127.0.0.1\n\
             route del local 10.0.0.9/32 dev lo table local proto 171\n"
        );
        assert_eq!(batch(&desired, &desired), "");
    }

    #[test]
    fn reads_what_ip_prints() {
        let json = r#"[{"type":"local","dst":"198.18.0.0/16","dev":"lo","scope":"host","prefsrc":"127.0.0.1","flags":[]},{"type":"local","dst":"198.19.0.5","dev":"lo","scope":"host","prefsrc":"127.0.0.1","flags":[]}]"#;
        let got = parse(json).unwrap();
        assert_eq!(
            got,
            [p("198.18.0.0/16"), p("198.19.0.5/32")]
                .into_iter()
                .collect()
        );
        assert!(parse("").unwrap().is_empty());
        assert!(parse(r#"[{"dst":"default"}]"#).is_err());
    }
}
