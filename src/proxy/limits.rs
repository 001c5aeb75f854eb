//! The limits a proxied connection runs under: its time limits, and telling this host's own
//! lack of resources from an instance's failure (only the latter may mark an instance failed).

use std::io;
use std::time::Duration;

/// The time limits every connection runs under.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Per connect attempt, per instance.
    pub connect: Duration,
    /// `http` services: until an instance's response headers.
    pub http_response: Duration,
    /// `tcp` services: idle limit of a half-closed connection.
    pub half_closed_idle: Duration,
}

/// Errors that say this process or host ran out of something (fds, socket buffers, memory,
/// local ports), whichever instance it was connecting to: marking the instance failed would
/// take healthy instances out of every later connection's first choice.
pub fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// At most one warning per this period for each kind of resource failure; the rest are
/// counted and reported with the next warning. A full fd table fails every accept attempt
/// (20 a second per proxy thread) for as long as it lasts.
pub(super) const WARN_PERIOD_MS: u64 = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_fds_is_not_the_instances_fault() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::EADDRNOTAVAIL,
        ] {
            assert!(is_local_exhaustion(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::ECONNREFUSED, libc::ETIMEDOUT, libc::EHOSTUNREACH] {
            assert!(!is_local_exhaustion(&io::Error::from_raw_os_error(errno)));
        }
    }
}
