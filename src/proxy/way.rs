//! One direction of a proxied `tcp` connection, `src` to `dst`, as a poll function of the
//! connection's hand-written future (`super::session`).
//!
//! A direction starts by copying: each recv goes into the thread's copy buffer
//! (`super::buffer`) and is sent on at once, two syscalls per message and nothing held between
//! messages. Once it streams (a recv fills the whole buffer, or `dst` cannot take everything
//! at once) it switches to splice(2) through a pipe from the thread's pool (`super::pipe`) for
//! the rest of the connection, which moves bulk data without copying it through userspace. The
//! pipe is held only while bytes wait in it, so an idle direction holds none in either mode.
//!
//! End of stream from `src` is passed on as a half-close (`shutdown(SHUT_WR)` on `dst`).

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::task::{ready, Context, Poll};

use nix::fcntl::{splice, SpliceFFlags};
use prometheus_client::metrics::counter::Counter;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::buffer::{self, COPY_BUF};
use super::pipe::{self, Pipe, PIPE_SIZE};

/// One direction's state. 24 bytes: every idle connection keeps two.
#[derive(Default)]
pub(super) struct Way {
    /// Bytes handed to `dst` so far.
    pub moved: u64,
    /// The pipe lent by the thread's pool, only while `in_pipe` > 0.
    pipe: Option<Pipe>,
    /// Bytes read from `src` (into the pipe) that `dst` has not taken yet.
    pub in_pipe: u32,
    /// Set once the direction streams: splice from then on.
    pub streaming: bool,
    /// `src`'s end of stream was seen and passed on: nothing more to do.
    pub ended: bool,
}

/// Why a direction stopped short of its end of stream.
#[derive(Debug)]
pub(super) enum Broken {
    /// `src` hung up (end of stream or reset) before the connection exchanged anything, and the
    /// caller asked for that to be told apart: the instance is to be replaced.
    HungUp(io::Error),
    /// Anything else: the connection is reset.
    Failed(io::Error),
}

impl Way {
    /// Whether this direction did anything visible to either peer: moved or holds bytes, or
    /// passed on an end of stream.
    pub fn started(&self) -> bool {
        self.moved > 0 || self.in_pipe > 0 || self.ended
    }

    /// Moves what `src` has to `dst` until `src` has nothing more for now or `dst` takes no
    /// more (Pending, with both wakers registered as needed), or `src` ended and the half-close
    /// was passed on (Ready(Ok)). With `hangup_replaces`, an end of stream or a reset from `src`
    /// before this direction moved anything is `Broken::HungUp`, and nothing is passed on.
    pub fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        counted: &Counter,
        hangup_replaces: bool,
    ) -> Poll<Result<(), Broken>> {
        loop {
            if self.in_pipe > 0 {
                ready!(self.poll_drain(cx, dst, counted)).map_err(Broken::Failed)?;
                continue;
            }
            if let Err(e) = ready!(src.poll_read_ready(cx)) {
                return Poll::Ready(Err(Broken::Failed(e)));
            }
            let read = if self.streaming {
                self.splice_in(src)
            } else {
                self.copy(src, dst, counted)
            };
            match read {
                Ok(Read::Bytes | Read::Nothing) => {}
                Ok(Read::End) => {
                    if hangup_replaces && !self.started() {
                        return Poll::Ready(Err(Broken::HungUp(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "closed before anything was exchanged",
                        ))));
                    }
                    self.ended = true;
                    return Poll::Ready(shutdown_write(dst).map_err(Broken::Failed));
                }
                Err(Fault::Src(e)) if hangup_replaces && !self.started() => {
                    return Poll::Ready(Err(Broken::HungUp(e)))
                }
                Err(Fault::Src(e) | Fault::Here(e)) => return Poll::Ready(Err(Broken::Failed(e))),
            }
        }
    }

    /// One recv into the thread's buffer, sent on to `dst` at once; what `dst` does not take
    /// goes into a pipe (and the direction streams from then on). A short read drained `src`
    /// (its receive queue was empty when the read ended), so its readiness is cleared without
    /// another recv to learn it.
    fn copy(&mut self, src: &TcpStream, dst: &TcpStream, counted: &Counter) -> Result<Read, Fault> {
        let mut got = 0;
        let mut sent = 0;
        let mut here = Ok(None);
        let r = src.try_io(Interest::READABLE, || {
            buffer::with(|buf| {
                got = recv(src, buf)?;
                if got == 0 {
                    return Ok(());
                }
                here = match dst.try_io(Interest::WRITABLE, || send(dst, &buf[..got])) {
                    Ok(n) => {
                        sent = n;
                        Ok(None)
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                    Err(e) => Err(e),
                };
                if here.is_ok() && sent < got {
                    // The buffer is the next connection's: the rest waits in a pipe.
                    here = stash_in_pipe(&buf[sent..got]).map(Some);
                }
                if got < buf.len() {
                    // tokio clears the readiness on WouldBlock; the bytes are accounted below.
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            })
        });
        if sent > 0 {
            self.moved += sent as u64;
            counted.inc_by(sent as u64);
        }
        match here.map_err(Fault::Here)? {
            Some(p) => {
                self.in_pipe = (got - sent) as u32;
                self.pipe = Some(p);
                self.streaming = true;
            }
            None if got == COPY_BUF => self.streaming = true,
            None => {}
        }
        match r {
            Ok(()) if got == 0 => Ok(Read::End),
            Ok(()) => Ok(Read::Bytes),
            // A short read: `src` drained, and its readiness was cleared.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(Read::Bytes),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Read::Nothing),
            Err(e) => Err(Fault::Src(e)),
        }
    }

    /// One splice from `src` into a pipe (taken from the pool, given back if nothing came).
    fn splice_in(&mut self, src: &TcpStream) -> Result<Read, Fault> {
        let pipe = pipe::take().map_err(Fault::Here)?;
        let filled = src.try_io(Interest::READABLE, || {
            splice(
                src.as_fd(),
                None,
                pipe.write.as_fd(),
                None,
                PIPE_SIZE as usize,
                SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
            )
            .map_err(io::Error::from)
        });
        match filled {
            Ok(0) => {
                pipe::give_back(pipe);
                Ok(Read::End)
            }
            Ok(n) => {
                self.in_pipe = n as u32;
                self.pipe = Some(pipe);
                Ok(Read::Bytes)
            }
            Err(e) => {
                pipe::give_back(pipe);
                if e.kind() == io::ErrorKind::WouldBlock {
                    Ok(Read::Nothing)
                } else {
                    Err(Fault::Src(e))
                }
            }
        }
    }

    /// Splices the pipe's bytes into `dst` until it is empty (and goes back to the pool) or
    /// `dst` takes no more.
    fn poll_drain(
        &mut self,
        cx: &mut Context<'_>,
        dst: &TcpStream,
        counted: &Counter,
    ) -> Poll<io::Result<()>> {
        while self.in_pipe > 0 {
            ready!(dst.poll_write_ready(cx))?;
            let Some(pipe) = &self.pipe else {
                unreachable!("bytes in a pipe without a pipe")
            };
            let moved = dst.try_io(Interest::WRITABLE, || {
                splice(
                    pipe.read.as_fd(),
                    None,
                    dst.as_fd(),
                    None,
                    self.in_pipe as usize,
                    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
                )
                .map_err(io::Error::from)
            });
            match moved {
                Ok(n) => {
                    self.in_pipe -= n as u32;
                    self.moved += n as u64;
                    counted.inc_by(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // On error the pipe may hold bytes: it is dropped with the connection, never
                // given back for another one to receive them.
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if let Some(p) = self.pipe.take() {
            pipe::give_back(p);
        }
        Poll::Ready(Ok(()))
    }
}

/// What one read from `src` found.
enum Read {
    /// Bytes (the next poll finds out whether more are waiting).
    Bytes,
    /// Nothing yet (`src`'s readiness was stale, and is cleared).
    Nothing,
    /// End of stream.
    End,
}

/// Whose failure a failed read is: `src`'s (which may mean the instance hung up), or this
/// side's (`dst` refused the bytes, no pipe to be had).
enum Fault {
    Src(io::Error),
    Here(io::Error),
}

/// Puts what `dst` did not take into an empty pipe from the pool. It always fits: `COPY_BUF`
/// is at most the smallest pipe's capacity; a short write would mean otherwise, and is an
/// error rather than lost bytes.
fn stash_in_pipe(rest: &[u8]) -> io::Result<Pipe> {
    let pipe = pipe::take()?;
    let n = nix::unistd::write(&pipe.write, rest).map_err(io::Error::from)?;
    if n < rest.len() {
        return Err(io::Error::other("a pipe smaller than the copy buffer"));
    }
    Ok(pipe)
}

fn recv(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reads at most `buf.len()` bytes into `buf`, a live exclusive slice; the fd is
    // open for the call (`s` is borrowed).
    let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn send(s: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: reads at most `buf.len()` bytes from `buf`, a live slice; the fd is open for the
    // call. MSG_NOSIGNAL: a peer gone is an EPIPE error here, not a signal.
    let n = unsafe {
        libc::send(
            s.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Passes a half-close on. A peer already gone (`NotConnected`) has nothing left to be told.
fn shutdown_write(dst: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        r => r,
    }
}
