//! rumqttc driven from a task that forwards every incoming packet to the test.

use crate::PATIENCE;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, LastWill, MqttOptions, Packet, Publish, QoS};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;

pub struct Client {
    pub client: AsyncClient,
    pub session_present: bool,
    incoming: mpsc::UnboundedReceiver<Packet>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Options {
    /// TLS client configuration; plain TCP without it.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub clean: bool,
    pub keep_alive: Duration,
    pub will: Option<LastWill>,
    pub inflight: u16,
    /// User name and password.
    pub credentials: Option<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tls: None,
            clean: true,
            keep_alive: Duration::from_secs(30),
            will: None,
            inflight: 100,
            credentials: None,
        }
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr, id: &str, clean: bool) -> Client {
        Self::connect_with(
            addr,
            id,
            Options {
                clean,
                ..Options::default()
            },
        )
        .await
    }

    pub async fn connect_with(addr: SocketAddr, id: &str, o: Options) -> Client {
        Self::try_connect_with(addr, id, o)
            .await
            .unwrap_or_else(|e| panic!("{id} could not connect: {e}"))
    }

    /// Connects, or says why not (a refused CONNACK, a failed TLS handshake).
    pub async fn try_connect_with(
        addr: SocketAddr,
        id: &str,
        o: Options,
    ) -> Result<Client, String> {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_clean_session(o.clean);
        options.set_keep_alive(o.keep_alive);
        options.set_inflight(o.inflight);
        if let Some(will) = o.will {
            options.set_last_will(will);
        }
        if let Some((user, password)) = o.credentials {
            options.set_credentials(user, password);
        }
        if let Some(tls) = o.tls {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let session_present = tokio::time::timeout(PATIENCE, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack)))
                        if ack.code == ConnectReturnCode::Success =>
                    {
                        return Ok(ack.session_present);
                    }
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        return Err(format!("refused: {:?}", ack.code))
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await
        .map_err(|_| "no CONNACK in time".to_string())??;
        let (tx, incoming) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    // The test sees the end as a closed channel.
                    Err(_) => return,
                }
            }
        });
        Ok(Client {
            client,
            session_present,
            incoming,
            task,
        })
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.subscribe_granted(filter, qos).await;
    }

    /// Subscribes and says whether the SUBACK granted it.
    pub async fn subscribe_granted(&mut self, filter: &str, qos: QoS) -> bool {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("subscribe queued");
        let codes = self
            .next_matching(|p| match p {
                Packet::SubAck(s) => Some(s.return_codes.clone()),
                _ => None,
            })
            .await
            .expect("SUBACK");
        codes
            .iter()
            .all(|c| *c != rumqttc::SubscribeReasonCode::Failure)
    }

    pub async fn publish(&self, topic: &str, qos: QoS, retain: bool, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, qos, retain, payload.into())
            .await
            .expect("publish queued");
    }

    /// Publishes and waits for the PUBACK (QoS 1) or PUBCOMP (QoS 2). It takes the next
    /// acknowledgement as this one's, so earlier publishes must have been acknowledged.
    pub async fn publish_acked(&mut self, topic: &str, qos: QoS, payload: impl Into<Vec<u8>>) {
        self.publish_acked_retain(topic, qos, false, payload).await
    }

    pub async fn publish_acked_retain(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: impl Into<Vec<u8>>,
    ) {
        self.publish(topic, qos, retain, payload).await;
        let done = self
            .next_matching(|p| match (qos, p) {
                (QoS::AtLeastOnce, Packet::PubAck(_)) => Some(()),
                (QoS::ExactlyOnce, Packet::PubComp(_)) => Some(()),
                _ => None,
            })
            .await;
        assert!(done.is_some(), "publish to {topic} not acknowledged");
    }

    /// Publishes every payload without waiting, then waits for all acknowledgements.
    pub async fn publish_many_acked(
        &mut self,
        topic: &str,
        qos: QoS,
        payloads: impl IntoIterator<Item = String>,
    ) {
        let mut n = 0;
        for payload in payloads {
            self.publish(topic, qos, false, payload).await;
            n += 1;
        }
        for i in 0..n {
            let done = self
                .next_matching(|p| match (qos, p) {
                    (QoS::AtLeastOnce, Packet::PubAck(_))
                    | (QoS::ExactlyOnce, Packet::PubComp(_)) => Some(()),
                    _ => None,
                })
                .await;
            assert!(
                done.is_some(),
                "only {i} of {n} publishes to {topic} acknowledged"
            );
        }
    }

    /// The next packet for which `f` returns something, skipping others; `None` on timeout
    /// or a closed connection.
    pub async fn next_matching<T>(&mut self, mut f: impl FnMut(&Packet) -> Option<T>) -> Option<T> {
        self.next_matching_within(PATIENCE, &mut f).await
    }

    pub async fn next_matching_within<T>(
        &mut self,
        patience: Duration,
        mut f: impl FnMut(&Packet) -> Option<T>,
    ) -> Option<T> {
        tokio::time::timeout(patience, async {
            while let Some(p) = self.incoming.recv().await {
                if let Some(t) = f(&p) {
                    return Some(t);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }

    pub async fn next_publish(&mut self) -> Option<Publish> {
        self.next_matching(|p| match p {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    /// Collects `n` publishes, failing the test if they do not come.
    pub async fn publishes(&mut self, n: usize) -> Vec<Publish> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            match self.next_publish().await {
                Some(p) => out.push(p),
                None => panic!("only {i} of {n} messages arrived"),
            }
        }
        out
    }

    /// The next PUBLISH, if one arrives within `quiet`.
    pub async fn publish_within(&mut self, quiet: Duration) -> Option<Publish> {
        self.next_matching_within(quiet, |p| match p {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    /// Asserts that no PUBLISH arrives within `quiet` (used after all expected ones).
    pub async fn assert_no_publish(&mut self, quiet: Duration) {
        let extra = self.publish_within(quiet).await;
        assert!(extra.is_none(), "unexpected message: {extra:?}");
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(PATIENCE, self.task).await;
    }

    /// Disconnects and returns the PUBLISHes that arrived before and were not read yet
    /// (rumqttc acknowledges a QoS 1 PUBLISH as it reads it: those count as received).
    pub async fn disconnect_draining(mut self) -> Vec<Publish> {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(PATIENCE, self.task).await;
        let mut got = Vec::new();
        while let Ok(packet) = self.incoming.try_recv() {
            if let Packet::Publish(p) = packet {
                got.push(p);
            }
        }
        got
    }

    /// Whether the connection has ended (the broker closed it, or it failed).
    pub fn is_closed(&self) -> bool {
        self.incoming.is_closed()
    }

    /// Drops the connection without DISCONNECT.
    pub fn kill(self) {
        self.task.abort();
    }
}

pub fn payloads(publishes: &[Publish]) -> Vec<String> {
    publishes
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}
