//! Interest routing between hosts that share the store: a message is addressed to the hosts
//! whose sessions want it, and each host follows only what is addressed to it.
//!
//! - This host's **routes** are the union of the filters its edges' connected sessions
//!   subscribe to ([`RouteBook`]): the edges report them (`Notice::Routes`), and a
//!   `Subscribe` or a resuming `Connect` writes its filters before it is answered, so a route
//!   is in the store before its SUBACK or CONNACK. A filter no edge reports any more is
//!   removed after [`GRACE`] (a tombstone, purged later), never at once: a session that moves
//!   or re-subscribes keeps its route, and messages already addressed stay deliverable.
//! - Every worker reads all hosts' routes and heartbeats every [`READ_EVERY`] into a
//!   [`RouteView`] (a trie of filters to hosts), and the store stamps each message it writes
//!   with the live hosts whose routes match (`hosts`). A worker whose last read began more
//!   than [`ROUTE_FRESH_MS`] ago addresses messages to every host (`"*"`); a host whose
//!   heartbeat is older than [`HOST_DEAD_MS`] is addressed no more (its routes go with it
//!   after [`FORGET_DEAD_MS`]).
//! - What routing cannot see is covered from the edge: a session asks the store once, after
//!   [`wharf_shared::SETTLE_MS`], for other hosts' messages it lacks since it subscribed,
//!   resumed, or its host regained the store (leases stop while this host's heartbeat is
//!   stale, so a host the others took for dead always has such a gap).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wharf_shared::{now_ms, LATE_MS, ROUTE_FRESH_MS};

/// How often routes and heartbeats are read and this host's changes written.
pub const READ_EVERY: Duration = Duration::from_millis(200);
/// How often this host's heartbeat is written.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A host whose heartbeat is older is not addressed: its sessions cannot be served (its
/// leases stopped long before), and what they are owed waits in the store.
pub const HOST_DEAD_MS: i64 = 10_000;
/// Leases are sent only while this host's heartbeat was written within this (half of
/// [`HOST_DEAD_MS`]), so that before others stop addressing this host its sessions wait.
pub const HEARTBEAT_FOR_LEASE_MS: u64 = (HOST_DEAD_MS / 2) as u64;
/// How long a route no edge reports stays before it is removed.
pub const GRACE: Duration = Duration::from_secs(10);
/// Removed routes stay as tombstones this long, for readers of changes to see them.
const TOMBSTONE_MS: i64 = 60_000;
/// A reader that has not read for this long reads every route again (tombstones it missed
/// may have been purged).
const RELOAD_AFTER: Duration = Duration::from_secs(30);
/// A host dead this long loses its routes and heartbeat document.
const FORGET_DEAD_MS: i64 = 3_600_000;

/// The address for every host, used while this host's view of the routes is stale.
pub const EVERY_HOST: &str = "*";

/// One route of a host, as read from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteDoc {
    pub host: String,
    pub filter: String,
    pub removed: bool,
}

/// The store side of routing (MongoDB's `route` and `host` collections).
pub trait RouteStore: Send + Sync + 'static {
    /// Writes (or revives) `filters` as `host`'s routes.
    fn add_routes(
        &self,
        host: &str,
        filters: &[String],
    ) -> impl std::future::Future<Output = Result<(), crate::store::StoreError>> + Send;
    /// Marks `filters` of `host` removed (tombstones).
    fn remove_routes(
        &self,
        host: &str,
        filters: &[String],
    ) -> impl std::future::Future<Output = Result<(), crate::store::StoreError>> + Send;
    /// Routes changed at or after `since_ms` (all live ones with `None`), tombstones included.
    fn routes_since(
        &self,
        since_ms: Option<i64>,
    ) -> impl std::future::Future<Output = Result<Vec<RouteDoc>, crate::store::StoreError>> + Send;
    /// Writes `host`'s heartbeat at `now_ms`.
    fn heartbeat(
        &self,
        host: &str,
        now_ms: i64,
    ) -> impl std::future::Future<Output = Result<(), crate::store::StoreError>> + Send;
    /// Every host's last heartbeat.
    fn heartbeats(
        &self,
    ) -> impl std::future::Future<Output = Result<HashMap<String, i64>, crate::store::StoreError>> + Send;
    /// Purges `host`'s tombstones older than `before_ms`, and the routes and heartbeats of
    /// `dead` hosts.
    fn purge_routes(
        &self,
        host: &str,
        before_ms: i64,
        dead: &[String],
    ) -> impl std::future::Future<Output = Result<(), crate::store::StoreError>> + Send;
}

/// Filters to the hosts that route them, matched level by level (`+`, `#` and `$` topics as
/// MQTT matches them).
#[derive(Default, Debug)]
pub struct RouteTrie {
    root: Node,
}

#[derive(Default, Debug)]
struct Node {
    children: HashMap<Box<str>, Node>,
    /// Hosts whose filter ends here.
    hosts: HashSet<Arc<str>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.hosts.is_empty()
    }
}

impl RouteTrie {
    pub fn insert(&mut self, filter: &str, host: &Arc<str>) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        node.hosts.insert(host.clone());
    }

    pub fn remove(&mut self, filter: &str, host: &str) {
        fn remove(node: &mut Node, levels: &[&str], host: &str) {
            match levels {
                [] => {
                    node.hosts.remove(host);
                }
                [first, rest @ ..] => {
                    if let Some(child) = node.children.get_mut(*first) {
                        remove(child, rest, host);
                        if child.is_empty() {
                            node.children.remove(*first);
                        }
                    }
                }
            }
        }
        let levels: Vec<&str> = filter.split('/').collect();
        remove(&mut self.root, &levels, host);
    }

    /// Adds to `out` the hosts with a filter that matches `topic`.
    pub fn matching<'a>(&'a self, topic: &str, out: &mut HashSet<&'a Arc<str>>) {
        fn walk<'a>(node: &'a Node, levels: &[&str], first: bool, out: &mut HashSet<&'a Arc<str>>) {
            // `#` and `+` do not match a first level that starts with `$` (MQTT 4.7.2).
            let wild = !(first && levels.first().is_some_and(|l| l.starts_with('$')));
            if wild {
                if let Some(multi) = node.children.get("#") {
                    // `a/#` matches `a` too.
                    out.extend(multi.hosts.iter());
                }
            }
            let Some((level, rest)) = levels.split_first() else {
                out.extend(node.hosts.iter());
                return;
            };
            if let Some(child) = node.children.get(*level) {
                walk(child, rest, false, out);
            }
            if wild {
                if let Some(child) = node.children.get("+") {
                    walk(child, rest, false, out);
                }
            }
        }
        let levels: Vec<&str> = topic.split('/').collect();
        walk(&self.root, &levels, true, out);
    }
}

/// Every host's routes as last read, for addressing messages.
pub struct RouteView {
    inner: RwLock<ViewInner>,
}

#[derive(Default)]
struct ViewInner {
    trie: RouteTrie,
    /// Each host's routes (to apply changes and tombstones once).
    routes: HashMap<Arc<str>, HashSet<String>>,
    /// How many routes `routes` holds.
    count: usize,
    /// Each host's last heartbeat (Unix ms, its clock).
    alive: HashMap<Arc<str>, i64>,
    /// When the read that produced this view began (`None`: never read).
    read_at: Option<Instant>,
}

impl Default for RouteView {
    fn default() -> Self {
        RouteView {
            inner: RwLock::new(ViewInner::default()),
        }
    }
}

impl RouteView {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, ViewInner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ViewInner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The hosts other than `own` that want a message on `topic`, sorted; `["*"]` when this
    /// view is too old to say.
    pub fn address(&self, topic: &str, own: &str) -> Vec<String> {
        let inner = self.read();
        let fresh = inner
            .read_at
            .is_some_and(|t| t.elapsed() < Duration::from_millis(ROUTE_FRESH_MS as u64));
        if !fresh {
            return vec![EVERY_HOST.to_owned()];
        }
        let mut found = HashSet::new();
        inner.trie.matching(topic, &mut found);
        let alive_after = now_ms() - HOST_DEAD_MS;
        let mut hosts: Vec<String> = found
            .into_iter()
            .filter(|h| &***h != own && inner.alive.get(*h).is_some_and(|t| *t >= alive_after))
            .map(|h| h.to_string())
            .collect();
        hosts.sort_unstable();
        hosts
    }

    /// Applies routes read by a read that began at `started` (`whole`: they are all there
    /// is), and the heartbeats if they were read.
    fn apply(
        &self,
        started: Instant,
        docs: Vec<RouteDoc>,
        alive: Option<HashMap<String, i64>>,
        whole: bool,
    ) {
        let mut inner = self.write();
        let inner = &mut *inner;
        if whole {
            inner.trie = RouteTrie::default();
            inner.routes.clear();
            inner.count = 0;
        }
        for doc in docs {
            let host: Arc<str> = match inner.routes.get_key_value(doc.host.as_str()) {
                Some((h, _)) => h.clone(),
                None => doc.host.as_str().into(),
            };
            let filters = inner.routes.entry(host.clone()).or_default();
            if doc.removed {
                if filters.remove(&doc.filter) {
                    inner.trie.remove(&doc.filter, &host);
                    inner.count -= 1;
                }
            } else if filters.insert(doc.filter.clone()) {
                inner.trie.insert(&doc.filter, &host);
                inner.count += 1;
            }
        }
        inner.routes.retain(|_, f| !f.is_empty());
        if let Some(alive) = alive {
            inner.alive = alive.into_iter().map(|(h, t)| (h.into(), t)).collect();
        }
        inner.read_at = Some(started);
    }

    /// How many routes the view holds (all hosts).
    pub fn len(&self) -> usize {
        self.read().count
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// This host's routes: what its edges report, and what is written in the store. One writer
/// ([`write`]) makes every change, so that a route is never removed while a session waits for
/// it to be written.
pub struct RouteBook {
    host: String,
    /// Filters that stand for the topic names they match (see [`RouteBook::aggregating`]).
    aggregate: Vec<String>,
    inner: Mutex<BookInner>,
    /// Wakes the writer: a route waits to be written.
    wake: tokio::sync::Notify,
    /// Counts the writer's rounds, for `ensure` to wait on.
    rounds: tokio::sync::watch::Sender<u64>,
    /// When this host's heartbeat was last written (monotonic ms; 0: never).
    heartbeat_ok_ms: AtomicU64,
}

#[derive(Default)]
struct BookInner {
    /// Each edge connection's routes, with how many of the filters it reported make each
    /// (several, with aggregate filters).
    edges: HashMap<u64, HashMap<String, u32>>,
    /// Filters written as this host's routes, with the last time one was wanted.
    written: HashMap<String, Instant>,
    /// Filters wanted that are not written yet.
    pending: HashSet<String>,
}

/// How long a `Subscribe` or `Connect` waits for its routes to be written.
const ENSURE_TIMEOUT: Duration = Duration::from_secs(10);

impl RouteBook {
    pub fn new(host: String) -> Self {
        RouteBook {
            host,
            aggregate: Vec::new(),
            inner: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            rounds: tokio::sync::watch::Sender::new(0),
            heartbeat_ok_ms: AtomicU64::new(0),
        }
    }

    /// A subscription to a topic name (no wildcard) that one of `filters` matches is routed as
    /// that filter: a fleet whose devices each subscribe to `dev/<id>/cmd` makes one route per
    /// host (`dev/+/cmd`), not one per device, and every host with such a device is sent every
    /// command.
    pub fn aggregating(mut self, filters: Vec<String>) -> Self {
        self.aggregate = filters;
        self
    }

    /// The route a subscription's filter makes: a shared subscription's is the filter inside
    /// it; a topic name an aggregate filter matches makes that filter.
    fn route_of<'a>(&'a self, filter: &'a str) -> &'a str {
        let filter = route_of(filter);
        if filter.contains(['+', '#']) {
            return filter;
        }
        self.aggregate
            .iter()
            .find(|a| wharf_shared::topic::matches(filter, a))
            .map_or(filter, String::as_str)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BookInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once the routes `filters` need (a shared subscription's is the filter inside
    /// it) are in the store: a session's SUBACK or CONNACK waits for this.
    pub async fn ensure(
        &self,
        filters: impl IntoIterator<Item = &str>,
    ) -> Result<(), crate::store::StoreError> {
        let mut rounds = self.rounds.subscribe();
        let need: Vec<String> = {
            let now = Instant::now();
            let mut inner = self.lock();
            let mut need = Vec::new();
            for filter in filters.into_iter().map(|f| self.route_of(f)) {
                match inner.written.get_mut(filter) {
                    Some(wanted) => *wanted = now,
                    None if !need.iter().any(|f| f == filter) => {
                        inner.pending.insert(filter.to_owned());
                        need.push(filter.to_owned());
                    }
                    None => {}
                }
            }
            need
        };
        if need.is_empty() {
            return Ok(());
        }
        self.wake.notify_one();
        let written = async {
            loop {
                if rounds.changed().await.is_err() {
                    return false;
                }
                let inner = self.lock();
                if need.iter().all(|f| inner.written.contains_key(f)) {
                    return true;
                }
            }
        };
        match tokio::time::timeout(ENSURE_TIMEOUT, written).await {
            Ok(true) => Ok(()),
            _ => Err(crate::store::StoreError::Unavailable(
                "routes could not be written".into(),
            )),
        }
    }

    /// An edge's report of its filters.
    pub fn edge_routes(&self, edge: u64, added: Vec<String>, removed: Vec<String>, whole: bool) {
        let mut wake = false;
        {
            let mut inner = self.lock();
            let inner = &mut *inner;
            let set = inner.edges.entry(edge).or_default();
            if whole {
                set.clear();
            }
            for filter in &removed {
                let route = self.route_of(filter);
                if let Some(n) = set.get_mut(route) {
                    *n -= 1;
                    if *n == 0 {
                        set.remove(route);
                    }
                }
            }
            for filter in added {
                let filter = self.route_of(&filter).to_owned();
                if !inner.written.contains_key(&filter) {
                    wake |= inner.pending.insert(filter.clone());
                }
                *set.entry(filter).or_default() += 1;
            }
        }
        if wake {
            self.wake.notify_one();
        }
    }

    /// An edge connection ended: its routes go after the grace period unless it comes back.
    pub fn edge_gone(&self, edge: u64) {
        self.lock().edges.remove(&edge);
    }

    /// Whether this host's heartbeat is recent enough for its edges to serve sessions.
    pub fn heartbeat_holds(&self) -> bool {
        let ok = self.heartbeat_ok_ms.load(Ordering::Acquire);
        ok != 0 && wharf_shared::monotonic_ms().saturating_sub(ok) < HEARTBEAT_FOR_LEASE_MS
    }

    /// Routes to write (wanted, not written) and to remove (written, reported by no edge, not
    /// wanted for [`GRACE`]); those to remove are taken out of `written` at once, so that a
    /// session wanting one again waits for it to be written anew.
    fn due(&self, now: Instant) -> (Vec<String>, Vec<String>) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let add: Vec<String> = inner.pending.iter().cloned().collect();
        let mut remove = Vec::new();
        for (filter, wanted) in inner.written.iter_mut() {
            if inner.edges.values().any(|s| s.contains_key(filter)) {
                *wanted = now;
            } else if now.duration_since(*wanted) >= GRACE {
                remove.push(filter.clone());
            }
        }
        for filter in &remove {
            inner.written.remove(filter);
        }
        (add, remove)
    }

    fn written(&self, filters: Vec<String>) {
        let now = Instant::now();
        let mut inner = self.lock();
        for filter in filters {
            inner.pending.remove(&filter);
            inner.written.insert(filter, now);
        }
        metrics::gauge!("wharf_worker_routes").set(inner.written.len() as f64);
    }

    /// Takes over the routes the store holds for this host (from before a restart): they
    /// stay for the grace period, and go unless an edge reports them again.
    fn adopt(&self, filters: impl IntoIterator<Item = String>) {
        let now = Instant::now();
        let mut inner = self.lock();
        for filter in filters {
            inner.written.entry(filter).or_insert(now);
        }
    }
}

/// Writes this host's route changes as they come (batched: every filter waiting when a write
/// begins goes in it), until `shutdown`.
pub async fn write<S: RouteStore>(
    store: Arc<S>,
    book: Arc<RouteBook>,
    shutdown: CancellationToken,
) {
    let host = book.host.clone();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = book.wake.notified() => {}
            _ = tokio::time::sleep(READ_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
        let (add, remove) = book.due(Instant::now());
        let mut result = Ok(());
        if !remove.is_empty() {
            result = store.remove_routes(&host, &remove).await;
            match &result {
                Ok(()) => tracing::debug!(
                    routes = remove.len(),
                    "routes no session here wants removed"
                ),
                // Tried again next round (they were taken out of `written`, and a session
                // that wants one meanwhile waits for it to be written again).
                Err(_) => {
                    let mut inner = book.lock();
                    let long_ago = Instant::now()
                        .checked_sub(GRACE)
                        .unwrap_or_else(Instant::now);
                    for filter in remove {
                        inner.written.entry(filter).or_insert(long_ago);
                    }
                }
            }
        }
        if result.is_ok() && !add.is_empty() {
            result = store.add_routes(&host, &add).await;
            if result.is_ok() {
                book.written(add);
            }
        }
        match result {
            Ok(()) if failing => {
                tracing::info!("writing routes again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot write routes");
                    failing = true;
                }
                tokio::time::sleep(READ_EVERY).await;
            }
        }
        book.rounds.send_modify(|n| *n += 1);
    }
}

/// The filter a subscription routes by: a shared subscription's inner filter.
fn route_of(filter: &str) -> &str {
    wharf_shared::topic::shared(filter).map_or(filter, |(_, inner)| inner)
}

/// Keeps this host's heartbeat in the store and the view of every host's routes current,
/// until `shutdown`.
pub async fn follow<S: RouteStore>(
    store: Arc<S>,
    book: Arc<RouteBook>,
    view: Arc<RouteView>,
    shutdown: CancellationToken,
) {
    let host = book.host.clone();
    let mut every = tokio::time::interval(READ_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_read: Option<(Instant, i64)> = None;
    let mut last_heartbeat: Option<Instant> = None;
    let mut last_purge = Instant::now();
    let mut adopted = false;
    let mut failing = false;
    let mut rounds = 0u32;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let round = async {
            if last_heartbeat.is_none_or(|t| t.elapsed() >= HEARTBEAT_EVERY) {
                let at = wharf_shared::monotonic_ms();
                store.heartbeat(&host, now_ms()).await?;
                book.heartbeat_ok_ms.store(at, Ordering::Release);
                last_heartbeat = Some(Instant::now());
            }
            let (started, started_ms) = (Instant::now(), now_ms());
            let whole = last_read.is_none_or(|(t, _)| t.elapsed() >= RELOAD_AFTER);
            let since = (!whole).then(|| last_read.map_or(0, |(_, ms)| ms) - LATE_MS);
            let docs = store.routes_since(since).await?;
            if !adopted {
                book.adopt(
                    docs.iter()
                        .filter(|d| d.host == host && !d.removed)
                        .map(|d| d.filter.clone()),
                );
                adopted = true;
            }
            // Heartbeats change once a second and matter at ten: read every fifth round.
            let alive = match rounds % 5 {
                0 => Some(store.heartbeats().await?),
                _ => None,
            };
            rounds = rounds.wrapping_add(1);
            if let Some(alive) = alive
                .as_ref()
                .filter(|_| last_purge.elapsed() >= RELOAD_AFTER)
            {
                let dead: Vec<String> = alive
                    .iter()
                    .filter(|(h, t)| **h != host && **t < started_ms - FORGET_DEAD_MS)
                    .map(|(h, _)| h.clone())
                    .collect();
                store
                    .purge_routes(&host, started_ms - TOMBSTONE_MS, &dead)
                    .await?;
                last_purge = Instant::now();
            }
            view.apply(started, docs, alive, whole);
            metrics::gauge!("wharf_worker_route_view").set(view.len() as f64);
            last_read = Some((started, started_ms));
            Ok::<(), crate::store::StoreError>(())
        };
        match round.await {
            Ok(()) if failing => {
                tracing::info!("reading and writing routes again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot read or write routes: messages are addressed to every host until this recovers");
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(trie: &RouteTrie, topic: &str) -> Vec<String> {
        let mut out = HashSet::new();
        trie.matching(topic, &mut out);
        let mut v: Vec<String> = out.into_iter().map(|h| h.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn the_trie_matches_as_mqtt_does() {
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        let mut trie = RouteTrie::default();
        trie.insert("fleet/#", &a);
        trie.insert("dev/+/cmd", &b);
        trie.insert("dev/7/cmd", &c);
        trie.insert("#", &c);
        assert_eq!(hosts(&trie, "fleet"), ["a", "c"]);
        assert_eq!(hosts(&trie, "fleet/x/y"), ["a", "c"]);
        assert_eq!(hosts(&trie, "dev/7/cmd"), ["b", "c"]);
        assert_eq!(hosts(&trie, "dev/7/cmd/x"), ["c"]);
        assert_eq!(hosts(&trie, "$SYS/x"), Vec::<String>::new());
        trie.remove("#", "c");
        assert_eq!(hosts(&trie, "dev/8/cmd"), ["b"]);
        assert_eq!(hosts(&trie, "dev/7/cmd"), ["b", "c"]);
        trie.remove("dev/7/cmd", "c");
        trie.remove("dev/+/cmd", "b");
        trie.remove("fleet/#", "a");
        assert!(trie.root.is_empty(), "removing every route leaves no node");
    }

    #[test]
    fn a_view_addresses_live_hosts_and_everyone_when_stale() {
        let view = RouteView::default();
        assert_eq!(view.address("t", "a"), ["*"], "never read: every host");
        let route = |host: &str, filter: &str, removed| RouteDoc {
            host: host.into(),
            filter: filter.into(),
            removed,
        };
        let now = now_ms();
        let alive: HashMap<String, i64> =
            [("a", now), ("b", now), ("dead", now - HOST_DEAD_MS - 1)]
                .into_iter()
                .map(|(h, t)| (h.to_owned(), t))
                .collect();
        view.apply(
            Instant::now(),
            vec![
                route("a", "t", false),
                route("b", "t", false),
                route("dead", "t", false),
            ],
            Some(alive.clone()),
            true,
        );
        assert_eq!(view.address("t", "a"), ["b"], "not itself, not a dead host");
        assert!(view.address("u", "a").is_empty());
        view.apply(Instant::now(), vec![route("b", "t", true)], None, false);
        assert!(
            view.address("t", "a").is_empty(),
            "a tombstone removes the route"
        );
        view.apply(
            Instant::now() - Duration::from_millis(ROUTE_FRESH_MS as u64 + 1),
            vec![],
            Some(alive),
            false,
        );
        assert_eq!(
            view.address("t", "a"),
            ["*"],
            "an old reading addresses every host"
        );
    }

    #[test]
    fn aggregate_filters_stand_for_the_topic_names_they_match() {
        let book = RouteBook::new("h".into()).aggregating(vec!["dev/+/cmd".into()]);
        assert_eq!(book.route_of("dev/7/cmd"), "dev/+/cmd");
        assert_eq!(book.route_of("$share/g/dev/7/cmd"), "dev/+/cmd");
        assert_eq!(
            book.route_of("dev/7/#"),
            "dev/7/#",
            "a wildcard filter stays itself"
        );
        assert_eq!(book.route_of("dev/7/cmd/x"), "dev/7/cmd/x");
        book.edge_routes(
            1,
            vec!["dev/1/cmd".into(), "dev/2/cmd".into()],
            vec![],
            true,
        );
        let (add, _) = book.due(Instant::now());
        assert_eq!(
            add,
            ["dev/+/cmd"],
            "one route for the fleet's command topics"
        );
        book.written(add);
        book.edge_routes(1, vec![], vec!["dev/1/cmd".into()], false);
        let (_, remove) = book.due(Instant::now() + GRACE * 2);
        assert!(remove.is_empty(), "dev/2/cmd still makes it");
        book.edge_routes(1, vec![], vec!["dev/2/cmd".into()], false);
        let (_, remove) = book.due(Instant::now() + GRACE * 4);
        assert_eq!(remove, ["dev/+/cmd"]);
    }

    #[test]
    fn the_book_removes_a_route_only_after_the_grace_period() {
        let book = RouteBook::new("h".into());
        book.edge_routes(1, vec!["a/#".into(), "$share/g/b".into()], vec![], true);
        let (add, remove) = book.due(Instant::now());
        let mut add = add;
        add.sort();
        assert_eq!(
            add,
            ["a/#", "b"],
            "a shared subscription routes by its filter"
        );
        assert!(remove.is_empty());
        book.written(add);
        book.edge_routes(1, vec![], vec!["a/#".into()], false);
        let (_, remove) = book.due(Instant::now());
        assert!(remove.is_empty(), "within the grace period");
        let (_, remove) = book.due(Instant::now() + GRACE);
        assert_eq!(remove, ["a/#"]);
        let (_, remove) = book.due(Instant::now() + GRACE);
        assert!(remove.is_empty(), "taken for removal once");
        book.edge_gone(1);
        let (_, remove) = book.due(Instant::now());
        assert!(
            remove.is_empty(),
            "an edge gone: its routes wait for the grace period"
        );
        let (_, remove) = book.due(Instant::now() + GRACE * 2);
        assert_eq!(remove, ["b"], "then go");
    }
}
