//! MQTT 3.1.1 topic names and filters (section 4.7): validation and matching.

/// Most levels a topic or filter may have; deeper ones are refused so that matching stays
/// cheap whatever a client sends.
pub const MAX_LEVELS: usize = 128;

/// A topic name a client may publish to: non-empty, no wildcards, no NUL.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0']) && topic.split('/').count() <= MAX_LEVELS
}

/// A filter a client may subscribe to: `+` only as a whole level, `#` only as the last level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    if levels.len() > MAX_LEVELS {
        return false;
    }
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "+" => true,
        "#" => i == last,
        other => !other.contains(['+', '#']),
    })
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
