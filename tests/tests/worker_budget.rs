//! The worker's byte budget (`--max-queued-bytes`): a flood against the smallest budget loses
//! nothing acknowledged, and the budget is given back whole once the store has written.

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
async fn a_flood_against_the_smallest_budget_loses_nothing() {
    wharf_tests::init_tracing();
    let dir = tempfile::TempDir::new().expect("temp dir");
    let host =
        BrokerHost::start_with(dir.path(), "h1", None, &["--max-queued-bytes", "1MiB"]).await;
    let sub = Subscriber::start(host.addr, "sink", false, "flood/#", 1, Pace::FULL_SPEED).await;
    // Long topics (400 bytes): the edge may hold 10,000 messages for the worker at once, 4 MB
    // of them, past the 1 MiB budget however fast the store writes.
    let padding = "x".repeat(400);
    let publishers: Vec<_> = (0..8)
        .map(|i| {
            let addr = host.addr;
            let topic = format!("flood/{i}/{padding}");
            tokio::spawn(async move {
                let mut p = Publisher::new(format!("p{i}"), topic, 1);
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
    // Whether the flood reached the budget depends on how fast this machine's store writes
    // (the waiting itself is pinned by the pipeline's unit test,
    // `a_spent_budget_holds_the_next_job_until_bytes_are_given_back`); what must hold here is
    // that nothing is lost and the budget is all given back once written.
    eprintln!(
        "waits for the budget: {}",
        metric(&text, "wharf_worker_queued_bytes_waits_total")
    );
    assert_eq!(metric(&text, "wharf_worker_queued_bytes "), 0.0);
}
