//! Wharf's edge: the MQTT side of the broker.
//!
//! Devices connect here; every message is handed to the store-worker over a Unix socket and
//! acknowledged (QoS 1/2) only once the worker says it is durable. Messages between clients of
//! this edge are routed in memory; stored ones come back from the worker.
//!
//! # Layout
//! - [`server`]: the accept loop, connection limit and graceful shutdown (`Edge`).
//! - [`connection`]: one task per client: CONNECT phase, the `select!` loop, teardown.
//! - [`session`]: protocol state of a session (inflight window, packet ids, QoS 2), version
//!   independent.
//! - [`protocol`] (the `wharf-mqtt` crate, `shared/mqtt`): packets as the session sees them,
//!   for MQTT 3.1, 3.1.1 and 5.0: decoding, encoding, and every difference between the
//!   versions.
//! - [`router`]: subscription trie, shared subscription groups and per-session bounded queues
//!   (the local fast path).
//! - [`groups`]: fetches what shared subscription groups are owed from the store.
//! - [`keepalive`]: one sweep over all sessions instead of a timer per connection.
//! - [`registry`]: client id -> connection or parked persistent session; takeover, also by
//!   a claim of the session on another edge or host.
//! - [`lease`]: whether this edge may serve its sessions (the store shared by hosts).
//! - [`link`]: the store-worker socket: requests, replies, reconnects, held persists.
//! - [`websocket`]: MQTT over WebSocket: the upgrade and the binary messages as a byte stream.
//! - [`proxy`]: the PROXY protocol (v1 and v2) header in front of a connection.
//! - [`tls`]: the TLS listener's rustls configuration, reload, client certificate identity.
//! - [`admin`]: the admin HTTP API and the console page, on the ops address.
//! - [`cli`]: flags and environment layered over etcd keys.
//! - [`config`], [`ids`], [`broker`]: configuration, message ids, shared state.
//!
//! Only what the binary, the tests and the benchmarks use is `pub` (`server`, `config`, `cli`,
//! `auth`, `tls`, `admin`, `protocol`); the rest is `pub(crate)`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub(crate) mod bridge;
pub(crate) mod broker;
pub mod cli;
pub mod config;
pub(crate) mod connection;
pub(crate) mod groups;
pub(crate) mod ids;
pub(crate) mod keepalive;
pub(crate) mod lease;
pub(crate) mod link;
pub(crate) mod proxy;
pub(crate) mod registry;
pub(crate) mod router;
pub mod server;
pub(crate) mod session;
pub(crate) mod small_map;
pub mod tls;
pub(crate) mod transit;
pub(crate) mod websocket;
pub use wharf_mqtt as protocol;
pub use wharf_shared::topic;

pub use config::{EdgeConfig, Limits};
pub use server::Edge;
