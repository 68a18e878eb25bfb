//! The console's charts: the last [`POINTS`] samples of a few figures, one every `step`
//! (10 s by default: an hour), kept in fixed rings. Memory does not grow with time, traffic or
//! the fleet: 7 series of 360 `f32`s and their times, about 12 KiB. Sampling reads the
//! metrics this edge exports anyway and walks its connected sessions once per step.

use crate::broker::Broker;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wharf_ops::http::PrometheusHandle;

/// Samples kept per series.
pub const POINTS: usize = 360;

/// The figures, in the order of [`Sample`]'s fields.
pub const SERIES: [&str; 7] = [
    "messagesIn",
    "messagesOut",
    "storeLatencyMs",
    "connections",
    "queued",
    "bridgeBacklog",
    "workerPending",
];

/// One step's figures: rates per second over the step, means over it, or levels at its end.
type Sample = [f32; SERIES.len()];

/// The rings, oldest first once full.
pub struct History {
    step: Duration,
    inner: Mutex<Rings>,
}

struct Rings {
    /// Unix ms of each point, and the points, in a ring starting at `next` once full.
    times: Vec<i64>,
    samples: Vec<Sample>,
    next: usize,
}

/// Cumulative counters at the last sample, for the rates.
#[derive(Default, Clone, Copy)]
struct Totals {
    received: f64,
    sent: f64,
    persist_sum: f64,
    persist_count: f64,
}

impl History {
    pub fn new(step: Duration) -> Arc<History> {
        Arc::new(History {
            step,
            inner: Mutex::new(Rings {
                times: Vec::with_capacity(POINTS),
                samples: Vec::with_capacity(POINTS),
                next: 0,
            }),
        })
    }

    /// Samples every step until the edge's broker is gone.
    pub fn start(self: &Arc<Self>, broker: std::sync::Weak<Broker>, metrics: PrometheusHandle) {
        let history = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(history.step);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last: Option<Totals> = None;
            loop {
                tick.tick().await;
                let Some(broker) = broker.upgrade() else {
                    return;
                };
                let text = metrics.render();
                let now = totals(&text);
                if let Some(before) = last {
                    let sample = sample(&broker, &text, before, now, history.step);
                    history.push(crate::ids::now_ms(), sample);
                }
                last = Some(now);
            }
        });
    }

    fn push(&self, at_ms: i64, sample: Sample) {
        let mut rings = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if rings.samples.len() < POINTS {
            rings.times.push(at_ms);
            rings.samples.push(sample);
        } else {
            let at = rings.next;
            rings.times[at] = at_ms;
            rings.samples[at] = sample;
            rings.next = (at + 1) % POINTS;
        }
    }

    /// The series as the admin API serves them: `times` (Unix ms) and one array per figure,
    /// oldest first.
    pub fn json(&self) -> Value {
        let rings = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let order: Vec<usize> = (0..rings.samples.len())
            .map(|i| (rings.next + i) % rings.samples.len().max(1))
            .collect();
        let mut series = serde_json::Map::new();
        for (k, name) in SERIES.iter().enumerate() {
            let values: Vec<Value> = order
                .iter()
                .map(|&i| {
                    let v = f64::from(rings.samples[i][k]);
                    if v.is_finite() {
                        json!((v * 100.0).round() / 100.0)
                    } else {
                        Value::Null
                    }
                })
                .collect();
            series.insert((*name).to_owned(), values.into());
        }
        json!({
            "stepSeconds": self.step.as_secs_f64(),
            "points": POINTS,
            "times": order.iter().map(|&i| rings.times[i]).collect::<Vec<i64>>(),
            "series": series,
        })
    }
}

fn totals(text: &str) -> Totals {
    Totals {
        received: sum(text, "wharf_edge_messages_received_total"),
        sent: sum(text, "wharf_edge_messages_sent_total"),
        persist_sum: sum(text, "wharf_edge_persist_seconds_sum"),
        persist_count: sum(text, "wharf_edge_persist_seconds_count"),
    }
}

fn sample(broker: &Broker, text: &str, before: Totals, now: Totals, step: Duration) -> Sample {
    let seconds = step.as_secs_f64().max(0.001);
    let rate = |a: f64, b: f64| ((b - a).max(0.0) / seconds) as f32;
    let writes = now.persist_count - before.persist_count;
    let latency = if writes > 0.0 {
        ((now.persist_sum - before.persist_sum) / writes * 1000.0) as f32
    } else {
        f32::NAN
    };
    let sessions = broker.router.sessions();
    let queued: usize = sessions.iter().map(|(_, tx)| tx.queued()).sum();
    let backlog: u64 = broker.bridges.iter().filter_map(|b| b.backlog()).sum();
    [
        rate(before.received, now.received),
        rate(before.sent, now.sent),
        latency,
        sessions.len() as f32,
        queued as f32,
        backlog as f32,
        sum(text, "wharf_edge_worker_pending_requests") as f32,
    ]
}

/// The sum of every sample of metric `name` (all its label sets) in Prometheus text.
fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_add_every_label_set_of_a_metric_only() {
        let text = "# TYPE x counter\n\
                    wharf_edge_messages_sent_total{qos=\"0\"} 5\n\
                    wharf_edge_messages_sent_total{qos=\"1\"} 7\n\
                    wharf_edge_messages_sent_total_other 100\n\
                    wharf_edge_persist_seconds_sum 0.5\n";
        assert_eq!(sum(text, "wharf_edge_messages_sent_total"), 12.0);
        assert_eq!(sum(text, "wharf_edge_persist_seconds_sum"), 0.5);
        assert_eq!(sum(text, "missing"), 0.0);
    }

    #[test]
    fn the_rings_keep_the_last_points_oldest_first() {
        let history = History::new(Duration::from_secs(10));
        for i in 0..(POINTS + 5) {
            let mut s = [0.0; SERIES.len()];
            s[0] = i as f32;
            s[2] = f32::NAN;
            history.push(i as i64, s);
        }
        let json = history.json();
        let times = json["times"].as_array().expect("times");
        assert_eq!(times.len(), POINTS);
        assert_eq!(times[0], 5);
        assert_eq!(times[POINTS - 1], (POINTS + 4) as i64);
        let first = &json["series"]["messagesIn"];
        assert_eq!(first[0], 5.0);
        assert!(json["series"]["storeLatencyMs"][0].is_null());
    }
}
