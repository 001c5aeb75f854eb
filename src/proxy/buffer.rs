//! The copy buffer of a proxy thread: small payloads move recv -> buffer -> send in one go,
//! without a pipe and without memory of their own. One buffer per thread serves every
//! connection of that thread, because it never holds bytes across an await: what is read into
//! it is sent on at once, and what the destination cannot take is moved into a pipe before the
//! buffer is used again.

use std::cell::RefCell;

/// Bytes read per recv. A recv that fills the whole buffer means more is waiting: the direction
/// streams, and switches to splice. 8 KiB because that is what the smallest pipe the kernel
/// hands out holds (2 pages, once a user is past `pipe-user-pages-soft`), so the part a slow
/// destination leaves always fits into an empty pipe.
pub const COPY_BUF: usize = 8 * 1024;

thread_local! {
    /// Made on a thread's first use (proxy threads only).
    static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; COPY_BUF].into_boxed_slice());
}

/// Runs `f` with this thread's copy buffer. `f` must hand on or stash everything it reads
/// before it returns, and must not call `with` itself.
pub fn with<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    BUF.with(|b| f(&mut b.borrow_mut()))
}
