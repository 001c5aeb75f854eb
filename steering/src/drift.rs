//! How the kernel differs from what flux wants, one line per difference.

use std::fmt;

use crate::desired::Desired;
use crate::installed::Installed;

/// Differences between [`Desired`] and [`Installed`]; [`Drift::is_clean`] when none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    pub lines: Vec<String>,
}

impl Drift {
    pub fn between(desired: &Desired, installed: &Installed) -> Drift {
        let mut lines = Vec::new();
        if !installed.link.attached {
            lines.push("program is not attached (link detached)".to_string());
        }
        if !installed.link.pinned {
            lines.push("program link is not pinned".to_string());
        }
        if !installed.socket {
            lines.push("socket map holds no listening socket".to_string());
        }
        if desired.has_ipv6() && !installed.socket6 {
            lines.push("IPv6 socket map holds no listening socket".to_string());
        }
        for (vip, (service, action)) in &desired.services {
            match installed.services.get(vip) {
                None => lines.push(format!("missing map entry: {vip} {action} ({service})")),
                Some(got) if *got != Some(*action) => lines.push(format!(
                    "wrong map entry: {vip} is {} instead of {action} ({service})",
                    got.map_or("unknown".to_string(), |a| a.to_string())
                )),
                Some(_) => {}
            }
        }
        for vip in installed.services.keys() {
            if !desired.services.contains_key(vip) {
                lines.push(format!("extra map entry: {vip}"));
            }
        }
        let addresses = desired.addresses();
        for (a, l) in addresses.difference(&installed.addresses) {
            lines.push(format!("missing address: {a}/{l}"));
        }
        for (a, l) in installed.addresses.difference(&addresses) {
            lines.push(format!("extra address:   {a}/{l}"));
        }
        for (a, l) in addresses.difference(&installed.routes) {
            lines.push(format!("missing route: local {a}/{l}"));
        }
        for (a, l) in installed.routes.difference(&addresses) {
            lines.push(format!("extra route:   local {a}/{l}"));
        }
        for (index, name) in &desired.ifaces {
            if !installed.ifaces.contains(index) {
                lines.push(format!("missing interface: {name} ({index})"));
            }
        }
        for index in &installed.ifaces {
            if !desired.ifaces.contains_key(index) {
                lines.push(format!("extra interface: {index}"));
            }
        }
        Drift { lines }
    }

    pub fn is_clean(&self) -> bool {
        self.lines.is_empty()
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::Action;
    use crate::installed::LinkState;

    #[test]
    fn names_each_difference() {
        let mut d = Desired::default();
        d.services.insert(
            "10.0.0.1:80".parse().unwrap(),
            ("web".into(), Action::Proxy),
        );
        d.ifaces.insert(1, "lo".into());
        let installed = Installed {
            link: LinkState {
                attached: true,
                pinned: true,
                ..Default::default()
            },
            socket: true,
            ifaces: [1].into_iter().collect(),
            services: [("10.0.0.2:80".parse().unwrap(), Some(Action::Proxy))]
                .into_iter()
                .collect(),
            addresses: [("10.0.0.1".parse().unwrap(), 32)].into_iter().collect(),
            routes: Default::default(),
            socket6: false,
        };
        let drift = Drift::between(&d, &installed);
        assert_eq!(
            drift.lines,
            [
                "missing map entry: 10.0.0.1:80 proxy (web)",
                "extra map entry: 10.0.0.2:80",
                "missing route: local 10.0.0.1/32",
            ]
        );
        let mut clean = installed.clone();
        clean.services = [("10.0.0.1:80".parse().unwrap(), Some(Action::Proxy))]
            .into_iter()
            .collect();
        clean.routes = clean.addresses.clone();
        assert!(Drift::between(&d, &clean).is_clean());

        // An IPv6 VIP needs the IPv6 listener.
        d.services.insert(
            "[fd00:18::a]:80".parse().unwrap(),
            ("web6".into(), Action::Proxy),
        );
        clean
            .services
            .insert("[fd00:18::a]:80".parse().unwrap(), Some(Action::Proxy));
        clean.addresses.insert(("fd00:18::a".parse().unwrap(), 128));
        clean.routes = clean.addresses.clone();
        assert_eq!(
            Drift::between(&d, &clean).lines,
            ["IPv6 socket map holds no listening socket"]
        );
        clean.socket6 = true;
        assert!(Drift::between(&d, &clean).is_clean());
    }
}
