//! Randomized, model-based: random publishers (QoS 1 and 2, several at once), subscribers of
//! random speed, filters and session kinds, disconnects, takeovers, and restarts of the worker
//! and the edge, on a small session queue so that subscribers lag. A model of the sessions says
//! which acknowledged messages each subscriber must get; every run is reproducible from its
//! seed.
//!
//! CI runs a fixed set of seeds; `WHARF_MODEL_SEEDS=N` runs N more (from
//! `WHARF_MODEL_FIRST_SEED`, default 1000), and a failure names its seed:
//! `WHARF_MODEL_SEEDS=1 WHARF_MODEL_FIRST_SEED=<seed> cargo test -p wharf-tests --test model`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;
use wharf_tests::fleet::{check, complaints, Pace, Publisher, Subscriber};
use wharf_tests::init_tracing;
use wharf_tests::stack::{Kind, Stack};

/// SplitMix64: small, and the same sequence everywhere for a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One subscriber as the model sees it.
struct Modelled {
    sub: Subscriber,
    filter: String,
    qos: u8,
    persistent: bool,
    pace: Pace,
    connected: bool,
    /// What it must get: per publisher, the acknowledged sequence numbers.
    owed: HashMap<String, Vec<u32>>,
    /// Whether it may see a message twice (QoS 1 after a reconnect or a takeover).
    reconnected: bool,
}

/// The QoS each publisher sends at.
type PublisherQos = HashMap<String, u8>;

impl Modelled {
    fn matches(&self, topic: &str) -> bool {
        wharf_shared::topic::matches(topic, &self.filter)
    }

    /// Waits until it has everything it is owed, or until nothing new came for a while, and
    /// returns what is wrong. A clean session must have everything before it ends, since what
    /// it had not received ends with it.
    async fn settle(&self, seed: u64, when: &str, publishers: &PublisherQos) -> Option<String> {
        let total: usize = self.owed.values().map(Vec::len).sum();
        let owed = &self.owed;
        self.sub
            .wait_for(Duration::from_secs(15), |got| {
                got.len() >= total && {
                    let set: HashSet<&(String, u32)> = got.iter().collect();
                    owed.iter()
                        .all(|(p, seqs)| seqs.iter().all(|s| set.contains(&(p.clone(), *s))))
                }
            })
            .await;
        complaints(
            &format!("seed {seed}, {when}, {}", self.sub.client_id),
            &check(&self.sub.snapshot(), &self.owed),
            // Delivered at the lower of the two QoS; QoS 1 may repeat after a reconnect.
            |publisher| self.reconnected && self.qos.min(publishers[publisher]) < 2,
        )
    }
}

const FILTERS: [&str; 4] = ["m/#", "m/+/0", "m/1/+", "m/+/+"];

async fn run_seed(kind: Kind, seed: u64) {
    init_tracing();
    let mut rng = Rng(seed);
    let max_queued = [8, 32, 128][rng.below(3) as usize];
    let limits = wharf_edge::Limits {
        max_queued,
        ..Default::default()
    };
    let mut stack = Stack::with_limits(kind, limits).await;
    let per_burst = match kind {
        Kind::Embedded => 600,
        Kind::Mongo => 150,
    };

    let mut subs: Vec<Modelled> = Vec::new();
    for i in 0..2 + rng.below(3) {
        let filter = FILTERS[rng.below(FILTERS.len() as u64) as usize].to_owned();
        let qos = 1 + rng.below(2) as u8;
        let persistent = rng.chance(60);
        let pace = if rng.chance(50) {
            Pace::FULL_SPEED
        } else {
            Pace {
                every: 20 + rng.below(200) as usize,
                pause: Duration::from_millis(1 + rng.below(4)),
            }
        };
        let sub = Subscriber::start(
            stack.addr(),
            &format!("s{i}"),
            !persistent,
            &filter,
            qos,
            pace,
        )
        .await;
        subs.push(Modelled {
            sub,
            filter,
            qos,
            persistent,
            pace,
            connected: true,
            owed: HashMap::new(),
            reconnected: false,
        });
    }
    // Publishers: a client id each (its messages' identity) and a topic, QoS 1 or 2.
    let publishers: Vec<(String, String, u8)> = (0..2 + rng.below(4))
        .map(|i| {
            (
                format!("p{i}"),
                format!("m/{i}/{}", rng.below(2)),
                1 + rng.below(2) as u8,
            )
        })
        .collect();
    let qos_of: PublisherQos = publishers
        .iter()
        .map(|(client, _, qos)| (client.clone(), *qos))
        .collect();
    let mut next_seq: HashMap<String, u32> = HashMap::new();
    let mut failures: Vec<String> = Vec::new();
    let rounds = 8 + rng.below(6);
    let mut log = Vec::new();

    for round in 0..rounds {
        // A burst: one to three publishers at once.
        let mut tasks = Vec::new();
        let mut picked = HashSet::new();
        for _ in 0..1 + rng.below(3) {
            let (client, topic, qos) =
                publishers[rng.below(publishers.len() as u64) as usize].clone();
            // One connection per client id at a time: two would take each other over.
            if !picked.insert(client.clone()) {
                continue;
            }
            let from = *next_seq.get(&client).unwrap_or(&0);
            let n = 1 + rng.below(per_burst) as u32;
            next_seq.insert(client.clone(), from + n);
            let addr = stack.addr();
            tasks.push(tokio::spawn(async move {
                let acked = Publisher::new(client.clone(), topic.clone(), qos)
                    .run(addr, from, from + n)
                    .await;
                (client, topic, acked)
            }));
        }
        for t in tasks {
            let (client, topic, acked) = t.await.expect("publisher");
            log.push(format!(
                "round {round}: {client} on {topic}: {} acked",
                acked.len()
            ));
            for m in subs.iter_mut().filter(|m| m.matches(&topic)) {
                // A clean session gets what came while it was connected; a persistent one
                // everything since it subscribed.
                if m.connected || m.persistent {
                    m.owed.entry(client.clone()).or_default().extend(&acked);
                }
            }
        }
        // Then something happens to the broker or to a subscriber.
        let action = rng.below(10);
        let i = rng.below(subs.len() as u64) as usize;
        match action {
            0 => {
                log.push(format!("round {round}: worker restart"));
                stack.restart_worker().await;
            }
            1 => {
                log.push(format!("round {round}: edge restart"));
                for m in subs.iter_mut().filter(|m| m.connected && !m.persistent) {
                    failures.extend(m.settle(seed, "before an edge restart", &qos_of).await);
                }
                stack.restart_edge().await;
                for m in &mut subs {
                    reconnect(m, stack.addr(), &mut log, round).await;
                }
            }
            2 | 3 if subs[i].connected => {
                let m = &mut subs[i];
                log.push(format!(
                    "round {round}: {} drops its connection",
                    m.sub.client_id
                ));
                if !m.persistent {
                    failures.extend(m.settle(seed, "before a disconnect", &qos_of).await);
                }
                m.sub.drop_connection();
                m.connected = false;
            }
            2 | 3 => reconnect(&mut subs[i], stack.addr(), &mut log, round).await,
            4 if subs[i].connected && subs[i].persistent => {
                let m = &mut subs[i];
                log.push(format!("round {round}: {} taken over", m.sub.client_id));
                m.sub.take_over(stack.addr(), m.pace).await;
                m.reconnected = true;
            }
            _ => {}
        }
        if !failures.is_empty() {
            break;
        }
    }
    // Everyone back; every persistent session must have everything, every clean one what
    // came while it was connected.
    for m in &mut subs {
        if !m.connected {
            reconnect(m, stack.addr(), &mut log, rounds).await;
        }
    }
    for m in &subs {
        failures.extend(m.settle(seed, "at the end", &qos_of).await);
    }
    stack.stop().await;
    assert!(
        failures.is_empty(),
        "{}\nqueue {max_queued}; subscribers: {}\n{}",
        failures.join("\n"),
        subs.iter()
            .map(|m| format!(
                "{} {} qos {} {} {:?}",
                m.sub.client_id,
                m.filter,
                m.qos,
                if m.persistent { "persistent" } else { "clean" },
                m.pace
            ))
            .collect::<Vec<_>>()
            .join("; "),
        log.join("\n")
    );
}

/// Reconnects a subscriber: a persistent session resumes, a clean one starts over (and is
/// owed only what comes from now on).
async fn reconnect(m: &mut Modelled, addr: SocketAddr, log: &mut Vec<String>, round: u64) {
    log.push(format!("round {round}: {} reconnects", m.sub.client_id));
    if m.persistent {
        m.sub.connect(addr, false, None, m.pace).await;
        m.reconnected = true;
    } else {
        m.sub
            .connect(addr, true, Some((&m.filter.clone(), m.qos)), m.pace)
            .await;
        // A new clean session: only what comes next is owed, and what the old one got is
        // forgotten.
        m.owed.clear();
        m.sub
            .received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
    m.connected = true;
}

fn seeds(fixed: &[u64]) -> Vec<u64> {
    let more: u64 = std::env::var("WHARF_MODEL_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let first: u64 = std::env::var("WHARF_MODEL_FIRST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    if more > 0 {
        (first..first + more).collect()
    } else {
        fixed.to_vec()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_fleets_lose_nothing_acknowledged_embedded() {
    for seed in seeds(&[1, 2, 3, 4]) {
        run_seed(Kind::Embedded, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_fleets_lose_nothing_acknowledged_mongodb() {
    for seed in seeds(&[5]) {
        run_seed(Kind::Mongo, seed).await;
    }
}
