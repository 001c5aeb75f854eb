//! Backends: each accepted connection is served on its own task until the peer closes.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on, IP:PORT.
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long, value_enum, default_value_t = Mode::Echo)]
    mode: Mode,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Mode {
    /// Send back everything received; close after the peer's half-close.
    Echo,
    /// Discard everything; close at the peer's half-close.
    Sink,
    /// Stream zeros until the peer goes away.
    Source,
    /// Answer each 64-byte request with 64 bytes; close when the peer closes.
    Reply64,
    /// Hold the connection open, sending nothing; close when the peer closes. Small per
    /// connection (no large buffer), for thousands of idle connections.
    Idle,
}

const CHUNK: usize = 256 << 10;
/// Listen backlog (the kernel caps it at net.core.somaxconn).
const BACKLOG: u32 = 4096;

pub async fn run(a: Args) -> std::io::Result<()> {
    // A deep accept queue: a proxy may open thousands of upstream connections at once (the idle
    // connections run), and a SYN dropped by a full queue costs a 1 s retransmit or a failure.
    let socket = if a.listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(a.listen)?;
    let listener = socket.listen(BACKLOG)?;
    // The script waits for this line before it sends traffic.
    println!(
        "{}",
        serde_json::json!({"listening": listener.local_addr()?.to_string()})
    );
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            // Out of fds or a connection reset before accept: keep serving the others.
            Err(e) => {
                eprintln!("loadgen server: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = conn.set_nodelay(true);
        tokio::spawn(async move {
            // A peer that resets mid-stream is normal at the end of a timed run.
            let _ = serve(a.mode, conn).await;
        });
    }
}

async fn serve(mode: Mode, mut conn: TcpStream) -> std::io::Result<()> {
    match mode {
        Mode::Echo => {
            let (mut r, mut w) = conn.split();
            tokio::io::copy(&mut r, &mut w).await?;
            w.shutdown().await?;
        }
        Mode::Sink => {
            let mut buf = vec![0u8; CHUNK];
            while conn.read(&mut buf).await? > 0 {}
        }
        Mode::Source => {
            let buf = vec![0u8; CHUNK];
            loop {
                conn.write_all(&buf).await?;
            }
        }
        Mode::Reply64 => {
            let mut buf = [0u8; 64];
            loop {
                match conn.read_exact(&mut buf).await {
                    Ok(_) => conn.write_all(&buf).await?,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Mode::Idle => {
            let mut buf = [0u8; 64];
            while conn.read(&mut buf).await? > 0 {}
        }
    }
    Ok(())
}
