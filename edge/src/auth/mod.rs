//! Who may connect, and what each client may do with each topic.
//!
//! Authentication happens once, at CONNECT: a user name and password checked against a
//! Mosquitto `password_file` (hashes only, see [`password`]), or a TLS client certificate's
//! identity taken as the user name, or no credentials at all where anonymous clients are
//! allowed. Hashing is slow on purpose, so it runs on tokio's blocking threads, one check at a
//! time, never on the threads that move messages; a check that waits longer than the CONNECT
//! timeout for its turn is refused as "server busy". Recent successful checks are remembered
//! (a keyed digest of the password, never the password), so a reconnect storm of known
//! devices costs no hashing.
//!
//! Authorization ([`acl`]) is asked for every topic a client touches: SUBSCRIBE, PUBLISH, the
//! will at CONNECT, and every message at the moment it is written to the client, so a revoked
//! permission stops what is stored, retained or already subscribed to as well.
//!
//! Both files are read at start (an unusable one is an error naming it), and again on SIGHUP
//! or when their etcd keys change; a reload that fails keeps the rules in force.

pub mod acl;
pub mod password;

use crate::protocol::encode::Refusal;
use acl::{Access, Acl, Who};
use password::PasswordFile;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::Semaphore;
use wharf_ops::config::ConfigError;

/// What a 3.1/3.1.1 client's PUBLISH to a topic it may not write gets (5.0 clients get a
/// PUBACK or PUBREC with reason 0x87).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PublishDenied {
    /// Acknowledged and dropped, as Mosquitto does: the client cannot tell.
    #[default]
    Drop,
    /// The connection is closed.
    Disconnect,
}

impl std::str::FromStr for PublishDenied {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "drop" => Ok(PublishDenied::Drop),
            "disconnect" => Ok(PublishDenied::Disconnect),
            _ => Err("expected drop or disconnect".into()),
        }
    }
}

/// The authentication and authorization settings (flags, environment, etcd).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuthSettings {
    /// Mosquitto `password_file`: user names and password hashes.
    pub password_file: Option<PathBuf>,
    /// Mosquitto `acl_file`: topic rules. Without one every client may use every topic.
    pub acl_file: Option<PathBuf>,
    /// `None`: anonymous clients are served only while no password file is configured, and
    /// then the listeners must be on loopback (or require client certificates).
    pub allow_anonymous: Option<bool>,
    /// A verified TLS client certificate's identity (CN, else the first SAN) is the user name,
    /// with no password (Mosquitto's `use_identity_as_username`).
    pub identity_as_username: bool,
    pub publish_denied: PublishDenied,
    /// Users from the store's users collection (MongoDB), read every few seconds.
    pub store_users: bool,
    /// Rules from the store's authorization collection (MongoDB), read every few seconds.
    pub store_rules: bool,
    /// A store document's salted digest has the salt before the password (EMQX `prefix`).
    pub salt_first: bool,
    /// What a topic no rule matches gets: denied (the default, as in Mosquitto) or allowed.
    pub no_match_allows: bool,
}

impl AuthSettings {
    /// No password file and no explicit choice about anonymous clients: Wharf then serves
    /// anonymous clients on loopback only (as Mosquitto 2.0 does without a configuration).
    pub fn local_only(&self) -> bool {
        self.allow_anonymous.is_none() && !self.has_users()
    }

    fn has_users(&self) -> bool {
        self.password_file.is_some() || self.store_users
    }

    fn anonymous(&self) -> bool {
        self.allow_anonymous.unwrap_or(!self.has_users())
    }

    /// Whether the store must be asked for users or rules.
    pub fn uses_store(&self) -> bool {
        self.store_users || self.store_rules
    }

    /// One source each for users and for rules.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.password_file.is_some() && self.store_users {
            return Err(ConfigError::new(
                "storeUsers",
                "true",
                "users come from passwordFile or from the store, not both",
            ));
        }
        if self.acl_file.is_some() && self.store_rules {
            return Err(ConfigError::new(
                "storeAcl",
                "true",
                "rules come from aclFile or from the store, not both",
            ));
        }
        Ok(())
    }

    /// Refuses a configuration that would serve anonymous clients on the network without
    /// anyone having said so. `listeners`: each address, and whether it requires a client
    /// certificate.
    pub fn check_exposure(&self, listeners: &[(SocketAddr, bool)]) -> Result<(), ConfigError> {
        self.check()?;
        for (addr, certs_required) in listeners {
            if self.local_only() && !addr.ip().is_loopback() && !certs_required {
                return Err(ConfigError::new(
                    "listen",
                    addr.to_string(),
                    "no authentication is configured, so anonymous clients are served on \
                     loopback only: set passwordFile (or allowAnonymous true to serve \
                     anonymous clients on the network)",
                ));
            }
        }
        Ok(())
    }

    /// Says at start how clients are admitted.
    pub fn log_exposure(&self, listeners: &[(SocketAddr, bool)]) {
        if self.local_only() {
            tracing::info!("no authentication configured: serving anonymous clients on loopback only (set passwordFile, or allowAnonymous true, to serve the network)");
        } else if self.anonymous() {
            let open: Vec<String> = listeners
                .iter()
                .filter(|(addr, certs)| !addr.ip().is_loopback() && !certs)
                .map(|(addr, _)| addr.to_string())
                .collect();
            if !open.is_empty() {
                tracing::warn!(listeners = ?open, "allowAnonymous is true: anonymous clients are served on the network");
            }
        }
    }
}

/// The rules in force; replaced whole on reload, and then marked stale so that sessions
/// holding it pick up the new one.
#[derive(Debug, Default)]
pub struct Policy {
    passwords: Option<PasswordFile>,
    /// Users are configured to come from the store and have not come yet: CONNECTs with a
    /// user name are answered "server unavailable" until they do.
    users_pending: bool,
    /// Store users flagged as superusers: every topic is theirs.
    superusers: std::collections::HashSet<String>,
    acl: Option<Acl>,
    anonymous: bool,
    identity_as_username: bool,
    pub publish_denied: PublishDenied,
    stale: AtomicBool,
}

/// Reads and parses the file at `path`, if one is set; an error names the key and the file.
fn read_file<T, E: std::fmt::Display>(
    key: &str,
    path: &Option<PathBuf>,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<Option<T>, ConfigError> {
    let Some(path) = path else {
        return Ok(None);
    };
    let error = |e: String| ConfigError::new(key, path.display().to_string(), e);
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    parse(&text).map(Some).map_err(|e| error(e.to_string()))
}

/// The users and rules last read from the store.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoreAuth {
    pub users: Vec<wharf_shared::StoredUser>,
    pub rules: Vec<wharf_shared::StoredRule>,
}

impl Policy {
    /// `in_force`: the policy this one replaces, whose store rules stay if the store's new
    /// ones cannot be read.
    fn load(
        settings: &AuthSettings,
        store: Option<&StoreAuth>,
        in_force: Option<&Policy>,
    ) -> Result<Policy, ConfigError> {
        let passwords = read_file("passwordFile", &settings.password_file, PasswordFile::parse)?;
        let acl = read_file("aclFile", &settings.acl_file, Acl::parse)?;
        let (passwords, users_pending, superusers) = match (settings.store_users, store) {
            (false, _) => (passwords, false, Default::default()),
            (true, None) => (None, true, Default::default()),
            (true, Some(store)) => (
                Some(PasswordFile::from_documents(
                    &store.users,
                    settings.salt_first,
                )),
                false,
                store
                    .users
                    .iter()
                    .filter(|u| u.superuser)
                    .map(|u| u.username.clone())
                    .collect(),
            ),
        };
        let acl = match (settings.store_rules, store) {
            (false, _) => acl,
            // Until the rules come, nothing is allowed.
            (true, None) => Some(Acl::default()),
            (true, Some(store)) => match Acl::from_documents(&store.rules) {
                Ok(acl) => Some(acl),
                Err(e) => {
                    // Never a narrower reading of what the store says: the last rules read
                    // whole stay (none at start: nothing is allowed), until the documents
                    // are mended.
                    tracing::error!(error = %e, "the store's rules are refused; the rules in force stay");
                    metrics::counter!("wharf_edge_auth_reload_failures_total", "source" => "store")
                        .increment(1);
                    Some(in_force.and_then(|p| p.acl.clone()).unwrap_or_default())
                }
            },
        };
        let acl = acl.map(|a| a.with_no_match(settings.no_match_allows));
        Ok(Policy {
            passwords,
            users_pending,
            superusers,
            acl,
            anonymous: settings.anonymous(),
            identity_as_username: settings.identity_as_username,
            publish_denied: settings.publish_denied,
            stale: AtomicBool::new(false),
        })
    }

    fn superuser(&self, principal: Option<&Principal>) -> bool {
        principal.is_some_and(|p| p.bridge)
            || !self.superusers.is_empty()
                && principal
                    .and_then(|p| p.username.as_deref())
                    .is_some_and(|u| self.superusers.contains(u))
    }

    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    /// Whether `client` may read or write `topic`; everything without a rule file.
    pub fn allows(
        &self,
        client_id: &str,
        principal: Option<&Principal>,
        access: Access,
        topic: &str,
    ) -> bool {
        match &self.acl {
            None => true,
            Some(_) if self.superuser(principal) => true,
            Some(acl) => acl.allows(&who(client_id, principal), access, topic),
        }
    }

    /// Whether `client` may subscribe to `filter` (the real filter of a shared one).
    pub fn allows_subscribe(
        &self,
        client_id: &str,
        principal: Option<&Principal>,
        filter: &str,
    ) -> bool {
        match &self.acl {
            None => true,
            Some(_) if self.superuser(principal) => true,
            Some(acl) => acl.allows_subscribe(&who(client_id, principal), filter),
        }
    }
}

fn who<'a>(client_id: &'a str, principal: Option<&'a Principal>) -> Who<'a> {
    Who {
        client_id,
        username: principal.and_then(|p| p.username.as_deref()),
        identity: principal.and_then(|p| p.identity.as_deref()),
    }
}

/// Who a connection is, beyond its client id: kept only when there is something to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub username: Option<Arc<str>>,
    /// The TLS client certificate's identity.
    pub identity: Option<Arc<str>>,
    /// The user's stored hash the password was checked against, for a password login: a
    /// reload that removes the user or changes its password ends the connection
    /// ([`Auth::still_admits`]).
    pub login_hash: Option<password::Hash>,
    /// The edge's own bridge (see [`crate::tls::PeerIdentity::bridge`]): every rule allows it.
    pub bridge: bool,
}

impl Principal {
    pub fn bridge() -> Principal {
        Principal {
            username: None,
            identity: None,
            login_hash: None,
            bridge: true,
        }
    }
}

/// A CONNECT's credentials.
pub struct Credentials<'a> {
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// The verified client certificate's names (CN first), on TLS listeners.
    pub certificate: Option<&'a [String]>,
}

/// Successful checks kept, at most; past it the cache starts again.
const CACHE_ENTRIES: usize = 100_000;

pub struct Auth {
    settings: Mutex<AuthSettings>,
    policy: RwLock<Arc<Policy>>,
    /// user name -> keyed SHA-256 of the password last accepted for it.
    cache: Mutex<HashMap<Arc<str>, [u8; 32]>>,
    cache_key: [u8; 32],
    /// One hash at a time.
    hashing: Arc<Semaphore>,
    hashing_wait: Duration,
    /// The users and rules last read from the store, when they come from there.
    store: Mutex<Option<Arc<StoreAuth>>>,
    /// See [`Auth::users_generation`].
    users_generation: std::sync::atomic::AtomicU64,
}

impl Auth {
    pub fn load(settings: AuthSettings, hashing_wait: Duration) -> Result<Auth, ConfigError> {
        let policy = Policy::load(&settings, None, None)?;
        let mut cache_key = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut cache_key)
            .map_err(|_| ConfigError::new("passwordFile", "", "no system randomness"))?;
        Ok(Auth {
            settings: Mutex::new(settings),
            policy: RwLock::new(Arc::new(policy)),
            cache: Mutex::default(),
            cache_key,
            hashing: Arc::new(Semaphore::new(1)),
            hashing_wait,
            store: Mutex::default(),
            users_generation: Default::default(),
        })
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn settings(&self) -> AuthSettings {
        self.settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the files again (with new settings, if given). On error the rules in force stay.
    pub fn reload(&self, settings: Option<AuthSettings>) -> Result<(), ConfigError> {
        let settings = settings.unwrap_or_else(|| self.settings());
        let store = self.store.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let policy =
            Policy::load(&settings, store.as_deref(), Some(&self.policy())).inspect_err(|_| {
                metrics::counter!("wharf_edge_auth_reload_failures_total", "source" => "file")
                    .increment(1);
            })?;
        *self.settings.lock().unwrap_or_else(|e| e.into_inner()) = settings;
        self.swap(policy);
        tracing::info!("authentication and authorization rules reloaded");
        Ok(())
    }

    fn swap(&self, policy: Policy) {
        let same_users = match (&policy.passwords, &self.policy().passwords) {
            (Some(new), Some(old)) => new.same_users(old),
            (None, None) => true,
            _ => false,
        };
        if !same_users {
            self.users_generation.fetch_add(1, Ordering::Relaxed);
        }
        let old = std::mem::replace(
            &mut *self.policy.write().unwrap_or_else(|e| e.into_inner()),
            Arc::new(policy),
        );
        old.stale.store(true, Ordering::Relaxed);
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The users and rules just read from the store: applied if they differ from the last.
    pub fn apply_store(&self, snapshot: StoreAuth) -> Result<(), ConfigError> {
        {
            let last = self.store.lock().unwrap_or_else(|e| e.into_inner());
            if last.as_deref() == Some(&snapshot) {
                return Ok(());
            }
        }
        let snapshot = Arc::new(snapshot);
        let settings = self.settings();
        let policy = Policy::load(&settings, Some(&snapshot), Some(&self.policy()))?;
        tracing::info!(
            users = snapshot.users.len(),
            rules = snapshot.rules.len(),
            "users and rules read from the store"
        );
        *self.store.lock().unwrap_or_else(|e| e.into_inner()) = Some(snapshot);
        self.swap(policy);
        Ok(())
    }

    /// Whether the users and rules last read from the store still make a policy with
    /// `change` applied: the admin API checks a change so before it writes it, so that one
    /// bad rule never makes the whole set refused.
    pub fn check_store_change(
        &self,
        change: impl FnOnce(&mut StoreAuth),
    ) -> Result<(), ConfigError> {
        let mut snapshot = self
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            .cloned()
            .unwrap_or_default();
        change(&mut snapshot);
        let settings = self.settings();
        if settings.store_rules {
            // A set the edges cannot read is not an error to `Policy::load` (it keeps the
            // rules in force): asked here directly.
            Acl::from_documents(&snapshot.rules)
                .map_err(|e| ConfigError::new("rules", "(the store's)", e))?;
        }
        Policy::load(&settings, Some(&snapshot), None).map(|_| ())
    }

    fn digest(&self, password: &[u8]) -> [u8; 32] {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(&self.cache_key);
        context.update(password);
        let mut out = [0u8; 32];
        out.copy_from_slice(context.finish().as_ref());
        out
    }

    /// Who the client is, or why it is refused. The password is never logged.
    pub async fn authenticate(
        &self,
        credentials: Credentials<'_>,
    ) -> Result<Option<Principal>, Refusal> {
        let policy = self.policy();
        let identity: Option<Arc<str>> = credentials
            .certificate
            .and_then(|names| names.first())
            .map(|name| Arc::from(name.as_str()));
        if policy.identity_as_username {
            if let Some(name) = &identity {
                return Ok(Some(Principal {
                    username: Some(name.clone()),
                    identity: identity.clone(),
                    login_hash: None,
                    bridge: false,
                }));
            }
        }
        let principal = |username: Option<&str>| {
            (username.is_some() || identity.is_some()).then(|| Principal {
                username: username.map(Arc::from),
                identity: identity.clone(),
                login_hash: None,
                bridge: false,
            })
        };
        // A password login keeps the hash it was checked against.
        let logged_in = |user: &str| {
            let login_hash = policy
                .passwords
                .as_ref()
                .and_then(|p| p.hash_of(user))
                .cloned();
            Some(Principal {
                login_hash,
                ..principal(Some(user)).expect("a user name")
            })
        };
        if policy.users_pending && credentials.username.is_some() {
            failed("users_not_loaded", credentials.username);
            return Err(Refusal::ServerUnavailable);
        }
        if policy.passwords.is_none() {
            // No password file: a user name is taken as given (rules may still use it).
            return if policy.anonymous {
                Ok(principal(credentials.username))
            } else {
                failed("not_authorized", credentials.username);
                Err(Refusal::NotAuthorized)
            };
        }
        let Some(user) = credentials.username else {
            if credentials.password.is_some() {
                failed("bad_credentials", None);
                return Err(Refusal::BadUserNameOrPassword);
            }
            return if policy.anonymous {
                Ok(principal(None))
            } else {
                failed("not_authorized", None);
                Err(Refusal::NotAuthorized)
            };
        };
        let password = credentials.password.unwrap_or_default();
        let digest = self.digest(password);
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .is_some_and(|d| password::constant_time_eq(d, &digest));
        if cached {
            metrics::counter!("wharf_edge_auth_cache_hits_total").increment(1);
            return Ok(logged_in(user));
        }
        if credentials.password.is_none() {
            failed("bad_credentials", Some(user));
            return Err(Refusal::BadUserNameOrPassword);
        }
        let permit =
            match tokio::time::timeout(self.hashing_wait, self.hashing.clone().acquire_owned())
                .await
            {
                Ok(Ok(permit)) => permit,
                _ => {
                    failed("busy", Some(user));
                    return Err(Refusal::ServerBusy);
                }
            };
        let checked = {
            let policy = policy.clone();
            let user = user.to_owned();
            let password = password.to_vec();
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                policy
                    .passwords
                    .as_ref()
                    .is_some_and(|p| p.check(&user, &password))
            })
            .await
            .unwrap_or(false)
        };
        if !checked {
            failed("bad_credentials", Some(user));
            return Err(Refusal::BadUserNameOrPassword);
        }
        // Staleness is read under the cache's lock: a reload marks the old policy stale before
        // it clears the cache under that lock, so a check made against the old policy is
        // either refused here or cleared there, never kept past the reload.
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if !policy.is_stale() {
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(Arc::from(user), digest);
        }
        Ok(logged_in(user))
    }

    /// Whether a connection that logged in as `principal` would still be let in as it was:
    /// false once its user is gone from the password file or the store, or its hash changed.
    /// (A connection without a password login is left to the rules.)
    pub fn still_admits(&self, principal: Option<&Principal>) -> bool {
        let Some(hash) = principal.and_then(|p| p.login_hash.as_ref()) else {
            return true;
        };
        let policy = self.policy();
        match (
            &policy.passwords,
            principal.and_then(|p| p.username.as_deref()),
        ) {
            (Some(file), Some(user)) => file.hash_of(user) == Some(hash),
            // Passwords no longer checked (settings changed): nothing to hold it to.
            (None, _) => true,
            (Some(_), None) => false,
        }
    }

    /// Counts reloads whose users differ from the users before (see [`Auth::swap`]): the
    /// keepalive sweep then asks every session whether its login still holds.
    pub fn users_generation(&self) -> u64 {
        self.users_generation.load(Ordering::Relaxed)
    }
}

fn failed(reason: &'static str, username: Option<&str>) {
    metrics::counter!("wharf_edge_auth_failures_total", "reason" => reason).increment(1);
    tracing::info!(
        reason,
        username = username.unwrap_or(""),
        "authentication failed"
    );
}

/// The rules in force: a session's copy, taken again once a reload made it stale.
fn fresh<'a>(policy: &'a mut Arc<Policy>, auth: &Auth) -> &'a Policy {
    if policy.is_stale() {
        *policy = auth.policy();
    }
    policy
}

/// What a session holds to ask the rules: the policy it last read (replaced when it goes
/// stale) and who it is. 16 bytes in every connection.
pub struct SessionAuth {
    policy: Arc<Policy>,
    principal: Option<Box<Principal>>,
}

impl SessionAuth {
    pub fn new(policy: Arc<Policy>, principal: Option<Principal>) -> SessionAuth {
        SessionAuth {
            policy,
            principal: principal.map(Box::new),
        }
    }

    /// The rules this session read last (fresh at CONNECT).
    pub fn policy_now(&self) -> &Policy {
        &self.policy
    }

    pub fn publish_denied(&self) -> PublishDenied {
        self.policy.publish_denied
    }

    pub fn allows(&mut self, auth: &Auth, client_id: &str, access: Access, topic: &str) -> bool {
        fresh(&mut self.policy, auth).allows(client_id, self.principal.as_deref(), access, topic)
    }

    pub fn allows_subscribe(&mut self, auth: &Auth, client_id: &str, filter: &str) -> bool {
        fresh(&mut self.policy, auth).allows_subscribe(client_id, self.principal.as_deref(), filter)
    }

    pub fn principal(&self) -> Option<&Principal> {
        self.principal.as_deref()
    }
}

/// How often users and rules are read again from the store (once they have come; before,
/// every 200 ms): a change there is followed within this time.
pub const STORE_REFRESH: Duration = Duration::from_secs(2);

/// Reads the users and rules from the store while the settings say they live there.
pub async fn follow_store(
    auth: Arc<Auth>,
    link: crate::link::Link,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut loaded = false;
    let mut said = None::<String>;
    loop {
        let wait = if loaded {
            STORE_REFRESH
        } else {
            Duration::from_millis(200)
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
        let settings = auth.settings();
        if !settings.uses_store() {
            loaded = false;
            continue;
        }
        let request = wharf_shared::Request::LoadAuth {
            users: settings.store_users,
            rules: settings.store_rules,
        };
        let reply = match link.request(request, crate::link::Policy::FailFast).await {
            Ok(rx) => rx.await.unwrap_or(Err(crate::link::LinkError::Closed)),
            Err(e) => Err(e),
        };
        let problem = match reply {
            Ok(wharf_shared::Reply::Auth { users, rules }) => {
                loaded = true;
                auth.apply_store(StoreAuth { users, rules })
                    .err()
                    .map(|e| e.to_string())
            }
            Ok(wharf_shared::Reply::Failed { reason, .. }) => Some(reason),
            Ok(other) => Some(format!("unexpected reply {other:?}")),
            Err(e) => Some(e.to_string()),
        };
        // Said once per kind of trouble, not every 200 ms.
        if problem != said {
            if let Some(p) = &problem {
                tracing::error!(problem = %p, "users and rules not read from the store; the ones in force stay");
            }
            said = problem;
        }
    }
}
