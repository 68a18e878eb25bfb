//! MQTT 3.1.1 topic names and filters (section 4.7): validation and matching.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Most levels a topic or filter may have by default. Neither 3.1.1 nor 5.0 sets a limit below
/// the packet size; this one keeps the subscription tree's recursion (matching, inserting,
/// removing) far within a thread's stack. Mosquitto's is 200.
pub const DEFAULT_MAX_LEVELS: usize = 512;
/// The highest the limit may be set to (`--max-topic-levels`): deeper trees would risk the
/// stack of the threads that match them.
pub const MAX_LEVELS_CEILING: usize = 1024;

static MAX_LEVELS: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_LEVELS);

/// Sets the most levels a topic or filter may have, for the whole process (the edge's
/// `--max-topic-levels`), within 1..=[`MAX_LEVELS_CEILING`].
pub fn set_max_levels(levels: usize) {
    MAX_LEVELS.store(levels.clamp(1, MAX_LEVELS_CEILING), Ordering::Relaxed);
}

/// The most levels a topic or filter may have now.
pub fn max_levels() -> usize {
    MAX_LEVELS.load(Ordering::Relaxed)
}

/// A topic name a client may publish to: non-empty, no wildcards, no NUL.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && !topic.contains(['+', '#', '\0'])
        && topic.split('/').count() <= max_levels()
}

/// A filter a client may subscribe to: `+` only as a whole level, `#` only as the last level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    if levels.len() > max_levels() {
        return false;
    }
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "+" => true,
        "#" => i == last,
        other => !other.contains(['+', '#']),
    })
}

/// A shared subscription's filter, `$share/{ShareName}/{filter}` (MQTT 5.0 4.8.2, also served
/// to 3.1/3.1.1 clients): the share name and the filter. `None` for any other filter.
pub fn shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    rest.split_once('/')
}

/// Whether a `$share/...` filter is well formed: a share name without `/`, `+` or `#`, and a
/// valid filter after it.
pub fn valid_shared(filter: &str) -> bool {
    match shared(filter) {
        Some((name, inner)) => {
            !name.is_empty() && !name.contains(['+', '#']) && valid_filter(inner)
        }
        None => false,
    }
}

/// Whether `topic` (a valid topic name) matches `filter` (a valid filter). Topics that start
/// with `$` are not matched by a filter starting with a wildcard (4.7.2).
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(t) if f == "+" || f == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_filters_name_their_group_and_filter() {
        assert_eq!(shared("$share/g/a/#"), Some(("g", "a/#")));
        assert_eq!(shared("a/#"), None);
        assert!(valid_shared("$share/g/+"));
        for bad in [
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/a/#/b",
            "$share/#/a",
        ] {
            assert!(!valid_shared(bad), "{bad}");
        }
        // A shared filter never matches a topic itself: sessions' catch-ups leave it alone.
        assert!(!matches("a/b", "$share/g/a/b"));
    }

    #[test]
    fn filters_are_validated() {
        for ok in [
            "a", "a/b", "+", "#", "a/+/c", "a/#", "+/+", "/", "a//b", "$SYS/#",
        ] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "+a", "#/", "a/\0"] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
    }

    #[test]
    fn topic_names_are_validated() {
        assert!(valid_topic_name("a/b"));
        assert!(valid_topic_name("/"));
        for bad in ["", "a/+", "#", "a\0b"] {
            assert!(!valid_topic_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn matching_follows_the_standard() {
        let cases = [
            ("sport/tennis/player1", "sport/tennis/player1/#", true),
            (
                "sport/tennis/player1/ranking",
                "sport/tennis/player1/#",
                true,
            ),
            ("sport", "sport/#", true),
            ("sport/tennis", "sport/+", true),
            ("sport/tennis/x", "sport/+", false),
            ("sport", "sport/+", false),
            ("sport/", "sport/+", true),
            ("/finance", "+/+", true),
            ("/finance", "/+", true),
            ("/finance", "+", false),
            ("a/b", "#", true),
            ("$SYS/x", "#", false),
            ("$SYS/x", "+/x", false),
            ("$SYS/x", "$SYS/#", true),
            ("$SYS/x", "$SYS/+", true),
            ("a/b/c", "a/b", false),
            ("a/b", "a/b/c", false),
        ];
        for (topic, filter, expected) in cases {
            assert_eq!(matches(topic, filter), expected, "{topic} ~ {filter}");
        }
    }
}
