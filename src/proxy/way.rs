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

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::io::{Read, Write};
    use std::time::Duration;

    /// Two loopback connections: `writer` sends into the proxy's socket `src`, and what the
    /// direction moves into the proxy's socket `dst` reaches `reader`.
    struct Wires {
        writer: std::net::TcpStream,
        src: std::net::TcpStream,
        dst: std::net::TcpStream,
        reader: std::net::TcpStream,
    }

    fn wires() -> Wires {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let writer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (src, _) = l.accept().unwrap();
        let dst = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (reader, _) = l.accept().unwrap();
        for s in [&src, &dst] {
            s.set_nonblocking(true).unwrap();
            s.set_nodelay(true).unwrap();
        }
        Wires {
            writer,
            src,
            dst,
            reader,
        }
    }

    /// Byte `i` of a test stream: not periodic at any power of two, so that a lost, repeated
    /// or reordered chunk shows.
    fn pattern(i: usize) -> u8 {
        (i % 251) as u8
    }

    fn stream(from: usize, len: usize) -> Vec<u8> {
        (from..from + len).map(pattern).collect()
    }

    /// Polls `way` until it has delivered `total` bytes in all (Ok(None)), or until it ends or
    /// fails (Ok(Some(result))); bounded by 5 s.
    async fn pump(
        way: &mut Way,
        src: &TcpStream,
        dst: &TcpStream,
        counted: &Counter,
        hangup_replaces: bool,
        total: u64,
    ) -> Option<Result<(), Broken>> {
        let run = poll_fn(
            |cx| match way.poll(cx, src, dst, counted, hangup_replaces) {
                Poll::Ready(r) => Poll::Ready(Some(r)),
                Poll::Pending if way.moved >= total && way.in_pipe == 0 => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        );
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("the direction stalled")
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Messages smaller than the copy buffer go through it: no splice, no pipe, and the bytes
    /// arrive as sent.
    #[test]
    fn small_messages_are_copied_without_a_pipe() {
        let mut w = wires();
        let counted = Counter::default();
        let mut way = Way::default();
        runtime().block_on(async {
            let (src, dst) = (
                TcpStream::from_std(w.src).unwrap(),
                TcpStream::from_std(w.dst).unwrap(),
            );
            for i in 0..3 {
                w.writer.write_all(&stream(i * 64, 64)).unwrap();
                let total = (i as u64 + 1) * 64;
                assert!(pump(&mut way, &src, &dst, &counted, false, total)
                    .await
                    .is_none());
                assert!(!way.streaming, "message {i} was spliced");
                assert!(way.pipe.is_none(), "message {i} holds a pipe");
            }
        });
        let mut got = vec![0u8; 192];
        w.reader.read_exact(&mut got).unwrap();
        assert_eq!(got, stream(0, 192));
        assert_eq!(way.moved, 192);
        assert_eq!(counted.get(), 192);
    }

    /// A recv that fills the whole copy buffer means a stream: the rest is spliced, arrives
    /// intact, and once it is through the pipe is back in the pool.
    #[test]
    fn a_stream_switches_to_splice_and_arrives_intact() {
        const LEN: usize = 1 << 20;
        let w = wires();
        let mut writer = w.writer;
        // Kept open (returned) until the end: its end of stream is another test.
        let feeder = std::thread::spawn(move || {
            writer.write_all(&stream(0, LEN)).unwrap();
            writer
        });
        let mut reader = w.reader;
        let drain = std::thread::spawn(move || {
            let mut got = vec![0u8; LEN];
            reader.read_exact(&mut got).map(|_| got)
        });
        let counted = Counter::default();
        let mut way = Way::default();
        runtime().block_on(async {
            let (src, dst) = (
                TcpStream::from_std(w.src).unwrap(),
                TcpStream::from_std(w.dst).unwrap(),
            );
            assert!(pump(&mut way, &src, &dst, &counted, false, LEN as u64)
                .await
                .is_none());
        });
        feeder.join().unwrap();
        assert!(
            drain.join().unwrap().unwrap() == stream(0, LEN),
            "bytes changed"
        );
        assert!(way.streaming, "1 MiB never filled the copy buffer");
        assert!(way.pipe.is_none(), "an idle direction holds a pipe");
        assert_eq!(counted.get(), LEN as u64);
    }

    /// What a slow destination does not take at once waits in a pipe (the copy buffer is the
    /// next connection's), and reaches it in order once it reads.
    #[test]
    fn what_a_slow_destination_leaves_waits_in_a_pipe() {
        const CHUNK: usize = COPY_BUF / 2;
        let mut w = wires();
        socket2::SockRef::from(&w.dst)
            .set_send_buffer_size(4096)
            .unwrap();
        socket2::SockRef::from(&w.reader)
            .set_recv_buffer_size(4096)
            .unwrap();
        let counted = Counter::default();
        let mut way = Way::default();
        let rt = runtime();
        let (src, dst) = rt.block_on(async {
            (
                TcpStream::from_std(w.src).unwrap(),
                TcpStream::from_std(w.dst).unwrap(),
            )
        });
        // Chunks smaller than the copy buffer, one at a time, until the destination (which
        // reads nothing) leaves part of one.
        let mut sent = 0;
        while way.in_pipe == 0 {
            assert!(sent < 256 * CHUNK, "the destination never filled up");
            w.writer.write_all(&stream(sent, CHUNK)).unwrap();
            sent += CHUNK;
            rt.block_on(async {
                let settled = poll_fn(|cx| match way.poll(cx, &src, &dst, &counted, false) {
                    Poll::Ready(r) => panic!("ended early: {:?}", r.err()),
                    Poll::Pending if way.moved + way.in_pipe as u64 == sent as u64 => {
                        Poll::Ready(())
                    }
                    Poll::Pending => Poll::Pending,
                });
                tokio::time::timeout(Duration::from_secs(5), settled)
                    .await
                    .expect("a chunk never left the source");
            });
        }
        assert!(way.streaming, "a partial send must switch to splice");
        assert!(way.pipe.is_some());
        let mut reader = w.reader;
        let drain = std::thread::spawn(move || {
            let mut got = vec![0u8; sent];
            reader.read_exact(&mut got).map(|_| got)
        });
        rt.block_on(async {
            assert!(pump(&mut way, &src, &dst, &counted, false, sent as u64)
                .await
                .is_none());
        });
        assert!(
            drain.join().unwrap().unwrap() == stream(0, sent),
            "bytes changed"
        );
        assert!(way.pipe.is_none(), "the pipe went back once empty");
    }

    /// End of stream from the source is passed on as a half-close.
    #[test]
    fn end_of_stream_is_passed_on() {
        let mut w = wires();
        w.writer.write_all(b"last words").unwrap();
        w.writer.shutdown(std::net::Shutdown::Write).unwrap();
        let counted = Counter::default();
        let mut way = Way::default();
        let end = runtime().block_on(async {
            let (src, dst) = (
                TcpStream::from_std(w.src).unwrap(),
                TcpStream::from_std(w.dst).unwrap(),
            );
            pump(&mut way, &src, &dst, &counted, true, u64::MAX).await
        });
        assert!(matches!(end, Some(Ok(()))), "{end:?}");
        assert!(way.ended);
        let mut got = Vec::new();
        w.reader.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"last words");
    }

    /// Asked to tell a hang-up apart (nothing exchanged yet): the source's end of stream or
    /// reset is `HungUp`, and the destination is told nothing.
    #[test]
    fn a_hangup_before_anything_moved_is_told_apart() {
        for reset in [false, true] {
            let w = wires();
            if reset {
                socket2::SockRef::from(&w.writer)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            }
            drop(w.writer);
            let counted = Counter::default();
            let mut way = Way::default();
            let rt = runtime();
            // Both kept open to the end: dropping `dst` would itself close it.
            let (src, dst) = rt.block_on(async {
                (
                    TcpStream::from_std(w.src).unwrap(),
                    TcpStream::from_std(w.dst).unwrap(),
                )
            });
            let end = rt.block_on(pump(&mut way, &src, &dst, &counted, true, u64::MAX));
            assert!(matches!(end, Some(Err(Broken::HungUp(_)))), "{end:?}");
            assert!(!way.ended);
            w.reader.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 1];
            assert_eq!(
                (&w.reader).read(&mut buf).map_err(|e| e.kind()),
                Err(io::ErrorKind::WouldBlock),
                "the destination must not hear of it (reset: {reset})"
            );
        }
    }
}
