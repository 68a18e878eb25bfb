//! A session's protocol state, apart from any socket or packet version: its subscriptions,
//! the outbound inflight window with packet ids, and the inbound QoS 2 packet ids awaiting
//! PUBREL. Pure data; the connection task drives it.

use crate::router::Delivery;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use wharf_shared::{MessageId, Qos};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL sent; waiting for PUBCOMP.
    Released,
}

#[derive(Debug)]
struct Inflight {
    delivery: Delivery,
    stage: Stage,
    /// Send order, for re-sending in the original order after a reconnect.
    seq: u64,
}

/// What to re-send when a persistent session resumes.
#[derive(Debug)]
pub enum Resend {
    Publish { pkid: u16, delivery: Delivery },
    PubRel(u16),
}

/// The state that outlives one connection when the session is persistent.
#[derive(Debug)]
pub struct SessionState {
    pub client_id: Arc<str>,
    /// Filter -> granted QoS.
    pub subscriptions: BTreeMap<String, Qos>,
    inflight: HashMap<u16, Inflight>,
    next_pkid: u16,
    next_seq: u64,
    /// Inbound QoS 2 packet ids answered with PUBREC, waiting for PUBREL.
    inbound_qos2: HashSet<u16>,
}

impl SessionState {
    pub fn new(client_id: Arc<str>) -> Self {
        SessionState {
            client_id,
            subscriptions: BTreeMap::new(),
            inflight: HashMap::new(),
            next_pkid: 0,
            next_seq: 0,
            inbound_qos2: HashSet::new(),
        }
    }

    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// Message ids this session has sent and not yet seen acknowledged.
    pub fn inflight_ids(&self) -> impl Iterator<Item = MessageId> + '_ {
        self.inflight.values().map(|i| i.delivery.message.id)
    }

    /// Starts a QoS 1/2 delivery and returns its packet id. The caller checks the window.
    pub fn start(&mut self, delivery: Delivery) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid != 0 && !self.inflight.contains_key(&self.next_pkid) {
                break;
            }
        }
        self.next_seq += 1;
        self.inflight.insert(
            self.next_pkid,
            Inflight {
                delivery,
                stage: Stage::Published,
                seq: self.next_seq,
            },
        );
        self.next_pkid
    }

    /// PUBACK: the QoS 1 delivery it completes, if it was one.
    pub fn puback(&mut self, pkid: u16) -> Option<Delivery> {
        match self.inflight.get(&pkid) {
            Some(i) if i.stage == Stage::Published && i.delivery.qos == Qos::AtLeastOnce => {
                self.inflight.remove(&pkid).map(|i| i.delivery)
            }
            _ => None,
        }
    }

    /// PUBREC: moves a QoS 2 delivery to the release stage. Returns the delivery the first
    /// time (the client now owns the message), `None` for a repeat or an unknown id. Either
    /// way the caller answers with PUBREL.
    pub fn pubrec(&mut self, pkid: u16) -> Option<Delivery> {
        match self.inflight.get_mut(&pkid) {
            Some(i) if i.stage == Stage::Published && i.delivery.qos == Qos::ExactlyOnce => {
                i.stage = Stage::Released;
                Some(i.delivery.clone())
            }
            _ => None,
        }
    }

    /// PUBCOMP: ends a QoS 2 delivery.
    pub fn pubcomp(&mut self, pkid: u16) -> bool {
        match self.inflight.get(&pkid) {
            Some(i) if i.stage == Stage::Released => self.inflight.remove(&pkid).is_some(),
            _ => false,
        }
    }

    /// What to send again, in the original order, when the session resumes.
    pub fn resend(&self) -> Vec<Resend> {
        let mut inflight: Vec<(&u16, &Inflight)> = self.inflight.iter().collect();
        inflight.sort_by_key(|(_, i)| i.seq);
        inflight
            .into_iter()
            .map(|(pkid, i)| match i.stage {
                Stage::Published => Resend::Publish {
                    pkid: *pkid,
                    delivery: i.delivery.clone(),
                },
                Stage::Released => Resend::PubRel(*pkid),
            })
            .collect()
    }

    /// Whether an inbound QoS 2 packet id was already accepted (a re-sent PUBLISH).
    pub fn has_inbound_qos2(&self, pkid: u16) -> bool {
        self.inbound_qos2.contains(&pkid)
    }

    pub fn accept_inbound_qos2(&mut self, pkid: u16) {
        self.inbound_qos2.insert(pkid);
    }

    pub fn release_inbound_qos2(&mut self, pkid: u16) -> bool {
        self.inbound_qos2.remove(&pkid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_shared::Message;

    fn delivery(n: u8, qos: Qos) -> Delivery {
        Delivery {
            message: Arc::new(Message {
                id: MessageId([n; 12]),
                topic: "t".into(),
                payload: vec![n],
                qos,
                retain: false,
                client_id: "p".into(),
                host: "h".into(),
                created_ms: 0,
            }),
            qos,
            retain: false,
        }
    }

    #[test]
    fn qos1_and_qos2_flows_complete_once() {
        let mut s = SessionState::new("c".into());
        let a = s.start(delivery(1, Qos::AtLeastOnce));
        let b = s.start(delivery(2, Qos::ExactlyOnce));
        assert_ne!(a, b);
        assert!(
            s.pubrec(a).is_none(),
            "PUBREC does not complete a QoS 1 delivery"
        );
        assert!(s.puback(a).is_some());
        assert!(s.puback(a).is_none());
        assert!(!s.pubcomp(b), "PUBCOMP before PUBREC");
        assert!(s.pubrec(b).is_some());
        assert!(
            s.pubrec(b).is_none(),
            "a repeated PUBREC is not a second delivery"
        );
        assert!(matches!(s.resend()[..], [Resend::PubRel(id)] if id == b));
        assert!(s.pubcomp(b));
        assert_eq!(s.inflight_len(), 0);
    }

    #[test]
    fn packet_ids_skip_zero_and_ids_in_use() {
        let mut s = SessionState::new("c".into());
        s.next_pkid = u16::MAX - 1;
        let first = s.start(delivery(1, Qos::AtLeastOnce));
        assert_eq!(first, u16::MAX);
        assert_eq!(s.start(delivery(2, Qos::AtLeastOnce)), 1);
        s.next_pkid = u16::MAX - 1;
        assert_eq!(
            s.start(delivery(3, Qos::AtLeastOnce)),
            2,
            "skips 65535, 0 and 1"
        );
    }

    #[test]
    fn resend_keeps_the_send_order() {
        let mut s = SessionState::new("c".into());
        s.next_pkid = u16::MAX - 1;
        for n in 0..4 {
            s.start(delivery(n, Qos::AtLeastOnce));
        }
        let order: Vec<u8> = s
            .resend()
            .iter()
            .map(|r| match r {
                Resend::Publish { delivery, .. } => delivery.message.payload[0],
                Resend::PubRel(_) => 99,
            })
            .collect();
        assert_eq!(order, vec![0, 1, 2, 3]);
    }
}
