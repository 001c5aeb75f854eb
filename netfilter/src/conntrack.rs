//! Clearing conntrack entries that would keep a newly routed VIP from being redirected.
//!
//! nat rules are consulted only for a connection's first packet. A client that sent a SYN to a
//! VIP:port before flux redirected it left a conntrack entry with no NAT binding (`SYN_SENT`,
//! 120 s). A later connection that reuses the same source port (busy clients cycle through
//! ephemeral ports quickly) matches that entry as a retransmission, is not redirected and
//! hangs, although the VIP is routed by then. So when a VIP:port starts being routed (it enters
//! the VIP set, a range rule appears, or at the first apply), the entries towards it that were
//! not redirected are deleted, after the rules are applied so that none created meanwhile
//! survives.
//!
//! Which entries: original destination routed just now, reply source equal to the original
//! destination (a redirected entry's reply comes from the local address: those carry live
//! proxied connections and are never touched), and state `SYN_SENT`. Only `SYN_SENT`, because
//! that is the state that captures a new SYN: the kernel itself replaces a `TIME_WAIT` or
//! `CLOSE` entry on a new SYN, while an established un-redirected connection (to a real host
//! that used to answer at that address) would be killed by deleting its entry: its next packet
//! would be redirected to the proxy mid-stream.
//!
//! Done with the `conntrack` program (conntrack-tools), through the crate's
//! [`crate::Runner`]. A few VIPs: one filtered delete each (`conntrack -D -p tcp --state
//! SYN_SENT --orig-dst VIP --dport PORT --reply-src VIP`, which conntrack-tools 1.4.7 applies
//! exactly: it leaves redirected entries alone). Many VIPs or a range: one listing of the
//! `SYN_SENT` entries, then one such delete per VIP:port that has stale entries, however many
//! entries it has.

use std::collections::{BTreeSet, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use crate::desired::VipRange;
use crate::netfilter::Netfilter;
use crate::render::Ruleset;
use crate::Error;

/// Up to this many VIP:ports (and no range), each gets a filtered delete straight away; more,
/// and the table is listed once to find the few that have stale entries.
pub(crate) const DIRECT_LIMIT: usize = 8;

/// The conntrack state of a connection whose SYN got no answer yet.
const SYN_SENT: &str = "SYN_SENT";

/// What started being routed between two rulesets: the VIP:ports whose connections must not be
/// held back by entries made before.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routed {
    /// VIP:ports newly in the set, sorted.
    pub vips: Vec<SocketAddrV4>,
    /// Ranges whose rule is new (any port of any address in them), sorted.
    pub ranges: Vec<VipRange>,
}

impl Routed {
    /// What `to` routes that `from` (the ruleset applied before, `None` when nothing was, as at
    /// start or after a drift repair) did not. Kernel-forwarded VIPs count as routed: an
    /// attempt made before their rule would hold back a later connection just the same.
    pub fn between(from: Option<&Ruleset>, to: &Ruleset) -> Routed {
        fn routed(r: &Ruleset) -> impl Iterator<Item = SocketAddrV4> + '_ {
            let forwarded = r.forwards().iter().map(|f| f.vip);
            r.routed_vips().iter().copied().chain(forwarded)
        }
        let (old_vips, old_ranges): (HashSet<SocketAddrV4>, HashSet<VipRange>) = match from {
            Some(f) => (
                routed(f).collect(),
                f.vip_ranges().iter().copied().collect(),
            ),
            None => Default::default(),
        };
        let mut vips: Vec<SocketAddrV4> = routed(to)
            .filter(|v| !old_vips.contains(v) && !old_ranges.iter().any(|r| r.contains(*v.ip())))
            .collect();
        vips.sort();
        vips.dedup();
        let ranges = to
            .vip_ranges()
            .iter()
            .copied()
            .filter(|r| !old_ranges.contains(r))
            .collect();
        Routed { vips, ranges }
    }

    /// Whether nothing new is routed.
    pub fn is_empty(&self) -> bool {
        self.vips.is_empty() && self.ranges.is_empty()
    }

    fn covers(&self, dst: SocketAddrV4) -> bool {
        self.vips.binary_search(&dst).is_ok() || self.ranges.iter().any(|r| r.contains(*dst.ip()))
    }
}

/// One TCP entry of `conntrack -L`, the fields the choices need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub state: String,
    pub orig_src: SocketAddrV4,
    pub orig_dst: SocketAddrV4,
    pub reply_src: SocketAddrV4,
}

impl Entry {
    /// Parses one line of `conntrack -L` (plain or `-o extended`), e.g.
    /// `tcp 6 119 SYN_SENT src=127.0.0.1 dst=198.18.0.10 sport=40001 dport=80 [UNREPLIED]
    /// src=198.18.0.10 dst=127.0.0.1 sport=80 dport=40001 mark=0 use=1`. The first
    /// `src`/`dst`/`sport`/`dport` are the original direction, the second the reply. `None`
    /// for anything that is not an IPv4 TCP entry.
    pub(crate) fn parse(line: &str) -> Option<Entry> {
        let mut words = line.split_whitespace().peekable();
        if words.peek() == Some(&"ipv4") {
            words.next();
            words.next();
        }
        if words.next()? != "tcp" {
            return None;
        }
        words.next()?; // protocol number
        words.next()?; // seconds left
        let state = words.next()?.to_string();
        let mut addrs: Vec<Ipv4Addr> = Vec::with_capacity(4);
        let mut ports: Vec<u16> = Vec::with_capacity(4);
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "src" | "dst" => addrs.push(value.parse().ok()?),
                "sport" | "dport" => ports.push(value.parse().ok()?),
                _ => {}
            }
        }
        if addrs.len() != 4 || ports.len() != 4 {
            return None;
        }
        Some(Entry {
            state,
            orig_src: SocketAddrV4::new(addrs[0], ports[0]),
            orig_dst: SocketAddrV4::new(addrs[1], ports[1]),
            reply_src: SocketAddrV4::new(addrs[2], ports[2]),
        })
    }

    /// A connection attempt that was not redirected: nobody answered yet and the reply is
    /// expected from the address it was sent to.
    fn unredirected_syn(&self) -> bool {
        self.state == SYN_SENT && self.reply_src == self.orig_dst
    }
}

/// The VIP:ports among `listing` (output of `conntrack -L -p tcp`) that have entries to
/// delete: routed now, not redirected, still `SYN_SENT`. Sorted, each once.
pub(crate) fn stale_destinations(listing: &str, routed: &Routed) -> Vec<SocketAddrV4> {
    listing
        .lines()
        .filter_map(Entry::parse)
        .filter(|e| e.unredirected_syn() && routed.covers(e.orig_dst))
        .map(|e| e.orig_dst)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The number of entries a `conntrack -D` reports deleted: it prints each on stdout.
pub(crate) fn deleted_count(stdout: &str) -> usize {
    stdout.lines().filter(|l| Entry::parse(l).is_some()).count()
}

impl Netfilter {
    /// Checks that `conntrack` can be run and can read the table, so the daemon can say once
    /// at start that it is missing ([`Error::ConntrackMissing`]).
    pub fn check_conntrack(&self) -> Result<(), Error> {
        self.conntrack(&["-C"]).map(drop)
    }

    /// Deletes the conntrack entries that would keep a connection to a newly routed VIP:port
    /// from being redirected (see the module documentation); returns how many were deleted.
    /// Call after the rules that route `routed` are applied.
    pub fn clear_unredirected(&self, routed: &Routed) -> Result<usize, Error> {
        if routed.is_empty() {
            return Ok(0);
        }
        let destinations = if routed.ranges.is_empty() && routed.vips.len() <= DIRECT_LIMIT {
            routed.vips.clone()
        } else {
            let listing = self.conntrack(&["-L", "-p", "tcp", "--state", SYN_SENT])?;
            stale_destinations(&listing, routed)
        };
        let mut deleted = 0;
        for dst in destinations {
            deleted += self.delete_unredirected(dst)?;
        }
        Ok(deleted)
    }

    /// One filtered delete: every `SYN_SENT` entry to `dst` whose reply comes from `dst`.
    fn delete_unredirected(&self, dst: SocketAddrV4) -> Result<usize, Error> {
        let ip = dst.ip().to_string();
        let port = dst.port().to_string();
        let args = [
            "-D",
            "-p",
            "tcp",
            "--state",
            SYN_SENT,
            "--orig-dst",
            &ip,
            "--dport",
            &port,
            "--reply-src",
            &ip,
        ];
        match self.conntrack(&args) {
            Ok(stdout) => Ok(deleted_count(&stdout)),
            // conntrack exits 1 when the filter matched nothing.
            Err(Error::Failed { stderr, .. }) if stderr.contains(" 0 flow entries") => Ok(0),
            Err(other) => Err(other),
        }
    }

    /// Runs `conntrack ARGS`; a missing program is [`Error::ConntrackMissing`], whether it
    /// shows as a failed spawn or as the failure of a prefix (`ip netns exec`, `nice`).
    pub(crate) fn conntrack(&self, args: &[&str]) -> Result<String, Error> {
        match self.runner.run("conntrack", args, None) {
            Err(Error::Spawn { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::ConntrackMissing)
            }
            Err(Error::Failed { stderr, .. })
                if stderr.contains("\"conntrack\"") || stderr.contains("'conntrack'") =>
            {
                Err(Error::ConntrackMissing)
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::Runner;
    use crate::{render, Desired, Redirect};
    use std::sync::{Arc, Mutex};

    const UNREDIRECTED: &str = "tcp      6 119 SYN_SENT src=127.0.0.1 dst=198.18.0.10 sport=40001 dport=80 [UNREPLIED] src=198.18.0.10 dst=127.0.0.1 sport=80 dport=40001 mark=0 use=1";
    const REDIRECTED_SYN: &str = "tcp      6 119 SYN_SENT src=127.0.0.1 dst=198.18.0.10 sport=40002 dport=80 [UNREPLIED] src=127.0.0.1 dst=127.0.0.1 sport=7171 dport=40002 mark=0 use=1";
    const REDIRECTED: &str = "ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.0.5 dst=198.18.0.10 sport=50000 dport=80 src=10.0.0.1 dst=10.0.0.5 sport=7171 dport=50000 [ASSURED] mark=0 use=1";
    const ESTABLISHED_DIRECT: &str = "tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=198.18.0.10 sport=40003 dport=80 src=198.18.0.10 dst=127.0.0.1 sport=80 dport=40003 [ASSURED] mark=0 use=1";
    const OTHER_PORT: &str = "tcp      6 100 SYN_SENT src=127.0.0.1 dst=198.18.0.10 sport=40004 dport=81 [UNREPLIED] src=198.18.0.10 dst=127.0.0.1 sport=81 dport=40004 mark=0 use=1";
    const IN_RANGE: &str = "ipv4     2 tcp      6 100 SYN_SENT src=127.0.0.1 dst=198.19.3.4 sport=40005 dport=443 [UNREPLIED] src=198.19.3.4 dst=127.0.0.1 sport=443 dport=40005 mark=0 use=1";
    const UDP: &str = "udp      17 29 src=127.0.0.1 dst=198.18.0.10 sport=5353 dport=80 [UNREPLIED] src=198.18.0.10 dst=127.0.0.1 sport=80 dport=5353 mark=0 use=1";

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn range(s: &str, len: u8) -> VipRange {
        VipRange {
            addr: s.parse().unwrap(),
            prefix_len: len,
        }
    }

    fn ruleset(vips: &[&str], ranges: &[VipRange]) -> Ruleset {
        render(&Desired {
            redirects: vips
                .iter()
                .enumerate()
                .map(|(i, v)| Redirect {
                    service: format!("s{i}"),
                    vip: addr(v),
                })
                .collect(),
            proxy_port: 7171,
            bridge_interfaces: vec![],
            vip_ranges: ranges.to_vec(),
            ..Desired::default()
        })
    }

    #[test]
    fn parses_plain_and_extended_lines() {
        let e = Entry::parse(UNREDIRECTED).expect("parses");
        assert_eq!(e.state, "SYN_SENT");
        assert_eq!(e.orig_src, addr("127.0.0.1:40001"));
        assert_eq!(e.orig_dst, addr("198.18.0.10:80"));
        assert_eq!(e.reply_src, addr("198.18.0.10:80"));
        assert!(e.unredirected_syn());
        let r = Entry::parse(REDIRECTED).expect("extended parses");
        assert_eq!(r.orig_dst, addr("198.18.0.10:80"));
        assert_eq!(r.reply_src, addr("10.0.0.1:7171"));
        assert!(!r.unredirected_syn());
        assert!(!Entry::parse(REDIRECTED_SYN).unwrap().unredirected_syn());
        assert!(!Entry::parse(ESTABLISHED_DIRECT).unwrap().unredirected_syn());
        assert_eq!(Entry::parse(UDP), None);
        assert_eq!(Entry::parse(""), None);
        assert_eq!(
            Entry::parse("conntrack v1.4.7 (conntrack-tools): 4 flow entries have been shown."),
            None
        );
        assert_eq!(Entry::parse("tcp 6 1 SYN_SENT src=1.2.3.4 dst=x"), None);
    }

    #[test]
    fn chooses_only_unredirected_syns_to_what_is_newly_routed() {
        let listing = [
            UNREDIRECTED,
            REDIRECTED_SYN,
            REDIRECTED,
            ESTABLISHED_DIRECT,
            OTHER_PORT,
            IN_RANGE,
            UDP,
            UNREDIRECTED, // twice: one delete
        ]
        .join("\n");
        let one = Routed {
            vips: vec![addr("198.18.0.10:80")],
            ranges: vec![],
        };
        assert_eq!(stale_destinations(&listing, &one), [addr("198.18.0.10:80")]);
        let ranged = Routed {
            vips: vec![],
            ranges: vec![range("198.19.0.0", 16)],
        };
        assert_eq!(
            stale_destinations(&listing, &ranged),
            [addr("198.19.3.4:443")]
        );
        let none = Routed {
            vips: vec![addr("198.18.0.11:80")],
            ranges: vec![],
        };
        assert!(stale_destinations(&listing, &none).is_empty());
    }

    #[test]
    fn newly_routed_is_what_the_new_ruleset_adds() {
        let before = ruleset(&["198.18.0.10:80", "10.1.0.1:80"], &[]);
        let after = ruleset(&["198.18.0.10:80", "198.18.0.11:80", "10.1.0.1:80"], &[]);
        assert_eq!(
            Routed::between(Some(&before), &after),
            Routed {
                vips: vec![addr("198.18.0.11:80")],
                ranges: vec![]
            }
        );
        assert!(Routed::between(Some(&after), &before).is_empty());
        assert!(Routed::between(Some(&after), &after).is_empty());
        // From nothing (start, drift repair): everything.
        assert_eq!(
            Routed::between(None, &after).vips,
            [
                addr("10.1.0.1:80"),
                addr("198.18.0.10:80"),
                addr("198.18.0.11:80")
            ]
        );
        // A new range; VIPs inside it are the range's, not members.
        let ranged = ruleset(
            &["198.18.0.10:80", "10.1.0.1:80"],
            &[range("198.18.0.0", 15)],
        );
        assert_eq!(
            Routed::between(Some(&before), &ranged),
            Routed {
                vips: vec![],
                ranges: vec![range("198.18.0.0", 15)]
            }
        );
        // Leaving a range for the set is no new routing.
        assert!(Routed::between(Some(&ranged), &before).is_empty());
    }

    /// A service getting its first instance moves its VIP from the refused set to the routed
    /// one: newly routed, so attempts made before are cleared (harmless: a refused SYN leaves
    /// no entry behind, since it is dropped before its entry is confirmed).
    #[test]
    fn a_vip_leaving_the_refused_set_is_newly_routed() {
        let with = |routed: &[&str], empty: &[&str]| {
            let entry = |(i, v): (usize, &&str)| Redirect {
                service: format!("s{i}"),
                vip: addr(v),
            };
            render(&Desired {
                redirects: routed.iter().enumerate().map(entry).collect(),
                rejects: empty.iter().enumerate().map(entry).collect(),
                reject_empty: true,
                proxy_port: 7171,
                ..Desired::default()
            })
        };
        let empty = with(&[], &["198.18.0.10:80"]);
        let routed = with(&["198.18.0.10:80"], &[]);
        assert_eq!(
            Routed::between(Some(&empty), &routed).vips,
            [addr("198.18.0.10:80")]
        );
        assert!(Routed::between(Some(&routed), &empty).is_empty());
    }

    /// Records every command and answers from a script.
    #[derive(Clone, Default)]
    struct Fake {
        calls: Arc<Mutex<Vec<String>>>,
        listing: String,
    }

    impl Runner for Fake {
        fn run(&self, program: &str, args: &[&str], _: Option<&str>) -> Result<String, Error> {
            let line = format!("{program} {}", args.join(" "));
            self.calls.lock().unwrap().push(line.clone());
            match args.first() {
                Some(&"-L") => Ok(self.listing.clone()),
                Some(&"-D") if args.contains(&"198.18.0.10") && args.contains(&"80") => {
                    Ok(format!("{UNREDIRECTED}\n{UNREDIRECTED}\n"))
                }
                _ => Err(Error::Failed {
                    command: line,
                    status: "exit status: 1".into(),
                    stderr: "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted."
                        .into(),
                }),
            }
        }
    }

    #[test]
    fn few_vips_are_deleted_directly() {
        let fake = Fake::default();
        let nf = Netfilter::new(fake.clone());
        let routed = Routed {
            vips: vec![addr("198.18.0.10:80"), addr("198.18.0.11:80")],
            ranges: vec![],
        };
        assert_eq!(nf.clear_unredirected(&routed).unwrap(), 2);
        assert_eq!(
            *fake.calls.lock().unwrap(),
            [
                "conntrack -D -p tcp --state SYN_SENT --orig-dst 198.18.0.10 --dport 80 --reply-src 198.18.0.10",
                "conntrack -D -p tcp --state SYN_SENT --orig-dst 198.18.0.11 --dport 80 --reply-src 198.18.0.11",
            ]
        );
        assert_eq!(nf.clear_unredirected(&Routed::default()).unwrap(), 0);
        assert_eq!(
            fake.calls.lock().unwrap().len(),
            2,
            "nothing routed, nothing run"
        );
    }

    #[test]
    fn many_vips_are_listed_once_and_deleted_where_stale() {
        let fake = Fake {
            listing: [UNREDIRECTED, UNREDIRECTED, REDIRECTED_SYN, OTHER_PORT].join("\n"),
            ..Fake::default()
        };
        let nf = Netfilter::new(fake.clone());
        let routed = Routed {
            vips: (0..10_000u32)
                .map(|i| SocketAddrV4::new(Ipv4Addr::from(0xC612_0000 + i), 80))
                .collect(),
            ranges: vec![],
        };
        assert_eq!(nf.clear_unredirected(&routed).unwrap(), 2);
        assert_eq!(
            *fake.calls.lock().unwrap(),
            [
                "conntrack -L -p tcp --state SYN_SENT",
                "conntrack -D -p tcp --state SYN_SENT --orig-dst 198.18.0.10 --dport 80 --reply-src 198.18.0.10",
            ]
        );
    }

    #[test]
    fn a_missing_conntrack_is_one_clear_error() {
        struct Missing;
        impl Runner for Missing {
            fn run(&self, program: &str, _: &[&str], _: Option<&str>) -> Result<String, Error> {
                Err(Error::Spawn {
                    command: program.into(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                })
            }
        }
        assert!(matches!(
            Netfilter::new(Missing).check_conntrack(),
            Err(Error::ConntrackMissing)
        ));
        struct InNetns;
        impl Runner for InNetns {
            fn run(&self, program: &str, _: &[&str], _: Option<&str>) -> Result<String, Error> {
                Err(Error::Failed {
                    command: format!("ip netns exec t {program}"),
                    status: "exit status: 255".into(),
                    stderr: "exec of \"conntrack\" failed: No such file or directory".into(),
                })
            }
        }
        assert!(matches!(
            Netfilter::new(InNetns).check_conntrack(),
            Err(Error::ConntrackMissing)
        ));
    }
}
