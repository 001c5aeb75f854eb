//! Zero-copy forwarding between two sockets: bytes go socket -> pipe -> socket with splice(2),
//! never through userspace. Each direction waits on tokio readiness, so no thread blocks, and
//! a half-close in one direction is passed on (`shutdown(SHUT_WR)`) while the other continues,
//! for as long as bytes keep moving: a half-closed connection whose open direction stays idle
//! for the half-close limit is ended, as netfilter's conntrack forgets a connection idle in
//! FIN_WAIT (120 s by default). Without it, a peer that neither sends nor closes after the other
//! side's FIN would hold both sockets forever.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{splice, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use prometheus_client::metrics::counter::Counter;

use super::pipe::{self, PIPE_SIZE};
use crate::metrics::InstanceMetrics;

/// Bytes moved each way, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

/// Forwards until both directions have seen end-of-stream, or either fails, or the direction
/// still open after the other's end moves no byte for `half_closed_idle` (`TimedOut`). The
/// caller drops both sockets afterwards, which closes them.
pub async fn bidirectional(
    client: &TcpStream,
    backend: &TcpStream,
    metrics: &InstanceMetrics,
    half_closed_idle: Duration,
) -> io::Result<Transferred> {
    let (up_way, down_way) = (Progress::default(), Progress::default());
    let up = one_way(client, backend, &metrics.bytes_to_instance, &up_way);
    let down = one_way(backend, client, &metrics.bytes_to_client, &down_way);
    tokio::pin!(up, down);
    let (client_to_backend, backend_to_client) = tokio::select! {
        r = &mut up => {
            let up = r?;
            (up, until_idle(down, &down_way, half_closed_idle).await?)
        }
        r = &mut down => {
            let down = r?;
            (until_idle(up, &up_way, half_closed_idle).await?, down)
        }
    };
    Ok(Transferred {
        client_to_backend,
        backend_to_client,
    })
}

/// One direction's progress, for the idle check of a half-closed connection.
#[derive(Default)]
struct Progress {
    /// Bytes delivered so far.
    moved: AtomicU64,
    /// Bytes read but not yet delivered: the destination is slow to take them, which is not
    /// idleness (as long as it takes them at all, TCP's own window probes keep it alive).
    held: AtomicU64,
}

/// Runs the one direction still open until it ends, or fails it once it has delivered nothing
/// and held nothing back for `idle`. The timer is allocated only here, so a connection with
/// both directions open carries none.
async fn until_idle(
    mut way: Pin<&mut impl Future<Output = io::Result<u64>>>,
    progress: &Progress,
    idle: Duration,
) -> io::Result<u64> {
    let mut seen = progress.moved.load(Ordering::Relaxed);
    let mut timer = Box::pin(tokio::time::sleep(idle));
    loop {
        tokio::select! {
            r = way.as_mut() => return r,
            _ = timer.as_mut() => {
                let now = progress.moved.load(Ordering::Relaxed);
                if now == seen && progress.held.load(Ordering::Relaxed) == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("half-closed and idle for {} s", idle.as_secs_f64()),
                    ));
                }
                seen = now;
                timer.as_mut().reset(tokio::time::Instant::now() + idle);
            }
        }
    }
}

/// One direction: fill the pipe from `src` when it is empty, then drain it into `dst`. The pipe
/// is held only between those two steps and goes back to the pool once empty.
/// `counted` counts bytes as they leave the pipe, so live charts see long transfers progress;
/// `progress` follows them for this connection's idle check.
async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    counted: &Counter,
    progress: &Progress,
) -> io::Result<u64> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
    loop {
        src.readable().await?;
        let pipe = pipe::take()?;
        let filled = src.try_io(Interest::READABLE, || {
            splice(
                src.as_fd(),
                None,
                pipe.write.as_fd(),
                None,
                PIPE_SIZE as usize,
                flags,
            )
            .map_err(io::Error::from)
        });
        let mut in_pipe = match filled {
            Ok(0) => {
                pipe::give_back(pipe);
                // End of stream from src: pass the half-close on and let the other way finish.
                return match dst_shutdown(dst) {
                    Ok(()) => Ok(total),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(total),
                    Err(e) => Err(e),
                };
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe::give_back(pipe);
                continue;
            }
            Err(e) => {
                pipe::give_back(pipe);
                return Err(e);
            }
        };
        total += in_pipe as u64;
        progress.held.store(in_pipe as u64, Ordering::Relaxed);
        while in_pipe > 0 {
            // On error the pipe may hold bytes: it is dropped (closed) with the `?`, not reused.
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_fd(), None, dst.as_fd(), None, in_pipe, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(n) => {
                    in_pipe -= n;
                    counted.inc_by(n as u64);
                    progress.moved.fetch_add(n as u64, Ordering::Relaxed);
                    progress.held.store(in_pipe as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        pipe::give_back(pipe);
    }
}

fn dst_shutdown(dst: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(dst).shutdown(Shutdown::Write)
}
