//! Publishers and subscribers over rumqttc. Every payload starts with the send time (nanoseconds
//! since the run began, little-endian u64), so end-to-end latency is measured in one clock.
//! Throughput counts what the subscribers received; loss is expected minus received, so a
//! broker that drops cannot look fast.

use crate::mqtt::{self, Client, EventLoop, Incoming, QoS};
use crate::proc_stats;
use clap::Args;
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
    /// What the client ids and topics start with: runs side by side on one cluster each need
    /// their own (a client id has one connection cluster-wide).
    #[arg(long, default_value = "bench")]
    namespace: String,
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
    /// Subscribers with persistent sessions that subscribe, go offline while the publishers
    /// run, and come back once every publish was acknowledged: the run then measures how fast
    /// the broker delivers what it queued for them (`catchup_msgs_per_sec`, from reconnect to
    /// the last message).
    #[arg(long)]
    offline: bool,
    /// Seconds without a message after which the wait for the rest ends and what is missing
    /// counts as lost (default 3, or 30 with --offline). A store whose catch-up pages take
    /// seconds needs more, or a slow page reads as loss.
    #[arg(long)]
    drain_quiet_secs: Option<u64>,
    /// MQTT version of every client: 4 (3.1.1) or 5 (5.0).
    #[arg(long, default_value_t = 4)]
    mqtt: u8,
}

fn qos(q: u8) -> QoS {
    match q {
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtMostOnce,
    }
}

fn options(args: &LoadArgs, id: String, broker: &str) -> anyhow::Result<mqtt::Options> {
    let (host, port) = broker
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("--broker needs host:port"))?;
    anyhow::ensure!(matches!(args.mqtt, 4 | 5), "--mqtt is 4 or 5");
    Ok(mqtt::Options {
        version: args.mqtt,
        id,
        host: host.to_owned(),
        port: port.parse()?,
        clean: !args.offline,
        inflight: args.inflight,
        nagle: args.nagle,
    })
}

struct Stats {
    received: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    last_receive_ns: AtomicU64,
    /// Per subscriber (its own lock, uncontended), per publisher: which sequence numbers
    /// arrived, a bit each.
    seen: Vec<Mutex<Vec<Vec<u64>>>>,
    duplicates: AtomicU64,
}

/// Bytes 0..8 of a payload: when it was sent (ns since the run's epoch); 8..12 the
/// publisher's index; 12..20 its sequence number: the message's identity.
const STAMP: usize = 20;

fn stamp(payload: &mut [u8], sent_ns: u64, publisher: u32, seq: u64) {
    payload[..8].copy_from_slice(&sent_ns.to_le_bytes());
    payload[8..12].copy_from_slice(&publisher.to_le_bytes());
    payload[12..20].copy_from_slice(&seq.to_le_bytes());
}

fn read_stamp(payload: &[u8]) -> Option<(u64, u32, u64)> {
    let field = |r: std::ops::Range<usize>| payload.get(r);
    let sent = u64::from_le_bytes(field(0..8)?.try_into().ok()?);
    let publisher = u32::from_le_bytes(field(8..12)?.try_into().ok()?);
    let seq = u64::from_le_bytes(field(12..20)?.try_into().ok()?);
    Some((sent, publisher, seq))
}

/// Marks `seq` of `publisher` seen; false if it was already.
fn mark(bits: &mut Vec<Vec<u64>>, publisher: u32, seq: u64) -> bool {
    let p = publisher as usize;
    if bits.len() <= p {
        bits.resize_with(p + 1, Vec::new);
    }
    let words = &mut bits[p];
    let (word, bit) = ((seq / 64) as usize, seq % 64);
    if words.len() <= word {
        words.resize(word + 1, 0);
    }
    let fresh = words[word] & (1 << bit) == 0;
    words[word] |= 1 << bit;
    fresh
}

fn has(bits: &[Vec<u64>], publisher: usize, seq: u64) -> bool {
    bits.get(publisher)
        .and_then(|w| w.get((seq / 64) as usize))
        .is_some_and(|w| w & (1 << (seq % 64)) != 0)
}

async fn connect(o: mqtt::Options) -> anyhow::Result<(Client, EventLoop)> {
    mqtt::connect(&o).await
}

/// A subscriber's receive loop: marks each message's identity and records its latency.
fn receive(
    client: Client,
    mut eventloop: EventLoop,
    stats: Arc<Stats>,
    s: usize,
    epoch: Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut local = Vec::with_capacity(1 << 16);
        loop {
            match eventloop.poll().await {
                Ok(Incoming::Publish(payload)) => {
                    let now = epoch.elapsed().as_nanos() as u64;
                    let Some((sent, publisher, seq)) = read_stamp(&payload) else {
                        continue;
                    };
                    if !mark(&mut stats.seen[s].lock().expect("lock"), publisher, seq) {
                        stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
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
    })
}

/// Fixed rate: one OS thread sends what is due for every publisher each `--tick-us` (tokio's
/// timer has a 1 ms resolution). Returns how many were sent.
fn pace(clients: &[(Client, String)], first: usize, args: &LoadArgs, epoch: Instant) -> Vec<u64> {
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
                let now = epoch.elapsed().as_nanos() as u64;
                stamp(&mut payload, now, (first + i) as u32, *sent);
                let publish = client.try_publish(topic.clone(), qos(args.qos), payload.clone());
                if publish.is_err() {
                    // The client's queue is full: the broker is not keeping up; try next tick.
                    break;
                }
                *sent += 1;
            }
        }
        std::thread::sleep(tick);
    }
    sent
}

pub async fn run(args: LoadArgs) -> anyhow::Result<String> {
    anyhow::ensure!(
        args.payload >= STAMP,
        "--payload must be at least {STAMP} bytes"
    );
    let epoch = Instant::now();
    let stats = Arc::new(Stats {
        received: AtomicU64::new(0),
        latencies_us: Mutex::new(Vec::with_capacity(1 << 20)),
        last_receive_ns: AtomicU64::new(0),
        seen: (0..args.subscribers).map(|_| Mutex::default()).collect(),
        duplicates: AtomicU64::new(0),
    });
    let ns = &args.namespace;
    let filter = if args.topic_per_publisher {
        format!("{ns}/#")
    } else {
        format!("{ns}/t")
    };
    let sub_options = |s: usize| {
        options(
            &args,
            format!("{ns}-sub-{s}"),
            args.sub_broker.as_deref().unwrap_or(&args.broker),
        )
    };
    let mut sub_tasks = Vec::new();
    for s in 0..args.subscribers {
        if args.offline {
            // Start from an empty session: nothing a previous run left queued.
            let mut clean = sub_options(s)?;
            clean.clean = true;
            drop(connect(clean).await?);
        }
        let (client, mut eventloop) = connect(sub_options(s)?).await?;
        client.subscribe(&filter, qos(args.qos)).await?;
        loop {
            if let Incoming::SubAck = eventloop.poll().await? {
                break;
            }
        }
        if args.offline {
            client.disconnect().await?;
            while eventloop.poll().await.is_ok() {}
            continue;
        }
        sub_tasks.push(receive(client, eventloop, stats.clone(), s, epoch));
    }

    let cpu_before = proc_stats::total_cpu(&args.pids);
    let started = epoch.elapsed();
    // Acknowledgements (PUBACK, PUBCOMP) each publisher received.
    let acks: Vec<Arc<AtomicU64>> = (0..args.publishers).map(|_| Arc::default()).collect();
    let mut sent_by: Vec<u64> = vec![0; args.publishers];
    let mut pub_tasks = Vec::new();
    let mut paced = Vec::new();
    for (p, acked) in acks.iter().enumerate() {
        let (client, mut eventloop) =
            connect(options(&args, format!("{ns}-pub-{p}"), &args.broker)?).await?;
        let topic = if args.topic_per_publisher {
            format!("{ns}/{p}")
        } else {
            format!("{ns}/t")
        };
        // Drive the publisher's event loop (acks) in the background.
        let acked = acked.clone();
        let driver = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Incoming::Completed) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        if args.rate > 0 {
            paced.push((client, topic, driver));
            continue;
        }
        let args = args.clone();
        pub_tasks.push(tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs_f64(args.duration);
            let mut payload = vec![0u8; args.payload];
            let mut sent = 0u64;
            while Instant::now() < until {
                for _ in 0..64 {
                    let now = epoch.elapsed().as_nanos() as u64;
                    stamp(&mut payload, now, p as u32, sent);
                    if client
                        .publish(topic.clone(), qos(args.qos), payload.clone())
                        .await
                        .is_err()
                    {
                        break;
                    }
                    sent += 1;
                }
            }
            (p, sent, client, driver)
        }));
    }
    let mut publishers = Vec::new();
    for t in pub_tasks {
        let (p, sent, client, driver) = t.await?;
        sent_by[p] = sent;
        publishers.push((client, driver));
    }
    if !paced.is_empty() {
        let clients: Vec<(Client, String)> = paced
            .iter()
            .map(|(c, t, _)| (c.clone(), t.clone()))
            .collect();
        let pacing = args.clone();
        let sent = tokio::task::spawn_blocking(move || pace(&clients, 0, &pacing, epoch)).await?;
        sent_by = sent;
        publishers.extend(paced.into_iter().map(|(c, _, d)| (c, d)));
    }
    let publish_secs = (epoch.elapsed() - started).as_secs_f64();
    let sent: u64 = sent_by.iter().sum();
    let expected = sent * args.subscribers as u64;
    let mut back_ns = 0;
    if args.offline {
        // Every publish acknowledged (or 10 s), then the subscribers come back.
        let waiting = Instant::now();
        while acks.iter().map(|a| a.load(Ordering::Relaxed)).sum::<u64>() < sent
            && waiting.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        back_ns = epoch.elapsed().as_nanos() as u64;
        for s in 0..args.subscribers {
            let (client, eventloop) = connect(sub_options(s)?).await?;
            sub_tasks.push(receive(client, eventloop, stats.clone(), s, epoch));
        }
    }
    // Drain: until everything arrived, or nothing arrived for 3 s (30 s for a returning
    // session: a broker may be slow to start handing over its backlog), or --drain-quiet-secs.
    let quiet =
        Duration::from_secs(
            args.drain_quiet_secs
                .unwrap_or(if args.offline { 30 } else { 3 }),
        );
    let mut last = u64::MAX;
    let mut quiet_since = Instant::now();
    loop {
        // Distinct messages: duplicates must not end the wait before every message came.
        let got = stats.received.load(Ordering::Relaxed) - stats.duplicates.load(Ordering::Relaxed);
        if got >= expected {
            break;
        }
        if got != last {
            last = got;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() > quiet {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = proc_stats::total_cpu(&args.pids) - cpu_before;
    // Publishers' acknowledgements: every publish of a run should have one by now.
    let acked: Vec<u64> = acks.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    // Loss by identity: an acknowledged message (all of a publisher's, or as many of its
    // first ones as were acknowledged: brokers acknowledge in order) some subscriber lacks.
    let mut lost_by_id = 0u64;
    for seen in &stats.seen {
        let seen = seen.lock().expect("lock");
        for (p, (&sent, &acked)) in sent_by.iter().zip(&acked).enumerate() {
            let owed = if args.qos == 0 { sent } else { acked.min(sent) };
            lost_by_id += (0..owed).filter(|&seq| !has(&seen, p, seq)).count() as u64;
        }
    }
    let duplicates = stats.duplicates.load(Ordering::Relaxed);
    let rss = proc_stats::total_rss(&args.pids);
    let received = stats.received.load(Ordering::Relaxed);
    let end_ns = stats.last_receive_ns.load(Ordering::Relaxed);
    let elapsed = (end_ns as f64 / 1e9 - started.as_secs_f64())
        .max(publish_secs)
        .max(1e-9);
    let catchup_msgs_per_sec = if args.offline && end_ns > back_ns {
        received as f64 / ((end_ns - back_ns) as f64 / 1e9)
    } else {
        0.0
    };
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
            "\"payload\":{},\"rate\":{},\"sent\":{},\"acked\":{},\"expected\":{},\"received\":{},\"lost\":{},",
            "\"lost_by_id\":{},\"duplicates\":{},",
            "\"seconds\":{:.3},\"msgs_per_sec\":{:.0},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},",
            "\"cpu_seconds\":{:.3},\"cpu_us_per_msg\":{:.3},\"rss_kib\":{},",
            "\"catchup_msgs_per_sec\":{:.0}}}"
        ),
        args.label,
        args.scenario,
        args.publishers,
        args.subscribers,
        args.qos,
        args.payload,
        args.rate,
        sent,
        acked.iter().sum::<u64>(),
        expected,
        received,
        expected.saturating_sub(received),
        lost_by_id,
        duplicates,
        elapsed,
        received as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        pct(0.999),
        cpu,
        if received > 0 { cpu * 1e6 / received as f64 } else { 0.0 },
        rss,
        catchup_msgs_per_sec
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_carries_its_identity_and_repeats_are_recognised() {
        let mut payload = vec![0u8; 100];
        stamp(&mut payload, 123, 7, 70_000);
        assert_eq!(read_stamp(&payload), Some((123, 7, 70_000)));
        assert_eq!(read_stamp(&payload[..19]), None);
        let mut bits = Vec::new();
        assert!(mark(&mut bits, 7, 70_000));
        assert!(!mark(&mut bits, 7, 70_000));
        assert!(has(&bits, 7, 70_000));
        assert!(!has(&bits, 7, 69_999));
        assert!(!has(&bits, 3, 70_000));
        assert!(!has(&bits, 9, 0));
    }
}
