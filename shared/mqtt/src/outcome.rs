//! Protocol outcomes as types, each with the bytes it takes in each version: the edge says
//! what happened ([`SubscribeRefusal::NotAuthorized`]) and this module says how the client's
//! version puts it (5.0 0x87; 3.1.1 0x80, its only failure code).

use crate::{reason, Version};

/// The lowest failure reason code: every code from 0x80 up says a request failed (5.0 2.4;
/// 3.1.1's SUBACK failure is 0x80).
pub const FAILURE: u8 = 0x80;

/// Whether a reason code (SUBACK, PUBACK, PUBREC, ...) says the request failed.
pub fn failed(code: u8) -> bool {
    code >= FAILURE
}

/// Why one filter of a SUBSCRIBE is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeRefusal {
    /// Not a valid filter (or shared subscription) for this server.
    FilterInvalid,
    /// The client may not subscribe to it.
    NotAuthorized,
}

impl SubscribeRefusal {
    /// The SUBACK byte: the 5.0 reason code, or 3.1/3.1.1's one failure code.
    pub fn code(self, version: Version) -> u8 {
        if !version.is_v5() {
            return FAILURE;
        }
        match self {
            SubscribeRefusal::FilterInvalid => reason::TOPIC_FILTER_INVALID,
            SubscribeRefusal::NotAuthorized => reason::NOT_AUTHORIZED,
        }
    }
}

/// Why a QoS 1 or 2 PUBLISH is not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishRefusal {
    /// The client may not publish to the topic.
    NotAuthorized,
    /// Past the publish rate allowed.
    QuotaExceeded,
}

impl PublishRefusal {
    /// The 5.0 reason code.
    pub fn reason(self) -> u8 {
        match self {
            PublishRefusal::NotAuthorized => reason::NOT_AUTHORIZED,
            PublishRefusal::QuotaExceeded => reason::QUOTA_EXCEEDED,
        }
    }

    /// The PUBACK or PUBREC byte that answers the PUBLISH, or `None` where the version has
    /// no way to refuse one (3.1/3.1.1: the server either acknowledges it unstored or closes
    /// the connection, its choice).
    pub fn ack_code(self, version: Version) -> Option<u8> {
        version.is_v5().then(|| self.reason())
    }
}

/// The PUBCOMP byte answering a PUBREL: 5.0 says so when the packet id was not held.
pub fn pubcomp_code(version: Version, held: bool) -> u8 {
    if held || !version.is_v5() {
        reason::SUCCESS
    } else {
        reason::PACKET_IDENTIFIER_NOT_FOUND
    }
}

/// The UNSUBACK byte for one filter (3.1.1's UNSUBACK carries none; the encoder drops it).
pub fn unsubscribe_code(existed: bool) -> u8 {
    if existed {
        reason::SUCCESS
    } else {
        reason::NO_SUBSCRIPTION_EXISTED
    }
}

/// A server's CONNACK refusal in words, in the version it was sent in (for logs and a bridge's
/// status).
pub fn connack_refusal(version: Version, code: u8) -> &'static str {
    match (version.is_v5(), code) {
        (false, 1) => "unacceptable protocol version",
        (false, 2) => "client id rejected",
        (false, 3) => "server unavailable",
        (false, 4) => "bad user name or password",
        (false, 5) => "not authorized",
        (true, reason::UNSUPPORTED_PROTOCOL_VERSION) => "unsupported protocol version",
        (true, reason::CLIENT_IDENTIFIER_NOT_VALID) => "client id not valid",
        (true, reason::BAD_USER_NAME_OR_PASSWORD) => "bad user name or password",
        (true, reason::NOT_AUTHORIZED) => "not authorized",
        (true, reason::SERVER_UNAVAILABLE) => "server unavailable",
        (true, reason::SERVER_BUSY) => "server busy",
        (true, reason::BANNED) => "banned",
        (true, reason::BAD_AUTHENTICATION_METHOD) => "bad authentication method",
        (true, reason::QUOTA_EXCEEDED) => "quota exceeded",
        _ => "refused",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_has_its_bytes_in_each_version() {
        use SubscribeRefusal::*;
        assert_eq!(FilterInvalid.code(Version::V5), 0x8F);
        assert_eq!(NotAuthorized.code(Version::V5), 0x87);
        for old in [Version::V3_1, Version::V3_1_1] {
            assert_eq!(FilterInvalid.code(old), 0x80);
            assert_eq!(NotAuthorized.code(old), 0x80);
            assert_eq!(PublishRefusal::NotAuthorized.ack_code(old), None);
            assert_eq!(pubcomp_code(old, false), 0);
        }
        assert_eq!(
            PublishRefusal::QuotaExceeded.ack_code(Version::V5),
            Some(0x97)
        );
        assert_eq!(pubcomp_code(Version::V5, false), 0x92);
        assert_eq!(pubcomp_code(Version::V5, true), 0);
        assert_eq!(unsubscribe_code(false), 0x11);
        assert!(failed(0x80) && failed(0x97) && !failed(0x00) && !failed(0x11));
        assert_eq!(connack_refusal(Version::V3_1_1, 5), "not authorized");
        assert_eq!(connack_refusal(Version::V5, 0x8A), "banned");
        assert_eq!(connack_refusal(Version::V5, 5), "refused");
    }
}
