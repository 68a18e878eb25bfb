//! Publishers and subscribers over rumqttc. Every payload starts with the send time (nanoseconds
//! since the run began, little-endian u64), so end-to-end latency is measured in one clock.
//! Throughput counts what the subscribers received; loss is expected minus received, so a
//! broker that drops cannot look fast.

use crate::proc_stats;
use clap::Args;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: String,
    /// Where the subscribers connect, if not to --broker (another host of a cluster).
    #[arg(long)]
    sub_broker: Option<String>,
    /// A name for the broker in the output.
    #[arg(long, default_value = "broker")]
    label: String,
    /// A name for the scenario in the output.
    #[arg(long, default_value = "load")]
    scenario: String,
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// 0, 1 or 2 (publish and subscribe).
    #[arg(long, default_value_t = 0)]
    qos: u8,
    /// Payload bytes (at least 8).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Messages per second per publisher; 0 publishes flat out.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Client inflight window (QoS 1/2).
    #[arg(long, default_value_t = 100)]
    inflight: u16,
    /// Broker process ids, for CPU and RSS (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Each publisher uses its own topic (fan-in) instead of one shared topic.
    #[arg(long)]
    topic_per_publisher: bool,
    /// Leave Nagle's algorithm on in the clients (off by default: a latency benchmark should
    /// not measure the client's write coalescing).
    #[arg(long)]
    nagle: bool,
    /// At a fixed rate, how often (microseconds) the pacing thread sends what is due. A coarse
    /// tick sends bursts (20 messages every 1 ms at 20k msg/s), and a message's latency then
    /// includes the queue behind the others of its burst.
    #[arg(long, default_value_t = 1000)]
    tick_us: u64,
}

fn qos(q: u8) -> QoS {
    match q {
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtMostOnce,
    }
}

fn options(args: &LoadArgs, id: String, broker: &str) -> anyhow::Result<MqttOptions> {
    let (host, port) = broker
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("--broker needs host:port"))?;
    let mut o = MqttOptions::new(id, host, port.parse()?);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_inflight(args.inflight);
    o.set_max_packet_size(1 << 20, 1 << 20);
    Ok(o)
}

struct Stats {
    received: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    last_receive_ns: AtomicU64,
}

async fn connect(o: MqttOptions, nagle: bool) -> anyhow::Result<(AsyncClient, rumqttc::EventLoop)> {
    let (client, mut eventloop) = AsyncClient::new(o, 10_000);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(!nagle);
    eventloop.set_network_options(network);
    loop {
        match eventloop.poll().await? {
            Event::Incoming(Packet::ConnAck(_)) => return Ok((client, eventloop)),
            _ => continue,
        }
    }
}

/// Fixed rate: one OS thread sends what is due for every publisher each `--tick-us` (tokio's
/// timer has a 1 ms resolution). Returns how many were sent.
fn pace(clients: &[(AsyncClient, String)], args: &LoadArgs, epoch: Instant) -> u64 {
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.duration);
    let tick = Duration::from_micros(args.tick_us.max(1));
    let mut payload = vec![0u8; args.payload];
    let mut sent = vec![0u64; clients.len()];
    let spread = clients.len() as f64;
    loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        let elapsed = (now - started).as_secs_f64();
        for (i, ((client, topic), sent)) in clients.iter().zip(sent.iter_mut()).enumerate() {
            // Publishers are spread evenly over a period, not all due at the same instant.
            let due = (args.rate as f64 * elapsed + i as f64 / spread) as u64;
            while *sent < due {
                let stamp = epoch.elapsed().as_nanos() as u64;
                payload[..8].copy_from_slice(&stamp.to_le_bytes());
                let publish =
                    client.try_publish(topic.clone(), qos(args.qos), false, payload.clone());
                if publish.is_err() {
                    // The client's queue is full: the broker is not keeping up; try next tick.
                    break;
                }
                *sent += 1;
            }
        }
        std::thread::sleep(tick);
    }
    sent.iter().sum()
}

pub async fn run(args: LoadArgs) -> anyhow::Result<String> {
    anyhow::ensure!(args.payload >= 8, "--payload must be at least 8 bytes");
    let epoch = Instant::now();
    let stats = Arc::new(Stats {
        received: AtomicU64::new(0),
        latencies_us: Mutex::new(Vec::with_capacity(1 << 20)),
        last_receive_ns: AtomicU64::new(0),
    });
    let filter = if args.topic_per_publisher {
        "bench/#"
    } else {
        "bench/t"
    };
    let mut sub_tasks = Vec::new();
    for s in 0..args.subscribers {
        let (client, mut eventloop) = connect(
            options(
                &args,
                format!("bench-sub-{s}"),
                args.sub_broker.as_deref().unwrap_or(&args.broker),
            )?,
            args.nagle,
        )
        .await?;
        client.subscribe(filter, qos(args.qos)).await?;
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await? {
                break;
            }
        }
        let stats = stats.clone();
        sub_tasks.push(tokio::spawn(async move {
            let mut local = Vec::with_capacity(1 << 16);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let now = epoch.elapsed().as_nanos() as u64;
                        let mut sent = [0u8; 8];
                        sent.copy_from_slice(&p.payload[..8]);
                        let sent = u64::from_le_bytes(sent);
                        local.push((now.saturating_sub(sent) / 1000) as u32);
                        stats.received.fetch_add(1, Ordering::Relaxed);
                        stats.last_receive_ns.fetch_max(now, Ordering::Relaxed);
                        if local.len() >= 1 << 16 {
                            stats.latencies_us.lock().expect("lock").append(&mut local);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
                if !local.is_empty() && stats.received.load(Ordering::Relaxed) % 4096 == 0 {
                    stats.latencies_us.lock().expect("lock").append(&mut local);
                }
            }
            stats.latencies_us.lock().expect("lock").append(&mut local);
            drop(client);
        }));
    }

    let cpu_before = proc_stats::total_cpu(&args.pids);
    let sent_total = Arc::new(AtomicU64::new(0));
    let started = epoch.elapsed();
    let mut pub_tasks = Vec::new();
    let mut paced = Vec::new();
    for p in 0..args.publishers {
        let (client, mut eventloop) = connect(
            options(&args, format!("bench-pub-{p}"), &args.broker)?,
            args.nagle,
        )
        .await?;
        let topic = if args.topic_per_publisher {
            format!("bench/{p}")
        } else {
            "bench/t".to_owned()
        };
        // Drive the publisher's event loop (acks) in the background.
        let driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        if args.rate > 0 {
            paced.push((client, topic, driver));
            continue;
        }
        let args = args.clone();
        let sent_total = sent_total.clone();
        pub_tasks.push(tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs_f64(args.duration);
            let mut payload = vec![0u8; args.payload];
            let mut sent = 0u64;
            while Instant::now() < until {
                for _ in 0..64 {
                    let now = epoch.elapsed().as_nanos() as u64;
                    payload[..8].copy_from_slice(&now.to_le_bytes());
                    if client
                        .publish(topic.clone(), qos(args.qos), false, payload.clone())
                        .await
                        .is_err()
                    {
                        break;
                    }
                    sent += 1;
                }
            }
            sent_total.fetch_add(sent, Ordering::Relaxed);
            (client, driver)
        }));
    }
    let mut publishers = Vec::new();
    for t in pub_tasks {
        publishers.push(t.await?);
    }
    if !paced.is_empty() {
        let clients: Vec<(AsyncClient, String)> = paced
            .iter()
            .map(|(c, t, _)| (c.clone(), t.clone()))
            .collect();
        let pacing = args.clone();
        let sent = tokio::task::spawn_blocking(move || pace(&clients, &pacing, epoch)).await?;
        sent_total.fetch_add(sent, Ordering::Relaxed);
        publishers.extend(paced.into_iter().map(|(c, _, d)| (c, d)));
    }
    let publish_secs = (epoch.elapsed() - started).as_secs_f64();
    let sent = sent_total.load(Ordering::Relaxed);
    let expected = sent * args.subscribers as u64;
    // Drain: until everything arrived, or nothing arrived for 3 s.
    let mut last = u64::MAX;
    let mut quiet_since = Instant::now();
    loop {
        let got = stats.received.load(Ordering::Relaxed);
        if got >= expected {
            break;
        }
        if got != last {
            last = got;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = proc_stats::total_cpu(&args.pids) - cpu_before;
    let rss = proc_stats::total_rss(&args.pids);
    let received = stats.received.load(Ordering::Relaxed);
    let end_ns = stats.last_receive_ns.load(Ordering::Relaxed);
    let elapsed = (end_ns as f64 / 1e9 - started.as_secs_f64())
        .max(publish_secs)
        .max(1e-9);
    for (client, driver) in publishers {
        let _ = client.disconnect().await;
        driver.abort();
    }
    for t in &sub_tasks {
        t.abort();
    }
    let mut lat = std::mem::take(&mut *stats.latencies_us.lock().expect("lock"));
    lat.sort_unstable();
    let pct = |q: f64| -> u32 {
        if lat.is_empty() {
            0
        } else {
            lat[((lat.len() as f64 - 1.0) * q).round() as usize]
        }
    };
    Ok(format!(
        concat!(
            "{{\"label\":\"{}\",\"scenario\":\"{}\",\"publishers\":{},\"subscribers\":{},\"qos\":{},",
            "\"payload\":{},\"rate\":{},\"sent\":{},\"expected\":{},\"received\":{},\"lost\":{},",
            "\"seconds\":{:.3},\"msgs_per_sec\":{:.0},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},",
            "\"cpu_seconds\":{:.3},\"cpu_us_per_msg\":{:.3},\"rss_kib\":{}}}"
        ),
        args.label,
        args.scenario,
        args.publishers,
        args.subscribers,
        args.qos,
        args.payload,
        args.rate,
        sent,
        expected,
        received,
        expected.saturating_sub(received),
        elapsed,
        received as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        pct(0.999),
        cpu,
        if received > 0 { cpu * 1e6 / received as f64 } else { 0.0 },
        rss
    ))
}
