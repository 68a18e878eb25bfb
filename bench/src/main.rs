//! `wharf-bench`: a load generator on a real MQTT client stack (rumqttc) that targets any
//! broker, and measurements of Wharf's store. Each run prints one JSON object per line;
//! `bench/run.sh` runs the brokers side by side and `bench/report.py` makes the tables and plots.
//!
//! # Layout
//! - [`load`]: publishers and subscribers, throughput, loss, latency (send time in the payload).
//! - [`idle`]: many idle connections from several loopback source addresses; broker RSS.
//! - [`catchup`]: the store's catch-up and session-restore query times against history size.
//! - [`sync`]: what a durable acknowledgement costs on a disk (synced writes, store commits).
//! - [`storm`]: a fleet of persistent sessions reconnecting at once to their backlogs.
//! - [`proc_stats`]: CPU seconds and RSS of broker processes from /proc.

mod catchup;
mod fleet;
mod flood;
mod idle;
mod load;
mod mqtt;
mod proc_stats;
mod storm;
mod sync;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "MQTT broker benchmarks")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publishers -> broker -> subscribers.
    Load(load::LoadArgs),
    /// Idle connected clients.
    Idle(idle::IdleArgs),
    /// Store query times against history size (embedded store).
    Catchup(catchup::CatchupArgs),
    /// Synced-write and store-commit latency of a disk: the floor under durable acknowledgements.
    Sync(sync::SyncArgs),
    /// CONNECTs with a wrong password at a fixed rate.
    Flood(flood::FloodArgs),
    /// Persistent devices that come back at once to what they are owed.
    Storm(storm::StormArgs),
    /// A fleet over a cluster: CPU, follower documents and latency per host.
    Fleet(fleet::FleetArgs),
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let line = runtime.block_on(async {
        match args.command {
            Command::Load(a) => load::run(a).await,
            Command::Idle(a) => idle::run(a).await,
            Command::Catchup(a) => catchup::run(a).await,
            Command::Sync(a) => sync::run(a).await,
            Command::Flood(a) => flood::run(a).await,
            Command::Storm(a) => storm::run(a).await,
            Command::Fleet(a) => fleet::run(a).await,
        }
    })?;
    println!("{line}");
    Ok(())
}
