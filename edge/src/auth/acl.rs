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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Grant {
    fn allows(self, access: Access) -> bool {
        matches!(
            (self, access),
            (Grant::ReadWrite, _) | (Grant::Read, Access::Read) | (Grant::Write, Access::Write)
        )
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

    /// Whether the topic name falls under this rule.
    fn matches(&self, topic: &str, who: &Who) -> bool {
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
    patterns: Vec<Rule>,
}

fn parse_rule(rest: &str, placeholders: bool) -> Result<Rule, String> {
    let rest = rest.trim();
    // As Mosquitto reads it: one word is a topic (read and write); with more, the first is
    // the access and the rest (spaces and all) the topic.
    let (grant, topic) = match rest.split_once(char::is_whitespace) {
        Some((word, topic)) => {
            let grant = match word {
                "read" => Grant::Read,
                "write" => Grant::Write,
                "readwrite" => Grant::ReadWrite,
                "deny" => Grant::Deny,
                other => {
                    return Err(format!(
                        "{other:?} is not an access (read, write, readwrite or deny)"
                    ))
                }
            };
            (grant, topic.trim())
        }
        None => (Grant::ReadWrite, rest),
    };
    if topic.is_empty() {
        return Err("no topic".into());
    }
    if !wharf_shared::topic::valid_filter(topic) {
        return Err(format!("{topic:?} is not a valid topic filter"));
    }
    let levels = topic
        .split('/')
        .map(|level| match level {
            "+" => Ok(Level::Plus),
            "#" => Ok(Level::Hash),
            "%c" if placeholders => Ok(Level::ClientId),
            "%u" if placeholders => Ok(Level::UserName),
            "%i" if placeholders => Ok(Level::Identity),
            _ if placeholders && (level.contains("%c") || level.contains("%u") || level.contains("%i")) => {
                Err(format!(
                    "{level:?}: a placeholder must be a whole topic level (so that no value widens it)"
                ))
            }
            _ => Ok(Level::Exact(level.to_owned())),
        })
        .collect::<Result<_, _>>()?;
    Ok(Rule { grant, levels })
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

    fn lists(&self, who: &Who) -> [&[Rule]; 2] {
        let own = match who.username {
            Some(name) => self.users.get(name).map_or(&[][..], Vec::as_slice),
            None => &self.anonymous,
        };
        [own, &self.patterns]
    }

    fn decide(&self, who: &Who, access: Access, applies: impl Fn(&Rule) -> bool) -> bool {
        let lists = self.lists(who);
        let rules = || lists.iter().flat_map(|l| l.iter());
        if rules().any(|r| r.grant == Grant::Deny && applies(r)) {
            return false;
        }
        rules().any(|r| r.grant.allows(access) && applies(r))
    }

    /// May `who` publish to (`Write`) or receive from (`Read`) this topic name?
    pub fn allows(&self, who: &Who, access: Access, topic: &str) -> bool {
        self.decide(who, access, |r| r.matches(topic, who))
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

    #[test]
    fn access_word_is_optional() {
        let acl = Acl::parse("topic a/b\ntopic read c d\n").expect("parse");
        let anon = who("c", None);
        assert!(acl.allows(&anon, Access::Write, "a/b"));
        assert!(acl.allows(&anon, Access::Read, "c d"));
        assert!(!acl.allows(&anon, Access::Write, "c d"));
    }
}
