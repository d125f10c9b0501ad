//! Webhook subscriptions (admin only): `PUT/GET/DELETE /api/webhooks/{name}`,
//! `GET /api/webhooks`, `POST /api/webhooks/{name}/rotate-secret`, and the deliveries:
//! `GET /api/webhooks/{name}/deliveries`, `POST /api/webhooks/{name}/deliveries/{id}/retry`.
//! A signing secret is shown once, when it is made, and never again.

use chrono::TimeDelta;
use serde_json::json;

use super::Env;
use crate::api::{ApiError, Reply, parse_json};
use crate::audit::{Outcome, Subject};
use crate::auth::{Caller, Role};
use crate::domain::WebhookName;
use crate::keys;
use crate::store::{self, StoreError, Versioned};
use crate::webhooks::deliver::{Delivery, DeliveryOutcome, DeliveryState};
use crate::webhooks::sign::SigningSecret;
use crate::webhooks::{RawSubscription, StoredSecret, Subscription};

/// How long a rotated-out secret keeps signing beside the new one.
const ROTATION_OVERLAP: TimeDelta = TimeDelta::hours(24);

fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    if caller.has(Role::Admin) {
        Ok(())
    } else {
        Err(ApiError::forbidden("admin_required", "only admins manage webhooks"))
    }
}

fn parse_name(name: &str) -> Result<WebhookName, ApiError> {
    WebhookName::parse(name).map_err(|e| ApiError::bad_request("invalid_webhook_name", e.to_string()))
}

fn load(env: &Env, name: &WebhookName) -> Result<Versioned<Subscription>, ApiError> {
    store::load::<Subscription>(env.kv, &keys::webhook(name))?
        .ok_or_else(|| ApiError::not_found("webhook_not_found", format!("no webhook '{name}'")))
}

fn secret_from(bytes: Vec<u8>) -> Result<SigningSecret, ApiError> {
    SigningSecret::from_bytes(bytes).ok_or_else(|| ApiError::internal("a signing secret needs 24 to 64 random bytes"))
}

/// `scheme://host[:port]` of a URL, never its path or query (which can hold a credential).
fn origin_of(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    format!("{scheme}://{authority}")
}

/// What a webhook event names: the subscription, beside `details`.
fn about(name: &WebhookName, mut details: serde_json::Value) -> serde_json::Value {
    details["webhook"] = json!(name);
    details
}

/// Creates or replaces a subscription. A new one gets a signing secret (from `random`
/// bytes), shown in this answer only, and starts at the trail's current head: it receives
/// what happens from now on.
pub fn put(env: &Env, caller: &Caller, name: &str, body: &[u8], random: Vec<u8>) -> Result<Reply, ApiError> {
    require_admin(caller)?;
    let name = parse_name(name)?;
    let raw: RawSubscription = parse_json(body, false)?;
    let existing = store::load::<Subscription>(env.kv, &keys::webhook(&name))?;
    let fresh = existing.is_none().then(|| secret_from(random)).transpose()?;
    let mut subscription = raw
        .check(name.clone(), &env.config.webhooks, env.now, fresh.clone())
        .map_err(|refused| ApiError::unprocessable(refused.code, refused.message))?;
    // Only where the URL points: Slack's and Teams' webhook URLs are credentials.
    let details = json!({"host": origin_of(&subscription.url), "events": subscription.events, "policies": subscription.policies, "format": subscription.format});
    match existing {
        Some(existing) => {
            subscription.secrets = existing.value.secrets.clone();
            subscription.created_at = existing.value.created_at;
            env.audited("webhook.updated", Subject::default(), about(&name, details.clone()), || {
                Ok(store::save(env.kv, &keys::webhook(&name), &subscription, Some(existing.version))?)
            })?;
            Ok(Reply::ok(subscription.view(env.now)))
        }
        None => {
            let head = crate::audit::log::head(env.kv)?.map_or(0, |event| event.seq);
            store::create_list(env.kv, keys::WEBHOOKS)?;
            // The state first: a subscription is never without its cursor.
            let state = DeliveryState { cursor: head, ..DeliveryState::default() };
            match store::save(env.kv, &keys::webhook_state(&name), &state, None) {
                Ok(_) | Err(StoreError::Conflict { .. }) => {}
                Err(other) => return Err(other.into()),
            }
            env.audited("webhook.created", Subject::default(), about(&name, details), || {
                Ok(store::save(env.kv, &keys::webhook(&name), &subscription, None)?)
            })?;
            store::add_to_list(env.kv, keys::WEBHOOKS, name.as_str(), usize::MAX)?;
            let mut view = subscription.view(env.now);
            view["secret"] = json!(fresh.expect("a new subscription has a secret").reveal());
            Ok(Reply::created(view))
        }
    }
}

/// One subscription, without its secrets.
pub fn get(env: &Env, caller: &Caller, name: &str) -> Result<Reply, ApiError> {
    require_admin(caller)?;
    let subscription = load(env, &parse_name(name)?)?;
    Ok(Reply::ok(subscription.value.view(env.now)))
}

/// Every subscription, without secrets.
pub fn list(env: &Env, caller: &Caller) -> Result<Reply, ApiError> {
    require_admin(caller)?;
    let mut views = Vec::new();
    for name in store::read_list(env.kv, keys::WEBHOOKS)? {
        let Ok(name) = WebhookName::parse(&name) else { continue };
        if let Some(subscription) = store::load::<Subscription>(env.kv, &keys::webhook(&name))? {
            views.push(subscription.value.view(env.now));
        }
    }
    Ok(Reply::ok(json!({ "webhooks": views })))
}

/// Removes a subscription and its deliveries.
pub fn delete(env: &Env, caller: &Caller, name: &str) -> Result<Reply, ApiError> {
    require_admin(caller)?;
    let name = parse_name(name)?;
    load(env, &name)?;
    env.record("webhook.deleted", Subject::default(), Outcome::Ok, about(&name, json!({})))?;
    store::remove_from_list(env.kv, keys::WEBHOOKS, name.as_str())?;
    // The subscription first: a deliverer still at work then finds it gone when it saves, and
    // deletes what it queued meanwhile.
    env.kv.delete(&keys::webhook(&name))?;
    if let Some(state) = store::load::<DeliveryState>(env.kv, &keys::webhook_state(&name))? {
        for seq in state.value.queue.iter().chain(&state.value.recent).chain(&state.value.dead) {
            env.kv.delete(&keys::webhook_delivery(&name, *seq))?;
        }
    }
    env.kv.delete(&keys::webhook_state(&name))?;
    Ok(Reply::ok(json!({ "deleted": name })))
}

/// A new signing secret, shown once; the previous one keeps signing beside it for 24 hours.
pub fn rotate_secret(env: &Env, caller: &Caller, name: &str, random: Vec<u8>) -> Result<Reply, ApiError> {
    require_admin(caller)?;
    let name = parse_name(name)?;
    let mut subscription = load(env, &name)?;
    let fresh = secret_from(random)?;
    let until = env.now + ROTATION_OVERLAP;
    let secrets = &mut subscription.value.secrets;
    secrets.retain(|s| s.until.is_none_or(|at| at > env.now));
    for old in secrets.iter_mut() {
        old.until = Some(old.until.map_or(until, |at| at.min(until)));
    }
    secrets.push(StoredSecret { secret: fresh.reveal(), until: None });
    env.audited(
        "webhook.secret_rotated",
        Subject::default(),
        about(&name, json!({"previous_valid_until": until})),
        || Ok(store::save(env.kv, &keys::webhook(&name), &subscription.value, Some(subscription.version))?),
    )?;
    Ok(Reply::ok(json!({"name": name, "secret": fresh.reveal(), "previous_secret_valid_until": until})))
}

/// The deliveries waiting, the dead ones (up to a thousand) and the last hundred delivered,
/// with their attempts (bodies left out).
pub fn deliveries(env: &Env, caller: &Caller, name: &str) -> Result<Reply, ApiError> {
    require_admin(caller)?;
    let name = parse_name(name)?;
    load(env, &name)?;
    let state = store::load::<DeliveryState>(env.kv, &keys::webhook_state(&name))?.map(|v| v.value).unwrap_or_default();
    let mut listed = Vec::new();
    for seq in state.queue.iter().chain(state.dead.iter().rev()).chain(state.recent.iter().rev()) {
        if let Some(delivery) = store::load::<Delivery>(env.kv, &keys::webhook_delivery(&name, *seq))? {
            let d = delivery.value;
            listed.push(json!({"id": d.id, "seq": d.seq, "type": d.kind, "outcome": d.outcome, "queued_at": d.queued_at, "attempts": d.attempts}));
        }
    }
    Ok(Reply::ok(json!({
        "webhook": name, "waiting": state.queue.len(), "consecutive_failures": state.failures,
        "next_attempt_at": state.next_attempt_at, "disabled": state.disabled, "deliveries": listed,
    })))
}

/// Queues a finished (dead or delivered) delivery again, and lifts any backoff or 410 stop:
/// the next pass sends it.
pub fn retry(env: &Env, caller: &Caller, name: &str, id: &str) -> Result<Reply, ApiError> {
    require_admin(caller)?;
    let name = parse_name(name)?;
    load(env, &name)?;
    let not_found = || {
        ApiError::not_found(
            "delivery_not_found",
            format!("no delivery '{}' of webhook '{name}'", id.chars().take(80).collect::<String>()),
        )
    };
    let mut state = store::load::<DeliveryState>(env.kv, &keys::webhook_state(&name))?.ok_or_else(not_found)?;
    let mut found = None;
    for seq in state.value.queue.iter().chain(&state.value.dead).chain(&state.value.recent) {
        if let Some(delivery) = store::load::<Delivery>(env.kv, &keys::webhook_delivery(&name, *seq))?
            && delivery.value.id == id
        {
            found = Some(delivery);
            break;
        }
    }
    let mut delivery = found.ok_or_else(not_found)?;
    let seq = delivery.value.seq;
    env.record(
        "webhook.retried",
        Subject::default(),
        Outcome::Ok,
        about(&name, json!({"delivery": delivery.value.id, "seq": seq})),
    )?;
    delivery.value.outcome = DeliveryOutcome::Pending;
    delivery.value.queued_at = env.now;
    store::save(env.kv, &keys::webhook_delivery(&name, seq), &delivery.value, Some(delivery.version))?;
    let queue = &mut state.value.queue;
    if !queue.contains(&seq) {
        let at = queue.partition_point(|s| *s < seq);
        queue.insert(at, seq);
    }
    state.value.recent.retain(|s| *s != seq);
    state.value.dead.retain(|s| *s != seq);
    state.value.failures = 0;
    state.value.next_attempt_at = None;
    state.value.disabled = None;
    store::save(env.kv, &keys::webhook_state(&name), &state.value, Some(state.version))?;
    Ok(Reply { status: 202, body: json!({"queued": delivery.value.id}) })
}
