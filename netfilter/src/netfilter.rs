//! The handle the daemon holds: the only place that talks to iptables and ipset.

use crate::drift::Drift;
use crate::installed::Installed;
use crate::render::Ruleset;
use crate::runner::Runner;
use crate::Error;
use crate::{EMPTY_SET, VIP_SET};

/// How long `iptables-restore` waits for the xtables lock that iptables-legacy (and tools like
/// Docker running iptables at the same moment) take; iptables-nft accepts and ignores it.
const LOCK_WAIT_SECONDS: &str = "5";

/// Reads and changes flux's rules in one network namespace (the one its runner's commands run
/// in). Holds no state of its own: every call starts from what the kernel reports, so a change
/// made behind flux's back is never overwritten by a stale cached view.
///
/// Every method runs child processes and blocks until they finish (milliseconds; tens of
/// milliseconds to create a set of 10,000 VIPs): async callers should use `spawn_blocking`.
pub struct Netfilter {
    /// Where and how the iptables commands run.
    pub(crate) runner: Box<dyn Runner>,
}

impl Netfilter {
    /// Uses `runner` for every iptables command; [`crate::CommandRunner::new`] for the
    /// daemon's own namespace.
    pub fn new(runner: impl Runner + 'static) -> Self {
        Self {
            runner: Box::new(runner),
        }
    }

    /// Reads flux's chains, hooks and sets from the kernel. A missing set (or a missing
    /// `ipset` program, which leaves no set to read) reads as [`Installed::set`] (or
    /// [`Installed::empty_set`]) `None`. Always both tables and both sets, whatever is in use:
    /// what an earlier fluxd left behind must be seen to be removed.
    pub fn installed(&self) -> Result<Installed, Error> {
        // One table each: a plain `iptables-save` would also read tables flux has nothing in
        // (mangle, raw), any of which another tool may have made unreadable to iptables.
        let save = self.runner.run("iptables-save", &["-t", "nat"], None)?;
        let mut installed = Installed::parse(&save);
        let save = self.runner.run("iptables-save", &["-t", "filter"], None)?;
        installed.parse_tables(&save);
        for set in [VIP_SET, EMPTY_SET] {
            match self.ipset(&["save", set], None) {
                Ok(saved) => installed.parse_set(&saved),
                Err(Error::IpsetMissing) => break,
                Err(Error::Failed { stderr, .. }) if stderr.contains("does not exist") => {}
                Err(other) => return Err(other),
            }
        }
        Ok(installed)
    }

    /// Checks that `ipset` can be run and can talk to the kernel, so a daemon that will need
    /// the VIP set fails at start, with [`Error::IpsetMissing`] when it is not installed,
    /// rather than at its first apply.
    pub fn check_ipset(&self) -> Result<(), Error> {
        self.ipset(&["list", "-n"], None).map(drop)
    }

    /// Runs `ipset ARGS`; a missing program is [`Error::IpsetMissing`], whether it shows as a
    /// failed spawn or as the failure of a prefix (`ip netns exec`, `nice`) that runs it.
    pub(crate) fn ipset(&self, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
        match self.runner.run("ipset", args, stdin) {
            Err(Error::Spawn { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::IpsetMissing)
            }
            Err(Error::Failed { stderr, .. })
                if stderr.contains("ipset") && stderr.contains("No such file or directory") =>
            {
                Err(Error::IpsetMissing)
            }
            other => other,
        }
    }

    /// Compares the kernel with `desired`; run periodically so a flush or a deleted hook is
    /// repaired even though no event announces it.
    pub fn drift(&self, desired: &Ruleset) -> Result<Drift, Error> {
        Ok(Drift::between(desired, &self.installed()?))
    }

    /// Runs one `iptables-restore --noflush` transaction: all of `input` takes effect, or none
    /// of it.
    pub(crate) fn restore(&self, input: &str) -> Result<(), Error> {
        let args = ["-w", LOCK_WAIT_SECONDS, "--noflush"];
        match self.runner.run("iptables-restore", &args, Some(input)) {
            Ok(_) => Ok(()),
            Err(Error::Failed { stderr, .. }) if failed_line(&stderr).is_some() => {
                let line = failed_line(&stderr).unwrap_or_default();
                let text = input
                    .lines()
                    .nth(line.saturating_sub(1))
                    .unwrap_or_default();
                Err(Error::Restore {
                    line,
                    text: text.to_string(),
                    stderr,
                })
            }
            Err(other) => Err(other),
        }
    }
}

/// The input line iptables-restore complains about. Its wording varies: iptables-nft says
/// `Error occurred at line: N` for a bad rule and `line N: CHAIN_DEL failed (...)` when the
/// commit fails; iptables-legacy says `iptables-restore: line N failed`.
fn failed_line(stderr: &str) -> Option<usize> {
    stderr.match_indices("line").find_map(|(at, word)| {
        let rest = stderr[at + word.len()..].trim_start_matches([':', ' ']);
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..digits].parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails every command with canned stderr, so the error path is testable without iptables.
    struct Fake {
        stderr: &'static str,
    }

    impl Runner for Fake {
        fn run(&self, program: &str, _: &[&str], _: Option<&str>) -> Result<String, Error> {
            Err(Error::Failed {
                command: program.into(),
                status: "exit status: 1".into(),
                stderr: self.stderr.into(),
            })
        }
    }

    /// Fails every command as a missing program would.
    struct Missing;

    impl Runner for Missing {
        fn run(&self, program: &str, _: &[&str], _: Option<&str>) -> Result<String, Error> {
            Err(Error::Spawn {
                command: program.into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
        }
    }

    #[test]
    fn missing_ipset_is_one_clear_error() {
        let err = Netfilter::new(Missing).check_ipset().expect_err("missing");
        assert!(matches!(err, Error::IpsetMissing));
        assert_eq!(
            err.to_string(),
            "ipset is not installed: apt-get install ipset, or use --vip-range"
        );
        let behind_nice = Netfilter::new(Fake {
            stderr: "nice: 'ipset': No such file or directory",
        });
        assert!(matches!(
            behind_nice.check_ipset(),
            Err(Error::IpsetMissing)
        ));
    }

    #[test]
    fn restore_failure_names_the_bad_line() {
        let nf = Netfilter::new(Fake {
            stderr: "iptables-restore v1.8.9 (nf_tables): Chain 'NOPE' does not exist\n\
                     Error occurred at line: 2\n\
                     Try `iptables-restore -h' for more information.",
        });
        let err = nf
            .restore("*nat\n-A FLUX-SERVICES -j NOPE\nCOMMIT\n")
            .expect_err("fake fails");
        match err {
            Error::Restore { line, text, .. } => {
                assert_eq!(line, 2);
                assert_eq!(text, "-A FLUX-SERVICES -j NOPE");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn reads_both_line_number_formats() {
        assert_eq!(failed_line("Error occurred at line: 17"), Some(17));
        assert_eq!(
            failed_line("iptables-restore: line 4 failed: No chain/target/match by that name."),
            Some(4)
        );
        assert_eq!(failed_line("iptables-restore: line 9 failed"), Some(9));
        assert_eq!(
            failed_line("iptables-restore v1.8.9 (nf_tables): \nline 7: CHAIN_DEL failed (Device or resource busy): chain FLUX-SERVICES"),
            Some(7)
        );
        assert_eq!(failed_line("something else"), None);
    }
}
