//! One face for rumqttc's MQTT 3.1.1 and 5.0 clients, so that every load scenario runs in
//! either version (`--mqtt 5`): the same publishers and subscribers, the same measurements.

use bytes::Bytes;
use std::time::Duration;

pub type QoS = rumqttc::QoS;

fn qos5(q: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// What a client needs to connect.
#[derive(Clone, Debug)]
pub struct Options {
    pub version: u8,
    pub id: String,
    pub host: String,
    pub port: u16,
    /// Clean session (3.1.1); clean start and no session expiry (5.0). Otherwise the session
    /// is kept (5.0: for a day).
    pub clean: bool,
    pub inflight: u16,
    pub nagle: bool,
}

#[derive(Clone)]
pub enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

pub enum EventLoop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// The incoming packets the load generator tells apart.
pub enum Incoming {
    ConnAck,
    SubAck,
    /// PUBACK or PUBCOMP: a publish completed.
    Completed,
    Publish(Bytes),
    Other,
}

pub async fn connect(o: &Options) -> anyhow::Result<(Client, EventLoop)> {
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(!o.nagle);
    // A broker may take long to answer a returning session's CONNECT (it reads its backlog).
    network.set_connection_timeout(60);
    let (client, mut eventloop) = if o.version == 5 {
        let mut m = rumqttc::v5::MqttOptions::new(o.id.clone(), o.host.clone(), o.port);
        m.set_keep_alive(Duration::from_secs(60));
        m.set_clean_start(o.clean);
        m.set_session_expiry_interval((!o.clean).then_some(86_400));
        m.set_outgoing_inflight_upper_limit(o.inflight);
        m.set_max_packet_size(Some(1 << 20));
        m.set_network_options(network);
        let (client, eventloop) = rumqttc::v5::AsyncClient::new(m, 10_000);
        (Client::V5(client), EventLoop::V5(Box::new(eventloop)))
    } else {
        let mut m = rumqttc::MqttOptions::new(o.id.clone(), o.host.clone(), o.port);
        m.set_keep_alive(Duration::from_secs(60));
        m.set_clean_session(o.clean);
        m.set_inflight(o.inflight);
        m.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(m, 10_000);
        eventloop.set_network_options(network);
        (Client::V4(client), EventLoop::V4(Box::new(eventloop)))
    };
    loop {
        if let Incoming::ConnAck = eventloop.poll().await? {
            return Ok((client, eventloop));
        }
    }
}

impl EventLoop {
    pub async fn poll(&mut self) -> anyhow::Result<Incoming> {
        Ok(match self {
            EventLoop::V4(e) => {
                use rumqttc::{Event, Packet};
                match e.poll().await? {
                    Event::Incoming(Packet::ConnAck(_)) => Incoming::ConnAck,
                    Event::Incoming(Packet::SubAck(_)) => Incoming::SubAck,
                    Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_)) => Incoming::Completed,
                    Event::Incoming(Packet::Publish(p)) => Incoming::Publish(p.payload),
                    _ => Incoming::Other,
                }
            }
            EventLoop::V5(e) => {
                use rumqttc::v5::mqttbytes::v5::Packet;
                use rumqttc::v5::Event;
                match e.poll().await? {
                    Event::Incoming(Packet::ConnAck(_)) => Incoming::ConnAck,
                    Event::Incoming(Packet::SubAck(_)) => Incoming::SubAck,
                    Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_)) => Incoming::Completed,
                    Event::Incoming(Packet::Publish(p)) => Incoming::Publish(p.payload),
                    _ => Incoming::Other,
                }
            }
        })
    }
}

impl Client {
    pub async fn publish(&self, topic: String, qos: QoS, payload: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Client::V4(c) => c.publish(topic, qos, false, payload).await?,
            Client::V5(c) => c.publish(topic, qos5(qos), false, payload).await?,
        }
        Ok(())
    }

    /// Queues a publish without waiting; an error when the client's queue is full.
    pub fn try_publish(&self, topic: String, qos: QoS, payload: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Client::V4(c) => c.try_publish(topic, qos, false, payload)?,
            Client::V5(c) => c.try_publish(topic, qos5(qos), false, payload)?,
        }
        Ok(())
    }

    pub async fn subscribe(&self, filter: &str, qos: QoS) -> anyhow::Result<()> {
        match self {
            Client::V4(c) => c.subscribe(filter, qos).await?,
            Client::V5(c) => c.subscribe(filter, qos5(qos)).await?,
        }
        Ok(())
    }

    pub async fn disconnect(&self) -> anyhow::Result<()> {
        match self {
            Client::V4(c) => c.disconnect().await?,
            Client::V5(c) => c.disconnect().await?,
        }
        Ok(())
    }
}
