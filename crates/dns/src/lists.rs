//! Domain lists in the formats people already use, and the sets they compile into.
//!
//! One parser reads all three common formats line by line, so a list may even mix them:
//! - hosts files: `0.0.0.0 ads.example.com tracker.example.net` (any address first);
//! - one domain per line: `ads.example.com`;
//! - adblock-style: `||ads.example.com^` (the domain and everything below it), with
//!   `@@||cdn.example.com^` exceptions.
//!
//! `*.example.com` names everything below `example.com` but not `example.com` itself.
//! Comments (`#`, `!`, `[Adblock Plus …]`) are counted; lines that are none of the above
//! (cosmetic adblock rules, rules with `$` options, invalid names) are counted as junk and
//! skipped, never fatal. Matching walks the labels of the name: constant time in the size
//! of the list.

use std::hash::BuildHasher;

/// What one parse found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ListStats {
    /// Rules loaded (names, wildcards, subtrees and exceptions).
    pub entries: usize,
    /// Comment and blank lines.
    pub comments: usize,
    /// Lines that are no rule this resolver understands; skipped.
    pub junk: usize,
    /// The first few junk lines, numbered from 1, for the operator to look at.
    pub junk_examples: Vec<(usize, String)>,
}

const JUNK_EXAMPLES: usize = 5;

/// How a plain name in a list (a hosts line, or a bare `domain`) matches: the name alone
/// (`exact`, Pi-hole's reading and the default) or the name and every name below it
/// (`subtree`, as unbound's `always_nxdomain` zones, dnsmasq's `address=/d/` and uBlock
/// read them; the safer reading for threat lists, where a C2 domain's subdomains are the
/// threat too). `||d^`, `*.d` and `@@` rules say their own reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Match {
    /// The name only.
    #[default]
    Exact,
    /// The name and its subdomains.
    Subtree,
}

/// A set of domain rules: exact names, whole subtrees (`||x^`), and strict wildcards
/// (`*.x`), each possibly excepted.
#[derive(Debug, Default, Clone)]
pub struct DomainSet {
    /// Where a plain name (a hosts line, a bare domain) goes.
    plain: Match,
    exact: NameSet,
    subtree: NameSet,
    below: NameSet,
    except_exact: NameSet,
    except_subtree: NameSet,
}

/// Names packed one after another in a single arena (a length byte, then the name), found
/// through a hash table of 4-byte offsets: about the name's length plus 10 bytes each,
/// with no allocation per name.
#[derive(Clone, Default)]
struct NameSet {
    arena: Vec<u8>,
    table: hashbrown::HashTable<u32>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl std::fmt::Debug for NameSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NameSet")
            .field("names", &self.table.len())
            .field("arena_bytes", &self.arena.len())
            .finish()
    }
}

fn name_at(arena: &[u8], off: u32) -> &[u8] {
    let o = off as usize;
    let len = usize::from(arena[o]);
    &arena[o + 1..o + 1 + len]
}

impl NameSet {
    fn contains(&self, name: &str) -> bool {
        // Most sets of a policy are empty (no exceptions, no wildcards): no hashing then.
        if self.table.is_empty() {
            return false;
        }
        let h = self.hasher.hash_one(name.as_bytes());
        self.table.find(h, |&o| name_at(&self.arena, o) == name.as_bytes()).is_some()
    }

    /// Adds a normalized name (at most 253 bytes); false if it was there already.
    fn insert(&mut self, name: &str) -> bool {
        let h = self.hasher.hash_one(name.as_bytes());
        if self.table.find(h, |&o| name_at(&self.arena, o) == name.as_bytes()).is_some() {
            return false;
        }
        let (Ok(off), Ok(len)) = (u32::try_from(self.arena.len()), u8::try_from(name.len())) else {
            return false; // 4 GiB of names in one list, or a name normalize() refused
        };
        self.arena.push(len);
        self.arena.extend_from_slice(name.as_bytes());
        let (arena, hasher) = (&self.arena, &self.hasher);
        self.table.insert_unique(h, off, |&o| hasher.hash_one(name_at(arena, o)));
        true
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    fn shrink(&mut self) {
        self.arena.shrink_to_fit();
        let (arena, hasher) = (&self.arena, &self.hasher);
        self.table.shrink_to_fit(|&o| hasher.hash_one(name_at(arena, o)));
    }

    fn bytes(&self) -> usize {
        self.arena.capacity() + self.table.capacity() * (std::mem::size_of::<u32>() + 1)
    }
}

/// Lower-cases `name` and drops one trailing dot; `None` unless it is a valid host name
/// (labels of 1–63 letters, digits, `-` or `_`, 253 characters in all).
pub fn normalize(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    for label in name.split('.') {
        if label.is_empty()
            || label.len() > 63
            || !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return None;
        }
    }
    Some(name.to_ascii_lowercase())
}

/// Names no hosts file means to block.
fn is_local_alias(name: &str) -> bool {
    matches!(
        name,
        "localhost" | "localhost.localdomain" | "local" | "broadcasthost" | "ip6-localhost" | "ip6-loopback"
    ) || name.starts_with("ip6-")
}

impl DomainSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `text` and adds its rules; returns what it found.
    pub fn parse(text: &str) -> (Self, ListStats) {
        Self::parse_as(text, Match::Exact)
    }

    /// [`Self::parse`] with plain names matching as `plain` says.
    pub fn parse_as(text: &str, plain: Match) -> (Self, ListStats) {
        let mut set = Self { plain, ..Self::new() };
        let stats = set.extend_from(text);
        set.shrink();
        (set, stats)
    }

    fn shrink(&mut self) {
        for s in [
            &mut self.exact,
            &mut self.subtree,
            &mut self.below,
            &mut self.except_exact,
            &mut self.except_subtree,
        ] {
            s.shrink();
        }
    }

    /// Heap bytes the set holds (names and tables).
    pub fn heap_bytes(&self) -> usize {
        [&self.exact, &self.subtree, &self.below, &self.except_exact, &self.except_subtree]
            .iter()
            .map(|s| s.bytes())
            .sum()
    }

    /// Adds the rules of `text`.
    pub fn extend_from(&mut self, text: &str) -> ListStats {
        let mut stats = ListStats::default();
        for (i, raw) in text.lines().enumerate() {
            self.add_raw(i, raw, &mut stats);
        }
        stats
    }

    /// Parses a list as it is read (no copy of the whole text is ever held); also returns
    /// a digest of the bytes, to tell an unchanged list. Invalid UTF-8 lines are junk.
    pub fn parse_reader(
        mut r: impl std::io::BufRead,
        size_hint: usize,
        plain: Match,
    ) -> std::io::Result<(Self, ListStats, u64)> {
        use std::hash::Hasher;
        let mut set = Self { plain, ..Self::new() };
        // Most rules are plain names: room for the file's bytes up front, so the arena
        // never grows by copying.
        set.plain_set().arena.reserve(size_hint.min(1 << 31));
        let mut stats = ListStats::default();
        let mut digest = std::collections::hash_map::DefaultHasher::new();
        // The same bytes read another way are another list.
        digest.write_u8(plain as u8);
        let mut buf = Vec::with_capacity(512);
        let mut i = 0;
        loop {
            buf.clear();
            if r.read_until(b'\n', &mut buf)? == 0 {
                break;
            }
            digest.write(&buf);
            match std::str::from_utf8(&buf) {
                Ok(line) => set.add_raw(i, line, &mut stats),
                Err(_) => {
                    stats.junk += 1;
                    if stats.junk_examples.len() < JUNK_EXAMPLES {
                        stats
                            .junk_examples
                            .push((i + 1, String::from_utf8_lossy(&buf).chars().take(120).collect()));
                    }
                }
            }
            i += 1;
        }
        set.shrink();
        Ok((set, stats, digest.finish()))
    }

    fn plain_set(&mut self) -> &mut NameSet {
        match self.plain {
            Match::Exact => &mut self.exact,
            Match::Subtree => &mut self.subtree,
        }
    }

    fn add_raw(&mut self, i: usize, raw: &str, stats: &mut ListStats) {
        {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('!') || line.starts_with('#') || line.starts_with('[') {
                stats.comments += 1;
                return;
            }
            // A comment after a rule needs whitespace before its `#` (`x##.ad` is a
            // cosmetic adblock rule, junk here).
            let line = line
                .split_once(" #")
                .or_else(|| line.split_once("\t#"))
                .map_or(line, |(rule, _)| rule)
                .trim();
            let added = self.add_line(line);
            if added == 0 {
                stats.junk += 1;
                if stats.junk_examples.len() < JUNK_EXAMPLES {
                    stats.junk_examples.push((i + 1, raw.trim_end().chars().take(120).collect()));
                }
            }
            stats.entries += added;
        }
    }

    /// Adds one rule line; returns how many names it added (0: junk).
    fn add_line(&mut self, line: &str) -> usize {
        if let Some(rest) = line.strip_prefix("@@") {
            return match adblock_domain(rest) {
                Some(d) => {
                    self.except_subtree.insert(&d);
                    1
                }
                None => match normalize(rest) {
                    Some(d) => {
                        self.except_exact.insert(&d);
                        1
                    }
                    None => 0,
                },
            };
        }
        if line.starts_with("||") {
            return match adblock_domain(line) {
                Some(d) => {
                    self.subtree.insert(&d);
                    1
                }
                None => 0,
            };
        }
        let mut tokens = line.split_whitespace();
        let Some(first) = tokens.next() else { return 0 };
        if first.parse::<std::net::IpAddr>().is_ok() {
            // A hosts line: every name after the address.
            let mut added = 0;
            for name in tokens {
                if let Some(d) = normalize(name)
                    && !is_local_alias(&d)
                {
                    self.plain_set().insert(&d);
                    added += 1;
                }
            }
            return added;
        }
        if tokens.next().is_some() {
            return 0;
        }
        if let Some(parent) = first.strip_prefix("*.") {
            return match normalize(parent) {
                Some(d) => {
                    self.below.insert(&d);
                    1
                }
                None => 0,
            };
        }
        match normalize(first) {
            Some(d) => {
                self.plain_set().insert(&d);
                1
            }
            None => 0,
        }
    }

    /// Adds one name given by the operator: `name`, `*.name`, or `||name^`.
    pub fn add_rule(&mut self, rule: &str) -> bool {
        self.add_line(rule.trim()) > 0
    }

    /// Rules held.
    pub fn len(&self) -> usize {
        self.exact.len()
            + self.subtree.len()
            + self.below.len()
            + self.except_exact.len()
            + self.except_subtree.len()
    }

    /// True when the set holds no rule.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True if the (normalized, lower-case, no trailing dot) `name` is in the set and not
    /// excepted.
    pub fn matches(&self, name: &str) -> bool {
        let excepted_below = || {
            !self.except_subtree.table.is_empty() && suffixes(name).any(|s| self.except_subtree.contains(s))
        };
        if self.except_exact.contains(name) || excepted_below() {
            return false;
        }
        if self.exact.contains(name) {
            return true;
        }
        if self.subtree.table.is_empty() && self.below.table.is_empty() {
            return false;
        }
        let mut first = true;
        for s in suffixes(name) {
            if self.subtree.contains(s) || (!first && self.below.contains(s)) {
                return true;
            }
            first = false;
        }
        false
    }
}

/// `name`, then each parent: `a.b.c`, `b.c`, `c`.
fn suffixes(name: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(Some(name), |s| s.split_once('.').map(|(_, rest)| rest))
}

/// The domain of `||domain^` (a trailing `^` or `^|` is required; `$options` are not
/// supported and make the rule junk).
fn adblock_domain(rule: &str) -> Option<String> {
    let rest = rule.strip_prefix("||")?;
    let domain = rest.strip_suffix("^|").or_else(|| rest.strip_suffix('^'))?;
    normalize(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_match_their_subtree_when_asked() {
        let text = "0.0.0.0 c2.example\nbad.example\n||ads.example^\n@@||ok.c2.example^\n";
        let (exact, _) = DomainSet::parse(text);
        let (subtree, _) = DomainSet::parse_as(text, Match::Subtree);
        for (name, e, s) in [
            ("c2.example", true, true),
            ("x.c2.example", false, true),
            ("a.b.bad.example", false, true),
            ("ok.c2.example", false, false),
            ("x.ads.example", true, true),
            ("example", false, false),
        ] {
            assert_eq!((exact.matches(name), subtree.matches(name)), (e, s), "{name}");
        }
        let read = |m| DomainSet::parse_reader(text.as_bytes(), text.len(), m).unwrap();
        let ((a, _, da), (b, _, db)) = (read(Match::Exact), read(Match::Subtree));
        assert!(!a.matches("x.c2.example") && b.matches("x.c2.example"));
        assert_ne!(da, db, "the same file read another way is another list");
    }

    #[test]
    fn formats_wildcards_and_exceptions() {
        let text = "\
# hosts part
0.0.0.0 ads.example.com tracker.example.net
127.0.0.1 localhost
::1 ip6-localhost
! adblock part
[Adblock Plus 2.0]
||doubleclick.example^
@@||ok.doubleclick.example^
||withoptions.example^$third-party
example.org##.banner
plain.example   # trailing comment
*.wild.example
not a domain at all
bad_label-.x..y
";
        let (set, stats) = DomainSet::parse(text);
        assert_eq!(stats.entries, 5 + 1, "{stats:?}");
        assert_eq!(stats.comments, 3);
        assert_eq!(stats.junk, 6, "{stats:?}");
        assert_eq!(stats.junk_examples[0].0, 3, "localhost-only hosts line is junk");
        assert!(set.matches("ads.example.com"));
        assert!(!set.matches("sub.ads.example.com"), "hosts entries are exact");
        assert!(set.matches("doubleclick.example"));
        assert!(set.matches("x.y.doubleclick.example"));
        assert!(!set.matches("ok.doubleclick.example"));
        assert!(!set.matches("a.ok.doubleclick.example"));
        assert!(set.matches("plain.example"));
        assert!(!set.matches("wild.example"), "*.x does not match x");
        assert!(set.matches("a.wild.example"));
        assert!(!set.matches("localhost"));
        assert!(!set.matches("withoptions.example"));
        assert!(!set.matches("example.com"));
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(normalize("Ads.Example.COM.").as_deref(), Some("ads.example.com"));
        assert_eq!(normalize("x..y"), None);
        assert_eq!(normalize(&"a".repeat(64)), None);
        assert_eq!(normalize(""), None);
        let (set, _) = DomainSet::parse("ADS.example.com\n");
        assert!(set.matches("ads.example.com"));
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn a_listed_domain_costs_under_64_bytes() {
        // Names like the benchmark's (bench/dns.sh): ~30 characters.
        let text: String = (0..200_000u32)
            .map(|i| format!("0.0.0.0 tracker{i}-{:x}.metrics.example\n", i.wrapping_mul(2_654_435_761)))
            .collect();
        let (set, stats) = DomainSet::parse(&text);
        assert_eq!(stats.entries, 200_000);
        let per = set.heap_bytes() as f64 / 200_000.0;
        assert!(per <= 64.0, "{per:.1} bytes per domain");
        assert!(set.matches(&format!("tracker7-{:x}.metrics.example", 7u32.wrapping_mul(2_654_435_761))));
        assert!(!set.matches("tracker7.metrics.example"));
    }
}
