//! flux's nat rules: a few iptables rules plus an ipset of service VIPs, and the filter rule that
//! refuses connections to services with no instance.
//!
//! The controller hands over the complete desired state; this crate turns it into the full
//! contents of flux's own chains and the members of flux's sets ([`render`], pure), makes the
//! kernel match it ([`Netfilter::apply`]), reads back what the kernel holds
//! ([`Netfilter::installed`]), says how the two differ ([`Drift`]) and takes everything away
//! again ([`Netfilter::remove`]). Apply starts from a fresh read of the kernel, so a missed
//! update or a flushed table is repaired by the next apply of the full state. A caller that
//! knows what it applied last (the daemon) can use [`Netfilter::apply_change`] instead, which
//! sends only the member delta without reading the set (reading 10,000 members costs ~65 ms),
//! and falls back on [`Netfilter::apply`] after any drift.
//!
//! Service VIPs are matched by ONE rule, `-m set --match-set flux-vips dst,dst`, against an
//! ipset `hash:ip,port` set ([`VIP_SET`]) holding one member per VIP (`198.18.0.10,tcp:80`,
//! with the comment `flux:SERVICE`). Matching a connection is a hash lookup whatever the number
//! of services, and adding or removing a service changes one set member, not the chain. With
//! `--vip-range`, one rule per range follows the set rule (and when every VIP is inside a range
//! the set and its rule are not used at all, so ipset need not even be installed).
//!
//! A service with no instance to send to is not redirected to the proxy (which could only
//! accept the connection and reset it): its VIP is a member of a second set, [`EMPTY_SET`]
//! (`flux-empty`, same form), instead of `flux-vips`. The first rule of the services chain
//! returns for those VIPs, so no VIP range rule redirects them either, and a `REJECT
//! --reject-with tcp-reset` rule matching the set in flux's filter chain ([`REJECT_CHAIN`],
//! hooked from the filter table's `OUTPUT`, and `INPUT` and `FORWARD` per bridge) refuses the
//! connection's first packet, so the client's `connect()` fails at once with `ECONNREFUSED`, as
//! flux 0.2's per-service REJECT rule did and as kube-proxy does for a service without
//! endpoints. This needs ipset: with [`Desired::reject_empty`] off, empty services are
//! redirected like the others.
//!
//! A service may instead be forwarded by the kernel itself ([`Desired::forwards`], `fluxctl
//! service add --forward kernel`): its VIP:port is no set member; the services chain jumps to
//! [`FORWARD_CHAIN`], which sends it to a chain of the service's own holding one `DNAT` rule per
//! instance, chosen with kube-proxy's `-m statistic --mode random --probability 1/(n-i)` chain so
//! that each instance gets an even share. These rules are rendered apart from the redirect of
//! proxied services and do not depend on it. When an instance leaves such a service, the
//! conntrack entries of connections forwarded to it are deleted ([`Unforwarded`]).
//!
//! flux owns two chains in the `nat` table (and, while some service is kernel-forwarded,
//! [`FORWARD_CHAIN`] and one chain per such service) and one in the `filter` table, the hook
//! rules that jump to them (recognised by their `flux hook` comment) and the `flux-vips` and
//! `flux-empty` sets. Every other chain, rule and set belongs to someone else (Docker, the operator's
//! firewall) and is never rewritten, reordered or deleted.
//!
//! The crate knows nothing of Docker or the store; it does not judge whether a VIP is safe to
//! capture either, which the controller decides before calling [`render`].
//!
//! ```no_run
//! use netfilter::{render, CommandRunner, Desired, Netfilter, Redirect};
//!
//! let desired = Desired {
//!     redirects: vec![Redirect { service: "web".into(), vip: "198.18.0.10:80".parse()? }],
//!     rejects: vec![Redirect { service: "idle".into(), vip: "198.18.0.11:80".parse()? }],
//!     reject_empty: true,
//!     proxy_port: 7100,
//!     bridge_interfaces: vec!["docker0".into(), "br-+".into()],
//!     vip_ranges: vec![],
//!     forwards: vec![],
//!     udp_redirects: vec![],
//! };
//! let ruleset = render(&desired);
//! for rejected in ruleset.rejected() {
//!     eprintln!("{rejected}");
//! }
//! let nf = Netfilter::new(CommandRunner::new());
//! nf.apply(&ruleset)?;
//! // Later, on a timer: someone may have flushed the rules.
//! let drift = nf.drift(&ruleset)?;
//! if !drift.is_clean() {
//!     eprintln!("repairing: {drift}");
//!     nf.apply(&ruleset)?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod annotate;
mod apply;
mod conntrack;
mod desired;
mod drift;
mod error;
mod forward;
mod installed;
mod netfilter;
mod rejected;
mod remove;
mod render;
mod rule;
mod runner;
mod unforwarded;
mod v6;
mod validate;

pub use annotate::{annotate, annotate_empty_set, annotate_set, AnnotatedMember, AnnotatedRule};
pub use conntrack::Routed;
pub use desired::{Desired, Destination, Forward, Redirect, UdpRedirect, VipRange};
pub use drift::Drift;
pub use error::Error;
pub use installed::Installed;
pub use netfilter::Netfilter;
pub use rejected::Rejected;
pub use render::{render, Ruleset};
pub use runner::{CommandRunner, Runner};
pub use unforwarded::Unforwarded;
pub use v6::{render6, Desired6, Installed6, Redirect6, Ruleset6};

/// The chain holding the REDIRECT rules: one matching the VIP set, then one per VIP range.
pub const SERVICES_CHAIN: &str = "FLUX-SERVICES";

/// An always-empty chain whose disappearance tells that someone wiped the nat table (the way
/// kube-proxy notices it), even between full comparisons of the rules.
pub const CANARY_CHAIN: &str = "FLUX-CANARY";

/// The comment that marks a rule in `PREROUTING`/`OUTPUT` as flux's, so flux can find and
/// delete its hooks without touching anyone else's rules in those shared chains.
pub const HOOK_COMMENT: &str = "flux hook";

/// Prefix of the comment on each member of [`VIP_SET`]; the rest is the service name, which
/// lets `fluxd debug` say which service a VIP in the kernel belongs to.
pub const SERVICE_COMMENT_PREFIX: &str = "flux:";

/// The ipset (`hash:ip,port`, with comments) holding one member per service VIP; the only thing
/// that changes as services come and go.
pub const VIP_SET: &str = "flux-vips";

/// The comment on the rule that matches [`VIP_SET`]; no service name, since it serves them all.
pub const SET_RULE_COMMENT: &str = "flux vips";

/// The ipset (same type as [`VIP_SET`]) holding the VIP of each service with no instance: those
/// VIPs are refused at once rather than redirected.
pub const EMPTY_SET: &str = "flux-empty";

/// The chain in the `filter` table that refuses connections to members of [`EMPTY_SET`].
pub const REJECT_CHAIN: &str = "FLUX-REJECT";

/// The comment on the two rules that match [`EMPTY_SET`]: the `RETURN` ahead of the redirects
/// and the `REJECT`.
pub const EMPTY_RULE_COMMENT: &str = "flux no instance";

/// The nat chain of kernel-forwarded services ([`Desired::forwards`]): one rule per service,
/// matching its VIP:port and jumping to the service's own chain. The services chain jumps here
/// (after the refusal of services with no instance, before any redirect) only while some
/// service is forwarded, so a host without any pays nothing for it.
pub const FORWARD_CHAIN: &str = "FLUX-FORWARD";

/// The start of each kernel-forwarded service's own chain, followed by its VIP in hex and its
/// port (`FLUX-FWD-C612000A-80` for 198.18.0.10:80): a name unique per VIP:port that fits
/// iptables' 28-byte limit whatever the service is called. It holds one `DNAT` rule per
/// instance, kube-proxy's way.
pub const FORWARD_CHAIN_PREFIX: &str = "FLUX-FWD-";

/// The comment on the services chain's jump to [`FORWARD_CHAIN`].
pub const FORWARD_RULE_COMMENT: &str = "flux forward";
