//! A store-worker stand-in for edge tests: speaks the real edge<->worker protocol over a real
//! Unix socket, keeps its "store" in memory, and can be slowed, failed, stopped and restarted.

use futures::{SinkExt, StreamExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use wharf_shared::now_ms;
use wharf_shared::{
    Cursor, EdgeFrame, FrameCodec, Hello, Message, MessageId, Notice, Qos, Reply, Request,
    Subscription, WorkerFrame, MAX_MESSAGES_PER_REPLY, PROTOCOL_VERSION,
};

/// What the mock has stored; tests read it directly.
#[derive(Default)]
pub struct MockStore {
    pub messages: Vec<Message>,
    /// client -> filter -> (qos, created_ms)
    pub subscriptions: HashMap<String, BTreeMap<String, (Qos, i64)>>,
    pub delivered: HashSet<(String, MessageId)>,
    pub retained: BTreeMap<String, Message>,
    /// QoS 2 packet ids recorded and not yet released, by client.
    pub qos2: HashSet<(String, u16)>,
    /// QoS 2 deliveries under way: (client, packet id) -> (message, released).
    pub qos2_out: BTreeMap<(String, u16), (MessageId, bool)>,
    /// Every request seen, for assertions on what the edge asked.
    pub requests: Vec<Request>,
    /// How many messages each QoS 0 store notice carried.
    pub store_notices: Vec<usize>,
    /// Sessions claimed so far (each CONNECT's generation counts on from here).
    pub claims: u64,
    /// The edge's routes as its `Routes` notices left them.
    pub routes: HashSet<String>,
}

impl MockStore {
    fn claim(&mut self) -> wharf_shared::Generation {
        self.claims += 1;
        wharf_shared::Generation {
            epoch_ms: 1,
            claims: self.claims,
        }
    }

    fn forget(&mut self, client_id: &str) {
        self.subscriptions.remove(client_id);
        self.qos2.retain(|(c, _)| c != client_id);
        self.qos2_out.retain(|(c, _), _| c != client_id);
    }

    /// What the mock holds and was asked, in order, with times: for a failing test's message.
    pub fn describe(&self) -> String {
        let mut out = String::from("stored messages:\n");
        for m in &self.messages {
            out += &format!(
                "  {} {} {:?} retain={} created_ms={}\n",
                m.id,
                m.topic,
                String::from_utf8_lossy(&m.payload),
                m.retain,
                m.created_ms
            );
        }
        out += "subscriptions (client, filter, created_ms):\n";
        for (client, filters) in &self.subscriptions {
            for (filter, (_, created)) in filters {
                out += &format!("  {client} {filter} {created}\n");
            }
        }
        out += "requests:\n";
        for r in &self.requests {
            out += &format!("  {r:?}\n");
        }
        out
    }
}

/// Knobs a test turns.
#[derive(Default, Clone)]
pub struct Behaviour {
    pub persist_delay: Duration,
    pub fail_persists: bool,
    /// QoS 2 delivery steps (`TrackQos2Out`) answered as failed, not recorded.
    pub fail_tracks: bool,
}

pub struct MockWorker {
    pub socket: PathBuf,
    pub store: Arc<Mutex<MockStore>>,
    pub behaviour: Arc<Mutex<Behaviour>>,
    running: Option<CancellationToken>,
}

impl MockWorker {
    pub fn start(socket: &Path) -> MockWorker {
        let mut worker = MockWorker {
            socket: socket.to_owned(),
            store: Arc::default(),
            behaviour: Arc::default(),
            running: None,
        };
        worker.restart();
        worker
    }

    /// Closes the socket and every connection, as a crashed worker would.
    pub fn stop(&mut self) {
        if let Some(token) = self.running.take() {
            token.cancel();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Listens again on the same path with the same store.
    pub fn restart(&mut self) {
        self.stop();
        let listener = UnixListener::bind(&self.socket).expect("bind mock worker socket");
        let token = CancellationToken::new();
        self.running = Some(token.clone());
        let store = self.store.clone();
        let behaviour = self.behaviour.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    s = listener.accept() => match s { Ok((s, _)) => s, Err(_) => return },
                    _ = token.cancelled() => return,
                };
                tokio::spawn(serve(
                    stream,
                    store.clone(),
                    behaviour.clone(),
                    token.clone(),
                ));
            }
        });
    }

    pub fn set_persist_delay(&self, delay: Duration) {
        self.behaviour.lock().expect("lock").persist_delay = delay;
    }

    pub fn set_fail_persists(&self, fail: bool) {
        self.behaviour.lock().expect("lock").fail_persists = fail;
    }

    pub fn set_fail_tracks(&self, fail: bool) {
        self.behaviour.lock().expect("lock").fail_tracks = fail;
    }

    pub fn stored_payloads(&self, topic: &str) -> Vec<Vec<u8>> {
        let store = self.store.lock().expect("lock");
        store
            .messages
            .iter()
            .filter(|m| m.topic == topic)
            .map(|m| m.payload.clone())
            .collect()
    }
}

impl Drop for MockWorker {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(
    stream: UnixStream,
    store: Arc<Mutex<MockStore>>,
    behaviour: Arc<Mutex<Behaviour>>,
    token: CancellationToken,
) {
    let mut framed = Framed::new(stream, FrameCodec::<EdgeFrame, WorkerFrame>::new());
    let edge_host = match framed.next().await {
        Some(Ok(EdgeFrame::Hello(h))) => h.host,
        _ => return,
    };
    let hello = WorkerFrame::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        host: "mock".into(),
        instance: "mock-worker".into(),
    });
    if framed.send(hello).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<WorkerFrame>();
    loop {
        tokio::select! {
            // Stopped means stopped: a frame that is also ready is not answered.
            biased;
            _ = token.cancelled() => return,
            Some(frame) = rx.recv() => {
                if framed.send(frame).await.is_err() {
                    return;
                }
            }
            frame = framed.next() => {
                let frame = match frame {
                    Some(Ok(f)) => f,
                    _ => return,
                };
                match frame {
                    EdgeFrame::Hello(_) => return,
                    EdgeFrame::Notice(n) => notice(&store, n),
                    EdgeFrame::Request { id, request } => {
                        let b = behaviour.lock().expect("lock").clone();
                        let (store, tx, host) = (store.clone(), tx.clone(), edge_host.clone());
                        let persist = matches!(request, Request::Persist(_) | Request::PersistQos2 { .. });
                        let fail = (persist && b.fail_persists)
                            || (b.fail_tracks && matches!(request, Request::TrackQos2Out { .. }));
                        let delay = if persist { b.persist_delay } else { Duration::ZERO };
                        let handle = async move {
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            let reply = if fail {
                                Reply::Failed { reason: "mock failure".into(), retryable: true }
                            } else {
                                answer(&store, request, &host)
                            };
                            let _ = tx.send(WorkerFrame::Reply { id, reply });
                        };
                        if delay.is_zero() {
                            handle.await;
                        } else {
                            tokio::spawn(handle);
                        }
                    }
                }
            }
        }
    }
}

fn notice(store: &Mutex<MockStore>, notice: Notice) {
    let mut store = store.lock().expect("lock");
    match notice {
        Notice::Store(messages) => {
            store.store_notices.push(messages.len());
            for m in messages {
                store_message(&mut store, m);
            }
        }
        Notice::Delivered {
            client_id,
            messages,
        } => {
            for m in messages {
                store.delivered.insert((client_id.clone(), m.message_id));
            }
        }
        Notice::Routes {
            added,
            removed,
            whole,
        } => {
            if whole {
                store.routes.clear();
            }
            for filter in removed {
                store.routes.remove(&filter);
            }
            store.routes.extend(added);
        }
        Notice::Status(_) => {}
    }
}

fn store_message(store: &mut MockStore, m: Message) {
    if store.messages.iter().any(|x| x.id == m.id) {
        return;
    }
    if m.retain {
        if m.payload.is_empty() {
            store.retained.remove(&m.topic);
        } else {
            store.retained.insert(m.topic.clone(), m.clone());
        }
    }
    store.messages.push(m);
}

fn matches(topic: &str, filter: &str) -> bool {
    wharf_shared::topic::matches(topic, filter)
}

fn undelivered(
    store: &MockStore,
    client: &str,
    after: Option<Cursor>,
    other_host: Option<&str>,
) -> (Vec<Message>, Option<Cursor>) {
    let Some(subs) = store.subscriptions.get(client) else {
        return (Vec::new(), None);
    };
    let mut out: Vec<Message> = store
        .messages
        .iter()
        .filter(|m| other_host.is_none_or(|h| m.host != h))
        .filter(|m| after.is_none_or(|a| a.precedes(m)))
        .filter(|m| !store.delivered.contains(&(client.to_owned(), m.id)))
        .filter(|m| {
            subs.iter()
                .any(|(f, (_, created))| m.created_ms >= *created && matches(&m.topic, f))
        })
        .cloned()
        .collect();
    out.sort_by_key(|m| (m.created_ms, m.id));
    out.truncate(MAX_MESSAGES_PER_REPLY);
    let next = Cursor::after_full_page(&out, MAX_MESSAGES_PER_REPLY);
    (out, next)
}

fn answer(store: &Mutex<MockStore>, request: Request, edge_host: &str) -> Reply {
    let mut store = store.lock().expect("lock");
    store.requests.push(request.clone());
    match request {
        Request::Connect {
            client_id,
            clean_start: true,
            ..
        } => {
            store.forget(&client_id);
            Reply::Claimed {
                generation: store.claim(),
            }
        }
        Request::Disconnect {
            client_id,
            session_expiry: 0,
            ..
        } => {
            store.forget(&client_id);
            Reply::Done
        }
        Request::Disconnect { .. } => Reply::Done,
        Request::OwnGroups { groups, .. } => Reply::Groups { owned: groups },
        Request::LoadAuth { .. } => Reply::Failed {
            reason: "the mock worker keeps no users".into(),
            retryable: false,
        },
        Request::Retained { .. }
        | Request::ClearRetained { .. }
        | Request::Owed { .. }
        | Request::Sessions { .. }
        | Request::Trace { .. }
        | Request::Cluster
        | Request::MostOwed { .. }
        | Request::PutUser { .. }
        | Request::DeleteUser { .. }
        | Request::PutRule { .. }
        | Request::DeleteRule { .. }
        | Request::Find { .. } => Reply::Failed {
            reason: "the mock worker keeps no retained messages or backlogs".into(),
            retryable: false,
        },
        Request::Connect { client_id, .. } => {
            let present = store.subscriptions.contains_key(&client_id);
            let subscriptions = store
                .subscriptions
                .get(&client_id)
                .map(|s| {
                    s.iter()
                        .map(|(f, (q, _))| Subscription {
                            filter: f.clone(),
                            qos: *q,
                            options: Default::default(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let (undelivered, next) = undelivered(&store, &client_id, None, None);
            let outbound_qos2 = store
                .qos2_out
                .iter()
                .filter(|((c, _), _)| *c == client_id)
                .filter_map(|((_, pkid), (id, released))| {
                    let message = store.messages.iter().find(|m| m.id == *id)?.clone();
                    Some(wharf_shared::OutboundQos2 {
                        pkid: *pkid,
                        message,
                        released: *released,
                    })
                })
                .collect();
            Reply::Session(wharf_shared::StoredSession {
                present,
                subscriptions,
                undelivered,
                next,
                outbound_qos2,
                generation: store.claim(),
            })
        }
        Request::Persist(messages) => {
            for m in messages {
                store_message(&mut store, m);
            }
            Reply::Persisted
        }
        Request::PersistQos2 { message, pkid } => {
            if !store.qos2.insert((message.client_id.clone(), pkid)) {
                return Reply::AlreadyStored;
            }
            store_message(&mut store, message);
            Reply::Persisted
        }
        Request::TrackQos2Out {
            client_id,
            pkid,
            message_id,
            released,
            ..
        } => {
            if released {
                store.delivered.insert((client_id.clone(), message_id));
            }
            store
                .qos2_out
                .insert((client_id, pkid), (message_id, released));
            Reply::Done
        }
        Request::ForgetQos2Out { client_id, pkid } => {
            store.qos2_out.remove(&(client_id, pkid));
            Reply::Done
        }
        Request::ReleaseQos2 { client_id, pkid } => {
            store.qos2.remove(&(client_id, pkid));
            Reply::Done
        }
        Request::Subscribe {
            client_id,
            subscriptions,
        } => {
            let now = now_ms();
            let subs = store.subscriptions.entry(client_id).or_default();
            for s in &subscriptions {
                let created = subs.get(&s.filter).map(|(_, c)| *c).unwrap_or(now);
                subs.insert(s.filter.clone(), (s.qos, created));
            }
            let messages = store
                .retained
                .values()
                .filter(|m| subscriptions.iter().any(|s| matches(&m.topic, &s.filter)))
                .cloned()
                .collect();
            Reply::Messages {
                messages,
                next: None,
            }
        }
        Request::Unsubscribe { client_id, filters } => {
            if let Some(subs) = store.subscriptions.get_mut(&client_id) {
                for f in filters {
                    subs.remove(&f);
                }
            }
            Reply::Done
        }
        Request::CatchUp {
            client_id,
            after,
            other_hosts_only,
        } => {
            let other = other_hosts_only.then_some(edge_host);
            let (messages, next) = undelivered(&store, &client_id, after, other);
            Reply::Messages { messages, next }
        }
    }
}
