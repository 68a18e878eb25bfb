//! rumqttc's MQTT 5.0 client driven from a task that forwards every incoming packet to the
//! test, like [`crate::client::Client`] for 3.1.1.

use crate::PATIENCE;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnectReturnCode, Filter, Packet, Publish, PublishProperties, SubscribeProperties,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;

pub struct Client5 {
    pub client: AsyncClient,
    pub connack: ConnAck,
    incoming: mpsc::UnboundedReceiver<Packet>,
    /// Packets a wait skipped over, for the next one (a PUBLISH to oneself can come before
    /// the PUBACK a publish waits for).
    skipped: std::collections::VecDeque<Packet>,
    _task: tokio::task::JoinHandle<()>,
}

/// Options for a client that starts clean and keeps its session for `expiry` seconds.
pub fn options(addr: SocketAddr, id: &str, clean_start: bool, expiry: Option<u32>) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_clean_start(clean_start);
    o.set_session_expiry_interval(expiry);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

impl Client5 {
    pub async fn connect(options: MqttOptions) -> Client5 {
        let id = options.client_id();
        Self::try_connect(options)
            .await
            .unwrap_or_else(|e| panic!("{id} could not connect: {e}"))
    }

    pub async fn try_connect(options: MqttOptions) -> Result<Client5, String> {
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let connack = tokio::time::timeout(PATIENCE, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack)))
                        if ack.code == ConnectReturnCode::Success =>
                    {
                        return Ok(ack);
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
                    Err(_) => return,
                }
            }
        });
        Ok(Client5 {
            client,
            connack,
            incoming,
            skipped: Default::default(),
            _task: task,
        })
    }

    pub fn session_present(&self) -> bool {
        self.connack.session_present
    }

    /// Subscribes and returns the SUBACK's reason codes.
    pub async fn subscribe(
        &mut self,
        filters: Vec<Filter>,
        properties: Option<SubscribeProperties>,
    ) -> Vec<rumqttc::v5::mqttbytes::v5::SubscribeReasonCode> {
        match properties {
            Some(p) => self.client.subscribe_many_with_properties(filters, p).await,
            None => self.client.subscribe_many(filters).await,
        }
        .expect("subscribe queued");
        self.next_matching(|p| match p {
            Packet::SubAck(a) => Some(a.return_codes.clone()),
            _ => None,
        })
        .await
        .expect("SUBACK")
    }

    pub async fn subscribe_one(&mut self, filter: &str, qos: QoS) {
        self.subscribe(vec![Filter::new(filter, qos)], None).await;
    }

    /// Publishes and waits for its PUBACK (QoS 1) or PUBCOMP (QoS 2).
    pub async fn publish_acked(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: impl Into<Vec<u8>>,
        properties: PublishProperties,
    ) {
        self.client
            .publish_with_properties(topic, qos, retain, payload.into(), properties)
            .await
            .expect("publish queued");
        if qos == QoS::AtMostOnce {
            return;
        }
        let done = self
            .next_matching(|p| match (qos, p) {
                (QoS::AtLeastOnce, Packet::PubAck(_)) | (QoS::ExactlyOnce, Packet::PubComp(_)) => {
                    Some(())
                }
                _ => None,
            })
            .await;
        assert!(done.is_some(), "publish to {topic} not acknowledged");
    }

    pub async fn next_matching<T>(&mut self, mut f: impl FnMut(&Packet) -> Option<T>) -> Option<T> {
        self.next_matching_within(PATIENCE, &mut f).await
    }

    pub async fn next_matching_within<T>(
        &mut self,
        patience: Duration,
        mut f: impl FnMut(&Packet) -> Option<T>,
    ) -> Option<T> {
        if let Some(at) = self.skipped.iter().position(|p| f(p).is_some()) {
            let p = self.skipped.remove(at).expect("found");
            return f(&p);
        }
        let skipped = &mut self.skipped;
        let incoming = &mut self.incoming;
        tokio::time::timeout(patience, async {
            while let Some(p) = incoming.recv().await {
                if let Some(t) = f(&p) {
                    return Some(t);
                }
                skipped.push_back(p);
            }
            None
        })
        .await
        .ok()
        .flatten()
    }

    pub async fn publish_within(&mut self, patience: Duration) -> Option<Publish> {
        self.next_matching_within(patience, |p| match p {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    pub async fn next_publish(&mut self) -> Publish {
        self.publish_within(PATIENCE)
            .await
            .expect("a PUBLISH in time")
    }

    pub async fn assert_no_publish(&mut self, quiet: Duration) {
        let extra = self.publish_within(quiet).await;
        assert!(extra.is_none(), "unexpected message: {extra:?}");
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        // Let the DISCONNECT reach the broker before the socket goes.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
