//! Zero-copy forwarding between two sockets: bytes go socket -> pipe -> socket with splice(2),
//! never through userspace. Each direction waits on tokio readiness, so no thread blocks, and
//! a half-close in one direction is passed on (`shutdown(SHUT_WR)`) while the other continues.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsFd;

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

/// Forwards until both directions have seen end-of-stream, or either fails. The caller drops
/// both sockets afterwards, which closes them.
pub async fn bidirectional(
    client: &TcpStream,
    backend: &TcpStream,
    metrics: &InstanceMetrics,
) -> io::Result<Transferred> {
    let (up, down) = tokio::try_join!(
        one_way(client, backend, &metrics.bytes_to_instance),
        one_way(backend, client, &metrics.bytes_to_client)
    )?;
    Ok(Transferred {
        client_to_backend: up,
        backend_to_client: down,
    })
}

/// One direction: fill the pipe from `src` when it is empty, then drain it into `dst`. The pipe
/// is held only between those two steps and goes back to the pool once empty.
/// `moved` counts bytes as they leave the pipe, so live charts see long transfers progress.
async fn one_way(src: &TcpStream, dst: &TcpStream, moved: &Counter) -> io::Result<u64> {
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
        while in_pipe > 0 {
            // On error the pipe may hold bytes: it is dropped (closed) with the `?`, not reused.
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_fd(), None, dst.as_fd(), None, in_pipe, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(n) => {
                    in_pipe -= n;
                    moved.inc_by(n as u64);
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
