//! Wire types between Wharf's `edge` and `store-worker`, and their framing.
//!
//! Nothing here knows about MongoDB or MQTT sessions: this crate is the contract between two
//! processes that are deployed and scaled independently.
//!
//! # Layout
//! - [`wire`]: the frames that cross the Unix socket (`EdgeFrame`, `WorkerFrame`) and the
//!   records inside them (`Message`, `Subscription`, `MessageId`).
//! - [`codec`]: length-delimited framing with a hard maximum, bincode 2 inside; the only module
//!   that knows the encoding.
//! - [`topic`]: MQTT topic and filter rules, which both sides apply.
//!
//! What both processes do for their operators (configuration layers with etcd, the metrics
//! and health endpoint, logging) is `wharf-ops`: this crate depends on no server library, so
//! the fuzz targets and anything reading the frames build it alone.
#![forbid(unsafe_code)]

pub mod codec;
pub mod topic;
pub mod wire;

pub use codec::{CodecError, FrameCodec, MAX_FRAME_LENGTH};
pub use wire::*;

/// Milliseconds since the Unix epoch: the `created_ms` of messages and the time base of every
/// "since" on the wire.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// This machine's host name, for the `host` field of stored documents.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Milliseconds of the host's monotonic clock (`CLOCK_MONOTONIC`): every process on the host
/// reads the same one, and it keeps counting while a process is stopped.
pub fn monotonic_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec.max(0) as u64) * 1000 + (t.tv_nsec.max(0) as u64) / 1_000_000
}
