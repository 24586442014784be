//! Staged rollouts.
//!
//! A rollout offers one published version to the devices of one hardware model (in one
//! group, or all groups) in stages, e.g. 5 %, 25 %, 100 %. The devices eligible when it
//! is created are ranked by SHA-256 of `rollout id / device id`; stage *k* admits the
//! first ⌊N·pₖ/100⌋ of that ranking, so placement is deterministic, independent of the
//! order devices ask in, a device admitted once stays admitted when the rollout widens,
//! and a stage never exceeds its share. Devices enrolled later join at the 100 % stage.
//!
//! The rollout pauses itself when, among its devices that reported an outcome, the share
//! that failed exceeds `max_failure_rate` — once at least `min_reports` devices have
//! reported (default 10), so that one device cannot stop a rollout by itself. Outcomes
//! count only from devices the rollout admitted, for its hardware and version, one per
//! device (its last).

use ring::digest;
use serde::{Deserialize, Serialize};

use portcullis_store::RolloutRecord;
pub use portcullis_store::{DEFAULT_MIN_REPORTS, RolloutState as State};

/// A rollout: the record the registry keeps, and the staging rules below.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct Rollout(pub RolloutRecord);

impl std::ops::Deref for Rollout {
    type Target = RolloutRecord;
    fn deref(&self) -> &RolloutRecord {
        &self.0
    }
}

impl std::ops::DerefMut for Rollout {
    fn deref_mut(&mut self) -> &mut RolloutRecord {
        &mut self.0
    }
}

/// Parses `5,25,100`: increasing percentages in 1..=100 ending with 100.
pub fn parse_stages(s: &str) -> Result<Vec<u8>, String> {
    let stages: Vec<u8> = s
        .split(',')
        .map(|p| p.trim().trim_end_matches('%').parse::<u8>().map_err(|_| format!("invalid stage {p:?}")))
        .collect::<Result<_, _>>()?;
    if stages.is_empty() || stages.iter().any(|&p| p == 0 || p > 100) {
        return Err("stages are percentages between 1 and 100".into());
    }
    if stages.windows(2).any(|w| w[0] >= w[1]) {
        return Err("stages must increase".into());
    }
    if stages.last() != Some(&100) {
        return Err("the last stage must be 100".into());
    }
    Ok(stages)
}

/// Parses `5%` or `0.05` into a share in 0..=1.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let v = match s.trim().strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
        None => s.trim().parse::<f64>(),
    }
    .map_err(|_| format!("invalid failure rate {s:?}: use e.g. 5% or 0.05"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("failure rate {s:?} is outside 0..100%"));
    }
    Ok(v)
}

/// Ranks `devices` for rollout `id`: ascending SHA-256 of `id/device`.
pub fn rank(id: i64, mut devices: Vec<String>) -> Vec<String> {
    let key = |d: &str| digest::digest(&digest::SHA256, format!("{id}/{d}").as_bytes());
    devices.sort_by_cached_key(|d| key(d).as_ref().to_vec());
    devices.dedup();
    devices
}

/// How many of `n` devices a stage of `percent` admits: never more than its share.
pub fn stage_size(n: usize, percent: u8) -> usize {
    n * usize::from(percent) / 100
}

impl Rollout {
    /// The current stage's percentage.
    pub fn percent(&self) -> u8 {
        self.stages.get(self.stage).copied().unwrap_or(100)
    }

    /// How many devices the current stage admits.
    pub fn admitted_count(&self) -> usize {
        stage_size(self.population.len(), self.percent())
    }

    /// Whether `device` is admitted now.
    pub fn admits(&self, device: &str) -> bool {
        self.state == State::Active && self.has_admitted(device)
    }

    /// Whether the stage reached so far covers `device`, whatever the state: a device
    /// that was offered the version may report on it after a pause. Devices outside the
    /// population (enrolled later) are covered once the rollout is at 100 %.
    pub fn has_admitted(&self, device: &str) -> bool {
        match self.population.iter().position(|d| d == device) {
            Some(rank) => rank < self.admitted_count(),
            None => self.percent() == 100,
        }
    }

    /// Moves to the next stage; error at the last.
    pub fn advance(&mut self) -> Result<u8, String> {
        if self.state == State::Aborted {
            return Err(format!("rollout {} was aborted", self.id));
        }
        if self.stage + 1 >= self.stages.len() {
            return Err(format!("rollout {} is already at its last stage (100%)", self.id));
        }
        self.stage += 1;
        Ok(self.percent())
    }

    /// Evaluates the failure rate of the outcomes so far (`failed` of `reported`
    /// devices); pauses and returns the reason when it is over the limit.
    pub fn check_failures(&mut self, failed: usize, reported: usize) -> Option<String> {
        if self.state != State::Active || reported == 0 || reported < self.min_reports {
            return None;
        }
        let rate = failed as f64 / reported as f64;
        if rate > self.max_failure_rate {
            let reason = format!(
                "paused automatically: {failed} of {reported} reporting devices failed ({:.1}% > {:.1}%)",
                rate * 100.0,
                self.max_failure_rate * 100.0
            );
            self.state = State::Paused;
            self.reason = Some(reason.clone());
            return Some(reason);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("dev-{i:04}")).collect()
    }

    fn rollout(n: usize) -> Rollout {
        Rollout(RolloutRecord {
            id: 7,
            hardware: "cam".into(),
            version: "1.1.0".into(),
            target: "cam/1.1.0/fw.bin".into(),
            group: None,
            stages: vec![5, 25, 100],
            stage: 0,
            max_failure_rate: 0.05,
            min_reports: DEFAULT_MIN_REPORTS,
            state: State::Active,
            reason: None,
            population: rank(7, fleet(n)),
            created_at: String::new(),
        })
    }

    #[test]
    fn stages_are_exact_nested_and_deterministic() {
        let mut r = rollout(1000);
        let admitted = |r: &Rollout| fleet(1000).iter().filter(|d| r.admits(d)).cloned().collect::<Vec<_>>();
        let s1 = admitted(&r);
        assert_eq!(s1.len(), 50);
        r.advance().unwrap();
        let s2 = admitted(&r);
        assert_eq!(s2.len(), 250);
        assert!(s1.iter().all(|d| s2.contains(d)), "a device admitted once stays admitted");
        r.advance().unwrap();
        assert_eq!(admitted(&r).len(), 1000);
        assert!(r.admits("enrolled-later"));
        assert!(r.advance().is_err());
        // Same id, same fleet in another order: same placement.
        let mut shuffled = fleet(1000);
        shuffled.reverse();
        assert_eq!(rank(7, shuffled), rollout(1000).population);
        // Another rollout places devices differently.
        assert_ne!(rank(8, fleet(1000))[..50], rollout(1000).population[..50]);
    }

    #[test]
    fn a_stage_never_exceeds_its_share() {
        for n in [1, 3, 19, 20, 21, 999] {
            for p in [1, 5, 25, 50, 99] {
                assert!(stage_size(n, p) * 100 <= n * usize::from(p));
            }
        }
        assert_eq!(stage_size(7, 100), 7);
    }

    #[test]
    fn failure_rate_pauses() {
        let mut r = rollout(1000);
        assert_eq!(r.check_failures(2, 50), None); // 4 % <= 5 %
        let reason = r.check_failures(3, 50).unwrap(); // 6 %
        assert_eq!(reason, "paused automatically: 3 of 50 reporting devices failed (6.0% > 5.0%)");
        assert_eq!(r.state, State::Paused);
        assert!(!r.admits(&r.population[0].clone()));
        // Paused, the devices it offered the version to may still report on it.
        assert!(r.has_admitted(&r.population[0].clone()));
        assert!(!r.has_admitted(&r.population[999].clone()));
    }

    #[test]
    fn too_few_reports_never_pause() {
        let mut r = rollout(1000);
        assert_eq!(r.check_failures(9, 9), None, "9 failures of 9 devices, fewer than 10 reporting");
        assert_eq!(r.state, State::Active);
        assert!(r.check_failures(10, 10).is_some());
        let mut one = rollout(10);
        one.min_reports = 1;
        assert!(one.check_failures(1, 1).is_some());
    }

    #[test]
    fn parses_stages_and_rates() {
        assert_eq!(parse_stages("5,25,100").unwrap(), vec![5, 25, 100]);
        assert_eq!(parse_stages("100").unwrap(), vec![100]);
        assert_eq!(parse_stages("25,5,100").unwrap_err(), "stages must increase");
        assert_eq!(parse_stages("5,25").unwrap_err(), "the last stage must be 100");
        assert_eq!(parse_rate("5%").unwrap(), 0.05);
        assert_eq!(parse_rate("0.1").unwrap(), 0.1);
        assert!(parse_rate("150%").is_err());
    }
}
