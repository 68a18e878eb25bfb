//! A fleet that comes back at once: `devices` persistent sessions (3.1.1, clean session 0),
//! each subscribed at QoS 1 to its own `dev/<i>/cmd`, go away; `owed` QoS 1 messages are
//! published to each device's topic (after `unrelated` messages on topics no device
//! subscribes to); then every device reconnects within `ramp_secs` and reads until it holds
//! all that it is owed. Checked by message identity (`<device>:<seq>` payloads): refused
//! CONNECTs, devices complete, messages lost, twice and out of order, and when the last
//! device was complete. Raw MQTT packets on plain sockets: the client costs little, so the
//! broker is what is measured.

use bytes::{Buf, BytesMut};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

#[derive(clap::Args, Clone)]
pub struct StormArgs {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Persistent devices.
    #[arg(long, default_value_t = 5000)]
    devices: u32,
    /// QoS 1 messages owed to each device.
    #[arg(long, default_value_t = 20)]
    owed: u32,
    /// QoS 1 messages on topics no device subscribes to, stored before the owed ones.
    #[arg(long, default_value_t = 0)]
    unrelated: u32,
    /// The devices reconnect spread over this many seconds.
    #[arg(long, default_value_t = 2.0)]
    ramp_secs: f64,
    /// Give up on the devices still incomplete after this many seconds of the storm.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Client id prefix (a run on a broker that already holds sessions uses a new one).
    #[arg(long, default_value = "storm")]
    prefix: String,
    /// Keepalive the devices send, in seconds.
    #[arg(long, default_value_t = 60)]
    keepalive: u16,
    /// Every device subscribes to one topic, `fleet/<prefix>/all`, and `owed` messages are
    /// published there once (each stored once, delivered to every device).
    #[arg(long)]
    broadcast: bool,
    /// The broker's processes (comma-separated): their CPU during the storm is reported.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
}

impl StormArgs {
    fn filter(&self, id: &str) -> String {
        if self.broadcast {
            format!("fleet/{}/all", self.prefix)
        } else {
            format!("dev/{id}/cmd")
        }
    }
}

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

pub(crate) fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

pub(crate) fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend((s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn connect_packet(id: &str, keepalive: u16) -> Vec<u8> {
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.push(4);
    body.push(0); // clean session 0
    body.extend(keepalive.to_be_bytes());
    string(id.as_bytes(), &mut body);
    packet(0x10, &body)
}

pub(crate) fn subscribe_packet(filter: &str) -> Vec<u8> {
    let mut body = vec![0, 1];
    string(filter.as_bytes(), &mut body);
    body.push(1);
    packet(0x82, &body)
}

pub(crate) fn publish_packet(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic.as_bytes(), &mut body);
    body.extend(pkid.to_be_bytes());
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

/// One whole packet from `buf`: (first byte, body), or `None` when more bytes are needed.
pub(crate) fn take_packet(buf: &mut BytesMut) -> anyhow::Result<Option<(u8, BytesMut)>> {
    let (mut len, mut used, mut shift) = (0usize, 1usize, 0);
    loop {
        let Some(&b) = buf.get(used) else {
            return Ok(None);
        };
        len |= ((b & 0x7f) as usize) << shift;
        used += 1;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
        anyhow::ensure!(shift < 28, "bad remaining length");
    }
    if buf.len() < used + len {
        return Ok(None);
    }
    let header = buf[0];
    buf.advance(used);
    Ok(Some((header, buf.split_to(len))))
}

/// One raw MQTT connection: the socket and what was read of it.
pub(crate) struct Conn {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

impl Conn {
    async fn open(args: &StormArgs, id: &str) -> anyhow::Result<(Conn, u8)> {
        let addr = format!("{}:{}", args.host, args.port);
        Conn::connect(&addr, &connect_packet(id, args.keepalive)).await
    }

    /// Connects to `addr`, sends `connect` (a CONNECT packet) and returns the CONNACK's code.
    pub(crate) async fn connect(addr: &str, connect: &[u8]) -> anyhow::Result<(Conn, u8)> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            stream,
            buf: BytesMut::with_capacity(4096),
        };
        conn.stream.write_all(connect).await?;
        let (header, body) = conn.next().await?;
        anyhow::ensure!(header >> 4 == 2 && body.len() >= 2, "no CONNACK");
        Ok((conn, body[1]))
    }

    pub(crate) async fn next(&mut self) -> anyhow::Result<(u8, BytesMut)> {
        loop {
            if let Some(p) = take_packet(&mut self.buf)? {
                return Ok(p);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                anyhow::bail!("closed");
            }
        }
    }
}

/// A device's subscription, made once (and the session left to wait).
async fn prepare(args: &StormArgs, i: u32) -> anyhow::Result<()> {
    let id = format!("{}-{i}", args.prefix);
    let (mut conn, code) = Conn::open(args, &id).await?;
    anyhow::ensure!(code == 0, "CONNACK {code}");
    conn.stream
        .write_all(&subscribe_packet(&args.filter(&id)))
        .await?;
    loop {
        let (header, _) = conn.next().await?;
        if header >> 4 == 9 {
            break;
        }
    }
    conn.stream.write_all(&[0xe0, 0]).await?;
    Ok(())
}

/// Publishes `count` QoS 1 messages from `topics(k)`, `payload(k)`, with a window of 100
/// unacknowledged, and waits for every PUBACK.
async fn publish_all(
    args: &StormArgs,
    name: &str,
    count: u64,
    message: impl Fn(u64) -> (String, Vec<u8>),
) -> anyhow::Result<()> {
    let (mut conn, code) = Conn::open(args, name).await?;
    anyhow::ensure!(code == 0, "publisher CONNACK {code}");
    let (mut sent, mut acked) = (0u64, 0u64);
    while acked < count {
        let mut out = Vec::new();
        while sent < count && sent - acked < 100 {
            let (topic, payload) = message(sent);
            out.extend(publish_packet(&topic, (sent % 65_000 + 1) as u16, &payload));
            sent += 1;
        }
        if !out.is_empty() {
            conn.stream.write_all(&out).await?;
        }
        let (header, _) = conn.next().await?;
        if header >> 4 == 4 {
            acked += 1;
        }
    }
    conn.stream.write_all(&[0xe0, 0]).await?;
    Ok(())
}

#[derive(Default)]
struct Outcome {
    refused: bool,
    failed: bool,
    complete_secs: Option<f64>,
    got: u32,
    twice: u32,
    out_of_order: u32,
}

/// One device's return: CONNECT at `start + delay`, then PUBACK every PUBLISH until it holds
/// every sequence number it is owed.
async fn come_back(args: Arc<StormArgs>, i: u32, start: Instant, delay: Duration) -> Outcome {
    tokio::time::sleep_until((start + delay).into()).await;
    let id = format!("{}-{i}", args.prefix);
    let deadline = start + Duration::from_secs(args.timeout_secs);
    let mut outcome = Outcome::default();
    let run = async {
        let (mut conn, code) = Conn::open(&args, &id).await?;
        if code != 0 {
            outcome.refused = true;
            return Ok(());
        }
        let mut seen = HashSet::new();
        let mut last: Option<u32> = None;
        while seen.len() < args.owed as usize {
            let (header, mut body) = conn.next().await?;
            if header >> 4 != 3 {
                continue;
            }
            let qos = (header >> 1) & 3;
            let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
            body.advance(2 + topic_len);
            if qos > 0 {
                let pkid = [body[0], body[1]];
                body.advance(2);
                conn.stream.write_all(&[0x40, 2, pkid[0], pkid[1]]).await?;
            }
            let text = std::str::from_utf8(&body).unwrap_or("");
            let Some(seq) = text
                .rsplit_once(':')
                .and_then(|(_, s)| s.parse::<u32>().ok())
            else {
                continue;
            };
            if !seen.insert(seq) {
                outcome.twice += 1;
            } else {
                outcome.got += 1;
                if last.is_some_and(|l| seq < l) {
                    outcome.out_of_order += 1;
                }
            }
            last = Some(seq);
        }
        outcome.complete_secs = Some(start.elapsed().as_secs_f64());
        let _ = conn.stream.write_all(&[0xe0, 0]).await;
        anyhow::Ok(())
    };
    match tokio::time::timeout_at(deadline.into(), run).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) | Err(_) => outcome.failed = outcome.complete_secs.is_none() && !outcome.refused,
    }
    outcome
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub async fn run(args: StormArgs) -> anyhow::Result<String> {
    let args = Arc::new(args);
    let gate = Arc::new(Semaphore::new(200));
    let prepare_started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.devices {
        let (args, gate) = (args.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire().await;
            prepare(&args, i).await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let prepare_secs = prepare_started.elapsed().as_secs_f64();
    let noise_started = Instant::now();
    if args.unrelated > 0 {
        publish_all(
            &args,
            &format!("{}-noise", args.prefix),
            args.unrelated as u64,
            |k| {
                (
                    format!("noise/{}/t", k % 10_000),
                    format!("n:{k}").into_bytes(),
                )
            },
        )
        .await?;
    }
    let noise_secs = noise_started.elapsed().as_secs_f64();
    let owed_started = Instant::now();
    let (devices, owed) = (args.devices as u64, args.owed as u64);
    // Broadcast: one publisher, so that the sequence numbers are in publishing order.
    let publishers = if args.broadcast {
        0
    } else {
        4u64.min(devices.max(1))
    };
    if args.broadcast {
        let topic = args.filter("");
        let prefix = args.prefix.clone();
        publish_all(&args, &format!("{}-pub", args.prefix), owed, move |k| {
            (topic.clone(), format!("{prefix}:{k}").into_bytes())
        })
        .await?;
    }
    let mut pubs = tokio::task::JoinSet::new();
    for p in 0..publishers {
        let args = args.clone();
        pubs.spawn(async move {
            // Publisher p owns devices p, p + publishers, ...; per device in sequence order.
            let mine: Vec<u64> = (p..devices).step_by(publishers as usize).collect();
            let n = mine.len() as u64;
            let prefix = args.prefix.clone();
            publish_all(
                &args,
                &format!("{}-pub{p}", args.prefix),
                n * owed,
                move |k| {
                    let (round, which) = (k / n, mine[(k % n) as usize]);
                    (
                        format!("dev/{prefix}-{which}/cmd"),
                        format!("{prefix}-{which}:{round}").into_bytes(),
                    )
                },
            )
            .await
        });
    }
    while let Some(r) = pubs.join_next().await {
        r??;
    }
    let owed_secs = owed_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_before = crate::proc_stats::total_cpu(&args.pids);
    let start = Instant::now();
    let mut storm = tokio::task::JoinSet::new();
    for i in 0..args.devices {
        let delay = Duration::from_secs_f64(args.ramp_secs * i as f64 / args.devices as f64);
        storm.spawn(come_back(args.clone(), i, start, delay));
    }
    let mut outcomes = Vec::new();
    while let Some(o) = storm.join_next().await {
        outcomes.push(o?);
    }
    let broker_cpu_secs = crate::proc_stats::total_cpu(&args.pids) - cpu_before;
    let mut times: Vec<f64> = outcomes.iter().filter_map(|o| o.complete_secs).collect();
    times.sort_by(f64::total_cmp);
    let got: u64 = outcomes.iter().map(|o| o.got as u64).sum();
    let lost = devices * owed - got;
    let last = times.last().copied().unwrap_or(f64::NAN);
    Ok(format!(
        concat!(
            "{{\"scenario\":\"storm\",\"devices\":{},\"owed\":{},\"unrelated\":{},",
            "\"ramp_secs\":{},\"refused\":{},\"failed\":{},\"complete\":{},",
            "\"missing\":{},\"twice\":{},\"out_of_order\":{},\"p50_secs\":{:.3},",
            "\"p99_secs\":{:.3},\"last_secs\":{:.3},\"restore_msgs_per_sec\":{:.0},",
            "\"prepare_secs\":{:.1},\"unrelated_secs\":{:.1},\"owed_publish_secs\":{:.1},",
            "\"broadcast\":{},\"broker_cpu_secs\":{:.2},\"cpu_us_per_msg\":{:.1}}}"
        ),
        devices,
        owed,
        args.unrelated,
        args.ramp_secs,
        outcomes.iter().filter(|o| o.refused).count(),
        outcomes.iter().filter(|o| o.failed).count(),
        times.len(),
        lost,
        outcomes.iter().map(|o| o.twice as u64).sum::<u64>(),
        outcomes.iter().map(|o| o.out_of_order as u64).sum::<u64>(),
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        last,
        got as f64 / last,
        prepare_secs,
        noise_secs,
        owed_secs,
        args.broadcast,
        broker_cpu_secs,
        broker_cpu_secs * 1e6 / got.max(1) as f64,
    ))
}
