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

/// Why a name was answered the way it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Resolve it; the rule that allowed it.
    Allow(String),
    /// Block it; the rule that blocked it.
    Block(String),
}

impl Verdict {
    /// True for [`Verdict::Block`].
    pub fn is_block(&self) -> bool {
        matches!(self, Self::Block(_))
    }

    /// The rule behind the verdict.
    pub fn reason(&self) -> &str {
        match self {
            Self::Allow(r) | Self::Block(r) => r,
        }
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
    pub fn decide(&self, name: &str) -> Verdict {
        if self.deny.matches(name) {
            return Verdict::Block(format!("policy {}: deny rule", self.name));
        }
        if self.allow.matches(name) {
            return Verdict::Allow(format!("policy {}: allow rule", self.name));
        }
        let listed = self.lists.iter().find(|(_, set)| set.matches(name));
        match (self.mode, listed) {
            (Mode::Blocklist, Some((list, _))) => {
                Verdict::Block(format!("policy {}: list {list}", self.name))
            }
            (Mode::Blocklist, None) => Verdict::Allow(format!("policy {}: not listed", self.name)),
            (Mode::Allowlist, Some((list, _))) => {
                Verdict::Allow(format!("policy {}: list {list}", self.name))
            }
            (Mode::Allowlist, None) => {
                Verdict::Block(format!("policy {}: not in allowlist (default deny)", self.name))
            }
        }
    }

    /// The verdict for a name met in the CNAME chain of an answer to an allowed name.
    /// Blocklist mode checks it like a question. Allowlist mode checks only the deny
    /// rules: the operator allowed the name the device asked for, and the CDN names
    /// behind it are not something an allowlist can enumerate.
    pub fn decide_alias(&self, name: &str) -> Verdict {
        match self.mode {
            Mode::Blocklist => self.decide(name),
            Mode::Allowlist if self.deny.matches(name) => {
                Verdict::Block(format!("policy {}: deny rule (in CNAME chain)", self.name))
            }
            Mode::Allowlist => Verdict::Allow(format!("policy {}: alias of an allowed name", self.name)),
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
        assert_eq!(b.decide("x.ads.example"), Verdict::Block("policy p: list l".into()));
        assert!(!b.decide("ok.ads.example").is_block());
        assert!(b.decide("evil.example").is_block());
        assert!(!b.decide("news.example").is_block());

        let a = policy(Mode::Allowlist, "||vendor.example^\n", &[], &["bad.vendor.example"]);
        assert!(!a.decide("api.vendor.example").is_block());
        assert_eq!(a.decide("news.example").reason(), "policy p: not in allowlist (default deny)");
        assert!(a.decide("bad.vendor.example").is_block());
        assert!(!a.decide_alias("cdn.example").is_block());
        assert!(a.decide_alias("bad.vendor.example").is_block());
        assert!(b.decide_alias("x.ads.example").is_block());
    }
}
