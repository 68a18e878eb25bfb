//! The worker's byte budget (`--max-queued-bytes`): a flood faster than the store waits at
//! the worker's door instead of piling up in it, and nothing acknowledged is lost.

use std::collections::HashMap;
use std::time::Duration;
use wharf_tests::fleet::{check, complaints, Pace, Publisher, Subscriber};
use wharf_tests::process::{http_get, BrokerHost};

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_past_the_budget_waits_and_loses_nothing() {
    wharf_tests::init_tracing();
    let dir = tempfile::TempDir::new().expect("temp dir");
    let host =
        BrokerHost::start_with(dir.path(), "h1", None, &["--max-queued-bytes", "1MiB"]).await;
    let sub = Subscriber::start(host.addr, "sink", false, "flood/#", 1, Pace::FULL_SPEED).await;
    let publishers: Vec<_> = (0..8)
        .map(|i| {
            let addr = host.addr;
            tokio::spawn(async move {
                let mut p = Publisher::new(format!("p{i}"), format!("flood/{i}"), 1);
                p.window = 5_000;
                let acked = p.run(addr, 0, 5_000).await;
                (p.client_id, acked)
            })
        })
        .collect();
    let mut acked = HashMap::new();
    for p in publishers {
        let (client, seqs) = p.await.expect("publisher");
        assert_eq!(seqs.len(), 5_000, "{client}: not everything acknowledged");
        acked.insert(client, seqs);
    }
    sub.wait_for(Duration::from_secs(20), |got| got.len() >= 40_000)
        .await;
    if let Some(c) = complaints("sink", &check(&sub.snapshot(), &acked), |_| true) {
        panic!("{c}");
    }
    let (_, text) = http_get(host.worker_ops, "/metrics").await;
    // The budget was reached (the flood waited) and is given back once written.
    assert!(
        metric(&text, "wharf_worker_queued_bytes_waits_total") > 0.0,
        "the budget never held a job back: {}",
        text.lines()
            .filter(|l| l.contains("queued_bytes"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(metric(&text, "wharf_worker_queued_bytes "), 0.0);
}
