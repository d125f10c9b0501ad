//! Access requests: what a user asks for, checked against the policy once, at the edge.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::policy::same_id;
use super::{
    AccessDuration, Approval, Member, NsgId, Policy, PolicyName, Port, PortSet, Principal, Protocol, RequestId,
    SourcePrefix, State, VmId,
};
use crate::domain::GroupName;

/// What a client sent to `POST /api/requests`; settled by [`AccessRequest::from_raw`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRequest {
    /// The policy asked under.
    pub policy: String,
    /// The VM, when the policy protects several (`vm` or `vms`, not both).
    #[serde(default)]
    vm: Option<String>,
    /// The VMs, each an id or `{"vm", "ports"}` (ports as the request's, if given).
    #[serde(default)]
    vms: Option<Vec<RawRequestVm>>,
    ports: Vec<u32>,
    duration: String,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    justification: Option<String>,
    /// Emergency self-activation (only for the policy's break-glass members).
    #[serde(default)]
    break_glass: bool,
}

/// One entry of a request's `vms`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawRequestVm {
    Id(String),
    Entry(RawRequestVmEntry),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequestVmEntry {
    vm: String,
    #[serde(default)]
    ports: Option<Vec<u32>>,
    /// Must be the request's policy, if given.
    #[serde(default)]
    policy: Option<String>,
}

/// The most VMs one request names.
pub const MAX_REQUEST_VMS: usize = 200;
/// The most NSGs one request's VMs sit behind: one rule each, opened one after another
/// within an invocation's time for ARM.
pub const MAX_REQUEST_NSGS: usize = 10;

/// Why a request was refused, split by the HTTP status it deserves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The input cannot be read (400).
    #[error("{message}")]
    Malformed {
        /// A stable snake_case code.
        code: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The input is readable but the policy does not allow it (422, or 403 for `not_a_requester`).
    #[error("{message}")]
    Refused {
        /// A stable snake_case code.
        code: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
}

fn malformed(code: &'static str, message: impl Into<String>) -> RequestError {
    RequestError::Malformed { code, message: message.into() }
}

fn refused(code: &'static str, message: impl Into<String>) -> RequestError {
    RequestError::Refused { code, message: message.into() }
}

/// One approval given to a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    /// The approver.
    pub by: Principal,
    /// When.
    pub at: DateTime<Utc>,
    /// Their comment, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// A final decision other than approval (deny, cancel), with who and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ending {
    /// Who ended it (`system` for timeouts and expiry).
    pub by: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Their reason, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One extension of a running grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extension {
    /// Who extended it.
    pub by: Principal,
    /// When.
    pub at: DateTime<Utc>,
    /// By how much.
    pub by_duration: AccessDuration,
}

/// An NSG rule that carries a grant (or a policy's baseline) on one NSG.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    /// The NSG the rule is on (kept here so a rule can be closed even if its policy is gone).
    pub nsg: NsgId,
    /// The security rule's name (`jit-<id>`).
    pub name: String,
    /// Its priority in the JIT band.
    pub priority: u16,
    /// The addresses it lets in to: the request's VMs behind this NSG, fixed at approval
    /// (empty in records from before fleets: the policy's VMs on the NSG).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<IpAddr>,
}

/// A grant's way through its policy's Azure Firewall: the names of its rules there (a DNAT
/// and a network rule each, per VM and port), fixed at approval, and the ports the DNAT
/// rules map once they are in place (Azure's `mappedPort`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallRules {
    /// The firewall.
    pub firewall: super::FirewallId,
    /// Its rules' names.
    pub names: Vec<String>,
    /// Where to connect, once opened.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mapped: Vec<MappedPort>,
}

/// One port of one VM reached through a firewall.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappedPort {
    /// The VM's private address.
    pub private_ip: IpAddr,
    /// The VM's port.
    pub port: u16,
    /// The firewall's public address to connect to.
    pub public_ip: IpAddr,
    /// The firewall's port to connect to.
    pub mapped_port: u16,
}

/// Reads `rules`, or the single `rule` of records from before fleets.
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<RuleRef>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(RuleRef),
        Many(Vec<RuleRef>),
    }
    Ok(match Option::<OneOrMany>::deserialize(deserializer)? {
        None => Vec::new(),
        Some(OneOrMany::One(rule)) => vec![rule],
        Some(OneOrMany::Many(rules)) => rules,
    })
}

/// A request for access, from creation to its final state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequest {
    /// Its id.
    pub id: RequestId,
    /// The policy it is made under.
    pub policy: PolicyName,
    /// Who asked.
    pub requester: Principal,
    /// Their name for people to read, when their credential gave one (never decided on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester_name: Option<String>,
    /// The groups they were in when they asked (what `requesters` is checked against again
    /// when the request is approved or opened).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requester_groups: Vec<GroupName>,
    /// The ports asked for.
    pub ports: PortSet,
    /// Their common protocol.
    pub protocol: Protocol,
    /// Where the access is from.
    pub source: SourcePrefix,
    /// How long the access lasts once open.
    pub duration: AccessDuration,
    /// Why it is needed.
    pub justification: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// Where it is in its life.
    #[serde(flatten)]
    pub state: State,
    /// Whether the policy approved it without an approver.
    #[serde(default)]
    pub auto_approved: bool,
    /// The auto-approval rule that approved it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_rule: Option<String>,
    /// An emergency self-activation: approved by nobody, flagged everywhere.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub break_glass: bool,
    /// Extensions granted so far.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extensions: Vec<Extension>,
    /// Approvals given so far.
    #[serde(default)]
    pub approvals: Vec<ApprovalRecord>,
    /// Who ended it early, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<Ending>,
    /// Until when pending approvals are awaited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_until: Option<DateTime<Utc>>,
    /// When it was approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_at: Option<DateTime<Utc>>,
    /// When the rule was confirmed open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<DateTime<Utc>>,
    /// When access ends (set when the rule opens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_at: Option<DateTime<Utc>>,
    /// When access actually closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<DateTime<Utc>>,
    /// The VMs asked for (empty in records from before fleets: the policy's one VM).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<VmId>,
    /// The NSG rules, one per NSG of its VMs: set when the request is approved, before any
    /// call to ARM, so every close knows what to delete whatever became of the PUTs.
    #[serde(default, alias = "rule", deserialize_with = "one_or_many", skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleRef>,
    /// Its rules on the policy's Azure Firewall, named at approval like `rules`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<FirewallRules>,
    /// PUT leases, one per opener: until each runs out, a PUT of the rule may be in flight.
    /// A close deletes the rule at once but is not final while one is held, so a rule that
    /// lands after a racing close is deleted too. Each holder releases only its own, and only
    /// once its PUT's outcome is known for sure.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub put_leases: Vec<DateTime<Utc>>,
    /// ARM attempts made for the current step (opening or closing).
    #[serde(default)]
    pub arm_attempts: u32,
    /// The last ARM failure, for operators (never contains secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Notices already sent (`reminder`, `timing_out`, `expiring:<ends_at>`), each once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<String>,
}

/// The VMs a request names, checked against its policy: `vm`, `vms`, or neither when the
/// policy protects exactly one. Every VM gets the request's ports (a rule covers all the
/// VMs behind one NSG, so they cannot differ).
fn choose_vms(
    vm: Option<String>,
    vms: Option<Vec<RawRequestVm>>,
    ports: &PortSet,
    policy: &Policy,
) -> Result<Vec<VmId>, RequestError> {
    let named: Vec<String> = match (vm, vms) {
        (Some(_), Some(_)) => return Err(malformed("invalid_vms", "give 'vm' or 'vms', not both")),
        (Some(vm), None) => vec![vm],
        (None, Some(entries)) => {
            if entries.is_empty() || entries.len() > MAX_REQUEST_VMS {
                return Err(malformed("invalid_vms", format!("'vms' must name 1 to {MAX_REQUEST_VMS} VMs")));
            }
            let mut named = Vec::with_capacity(entries.len());
            for entry in entries {
                match entry {
                    RawRequestVm::Id(vm) => named.push(vm),
                    RawRequestVm::Entry(entry) => {
                        if let Some(other) = entry.policy.as_deref().filter(|p| *p != policy.name.as_str()) {
                            return Err(refused(
                                "one_policy_per_request",
                                format!(
                                    "VM {} is asked under policy '{}', the request under '{}': one request is decided under one policy; ask under each separately",
                                    entry.vm.chars().take(200).collect::<String>(),
                                    other.chars().take(64).collect::<String>(),
                                    policy.name
                                ),
                            ));
                        }
                        let same = entry.ports.as_ref().is_none_or(|given| {
                            given.len() == ports.iter().count()
                                && given.iter().all(|p| ports.iter().any(|q| u32::from(q.get()) == *p))
                        });
                        if !same {
                            return Err(malformed(
                                "mixed_ports",
                                "every VM of a request gets the same ports: ask for different ports in separate requests",
                            ));
                        }
                        named.push(entry.vm);
                    }
                }
            }
            named
        }
        (None, None) => match policy.vms.as_slice() {
            [only] => return Ok(vec![only.vm.clone()]),
            [] => {
                return Err(refused(
                    "no_vms",
                    format!("policy '{}' protects no VM yet (see its 'unprotected')", policy.name),
                ));
            }
            _ => {
                return Err(malformed(
                    "vm_required",
                    format!("policy '{}' protects {} VMs: name them in 'vm' or 'vms'", policy.name, policy.vms.len()),
                ));
            }
        },
    };
    let mut chosen: Vec<VmId> = Vec::with_capacity(named.len());
    for name in named {
        let id = VmId::parse(&name).map_err(|e| malformed("invalid_vm", e.to_string()))?;
        let Some(vm) = policy.vm(id.as_str()) else {
            let why = policy.unprotected.iter().find(|u| same_id(&u.vm, id.as_str()));
            return Err(refused(
                "vm_not_in_policy",
                match why {
                    Some(u) => format!("VM {id} cannot be protected by policy '{}': {}", policy.name, u.reason),
                    None => format!("VM {id} is not protected by policy '{}'", policy.name),
                },
            ));
        };
        if chosen.iter().any(|c| same_id(c.as_str(), vm.vm.as_str())) {
            return Err(malformed("invalid_vms", format!("VM {id} is named twice")));
        }
        chosen.push(vm.vm.clone());
    }
    let mut nsgs: Vec<&str> = Vec::new();
    for vm in chosen.iter().filter_map(|id| policy.vm(id.as_str())) {
        if !nsgs.iter().any(|n| same_id(n, vm.nsg.as_str())) {
            nsgs.push(vm.nsg.as_str());
        }
    }
    if nsgs.len() > MAX_REQUEST_NSGS {
        return Err(refused(
            "too_many_nsgs",
            format!(
                "these VMs sit behind {} NSGs; one request opens at most {MAX_REQUEST_NSGS} (one rule each): split it",
                nsgs.len()
            ),
        ));
    }
    Ok(chosen)
}

/// Longest accepted justification, in characters.
const MAX_JUSTIFICATION: usize = 500;
/// Shortest access anyone may ask for.
const MIN_DURATION_SECS: u32 = 60;

impl AccessRequest {
    /// Checks a raw request against its policy and settles its defaults: the source is the
    /// caller's address unless a prefix is given, which must lie inside an allowed one.
    pub fn from_raw(
        raw: RawRequest,
        policy: &Policy,
        requester: &Principal,
        requester_groups: &[GroupName],
        caller_ip: Option<IpAddr>,
        id: RequestId,
        now: DateTime<Utc>,
    ) -> Result<Self, RequestError> {
        let ports = raw
            .ports
            .iter()
            .map(|p| Port::new(*p).map_err(|e| malformed("invalid_port", e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let ports = PortSet::new(ports).map_err(|e| malformed("invalid_ports", e.to_string()))?;
        let vms = choose_vms(raw.vm, raw.vms, &ports, policy)?;
        let duration =
            AccessDuration::parse(&raw.duration).map_err(|e| malformed("invalid_duration", e.to_string()))?;
        let source = match raw.source.as_deref() {
            Some(text) => SourcePrefix::parse(text).map_err(|e| malformed("invalid_source", e.to_string()))?,
            None => SourcePrefix::host(caller_ip.ok_or_else(|| {
                malformed("source_required", "the caller's address is unknown here; give 'source' explicitly")
            })?),
        };
        let justification = raw.justification.unwrap_or_default().trim().to_owned();
        if justification.is_empty() {
            return Err(malformed(
                "justification_required",
                "'justification' is required: say why access is needed (e.g. a ticket id)",
            ));
        }
        if justification.chars().count() > MAX_JUSTIFICATION || justification.chars().any(super::is_invisible) {
            return Err(malformed(
                "invalid_justification",
                format!(
                    "'justification' must be at most {MAX_JUSTIFICATION} characters without control, zero-width or bidirectional-override characters"
                ),
            ));
        }

        if let Some(pattern) = &policy.justification_pattern {
            // Checked when the policy was stored; a pattern that no longer compiles refuses.
            let matches = regex_lite::Regex::new(pattern).is_ok_and(|re| re.is_match(&justification));
            if !matches {
                return Err(refused(
                    "justification_mismatch",
                    format!("the justification must match the policy's pattern {pattern}"),
                ));
            }
        }
        if raw.break_glass {
            let Some(glass) = &policy.break_glass else {
                return Err(refused(
                    "break_glass_not_allowed",
                    format!("policy '{}' has no break-glass access", policy.name),
                ));
            };
            if !glass.members.iter().any(|m| m.covers(requester, requester_groups)) {
                return Err(refused(
                    "break_glass_not_allowed",
                    format!("'{requester}' may not break the glass under policy '{}'", policy.name),
                ));
            }
            if duration > glass.max_duration {
                return Err(refused(
                    "duration_too_long",
                    format!("break-glass access lasts at most {}", glass.max_duration),
                ));
            }
        }
        if !policy.enabled {
            return Err(refused("policy_disabled", format!("policy '{}' is disabled", policy.name)));
        }
        if !policy.requesters.is_empty() && !policy.requesters.iter().any(|m| m.covers(requester, requester_groups)) {
            return Err(refused(
                "not_a_requester",
                format!("'{requester}' may not request access under policy '{}'", policy.name),
            ));
        }
        if duration.as_secs() < MIN_DURATION_SECS {
            return Err(refused("duration_too_short", format!("duration {duration} is below the minimum PT1M")));
        }
        let mut protocol = None;
        for port in ports.iter() {
            let rule = policy.port(port).ok_or_else(|| {
                let offered: Vec<String> = policy.ports.iter().map(|p| p.port.to_string()).collect();
                refused(
                    "port_not_in_policy",
                    format!("port {port} is not in policy '{}' (it offers {})", policy.name, offered.join(", ")),
                )
            })?;
            if duration > rule.max_duration {
                return Err(refused(
                    "duration_too_long",
                    format!("duration {duration} is above port {port}'s maximum {}", rule.max_duration),
                ));
            }
            if rule.allowed_sources.is_empty() {
                return Err(refused(
                    "source_not_allowed",
                    format!("port {port} allows no sources yet: an admin must set its allowed_sources"),
                ));
            }
            if !rule.allowed_sources.iter().any(|allowed| allowed.admits(&source)) {
                let allowed: Vec<String> = rule.allowed_sources.iter().map(|a| String::from(*a)).collect();
                return Err(refused(
                    "source_not_allowed",
                    format!(
                        "source {source} is not inside the prefixes allowed for port {port} ({})",
                        allowed.join(", ")
                    ),
                ));
            }
            match protocol {
                None => protocol = Some(rule.protocol),
                Some(p) if p == rule.protocol => {}
                Some(_) => {
                    return Err(refused(
                        "mixed_protocols",
                        "the requested ports have different protocols; request them separately",
                    ));
                }
            }
        }
        let pending_until = match &policy.approval {
            Approval::Auto => None,
            Approval::Manual { pending_timeout, .. } => Some(now + pending_timeout.as_delta()),
        };
        Ok(Self {
            id,
            policy: policy.name.clone(),
            requester: requester.clone(),
            requester_name: None,
            notices: Vec::new(),
            requester_groups: requester_groups.to_vec(),
            ports,
            protocol: protocol.expect("a port set is never empty"),
            source,
            duration,
            justification,
            created_at: now,
            state: State::Pending,
            auto_approved: false,
            auto_rule: None,
            break_glass: raw.break_glass,
            extensions: Vec::new(),
            approvals: Vec::new(),
            ended: None,
            pending_until,
            approved_at: None,
            activated_at: None,
            ends_at: None,
            closed_at: None,
            vms,
            rules: Vec::new(),
            firewall: None,
            put_leases: Vec::new(),
            arm_attempts: 0,
            last_error: None,
        })
    }

    /// Whether this request and `other` name a VM in common (records from before fleets name
    /// none: their policy's one VM).
    pub fn shares_vm_with(&self, other: &AccessRequest) -> bool {
        self.vms.is_empty()
            || other.vms.is_empty()
            || self.vms.iter().any(|a| other.vms.iter().any(|b| same_id(a.as_str(), b.as_str())))
    }

    /// Whether every VM of this request is among `other`'s (never for a record from before
    /// fleets, whose VM is not named).
    pub fn vms_within(&self, other: &AccessRequest) -> bool {
        !self.vms.is_empty() && self.vms.iter().all(|a| other.vms.iter().any(|b| same_id(a.as_str(), b.as_str())))
    }

    /// Each VM address and port it opens through a firewall, with the name its rules there
    /// take (`jit-<id>-<n>-<port>`, `n` counting the addresses of its rules in order).
    pub fn firewall_targets(&self) -> Vec<(String, IpAddr, u16)> {
        let addresses = self.rules.iter().flat_map(|rule| rule.destinations.iter().copied());
        addresses
            .enumerate()
            .flat_map(|(n, address)| {
                self.ports.iter().map(move |port| (format!("jit-{}-{n}-{port}", self.id), address, port.get()))
            })
            .collect()
    }

    /// The NSG rule name for this request: `jit-<id>`, within ARM's 80 characters.
    pub fn rule_name(&self) -> String {
        format!("jit-{}", self.id)
    }

    /// Whether a PUT of the rule may still be in flight at `now`.
    pub fn put_in_flight(&self, now: DateTime<Utc>) -> bool {
        self.put_leases.iter().any(|until| *until > now)
    }

    /// Takes a PUT lease until `until` (dropping those run out by `now`); answers it, which is
    /// the holder's token for [`AccessRequest::release_put_lease`].
    pub fn take_put_lease(&mut self, now: DateTime<Utc>, until: DateTime<Utc>) -> DateTime<Utc> {
        self.put_leases.retain(|lease| *lease > now);
        self.put_leases.push(until);
        until
    }

    /// Releases the lease a holder took, and no other.
    pub fn release_put_lease(&mut self, mine: DateTime<Utc>) {
        if let Some(index) = self.put_leases.iter().position(|lease| *lease == mine) {
            self.put_leases.remove(index);
        }
    }

    /// When the last lease runs out.
    pub fn put_lease_end(&self) -> Option<DateTime<Utc>> {
        self.put_leases.iter().max().copied()
    }
}

/// Whether `approver` may approve a request: listed among the policy's approvers and not the
/// requester. Self-approval is refused whatever else the approver is.
pub fn may_approve(
    request: &AccessRequest,
    policy: &Policy,
    approver: &Principal,
    groups: &[GroupName],
) -> Result<(), &'static str> {
    if *approver == request.requester {
        return Err("requesters can never approve their own request");
    }
    match &policy.approval {
        Approval::Auto => Err("this policy approves automatically; there is nothing to approve"),
        Approval::Manual { approvers, .. } if approvers.iter().any(|m: &Member| m.covers(approver, groups)) => Ok(()),
        Approval::Manual { .. } => Err("not an approver of this policy"),
    }
}

/// How many more distinct approvals are needed before the rule opens.
pub fn approvals_missing(request: &AccessRequest, policy: &Policy) -> usize {
    let required = match &policy.approval {
        Approval::Auto => 0,
        Approval::Manual { required, .. } => usize::from(*required),
    };
    let mut distinct: Vec<&Principal> =
        request.approvals.iter().map(|a| &a.by).filter(|p| **p != request.requester).collect();
    distinct.sort();
    distinct.dedup();
    required.saturating_sub(distinct.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{at, policy, raw_request};

    fn build(json: serde_json::Value) -> Result<AccessRequest, RequestError> {
        let raw: RawRequest = serde_json::from_value(json).unwrap();
        let alice = Principal::parse("alice").unwrap();
        AccessRequest::from_raw(
            raw,
            &policy(),
            &alice,
            &[GroupName::parse("devs").unwrap()],
            Some("203.0.113.7".parse().unwrap()),
            RequestId::parse("r1").unwrap(),
            at(0),
        )
    }

    fn code(result: Result<AccessRequest, RequestError>) -> &'static str {
        match result.unwrap_err() {
            RequestError::Malformed { code, .. } | RequestError::Refused { code, .. } => code,
        }
    }

    #[test]
    fn the_source_defaults_to_the_callers_address() {
        let mut json = raw_request();
        json.as_object_mut().unwrap().remove("source");
        assert_eq!(build(json).unwrap().source.to_string(), "203.0.113.7/32");
    }

    #[test]
    fn a_request_of_a_one_vm_policy_names_its_vm_and_one_stored_before_fleets_keeps_its_rule() {
        let request = build(raw_request()).unwrap();
        assert_eq!(request.vms, [VmId::parse(crate::testing::VM).unwrap()]);
        let mut legacy = serde_json::to_value(&request).unwrap();
        legacy.as_object_mut().unwrap().remove("vms");
        legacy["rule"] = serde_json::json!({"nsg": crate::testing::NSG, "name": "jit-r1", "priority": 200});
        let read: AccessRequest = serde_json::from_value(legacy).unwrap();
        assert_eq!(read.rules.len(), 1);
        assert_eq!((read.rules[0].name.as_str(), read.rules[0].priority), ("jit-r1", 200));
        assert!(read.vms.is_empty() && read.shares_vm_with(&request) && !read.vms_within(&request));
        let back: AccessRequest = serde_json::from_str(&serde_json::to_string(&read).unwrap()).unwrap();
        assert_eq!(back, read);
    }

    #[test]
    fn a_narrower_prefix_inside_an_allowed_one_is_accepted() {
        let mut json = raw_request();
        json["source"] = "203.0.113.16/28".into();
        assert_eq!(build(json).unwrap().source.to_string(), "203.0.113.16/28");
    }

    #[test]
    fn each_kind_of_mistake_gets_its_own_code() {
        let cases: Vec<(&str, serde_json::Value)> = vec![
            ("invalid_port", serde_json::json!({"ports": [0]})),
            ("invalid_ports", serde_json::json!({"ports": []})),
            ("invalid_duration", serde_json::json!({"duration": "1 hour"})),
            ("invalid_source", serde_json::json!({"source": "203.0.113.7/24"})),
            ("justification_required", serde_json::json!({"justification": "  "})),
            ("port_not_in_policy", serde_json::json!({"ports": [80]})),
            ("duration_too_long", serde_json::json!({"duration": "PT3H1M"})),
            ("duration_too_short", serde_json::json!({"duration": "PT30S"})),
            ("source_not_allowed", serde_json::json!({"source": "198.51.100.1"})),
            ("source_not_allowed", serde_json::json!({"source": "203.0.112.0/23"})),
        ];
        for (expected, patch) in cases {
            let mut json = raw_request();
            for (k, v) in patch.as_object().unwrap() {
                json[k] = v.clone();
            }
            assert_eq!(code(build(json)), expected, "{patch}");
        }
    }

    #[test]
    fn approvals_count_distinct_approvers_and_never_the_requester() {
        let mut request = build(raw_request()).unwrap();
        let mut policy = policy();
        policy.approval = Approval::Manual {
            auto_rules: vec![],
            approvers: vec![Member::parse("group:ops").unwrap()],
            required: 2,
            pending_timeout: AccessDuration::minutes(60),
        };
        let approve = |by: &str| ApprovalRecord { by: Principal::parse(by).unwrap(), at: at(1), comment: None };
        assert_eq!(approvals_missing(&request, &policy), 2);
        request.approvals = vec![approve("bob"), approve("bob"), approve("alice")];
        assert_eq!(approvals_missing(&request, &policy), 1);
        request.approvals.push(approve("carol"));
        assert_eq!(approvals_missing(&request, &policy), 0);
    }

    #[test]
    fn self_approval_is_refused_even_for_listed_approvers() {
        let request = build(raw_request()).unwrap();
        let mut policy = policy();
        policy.approval = Approval::Manual {
            auto_rules: vec![],
            approvers: vec![Member::parse("alice").unwrap()],
            required: 1,
            pending_timeout: AccessDuration::minutes(60),
        };
        assert!(may_approve(&request, &policy, &request.requester, &[]).is_err());
        assert!(may_approve(&request, &policy, &Principal::parse("mallory").unwrap(), &[]).is_err());
    }
}
