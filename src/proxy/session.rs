//! A proxied `tcp` connection once an instance accepted it: both directions (`super::way`),
//! polled by hand from the connection's task. Every idle connection keeps one, so it is small:
//! two 24-byte direction states, a flag and an optional timer; it waits through the sockets'
//! own wakers, with no per-await state of its own.
//!
//! Until something is exchanged (a byte either way, or the client's end of stream) the
//! instance may still be replaced: a process that dies just after its kernel accepted a
//! connection closes or resets it before saying anything, and the client, which has not
//! spoken, need not notice. The instance's side is looked at first, so that its hang-up is
//! seen before the client's first bytes are handed to it; no peek is needed, because the
//! client's first bytes are read (and sent on) like any others.
//!
//! A half-closed connection (one direction ended) whose open direction moves no byte and
//! holds none for the half-close limit is ended, as conntrack forgets a connection idle in
//! FIN_WAIT; without it a peer that neither sends nor closes after the other side's FIN
//! would hold both sockets forever.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::route_table::Backend;
use super::way::{Broken, Way};

/// Bytes moved each way, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

/// The state of a connection whose instance accepted it, polled by the connection's task
/// (`super::tcp`), which owns the sockets and lends them to each poll. Ready when both
/// directions ended (`Ok`), when either failed or the half-close limit passed
/// (`Broken::Failed`), or when the instance hung up before anything was exchanged
/// (`Broken::HungUp`; the client socket is untouched and can go to another instance).
#[derive(Default)]
pub(super) struct Session {
    /// Client to instance.
    up: Way,
    /// Instance to client.
    down: Way,
    /// Something was exchanged: the instance is kept whatever it does.
    exchanged: bool,
    /// Allocated only once one direction ended while the other is open, so a connection with
    /// both directions open carries no timer.
    idle: Option<Pin<Box<Sleep>>>,
    /// The open direction's `moved` when the idle timer was last set.
    idle_seen: u64,
}

impl Session {
    /// A session whose instance has served the connection already: an HTTP upgrade the
    /// instance accepted with a 101 (counted then), so a hang-up is an end like any other
    /// and not a reason to try another instance.
    pub fn served() -> Session {
        Session {
            exchanged: true,
            ..Session::default()
        }
    }

    pub fn transferred(&self) -> Transferred {
        Transferred {
            client_to_backend: self.up.moved,
            backend_to_client: self.down.moved,
        }
    }

    /// Moves what can be moved now, either way. `half_closed_idle`: the half-close limit.
    pub fn poll(
        &mut self,
        cx: &mut Context<'_>,
        client: &TcpStream,
        backend: &TcpStream,
        instance: &Backend,
        half_closed_idle: Duration,
    ) -> Poll<Result<Transferred, Broken>> {
        let m = &instance.metrics;
        // The instance's side first: see above.
        if !self.down.ended {
            let opening = !self.exchanged;
            if let Poll::Ready(Err(e)) =
                self.down
                    .poll(cx, backend, client, &m.bytes_to_client, opening)
            {
                if !matches!(e, Broken::HungUp(_)) {
                    self.exchange(instance);
                }
                return Poll::Ready(Err(e));
            }
        }
        if !self.up.ended {
            if let Poll::Ready(Err(e)) =
                self.up
                    .poll(cx, client, backend, &m.bytes_to_instance, false)
            {
                self.exchange(instance);
                return Poll::Ready(Err(e));
            }
        }
        if self.up.started() || self.down.started() {
            self.exchange(instance);
        }
        match (self.up.ended, self.down.ended) {
            (true, true) => Poll::Ready(Ok(self.transferred())),
            (false, false) => Poll::Pending,
            _ => self.poll_half_closed(cx, half_closed_idle).map(Err),
        }
    }

    /// The instance served this connection: counted once, whatever came first.
    fn exchange(&mut self, instance: &Backend) {
        if !self.exchanged {
            self.exchanged = true;
            instance.metrics.connections.inc();
            instance.health.succeeded();
        }
    }

    /// The half-close limit: Ready with an error once the open direction (`up` unless it
    /// ended) has moved and held nothing for `limit`.
    fn poll_half_closed(&mut self, cx: &mut Context<'_>, limit: Duration) -> Poll<Broken> {
        let open = if self.up.ended { &self.down } else { &self.up };
        let (moved, held) = (open.moved, open.in_pipe);
        let timer = match &mut self.idle {
            Some(t) => t,
            None => {
                self.idle_seen = moved;
                self.idle.insert(Box::pin(tokio::time::sleep(limit)))
            }
        };
        while timer.as_mut().poll(cx).is_ready() {
            if moved == self.idle_seen && held == 0 {
                return Poll::Ready(Broken::Failed(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("half-closed and idle for {} s", limit.as_secs_f64()),
                )));
            }
            self.idle_seen = moved;
            timer.as_mut().reset(tokio::time::Instant::now() + limit);
        }
        Poll::Pending
    }
}
