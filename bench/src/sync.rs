//! What a durable acknowledgement costs on a disk: the latency of one synced write, under every
//! QoS 1 PUBACK and QoS 2 PUBREC the embedded store allows. Three measurements in `--dir`:
//! - overwrite: a preallocated file rewritten in place, then `fdatasync` (the least any log
//!   can do per acknowledgement);
//! - append: a growing file, then `fdatasync` (the file's size changes too);
//! - commit: the embedded store's own durable write of a batch of `--batch` messages (one
//!   SQLite transaction in WAL mode with synchronous=FULL), as the persister makes it; with
//!   `--stores N`, N stores (files) commit at the same time, each from its own task, and the
//!   commits per second of all of them together say whether the disk overlaps their syncs.
//!
//! With a publisher's window of W messages, each acknowledged only after a commit, and commits
//! one at a time and back to back, a message that arrives while one commit runs waits for it to
//! end and then for its own: at best W / (2 x commit) messages per second (BENCHMARKS.md,
//! "Eighth round, QoS 1: what bounds it").

use clap::Args;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use wharf_shared::Message;
use wharf_store_worker::store::sqlite::SqliteStore;
use wharf_store_worker::store::{MessageStore, WriteBatch};

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// A directory on the disk to measure (where the data directory lives); a scratch
    /// directory is made in it and removed afterwards.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Bytes per synced write (overwrite and append).
    #[arg(long, default_value_t = 16 * 1024)]
    bytes: usize,
    /// Messages (100-byte payloads) per store commit.
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// Synced writes and commits measured, each (commits: per store).
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Stores (separate files) committing at the same time: whether this disk overlaps
    /// synced commits to different files.
    #[arg(long, default_value_t = 1)]
    stores: usize,
}

/// Size of the preallocated file the overwrites cycle through.
const OVERWRITE_SPAN: u64 = 4 << 20;

pub async fn run(args: SyncArgs) -> anyhow::Result<String> {
    anyhow::ensure!(
        args.count > 0 && args.batch > 0 && args.bytes > 0 && args.stores > 0,
        "nothing to measure"
    );
    let scratch = args
        .dir
        .join(format!("wharf-bench-sync-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let result = measure(&args, &scratch).await;
    let _ = std::fs::remove_dir_all(&scratch);
    let (overwrite, append, commit, commits_per_sec) = result?;
    Ok(format!(
        concat!(
            "{{\"scenario\":\"sync\",\"dir\":{:?},\"bytes\":{},\"batch\":{},\"count\":{},\"stores\":{},",
            "\"overwrite_p50_us\":{:.0},\"overwrite_p99_us\":{:.0},",
            "\"append_p50_us\":{:.0},\"append_p99_us\":{:.0},",
            "\"commit_p50_us\":{:.0},\"commit_p99_us\":{:.0},\"commits_per_sec\":{:.0}}}"
        ),
        args.dir.display().to_string(),
        args.bytes,
        args.batch,
        args.count,
        args.stores,
        overwrite.0,
        overwrite.1,
        append.0,
        append.1,
        commit.0,
        commit.1,
        commits_per_sec
    ))
}

type Percentiles = (f64, f64);

async fn measure(
    args: &SyncArgs,
    scratch: &std::path::Path,
) -> anyhow::Result<(Percentiles, Percentiles, Percentiles, f64)> {
    let (bytes, count) = (args.bytes, args.count);
    let dir = scratch.to_owned();
    let (overwrite, append) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let data = vec![0x5a_u8; bytes];
        let span = OVERWRITE_SPAN.max(bytes as u64 * 2);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.join("overwrite"))?;
        file.write_all_at(&vec![0; span as usize], 0)?;
        file.sync_all()?;
        let mut offset = 0;
        let overwrite = timed(count, || {
            file.write_all_at(&data, offset)?;
            offset = (offset + bytes as u64) % (span - bytes as u64);
            file.sync_data()
        })?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(dir.join("append"))?;
        let mut end = 0;
        let append = timed(count, || {
            file.write_all_at(&data, end)?;
            end += bytes as u64;
            file.sync_data()
        })?;
        Ok((overwrite, append))
    })
    .await??;

    // `stores` stores (files) committing at once, each from its own task.
    let started_ms = wharf_store_worker::server::now_ms();
    let began = Instant::now();
    let mut tasks = Vec::with_capacity(args.stores);
    for s in 0..args.stores {
        let store = SqliteStore::open(&scratch.join(format!("store-{s}")))?;
        let batch_len = args.batch;
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::with_capacity(count);
            for n in 0..count {
                let messages = (0..batch_len)
                    .map(|i| message((s * count + n) * batch_len + i, started_ms))
                    .collect();
                let batch = Arc::new(WriteBatch {
                    messages,
                    ..WriteBatch::default()
                });
                let started = Instant::now();
                store.write(batch).await?;
                times.push(started.elapsed().as_secs_f64() * 1e6);
            }
            Ok::<_, wharf_store_worker::store::StoreError>(times)
        }));
    }
    let mut times = Vec::with_capacity(count * args.stores);
    for task in tasks {
        times.extend(task.await??);
    }
    let commits_per_sec = times.len() as f64 / began.elapsed().as_secs_f64();
    Ok((overwrite, append, percentiles(times), commits_per_sec))
}

/// Runs `op` `count` times; the p50 and p99 of its microseconds.
fn timed(
    count: usize,
    mut op: impl FnMut() -> std::io::Result<()>,
) -> std::io::Result<Percentiles> {
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        op()?;
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(percentiles(times))
}

fn percentiles(mut times: Vec<f64>) -> Percentiles {
    times.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

/// A 100-byte QoS 1 message, as the QoS 1 benchmark publishes.
fn message(n: usize, created_ms: i64) -> Message {
    Message {
        payload: vec![0x5a; 100],
        client_id: "bench-pub-0".into(),
        host: "bench".into(),
        ..crate::catchup::message(n, created_ms, "bench/t")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers come from real synced writes and commits (each at least a few
    /// microseconds), and the scratch directory is gone afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn measures_synced_writes_and_commits_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let line = run(SyncArgs {
            dir: dir.path().to_owned(),
            bytes: 4096,
            batch: 5,
            count: 20,
            stores: 2,
        })
        .await
        .expect("sync");
        for key in [
            "overwrite_p50_us",
            "append_p50_us",
            "commit_p50_us",
            "commits_per_sec",
        ] {
            let at = line.find(&format!("\"{key}\":")).expect(key) + key.len() + 3;
            let value: f64 = line[at..]
                .split([',', '}'])
                .next()
                .and_then(|v| v.parse().ok())
                .expect("a number");
            assert!(value >= 1.0, "{key} = {value} in {line}");
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("read dir").count(),
            0,
            "scratch files left behind"
        );
    }
}
