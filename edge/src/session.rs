//! A session's protocol state, apart from any socket or packet version: its subscriptions,
//! the outbound inflight window with packet ids, and the inbound QoS 2 packet ids awaiting
//! PUBREL. Pure data; the connection task drives it.

use crate::router::{combine, Delivery, Grant};
use crate::topic;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use wharf_shared::{Message, MessageId, Qos};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// QoS 2 to a persistent session: waiting for the store to record the delivery before
    /// the PUBLISH is written.
    Tracking,
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREC received; waiting for the store to record it before the PUBREL is written.
    Releasing,
    /// PUBREL sent; waiting for PUBCOMP.
    Released,
}

/// The acknowledgements a client sends for the server's PUBLISHes (named as MQTT names the
/// packets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
pub enum Ack {
    PubAck,
    PubRec,
    PubComp,
}

/// What to do about a PUBREC.
#[derive(Debug)]
pub enum PubRec {
    /// First PUBREC: the client owns the message. Record the delivery and send PUBREL.
    Deliver(Delivery),
    /// First PUBREC of a tracked delivery: record it durably, then send PUBREL.
    Track(Delivery),
    /// A repeat, or an id this session does not know: answer PUBREL.
    PubRel,
    /// Being recorded: the PUBREL follows when the store has it.
    Wait,
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

/// A session's subscriptions, filter -> grant, in filter order: a sorted vector, which holds
/// one subscription in 32 bytes where a `BTreeMap` allocates a whole node (about 370).
#[derive(Debug, Default)]
pub struct Subscriptions(Vec<(String, Grant)>);

impl Subscriptions {
    fn find(&self, filter: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(f, _)| f.as_str().cmp(filter))
    }

    /// Sets `filter`'s grant; the one it replaces, if any.
    pub fn insert(&mut self, filter: String, grant: Grant) -> Option<Grant> {
        match self.find(&filter) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, grant)),
            Err(i) => {
                // Exactly one more slot: a push would reserve four.
                self.0.reserve_exact(1);
                self.0.insert(i, (filter, grant));
                None
            }
        }
    }

    pub fn remove(&mut self, filter: &str) -> Option<Grant> {
        let i = self.find(filter).ok()?;
        let (_, grant) = self.0.remove(i);
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        Some(grant)
    }

    pub fn get(&self, filter: &str) -> Option<&Grant> {
        self.find(filter).ok().map(|i| &self.0[i].1)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The filters, in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> + '_ {
        self.0.iter().map(|(f, _)| f)
    }

    /// (filter, grant), in filter order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Grant)> + '_ {
        self.0.iter().map(|(f, g)| (f, g))
    }
}

impl<'a> IntoIterator for &'a Subscriptions {
    type Item = (&'a String, &'a Grant);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, Grant)>,
        fn(&'a (String, Grant)) -> (&'a String, &'a Grant),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(f, g)| (f, g))
    }
}

/// The state that outlives one connection when the session is persistent.
#[derive(Debug)]
pub struct SessionState {
    pub client_id: Arc<str>,
    /// Filter -> what it grants.
    pub subscriptions: Subscriptions,
    inflight: HashMap<u16, Inflight, PkidHasher>,
    next_pkid: u16,
    next_seq: u64,
    /// Inbound QoS 2 packet ids answered with PUBREC, waiting for PUBREL: boxed, and only
    /// while there are some (part of every connection's task otherwise).
    #[allow(clippy::box_collection)]
    inbound_qos2: Option<Box<HashSet<u16, PkidHasher>>>,
}

/// SipHash with fixed keys: a packet id table holds at most 65,535 entries, all of one
/// client's, so per-table random keys (16 bytes each, in every session) buy nothing.
type PkidHasher = BuildHasherDefault<DefaultHasher>;

impl SessionState {
    pub fn new(client_id: Arc<str>) -> Self {
        SessionState {
            client_id,
            subscriptions: Subscriptions::default(),
            inflight: HashMap::default(),
            next_pkid: 0,
            next_seq: 0,
            inbound_qos2: None,
        }
    }

    /// The delivery of a message from the store to this session, if its subscriptions take
    /// it (see [`crate::router::combine`]).
    pub fn delivery_of(&self, message: &Arc<Message>) -> Option<Delivery> {
        let client = &*self.client_id;
        combine(
            message,
            self.subscriptions
                .iter()
                .filter(|(filter, grant)| {
                    grant.takes(client, message) && topic::matches(&message.topic, filter)
                })
                .map(|(_, grant)| *grant),
        )
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
        self.start_at(delivery, Stage::Published)
    }

    /// Starts a QoS 2 delivery whose PUBLISH waits until the store recorded it ([`tracked`]).
    ///
    /// [`tracked`]: SessionState::tracked
    pub fn start_tracked(&mut self, delivery: Delivery) -> u16 {
        self.start_at(delivery, Stage::Tracking)
    }

    /// The store recorded the delivery: the PUBLISH may go.
    pub fn tracked(&mut self, pkid: u16) -> Option<Delivery> {
        match self.inflight.get_mut(&pkid) {
            Some(i) if i.stage == Stage::Tracking => {
                i.stage = Stage::Published;
                Some(i.delivery.clone())
            }
            _ => None,
        }
    }

    /// The store recorded the PUBREC: the PUBREL may go.
    pub fn release_tracked(&mut self, pkid: u16) -> bool {
        match self.inflight.get_mut(&pkid) {
            Some(i) if i.stage == Stage::Releasing => {
                i.stage = Stage::Released;
                true
            }
            _ => false,
        }
    }

    /// A delivery that was under way before a crash, as the store recorded it.
    pub fn restore(&mut self, pkid: u16, delivery: Delivery, released: bool) {
        self.next_seq += 1;
        let stage = if released {
            Stage::Released
        } else {
            Stage::Published
        };
        self.inflight.insert(
            pkid,
            Inflight {
                delivery,
                stage,
                seq: self.next_seq,
            },
        );
    }

    fn start_at(&mut self, delivery: Delivery, stage: Stage) -> u16 {
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
                stage,
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

    /// Whether `ack` may answer `pkid`: not when the packet id is in flight at the other QoS
    /// (PUBACK for a QoS 2 message, PUBREC or PUBCOMP for a QoS 1 one), a protocol error.
    /// An id not in flight (a repeat, or one from before a takeover) is no error.
    pub fn ack_fits(&self, pkid: u16, ack: Ack) -> bool {
        let Some(i) = self.inflight.get(&pkid) else {
            return true;
        };
        match ack {
            Ack::PubAck => i.delivery.qos != Qos::ExactlyOnce,
            Ack::PubRec | Ack::PubComp => i.delivery.qos != Qos::AtLeastOnce,
        }
    }

    /// PUBREC: moves a QoS 2 delivery towards release. With `durable`, the release waits for
    /// the store (see [`PubRec::Track`]).
    pub fn pubrec(&mut self, pkid: u16, durable: bool) -> PubRec {
        match self.inflight.get_mut(&pkid) {
            Some(i) if i.stage == Stage::Published && i.delivery.qos == Qos::ExactlyOnce => {
                if durable {
                    i.stage = Stage::Releasing;
                    PubRec::Track(i.delivery.clone())
                } else {
                    i.stage = Stage::Released;
                    PubRec::Deliver(i.delivery.clone())
                }
            }
            // Releasing: the PUBREL follows when the store has it. Tracking: the PUBLISH has
            // not been shown, so there is nothing to release.
            Some(i) if matches!(i.stage, Stage::Releasing | Stage::Tracking) => PubRec::Wait,
            _ => PubRec::PubRel,
        }
    }

    /// Takes the shared-subscription deliveries this session has not completed and that the
    /// client has not received for certain: QoS 1 and QoS 2 before PUBREC. They go back to
    /// their group when the connection ends (a QoS 2 message past PUBREC is delivered, and
    /// its release stays with the session).
    pub fn take_group_unacked(&mut self) -> Vec<Delivery> {
        let pkids: Vec<u16> = self
            .in_order()
            .filter(|(_, i)| {
                i.delivery.group.is_some() && matches!(i.stage, Stage::Published | Stage::Tracking)
            })
            .map(|(pkid, _)| pkid)
            .collect();
        pkids
            .into_iter()
            .filter_map(|pkid| self.inflight.remove(&pkid).map(|i| i.delivery))
            .collect()
    }

    /// A 5.0 PUBREC with a failure reason: the client refused the QoS 2 message, which ends
    /// its delivery (MQTT 5.0 4.3.3). Returns it if it was one in flight.
    pub fn pubrec_refused(&mut self, pkid: u16) -> Option<Delivery> {
        match self.inflight.get(&pkid) {
            Some(i) if i.stage == Stage::Published && i.delivery.qos == Qos::ExactlyOnce => {
                self.inflight.remove(&pkid).map(|i| i.delivery)
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

    /// What to send again when a persistent session resumes, in the original order. Steps
    /// still waiting for the store are not among them: see [`untracked`].
    ///
    /// [`untracked`]: SessionState::untracked
    pub fn resend(&self) -> Vec<Resend> {
        self.in_order()
            .filter_map(|(pkid, i)| match i.stage {
                Stage::Published => Some(Resend::Publish {
                    pkid,
                    delivery: i.delivery.clone(),
                }),
                Stage::Released => Some(Resend::PubRel(pkid)),
                Stage::Tracking | Stage::Releasing => None,
            })
            .collect()
    }

    /// QoS 2 steps that were waiting for the store when the previous connection ended, in
    /// order: (packet id, delivery, whether it is the release). That connection's replies
    /// ended with it, and the store may not have recorded the step (a failed write is what
    /// closes a connection), so the resumed session asks again and shows the PUBLISH or PUBREL
    /// only once the store has it. Showing it before would let a crash replay the delivery
    /// from the store under a new packet id, or as a PUBLISH after its PUBREL: a duplicate.
    pub fn untracked(&self) -> Vec<(u16, Delivery, bool)> {
        self.in_order()
            .filter_map(|(pkid, i)| match i.stage {
                Stage::Tracking => Some((pkid, i.delivery.clone(), false)),
                Stage::Releasing => Some((pkid, i.delivery.clone(), true)),
                Stage::Published | Stage::Released => None,
            })
            .collect()
    }

    fn in_order(&self) -> impl Iterator<Item = (u16, &Inflight)> {
        let mut inflight: Vec<(u16, &Inflight)> =
            self.inflight.iter().map(|(p, i)| (*p, i)).collect();
        inflight.sort_by_key(|(_, i)| i.seq);
        inflight.into_iter()
    }

    /// Whether an inbound QoS 2 packet id was already accepted (a re-sent PUBLISH).
    pub fn has_inbound_qos2(&self, pkid: u16) -> bool {
        self.inbound_qos2
            .as_ref()
            .is_some_and(|s| s.contains(&pkid))
    }

    pub fn accept_inbound_qos2(&mut self, pkid: u16) {
        self.inbound_qos2.get_or_insert_default().insert(pkid);
    }

    pub fn release_inbound_qos2(&mut self, pkid: u16) -> bool {
        let removed = self.inbound_qos2.as_mut().is_some_and(|s| s.remove(&pkid));
        if self.inbound_qos2.as_ref().is_some_and(|s| s.is_empty()) {
            self.inbound_qos2 = None;
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriptions_stay_in_filter_order_and_replace() {
        let mut subs = Subscriptions::default();
        for f in ["b/#", "a/+", "c", "a/+"] {
            subs.insert(f.to_owned(), Grant::qos(Qos::AtMostOnce));
        }
        assert_eq!(
            subs.insert("c".to_owned(), Grant::qos(Qos::ExactlyOnce)),
            Some(Grant::qos(Qos::AtMostOnce))
        );
        assert_eq!(subs.keys().collect::<Vec<_>>(), ["a/+", "b/#", "c"]);
        assert_eq!(subs.get("c"), Some(&Grant::qos(Qos::ExactlyOnce)));
        assert_eq!(subs.remove("b/#"), Some(Grant::qos(Qos::AtMostOnce)));
        assert_eq!(subs.remove("b/#"), None);
        assert_eq!(subs.len(), 2);
    }

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
                properties: None,
            }),
            qos,
            retain: false,
            subscription_ids: Box::default(),
            group: None,
        }
    }

    #[test]
    fn qos1_and_qos2_flows_complete_once() {
        let mut s = SessionState::new("c".into());
        let a = s.start(delivery(1, Qos::AtLeastOnce));
        let b = s.start(delivery(2, Qos::ExactlyOnce));
        assert_ne!(a, b);
        assert!(
            matches!(s.pubrec(a, false), PubRec::PubRel),
            "PUBREC does not complete a QoS 1 delivery"
        );
        assert!(s.puback(a).is_some());
        assert!(s.puback(a).is_none());
        assert!(!s.pubcomp(b), "PUBCOMP before PUBREC");
        assert!(matches!(s.pubrec(b, false), PubRec::Deliver(_)));
        assert!(
            matches!(s.pubrec(b, false), PubRec::PubRel),
            "a repeated PUBREC is not a second delivery"
        );
        assert!(matches!(s.resend()[..], [Resend::PubRel(id)] if id == b));
        assert!(s.pubcomp(b));
        assert_eq!(s.inflight_len(), 0);
    }

    #[test]
    fn an_acknowledgement_of_the_other_qos_does_not_fit() {
        let mut s = SessionState::new("c".into());
        let a = s.start(delivery(1, Qos::AtLeastOnce));
        let b = s.start(delivery(2, Qos::ExactlyOnce));
        assert!(s.ack_fits(a, Ack::PubAck));
        assert!(!s.ack_fits(a, Ack::PubRec));
        assert!(!s.ack_fits(a, Ack::PubComp));
        assert!(!s.ack_fits(b, Ack::PubAck));
        assert!(s.ack_fits(b, Ack::PubRec));
        assert!(s.ack_fits(b, Ack::PubComp));
        // Not in flight: a repeat, nothing to judge.
        assert!(s.ack_fits(999, Ack::PubAck));
    }

    #[test]
    fn tracked_qos2_waits_for_the_store_at_both_steps() {
        let mut s = SessionState::new("c".into());
        let p = s.start_tracked(delivery(1, Qos::ExactlyOnce));
        assert!(
            matches!(s.pubrec(p, true), PubRec::Wait),
            "PUBREC before the PUBLISH went out releases nothing"
        );
        assert!(s.resend().is_empty(), "not shown before the store has it");
        assert!(matches!(s.untracked()[..], [(id, _, false)] if id == p));
        assert!(s.tracked(p).is_some());
        assert!(matches!(s.resend()[..], [Resend::Publish { pkid, .. }] if pkid == p));
        assert!(s.untracked().is_empty());
        assert!(s.tracked(p).is_none());
        assert!(matches!(s.pubrec(p, true), PubRec::Track(_)));
        assert!(matches!(s.pubrec(p, true), PubRec::Wait));
        assert!(
            s.resend().is_empty(),
            "no PUBREL before the store has the release"
        );
        assert!(matches!(s.untracked()[..], [(id, _, true)] if id == p));
        assert!(!s.pubcomp(p), "no PUBCOMP before the PUBREL");
        assert!(s.release_tracked(p));
        assert!(matches!(s.resend()[..], [Resend::PubRel(id)] if id == p));
        assert!(s.pubcomp(p));
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
