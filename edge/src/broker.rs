//! State shared by every connection of one edge.

use crate::config::EdgeConfig;
use crate::ids;
use crate::link::{Link, Policy};
use crate::registry::Registry;
use crate::router::Router;
use crate::transit::InTransit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use wharf_shared::{Message, Qos, Reply, Request};

pub struct Broker {
    pub config: EdgeConfig,
    pub router: Router,
    pub registry: Registry,
    pub link: Link,
    pub metrics: HotMetrics,
    /// QoS 1/2 messages made and not yet routed (see [`InTransit`]).
    pub in_transit: Arc<InTransit>,
    pub auth: Arc<crate::auth::Auth>,
    pub lease: crate::lease::Lease,
    /// Turns for persistent sessions' fetches from the store, taken in the order the CONNECTs
    /// came (tokio's semaphore is fair): a reconnect storm queues here instead of in the
    /// link, so that a CONNECT's timeout runs only once its fetch is under way.
    pub session_fetches: tokio::sync::Semaphore,
    /// When a session fetch last completed ([`crate::ids::monotonic_ms`]): a queue of waiting
    /// fetches gives up only once none has for a while.
    pub session_fetch_done_ms: AtomicU64,
    /// The configured bridges, with their live state.
    pub bridges: Vec<Arc<crate::bridge::state::Bridge>>,
    next_connection_id: AtomicU64,
}

/// Persistent sessions fetched from the store at once (about four per lane of the worker).
pub const SESSION_FETCHES_AT_ONCE: usize = 32;

/// Handles of the metrics recorded for every message or socket operation, registered once:
/// the macros look their key up in the recorder on every call.
pub struct HotMetrics {
    pub bytes_sent: metrics::Counter,
    pub bytes_received: metrics::Counter,
    received: [metrics::Counter; 3],
    sent: [metrics::Counter; 3],
    pub persist_seconds: metrics::Histogram,
    /// Messages received and sent since start, for the cluster view's rates (the exporter's
    /// counters cannot be read back, and there may be no exporter).
    pub received_total: std::sync::atomic::AtomicU64,
    pub sent_total: std::sync::atomic::AtomicU64,
}

impl HotMetrics {
    /// Registers with the recorder installed now (install it first).
    fn register() -> Self {
        let qos = [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce];
        HotMetrics {
            bytes_sent: metrics::counter!("wharf_edge_bytes_sent_total"),
            bytes_received: metrics::counter!("wharf_edge_bytes_received_total"),
            received: qos.map(
                |q| metrics::counter!("wharf_edge_messages_received_total", "qos" => qos_label(q)),
            ),
            sent: qos.map(
                |q| metrics::counter!("wharf_edge_messages_sent_total", "qos" => qos_label(q)),
            ),
            persist_seconds: metrics::histogram!("wharf_edge_persist_seconds"),
            received_total: Default::default(),
            sent_total: Default::default(),
        }
    }

    /// Counts a message received from a client.
    pub fn received(&self, qos: Qos) {
        self.received[qos.as_u8() as usize].increment(1);
        self.received_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a message sent to a client.
    pub fn sent(&self, qos: Qos) {
        self.sent[qos.as_u8() as usize].increment(1);
        self.sent_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Broker {
    pub fn new(config: EdgeConfig, link: Link, auth: Arc<crate::auth::Auth>) -> Self {
        let bridges = config
            .bridges
            .iter()
            .map(|b| Arc::new(crate::bridge::state::Bridge::new(b.clone())))
            .collect();
        Broker {
            auth,
            config,
            bridges,
            router: Router::default(),
            registry: Registry::default(),
            link,
            metrics: HotMetrics::register(),
            in_transit: Arc::default(),
            lease: Default::default(),
            session_fetches: tokio::sync::Semaphore::new(SESSION_FETCHES_AT_ONCE),
            session_fetch_done_ms: AtomicU64::new(crate::ids::monotonic_ms()),
            next_connection_id: AtomicU64::new(1),
        }
    }

    pub fn connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A message as this edge stores it, with a fresh id.
    pub fn message(
        &self,
        client_id: &str,
        topic: String,
        payload: &[u8],
        qos: Qos,
        retain: bool,
    ) -> Message {
        let (created_ms, id) = ids::stamp();
        Message {
            id,
            topic,
            payload: payload.to_vec(),
            qos,
            retain,
            client_id: client_id.to_owned(),
            host: self.config.host.clone(),
            created_ms,
            properties: None,
        }
    }

    /// The properties a message is stored and forwarded with: with `--publisher-identity`,
    /// the publisher's own User Properties under the identity keys removed (they cannot be
    /// forged) and its identity added: the client id, and the user name and the certificate
    /// identity where it has them. Unchanged without the setting.
    pub fn stamp_identity(
        &self,
        properties: Option<Box<wharf_shared::Properties>>,
        client_id: &str,
        principal: Option<&crate::auth::Principal>,
    ) -> Option<Box<wharf_shared::Properties>> {
        let Some(keys) = &self.config.publisher_identity else {
            return properties;
        };
        let mut props = properties.unwrap_or_default();
        let before = props.user_properties.len();
        props.user_properties.retain(|(key, _)| !keys.contains(key));
        let forged = before - props.user_properties.len();
        if forged > 0 {
            metrics::counter!("wharf_edge_identity_properties_removed_total")
                .increment(forged as u64);
            tracing::debug!(
                client_id,
                forged,
                "the publisher's own identity properties removed"
            );
        }
        props
            .user_properties
            .push((keys.client_id.clone(), client_id.to_owned()));
        if let Some(user) = principal.and_then(|p| p.username.as_deref()) {
            props
                .user_properties
                .push((keys.username.clone(), user.to_owned()));
        }
        if let Some(identity) = principal.and_then(|p| p.identity.as_deref()) {
            props
                .user_properties
                .push((keys.certificate.clone(), identity.to_owned()));
        }
        Some(props)
    }

    /// Offers a stored (or QoS 0) message to local subscribers and counts the outcome.
    pub fn route(&self, message: &Arc<Message>) {
        self.count(self.router.route(message));
    }

    /// Counts what became of routed messages.
    pub fn count(&self, offer: crate::router::Offer) {
        if offer.dropped > 0 {
            metrics::counter!("wharf_edge_qos0_dropped_total").increment(offer.dropped as u64);
        }
        if offer.deferred > 0 {
            metrics::counter!("wharf_edge_deferred_to_store_total")
                .increment(offer.deferred as u64);
        }
    }

    /// Publishes a will (or any message not tied to a live connection): persist, then route.
    pub async fn publish_detached(self: Arc<Self>, message: Message) {
        if let Err(why) = self.publish(message).await {
            tracing::warn!("{why}");
        }
    }

    /// Publishes a message not tied to a live connection (a will, the admin API's): QoS 1/2
    /// is routed once the store has it, QoS 0 at once.
    pub async fn publish(self: Arc<Self>, message: Message) -> Result<(), String> {
        let message = Arc::new(message);
        let _in_transit =
            (message.qos != Qos::AtMostOnce).then(|| self.in_transit.enter(message.created_ms));
        if message.qos == Qos::AtMostOnce {
            self.link.notify_store(std::slice::from_ref(&message)).await;
            self.route(&message);
            return Ok(());
        }
        let result = match self
            .link
            .request(Request::Persist(vec![(*message).clone()]), Policy::Hold)
            .await
        {
            Ok(rx) => rx.await.unwrap_or(Err(crate::link::LinkError::Closed)),
            Err(e) => Err(e),
        };
        match result {
            Ok(Reply::Persisted) => {
                self.route(&message);
                Ok(())
            }
            other => Err(format!(
                "message on {} not persisted: {other:?}",
                message.topic
            )),
        }
    }
}

/// A QoS as a metric label.
pub fn qos_label(qos: Qos) -> &'static str {
    match qos {
        Qos::AtMostOnce => "0",
        Qos::AtLeastOnce => "1",
        Qos::ExactlyOnce => "2",
    }
}
