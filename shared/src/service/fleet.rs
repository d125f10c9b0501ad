//! Keeping a fleet's VMs current: the reconciler lists a policy's resource group or tag again
//! once an hour, so a VM that joins gets the baseline deny rule (and may be requested) and one
//! that leaves loses it, without the admin putting the policy again.
//!
//! A refresh is bounded in ARM reads: at most [`REFRESH_PAGES`] pages of the listing and
//! [`REFRESH_RESOLVES`] VMs resolved (two or three reads each; half of them, at most, VMs
//! already in the fleet), and at most one policy is refreshed per sweep. A listing cut short changes nothing (a VM missing from a partial list
//! has not left); VMs left unresolved join at the next scan. VMs already in the fleet are
//! resolved again a slice at a time (10 an hour): one re-created with another address or
//! moved behind another NSG takes its new placement, and its grants end (its old address may
//! be another VM's now).

use chrono::TimeDelta;
use serde_json::json;

use super::reconcile::{DriftScan, Finding};
use super::{Env, grants, policies, subject_of_policy};
use crate::api::ApiError;
use crate::arm::inventory;
use crate::domain::policy::{Leavers, MAX_POLICY_VMS, Unprotected, same_id};
use crate::domain::request::Ending;
use crate::domain::{AccessRequest, Event, Policy, VmId};
use crate::keys;
use crate::store::{self, Versioned};

/// How often a selector is listed again.
pub const REFRESH_EVERY: TimeDelta = TimeDelta::minutes(60);
/// Pages of the listing one refresh reads.
const REFRESH_PAGES: usize = 5;
/// VMs one refresh resolves; the rest join at the next scan.
const REFRESH_RESOLVES: usize = 20;

/// What a refresh changed.
#[derive(Debug, Default)]
struct Change {
    joined: Vec<String>,
    left: Vec<VmId>,
    /// VMs whose address or NSG changed since they were resolved (re-created, moved).
    moved: Vec<VmId>,
    unprotected: Vec<Unprotected>,
    pending: usize,
}

/// Lists the policy's selector again when it is due and `allowance` (refreshes left this sweep)
/// permits; saves the new set of VMs and, by the policy's `leavers`, ends grants on VMs that
/// left. Leaves `policy` as saved. The NSG scans that follow put or remove deny rules to match.
pub(crate) fn refresh(
    env: &Env,
    policy: &mut Versioned<Policy>,
    grants: &mut Vec<Versioned<AccessRequest>>,
    allowance: &mut usize,
    scan: &mut DriftScan,
) -> Result<(), ApiError> {
    let Some(selector) = policy.value.selector.clone() else { return Ok(()) };
    if *allowance == 0 || policy.value.resolved_at.is_some_and(|at| at + REFRESH_EVERY > env.now) {
        return Ok(());
    }
    *allowance -= 1;
    let mut problem = |detail: String| {
        scan.findings.push(Finding { kind: "refresh_failed".into(), nsg: String::new(), rule: String::new(), detail })
    };
    let listing = match inventory::list(env.arm, &selector, None, REFRESH_PAGES) {
        Ok(listing) if listing.resume.is_none() && listing.vms.len() <= MAX_POLICY_VMS => listing,
        Ok(_) => {
            problem(format!(
                "{} holds more VMs than one refresh lists ({REFRESH_PAGES} pages, {MAX_POLICY_VMS} VMs): the fleet is unchanged",
                selector.scope
            ));
            return Ok(());
        }
        Err(error) => {
            problem(format!("listing the VMs of {} failed: {error}", selector.scope));
            return Ok(());
        }
    };
    // A listing that finds nothing where VMs were (a tag index behind, a role assignment
    // lost) is not taken as every VM leaving: their deny rules stay until a listing finds
    // VMs again or an admin puts the policy.
    if listing.vms.is_empty() && !policy.value.vms.is_empty() {
        problem(format!(
            "{} listed no VM where the policy protects {}: the fleet is unchanged",
            selector.scope,
            policy.value.vms.len()
        ));
        return Ok(());
    }
    let listed = |id: &str| listing.vms.iter().any(|vm| same_id(vm.as_str(), id));
    let mut change = Change::default();
    let mut next = policy.value.clone();
    next.vms.retain(|vm| {
        let stays = listed(vm.vm.as_str());
        if !stays {
            change.left.push(vm.vm.clone());
        }
        stays
    });
    let known = |id: &str| policy.value.vm(id).is_some();
    next.unprotected.clear();
    let mut resolves = recheck_placements(env, &mut next, &mut change, &mut problem);
    for vm in &listing.vms {
        if known(vm.as_str()) {
            continue;
        }
        if resolves == REFRESH_RESOLVES {
            change.pending += 1;
            continue;
        }
        resolves += 1;
        match policies::resolve_one(env, vm) {
            Ok(protected) => {
                change.joined.push(vm.to_string());
                next.vms.push(protected);
            }
            Err(error) if error.status == 422 => {
                next.unprotected.push(Unprotected { vm: vm.to_string(), reason: error.message })
            }
            Err(error) => {
                problem(format!("resolving VM {vm} failed: {}", error.message));
                change.pending += 1;
            }
        }
    }
    change.unprotected.clone_from(&next.unprotected);
    // Refreshed once everything listed is placed; otherwise again at the next scan.
    if change.pending == 0 {
        next.resolved_at = Some(env.now);
    }
    let changed = !change.joined.is_empty()
        || !change.left.is_empty()
        || !change.moved.is_empty()
        || next.unprotected != policy.value.unprotected;
    let key = keys::policy(&policy.value.name);
    let details = json!({
        "joined": change.joined,
        "left": change.left,
        "moved": change.moved,
        "unprotected": change.unprotected.len(),
        "pending": change.pending,
    });
    let saved = if changed {
        env.audited("policy.refreshed", subject_of_policy(&policy.value.name), details, || {
            Ok(store::save(env.kv, &key, &next, Some(policy.version))?)
        })
    } else {
        Ok(store::save(env.kv, &key, &next, Some(policy.version))?)
    };
    match saved {
        Ok(version) => *policy = Versioned { value: next, version },
        // An admin changed the policy meanwhile: theirs stands, refreshed at the next scan.
        Err(error) if error.is_concurrent_update() => return Ok(()),
        Err(error) => return Err(error),
    }
    // A VM whose address changed may have handed its old one to another VM: the grants
    // that let in to an address that is not one of their own VMs' alone any more end,
    // whatever `leavers` says.
    let mut ending = change.moved.clone();
    if policy.value.leavers == Leavers::End {
        ending.extend(change.left.iter().cloned());
    }
    end_grants(env, grants, &policy.value, &ending)?;
    Ok(())
}

/// Resolves again a slice of the VMs already in the fleet (a different slice each hour, so
/// every VM is looked at again in turn), within the refresh's read budget: a VM re-created
/// with another address, or moved behind another NSG, takes its new placement; one that
/// cannot be resolved now keeps its own, and either way its grants end. Answers how many
/// resolves it spent.
fn recheck_placements(env: &Env, next: &mut Policy, change: &mut Change, problem: &mut impl FnMut(String)) -> usize {
    let count = next.vms.len();
    let slice = (REFRESH_RESOLVES / 2).min(count);
    if slice == 0 {
        return 0;
    }
    let hour = usize::try_from(env.now.timestamp() / REFRESH_EVERY.num_seconds()).unwrap_or(0);
    let start = hour.wrapping_mul(slice) % count;
    for offset in 0..slice {
        let index = (start + offset) % count;
        let known = next.vms[index].clone();
        match policies::resolve_one(env, &known.vm) {
            Ok(now)
                if now.nsg.as_str().eq_ignore_ascii_case(known.nsg.as_str()) && now.private_ip == known.private_ip => {}
            Ok(now) => {
                change.moved.push(known.vm.clone());
                next.vms[index] = now;
            }
            // Not protectable now (perhaps mid re-creation): its grants end, but it keeps its
            // placement and deny rule until a listing drops it or a later check places it.
            Err(error) if error.status == 422 => {
                problem(format!("VM {} cannot be resolved again: {}", known.vm, error.message));
                change.moved.push(known.vm.clone());
            }
            Err(error) => {
                problem(format!("resolving VM {} again failed: {}", known.vm, error.message));
                change.pending += 1;
                return offset + 1;
            }
        }
    }
    slice
}

/// Ends the grants that name one of `vms`, or let in to an address that is no longer one of
/// their own VMs' alone under `policy`.
fn end_grants(
    env: &Env,
    grants: &mut Vec<Versioned<AccessRequest>>,
    policy: &Policy,
    vms: &[VmId],
) -> Result<(), ApiError> {
    let mut index = 0;
    while index < grants.len() {
        let grant = &grants[index].value;
        let why = match grant.vms.iter().find(|vm| vms.iter().any(|l| same_id(l.as_str(), vm.as_str()))) {
            Some(vm) => Some(format!("VM {vm} left the policy or changed its address or NSG")),
            None => grants::addresses_still_held(grant, policy).err(),
        };
        let Some(why) = why else {
            index += 1;
            continue;
        };
        let mut grant = grants.remove(index);
        let ending = Ending { by: "system".into(), at: env.now, reason: Some(why) };
        if let Err(error) = grants::close(env, &mut grant, Event::Revoke, Some(ending)) {
            eprintln!("fleet: ending {} (a VM left or moved): {}", grant.value.id, error.message);
        }
    }
    Ok(())
}
