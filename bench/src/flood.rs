//! A flood of CONNECTs with a wrong password at a fixed rate, each answered (CONNACK) and
//! closed: what a credential-stuffing device fleet costs the sessions already connected.

use clap::Args;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Args, Debug)]
pub struct FloodArgs {
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: SocketAddr,
    /// CONNECTs per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    #[arg(long, default_value_t = 30)]
    secs: u64,
    /// A user that exists (its hash is then checked) and a password that is not its own.
    #[arg(long, default_value = "dev1")]
    user: String,
    #[arg(long, default_value = "wrong")]
    password: String,
}

fn connect_packet(id: &str, user: &str, password: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60];
    for field in [id, user, password] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

pub async fn run(args: FloodArgs) -> anyhow::Result<String> {
    anyhow::ensure!(args.rate > 0, "--rate must be at least 1");
    let answered = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let every = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let start = Instant::now();
    let end = start + Duration::from_secs(args.secs);
    let mut sent = 0u64;
    while Instant::now() < end {
        let due = start + every * (sent as u32);
        tokio::time::sleep_until(due.into()).await;
        let packet = connect_packet(&format!("flood-{sent}"), &args.user, &args.password);
        let (answered, refused) = (answered.clone(), refused.clone());
        let broker = args.broker;
        tokio::spawn(async move {
            let Ok(mut stream) = TcpStream::connect(broker).await else {
                return;
            };
            if stream.write_all(&packet).await.is_err() {
                return;
            }
            let mut ack = [0u8; 4];
            let read = tokio::time::timeout(Duration::from_secs(15), stream.read_exact(&mut ack));
            if let Ok(Ok(_)) = read.await {
                answered.fetch_add(1, Ordering::Relaxed);
                if ack[3] != 0 {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        sent += 1;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let secs = start.elapsed().as_secs_f64();
    Ok(format!(
        "flood sent={sent} answered={} refused={} rate={:.0}/s",
        answered.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        sent as f64 / secs
    ))
}
