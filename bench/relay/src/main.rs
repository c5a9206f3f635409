//! A TCP relay that delays every byte by a fixed one-way time in each direction, for
//! `bench/latency.sh`: the round-trip time of a distant Bitbucket on loopback (`tc netem` is not
//! available on the benchmark machines).
//!
//! `relay <listen addr> <target addr> <one-way delay ms>`: each accepted connection gets its own
//! connection to the target. Whatever is read from one side is written to the other no sooner
//! than `delay` after it was read, in the order it was read; a half-close is passed on after the
//! same delay, and a connection to the target that fails closes the client's. Round-trip time is
//! twice the delay. Bandwidth is not limited; the relay buffers up to 4 MiB per direction.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

type Error = Box<dyn std::error::Error + Send + Sync>;

const CHUNK: usize = 64 * 1024;
/// Chunks in flight per direction (at most `CHUNK` bytes each).
const IN_FLIGHT: usize = 64;

fn main() {
    if let Err(error) = run() {
        eprintln!("relay: {error}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, target, delay_ms] = args.as_slice() else {
        return Err("usage: relay <listen addr> <target addr> <one-way delay ms>".into());
    };
    let delay = Duration::from_millis(
        delay_ms
            .parse()
            .map_err(|e| format!("delay `{delay_ms}`: {e}"))?,
    );
    let target = target.clone();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(listen.as_str()).await?;
            loop {
                let (client, _) = listener.accept().await?;
                let target = target.clone();
                tokio::spawn(async move {
                    if let Err(error) = relay(client, &target, delay).await {
                        eprintln!("relay: {error}");
                    }
                });
            }
        })
}

async fn relay(client: TcpStream, target: &str, delay: Duration) -> Result<(), Error> {
    // The connect itself crosses the distance too: SYN out, SYN-ACK back.
    let connecting = TcpStream::connect(target);
    tokio::time::sleep(delay).await;
    let server = connecting.await?;
    tokio::time::sleep(delay).await;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let upstream = tokio::spawn(one_way(client_read, server_write, delay));
    let downstream = one_way(server_read, client_write, delay).await;
    upstream.await??;
    downstream
}

/// Reads `from` into timestamped chunks and writes each to `to` once `delay` has passed since
/// it was read; `None` stands for the end of the stream.
async fn one_way(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    delay: Duration,
) -> Result<(), Error> {
    let (sender, mut receiver) = mpsc::channel::<(Instant, Option<Bytes>)>(IN_FLIGHT);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            let chunk = (n > 0).then(|| Bytes::copy_from_slice(&buf[..n]));
            if sender.send((Instant::now(), chunk)).await.is_err() || n == 0 {
                return;
            }
        }
    });
    while let Some((read_at, chunk)) = receiver.recv().await {
        tokio::time::sleep_until(read_at + delay).await;
        match chunk {
            Some(bytes) => {
                if to.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            None => {
                let _ = to.shutdown().await;
                break;
            }
        }
    }
    reader.abort();
    Ok(())
}
