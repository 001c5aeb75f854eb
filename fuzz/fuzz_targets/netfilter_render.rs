//! Rendering flux's nat and filter rules and its two sets from service names (anyone who can
//! add a service chooses one), VIPs (redirected, refused for want of an instance, or forwarded
//! by the kernel to instances with names and addresses of their own), bridge interfaces and VIP
//! ranges, then reading them back as `iptables-save` / `ipset save` text. No panic; no rendered
//! line holds a line break or a quote outside its comment, nor anything but plain rule
//! characters; every comment names a real service (and instance) or flux itself; no VIP is in
//! both sets, nor forwarded and in a set; the ruleset read back shows no drift, annotates each
//! member of either set with the service that owns it and each DNAT rule with its service and
//! instance. Arbitrary save text is parsed without panic too.
#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};

use libfuzzer_sys::fuzz_target;
use netfilter::{
    annotate, annotate_empty_set, annotate_set, render, Desired, Destination, Drift, Forward,
    UdpRedirect,
    Installed, Redirect, VipRange,
};

/// Little-endian cursor over the input; runs out into zeros.
struct Bytes<'a>(&'a [u8]);
impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn ip(&mut self) -> Ipv4Addr {
        Ipv4Addr::new(self.u8(), self.u8(), self.u8(), self.u8())
    }
    /// A length-prefixed string (lossy UTF-8).
    fn string(&mut self) -> String {
        let n = (self.u8() as usize % 24).min(self.0.len());
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8_lossy(s).into_owned()
    }
}

/// Rule text outside the quoted comment: words of plain characters only.
fn plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || " -_.,:/+".contains(c)
}

/// Checks one rendered line and returns its comment.
fn check_line(line: &str) -> String {
    assert!(
        !line.contains(['\n', '\r', '\0']),
        "line break in rendered line {line:?}"
    );
    let parts: Vec<&str> = line.split('"').collect();
    assert_eq!(
        parts.len(),
        3,
        "a rendered line quotes exactly one comment: {line:?}"
    );
    assert!(parts[0].ends_with("--comment ") || parts[0].ends_with("comment "));
    for outside in [parts[0], parts[2]] {
        assert!(
            outside.chars().all(plain),
            "unexpected character in {line:?}"
        );
    }
    let comment = parts[1];
    assert!(
        !comment.contains(['\\', '\'', '`', '$']) && comment.chars().all(|c| !c.is_control()),
        "unsafe comment in {line:?}"
    );
    comment.to_string()
}

fuzz_target!(|data: &[u8]| {
    // Mode byte 0: parse arbitrary save text.
    if data.first() == Some(&0) {
        let text = String::from_utf8_lossy(&data[1..]);
        let (rules, set) = text.split_once("\n\n").unwrap_or((&text, ""));
        let mut installed = Installed::parse(rules);
        installed.parse_set(set);
        let _ = annotate(&installed);
        let _ = annotate_set(&installed);
        let _ = annotate_empty_set(&installed);
        return;
    }
    let mut b = Bytes(data);
    let mut desired = Desired {
        proxy_port: b.u16(),
        reject_empty: b.u8() & 1 == 1,
        ..Desired::default()
    };
    for _ in 0..b.u8() % 8 {
        desired.bridge_interfaces.push(b.string());
    }
    for _ in 0..b.u8() % 3 {
        desired.vip_ranges.push(VipRange {
            addr: b.ip(),
            prefix_len: b.u8() % 33,
        });
    }
    while !b.0.is_empty()
        && desired.redirects.len()
            + desired.rejects.len()
            + desired.forwards.len()
            + desired.udp_redirects.len()
            < 32
    {
        // Which list: redirected, refused (no instance), forwarded by the kernel, or a udp
        // service's redirect.
        let list = b.u8() % 4;
        let entry = Redirect {
            service: b.string(),
            vip: SocketAddrV4::new(b.ip(), b.u16()),
        };
        match list {
            0 => desired.redirects.push(entry),
            1 => desired.rejects.push(entry),
            3 => desired.udp_redirects.push(UdpRedirect {
                service: entry.service,
                vip: entry.vip,
                port: b.u16(),
            }),
            _ => {
                let destinations = (0..b.u8() % 4)
                    .map(|_| Destination {
                        instance: b.string(),
                        addr: SocketAddrV4::new(b.ip(), b.u16()),
                        standby: b.u8() & 1 == 1,
                    })
                    .collect();
                desired.forwards.push(Forward {
                    service: entry.service,
                    vip: entry.vip,
                    destinations,
                });
            }
        }
    }
    let ruleset = render(&desired);
    let services: Vec<&str> = desired
        .redirects
        .iter()
        .chain(&desired.rejects)
        .map(|r| r.service.as_str())
        .chain(desired.forwards.iter().map(|f| f.service.as_str()))
        .collect();
    let instances: Vec<(&str, &str)> = desired
        .forwards
        .iter()
        .flat_map(|f| {
            f.destinations
                .iter()
                .map(move |d| (f.service.as_str(), d.instance.as_str()))
        })
        .collect();

    for line in ruleset
        .service_rules()
        .iter()
        .chain(ruleset.hooks())
        .chain(ruleset.reject_rules())
        .chain(ruleset.filter_hooks())
    {
        let comment = check_line(line);
        // A udp service's redirect names its service; every other rule here is flux's own.
        let udp = comment.strip_prefix("flux:").is_some_and(|s| {
            line.contains(" -p udp ") && desired.udp_redirects.iter().any(|u| u.service == s)
        });
        assert!(comment.starts_with("flux ") || udp, "{line:?}");
    }
    assert_eq!(ruleset.rejects_empty(), desired.reject_empty);
    if !desired.reject_empty {
        assert!(ruleset.empty_members().is_empty() && ruleset.filter_hooks().is_empty());
    }
    for vip in ruleset.empty_vips() {
        assert!(
            !ruleset.routed_vips().contains(vip),
            "{vip} both redirected and refused"
        );
    }
    for f in ruleset.forwards() {
        assert!(
            !ruleset.routed_vips().contains(&f.vip) && !ruleset.empty_vips().contains(&f.vip),
            "{} both forwarded and in a set",
            f.vip
        );
        assert!(f.destinations.iter().any(|d| !d.standby), "{f:?} forwards nowhere");
    }
    for line in ruleset
        .forward_rules()
        .iter()
        .chain(ruleset.forward_chains().values().flatten())
    {
        let comment = check_line(line);
        let named = comment.strip_prefix("flux:").expect("names a service");
        match named.split_once('/') {
            Some((service, instance)) => {
                assert!(instances.contains(&(service, instance)), "{line:?}")
            }
            None => assert!(services.contains(&named), "{line:?}"),
        }
    }
    for line in ruleset.set_members().iter().chain(ruleset.empty_members()) {
        let comment = check_line(line);
        let service = comment
            .strip_prefix("flux:")
            .expect("member comment names a service");
        assert!(services.contains(&service), "{line:?}");
    }
    for line in ruleset.restore_input().lines() {
        assert!(!line.contains('\r'));
    }

    // Read back as the kernel would print it: no drift, and members annotated correctly. Each
    // table's section of the restore input gets its hooks before its COMMIT.
    let mut save = String::new();
    for section in ruleset.restore_input().split_inclusive("COMMIT\n") {
        let hooks = if section.starts_with("*filter") {
            ruleset.filter_hooks()
        } else {
            ruleset.hooks()
        };
        save.push_str(section.trim_end_matches("COMMIT\n"));
        for hook in hooks {
            save.push_str(hook);
            save.push('\n');
        }
        save.push_str("COMMIT\n");
    }
    let mut installed = Installed::parse(&save);
    let mut set = String::new();
    for (name, members) in [
        ("flux-vips", ruleset.set_members()),
        ("flux-empty", ruleset.empty_members()),
    ] {
        set.push_str(&format!(
            "create {name} hash:ip,port family inet hashsize 1024 maxelem 1048576 comment\n"
        ));
        for m in members {
            set.push_str(m);
            set.push('\n');
        }
    }
    installed.parse_set(&set);
    let drift = Drift::between(&ruleset, &installed);
    assert!(
        drift.is_clean(),
        "rendered rules read back with drift: {drift:?}"
    );
    let dnat: Vec<_> = annotate(&installed)
        .into_iter()
        .filter(|a| a.rule.contains(" -j DNAT "))
        .collect();
    assert_eq!(
        dnat.len(),
        ruleset.forward_chains().values().map(Vec::len).sum::<usize>()
    );
    for a in &dnat {
        let pair = (
            a.service.as_deref().expect("a DNAT rule names its service"),
            a.instance.as_deref().expect("and its instance"),
        );
        assert!(instances.contains(&pair), "{a:?}");
    }
    let annotated = annotate_set(&installed);
    assert_eq!(annotated.len(), ruleset.set_members().len());
    let refused = annotate_empty_set(&installed);
    assert_eq!(refused.len(), ruleset.empty_members().len());
    for a in annotated.iter().chain(&refused) {
        let service = a
            .service
            .as_deref()
            .expect("member annotated with its service");
        assert!(services.contains(&service));
    }
    for (vip, m) in ruleset
        .routed_vips()
        .iter()
        .zip(ruleset.set_members())
        .chain(ruleset.empty_vips().iter().zip(ruleset.empty_members()))
    {
        assert!(m.contains(&format!(" {},tcp:{} ", vip.ip(), vip.port())));
    }
});
