//! Approval decisions: which auto-approval rule (if any) approves a request, and why the
//! others did not. Pure: the time is passed in.

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Deserialize, Serialize};

use super::{AccessDuration, AccessRequest, Approval, GroupName, Policy, Port, SourcePrefix};

/// A day of the week (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum Day {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Day {
    fn of(at: DateTime<Utc>) -> Self {
        [Day::Mon, Day::Tue, Day::Wed, Day::Thu, Day::Fri, Day::Sat, Day::Sun]
            [at.weekday().num_days_from_monday() as usize]
    }
}

/// Hours of the day, UTC, `from` inclusive to `to` exclusive (`{"from": 8, "to": 18}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawHours")]
pub struct Hours {
    from: u8,
    to: u8,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHours {
    from: u8,
    to: u8,
}

impl TryFrom<RawHours> for Hours {
    type Error = String;
    fn try_from(raw: RawHours) -> Result<Self, String> {
        if raw.from < raw.to && raw.to <= 24 {
            Ok(Self { from: raw.from, to: raw.to })
        } else {
            Err(format!("hours {}..{} must satisfy 0 <= from < to <= 24 (UTC)", raw.from, raw.to))
        }
    }
}

/// An auto-approval rule: every condition it states must hold; unstated ones always do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoRule {
    /// Its name, reported when it matches.
    pub name: String,
    /// The requester is in one of these groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupName>,
    /// The duration is at most this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration: Option<AccessDuration>,
    /// Every requested port is one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    /// The source lies inside one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourcePrefix>,
    /// The request is made on one of these days (UTC).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<Day>,
    /// The request is made within these hours (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<Hours>,
}

impl AutoRule {
    /// `Ok` when every condition holds, else the first that does not.
    pub fn check(&self, request: &AccessRequest, groups: &[GroupName], now: DateTime<Utc>) -> Result<(), String> {
        if !self.groups.is_empty() && !self.groups.iter().any(|g| groups.contains(g)) {
            return Err(format!("the requester is in none of the groups {}", list(&self.groups)));
        }
        if let Some(max) = self.max_duration.filter(|max| request.duration > *max) {
            return Err(format!("duration {} is above {max}", request.duration));
        }
        if let Some(port) = request.ports.iter().find(|p| !self.ports.is_empty() && !self.ports.contains(p)) {
            return Err(format!("port {port} is not among {}", list(&self.ports)));
        }
        if !self.sources.is_empty() && !self.sources.iter().any(|s| s.contains(&request.source)) {
            return Err(format!("source {} is inside none of {}", request.source, list(&self.sources)));
        }
        if !self.days.is_empty() && !self.days.contains(&Day::of(now)) {
            return Err(format!("{:?} (UTC) is not one of the rule's days", Day::of(now)).to_lowercase());
        }
        if let Some(hours) = self.hours.filter(|h| !(h.from..h.to).contains(&(now.hour() as u8))) {
            return Err(format!("{:02}:00 UTC is outside {:02}:00-{:02}:00", now.hour(), hours.from, hours.to));
        }
        Ok(())
    }
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// How a valid request is to be approved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// At once; `rule` names the auto-approval rule (`None`: the policy approves everything).
    AutoApproved {
        /// The matching rule.
        rule: Option<String>,
    },
    /// By `required` distinct approvers.
    NeedsApprovals {
        /// How many.
        required: u8,
    },
}

/// One auto-approval rule's verdict on a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleVerdict {
    /// The rule.
    pub rule: String,
    /// Why it did not match (`None`: it matched).
    pub why_not: Option<String>,
}

/// Decides how a request is approved, and explains each auto-approval rule's verdict in order
/// (stopping at the first match).
pub fn decide(
    request: &AccessRequest,
    policy: &Policy,
    groups: &[GroupName],
    now: DateTime<Utc>,
) -> (Decision, Vec<RuleVerdict>) {
    match &policy.approval {
        Approval::Auto => (Decision::AutoApproved { rule: None }, Vec::new()),
        Approval::Manual { required, auto_rules, .. } => {
            let mut verdicts = Vec::new();
            for rule in auto_rules {
                let why_not = rule.check(request, groups, now).err();
                let matched = why_not.is_none();
                verdicts.push(RuleVerdict { rule: rule.name.clone(), why_not });
                if matched {
                    return (Decision::AutoApproved { rule: Some(rule.name.clone()) }, verdicts);
                }
            }
            (Decision::NeedsApprovals { required: *required }, verdicts)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{at, policy, request};

    fn rule(json: serde_json::Value) -> AutoRule {
        let mut json = json;
        json["name"] = "r".into();
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn each_condition_can_refuse_and_says_why() {
        // at(0) is Thursday 2026-01-01 12:00 UTC; the test request is alice, port 22, PT1H, 203.0.113.7.
        let req = request();
        let devs = [GroupName::parse("devs").unwrap()];
        let cases = [
            (serde_json::json!({"groups": ["ops"]}), "none of the groups ops"),
            (serde_json::json!({"max_duration": "PT30M"}), "above PT30M"),
            (serde_json::json!({"ports": [3389]}), "port 22 is not among 3389"),
            (serde_json::json!({"sources": ["10.0.0.0/8"]}), "inside none of 10.0.0.0/8"),
            (serde_json::json!({"days": ["sat", "sun"]}), "thu (utc) is not one"),
            (serde_json::json!({"hours": {"from": 8, "to": 12}}), "12:00 UTC is outside 08:00-12:00"),
        ];
        for (json, why) in cases {
            let error = rule(json.clone()).check(&req, &devs, at(0)).unwrap_err();
            assert!(error.contains(why), "{json}: {error}");
        }
        let all = rule(
            serde_json::json!({"groups": ["devs"], "max_duration": "PT1H", "ports": [22, 3389], "sources": ["203.0.113.0/24"], "days": ["thu"], "hours": {"from": 12, "to": 13}}),
        );
        assert_eq!(all.check(&req, &devs, at(0)), Ok(()));
    }

    #[test]
    fn bad_hours_are_refused() {
        assert!(
            serde_json::from_value::<AutoRule>(serde_json::json!({"name": "x", "hours": {"from": 18, "to": 8}}))
                .is_err()
        );
        assert!(serde_json::from_value::<AutoRule>(serde_json::json!({"name": "x", "days": ["someday"]})).is_err());
    }

    #[test]
    fn the_first_matching_rule_decides_and_no_match_means_approvers() {
        let mut policy = policy();
        let rules = vec![
            rule(serde_json::json!({"groups": ["ops"]})),
            AutoRule { name: "short".into(), ..rule(serde_json::json!({"max_duration": "PT1H"})) },
        ];
        policy.approval = Approval::Manual {
            approvers: vec![],
            required: 2,
            pending_timeout: AccessDuration::minutes(60),
            auto_rules: rules,
        };
        let (decision, verdicts) = decide(&request(), &policy, &[], at(0));
        assert_eq!(decision, Decision::AutoApproved { rule: Some("short".into()) });
        assert_eq!(verdicts.len(), 2);
        let mut long = request();
        long.duration = AccessDuration::minutes(120);
        assert_eq!(decide(&long, &policy, &[], at(0)).0, Decision::NeedsApprovals { required: 2 });
    }
}
