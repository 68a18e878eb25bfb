//! How the store's catch-up and session-restore queries scale with history: the same queries
//! against an embedded store holding `small` and then `large` old messages. The queries are
//! bounded by time (the index on `created`), so their cost should follow the new messages, not
//! the history.

use clap::Args;
use std::time::Instant;
use wharf_shared::{Message, MessageId, Qos, Subscription};
use wharf_store_worker::store::sqlite::SqliteStore;
use wharf_store_worker::store::{undelivered, MessageStore, SubscriptionStore, WriteBatch};

#[derive(Args, Debug)]
pub struct CatchupArgs {
    #[arg(long, default_value_t = 10_000)]
    small: usize,
    #[arg(long, default_value_t = 1_000_000)]
    large: usize,
    /// New messages the client has not had yet.
    #[arg(long, default_value_t = 200)]
    fresh: usize,
    /// Repetitions of each query; the median is reported.
    #[arg(long, default_value_t = 21)]
    repeat: usize,
}

/// Message `n` of a history, created at `created_ms` (its id begins with that time).
pub(crate) fn message(n: usize, created_ms: i64, topic: &str) -> Message {
    let mut id = [0u8; 12];
    id[..8].copy_from_slice(&(created_ms as u64).to_be_bytes());
    id[8..].copy_from_slice(&(n as u32).to_be_bytes());
    Message {
        id: MessageId(id),
        topic: topic.to_owned(),
        payload: b"21.5,40.1,1013".to_vec(),
        qos: Qos::AtLeastOnce,
        retain: false,
        client_id: "sensor".into(),
        host: "h1".into(),
        created_ms,
        properties: None,
    }
}

async fn median_ms(
    store: &SqliteStore,
    client: &str,
    since: Option<i64>,
    repeat: usize,
) -> anyhow::Result<(f64, usize)> {
    let mut times = Vec::with_capacity(repeat);
    let mut found = 0;
    for _ in 0..repeat {
        let started = Instant::now();
        let (messages, _) =
            undelivered(store, client, since.map(wharf_shared::Cursor::since), None).await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        found = messages.len();
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok((times[times.len() / 2], found))
}

async fn measure(history: usize, args: &CatchupArgs) -> anyhow::Result<String> {
    let dir = std::env::temp_dir().join(format!("wharf-catchup-{}-{history}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = SqliteStore::open(&dir)?;
    let now = wharf_store_worker::server::now_ms();
    let old_start = now - 3_600_000;
    let filling = Instant::now();
    for chunk in (0..history).collect::<Vec<_>>().chunks(20_000) {
        let messages = chunk
            .iter()
            .map(|n| {
                message(
                    *n,
                    old_start + (*n as i64 * 3_000_000 / history as i64),
                    &format!("fleet/d{}/t", n % 500),
                )
            })
            .collect();
        store
            .write(std::sync::Arc::new(WriteBatch {
                messages,
                ..Default::default()
            }))
            .await?;
    }
    let fill_secs = filling.elapsed().as_secs_f64();
    // A subscriber that subscribed 10 minutes ago, then `fresh` new messages on its topics.
    let sub_created = now - 600_000;
    let subscription = Subscription {
        filter: "fleet/+/t".into(),
        qos: Qos::AtLeastOnce,
        options: Default::default(),
    };
    store
        .upsert_subscriptions("device", vec![subscription], sub_created)
        .await?;
    let fresh = (0..args.fresh)
        .map(|i| message(history + i, sub_created + 1 + i as i64, "fleet/d1/t"))
        .collect();
    store
        .write(std::sync::Arc::new(WriteBatch {
            messages: fresh,
            ..Default::default()
        }))
        .await?;
    let (restore_ms, restored) = median_ms(&store, "device", None, args.repeat).await?;
    let (catchup_ms, caught) = median_ms(&store, "device", Some(now - 2_000), args.repeat).await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(format!(
        "{{\"history\":{history},\"fill_seconds\":{fill_secs:.1},\"restore_ms\":{restore_ms:.3},\"restored\":{restored},\"catchup_ms\":{catchup_ms:.3},\"caught_up\":{caught}}}"
    ))
}

pub async fn run(args: CatchupArgs) -> anyhow::Result<String> {
    let small = measure(args.small, &args).await?;
    let large = measure(args.large, &args).await?;
    Ok(format!("{{\"label\":\"wharf-embedded\",\"scenario\":\"catchup\",\"small\":{small},\"large\":{large}}}"))
}
