//! What can go wrong talking to iptables and ipset, with enough context for an operator to act on.

use std::io;

/// Failures of the iptables and ipset commands flux runs. Each one names the command, because the daemon
/// logs it far from where it was run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command could not be started or fed (not installed, not in `PATH`, no namespace).
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line, for the log.
        command: String,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line, for the log.
        command: String,
        /// Exit code or signal.
        status: String,
        /// What the command printed on stderr, trimmed.
        stderr: String,
    },
    /// `iptables-restore` refused one line of the input; the whole transaction was discarded,
    /// so the kernel is unchanged.
    #[error("iptables-restore rejected line {line} ({text:?}), nothing was changed: {stderr}")]
    Restore {
        /// 1-based line number in the input.
        line: usize,
        /// That line, so the bad rule is visible without re-rendering.
        text: String,
        /// What iptables-restore printed on stderr, trimmed.
        stderr: String,
    },
    /// The `ipset` program is not installed, so VIPs cannot be matched by set.
    #[error("ipset is not installed: apt-get install ipset, or use --vip-range")]
    IpsetMissing,
    /// The `conntrack` program is not installed: routing works, but connection attempts made
    /// before a VIP was routed are not cleared (see [`crate::Netfilter::clear_unredirected`]).
    #[error("conntrack is not installed (apt-get install conntrack): a client that reuses the source port of a connection attempt made before its VIP was routed can hang until that attempt's conntrack entry expires (120 s)")]
    ConntrackMissing,
    /// The command printed something that is not UTF-8, which `iptables-save` never does; the
    /// output cannot be trusted as a description of the rules.
    #[error("`{command}` printed output that is not UTF-8")]
    NotUtf8 {
        /// The command line, for the log.
        command: String,
    },
}
