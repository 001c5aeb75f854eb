//! Gives memory back to the kernel after a burst. glibc keeps freed heap in its arenas, so once
//! thousands of connections have closed (or a large catalog change has been rebuilt) fluxd's
//! resident memory would stay at the peak, which an operator cannot tell from a leak. When the
//! number of open connections has fallen well below its peak since the last trim, or the
//! allocator holds more than a few MiB free, `malloc_trim(0)` returns the free pages.
//!
//! [`limit_arenas`] also keeps glibc from giving each thread a heap of its own (8 per core by
//! default): memory freed in one thread's arena cannot serve another's, and with the catalog
//! built on one thread and rebuilt on others that idle, fragmented memory was a sixth of
//! fluxd's resident memory at 10,000 services.

/// How far below the peak open connections must fall before a trim (about 1 MiB of memory at
/// ~2 KiB a connection): small enough to follow a burst, rare enough to cost nothing.
const TRIM_AFTER_DROP: i64 = 512;

/// Free heap the allocator may keep before it is trimmed anyway.
const MAX_FREE_BYTES: usize = 4 << 20;

#[derive(Debug, Default)]
pub struct Trimmer {
    peak: i64,
}

impl Trimmer {
    /// Takes the current number of open connections; trims when it fell far enough. Returns
    /// whether it trimmed.
    pub fn observe(&mut self, open: i64) -> bool {
        self.peak = self.peak.max(open);
        if self.peak - open < TRIM_AFTER_DROP && free_bytes() <= MAX_FREE_BYTES {
            return false;
        }
        trim();
        self.peak = open;
        true
    }
}

/// Caps glibc's arenas at one per core (at least two). Must run before the runtime starts its
/// threads, which take their arenas at their first allocation.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(cores.max(2)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX takes any count.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Heap the allocator holds free, over all arenas.
fn free_bytes() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe {
        libc::mallinfo2().fordblks
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    0
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only inspects and releases the allocator's own free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_after_a_large_drop() {
        let mut t = Trimmer::default();
        trim(); // whatever earlier tests freed does not count here
        assert!(!t.observe(100));
        assert!(!t.observe(5_000));
        assert!(!t.observe(4_800));
        assert!(t.observe(10));
        assert!(!t.observe(0), "the peak restarts from the trim");
    }
}
