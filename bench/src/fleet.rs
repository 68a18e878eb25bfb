//! A fleet over a cluster: `devices` clients spread over the hosts (device `i` on host
//! `i % hosts`), each subscribed at QoS 1 to its own `dev/<id>/cmd` and publishing QoS 1
//! telemetry to `fleet/<prefix>/<i>/t` at a low rate (`rate` msg/s over the whole fleet; only
//! the devices of the first `publishing_hosts` hosts publish when it is set); one consumer with
//! a persistent session on `fleet/<prefix>/#` on host 1; a commander on host 1 sending
//! `commands` QoS 1 commands per second to devices on the other hosts.
//!
//! Over the measured window (after a warm-up): each host's CPU (its edge and worker) and the
//! database's per telemetry message published in the cluster, the documents each host's
//! follower received per message (`wharf_worker_followed_messages_total`), the consumer's and
//! the commands' latency (publisher's send to receipt, same machine clock), and, by identity,
//! what was acknowledged and never delivered. Raw MQTT 3.1.1 on plain sockets: the clients cost
//! little next to the brokers.

use crate::storm::{packet, publish_packet, string, subscribe_packet, take_packet, Conn};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(clap::Args, Clone)]
pub struct FleetArgs {
    /// The hosts' MQTT listeners (host:port), host 1 first.
    #[arg(long, value_delimiter = ',', required = true)]
    brokers: Vec<String>,
    /// Each host's processes, `pid+pid` per host, in host order.
    #[arg(long, value_delimiter = ',')]
    host_pids: Vec<String>,
    /// Each host's worker metrics endpoint (host:port), in host order.
    #[arg(long, value_delimiter = ',')]
    worker_metrics: Vec<String>,
    /// The database server's process.
    #[arg(long)]
    db_pid: Option<u32>,
    /// Devices in the whole fleet.
    #[arg(long, default_value_t = 400)]
    devices: u32,
    /// Only the devices on the first this many hosts publish (0: all hosts).
    #[arg(long, default_value_t = 0)]
    publishing_hosts: usize,
    /// Telemetry messages per second over the whole fleet.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Commands per second from host 1 to devices on the other hosts.
    #[arg(long, default_value_t = 10.0)]
    commands: f64,
    #[arg(long, default_value_t = 20.0)]
    duration_secs: f64,
    #[arg(long, default_value_t = 3.0)]
    warmup_secs: f64,
    /// Seconds with every client connected and nothing published, before the run: the CPU
    /// the hosts and the database spend meanwhile (reads of claims and routes, heartbeats) is
    /// subtracted from the run's, pro rata.
    #[arg(long, default_value_t = 5.0)]
    idle_secs: f64,
    /// Client id and topic prefix (a run on hosts that hold an earlier run's sessions uses a
    /// new one).
    #[arg(long, default_value = "fleet")]
    prefix: String,
    #[arg(long, default_value = "wharf")]
    label: String,
}

fn connect_packet(id: &str, clean: bool) -> Vec<u8> {
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.push(4);
    body.push(if clean { 2 } else { 0 });
    body.extend(60u16.to_be_bytes());
    string(id.as_bytes(), &mut body);
    packet(0x10, &body)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What every client task shares.
struct Ctx {
    stop: AtomicBool,
    /// Telemetry PUBLISHes written, and acknowledged, per device.
    sent: AtomicU64,
    acked: Vec<AtomicU64>,
    /// (device, seq) the consumer received, with how many twice.
    consumed: Mutex<HashSet<(u32, u64)>>,
    consumed_twice: AtomicU64,
    /// Consumer latencies (µs) in the measured window: from devices on host 1, from others.
    local_us: Mutex<Vec<u64>>,
    remote_us: Mutex<Vec<u64>>,
    commands_acked: AtomicU64,
    commands_got: Mutex<HashSet<u64>>,
    command_us: Mutex<Vec<u64>>,
    measuring: AtomicBool,
}

/// Connects `id` to `addr`; an error unless the CONNACK accepts it.
async fn open(addr: &str, id: &str, clean: bool) -> anyhow::Result<Conn> {
    let (conn, code) = Conn::connect(addr, &connect_packet(id, clean)).await?;
    anyhow::ensure!(code == 0, "{id}: CONNACK {code}");
    Ok(conn)
}

/// Subscribes at QoS 1 and waits for the SUBACK.
async fn subscribe(conn: &mut Conn, filter: &str) -> anyhow::Result<()> {
    conn.stream.write_all(&subscribe_packet(filter)).await?;
    loop {
        let (header, _) = conn.next().await?;
        if header >> 4 == 9 {
            return Ok(());
        }
    }
}

/// A QoS 1 PUBLISH's topic and payload; its PUBACK is written.
async fn take_publish(conn: &mut Conn, body: &[u8]) -> anyhow::Result<(String, Vec<u8>)> {
    anyhow::ensure!(body.len() >= 4, "short PUBLISH");
    let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
    let topic = String::from_utf8_lossy(&body[2..2 + tlen]).into_owned();
    let pkid = [body[2 + tlen], body[3 + tlen]];
    conn.stream.write_all(&[0x40, 2, pkid[0], pkid[1]]).await?;
    Ok((topic, body[4 + tlen..].to_vec()))
}

enum Role {
    /// Device `i`, publishing every `every` (or never).
    Device {
        i: u32,
        every: Option<Duration>,
    },
    Consumer {
        hosts: u32,
    },
    /// Sends commands to `targets` in turn, every `every`.
    Commander {
        targets: Vec<u32>,
        every: Duration,
    },
}

async fn client(
    ctx: Arc<Ctx>,
    mut conn: Conn,
    role: Role,
    prefix: String,
    start: tokio::time::Instant,
) -> anyhow::Result<()> {
    let every = match &role {
        Role::Device { every, .. } => *every,
        Role::Commander { every, .. } => Some(*every),
        Role::Consumer { .. } => None,
    };
    let phase = match &role {
        Role::Device { i, .. } => Duration::from_micros((*i as u64 * 7919) % 1_000_000),
        _ => Duration::ZERO,
    };
    let mut tick = tokio::time::interval_at(
        start + phase.min(every.unwrap_or(Duration::ZERO)),
        every.unwrap_or(Duration::from_secs(3600)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut seq, mut pkid) = (0u64, 0u16);
    let mut quiet_since: Option<Instant> = None;
    loop {
        if ctx.stop.load(Ordering::Acquire) {
            // Reading on a while after the stop: acknowledgements and deliveries still due.
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(5) {
                return Ok(());
            }
        }
        let publishing = every.is_some() && !ctx.stop.load(Ordering::Acquire);
        tokio::select! {
            _ = tick.tick(), if publishing => {
                pkid = pkid.wrapping_add(1).max(1);
                let sent = now_us();
                let (topic, payload) = match &role {
                    Role::Device { i, .. } => {
                        ctx.sent.fetch_add(1, Ordering::Relaxed);
                        (format!("fleet/{prefix}/{i}/t"), format!("{i}:{seq}:{sent}"))
                    }
                    Role::Commander { targets, .. } => {
                        let target = targets[(seq % targets.len() as u64) as usize];
                        (format!("dev/{prefix}-d{target}/cmd"), format!("{seq}:{sent}"))
                    }
                    Role::Consumer { .. } => unreachable!("the consumer does not publish"),
                };
                seq += 1;
                conn.stream
                    .write_all(&publish_packet(&topic, pkid, payload.as_bytes()))
                    .await?;
            }
            read = conn.stream.read_buf(&mut conn.buf) => {
                if read? == 0 {
                    anyhow::bail!("closed");
                }
                while let Some((header, body)) = take_packet(&mut conn.buf)? {
                    match header >> 4 {
                        4 => match &role {
                            Role::Device { i, .. } => {
                                ctx.acked[*i as usize].fetch_add(1, Ordering::Relaxed);
                            }
                            Role::Commander { .. } => {
                                ctx.commands_acked.fetch_add(1, Ordering::Relaxed);
                            }
                            Role::Consumer { .. } => {}
                        },
                        3 => {
                            let (_, payload) = take_publish(&mut conn, &body).await?;
                            received(&ctx, &role, &payload);
                        }
                        _ => {}
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

fn received(ctx: &Ctx, role: &Role, payload: &[u8]) {
    let text = String::from_utf8_lossy(payload);
    let fields: Vec<u64> = text.split(':').filter_map(|f| f.parse().ok()).collect();
    let latency = |sent: u64| now_us().saturating_sub(sent);
    let measuring = ctx.measuring.load(Ordering::Acquire);
    match (role, fields.as_slice()) {
        (Role::Consumer { hosts }, [i, seq, sent]) => {
            let fresh = ctx
                .consumed
                .lock()
                .expect("consumed")
                .insert((*i as u32, *seq));
            if !fresh {
                ctx.consumed_twice.fetch_add(1, Ordering::Relaxed);
            }
            if measuring {
                let list = if *i % u64::from(*hosts) == 0 {
                    &ctx.local_us
                } else {
                    &ctx.remote_us
                };
                list.lock().expect("latencies").push(latency(*sent));
            }
        }
        (Role::Device { .. }, [cmd, sent]) => {
            ctx.commands_got.lock().expect("commands").insert(*cmd);
            if measuring {
                ctx.command_us
                    .lock()
                    .expect("latencies")
                    .push(latency(*sent));
            }
        }
        _ => {}
    }
}

fn percentile_ms(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let k = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[k] as f64 / 1000.0
}

/// A counter's value from a Prometheus text endpoint (0 when absent or unreachable).
async fn counter(addr: &str, name: &str) -> f64 {
    let fetch = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
    };
    tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .ok()
        .flatten()
        .unwrap_or(0.0)
}

fn host_pids(spec: &str) -> Vec<u32> {
    spec.split('+').filter_map(|p| p.parse().ok()).collect()
}

struct Snapshot {
    at: Instant,
    sent: u64,
    host_cpu: Vec<f64>,
    db_cpu: f64,
    followed: Vec<f64>,
}

async fn snapshot(args: &FleetArgs, ctx: &Ctx) -> Snapshot {
    let mut followed = Vec::new();
    for addr in &args.worker_metrics {
        followed.push(counter(addr, "wharf_worker_followed_messages_total").await);
    }
    Snapshot {
        at: Instant::now(),
        sent: ctx.sent.load(Ordering::Relaxed),
        host_cpu: args
            .host_pids
            .iter()
            .map(|h| crate::proc_stats::total_cpu(&host_pids(h)))
            .collect(),
        db_cpu: args.db_pid.map_or(0.0, crate::proc_stats::cpu_seconds),
        followed,
    }
}

pub async fn run(args: FleetArgs) -> anyhow::Result<String> {
    let hosts = args.brokers.len() as u32;
    anyhow::ensure!(hosts > 0, "no brokers");
    let publishing_hosts = match args.publishing_hosts {
        0 => hosts,
        n => (n as u32).min(hosts),
    };
    let publishers: Vec<u32> = (0..args.devices)
        .filter(|i| i % hosts < publishing_hosts)
        .collect();
    let every = Duration::from_secs_f64(publishers.len() as f64 / args.rate.max(0.001));
    let ctx = Arc::new(Ctx {
        stop: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        acked: (0..args.devices).map(|_| AtomicU64::new(0)).collect(),
        consumed: Mutex::default(),
        consumed_twice: AtomicU64::new(0),
        local_us: Mutex::default(),
        remote_us: Mutex::default(),
        commands_acked: AtomicU64::new(0),
        commands_got: Mutex::default(),
        command_us: Mutex::default(),
        measuring: AtomicBool::new(false),
    });
    let prefix = &args.prefix;
    // Connected and subscribed, all of them, before anything is published.
    let mut consumer = open(&args.brokers[0], &format!("{prefix}-consumer"), false).await?;
    subscribe(&mut consumer, &format!("fleet/{prefix}/#")).await?;
    let mut conns = Vec::new();
    for i in 0..args.devices {
        let addr = &args.brokers[(i % hosts) as usize];
        let mut conn = open(addr, &format!("{prefix}-d{i}"), true).await?;
        subscribe(&mut conn, &format!("dev/{prefix}-d{i}/cmd")).await?;
        conns.push((i, conn));
    }
    let commander = open(&args.brokers[0], &format!("{prefix}-commander"), true).await?;
    eprintln!("fleet: {} devices connected and subscribed", args.devices);
    // Every host has read every route.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_from = snapshot(&args, &ctx).await;
    tokio::time::sleep(Duration::from_secs_f64(args.idle_secs)).await;
    let idle_to = snapshot(&args, &ctx).await;
    let idle_secs = idle_to.at.duration_since(idle_from.at).as_secs_f64();
    let idle_host: Vec<f64> = idle_to
        .host_cpu
        .iter()
        .zip(&idle_from.host_cpu)
        .map(|(a, b)| (a - b) / idle_secs)
        .collect();
    let idle_db = (idle_to.db_cpu - idle_from.db_cpu) / idle_secs;

    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(client(
        ctx.clone(),
        consumer,
        Role::Consumer { hosts },
        prefix.clone(),
        start,
    ));
    for (i, conn) in conns {
        let role = Role::Device {
            i,
            every: (i % hosts < publishing_hosts).then_some(every),
        };
        tasks.spawn(client(ctx.clone(), conn, role, prefix.clone(), start));
    }
    let targets: Vec<u32> = (0..args.devices)
        .filter(|i| hosts == 1 || i % hosts != 0)
        .collect();
    if args.commands > 0.0 && !targets.is_empty() {
        let role = Role::Commander {
            targets,
            every: Duration::from_secs_f64(1.0 / args.commands),
        };
        tasks.spawn(client(ctx.clone(), commander, role, prefix.clone(), start));
    }

    tokio::time::sleep(Duration::from_secs_f64(args.warmup_secs)).await;
    let before = snapshot(&args, &ctx).await;
    ctx.measuring.store(true, Ordering::Release);
    tokio::time::sleep(Duration::from_secs_f64(args.duration_secs)).await;
    ctx.measuring.store(false, Ordering::Release);
    let after = snapshot(&args, &ctx).await;
    ctx.stop.store(true, Ordering::Release);
    eprintln!("fleet: measured; draining");
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r? {
            eprintln!("fleet client ended: {e}");
        }
    }

    let msgs = (after.sent - before.sent).max(1) as f64;
    let secs = after.at.duration_since(before.at).as_secs_f64();
    let host_us: Vec<f64> = after
        .host_cpu
        .iter()
        .zip(&before.host_cpu)
        .zip(&idle_host)
        .map(|((a, b), idle)| ((a - b) - idle * secs).max(0.0) * 1e6 / msgs)
        .collect();
    let db_us = ((after.db_cpu - before.db_cpu) - idle_db * secs).max(0.0) * 1e6 / msgs;
    let followed: Vec<f64> = after
        .followed
        .iter()
        .zip(&before.followed)
        .map(|(a, b)| (a - b) / msgs)
        .collect();
    let consumed = ctx.consumed.lock().expect("consumed");
    let mut missing = 0u64;
    let mut acked_total = 0u64;
    for (i, acked) in ctx.acked.iter().enumerate() {
        let n = acked.load(Ordering::Relaxed);
        acked_total += n;
        missing += (0..n)
            .filter(|s| !consumed.contains(&(i as u32, *s)))
            .count() as u64;
    }
    let commands_acked = ctx.commands_acked.load(Ordering::Relaxed);
    let commands_got = ctx.commands_got.lock().expect("commands").len() as u64;
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let fmt3 = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let others: f64 = host_us.iter().skip(1).sum();
    let p = |list: &Mutex<Vec<u64>>| {
        let mut v = list.lock().expect("latencies");
        (percentile_ms(&mut v, 0.5), percentile_ms(&mut v, 0.99))
    };
    let (local, remote, command) = (p(&ctx.local_us), p(&ctx.remote_us), p(&ctx.command_us));
    Ok(format!(
        concat!(
            "{{\"label\":\"{}\",\"scenario\":\"fleet\",\"hosts\":{},\"devices\":{},",
            "\"publishing_hosts\":{},\"rate\":{},\"msgs_per_sec\":{:.0},",
            "\"host_cpu_us_per_msg\":[{}],\"others_cpu_us_per_msg\":{:.1},",
            "\"max_other_host_over_host1\":{:.3},\"db_cpu_us_per_msg\":{:.1},",
            "\"idle_host_cores\":[{}],\"idle_db_cores\":{:.3},",
            "\"followed_per_msg\":[{}],\"followed_per_msg_total\":{:.3},",
            "\"consumer_local_p50_ms\":{:.1},\"consumer_local_p99_ms\":{:.1},",
            "\"consumer_remote_p50_ms\":{:.1},\"consumer_remote_p99_ms\":{:.1},",
            "\"command_p50_ms\":{:.1},\"command_p99_ms\":{:.1},",
            "\"acked\":{},\"missing\":{},\"twice\":{},\"commands_acked\":{},",
            "\"commands_missing\":{}}}"
        ),
        args.label,
        hosts,
        args.devices,
        publishing_hosts,
        args.rate,
        msgs / secs,
        fmt(&host_us),
        others,
        host_us.iter().skip(1).fold(0.0f64, |m, x| m.max(*x))
            / host_us.first().copied().unwrap_or(f64::NAN),
        db_us,
        fmt3(&idle_host),
        idle_db,
        fmt3(&followed),
        followed.iter().sum::<f64>(),
        local.0,
        local.1,
        remote.0,
        remote.1,
        command.0,
        command.1,
        acked_total,
        missing,
        ctx.consumed_twice.load(Ordering::Relaxed),
        commands_acked,
        commands_acked.saturating_sub(commands_got),
    ))
}
