//! The worker's Unix socket: edges connect, say hello, and stream requests.
//!
//! Per edge connection: a reader (this task), a writer task fed by a bounded channel, and
//! `LANES` lanes that run session requests. A client's requests always go to the same lane, so
//! they run in the order sent (a clean connect's delete is never overtaken by the next
//! subscribe), while different clients' requests run concurrently. Persist requests and
//! delivery records go to the shared batching tasks in [`crate::pipeline`].

use crate::pipeline::{Job, PersistJob};
use crate::store::{self, Deliveries, Owner, Store, StoreError};
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
    Claim, EdgeFrame, FrameCodec, Generation, Hello, Notice, Reply, Request, WorkerFrame,
    PROTOCOL_VERSION,
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

/// What every connection shares.
pub struct Shared<S> {
    pub store: Arc<S>,
    pub host: String,
    pub instance: String,
    pub persist: crate::pipeline::PersistQueue,
    pub record: crate::pipeline::RecordQueue,
    pub edges: Arc<crate::fanout::Edges>,
    /// This host's routes, where hosts share the store.
    pub routes: Option<Arc<crate::routes::RouteBook>>,
    pub retry_limit: Duration,
}

impl<S> Shared<S> {
    /// Forgets the client's inbound QoS 2 packet ids, through the persister so that it
    /// comes after the persists that used them; false when the persister is gone.
    async fn forget_inbound_qos2(&self, client_id: String) -> bool {
        let clear = PersistJob {
            job: Job::Clear { client_id },
            reply: None,
        };
        self.persist.send(clear).await.is_ok()
    }
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
                        let reply = answer(handle(&shared, request, &host).await);
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

/// Ends a client's session if its record is still `owner`'s claim: the record goes, and
/// then what [`clear_session_state`] clears. Returns whether it did.
pub async fn end_session<S: Store>(
    store: &S,
    limit: std::time::Duration,
    client_id: &str,
    owner: Owner<'_>,
) -> Result<bool, StoreError> {
    let dropped = crate::pipeline::retry(limit, "end session", || {
        store.drop_session(client_id, Some(&owner))
    })
    .await?;
    if dropped {
        clear_session_state(store, limit, client_id).await?;
    }
    Ok(dropped)
}

/// Forgets everything stored for a client's session but its record and its messages'
/// records: subscriptions (and the shared subscription groups that had it as their last
/// member), QoS 2 deliveries under way.
pub async fn clear_session_state<S: Store>(
    store: &S,
    limit: std::time::Duration,
    client_id: &str,
) -> Result<(), StoreError> {
    let shared =
        crate::pipeline::retry(limit, "clear session", || store.shared_filters(client_id)).await?;
    crate::pipeline::retry(limit, "clear session", || {
        store.remove_subscriptions(client_id, None)
    })
    .await?;
    leave_groups(store, limit, &shared).await?;
    crate::pipeline::retry(limit, "clear session", || {
        store.forget_qos2_out(client_id, None)
    })
    .await
}

/// A shared subscription group's own session (client id: the group's `$share/...` key) ends
/// with its last member: of `filters`, a member's subscriptions just removed, the groups that
/// no client subscribes to any more lose their subscription (their records expire with their
/// TTL).
pub async fn leave_groups<S: Store>(
    store: &S,
    limit: std::time::Duration,
    filters: &[String],
) -> Result<(), StoreError> {
    for key in filters
        .iter()
        .filter(|f| wharf_shared::topic::shared(f).is_some())
    {
        let members =
            crate::pipeline::retry(limit, "group members", || store.has_subscribers(key)).await?;
        if !members {
            crate::pipeline::retry(limit, "group", || store.remove_subscriptions(key, None))
                .await?;
            // Its ownership record (hosts sharing the store).
            crate::pipeline::retry(limit, "group", || store.drop_session(key, None)).await?;
        }
    }
    Ok(())
}

/// Claims the client's session for a connection on `edge_host`, and tells every edge of this
/// worker (the others of the cluster read it from the store): a connection or parked session
/// of the client with an older generation ends.
async fn claim<S: Store>(
    shared: &Shared<S>,
    client_id: &str,
    edge_host: &str,
    session_expiry: u32,
) -> Result<(bool, Generation), StoreError> {
    let (held, generation) = crate::pipeline::retry(shared.retry_limit, "session", || {
        shared
            .store
            .claim_session(client_id, edge_host, now_ms(), session_expiry)
    })
    .await?;
    let claim = Claim {
        client_id: client_id.to_owned(),
        generation,
    };
    shared
        .edges
        .broadcast(WorkerFrame::Claims {
            claims: vec![claim],
        })
        .await;
    Ok((held, generation))
}

/// When a session whose client left now expires (`None`: never).
fn expiry_time(now_ms: i64, session_expiry: u32) -> Option<i64> {
    (session_expiry != u32::MAX).then(|| now_ms + i64::from(session_expiry) * 1000)
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
        let reply = answer(handle(&shared, request, &edge_host).await);
        if out.send(WorkerFrame::Reply { id, reply }).await.is_err() {
            return;
        }
    }
}

async fn handle<S: Store>(
    shared: &Shared<S>,
    request: Request,
    edge_host: &str,
) -> Result<Reply, StoreError> {
    let store = &*shared.store;
    let limit = shared.retry_limit;
    let started = std::time::Instant::now();
    let reply = match request {
        Request::Connect {
            client_id,
            clean_start: true,
            session_expiry,
        } => {
            // Claimed first, so that from here on no other connection's end can clear what
            // this one stores.
            let (_, generation) = claim(shared, &client_id, edge_host, session_expiry).await?;
            clear_session_state(store, limit, &client_id).await?;
            Reply::Claimed { generation }
        }
        Request::Disconnect {
            client_id,
            session_expiry,
            generation,
        } => {
            let owner = Owner {
                host: edge_host,
                generation,
            };
            if session_expiry == 0 {
                if end_session(store, limit, &client_id, owner).await? {
                    // Its inbound QoS 2 packet ids, after the persists that used them.
                    shared.forget_inbound_qos2(client_id).await;
                }
            } else {
                let expires = expiry_time(now_ms(), session_expiry);
                crate::pipeline::retry(limit, "session", || {
                    store.close_session(&client_id, expires, &owner)
                })
                .await?;
            }
            Reply::Done
        }
        Request::TrackQos2Out {
            client_id,
            pkid,
            message_id,
            topic,
            released,
        } => {
            let row = released.then(|| Deliveries {
                client_id: client_id.clone(),
                host: edge_host.into(),
                created_ms: now_ms(),
                records: vec![wharf_shared::DeliveredRecord { message_id, topic }],
            });
            crate::pipeline::retry(limit, "track QoS 2", || {
                store.track_qos2_out(&client_id, pkid, message_id, row.clone())
            })
            .await?;
            Reply::Done
        }
        Request::ForgetQos2Out { client_id, pkid } => {
            crate::pipeline::retry(limit, "forget QoS 2", || {
                store.forget_qos2_out(&client_id, Some(pkid))
            })
            .await?;
            Reply::Done
        }
        Request::Connect {
            client_id,
            session_expiry,
            ..
        } => {
            // A session that expired while its client was away ends now, whether or not the
            // sweep (`expire_sessions`) got to it: the client starts a new one.
            let now = now_ms();
            let expired = crate::pipeline::retry(limit, "session", || {
                store.drop_expired_session(&client_id, now)
            })
            .await?;
            if expired {
                clear_session_state(store, limit, &client_id).await?;
                shared.forget_inbound_qos2(client_id.clone()).await;
                metrics::counter!("wharf_worker_sessions_expired_total").increment(1);
            }
            let (held, generation) = claim(shared, &client_id, edge_host, session_expiry).await?;
            let subscriptions =
                crate::pipeline::retry(limit, "session", || store.subscriptions(&client_id))
                    .await?;
            // Other hosts address this one for the session's filters before it is told what
            // the store holds: what they store afterwards comes live.
            if let Some(routes) = &shared.routes {
                routes
                    .ensure(subscriptions.iter().map(|s| s.filter.as_str()))
                    .await?;
            }
            let (undelivered, next) =
                catch_up_page(shared, &client_id, None, false, edge_host).await?;
            let outbound_qos2 = crate::pipeline::retry(limit, "session", || {
                store::outbound_qos2(store, &client_id)
            })
            .await?;
            Reply::Session(wharf_shared::StoredSession {
                // A session from before session records existed is known by its subscriptions.
                present: held || !subscriptions.is_empty(),
                subscriptions: subscriptions
                    .into_iter()
                    .map(|s| wharf_shared::Subscription {
                        filter: s.filter,
                        qos: s.qos,
                        options: s.options,
                    })
                    .collect(),
                undelivered,
                next,
                outbound_qos2,
                generation,
            })
        }
        Request::OwnGroups { owner, groups } => {
            let owned = crate::pipeline::retry(limit, "groups", || {
                store.own_groups(&owner, groups.clone(), now_ms())
            })
            .await?;
            Reply::Groups { owned }
        }
        Request::Subscribe {
            client_id,
            subscriptions,
        } => {
            let filters: Vec<String> = subscriptions.iter().map(|s| s.filter.clone()).collect();
            if let Some(routes) = &shared.routes {
                routes.ensure(filters.iter().map(String::as_str)).await?;
            }
            let now = now_ms();
            crate::pipeline::retry(limit, "subscribe", || {
                store.upsert_subscriptions(&client_id, subscriptions.clone(), now)
            })
            .await?;
            // A retained message this edge received before the SUBSCRIBE is stored first: it
            // may have been routed before this session was subscribed (QoS 0 and 1 are routed
            // before they are stored), and this reply is then its only way in.
            retained_written(shared, limit, &filters).await?
        }
        Request::Unsubscribe { client_id, filters } => {
            crate::pipeline::retry(limit, "unsubscribe", || {
                store.remove_subscriptions(&client_id, Some(filters.clone()))
            })
            .await?;
            leave_groups(store, limit, &filters).await?;
            Reply::Done
        }
        Request::CatchUp {
            client_id,
            after,
            other_hosts_only,
        } => {
            let (messages, next) =
                catch_up_page(shared, &client_id, after, other_hosts_only, edge_host).await?;
            metrics::histogram!("wharf_worker_catch_up_seconds")
                .record(started.elapsed().as_secs_f64());
            Reply::Messages { messages, next }
        }
        Request::Owed { client_id, limit } => {
            let Owed {
                count,
                oldest_ms,
                complete,
            } = owed(shared, &client_id, limit).await?;
            Reply::Owed {
                count,
                oldest_ms,
                complete,
            }
        }
        Request::Sessions {
            after,
            prefix,
            limit: page,
            owed_limit,
        } => {
            let mut sessions = crate::pipeline::retry(limit, "sessions", || {
                store.sessions_page(after.clone(), prefix.clone(), page.min(500) as usize)
            })
            .await?;
            for s in &mut sessions {
                count_owed(shared, s, owed_limit).await?;
            }
            Reply::Sessions { sessions }
        }
        // What the edges handed over before the question is in the store first.
        Request::Trace { id, limit: most } => {
            shared.persist.written().await;
            let (message, recipients, complete) = crate::pipeline::retry(limit, "trace", || {
                store::trace::trace(store, id, most.min(10_000) as usize)
            })
            .await?;
            Reply::Trace {
                message,
                recipients,
                complete,
            }
        }
        Request::PutUser { user, by } => {
            let name = user.username.clone();
            crate::pipeline::retry(limit, "put user", || {
                store.put_user(user.clone(), by.clone())
            })
            .await?;
            tracing::info!(user = %name, %by, "user added or changed in the store");
            Reply::Done
        }
        Request::DeleteUser { username, by } => {
            let found = crate::pipeline::retry(limit, "delete user", || {
                store.delete_user(username.clone(), by.clone())
            })
            .await?;
            if !found {
                return Err(StoreError::Failed(format!(
                    "no user {username:?} in the store"
                )));
            }
            tracing::info!(user = %username, %by, "user removed from the store");
            Reply::Done
        }
        Request::PutRule { rule, by } => {
            crate::pipeline::retry(limit, "put rule", || {
                store.put_rule(rule.clone(), by.clone())
            })
            .await?;
            tracing::info!(?rule, %by, "rule added to the store");
            Reply::Done
        }
        Request::DeleteRule { rule, by } => {
            let removed = crate::pipeline::retry(limit, "delete rule", || {
                store.delete_rule(rule.clone(), by.clone())
            })
            .await?;
            if removed == 0 {
                return Err(StoreError::Failed(
                    "no rule with exactly these fields".into(),
                ));
            }
            tracing::info!(?rule, removed, %by, "rule removed from the store");
            Reply::Done
        }
        Request::Cluster => Reply::Cluster {
            hosts: crate::pipeline::retry(limit, "cluster", || store.host_statuses()).await?,
        },
        Request::Find {
            topic,
            after,
            limit: most,
        } => {
            shared.persist.written().await;
            let most = most.clamp(1, 1_000) as usize;
            let messages = crate::pipeline::retry(limit, "find", || {
                store.messages_on(store::TopicScope::Exact(topic.clone()), after, None, most)
            })
            .await?
            .unwrap_or_default();
            let next = wharf_shared::Cursor::after_full_page(&messages, most);
            Reply::Messages { messages, next }
        }
        Request::MostOwed {
            prefix,
            scan,
            top,
            owed_limit,
        } => {
            const PAGE: usize = 500;
            let scan = u64::from(scan.min(20_000));
            let (mut after, mut scanned, mut complete) = (None, 0u64, false);
            let mut ranked: Vec<wharf_shared::SessionSummary> = Vec::new();
            'pages: while scanned < scan {
                let page = crate::pipeline::retry(limit, "sessions", || {
                    store.sessions_page(after.clone(), prefix.clone(), PAGE)
                })
                .await?;
                let last_page = page.len() < PAGE;
                for mut s in page {
                    if scanned == scan {
                        break 'pages;
                    }
                    count_owed(shared, &mut s, owed_limit).await?;
                    scanned += 1;
                    after = Some(s.client_id.clone());
                    if s.owed > 0 {
                        ranked.push(s);
                    }
                }
                if last_page {
                    complete = true;
                    break;
                }
            }
            // Most owed first; of those owed as many, the one waiting longest.
            ranked.sort_by(|a, b| {
                b.owed
                    .cmp(&a.owed)
                    .then(a.oldest_owed_ms.cmp(&b.oldest_owed_ms))
                    .then(a.client_id.cmp(&b.client_id))
            });
            ranked.truncate(top as usize);
            Reply::Ranked {
                sessions: ranked,
                scanned,
                complete,
            }
        }
        Request::LoadAuth { users, rules } => {
            let (users, rules) = store.load_auth(users, rules).await?;
            Reply::Auth { users, rules }
        }
        // What the edges handed over before the question is in the store first.
        Request::Retained { filter } => retained_written(shared, limit, &[filter]).await?,
        Request::ClearRetained { topic } => {
            shared.persist.written().await;
            crate::pipeline::retry(limit, "clear retained", || store.clear_retained(&topic))
                .await?;
            Reply::Done
        }
        Request::Persist(_) | Request::PersistQos2 { .. } | Request::ReleaseQos2 { .. } => {
            return Err(StoreError::Failed("persister request on a lane".into()))
        }
    };
    Ok(reply)
}

/// The retained messages matching `filters`, once the persister's pending writes are done.
async fn retained_written<S: Store>(
    shared: &Shared<S>,
    limit: std::time::Duration,
    filters: &[String],
) -> Result<Reply, StoreError> {
    shared.persist.written().await;
    let store = &*shared.store;
    let messages =
        crate::pipeline::retry(limit, "retained", || store::retained_for(store, filters)).await?;
    Ok(Reply::Messages {
        messages,
        next: None,
    })
}

/// Fills in a listed session's owed count (up to `limit`) and oldest owed message.
async fn count_owed<S: Store>(
    shared: &Shared<S>,
    s: &mut wharf_shared::SessionSummary,
    limit: u32,
) -> Result<(), StoreError> {
    let o = owed(shared, &s.client_id, limit).await?;
    (s.owed, s.oldest_owed_ms, s.owed_complete) = (o.count, o.oldest_ms, o.complete);
    Ok(())
}

/// What a session is owed: at most the count asked for (`complete`: all of it).
struct Owed {
    count: u64,
    oldest_ms: Option<i64>,
    complete: bool,
}

/// What the client's session is owed, counted page by page up to `limit`; the first page's
/// first message is the oldest (pages come in creation order).
async fn owed<S: Store>(
    shared: &Shared<S>,
    client_id: &str,
    limit: u32,
) -> Result<Owed, StoreError> {
    let store = &*shared.store;
    let pending = shared.record.pending_for(client_id);
    let (mut after, mut count, mut oldest_ms) = (None, 0u64, None);
    loop {
        let page = crate::pipeline::retry(shared.retry_limit, "owed", || {
            store::undelivered_before(store, client_id, after, None, None, &pending)
        })
        .await?;
        if oldest_ms.is_none() {
            oldest_ms = page.messages.first().map(|m| m.created_ms);
        }
        count += page.messages.len() as u64;
        match page.next {
            Some(next) if count < u64::from(limit) => after = Some(next),
            next => {
                return Ok(Owed {
                    count,
                    oldest_ms,
                    complete: next.is_none(),
                })
            }
        }
    }
}

/// A page of what the client still needs from the store, after `after` (from its oldest
/// subscription with `None`), for a session's `Connect` or a `CatchUp`.
///
/// What this edge routed before asking must be in the store when the query reaches it (the
/// edge routes QoS 0 and 1 messages before they are stored), and what it delivered before
/// asking must not come back. Neither is waited for unless it must be (under load a barrier
/// costs one or two store writes, most of a page's time):
/// - delivery records still queued are taken from the recorder first
///   ([`RecordQueue::pending_for`](crate::pipeline::RecordQueue::pending_for)) and count with
///   those the store holds;
/// - the store holds every message created before the oldest one still queued for writing
///   (the horizon), so a page that ends before it is read at once; only a page that starts at
///   the horizon waits for the persister's writes and is read again.
///
/// Other hosts' messages (`other_hosts_only`) reach this edge only once stored.
async fn catch_up_page<S: Store>(
    shared: &Shared<S>,
    client_id: &str,
    after: Option<wharf_shared::Cursor>,
    other_hosts_only: bool,
    edge_host: &str,
) -> Result<(Vec<wharf_shared::Message>, Option<wharf_shared::Cursor>), StoreError> {
    let (store, limit) = (&*shared.store, shared.retry_limit);
    let pending = shared.record.pending_for(client_id);
    let not_host = other_hosts_only.then_some(edge_host);
    let horizon = if other_hosts_only {
        None
    } else {
        shared.persist.oldest_unwritten()
    };
    let mut page = crate::pipeline::retry(limit, "catch-up", || {
        store::undelivered_before(store, client_id, after, not_host, horizon, &pending)
    })
    .await?;
    if page.at_horizon && page.messages.is_empty() {
        shared.persist.written().await;
        page = crate::pipeline::retry(limit, "catch-up", || {
            store::undelivered_before(store, client_id, after, not_host, None, &pending)
        })
        .await?;
    }
    Ok((page.messages, page.next))
}
