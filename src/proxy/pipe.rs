//! Kernel pipes for splice(2), lent from a per-thread pool only while bytes are in flight, so an
//! idle proxied connection holds no pipe (two sockets, nothing else).

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;

use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// Pipe capacity. 64 KiB is the kernel default; a larger pipe moves more per splice call
/// (fewer syscalls on bulk transfers) at the cost of pinned kernel memory only while data is in
/// flight. 256 KiB stays under the default `pipe-max-size` (1 MiB) and the per-user soft limit.
pub const PIPE_SIZE: i32 = 256 * 1024;

/// Pipes kept per worker thread; more would only hold fds that nobody uses.
const POOL_MAX: usize = 64;

pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Best effort: a smaller pipe still works, only with more syscalls.
        let _ = fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&write),
            FcntlArg::F_SETPIPE_SZ(PIPE_SIZE),
        );
        Ok(Pipe { read, write })
    }
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// Takes an empty pipe from this thread's pool, or makes one.
pub fn take() -> io::Result<Pipe> {
    match POOL.with(|p| p.borrow_mut().pop()) {
        Some(p) => Ok(p),
        None => Pipe::new(),
    }
}

/// Returns a pipe that is known to be empty. A pipe that may still hold bytes must be dropped
/// instead, or the next connection would receive them.
pub fn give_back(pipe: Pipe) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(pipe);
        }
    });
}
