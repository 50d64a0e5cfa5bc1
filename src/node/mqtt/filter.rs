//! MQTT topic names and filters: which are acceptable here, and which topics a
//! filter matches.
//!
//! The filter's syntax is checked by rumqttc's `valid_filter`; the match is our
//! own, because rumqttc's `matches` slices the topic's first byte as a string and
//! panics on a topic that starts with a multi-byte character (a peer's bytes; see
//! docs/upstream-defects.md).

use multifeed::topics::MAX_TOPIC_LEN;

/// Why `topic` (from a PUBLISH) cannot be a multifeed topic, if it cannot: the
/// library's rules, and no wildcards.
pub fn topic_problem(topic: &str) -> Option<&'static str> {
    if topic.is_empty() {
        Some("it is empty (topic aliases are not supported)")
    } else if let Some(reason) = multifeed::topics::topic_problem(topic) {
        Some(reason)
    } else if topic.contains(['+', '#']) {
        Some("a topic name holds no wildcards")
    } else {
        None
    }
}

/// Why `filter` cannot be subscribed to or announced, if it cannot.
pub fn filter_problem(filter: &str) -> Option<&'static str> {
    if filter.is_empty() {
        Some("it is empty")
    } else if filter.len() > MAX_TOPIC_LEN {
        Some("it is longer than 200 bytes")
    } else if filter.chars().any(char::is_control) {
        Some("it contains a control character")
    } else if !rumqttc::mqttbytes::valid_filter(filter) {
        Some("'#' may only be a whole last level and '+' only a whole level")
    } else {
        None
    }
}

/// Whether `topic` (a valid topic name) matches `filter` (a valid filter), as
/// MQTT defines it: `+` is one level, a last `#` is this level and all below,
/// and wildcards at the first level do not match topics starting with `$`.
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut levels = topic.split('/');
    for wanted in filter.split('/') {
        if wanted == "#" {
            return true;
        }
        match levels.next() {
            Some(level) if wanted == "+" || wanted == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// Whether `topic` is `prefix` or below it.
pub fn is_under(topic: &str, prefix: &str) -> bool {
    topic
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// A gateway's name as one topic level: no `/`, wildcards or control characters.
pub fn topic_level(name: &str) -> String {
    let level: String = name
        .chars()
        .map(|c| {
            if matches!(c, '/' | '+' | '#') || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if level.is_empty() { "_".into() } else { level }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn topics_are_checked_before_they_are_queued() {
        assert!(topic_problem("sensors/1/temp").is_none());
        assert!(topic_problem("").is_some());
        assert!(topic_problem("a/+/b").is_some());
        assert!(topic_problem("a/#").is_some());
        assert!(topic_problem("a\u{7}b").is_some());
        assert!(topic_problem(&"x".repeat(201)).is_some());
    }

    #[test]
    fn filters() {
        for good in ["#", "+", "a/#", "a/+/b", "+/+", "a", "/", "é/#"] {
            assert_eq!(filter_problem(good), None, "{good}");
        }
        for bad in ["", "a#", "a/#/b", "a+/b", "a/b+", "a\nb", &"x".repeat(201)] {
            assert!(filter_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn matching() {
        let cases = [
            ("a/b/c", "a/b/c", true),
            ("a/b/c", "a/+/c", true),
            ("a/b/c", "a/#", true),
            ("a", "a/#", true),
            ("a/b", "a/+", true),
            ("a", "a/+", false),
            ("a/b/c", "a/+", false),
            ("a/b", "#", true),
            ("$SYS/x", "#", false),
            ("$SYS/x", "+/x", false),
            ("$SYS/x", "$SYS/#", true),
            ("é/b", "+/b", true),
            ("é", "#", true),
            ("/a", "+/a", true),
            ("a/b", "a/b/c", false),
        ];
        for (topic, filter, expected) in cases {
            assert_eq!(matches(topic, filter), expected, "{topic} ~ {filter}");
        }
    }

    /// Why the match is ours (docs/upstream-defects.md): when this stops
    /// panicking, rumqttc's could serve again.
    #[test]
    fn rumqttc_matches_panics_on_a_topic_starting_with_a_multibyte_character() {
        let upstream = std::panic::catch_unwind(|| rumqttc::mqttbytes::matches("é/b", "+/b"));
        assert!(upstream.is_err());
        assert!(matches("é/b", "+/b"));
    }

    #[test]
    fn prefixes_are_whole_levels() {
        assert!(is_under("remote/gw/t", "remote"));
        assert!(is_under("remote", "remote"));
        assert!(!is_under("remotes/gw", "remote"));
        assert_eq!(topic_level("a/b+#\n"), "a_b___");
        assert_eq!(topic_level(""), "_");
    }

    proptest! {
        /// A filter of the topic's own levels, with any of them replaced by `+`
        /// or the tail by `#`, matches it; a changed level does not.
        #[test]
        fn filters_built_from_a_topic_match_it(
            levels in proptest::collection::vec("[a-zé$]{0,3}", 1..5),
            wild in proptest::collection::vec(any::<bool>(), 5),
            hash_at in 0usize..6,
        ) {
            let topic = levels.join("/");
            prop_assume!(topic_problem(&topic).is_none() && !topic.starts_with('$'));
            let mut filter: Vec<String> = levels
                .iter()
                .zip(&wild)
                .map(|(l, w)| if *w { "+".into() } else { l.clone() })
                .collect();
            if hash_at < filter.len() {
                filter.truncate(hash_at);
                filter.push("#".into());
            }
            let filter = filter.join("/");
            prop_assert!(filter_problem(&filter).is_none());
            prop_assert!(matches(&topic, &filter), "{} ~ {}", topic, filter);
            let other = format!("{topic}x");
            prop_assert_eq!(matches(&other, &topic), false);
        }
    }
}
