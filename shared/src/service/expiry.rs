//! Closing the grants that fall due together, as one batch: the steps of [`grants::close`],
//! each made once for the whole batch where it can be. One read of the indexes the closes
//! touch, one write-ahead listing under `work:arm`, one audit append before the grants move
//! to `revoking` and one after their rules are gone, one write per index document; what is
//! left per grant is its own two saves and its requester's open list.
//!
//! The order of the one-grant close is kept (listed for the sweep, then recorded, then saved;
//! deleted on ARM; recorded, saved, unlisted), so a crash anywhere leaves each grant where the
//! sweep finishes it. A grant that leaves the common path (a lost race, a failed DELETE, a
//! PUT still in flight) is reloaded and handed to the one-grant code, which handles every
//! case.

use std::collections::BTreeMap;

use serde_json::json;

use super::{Env, grants, subject_of};
use crate::api::ApiError;
use crate::arm::ArmError;
use crate::audit::Outcome;
use crate::domain::{AccessRequest, Event};
use crate::keys;
use crate::store::{self, KvStore, Versioned};

/// Closes due grants (active, past their end, freshly read), answering for each how its close
/// went: `Ok` when its rule is gone, or when what is left is listed for the sweep to finish.
pub fn close_due(env: &Env, batch: &mut [Versioned<AccessRequest>]) -> Vec<Result<(), ApiError>> {
    let mut results: Vec<Option<Result<(), ApiError>>> = batch.iter().map(|_| None).collect();
    if batch.is_empty() {
        return Vec::new();
    }
    prefetch(env, batch);
    let ids: Vec<String> = batch.iter().map(|grant| grant.value.id.to_string()).collect();
    // Listed first: from here on, a crash leaves every grant where the sweep finishes it.
    if let Err(error) = add_all(env.kv, keys::ARM_WORK, &ids) {
        let error = ApiError::from(error);
        return batch.iter().map(|_| Err(ApiError::internal(&error.message))).collect();
    }

    // To `revoking`, each recorded ahead of its save.
    let mut revoking = Vec::new();
    for (index, grant) in batch.iter_mut().enumerate() {
        match grants::transition(grant, Event::Due) {
            Ok(()) => revoking.push(index),
            Err(error) => results[index] = Some(Err(error)),
        }
    }
    let expiring = revoking.iter().map(|&index| {
        let grant = &batch[index].value;
        let details = json!({"reason": null, "state": grant.state.name()});
        ("request.expiring", subject_of(grant), Outcome::Ok, details)
    });
    if let Err(error) = env.record_all(expiring.collect::<Vec<_>>()) {
        for index in revoking {
            results[index] = Some(Err(ApiError::internal(&error.message)));
        }
        return finish(env, batch, results);
    }
    revoking.retain(|&index| save_or_hand_over(env, &mut batch[index], "request.expiring", &mut results[index]));

    // The rules, deleted (leases judged at the time each DELETE is sent, as one by one).
    let mut gone = Vec::new();
    for index in revoking {
        let grant = &mut batch[index];
        let sent_at = env.fresh_now();
        // Its rules, one per NSG, each sent whatever became of the others: confirmed DELETEs
        // are facts from now on, and go into the trail with the next append (the one after
        // this loop), or a later one should that fail; failures are recorded now.
        let outcome = match grants::delete_rules(env, &grant.value, None) {
            Ok(outcome) => outcome,
            Err(unrecorded) => {
                results[index] = Some(Err(unrecorded));
                continue;
            }
        };
        results[index] = Some(match outcome {
            Ok(()) if !grant.value.put_in_flight(sent_at) => {
                gone.push(index);
                continue;
            }
            // A PUT may still land: the one-grant close keeps it `revoking` until it cannot.
            Ok(()) => hand_over(env, grant),
            Err(error) => keep_closing(env, grant, &error),
        });
    }

    // Closed: recorded (after the DELETEs' events), saved, unlisted.
    let mut events = Vec::new();
    for &index in &gone {
        let grant = &mut batch[index];
        if let Err(error) = grants::transition(grant, Event::RuleClosed) {
            results[index] = Some(Err(error));
            continue;
        }
        grant.value.closed_at = Some(env.now);
        grant.value.arm_attempts = 0;
        grant.value.put_leases.clear();
        grant.value.last_error = None;
        let details = json!({"state": grant.value.state.name()});
        events.push(("request.expired", subject_of(&grant.value), Outcome::Ok, details));
    }
    let mut closed: Vec<usize> = gone.into_iter().filter(|&i| results[i].is_none()).collect();
    if let Err(error) = env.record_all(events) {
        for index in closed {
            results[index] = Some(Err(ApiError::internal(&error.message)));
        }
        return finish(env, batch, results);
    }
    closed.retain(|&index| save_or_hand_over(env, &mut batch[index], "request.expired", &mut results[index]));
    let unlisted = forget_all(env, closed.iter().map(|&index| &batch[index].value));
    for index in closed {
        results[index] = Some(unlisted.as_ref().map(drop).map_err(|e| ApiError::internal(&e.message)));
    }
    finish(env, batch, results)
}

/// Every grant the batch did not settle goes through the one-grant close.
fn finish(
    env: &Env,
    batch: &mut [Versioned<AccessRequest>],
    results: Vec<Option<Result<(), ApiError>>>,
) -> Vec<Result<(), ApiError>> {
    results
        .into_iter()
        .zip(batch.iter_mut())
        .map(|(result, grant)| result.unwrap_or_else(|| hand_over(env, grant)))
        .collect()
}

/// Saves a grant the batch changed (its event already recorded); answers whether it did. A
/// save that fails is recorded as failed, like any audited change, and the grant is handed
/// over to the one-grant close.
fn save_or_hand_over(
    env: &Env,
    grant: &mut Versioned<AccessRequest>,
    action: &'static str,
    result: &mut Option<Result<(), ApiError>>,
) -> bool {
    let Err(error) = env.save_request(grant) else { return true };
    env.record_failure(action, subject_of(&grant.value), &error);
    *result = Some(hand_over(env, grant));
    false
}

/// Closes one grant the way a close on its own does, from the state it is in now.
fn hand_over(env: &Env, grant: &mut Versioned<AccessRequest>) -> Result<(), ApiError> {
    *grant = env.request(grant.value.id.as_str())?;
    grants::close(env, grant, Event::Due, None)
}

/// Reads in one round trip the index documents the closes change.
fn prefetch(env: &Env, batch: &[Versioned<AccessRequest>]) {
    let mut keys: Vec<String> =
        [keys::ARM_WORK, keys::AUDIT_HEAD, keys::ARM_TOKEN, keys::WEBHOOKS].into_iter().map(str::to_owned).collect();
    for grant in batch {
        let grant = &grant.value;
        for key in
            [keys::open_of(&grant.policy, &grant.requester), keys::live(&grant.policy), keys::pending(&grant.policy)]
        {
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    let _ = env.kv.get_many(&keys);
}

/// Drops ended grants from their open, live and pending lists: one write per list.
fn forget_all<'a>(env: &Env, ended: impl Iterator<Item = &'a AccessRequest>) -> Result<(), ApiError> {
    let mut lists: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut unlisted = Vec::new();
    for grant in ended {
        let id = grant.id.to_string();
        for key in
            [keys::open_of(&grant.policy, &grant.requester), keys::live(&grant.policy), keys::pending(&grant.policy)]
        {
            lists.entry(key).or_default().push(id.clone());
        }
        unlisted.push(id);
    }
    for (key, ids) in &lists {
        remove_all(env.kv, key, ids)?;
    }
    Ok(remove_all(env.kv, keys::ARM_WORK, &unlisted)?)
}

/// Adds ids to an index list in one write (see [`store::add_to_list`]: a cached copy that
/// seems to hold them all is read again before that is believed).
fn add_all(kv: &dyn KvStore, key: &str, ids: &[String]) -> Result<(), store::StoreError> {
    let add = |list: Option<Vec<String>>| {
        let mut list = list.unwrap_or_default();
        let before = list.len();
        for id in ids {
            if !list.contains(id) {
                list.push(id.clone());
            }
        }
        (list.len() != before).then_some(list)
    };
    if store::update::<Vec<String>, _>(kv, key, add)?.is_none() {
        kv.forget(key);
        store::update::<Vec<String>, _>(kv, key, add)?;
    }
    Ok(())
}

/// Removes ids from an index list in one write (an emptied list stays, as one by one).
fn remove_all(kv: &dyn KvStore, key: &str, ids: &[String]) -> Result<(), store::StoreError> {
    store::update::<Vec<String>, _>(kv, key, |list| {
        let mut list = list?;
        let before = list.len();
        list.retain(|x| !ids.contains(x));
        (list.len() != before).then_some(list)
    })
    .map(drop)
}

/// A grant whose DELETE failed stays `revoking`, listed again (a sweep that read it before it
/// was saved `revoking` may have dropped it from the list): deleted again next tick.
fn keep_closing(env: &Env, grant: &mut Versioned<AccessRequest>, error: &ArmError) -> Result<(), ApiError> {
    grants::record_attempt(grant, error);
    store::add_to_list(env.kv, keys::ARM_WORK, grant.value.id.as_str(), usize::MAX)?;
    match env.save_request(grant) {
        Err(lost) if lost.is_concurrent_update() => hand_over(env, grant),
        other => other,
    }
}
