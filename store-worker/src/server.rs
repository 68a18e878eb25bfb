//! The worker's Unix socket: edges connect, say hello, and stream requests.
//!
//! Per edge connection: a reader (this task), a writer task fed by a bounded channel, and
//! `LANES` lanes that run session requests. A client's requests always go to the same lane, so
//! they run in the order sent (a clean connect's delete is never overtaken by the next
//! subscribe), while different clients' requests run concurrently. Persist requests and
//! delivery records go to the shared batching tasks in [`crate::pipeline`].

use crate::pipeline::{Job, PersistJob};
pub use crate::state::Shared;
use crate::store::{Deliveries, Store, StoreError};
use futures::{SinkExt, StreamExt};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wharf_shared::{
    EdgeFrame, FrameCodec, Hello, Notice, Reply, Request, WorkerFrame, PROTOCOL_VERSION,
};

const LANES: usize = 8;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub use wharf_shared::now_ms;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another worker is listening on {0}")]
    InUse(PathBuf),
    #[error("cannot listen on {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// Binds the worker socket with `mode` permissions and, if given, group `gid`. A stale socket
/// file left by a crash is replaced; a live one is an error. The socket is made under a
/// temporary name, given its mode and group, then renamed, so it is never reachable with
/// looser permissions.
pub async fn bind(path: &Path, mode: u32, gid: Option<u32>) -> Result<UnixListener, BindError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e| BindError::Io(path.to_owned(), e);
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(BindError::InUse(path.to_owned()));
        }
        tracing::info!(path = %path.display(), "removing stale worker socket");
        std::fs::remove_file(path).map_err(io)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let staging = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(io)?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    if gid.is_some() {
        std::os::unix::fs::chown(&staging, None, gid).map_err(io)?;
    }
    std::fs::rename(&staging, path).map_err(io)?;
    Ok(listener)
}

/// Accepts edges until `shutdown`; then stops reading and lets queued work finish.
pub async fn serve<S: Store>(
    shared: Arc<Shared<S>>,
    listener: UnixListener,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            s = listener.accept() => match s {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        tracker.spawn(connection(
            shared.clone(),
            stream,
            shutdown.clone(),
            tracker.clone(),
        ));
    }
}

async fn connection<S: Store>(
    shared: Arc<Shared<S>>,
    stream: UnixStream,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let (read, write) = stream.into_split();
    let mut reader = FramedRead::new(read, FrameCodec::<EdgeFrame, WorkerFrame>::new());
    let mut writer = FramedWrite::new(write, FrameCodec::<EdgeFrame, WorkerFrame>::new());
    let edge = match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await {
        Ok(Some(Ok(EdgeFrame::Hello(h)))) if h.protocol_version == PROTOCOL_VERSION => h,
        Ok(Some(Ok(EdgeFrame::Hello(h)))) => {
            tracing::error!(edge = %h.instance, theirs = h.protocol_version, ours = PROTOCOL_VERSION, "edge speaks another protocol version");
            return;
        }
        other => {
            tracing::warn!(?other, "edge connection without a hello");
            return;
        }
    };
    let hello = WorkerFrame::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        host: shared.host.clone(),
        instance: shared.instance.clone(),
    });
    if writer.send(hello).await.is_err() {
        return;
    }
    tracing::info!(edge = %edge.instance, edge_host = %edge.host, "edge connected");
    metrics::gauge!("wharf_worker_edges").increment(1.0);

    let (out_tx, out_rx) = mpsc::channel::<WorkerFrame>(16_384);
    if shared.store.shared_by_hosts() {
        // Before anything else: the edge learns that hosts share the store (its groups are
        // delivered only where owned) with a lease that has already run out (its sessions
        // wait for the first read of claims).
        let _ = out_tx.send(WorkerFrame::Lease { as_of_ms: 0 }).await;
    }
    tracker.spawn(write_frames(writer, out_rx));
    let edge_host: Arc<str> = edge.host.as_str().into();
    let edge_id = shared.edges.add(edge_host.clone(), out_tx.clone());
    let lanes: Vec<mpsc::Sender<(u64, Request)>> = (0..LANES)
        .map(|_| {
            let (tx, rx) = mpsc::channel(1024);
            tracker.spawn(lane(shared.clone(), rx, out_tx.clone(), edge_host.clone()));
            tx
        })
        .collect();
    let counting = Arc::new(tokio::sync::Semaphore::new(2));

    loop {
        let frame = tokio::select! {
            f = reader.next() => f,
            _ = shutdown.cancelled() => break,
        };
        let frame = match frame {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                tracing::warn!(edge = %edge.instance, error = %e, "bad frame from edge; closing");
                break;
            }
            None => break,
        };
        let sent = match frame {
            EdgeFrame::Hello(_) => {
                tracing::warn!(edge = %edge.instance, "second hello; closing");
                break;
            }
            EdgeFrame::Request { id, request } => match route(request) {
                Route::Persister(job) => shared
                    .persist
                    .send(PersistJob {
                        job,
                        reply: Some((out_tx.clone(), id)),
                    })
                    .await
                    .is_ok(),
                Route::Aside(request) => {
                    let (shared, out, host) = (shared.clone(), out_tx.clone(), edge_host.clone());
                    let counting = counting.clone();
                    tracker.spawn(async move {
                        // At most two at once per edge: admin pages and backlogs are rare.
                        let _turn = counting.acquire().await;
                        let reply = answer(crate::cmd::handle(&shared, request, &host).await);
                        let _ = out.send(WorkerFrame::Reply { id, reply }).await;
                    });
                    true
                }
                Route::Lane(request) => {
                    if let Some(client_id) = clean_session_of(&request) {
                        // A clean session's QoS 2 packet ids are forgotten in order with the
                        // persists, which is where they are used.
                        if !shared.forget_inbound_qos2(client_id).await {
                            break;
                        }
                    }
                    let lane = lane_of(client_of(&request));
                    lanes[lane].send((id, request)).await.is_ok()
                }
            },
            EdgeFrame::Notice(Notice::Store(messages)) => shared
                .persist
                .send(PersistJob {
                    job: Job::StoreMany(messages),
                    reply: None,
                })
                .await
                .is_ok(),
            EdgeFrame::Notice(Notice::Delivered {
                client_id,
                messages,
            }) => {
                let deliveries = Deliveries {
                    client_id,
                    host: edge_host.clone(),
                    created_ms: now_ms(),
                    records: messages,
                };
                shared.record.send(deliveries).await.is_ok()
            }
            EdgeFrame::Notice(Notice::Status(mut status)) => {
                // Written aside, best effort: a lost report is replaced in seconds.
                status.host = edge_host.to_string();
                status.worker_queued_bytes = shared.persist.queued_bytes() as u64;
                status.worker_oldest_unwritten_ms = shared.persist.oldest_unwritten();
                status.written_ms = now_ms();
                let store = shared.store.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.put_host_status(*status).await {
                        tracing::debug!(error = %e, "host status not written");
                    }
                });
                true
            }
            EdgeFrame::Notice(Notice::Routes {
                added,
                removed,
                whole,
            }) => {
                if let Some(routes) = &shared.routes {
                    routes.edge_routes(edge_id, added, removed, whole);
                }
                true
            }
        };
        if !sent {
            break;
        }
    }
    shared.edges.remove(edge_id);
    if let Some(routes) = &shared.routes {
        routes.edge_gone(edge_id);
    }
    tracing::info!(edge = %edge.instance, "edge connection closing");
    metrics::gauge!("wharf_worker_edges").decrement(1.0);
}

async fn write_frames(
    mut writer: FramedWrite<tokio::net::unix::OwnedWriteHalf, FrameCodec<EdgeFrame, WorkerFrame>>,
    mut frames: mpsc::Receiver<WorkerFrame>,
) {
    let mut batch = Vec::with_capacity(256);
    while frames.recv_many(&mut batch, 256).await > 0 {
        for frame in batch.drain(..) {
            if writer.feed(frame).await.is_err() {
                return;
            }
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
}

/// Where a request runs: the persister (writes ordered with the persists) or a lane.
enum Route {
    Persister(Job),
    Lane(Request),
    /// Read-only counts and lookups for the admin API and the bridges' backlogs (`Owed`,
    /// `Sessions`, `Trace`, `Find`):
    /// answered in a task of their own, so that a long count never delays what waits on a
    /// lane (a group's or bridge's ownership renewal, a client's CONNECT).
    Aside(Request),
}

fn route(request: Request) -> Route {
    match request {
        Request::Persist(messages) => Route::Persister(Job::StoreMany(messages)),
        Request::PersistQos2 { message, pkid } => Route::Persister(Job::Qos2 { message, pkid }),
        Request::ReleaseQos2 { client_id, pkid } => {
            Route::Persister(Job::Release { client_id, pkid })
        }
        aside @ (Request::Owed { .. }
        | Request::Sessions { .. }
        | Request::MostOwed { .. }
        | Request::Trace { .. }
        | Request::Cluster
        | Request::Find { .. }) => Route::Aside(aside),
        other => Route::Lane(other),
    }
}

/// A request's outcome as its reply.
fn answer(result: Result<Reply, StoreError>) -> Reply {
    result.unwrap_or_else(|e| Reply::Failed {
        reason: e.to_string(),
        retryable: e.retryable(),
    })
}

/// The client of a connect that starts clean. (A disconnect that ends the session clears
/// them once it is known to be the session's owner's.)
fn clean_session_of(request: &Request) -> Option<String> {
    match request {
        Request::Connect {
            client_id,
            clean_start: true,
            ..
        } => Some(client_id.clone()),
        _ => None,
    }
}

fn client_of(request: &Request) -> &str {
    match request {
        Request::Connect { client_id, .. }
        | Request::Subscribe { client_id, .. }
        | Request::Unsubscribe { client_id, .. }
        | Request::CatchUp { client_id, .. }
        | Request::Owed { client_id, .. }
        | Request::Disconnect { client_id, .. }
        | Request::TrackQos2Out { client_id, .. }
        | Request::ForgetQos2Out { client_id, .. } => client_id,
        Request::Persist(messages) => messages.first().map_or("", |m| &m.client_id),
        Request::PersistQos2 { message, .. } => &message.client_id,
        Request::ReleaseQos2 { client_id, .. } => client_id,
        Request::LoadAuth { .. }
        | Request::OwnGroups { .. }
        | Request::Sessions { .. }
        | Request::MostOwed { .. }
        | Request::Trace { .. }
        | Request::Cluster
        | Request::PutUser { .. }
        | Request::DeleteUser { .. }
        | Request::PutRule { .. }
        | Request::DeleteRule { .. }
        | Request::Find { .. }
        | Request::Retained { .. }
        | Request::ClearRetained { .. } => "",
    }
}

fn lane_of(client_id: &str) -> usize {
    let mut hasher = DefaultHasher::new();
    client_id.hash(&mut hasher);
    (hasher.finish() % LANES as u64) as usize
}

async fn lane<S: Store>(
    shared: Arc<Shared<S>>,
    mut requests: mpsc::Receiver<(u64, Request)>,
    out: mpsc::Sender<WorkerFrame>,
    edge_host: Arc<str>,
) {
    while let Some((id, request)) = requests.recv().await {
        let reply = answer(crate::cmd::handle(&shared, request, &edge_host).await);
        if out.send(WorkerFrame::Reply { id, reply }).await.is_err() {
            return;
        }
    }
}
