//! Per-group DNS policies: blocklist mode (everything except what the lists name) or
//! allowlist mode (nothing except what they name), explicit allow and deny rules on top,
//! and how a blocked name is answered.

use std::sync::Arc;

use crate::lists::DomainSet;

/// How a policy treats names no rule mentions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Resolve everything except listed names.
    Blocklist,
    /// Resolve only listed names; **everything else is denied**.
    Allowlist,
}

/// The answer a blocked name gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockResponse {
    /// NXDOMAIN (the default).
    #[default]
    Nxdomain,
    /// `0.0.0.0` for A, `::` for AAAA, no data otherwise.
    Null,
    /// REFUSED.
    Refused,
}

/// Whether a name resolves, and the rule that decided it. It borrows the policy's and
/// list's names, so deciding allocates nothing; the query log renders it once
/// ([`Rule`]'s `Display`: `policy cameras: list ads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'p> {
    /// Resolve it.
    Allow(Rule<'p>),
    /// Block it.
    Block(Rule<'p>),
}

impl<'p> Verdict<'p> {
    /// True for [`Verdict::Block`].
    pub fn is_block(&self) -> bool {
        matches!(self, Self::Block(_))
    }

    /// The rule behind the verdict.
    pub fn rule(&self) -> Rule<'p> {
        match *self {
            Self::Allow(r) | Self::Block(r) => r,
        }
    }
}

/// The rule that decided a name, in the policy named `policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule<'p> {
    /// The root name (always resolved).
    Root,
    /// A `deny` rule.
    Deny {
        /// The policy.
        policy: &'p str,
    },
    /// An `allow` rule.
    Allow {
        /// The policy.
        policy: &'p str,
    },
    /// On a list: blocked in blocklist mode, allowed in allowlist mode.
    List {
        /// The policy.
        policy: &'p str,
        /// The list.
        list: &'p str,
    },
    /// Blocklist mode, on no list.
    NotListed {
        /// The policy.
        policy: &'p str,
    },
    /// Allowlist mode, on no list (default deny).
    NotInAllowlist {
        /// The policy.
        policy: &'p str,
    },
    /// A `deny` rule matched a name in the CNAME chain (allowlist mode).
    DenyInChain {
        /// The policy.
        policy: &'p str,
    },
    /// A CNAME target of an allowed name (allowlist mode).
    AliasOfAllowed {
        /// The policy.
        policy: &'p str,
    },
}

impl<'p> Rule<'p> {
    /// The rule's text in pieces (`policy `, the policy, `: list `, the list).
    fn pieces(&self) -> [&'p str; 4] {
        match *self {
            Self::Root => ["root", "", "", ""],
            Self::Deny { policy } => ["policy ", policy, ": deny rule", ""],
            Self::Allow { policy } => ["policy ", policy, ": allow rule", ""],
            Self::List { policy, list } => ["policy ", policy, ": list ", list],
            Self::NotListed { policy } => ["policy ", policy, ": not listed", ""],
            Self::NotInAllowlist { policy } => ["policy ", policy, ": not in allowlist (default deny)", ""],
            Self::DenyInChain { policy } => ["policy ", policy, ": deny rule (in CNAME chain)", ""],
            Self::AliasOfAllowed { policy } => ["policy ", policy, ": alias of an allowed name", ""],
        }
    }

    /// The text, as the query log keeps it, in one allocation of the exact size (this
    /// runs for every query; the formatter's machinery costs more than the copy).
    pub fn to_text(&self) -> String {
        let pieces = self.pieces();
        let mut out = String::with_capacity(pieces.iter().map(|p| p.len()).sum());
        for p in pieces {
            out.push_str(p);
        }
        out
    }
}

impl std::fmt::Display for Rule<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.pieces().iter().try_for_each(|p| f.write_str(p))
    }
}

/// One policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Its name in the configuration.
    pub name: String,
    /// Blocklist or allowlist.
    pub mode: Mode,
    /// Named lists (shared between policies that use the same list).
    pub lists: Vec<(String, Arc<DomainSet>)>,
    /// Names always resolved (checked after `deny`).
    pub allow: DomainSet,
    /// Names never resolved.
    pub deny: DomainSet,
    /// How blocked names are answered.
    pub block: BlockResponse,
}

impl Policy {
    /// The verdict for `name` (normalized: lower case, no trailing dot).
    pub fn decide(&self, name: &str) -> Verdict<'_> {
        let policy = self.name.as_str();
        if self.deny.matches(name) {
            return Verdict::Block(Rule::Deny { policy });
        }
        if self.allow.matches(name) {
            return Verdict::Allow(Rule::Allow { policy });
        }
        let listed = self.lists.iter().find(|(_, set)| set.matches(name));
        match (self.mode, listed) {
            (Mode::Blocklist, Some((list, _))) => Verdict::Block(Rule::List { policy, list }),
            (Mode::Blocklist, None) => Verdict::Allow(Rule::NotListed { policy }),
            (Mode::Allowlist, Some((list, _))) => Verdict::Allow(Rule::List { policy, list }),
            (Mode::Allowlist, None) => Verdict::Block(Rule::NotInAllowlist { policy }),
        }
    }

    /// The verdict for a name met in the CNAME chain of an answer to an allowed name.
    /// Blocklist mode checks it like a question. Allowlist mode checks only the deny
    /// rules: the operator allowed the name the device asked for, and the CDN names
    /// behind it are not something an allowlist can enumerate.
    pub fn decide_alias(&self, name: &str) -> Verdict<'_> {
        let policy = self.name.as_str();
        match self.mode {
            Mode::Blocklist => self.decide(name),
            Mode::Allowlist if self.deny.matches(name) => Verdict::Block(Rule::DenyInChain { policy }),
            Mode::Allowlist => Verdict::Allow(Rule::AliasOfAllowed { policy }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: Mode, list: &str, allow: &[&str], deny: &[&str]) -> Policy {
        let (set, _) = DomainSet::parse(list);
        let mut a = DomainSet::new();
        for r in allow {
            a.add_rule(r);
        }
        let mut d = DomainSet::new();
        for r in deny {
            d.add_rule(r);
        }
        Policy {
            name: "p".into(),
            mode,
            lists: vec![("l".into(), Arc::new(set))],
            allow: a,
            deny: d,
            block: BlockResponse::Nxdomain,
        }
    }

    #[test]
    fn blocklist_and_allowlist_modes() {
        let b = policy(Mode::Blocklist, "||ads.example^\n", &["ok.ads.example"], &["evil.example"]);
        assert_eq!(b.decide("x.ads.example"), Verdict::Block(Rule::List { policy: "p", list: "l" }));
        assert_eq!(b.decide("x.ads.example").rule().to_string(), "policy p: list l");
        assert_eq!(b.decide("x.ads.example").rule().to_text(), "policy p: list l");
        assert!(!b.decide("ok.ads.example").is_block());
        assert!(b.decide("evil.example").is_block());
        assert!(!b.decide("news.example").is_block());

        let a = policy(Mode::Allowlist, "||vendor.example^\n", &[], &["bad.vendor.example"]);
        assert!(!a.decide("api.vendor.example").is_block());
        assert_eq!(a.decide("news.example").rule().to_string(), "policy p: not in allowlist (default deny)");
        assert!(a.decide("bad.vendor.example").is_block());
        assert!(!a.decide_alias("cdn.example").is_block());
        assert!(a.decide_alias("bad.vendor.example").is_block());
        assert!(b.decide_alias("x.ads.example").is_block());
    }
}
