//! The admin HTTP API and the console, served on the ops address beside `/metrics` when an
//! admin password is configured. Every API request needs the credentials: HTTP Basic,
//! `Authorization: Bearer <password>`, or the cookie of a console login (`POST
//! /api/v1/login`; it lapses after `--admin-session-idle` unused and 12 hours after the
//! login, and `POST /api/v1/logout` ends it). The console's page itself holds no data and is
//! served to anyone; it shows its own login form. JSON in and out; docs/configuration.md,
//! "Admin API and console", has examples.
//!
//! What it shows is this edge's: its connected clients (from the router's queues, which carry
//! the address, protocol and counts) and its parked sessions. Retained messages are the
//! store's, so they are the cluster's.

mod history;

use crate::broker::Broker;
use crate::router::Grant;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wharf_ops::http::{Api, HttpRequest, HttpResponse, PrometheusHandle};
use wharf_shared::{Message, Qos, Reply, Request, StoredRule, StoredUser};

/// The console: one page of HTML and JavaScript, shipped in the binary.
const CONSOLE: &str = include_str!("admin/console.html");

/// Owed messages counted per session in `GET /api/v1/behind` (each a catch-up query).
pub const BEHIND_COUNTED: u32 = 1_000;

/// Subscriptions listed for one message in `GET /api/v1/messages/{id}`.
pub const TRACED_RECIPIENTS: u32 = 1_000;

/// Who may use the API, and the console's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminSettings {
    pub user: String,
    pub password: String,
    /// Between the charts' points (360 kept).
    pub history_step: Duration,
    /// How long a console login lasts unused.
    pub session_idle: Duration,
}

/// The console login's cookie.
const COOKIE: &str = "wharf_console";
/// A console login ends this long after it was made, however much it is used.
const SESSION_MOST: Duration = Duration::from_secs(12 * 3600);
/// Console logins kept at once; a new one beyond it ends the oldest.
const SESSIONS_KEPT: usize = 64;
/// Failed logins allowed per minute (all sources together); more are refused with 429
/// without checking the password.
const FAILED_LOGINS_PER_MINUTE: u32 = 10;

/// The API as the ops endpoint calls it. With `metrics` (the exporter this edge records
/// into), the console's charts are sampled.
pub fn api(broker: Arc<Broker>, settings: AdminSettings, metrics: Option<PrometheusHandle>) -> Api {
    let history = history::History::new(settings.history_step);
    if let Some(metrics) = metrics {
        history.start(Arc::downgrade(&broker), metrics);
    }
    let admin = Arc::new(Admin {
        broker,
        credentials: digest(format!("{}:{}", settings.user, settings.password).as_bytes()),
        password: digest(settings.password.as_bytes()),
        user: settings.user,
        session_idle: settings.session_idle,
        logins: Mutex::new(Logins::default()),
        history,
    });
    Arc::new(move |request| {
        let admin = admin.clone();
        Box::pin(async move { admin.handle(request).await })
    })
}

struct Admin {
    broker: Arc<Broker>,
    /// SHA-256 of `user:password` (Basic) and of the password (Bearer): compared as digests,
    /// so that the comparison's time says nothing about the secret.
    credentials: ring::digest::Digest,
    password: ring::digest::Digest,
    user: String,
    session_idle: Duration,
    logins: Mutex<Logins>,
    history: Arc<history::History>,
}

/// Console logins by the SHA-256 of their cookie (the cookie itself is not kept), and the
/// failed attempts of the current minute.
#[derive(Default)]
struct Logins {
    sessions: HashMap<Vec<u8>, Login>,
    failed: u32,
    failed_since: Option<Instant>,
}

struct Login {
    made: Instant,
    used: Instant,
}

/// How a request proved who it is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proof {
    Credentials,
    Cookie,
}

fn digest(bytes: &[u8]) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, bytes)
}

fn same(a: &ring::digest::Digest, b: &ring::digest::Digest) -> bool {
    a.as_ref() == b.as_ref()
}

/// A request that changes state (anything but GET and HEAD) is refused when a browser may have
/// sent it for another site holding the console's credentials: its `Origin`, if it has one,
/// must be this host (403 otherwise, `null` included), and its body JSON (415 otherwise: a form
/// or `text/plain` body is what a cross-site page can send without asking).
fn cross_site(request: &HttpRequest) -> Option<HttpResponse> {
    if matches!(request.method.as_str(), "GET" | "HEAD") {
        return None;
    }
    if let Some(origin) = &request.origin {
        let authority = origin
            .split_once("://")
            .map(|(_, rest)| rest.trim_end_matches('/'));
        let same = authority.is_some_and(|a| Some(a) == request.host.as_deref().map(str::trim));
        if !same {
            return Some(error(403, "cross-origin requests are refused"));
        }
    }
    let json = request.content_type.as_deref().is_some_and(|t| {
        t.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    (!json).then(|| {
        error(
            415,
            "state-changing requests take Content-Type: application/json",
        )
    })
}

fn reply(status: u16, body: Value) -> HttpResponse {
    HttpResponse::new(status, "application/json", body.to_string())
}

fn error(status: u16, why: impl std::fmt::Display) -> HttpResponse {
    reply(status, json!({ "error": why.to_string() }))
}

impl Admin {
    /// Whether the request carries the credentials or a live console login's cookie.
    fn proof(&self, request: &HttpRequest) -> Option<Proof> {
        if self.authorized(request.authorization.as_deref()) {
            return Some(Proof::Credentials);
        }
        let cookie = request.cookie(COOKIE)?;
        let key = digest(cookie.as_bytes()).as_ref().to_vec();
        let mut logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let live = logins.sessions.get(&key).is_some_and(|l| {
            now.duration_since(l.used) < self.session_idle
                && now.duration_since(l.made) < SESSION_MOST
        });
        if !live {
            logins.sessions.remove(&key);
            return None;
        }
        if let Some(login) = logins.sessions.get_mut(&key) {
            login.used = now;
        }
        Some(Proof::Cookie)
    }

    /// `POST /api/v1/login` with `{"user": ..., "password": ...}`: a cookie for the console.
    fn login(&self, request: &HttpRequest) -> HttpResponse {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let now = Instant::now();
        let mut logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
        if logins
            .failed_since
            .is_none_or(|since| now.duration_since(since) >= Duration::from_secs(60))
        {
            logins.failed = 0;
            logins.failed_since = Some(now);
        }
        if logins.failed >= FAILED_LOGINS_PER_MINUTE {
            metrics::counter!("wharf_edge_admin_logins_total", "outcome" => "throttled")
                .increment(1);
            return error(429, "too many failed logins: try again in a minute");
        }
        let user = body["user"].as_str().unwrap_or("");
        let password = body["password"].as_str().unwrap_or("");
        let given = digest(format!("{user}:{password}").as_bytes());
        if !same(&given, &self.credentials) {
            logins.failed += 1;
            metrics::counter!("wharf_edge_admin_logins_total", "outcome" => "refused").increment(1);
            tracing::warn!(user, "console login refused");
            return error(401, "wrong user name or password");
        }
        let mut token = [0u8; 32];
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut token).is_err() {
            return error(500, "no random source for a login");
        }
        let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
        if logins.sessions.len() >= SESSIONS_KEPT {
            let oldest = logins
                .sessions
                .iter()
                .min_by_key(|(_, l)| l.used)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                logins.sessions.remove(&oldest);
            }
        }
        logins.sessions.insert(
            digest(token.as_bytes()).as_ref().to_vec(),
            Login {
                made: now,
                used: now,
            },
        );
        metrics::counter!("wharf_edge_admin_logins_total", "outcome" => "accepted").increment(1);
        tracing::info!(user, "console login");
        let mut response = reply(200, json!({ "user": self.user }));
        response.headers.push((
            "Set-Cookie",
            format!(
                "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
                SESSION_MOST.as_secs()
            ),
        ));
        response
    }

    /// `POST /api/v1/logout`: the login of this cookie ends.
    fn logout(&self, request: &HttpRequest) -> HttpResponse {
        if let Some(cookie) = request.cookie(COOKIE) {
            let key = digest(cookie.as_bytes()).as_ref().to_vec();
            self.logins
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .sessions
                .remove(&key);
        }
        let mut response = reply(200, json!({ "loggedOut": true }));
        response.headers.push((
            "Set-Cookie",
            format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
        ));
        response
    }

    fn authorized(&self, header: Option<&str>) -> bool {
        let Some(header) = header else {
            return false;
        };
        let (scheme, value) = header.trim().split_once(' ').unwrap_or((header, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD.decode(value.trim());
            decoded.is_ok_and(|d| same(&digest(&d), &self.credentials))
        } else if scheme.eq_ignore_ascii_case("bearer") {
            same(&digest(value.trim().as_bytes()), &self.password)
        } else {
            false
        }
    }

    async fn handle(&self, request: HttpRequest) -> HttpResponse {
        let path = request.path.trim_end_matches('/');
        // The page (no data in it) and the login need no proof; a login is checked as any
        // state-changing request is against cross-site use.
        match (request.method.as_str(), path) {
            ("GET", "/console" | "") => {
                let mut page = HttpResponse::new(200, "text/html; charset=utf-8", CONSOLE);
                page.headers.push((
                    "Content-Security-Policy",
                    "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'".to_owned(),
                ));
                page.headers.push(("X-Frame-Options", "DENY".to_owned()));
                return page;
            }
            ("POST", "/api/v1/login") => {
                return match cross_site(&request) {
                    Some(refused) => refused,
                    None => self.login(&request),
                };
            }
            ("POST", "/api/v1/logout") => {
                return match cross_site(&request) {
                    Some(refused) => refused,
                    None => self.logout(&request),
                };
            }
            _ => {}
        }
        let Some(proof) = self.proof(&request) else {
            metrics::counter!("wharf_edge_admin_unauthorized_total").increment(1);
            // A Bearer challenge, not Basic: a browser would answer Basic with its own
            // password dialog over the console's login form. Basic credentials sent
            // unasked (curl -u) are still accepted.
            let mut response = error(401, "credentials required");
            response
                .headers
                .push(("WWW-Authenticate", "Bearer realm=\"wharf\"".to_owned()));
            return response;
        };
        if let Some(refused) = cross_site(&request) {
            metrics::counter!("wharf_edge_admin_cross_site_refused_total").increment(1);
            return refused;
        }
        if let Some(id) = path.strip_prefix("/api/v1/messages/") {
            return match request.method.as_str() {
                "GET" => self.trace(id).await,
                _ => error(405, "method not allowed here"),
            };
        }
        if let Some(name) = path.strip_prefix("/api/v1/users/") {
            return match request.method.as_str() {
                "PUT" => self.put_user(name, &request, proof).await,
                "DELETE" => self.delete_user(name, &request, proof).await,
                _ => error(405, "method not allowed here"),
            };
        }
        let client = path.strip_prefix("/api/v1/clients/");
        match (request.method.as_str(), path, client) {
            ("GET", "/api/v1/overview", _) => self.overview(),
            ("GET", "/api/v1/history", _) => reply(200, self.history.json()),
            ("GET", "/api/v1/cluster", _) => self.cluster().await,
            ("GET", "/api/v1/users", _) => self.users().await,
            ("GET", "/api/v1/rules", _) => self.rules().await,
            ("POST", "/api/v1/rules", _) => self.add_rule(&request, proof).await,
            ("DELETE", "/api/v1/rules", _) => self.remove_rule(&request, proof).await,
            ("GET", "/api/v1/clients", _) => self.clients(&request),
            ("GET", _, Some(id)) => self.client(id),
            ("DELETE", _, Some(id)) => self.disconnect(id),
            ("GET", "/api/v1/sessions", _) => self.sessions(&request),
            ("GET", "/api/v1/retained", _) => self.retained(&request).await,
            ("DELETE", "/api/v1/retained", _) => self.clear_retained(&request).await,
            ("POST", "/api/v1/publish", _) => self.publish(&request).await,
            ("GET", "/api/v1/bridges", _) => self.bridges(),
            ("GET", "/api/v1/behind", _) => self.behind(&request).await,
            ("GET", "/api/v1/messages", _) => self.find(&request).await,
            (_, "/console" | "/api/v1/overview" | "/api/v1/clients" | "/api/v1/sessions", _)
            | (_, "/api/v1/history" | "/api/v1/login" | "/api/v1/logout", _)
            | (_, "/api/v1/cluster" | "/api/v1/users" | "/api/v1/rules", _)
            | (_, "/api/v1/retained" | "/api/v1/publish" | "/api/v1/bridges", _)
            | (_, "/api/v1/behind" | "/api/v1/messages", _)
            | (_, _, Some(_)) => error(405, "method not allowed here"),
            _ => error(404, "no such endpoint"),
        }
    }

    /// Stored sessions, online and offline, whatever their host, with what each is owed: a
    /// page in client id order (`after`: the last id of the previous page; `search`: a client
    /// id prefix; `limit` up to 200, default 50). Each session's owed messages are counted
    /// up to [`BEHIND_COUNTED`] (`owedComplete` false beyond); `connectedHere` says whether its
    /// client is connected to this edge. With `sort=owed`: instead the `limit` most owed of
    /// all the prefix's sessions, most first, those owed nothing left out, counted by the
    /// worker's sweep; `ranked` says how many were counted, whether that was all, whether the
    /// sweep is still `counting` (then the ranking so far: ask again) and when it started.
    async fn behind(&self, request: &HttpRequest) -> HttpResponse {
        let limit = request
            .param("limit")
            .and_then(|l| l.parse::<u32>().ok())
            .unwrap_or(50)
            .clamp(1, 200);
        let prefix = request.param("search").unwrap_or("").to_owned();
        let by_owed = request.param("sort") == Some("owed");
        let ask = if by_owed {
            Request::MostOwed {
                prefix,
                scan: u32::MAX,
                top: limit,
                owed_limit: BEHIND_COUNTED,
            }
        } else {
            Request::Sessions {
                after: request
                    .param("after")
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned),
                prefix,
                limit,
                owed_limit: BEHIND_COUNTED,
            }
        };
        let (sessions, ranked) = match self.ask(ask).await {
            Ok(Reply::Sessions { sessions }) => (sessions, None),
            Ok(Reply::Ranked {
                sessions,
                scanned,
                complete,
                counting,
                as_of_ms,
            }) => (
                sessions,
                Some(json!({
                    "scanned": scanned,
                    "complete": complete,
                    "counting": counting,
                    "asOf": as_of_ms,
                })),
            ),
            Ok(other) => return error(502, format!("unexpected reply {other:?}")),
            Err(response) => return response,
        };
        let now = wharf_shared::now_ms();
        let next = (!by_owed && sessions.len() == limit as usize)
            .then(|| sessions.last().map(|s| s.client_id.clone()))
            .flatten();
        let rows: Vec<Value> = sessions
            .iter()
            .map(|s| {
                json!({
                    "clientId": s.client_id,
                    "host": s.host,
                    "connectedHere": self.broker.router.session(&s.client_id).is_some(),
                    "expiresAt": s.expires_ms,
                    "updatedAt": s.updated_ms,
                    "owed": s.owed,
                    "owedComplete": s.owed_complete,
                    "oldestOwedAgeMs": s.oldest_owed_ms.map(|t| (now - t).max(0)),
                })
            })
            .collect();
        reply(
            200,
            json!({ "sessions": rows, "next": next, "ranked": ranked }),
        )
    }

    /// Stored messages on exactly `topic` created at or after `since` (Unix ms, default an
    /// hour ago), oldest first, a page of `limit` (up to 500, default 50); `after` (the
    /// previous page's `next`) continues. Payloads are cut to 200 bytes here; a message's own
    /// page has all of it.
    async fn find(&self, request: &HttpRequest) -> HttpResponse {
        let Some(topic) = request.param("topic").filter(|t| !t.is_empty()) else {
            return error(400, "which topic: ?topic=...");
        };
        if !wharf_shared::topic::valid_topic_name(topic) {
            return error(400, format!("{topic:?} is not a topic name"));
        }
        let after = match request.param("after").filter(|a| !a.is_empty()) {
            Some(after) => match cursor_of(after) {
                Some(cursor) => cursor,
                None => return error(400, "\"after\" is a page's \"next\""),
            },
            None => match request.param("since").filter(|s| !s.is_empty()) {
                Some(since) => match since.parse::<i64>() {
                    Ok(ms) => wharf_shared::Cursor::since(ms),
                    Err(_) => return error(400, "\"since\" is a time in Unix milliseconds"),
                },
                None => wharf_shared::Cursor::since(wharf_shared::now_ms() - 3_600_000),
            },
        };
        let limit = request
            .param("limit")
            .and_then(|l| l.parse::<u32>().ok())
            .unwrap_or(50)
            .clamp(1, 500);
        let request = Request::Find {
            topic: topic.to_owned(),
            after,
            limit,
        };
        match self.ask(request).await {
            Ok(Reply::Messages { messages, next }) => {
                let rows: Vec<Value> = messages
                    .iter()
                    .map(|m| {
                        let mut row = message_json(m, 200);
                        row["id"] = m.id.to_hex().into();
                        row
                    })
                    .collect();
                let next = next.map(|c| format!("{}-{}", c.created_ms, c.id.to_hex()));
                reply(200, json!({ "messages": rows, "next": next }))
            }
            Ok(other) => error(502, format!("unexpected reply {other:?}")),
            Err(response) => response,
        }
    }

    /// Where the message `id` went: the message as stored and every stored subscription its
    /// topic matches (up to [`TRACED_RECIPIENTS`]), each `delivered` (with when and by which
    /// host), `owed`, `subscribedAfter`, `ownMessage` (No Local) or `expired`.
    async fn trace(&self, id: &str) -> HttpResponse {
        let Some(id) = wharf_shared::MessageId::from_hex(id) else {
            return error(400, "a message id is 24 hexadecimal digits");
        };
        let request = Request::Trace {
            id,
            limit: TRACED_RECIPIENTS,
        };
        match self.ask(request).await {
            Ok(Reply::Trace { message: None, .. }) => error(
                404,
                format!(
                    "message {} is not in the store (never stored, or past its TTL)",
                    id.to_hex()
                ),
            ),
            Ok(Reply::Trace {
                message: Some(message),
                recipients,
                complete,
            }) => {
                let mut body = message_json(&message, usize::MAX);
                body["id"] = message.id.to_hex().into();
                body["retain"] = message.retain.into();
                body["expiresAt"] = message.expires_ms().into();
                let count = |f: fn(&wharf_shared::Fate) -> bool| {
                    recipients.iter().filter(|r| f(&r.fate)).count()
                };
                body["delivered"] =
                    count(|f| matches!(f, wharf_shared::Fate::Delivered { .. })).into();
                body["owed"] = count(|f| matches!(f, wharf_shared::Fate::Owed)).into();
                body["complete"] = complete.into();
                body["recipients"] = recipients
                    .iter()
                    .map(|r| {
                        let (fate, at, host) = match &r.fate {
                            wharf_shared::Fate::Delivered { at_ms, host } => {
                                ("delivered", *at_ms, host.clone())
                            }
                            wharf_shared::Fate::Owed => ("owed", None, None),
                            wharf_shared::Fate::SubscribedAfter => ("subscribedAfter", None, None),
                            wharf_shared::Fate::OwnMessage => ("ownMessage", None, None),
                            wharf_shared::Fate::Expired => ("expired", None, None),
                        };
                        json!({
                            "clientId": r.client_id,
                            "group": wharf_shared::topic::shared(&r.filter).is_some(),
                            "filter": r.filter,
                            "qos": r.qos.as_u8(),
                            "subscribedAt": r.subscribed_ms,
                            "fate": fate,
                            "deliveredAt": at,
                            "deliveredBy": host,
                            "connectedHere": self.broker.router.session(&r.client_id).is_some(),
                        })
                    })
                    .collect::<Vec<Value>>()
                    .into();
                reply(200, body)
            }
            Ok(other) => error(502, format!("unexpected reply {other:?}")),
            Err(response) => response,
        }
    }

    /// Every host of the cluster as it last reported itself through the store (every 5 s):
    /// its edge (connections, parked sessions, rates, listeners), its worker (bytes queued for
    /// the store, the oldest unwritten message) and what it owns (shared groups, bridges).
    /// A host whose report is older than three periods is `reporting: false` (gone, or cut
    /// off from its worker or the store).
    async fn cluster(&self) -> HttpResponse {
        let hosts = match self.ask(Request::Cluster).await {
            Ok(Reply::Cluster { hosts }) => hosts,
            Ok(other) => return error(502, format!("unexpected reply {other:?}")),
            Err(response) => return response,
        };
        let now = wharf_shared::now_ms();
        let mut rows: Vec<Value> = hosts
            .iter()
            .map(|h| {
                let age = (now - h.written_ms).max(0);
                let bridges: Vec<Value> = h
                    .bridges
                    .iter()
                    .map(|(name, state)| json!({ "name": name, "state": state }))
                    .collect();
                json!({
                    "host": h.host,
                    "here": h.host == self.broker.config.host,
                    "reporting": age < 3 * wharf_shared::STATUS_EVERY_MS,
                    "reportAgeMs": age,
                    "version": h.version,
                    "startedAt": h.started_ms,
                    "connections": h.connections,
                    "parkedSessions": h.parked_sessions,
                    "messagesInPerSec": h.messages_in_per_sec,
                    "messagesOutPerSec": h.messages_out_per_sec,
                    "listeners": h.listeners,
                    "groups": h.groups,
                    "bridges": bridges,
                    "workerQueuedBytes": h.worker_queued_bytes,
                    "workerOldestUnwrittenAgeMs": h.worker_oldest_unwritten_ms.map(|t| (now - t).max(0)),
                })
            })
            .collect();
        rows.sort_by(|a, b| a["host"].as_str().cmp(&b["host"].as_str()));
        reply(
            200,
            json!({ "host": self.broker.config.host, "hosts": rows }),
        )
    }

    /// Who made a change, for the store's document and the log: the admin user, how it
    /// proved it, and from where.
    fn who(&self, request: &HttpRequest, proof: Proof) -> String {
        let how = match proof {
            Proof::Credentials => "credentials",
            Proof::Cookie => "console login",
        };
        let from = request
            .peer
            .map_or_else(|| "?".to_owned(), |p| p.ip().to_string());
        format!(
            "{} ({how}, from {from}, via {})",
            self.user, self.broker.config.host
        )
    }

    /// The users or rules in the store can be changed here only when this edge reads them
    /// from the store (`--store-users`, `--store-acl`; MongoDB).
    fn store_auth(&self, users: bool) -> Result<(), HttpResponse> {
        let settings = self.broker.auth.settings();
        let on = if users {
            settings.store_users
        } else {
            settings.store_rules
        };
        if on {
            Ok(())
        } else {
            Err(error(
                409,
                if users {
                    "this edge does not read users from the store (MongoDB backend, --store-users true)"
                } else {
                    "this edge does not read rules from the store (MongoDB backend, --store-acl true)"
                },
            ))
        }
    }

    async fn load_auth(
        &self,
        users: bool,
    ) -> Result<(Vec<StoredUser>, Vec<StoredRule>), HttpResponse> {
        self.store_auth(users)?;
        match self
            .ask(Request::LoadAuth {
                users,
                rules: !users,
            })
            .await?
        {
            Reply::Auth { users, rules } => Ok((users, rules)),
            other => Err(error(502, format!("unexpected reply {other:?}"))),
        }
    }

    /// The users in the store: names, whether superusers, and their hashes' kinds (never
    /// the hashes).
    async fn users(&self) -> HttpResponse {
        let (mut users, _) = match self.load_auth(true).await {
            Ok(found) => found,
            Err(response) => return response,
        };
        users.sort_by(|a, b| a.username.cmp(&b.username));
        let rows: Vec<Value> = users
            .iter()
            .map(|u| {
                json!({
                    "username": u.username,
                    "superuser": u.superuser,
                    "hash": hash_kind(&u.password_hash),
                })
            })
            .collect();
        reply(200, json!({ "users": rows }))
    }

    /// `PUT /api/v1/users/{name}` with `{"password", "superuser"}`: adds the user or replaces
    /// its password and flag, stored as an argon2id hash. Effective on every edge at its next
    /// read of the store (every 2 s).
    async fn put_user(&self, name: &str, request: &HttpRequest, proof: Proof) -> HttpResponse {
        if let Err(response) = self.store_auth(true) {
            return response;
        }
        if name.is_empty() || name.chars().any(char::is_control) || name.len() > 256 {
            return error(
                400,
                "a user name is 1 to 256 characters, none of them control characters",
            );
        }
        let body: Value = match serde_json::from_slice(&request.body) {
            Ok(v) => v,
            Err(e) => return error(400, format!("JSON body expected: {e}")),
        };
        let Some(password) = body["password"].as_str() else {
            return error(400, "\"password\" (a string) is required");
        };
        if password.len() < 8 {
            return error(400, "a password has at least 8 characters");
        }
        let superuser = match &body["superuser"] {
            Value::Null => false,
            Value::Bool(b) => *b,
            _ => return error(400, "\"superuser\" is true or false"),
        };
        let password = password.to_owned();
        let hash = match tokio::task::spawn_blocking(move || {
            crate::auth::password::Hash::new_argon2id(password.as_bytes())
        })
        .await
        {
            Ok(Ok(hash)) => hash.to_string(),
            Ok(Err(e)) => return error(500, e),
            Err(e) => return error(500, e),
        };
        let user = StoredUser {
            username: name.to_owned(),
            password_hash: hash,
            salt: None,
            superuser,
        };
        let by = self.who(request, proof);
        let done = json!({ "username": name, "superuser": superuser });
        self.change("user", Request::PutUser { user, by }, done)
            .await
    }

    /// Makes a change to the store's users or rules, counted once made; logged by the worker,
    /// with who asked (`by`).
    async fn change(&self, what: &'static str, ask: Request, done: Value) -> HttpResponse {
        match self.ask(ask).await {
            Ok(_) => {
                metrics::counter!("wharf_edge_admin_changes_total", "what" => what).increment(1);
                reply(200, done)
            }
            Err(response) => response,
        }
    }

    async fn delete_user(&self, name: &str, request: &HttpRequest, proof: Proof) -> HttpResponse {
        if let Err(response) = self.store_auth(true) {
            return response;
        }
        let ask = Request::DeleteUser {
            username: name.to_owned(),
            by: self.who(request, proof),
        };
        self.change("user", ask, json!({ "removed": name })).await
    }

    /// The rules in the store, as read (EMQX's shape).
    async fn rules(&self) -> HttpResponse {
        let (_, rules) = match self.load_auth(false).await {
            Ok(found) => found,
            Err(response) => return response,
        };
        let rows: Vec<Value> = rules.iter().map(rule_json).collect();
        reply(200, json!({ "rules": rows }))
    }

    /// `POST /api/v1/rules` with `{"username"?, "clientid"?, "permission", "action",
    /// "topics"}`: checked as every edge will read it (a rule that would make the store's set
    /// unusable is refused with the reason), then added.
    async fn add_rule(&self, request: &HttpRequest, proof: Proof) -> HttpResponse {
        if let Err(response) = self.store_auth(false) {
            return response;
        }
        let rule = match rule_of_body(&request.body) {
            Ok(rule) => rule,
            Err(why) => return error(400, why),
        };
        let added = rule.clone();
        if let Err(e) = self
            .broker
            .auth
            .check_store_change(move |store| store.rules.push(added))
        {
            return error(400, format!("refused: {e}"));
        }
        let done = json!({ "added": rule_json(&rule) });
        let by = self.who(request, proof);
        self.change("rule", Request::PutRule { rule, by }, done)
            .await
    }

    /// `DELETE /api/v1/rules` with the rule's fields as `GET` lists them: removes the rules
    /// with exactly those fields.
    async fn remove_rule(&self, request: &HttpRequest, proof: Proof) -> HttpResponse {
        if let Err(response) = self.store_auth(false) {
            return response;
        }
        let rule = match rule_of_body(&request.body) {
            Ok(rule) => rule,
            Err(why) => return error(400, why),
        };
        let done = json!({ "removed": rule_json(&rule) });
        let by = self.who(request, proof);
        self.change("rule", Request::DeleteRule { rule, by }, done)
            .await
    }

    /// Each bridge's state on this host (`standby` where another host runs it).
    fn bridges(&self) -> HttpResponse {
        let bridges: Vec<Value> = self.broker.bridges.iter().map(|b| b.status()).collect();
        reply(
            200,
            json!({ "host": self.broker.config.host, "bridges": bridges }),
        )
    }

    fn overview(&self) -> HttpResponse {
        let broker = &self.broker;
        let config = &broker.config;
        let listeners: Vec<Value> = config
            .listener_addresses()
            .map(|(kind, addr)| json!({ "kind": kind.name(), "address": addr.to_string() }))
            .collect();
        reply(
            200,
            json!({
                "host": config.host,
                "version": env!("CARGO_PKG_VERSION"),
                "connections": broker.router.sessions().len(),
                "parkedSessions": broker.registry.parked().len(),
                "workerLinkUp": broker.link.is_up(),
                "listeners": listeners,
            }),
        )
    }

    /// One connected client as listed; `subscriptions` its filters.
    fn summary(&self, id: &str, tx: &crate::router::SessionTx, subscriptions: usize) -> Value {
        let now = crate::ids::now_ms();
        json!({
            "clientId": id,
            "address": tx.client.peer.to_string(),
            "protocol": tx.client.version.label(),
            "connectedAt": tx.client.connected_ms,
            "connectedSeconds": (now - tx.client.connected_ms).max(0) / 1000,
            "subscriptions": subscriptions,
            "queued": tx.queued(),
            "inflight": tx.inflight(),
            "lagMs": tx.lagging_since().map(|since| (now - since).max(0)),
        })
    }

    fn clients(&self, request: &HttpRequest) -> HttpResponse {
        let search = request.param("search").unwrap_or("").to_lowercase();
        let limit = request
            .param("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(100);
        let mut sessions = self.broker.router.sessions();
        sessions.retain(|(id, tx)| {
            search.is_empty()
                || id.to_lowercase().contains(&search)
                || tx.client.peer.to_string().contains(&search)
        });
        sessions.sort_by(|a, b| a.0.cmp(&b.0));
        let total = sessions.len();
        let counts = self.broker.router.subscription_counts();
        let clients: Vec<Value> = sessions
            .iter()
            .take(limit)
            .map(|(id, tx)| self.summary(id, tx, counts.get(id).copied().unwrap_or(0)))
            .collect();
        reply(200, json!({ "total": total, "clients": clients }))
    }

    fn client(&self, id: &str) -> HttpResponse {
        let Some(tx) = self.broker.router.session(id) else {
            return error(404, format!("client {id:?} is not connected to this edge"));
        };
        let mut subscriptions: Vec<(String, Grant)> = self
            .broker
            .router
            .subscriptions(Some(id))
            .into_iter()
            .map(|(_, filter, grant)| (filter, grant))
            .collect();
        subscriptions.sort_by(|a, b| a.0.cmp(&b.0));
        let mut detail = self.summary(id, &tx, subscriptions.len());
        detail["subscriptionList"] = subscriptions
            .iter()
            .map(|(filter, grant)| {
                json!({
                    "filter": filter,
                    "qos": grant.qos.as_u8(),
                    "noLocal": grant.no_local,
                    "retainAsPublished": grant.retain_as_published,
                    "identifier": (grant.identifier != 0).then_some(grant.identifier),
                })
            })
            .collect();
        reply(200, detail)
    }

    fn disconnect(&self, id: &str) -> HttpResponse {
        let Some(tx) = self.broker.router.session(id) else {
            return error(404, format!("client {id:?} is not connected to this edge"));
        };
        tracing::info!(client_id = %id, "disconnected through the admin API");
        tx.signal(crate::router::Signals::KICK);
        reply(200, json!({ "disconnected": id }))
    }

    fn sessions(&self, request: &HttpRequest) -> HttpResponse {
        let search = request.param("search").unwrap_or("").to_lowercase();
        let wanted = |id: &str| search.is_empty() || id.to_lowercase().contains(&search);
        let mut sessions: Vec<Value> = self
            .broker
            .router
            .sessions()
            .into_iter()
            .filter(|(id, _)| wanted(id))
            .map(|(id, tx)| {
                json!({ "clientId": &*id, "connected": true, "address": tx.client.peer.to_string() })
            })
            .collect();
        let now = Instant::now();
        for (id, filters, expires) in self.broker.registry.parked() {
            if wanted(&id) {
                sessions.push(json!({
                    "clientId": &*id,
                    "connected": false,
                    "subscriptions": filters,
                    "expiresInSeconds": expires.map(|at| at.saturating_duration_since(now).as_secs()),
                }));
            }
        }
        sessions.sort_by(|a, b| a["clientId"].as_str().cmp(&b["clientId"].as_str()));
        reply(200, json!({ "sessions": sessions }))
    }

    async fn ask(&self, request: Request) -> Result<Reply, HttpResponse> {
        let rx = self
            .broker
            .link
            .request(request, crate::link::Policy::FailFast)
            .await
            .map_err(|e| error(503, format!("store-worker: {e}")))?;
        match rx.await {
            Ok(Ok(Reply::Failed { reason, .. })) => Err(error(502, reason)),
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(error(503, format!("store-worker: {e}"))),
            Err(_) => Err(error(503, "store-worker link closed")),
        }
    }

    async fn retained(&self, request: &HttpRequest) -> HttpResponse {
        let filter = request.param("filter").unwrap_or("#").to_owned();
        if !wharf_shared::topic::valid_filter(&filter) {
            return error(400, format!("{filter:?} is not a topic filter"));
        }
        match self.ask(Request::Retained { filter }).await {
            Ok(Reply::Messages { messages, .. }) => {
                let now = wharf_shared::now_ms();
                let retained: Vec<Value> = messages
                    .iter()
                    .filter(|m| !m.expired(now))
                    .map(|m| message_json(m, usize::MAX))
                    .collect();
                reply(200, json!({ "retained": retained }))
            }
            Ok(other) => error(502, format!("unexpected reply {other:?}")),
            Err(response) => response,
        }
    }

    async fn clear_retained(&self, request: &HttpRequest) -> HttpResponse {
        let Some(topic) = request.param("topic").map(str::to_owned) else {
            return error(400, "which retained message: ?topic=...");
        };
        if !wharf_shared::topic::valid_topic_name(&topic) {
            return error(400, format!("{topic:?} is not a topic name"));
        }
        match self
            .ask(Request::ClearRetained {
                topic: topic.clone(),
            })
            .await
        {
            Ok(_) => {
                tracing::info!(%topic, "retained message cleared through the admin API");
                reply(200, json!({ "cleared": topic }))
            }
            Err(response) => response,
        }
    }

    /// Publishes a message as the client `wharf-admin`: stored and routed as any other
    /// (QoS 1/2 answered once durable).
    async fn publish(&self, request: &HttpRequest) -> HttpResponse {
        let body: Value = match serde_json::from_slice(&request.body) {
            Ok(v) => v,
            Err(e) => return error(400, format!("JSON body expected: {e}")),
        };
        let Some(topic) = body["topic"].as_str() else {
            return error(400, "\"topic\" (a string) is required");
        };
        if !wharf_shared::topic::valid_topic_name(topic) {
            return error(400, format!("{topic:?} is not a topic name"));
        }
        let payload = match (&body["payload"], &body["payloadBase64"]) {
            (Value::String(s), _) => s.as_bytes().to_vec(),
            (_, Value::String(b)) => match base64::engine::general_purpose::STANDARD.decode(b) {
                Ok(p) => p,
                Err(e) => return error(400, format!("payloadBase64: {e}")),
            },
            (Value::Null, Value::Null) => Vec::new(),
            _ => return error(400, "\"payload\" must be a string"),
        };
        let qos = match body["qos"].as_u64().unwrap_or(0) {
            0 => Qos::AtMostOnce,
            1 => Qos::AtLeastOnce,
            2 => Qos::ExactlyOnce,
            _ => return error(400, "\"qos\" must be 0, 1 or 2"),
        };
        if payload.len() > self.broker.config.limits.max_packet_size {
            return error(413, "payload larger than the packet size limit");
        }
        let retain = body["retain"].as_bool().unwrap_or(false);
        let mut message =
            self.broker
                .message("wharf-admin", topic.to_owned(), &payload, qos, retain);
        message.properties = self.broker.stamp_identity(None, "wharf-admin", None);
        let id = message.id.to_string();
        match self.broker.clone().publish(message).await {
            Ok(()) => reply(
                200,
                json!({ "published": id, "topic": topic, "qos": qos.as_u8() }),
            ),
            Err(why) => error(503, why),
        }
    }
}

/// A message as the API shows it, with at most `most` bytes of its payload (`truncated` when
/// cut; `size` is the whole payload's).
fn message_json(m: &Message, most: usize) -> Value {
    let shown = &m.payload[..m.payload.len().min(most)];
    json!({
        "topic": m.topic,
        "payload": std::str::from_utf8(shown).ok(),
        "payloadBase64": base64::engine::general_purpose::STANDARD.encode(shown),
        "size": m.payload.len(),
        "truncated": shown.len() < m.payload.len(),
        "qos": m.qos.as_u8(),
        "clientId": m.client_id,
        "host": m.host,
        "createdAt": m.created_ms,
    })
}

/// A rule as the API shows it (EMQX's field names).
fn rule_json(r: &StoredRule) -> Value {
    json!({
        "username": r.username,
        "clientid": r.client_id,
        "permission": r.permission,
        "action": r.action,
        "topics": r.topics,
    })
}

/// A rule from a request's JSON body: `permission` allow/deny, `action`
/// publish/subscribe/all, `topics` a non-empty list of strings, `username` and `clientid`
/// strings when given; no other fields.
fn rule_of_body(body: &[u8]) -> Result<StoredRule, String> {
    let body: Value =
        serde_json::from_slice(body).map_err(|e| format!("JSON body expected: {e}"))?;
    let Some(fields) = body.as_object() else {
        return Err("a rule is a JSON object".into());
    };
    if let Some(unknown) = fields.keys().find(|k| {
        !matches!(
            k.as_str(),
            "username" | "clientid" | "permission" | "action" | "topics"
        )
    }) {
        return Err(format!("unknown field {unknown:?}"));
    }
    let optional = |name: &str| match &body[name] {
        Value::Null => Ok(None),
        Value::String(s) if !s.is_empty() => Ok(Some(s.clone())),
        _ => Err(format!("\"{name}\" is a non-empty string when given")),
    };
    let permission = body["permission"].as_str().unwrap_or("");
    if !matches!(permission, "allow" | "deny") {
        return Err("\"permission\" is \"allow\" or \"deny\"".into());
    }
    let action = body["action"].as_str().unwrap_or("");
    if !matches!(action, "publish" | "subscribe" | "all") {
        return Err("\"action\" is \"publish\", \"subscribe\" or \"all\"".into());
    }
    let topics: Option<Vec<String>> = body["topics"]
        .as_array()
        .map(|t| t.iter().map(|t| t.as_str().map(str::to_owned)).collect())
        .unwrap_or(None);
    let topics = match topics {
        Some(t) if !t.is_empty() && t.iter().all(|t| !t.is_empty()) => t,
        _ => return Err("\"topics\" is a non-empty list of non-empty strings".into()),
    };
    Ok(StoredRule {
        username: optional("username")?,
        client_id: optional("clientid")?,
        permission: permission.to_owned(),
        action: action.to_owned(),
        topics,
    })
}

/// The kind of a stored password hash, for the user list.
fn hash_kind(hash: &str) -> &'static str {
    if hash.starts_with("$argon2") {
        "argon2"
    } else if hash.starts_with("$2") {
        "bcrypt"
    } else if hash.starts_with("$7$") {
        "pbkdf2-sha512"
    } else if hash.starts_with("$6$") {
        "sha512 (salted)"
    } else {
        "digest"
    }
}

/// A page's `next` (`<created ms>-<id hex>`) as a cursor.
fn cursor_of(text: &str) -> Option<wharf_shared::Cursor> {
    let (ms, id) = text.split_once('-')?;
    Some(wharf_shared::Cursor {
        created_ms: ms.parse().ok()?,
        id: wharf_shared::MessageId::from_hex(id)?,
    })
}
