//! flux's iptables nat rules.
//!
//! The controller hands over the complete desired state; this crate turns it into the full
//! contents of flux's own chains ([`render`], pure), installs them in one `iptables-restore`
//! transaction ([`Netfilter::apply`]), reads back what the kernel holds
//! ([`Netfilter::installed`]), says how the two differ ([`Drift`]) and takes everything away
//! again ([`Netfilter::remove`]). Nothing is patched rule by rule, so a missed update or a
//! flushed table is repaired by the next apply of the full state.
//!
//! flux owns two chains in the `nat` table and the hook rules that jump to them (recognised by
//! their `flux hook` comment). Every other chain and rule belongs to someone else (Docker, the
//! operator's firewall) and is never rewritten, reordered or deleted.
//!
//! The crate knows nothing of Docker or the store; it does not judge whether a VIP is safe to
//! capture either, which the controller decides before calling [`render`].
//!
//! ```no_run
//! use netfilter::{render, CommandRunner, Desired, Netfilter, Redirect};
//!
//! let desired = Desired {
//!     redirects: vec![Redirect { service: "web".into(), vip: "198.18.0.10:80".parse()? }],
//!     proxy_port: 7100,
//!     bridge_interfaces: vec!["docker0".into(), "br-+".into()],
//!     vip_ranges: vec![],
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
mod desired;
mod drift;
mod error;
mod installed;
mod netfilter;
mod remove;
mod render;
mod rule;
mod runner;
mod validate;

pub use annotate::{annotate, AnnotatedRule};
pub use desired::{Desired, Redirect, VipRange};
pub use drift::Drift;
pub use error::Error;
pub use installed::Installed;
pub use netfilter::Netfilter;
pub use render::{render, Rejected, Ruleset};
pub use runner::{CommandRunner, Runner};

/// The chain holding one REDIRECT per service VIP; the only chain whose contents change as
/// services come and go.
pub const SERVICES_CHAIN: &str = "FLUX-SERVICES";

/// An always-empty chain whose disappearance tells that someone wiped the nat table (the way
/// kube-proxy notices it), even between full comparisons of the rules.
pub const CANARY_CHAIN: &str = "FLUX-CANARY";

/// The comment that marks a rule in `PREROUTING`/`OUTPUT` as flux's, so flux can find and
/// delete its hooks without touching anyone else's rules in those shared chains.
pub const HOOK_COMMENT: &str = "flux hook";

/// Prefix of the comment on each service rule; the rest is the service name, which lets
/// `fluxd debug` say which service a kernel rule belongs to.
pub const SERVICE_COMMENT_PREFIX: &str = "flux:";
