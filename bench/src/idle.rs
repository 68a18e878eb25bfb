//! Many idle MQTT connections (CONNECT, CONNACK, then nothing but the keepalive) from several
//! loopback source addresses, to see what an idle connection costs the broker. With
//! `--subscribe`, each also subscribes to its own command topic `dev/<id>/cmd` at QoS 1, as a
//! fleet's idle device does; with `--persistent`, its session is persistent (clean session 0).

use crate::proc_stats;
use clap::Args;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

#[derive(Args, Debug)]
pub struct IdleArgs {
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: SocketAddr,
    #[arg(long, default_value = "broker")]
    label: String,
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Source addresses 127.0.0.1 .. 127.0.0.N, to stay under the per-address port range.
    #[arg(long, default_value_t = 8)]
    sources: u8,
    /// Broker process ids whose RSS is measured (comma-separated): the edges, for Wharf.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Process ids measured apart (Wharf's store-worker), reported as `worker_*`.
    #[arg(long, value_delimiter = ',')]
    worker_pids: Vec<u32>,
    /// Each client subscribes to `dev/<id>/cmd` at QoS 1 after CONNACK.
    #[arg(long)]
    subscribe: bool,
    /// Persistent sessions (clean session 0) instead of clean ones.
    #[arg(long)]
    persistent: bool,
    /// Seconds after connecting at which the clients start sending one PINGREQ each (and
    /// reading its PINGRESP) before the measurement, as devices do every keepalive: the steady
    /// state of an idle fleet rather than the moment after its CONNECTs. 0: no ping.
    #[arg(long, default_value_t = 0)]
    ping_after_secs: u64,
    /// Seconds over which the pings are spread evenly (a fleet's pings are spread over its
    /// keepalive, not sent at one instant).
    #[arg(long, default_value_t = 10)]
    ping_spread_secs: u64,
    /// Client ids are `<prefix>-<n>`: several generators at once (one per edge, each under
    /// the per-process open-file limit) need distinct ones.
    #[arg(long, default_value = "idle")]
    id_prefix: String,
    /// Seconds to keep every connection open after connecting and before measuring, so that
    /// generators started together are all connected at once when they measure.
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,
}

fn connect_packet(id: &str, clean: bool) -> Vec<u8> {
    let flags = if clean { 0x02 } else { 0x00 };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0x02, 0x58]; // keepalive 600 s
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

/// SUBSCRIBE (packet id 1) to `dev/<id>/cmd` at QoS 1.
fn subscribe_packet(id: &str) -> Vec<u8> {
    let filter = format!("dev/{id}/cmd");
    let mut body = vec![0, 1];
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(1);
    let mut packet = vec![0x82, body.len() as u8];
    packet.extend(body);
    packet
}

pub async fn run(args: IdleArgs) -> anyhow::Result<String> {
    let before = proc_stats::total_rss(&args.pids);
    let worker_before = proc_stats::total_rss(&args.worker_pids);
    let mut streams = Vec::with_capacity(args.connections);
    let mut failed = 0usize;
    for i in 0..args.connections {
        let source = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (i % args.sources as usize) as u8,
        ));
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let mut stream = match socket.connect(args.broker).await {
            Ok(s) => s,
            Err(_) => {
                failed += 1;
                continue;
            }
        };
        let id = format!("{}-{i}", args.id_prefix);
        stream
            .write_all(&connect_packet(&id, !args.persistent))
            .await?;
        let mut connack = [0u8; 4];
        match tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut connack)).await {
            Ok(Ok(_)) if connack[3] == 0 => {}
            _ => {
                failed += 1;
                continue;
            }
        }
        if args.subscribe {
            stream.write_all(&subscribe_packet(&id)).await?;
            let mut suback = [0u8; 5];
            let read =
                tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut suback));
            match read.await {
                Ok(Ok(_)) if suback[0] == 0x90 && suback[4] == 1 => {}
                _ => {
                    failed += 1;
                    continue;
                }
            }
        }
        streams.push(stream);
    }
    if args.ping_after_secs > 0 {
        tokio::time::sleep(Duration::from_secs(args.ping_after_secs)).await;
        // In 100 slices of the spread, each slice's clients ping and read their answers.
        let slice = streams.len().div_ceil(100).max(1);
        let pause = Duration::from_millis(args.ping_spread_secs * 10);
        for chunk in streams.chunks_mut(slice) {
            let started = tokio::time::Instant::now();
            for stream in chunk.iter_mut() {
                stream.write_all(&[0xc0, 0x00]).await?;
            }
            for stream in chunk.iter_mut() {
                let mut pingresp = [0u8; 2];
                tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut pingresp))
                    .await??;
            }
            tokio::time::sleep_until(started + pause).await;
        }
    }
    // Let the broker settle (buffers released after the handshakes).
    tokio::time::sleep(Duration::from_secs(2 + args.hold_secs)).await;
    let after = proc_stats::total_rss(&args.pids);
    let worker_after = proc_stats::total_rss(&args.worker_pids);
    let connected = streams.len();
    let per_conn = |before: u64, after: u64| {
        if connected > 0 {
            (after as f64 - before as f64) * 1024.0 / connected as f64
        } else {
            0.0
        }
    };
    drop(streams);
    let scenario = match (args.subscribe, args.persistent) {
        (false, false) => "idle",
        (true, false) => "idle-subscribed",
        (false, true) => "idle-persistent",
        (true, true) => "idle-subscribed-persistent",
    };
    Ok(format!(
        "{{\"label\":\"{}\",\"scenario\":\"{scenario}\",\"connections\":{},\"failed\":{},\"rss_before_kib\":{},\"rss_after_kib\":{},\"bytes_per_connection\":{:.0},\"worker_rss_before_kib\":{},\"worker_rss_after_kib\":{},\"worker_bytes_per_connection\":{:.0}}}",
        args.label,
        connected,
        failed,
        before,
        after,
        per_conn(before, after),
        worker_before,
        worker_after,
        per_conn(worker_before, worker_after)
    ))
}
