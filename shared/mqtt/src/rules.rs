//! MQTT's session rules as pure functions, so that they can be tested without a broker:
//! session expiry and keepalive negotiation at CONNECT, and whether a will is owed when a
//! connection ends.

use crate::Version;

/// The session expiry a CONNECT gets: what the client asked (5.0's property; 3.1/3.1.1: 0 for
/// a clean session, "as long as the server keeps sessions" for a persistent one), within the
/// server's maximum. `told`: whether the CONNACK must say so (5.0, when it differs from the
/// asked value).
pub fn session_expiry(version: Version, clean_start: bool, asked: u32, server_max: u32) -> Expiry {
    let asked = match version {
        Version::V5 => asked,
        _ if clean_start => 0,
        _ => u32::MAX,
    };
    let granted = asked.min(server_max);
    Expiry {
        granted,
        told: version.is_v5() && granted != asked,
    }
}

/// [`session_expiry`]'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub granted: u32,
    pub told: bool,
}

/// The keepalive a CONNECT gets. The Server Keep Alive (5.0) is the longest a client may keep:
/// one that asks for more, or for none, is told to use it (as Mosquitto's `max_keepalive`
/// does); 3.1/3.1.1 clients keep what they asked. The server closes a client silent for 1.5 x
/// the keepalive (`close_after_ms`; `None` for no keepalive).
pub fn keep_alive(version: Version, asked: u16, server_max: Option<u16>) -> KeepAlive {
    let told = server_max.filter(|max| version.is_v5() && (asked == 0 || asked > *max));
    let secs = told.unwrap_or(asked);
    KeepAlive {
        told,
        close_after_ms: (secs > 0).then(|| u64::from(secs) * 1500),
    }
}

/// [`keep_alive`]'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// The Server Keep Alive to send in the CONNACK, if any.
    pub told: Option<u16>,
    pub close_after_ms: Option<u64>,
}

/// How a connection with a will ended (a DISCONNECT without 0x04 has already taken the will
/// away).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The network, a protocol error, the keepalive, the server's refusal.
    Lost,
    /// The broker shutting down: not the client's failure.
    Shutdown,
    /// A new connection of the client id took the session over; `keeps_session`: it resumed
    /// the session rather than starting clean.
    TakenOver { keeps_session: bool },
}

/// Whether the will is owed when a connection ends: never for a shutdown; after a takeover,
/// not one still delayed (the session resumed, MQTT 5.0 3.1.3.2.2; one whose session ends
/// with the connection is not delayed), and on 3.1/3.1.1, which list no takeover among a
/// will's causes, only when the session ends with it (either connection clean), as Mosquitto
/// does.
pub fn will_owed(version: Version, ending: Ending, session_expiry: u32, will_delay: u32) -> bool {
    let delayed = will_delay.min(session_expiry) > 0;
    match ending {
        Ending::Lost => true,
        Ending::Shutdown => false,
        Ending::TakenOver { .. } if delayed => false,
        Ending::TakenOver { keeps_session } if !version.is_v5() => {
            !(session_expiry > 0 && keeps_session)
        }
        Ending::TakenOver { .. } => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Version::*;

    #[test]
    fn session_expiry_follows_the_version_and_the_server_maximum() {
        let e = |v, clean, asked, max| session_expiry(v, clean, asked, max);
        assert_eq!(e(V3_1_1, true, 99, 3600).granted, 0);
        assert_eq!(e(V3_1_1, false, 0, 3600).granted, 3600);
        assert!(
            !e(V3_1_1, false, 0, 3600).told,
            "3.1.1 has no property to tell"
        );
        assert_eq!(e(V3_1, false, 0, u32::MAX).granted, u32::MAX);
        assert_eq!(
            e(V5, true, 60, 3600),
            Expiry {
                granted: 60,
                told: false
            }
        );
        assert_eq!(
            e(V5, false, 7200, 3600),
            Expiry {
                granted: 3600,
                told: true
            }
        );
        assert_eq!(
            e(V5, false, u32::MAX, u32::MAX),
            Expiry {
                granted: u32::MAX,
                told: false
            }
        );
    }

    #[test]
    fn keepalive_is_capped_for_5_0_clients_only() {
        assert_eq!(keep_alive(V5, 60, Some(30)).told, Some(30));
        assert_eq!(
            keep_alive(V5, 0, Some(30)).told,
            Some(30),
            "none is too long"
        );
        assert_eq!(keep_alive(V5, 20, Some(30)).told, None);
        assert_eq!(keep_alive(V5, 20, Some(30)).close_after_ms, Some(30_000));
        assert_eq!(keep_alive(V3_1_1, 60, Some(30)).told, None);
        assert_eq!(
            keep_alive(V3_1_1, 60, Some(30)).close_after_ms,
            Some(90_000)
        );
        assert_eq!(keep_alive(V3_1_1, 0, None).close_after_ms, None);
    }

    #[test]
    fn a_will_is_owed_as_each_version_says() {
        let resumed = Ending::TakenOver {
            keeps_session: true,
        };
        let clean = Ending::TakenOver {
            keeps_session: false,
        };
        for v in [V3_1, V3_1_1, V5] {
            assert!(will_owed(v, Ending::Lost, 0, 0));
            assert!(will_owed(v, Ending::Lost, 3600, 10));
            assert!(!will_owed(v, Ending::Shutdown, 0, 0));
            assert!(
                !will_owed(v, resumed, 3600, 10),
                "still delayed: the session resumed"
            );
        }
        assert!(
            will_owed(V5, resumed, 3600, 0),
            "5.0: a takeover is a cause"
        );
        assert!(
            !will_owed(V3_1_1, resumed, 3600, 0),
            "3.1.1: the session carried on"
        );
        assert!(
            will_owed(V3_1_1, clean, 3600, 0),
            "3.1.1: the session ended"
        );
        assert!(
            will_owed(V3_1_1, resumed, 0, 0),
            "3.1.1: a clean session ended"
        );
        assert!(
            will_owed(V5, resumed, 0, 10),
            "not delayed when the session ends now"
        );
    }
}
