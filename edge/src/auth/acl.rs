//! Topic authorization rules in Mosquitto's `acl_file` syntax.
//!
//! ```text
//! # rules before the first `user` line apply to clients without a user name
//! topic read public/#
//! user alice
//! topic readwrite alice/#        # access: read, write, readwrite (the default) or deny
//! pattern write dev/%c/telemetry # for every client: %c client id, %u user name,
//! pattern read dev/%c/cmd        # %i certificate identity (Wharf's), each a whole level
//! ```
//!
//! A client may do what one of its rules (its user's, or the anonymous ones) or a pattern
//! grants, unless a `deny` rule of either kind matches: deny wins, and nothing matched is
//! denied. Placeholders match a topic level equal to the value, never widen: a client id
//! holding `+`, `#` or `/` matches no topic. Wildcards at the start of a rule never match a
//! topic starting with `$`, as in subscriptions.

use std::collections::HashMap;

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// What a rule grants (or, with `deny`, refuses): reading, writing or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Grant {
    deny: bool,
    read: bool,
    write: bool,
}

impl Grant {
    const READ: Grant = Grant {
        deny: false,
        read: true,
        write: false,
    };
    const WRITE: Grant = Grant {
        deny: false,
        read: false,
        write: true,
    };
    const READ_WRITE: Grant = Grant {
        deny: false,
        read: true,
        write: true,
    };
    const DENY: Grant = Grant {
        deny: true,
        read: true,
        write: true,
    };

    fn covers(self, access: Access) -> bool {
        match access {
            Access::Read => self.read,
            Access::Write => self.write,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Exact(String),
    Plus,
    Hash,
    ClientId,
    UserName,
    Identity,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    grant: Grant,
    levels: Vec<Level>,
    /// EMQX's `eq topic`: the topic or filter must be exactly this, wildcards and all.
    exact: Option<String>,
    /// Only for this client id (a store document naming a user and a client).
    client: Option<String>,
}

/// Who is asking: the values the placeholders stand for.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub identity: Option<&'a str>,
}

impl Who<'_> {
    fn value(&self, level: &Level) -> Option<&str> {
        match level {
            Level::ClientId => Some(self.client_id),
            Level::UserName => self.username,
            Level::Identity => self.identity,
            _ => None,
        }
    }
}

fn is_wildcard(level: &str) -> bool {
    level == "+" || level == "#"
}

impl Rule {
    /// The level of a topic (or filter) that this rule level stands for, compared literally.
    fn level_is(&self, level: &Level, value: &str, who: &Who) -> bool {
        match level {
            Level::Exact(s) => s == value,
            Level::Plus | Level::Hash => true,
            placeholder => who
                .value(placeholder)
                .is_some_and(|v| !v.is_empty() && !is_wildcard(v) && v == value),
        }
    }

    fn starts_with_wildcard(&self) -> bool {
        matches!(self.levels.first(), Some(Level::Plus | Level::Hash))
    }

    /// Whether the rule is for this client at all.
    fn for_client(&self, who: &Who) -> bool {
        self.client.as_deref().is_none_or(|c| c == who.client_id)
    }

    /// Whether the topic name falls under this rule.
    fn matches(&self, topic: &str, who: &Who) -> bool {
        if let Some(exact) = &self.exact {
            return exact == topic;
        }
        if topic.starts_with('$') && self.starts_with_wildcard() {
            return false;
        }
        let mut levels = topic.split('/');
        for rule_level in &self.levels {
            if *rule_level == Level::Hash {
                return true;
            }
            match levels.next() {
                Some(level) if self.level_is(rule_level, level, who) => {}
                _ => return false,
            }
        }
        levels.next().is_none()
    }

    /// Whether every topic the filter can match falls under this rule.
    fn covers(&self, filter: &str, who: &Who) -> bool {
        if let Some(exact) = &self.exact {
            return exact == filter;
        }
        if filter.starts_with('$') && self.starts_with_wildcard() {
            return false;
        }
        let mut levels = filter.split('/');
        for rule_level in &self.levels {
            if *rule_level == Level::Hash {
                return true;
            }
            let Some(level) = levels.next() else {
                return false;
            };
            let covered = match rule_level {
                Level::Plus => level != "#",
                _ => !is_wildcard(level) && self.level_is(rule_level, level, who),
            };
            if !covered {
                return false;
            }
        }
        levels.next().is_none()
    }
}

/// A rule file that cannot be used: refused at start (and on reload), never read as "allow".
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("line {line}: {reason}")]
pub struct AclError {
    pub line: usize,
    pub reason: String,
}

#[derive(Debug, Default, Clone)]
pub struct Acl {
    /// Rules before the first `user` line: for clients without a user name.
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    /// Store documents naming a client id and no user.
    clients: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
    /// What nothing matched gets (Mosquitto: denied).
    no_match_allows: bool,
}

fn parse_rule(rest: &str, placeholders: bool) -> Result<Rule, String> {
    let rest = rest.trim();
    // As Mosquitto reads it: one word is a topic (read and write); with more, the first is
    // the access and the rest (spaces and all) the topic.
    let (grant, topic) = match rest.split_once(char::is_whitespace) {
        Some((word, topic)) => {
            let grant = match word {
                "read" => Grant::READ,
                "write" => Grant::WRITE,
                "readwrite" => Grant::READ_WRITE,
                "deny" => Grant::DENY,
                other => {
                    return Err(format!(
                        "{other:?} is not an access (read, write, readwrite or deny)"
                    ))
                }
            };
            (grant, topic.trim())
        }
        None => (Grant::READ_WRITE, rest),
    };
    Ok(Rule {
        grant,
        levels: parse_levels(topic, placeholders)?,
        exact: None,
        client: None,
    })
}

fn parse_levels(topic: &str, placeholders: bool) -> Result<Vec<Level>, String> {
    if topic.is_empty() {
        return Err("no topic".into());
    }
    if !wharf_shared::topic::valid_filter(topic) {
        return Err(format!("{topic:?} is not a valid topic filter"));
    }
    topic
        .split('/')
        .map(|level| match level {
            "+" => Ok(Level::Plus),
            "#" => Ok(Level::Hash),
            "%c" if placeholders => Ok(Level::ClientId),
            "%u" if placeholders => Ok(Level::UserName),
            "%i" if placeholders => Ok(Level::Identity),
            _ if placeholders
                && (level.contains("%c") || level.contains("%u") || level.contains("%i")) =>
            {
                Err(format!(
                    "{level:?}: a placeholder must be a whole topic level (so that no value widens it)"
                ))
            }
            _ => Ok(Level::Exact(level.to_owned())),
        })
        .collect()
}

/// One store document's rules (EMQX's MongoDB shape), or why it is skipped.
fn store_rules(doc: &wharf_shared::StoredRule) -> Result<Vec<Rule>, String> {
    let deny = match doc.permission.as_str() {
        "allow" => false,
        "deny" => true,
        other => return Err(format!("permission {other:?} (allow or deny)")),
    };
    let (read, write) = match doc.action.as_str() {
        "subscribe" => (true, false),
        "publish" => (false, true),
        "all" => (true, true),
        other => return Err(format!("action {other:?} (publish, subscribe or all)")),
    };
    let grant = Grant { deny, read, write };
    let client = doc.username.as_ref().and(doc.client_id.clone());
    doc.topics
        .iter()
        .map(|topic| {
            if let Some(exact) = topic.strip_prefix("eq ") {
                return Ok(Rule {
                    grant,
                    levels: Vec::new(),
                    exact: Some(exact.to_owned()),
                    client: client.clone(),
                });
            }
            // EMQX's placeholders, Mosquitto's spelling; a `%` of the topic's own is kept.
            let topic = topic
                .replace("${clientid}", "%c")
                .replace("${username}", "%u")
                .replace("${cert_common_name}", "%i");
            Ok(Rule {
                grant,
                levels: parse_levels(&topic, true)?,
                exact: None,
                client: client.clone(),
            })
        })
        .collect()
}

impl Acl {
    pub fn parse(text: &str) -> Result<Acl, AclError> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        let mut rules = 0;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let error = |reason: String| AclError {
                line: i + 1,
                reason,
            };
            let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            match keyword {
                "user" => {
                    let name = rest.trim();
                    if name.is_empty() {
                        return Err(error("user without a name".into()));
                    }
                    acl.users.entry(name.to_owned()).or_default();
                    user = Some(name.to_owned());
                }
                "topic" => {
                    let rule = parse_rule(rest, false).map_err(error)?;
                    match &user {
                        Some(name) => acl.users.entry(name.clone()).or_default().push(rule),
                        None => acl.anonymous.push(rule),
                    }
                    rules += 1;
                }
                "pattern" => {
                    acl.patterns.push(parse_rule(rest, true).map_err(error)?);
                    rules += 1;
                }
                other => {
                    return Err(error(format!(
                        "unknown keyword {other:?} (user, topic or pattern)"
                    )))
                }
            }
        }
        if rules == 0 {
            return Err(AclError {
                line: 0,
                reason: "no rules".into(),
            });
        }
        Ok(acl)
    }

    /// The rules of the store's documents (EMQX's MongoDB shape). A document that cannot be
    /// read refuses the whole set (the caller keeps the rules in force): skipped, a deny rule
    /// would let the allow rules beside it through.
    pub fn from_documents(docs: &[wharf_shared::StoredRule]) -> Result<Acl, String> {
        let mut acl = Acl::default();
        for doc in docs {
            let rules = store_rules(doc).map_err(|e| {
                format!(
                    "a rule document (username {:?}, clientid {:?}) cannot be read: {e}",
                    doc.username, doc.client_id
                )
            })?;
            let list = match (&doc.username, &doc.client_id) {
                (Some(user), _) => acl.users.entry(user.clone()).or_default(),
                (None, Some(client)) => acl.clients.entry(client.clone()).or_default(),
                (None, None) => &mut acl.patterns,
            };
            list.extend(rules);
        }
        Ok(acl)
    }

    /// What a topic nothing matches gets: denied (the default) or allowed.
    pub fn with_no_match(mut self, allows: bool) -> Acl {
        self.no_match_allows = allows;
        self
    }

    fn lists<'a>(&'a self, who: &Who) -> [&'a [Rule]; 3] {
        let own = match who.username {
            Some(name) => self.users.get(name).map_or(&[][..], Vec::as_slice),
            None => &self.anonymous,
        };
        let client = self
            .clients
            .get(who.client_id)
            .map_or(&[][..], Vec::as_slice);
        [own, client, &self.patterns]
    }

    fn decide(&self, who: &Who, access: Access, applies: impl Fn(&Rule) -> bool) -> bool {
        let lists = self.lists(who);
        let rules = || {
            lists
                .iter()
                .flat_map(|l| l.iter())
                .filter(|r| r.grant.covers(access) && r.for_client(who))
        };
        if rules().any(|r| r.grant.deny && applies(r)) {
            return false;
        }
        if rules().any(|r| !r.grant.deny && applies(r)) {
            return true;
        }
        self.no_match_allows
    }

    /// May `who` publish to (`Write`) or receive from (`Read`) this topic name?
    pub fn allows(&self, who: &Who, access: Access, topic: &str) -> bool {
        self.decide(who, access, |r| {
            r.matches(topic, who)
                // An `eq` filter that grants a subscription grants what it delivers: the
                // messages it matches (a deny `eq` rule stays literal, the narrower reading).
                || (matches!(access, Access::Read)
                    && !r.grant.deny
                    && r.exact.as_deref().is_some_and(|filter| {
                        wharf_shared::topic::valid_filter(filter)
                            && wharf_shared::topic::matches(topic, filter)
                    }))
        })
    }

    /// May `who` subscribe to this filter (the filter inside a `$share/group/` one)? Every
    /// topic it can match must be readable by one rule; a deny rule covering it refuses it
    /// (one covering part of it takes effect at delivery, where every message is checked).
    pub fn allows_subscribe(&self, who: &Who, filter: &str) -> bool {
        self.decide(who, Access::Read, |r| r.covers(filter, who))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = "\
# anonymous clients
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret/#
topic sensors/+/temp

user bob
topic write bob/out

pattern write dev/%c/telemetry
pattern read dev/%c/cmd
pattern read users/%u/#
pattern readwrite certs/%i
pattern deny dev/blocked/#
";

    fn who<'a>(client_id: &'a str, username: Option<&'a str>) -> Who<'a> {
        Who {
            client_id,
            username,
            identity: None,
        }
    }

    #[test]
    fn rules_per_user_anonymous_and_patterns() {
        let acl = Acl::parse(RULES).expect("parse");
        let anon = who("c1", None);
        let alice = who("c2", Some("alice"));
        let bob = who("c3", Some("bob"));
        assert!(acl.allows(&anon, Access::Read, "public/news"));
        assert!(!acl.allows(&anon, Access::Write, "public/news"));
        assert!(!acl.allows(&alice, Access::Read, "public/news"));
        assert!(acl.allows(&alice, Access::Write, "alice/x/y"));
        assert!(acl.allows(&alice, Access::Read, "alice"));
        assert!(!acl.allows(&alice, Access::Read, "alice/secret/key"));
        assert!(acl.allows(&alice, Access::Write, "sensors/a/temp"));
        assert!(!acl.allows(&alice, Access::Write, "sensors/a/b/temp"));
        assert!(acl.allows(&bob, Access::Write, "bob/out"));
        assert!(!acl.allows(&bob, Access::Read, "bob/out"));
        // Patterns, for every client.
        assert!(acl.allows(&bob, Access::Write, "dev/c3/telemetry"));
        assert!(!acl.allows(&bob, Access::Write, "dev/c2/telemetry"));
        assert!(!acl.allows(&bob, Access::Write, "dev/c3/cmd"));
        assert!(acl.allows(&anon, Access::Read, "dev/c1/cmd"));
        assert!(acl.allows(&alice, Access::Read, "users/alice/inbox"));
        assert!(!acl.allows(&anon, Access::Read, "users//inbox"));
        // A user with no rules of its own has only the patterns.
        let carol = who("c4", Some("carol"));
        assert!(!acl.allows(&carol, Access::Read, "public/news"));
        assert!(acl.allows(&carol, Access::Read, "dev/c4/cmd"));
    }

    #[test]
    fn deny_wins_over_any_grant() {
        let acl = Acl::parse(RULES).expect("parse");
        let blocked = who("blocked", None);
        assert!(!acl.allows(&blocked, Access::Write, "dev/blocked/telemetry"));
        assert!(!acl.allows(&blocked, Access::Read, "dev/blocked/cmd"));
    }

    #[test]
    fn placeholders_never_widen() {
        let acl = Acl::parse(RULES).expect("parse");
        for id in ["+", "#", "a/b", "c2/telemetry"] {
            let w = who(id, Some(id));
            for topic in ["dev/c2/telemetry", "dev/a/b/telemetry", "dev/+/telemetry"] {
                assert!(!acl.allows(&w, Access::Write, topic), "{id} {topic}");
            }
            assert!(!acl.allows_subscribe(&w, "dev/+/cmd"), "{id}");
            assert!(!acl.allows_subscribe(&w, "dev/#"), "{id}");
            assert!(!acl.allows_subscribe(&w, "users/#"), "{id}");
        }
        // The certificate identity only where there is one.
        let mut w = who("dev1", None);
        assert!(!acl.allows(&w, Access::Read, "certs/dev1"));
        w.identity = Some("dev1");
        assert!(acl.allows(&w, Access::Read, "certs/dev1"));
    }

    #[test]
    fn subscriptions_must_stay_inside_a_grant() {
        let acl = Acl::parse(RULES).expect("parse");
        let alice = who("c2", Some("alice"));
        assert!(acl.allows_subscribe(&alice, "alice/#"));
        assert!(acl.allows_subscribe(&alice, "alice/+/x"));
        assert!(acl.allows_subscribe(&alice, "sensors/+/temp"));
        assert!(acl.allows_subscribe(&alice, "sensors/k/temp"));
        assert!(!acl.allows_subscribe(&alice, "sensors/#"));
        assert!(!acl.allows_subscribe(&alice, "sensors/+/+"));
        assert!(!acl.allows_subscribe(&alice, "#"));
        assert!(!acl.allows_subscribe(&alice, "+/#"));
        // Denied wholly: refused; denied in part: refused at delivery.
        assert!(!acl.allows_subscribe(&alice, "alice/secret/#"));
        assert!(acl.allows_subscribe(&alice, "alice/#"));
        assert!(acl.allows_subscribe(&who("dev9", None), "dev/dev9/cmd"));
        assert!(!acl.allows_subscribe(&who("dev9", None), "dev/+/cmd"));
    }

    #[test]
    fn wildcards_never_reach_dollar_topics() {
        let acl =
            Acl::parse("topic readwrite #\ntopic read +/x\ntopic read $SYS/info\n").expect("parse");
        let anon = who("c", None);
        assert!(acl.allows(&anon, Access::Read, "a/b"));
        assert!(!acl.allows(&anon, Access::Read, "$SYS/broker/load"));
        assert!(!acl.allows(&anon, Access::Write, "$internal/x"));
        assert!(!acl.allows_subscribe(&anon, "$SYS/#"));
        assert!(acl.allows(&anon, Access::Read, "$SYS/info"));
        assert!(acl.allows_subscribe(&anon, "$SYS/info"));
    }

    #[test]
    fn unusable_files_are_refused_with_the_line() {
        for (text, line) in [
            ("", 0),
            ("# nothing\n\n", 0),
            ("user alice\n", 0),
            ("topic\n", 1),
            ("topic reed a/b\n", 1),
            ("user\n", 1),
            ("pattern read dev/x%c/cmd\n", 1),
            ("topic read a/#/b\n", 1),
            ("topic read a/b+\n", 1),
            ("topic read a\nallow everything\n", 2),
        ] {
            let err = Acl::parse(text).expect_err(text);
            assert_eq!(err.line, line, "{text:?}: {err}");
        }
    }

    fn doc(
        user: Option<&str>,
        client: Option<&str>,
        permission: &str,
        action: &str,
        topics: &[&str],
    ) -> wharf_shared::StoredRule {
        wharf_shared::StoredRule {
            username: user.map(str::to_owned),
            client_id: client.map(str::to_owned),
            permission: permission.into(),
            action: action.into(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
        }
    }

    /// EMQX's MongoDB authorization documents, as their documentation shows them.
    #[test]
    fn store_documents_in_emqx_shape() {
        let acl = Acl::from_documents(&[
            doc(
                Some("dev1"),
                None,
                "allow",
                "publish",
                &["dev/${clientid}/telemetry"],
            ),
            doc(
                Some("dev1"),
                None,
                "allow",
                "subscribe",
                &["dev/${username}/cmd", "eq fleet/#"],
            ),
            doc(Some("dev1"), None, "deny", "publish", &["dev/+/cmd"]),
            doc(
                Some("dev1"),
                Some("only-here"),
                "allow",
                "all",
                &["special/#"],
            ),
            doc(None, Some("c9"), "allow", "all", &["c9/#"]),
            doc(None, None, "allow", "subscribe", &["public/#"]),
        ])
        .expect("readable documents");
        let dev1 = Who {
            client_id: "c1",
            username: Some("dev1"),
            identity: None,
        };
        assert!(acl.allows(&dev1, Access::Write, "dev/c1/telemetry"));
        assert!(!acl.allows(&dev1, Access::Read, "dev/c1/telemetry"));
        assert!(!acl.allows(&dev1, Access::Write, "dev/c2/telemetry"));
        assert!(acl.allows_subscribe(&dev1, "dev/dev1/cmd"));
        assert!(
            !acl.allows(&dev1, Access::Write, "dev/dev1/cmd"),
            "deny publish"
        );
        assert!(
            acl.allows_subscribe(&dev1, "fleet/#"),
            "eq: the filter itself"
        );
        assert!(
            !acl.allows_subscribe(&dev1, "fleet/a"),
            "eq: nothing under it"
        );
        assert!(
            acl.allows(&dev1, Access::Read, "fleet/a"),
            "eq: what the filter delivers"
        );
        assert!(!acl.allows(&dev1, Access::Write, "fleet/a"));
        assert!(
            !acl.allows(&dev1, Access::Read, "special/x"),
            "for another client id"
        );
        let here = Who {
            client_id: "only-here",
            ..dev1
        };
        assert!(acl.allows(&here, Access::Read, "special/x"));
        let c9 = Who {
            client_id: "c9",
            username: None,
            identity: None,
        };
        assert!(acl.allows(&c9, Access::Write, "c9/t"));
        assert!(acl.allows_subscribe(&c9, "public/#"));
        assert!(!acl.allows(&c9, Access::Write, "public/x"));
        assert!(!acl.allows(&c9, Access::Read, "anything"));
        let open = acl.clone().with_no_match(true);
        assert!(open.allows(&c9, Access::Read, "anything"));
        assert!(
            !open.allows(&dev1, Access::Write, "dev/x/cmd"),
            "deny still wins"
        );
    }

    /// A document that cannot be read refuses the whole set: skipped, the deny rule here would
    /// have let the allow rule beside it through.
    #[test]
    fn an_unreadable_document_refuses_the_rules() {
        let allow = doc(Some("dev1"), None, "allow", "all", &["dev/#"]);
        for unreadable in [
            doc(Some("dev1"), None, "deny", "Publish", &["dev/dev1/x"]),
            doc(None, None, "allow", "everything", &["#"]),
            doc(None, None, "allow", "all", &["a${clientid}/x"]),
            doc(
                None,
                None,
                "unreadable document: username is not a string",
                "all",
                &["#"],
            ),
        ] {
            let result = Acl::from_documents(&[allow.clone(), unreadable.clone()]);
            assert!(result.is_err(), "{unreadable:?} read");
        }
    }

    #[test]
    fn access_word_is_optional() {
        let acl = Acl::parse("topic a/b\ntopic read c d\n").expect("parse");
        let anon = who("c", None);
        assert!(acl.allows(&anon, Access::Write, "a/b"));
        assert!(acl.allows(&anon, Access::Read, "c d"));
        assert!(!acl.allows(&anon, Access::Write, "c d"));
    }
}
