//! Clearing the conntrack entries of connections the kernel forwarded to an instance that has
//! left its service.
//!
//! A kernel-forwarded connection lives in conntrack alone: its first packet was rewritten to an
//! instance, and every later packet follows that entry, whatever the rules say now. When the
//! instance goes (its container stopped, its host died, it was removed) the entry keeps
//! sending the client's packets there: to a port nobody listens on, or into the void of a host
//! that is gone, where the client waits for TCP to give up (minutes). Deleting the entry ends
//! that at the client's next packet: it starts a new entry, goes through the nat rules again and
//! reaches another instance, which answers an unknown connection with a reset (or, with no
//! instance left, is refused as a new connection to a service with none): the client learns at
//! once. It also keeps a later connection that happens to reuse the same client port from
//! matching the stale entry (kube-proxy's stale-conntrack bug).
//!
//! Only instances that left the service: one that merely fails its active check (on standby,
//! [`crate::Destination::standby`]) gets no new connection, but the ones it has are left alone,
//! as the proxy leaves them, and it gets new ones again once it passes.
//!
//! Which entries: original destination the VIP:port, reply source the instance's address and
//! port (that is what the `DNAT` made of it). Done with the `conntrack` program, like
//! [`crate::Netfilter::clear_unredirected`]: one filtered delete per instance that left, or, for
//! many, one listing first to find those with entries.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddrV4;

use crate::conntrack::{deleted_count, Entry, DIRECT_LIMIT};
use crate::netfilter::Netfilter;
use crate::render::Ruleset;
use crate::Error;

/// The instances that left kernel-forwarded services between two rulesets: the connections to
/// forget.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unforwarded {
    /// `(VIP:port, instance address)` pairs, sorted: connections to the VIP that were forwarded
    /// to that address.
    pub flows: Vec<(SocketAddrV4, SocketAddrV4)>,
}

impl Unforwarded {
    /// The destinations of each VIP forwarded in `from` (the ruleset applied before; `None`
    /// when nothing is known, as at start or after a drift repair) that `to` no longer has,
    /// standby ones included on both sides: a whole service that is no longer forwarded (removed,
    /// left with no instance, refused by the VIP guard) loses them all.
    pub fn between(from: Option<&Ruleset>, to: &Ruleset) -> Unforwarded {
        let Some(from) = from else {
            return Unforwarded::default();
        };
        let kept: HashMap<SocketAddrV4, HashSet<SocketAddrV4>> = to
            .forwards()
            .iter()
            .map(|f| (f.vip, f.destinations.iter().map(|d| d.addr).collect()))
            .collect();
        let flows: BTreeSet<(SocketAddrV4, SocketAddrV4)> = from
            .forwards()
            .iter()
            .flat_map(|f| f.destinations.iter().map(move |d| (f.vip, d.addr)))
            .filter(|(vip, addr)| !kept.get(vip).is_some_and(|k| k.contains(addr)))
            .collect();
        Unforwarded {
            flows: flows.into_iter().collect(),
        }
    }

    /// Whether no instance left.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}

/// The pairs of `flows` that have entries in `listing` (output of `conntrack -L -p tcp`).
fn with_entries(
    listing: &str,
    flows: &[(SocketAddrV4, SocketAddrV4)],
) -> Vec<(SocketAddrV4, SocketAddrV4)> {
    let wanted: HashSet<&(SocketAddrV4, SocketAddrV4)> = flows.iter().collect();
    listing
        .lines()
        .filter_map(Entry::parse)
        .map(|e| (e.orig_dst, e.reply_src))
        .filter(|pair| wanted.contains(pair))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

impl Netfilter {
    /// Deletes the conntrack entries of connections forwarded to instances that left their
    /// service (see the module documentation); returns how many were deleted. Call after the
    /// rules without them are applied, so that no new connection is forwarded to them
    /// meanwhile.
    pub fn clear_unforwarded(&self, unforwarded: &Unforwarded) -> Result<usize, Error> {
        let flows = if unforwarded.flows.len() <= DIRECT_LIMIT {
            unforwarded.flows.clone()
        } else {
            with_entries(&self.conntrack(&["-L", "-p", "tcp"])?, &unforwarded.flows)
        };
        let mut deleted = 0;
        for (vip, addr) in flows {
            deleted += self.delete_forwarded(vip, addr)?;
        }
        Ok(deleted)
    }

    /// One filtered delete: every entry to `vip` whose reply comes from `addr`.
    fn delete_forwarded(&self, vip: SocketAddrV4, addr: SocketAddrV4) -> Result<usize, Error> {
        let (vip_ip, vip_port) = (vip.ip().to_string(), vip.port().to_string());
        let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
        let args = [
            "-D",
            "-p",
            "tcp",
            "--orig-dst",
            &vip_ip,
            "--orig-port-dst",
            &vip_port,
            "--reply-src",
            &ip,
            "--reply-port-src",
            &port,
        ];
        match self.conntrack(&args) {
            Ok(stdout) => Ok(deleted_count(&stdout)),
            // conntrack exits 1 when the filter matched nothing.
            Err(Error::Failed { stderr, .. }) if stderr.contains(" 0 flow entries") => Ok(0),
            Err(other) => Err(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::Runner;
    use crate::{render, Desired, Destination, Forward, Redirect};
    use std::sync::{Arc, Mutex};

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn dest(instance: &str, a: &str, standby: bool) -> Destination {
        Destination {
            instance: instance.into(),
            addr: addr(a),
            standby,
        }
    }

    /// `web` at 198.18.0.10:80 forwarded to `destinations`, `api` at .11 to one instance.
    fn ruleset(destinations: Vec<Destination>) -> Ruleset {
        render(&Desired {
            forwards: vec![
                Forward {
                    service: "web".into(),
                    vip: addr("198.18.0.10:80"),
                    destinations,
                },
                Forward {
                    service: "api".into(),
                    vip: addr("198.18.0.11:80"),
                    destinations: vec![dest("x", "10.0.0.9:80", false)],
                },
            ],
            proxy_port: 7171,
            ..Desired::default()
        })
    }

    #[test]
    fn an_instance_that_left_is_unforwarded() {
        let before = ruleset(vec![
            dest("a", "10.0.0.1:80", false),
            dest("b", "10.0.0.2:80", false),
        ]);
        let after = ruleset(vec![dest("a", "10.0.0.1:80", false)]);
        assert_eq!(
            Unforwarded::between(Some(&before), &after).flows,
            [(addr("198.18.0.10:80"), addr("10.0.0.2:80"))]
        );
        assert!(Unforwarded::between(Some(&after), &before).is_empty());
        assert!(Unforwarded::between(None, &after).is_empty());
        // A new address is a new destination: the old one's connections go.
        let moved = ruleset(vec![dest("a", "10.0.0.5:80", false)]);
        assert_eq!(
            Unforwarded::between(Some(&after), &moved).flows,
            [(addr("198.18.0.10:80"), addr("10.0.0.1:80"))]
        );
    }

    #[test]
    fn an_instance_on_standby_keeps_its_connections() {
        let before = ruleset(vec![
            dest("a", "10.0.0.1:80", false),
            dest("b", "10.0.0.2:80", false),
        ]);
        let failing = ruleset(vec![
            dest("a", "10.0.0.1:80", false),
            dest("b", "10.0.0.2:80", true),
        ]);
        assert!(Unforwarded::between(Some(&before), &failing).is_empty());
        // Leaving while on standby: gone.
        let gone = ruleset(vec![dest("a", "10.0.0.1:80", false)]);
        assert_eq!(Unforwarded::between(Some(&failing), &gone).flows.len(), 1);
    }

    #[test]
    fn a_service_no_longer_forwarded_loses_every_destination() {
        let before = ruleset(vec![
            dest("a", "10.0.0.1:80", false),
            dest("b", "10.0.0.2:80", true),
        ]);
        // `web` lost its instances: refused instead.
        let refused = render(&Desired {
            forwards: vec![Forward {
                service: "api".into(),
                vip: addr("198.18.0.11:80"),
                destinations: vec![dest("x", "10.0.0.9:80", false)],
            }],
            rejects: vec![Redirect {
                service: "web".into(),
                vip: addr("198.18.0.10:80"),
            }],
            reject_empty: true,
            proxy_port: 7171,
            ..Desired::default()
        });
        assert_eq!(
            Unforwarded::between(Some(&before), &refused).flows,
            [
                (addr("198.18.0.10:80"), addr("10.0.0.1:80")),
                (addr("198.18.0.10:80"), addr("10.0.0.2:80")),
            ]
        );
    }

    /// Records every command and answers from a script.
    #[derive(Clone, Default)]
    struct Fake {
        calls: Arc<Mutex<Vec<String>>>,
        listing: String,
    }

    const FORWARDED: &str = "tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=198.18.0.10 sport=58438 dport=80 src=10.0.0.2 dst=127.0.0.1 sport=80 dport=58438 [ASSURED] mark=0 use=1";

    impl Runner for Fake {
        fn run(&self, program: &str, args: &[&str], _: Option<&str>) -> Result<String, Error> {
            let line = format!("{program} {}", args.join(" "));
            self.calls.lock().unwrap().push(line.clone());
            match args.first() {
                Some(&"-L") => Ok(self.listing.clone()),
                Some(&"-D") if args.contains(&"10.0.0.2") => Ok(format!("{FORWARDED}\n")),
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
    fn few_instances_are_deleted_directly() {
        let fake = Fake::default();
        let nf = Netfilter::new(fake.clone());
        let gone = Unforwarded {
            flows: vec![
                (addr("198.18.0.10:80"), addr("10.0.0.2:80")),
                (addr("198.18.0.10:80"), addr("10.0.0.3:8080")),
            ],
        };
        assert_eq!(nf.clear_unforwarded(&gone).unwrap(), 1);
        assert_eq!(
            *fake.calls.lock().unwrap(),
            [
                "conntrack -D -p tcp --orig-dst 198.18.0.10 --orig-port-dst 80 --reply-src 10.0.0.2 --reply-port-src 80",
                "conntrack -D -p tcp --orig-dst 198.18.0.10 --orig-port-dst 80 --reply-src 10.0.0.3 --reply-port-src 8080",
            ]
        );
        assert_eq!(nf.clear_unforwarded(&Unforwarded::default()).unwrap(), 0);
        assert_eq!(
            fake.calls.lock().unwrap().len(),
            2,
            "nothing left, nothing run"
        );
    }

    #[test]
    fn many_instances_are_listed_once_and_deleted_where_they_have_entries() {
        let fake = Fake {
            listing: FORWARDED.to_string(),
            ..Fake::default()
        };
        let nf = Netfilter::new(fake.clone());
        let gone = Unforwarded {
            flows: (1..=20u8)
                .map(|i| {
                    (
                        addr("198.18.0.10:80"),
                        SocketAddrV4::new([10, 0, 0, i].into(), 80),
                    )
                })
                .collect(),
        };
        assert_eq!(nf.clear_unforwarded(&gone).unwrap(), 1);
        assert_eq!(
            *fake.calls.lock().unwrap(),
            [
                "conntrack -L -p tcp",
                "conntrack -D -p tcp --orig-dst 198.18.0.10 --orig-port-dst 80 --reply-src 10.0.0.2 --reply-port-src 80",
            ]
        );
    }
}
