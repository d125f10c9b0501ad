//! Delivery: each subscription's cursor walks the audit trail, the events it wants and that
//! took effect are queued, and the queue is sent in order, at least once, with backoff.
//!
//! A subscription is sent to by one deliverer at a time (a short lease in its state), from
//! the sweep and after a handler has answered. Its queue is sent oldest first and stops at
//! the first failure, so a receiver that was down gets every event, in order, when it
//! returns; the retries follow Standard Webhooks' schedule as far as a once-a-minute sweep
//! allows, and a delivery still failing three days after it was queued is dead.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::events::{self, kind_of, took_effect};
use super::{Format, Subscription, slack};
use crate::api::ApiError;
use crate::audit::log::{self, Slot};
use crate::audit::{AuditEvent, Outcome, Subject};
use crate::domain::policy::ChatDecisions;
use crate::domain::{AccessRequest, Policy, PolicyName, RequestId, State, WebhookName};
use crate::http::{HttpClient, HttpRequest, Method};
use crate::keys;
use crate::service::Env;
use crate::service::links::LinkDecision;
use crate::store::{self, StoreError};

/// Delays after consecutive failures (minutes): close to Standard Webhooks' schedule.
const BACKOFF_MINUTES: [i64; 7] = [1, 5, 30, 120, 300, 600, 600];
/// A delivery still failing this long after it was queued is dead.
pub const GIVE_UP_AFTER: TimeDelta = TimeDelta::days(3);
/// An event its request still does not show this long after a deliverer first looked never took effect.
const SETTLE: TimeDelta = TimeDelta::minutes(2);
/// Audit events read per subscription and pass.
const READ_PER_PASS: u64 = 500;
/// Deliveries waiting per subscription; past it the cursor waits (the trail keeps them).
const QUEUE_CAP: usize = 1000;
/// Delivered deliveries kept for `GET .../deliveries`.
const RECENT_CAP: usize = 100;
/// Dead deliveries kept to be retried (a queue's worth).
const DEAD_CAP: usize = QUEUE_CAP;
/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a deliverer holds a subscription.
const LEASE: TimeDelta = TimeDelta::seconds(60);

/// Where a subscription's deliveries stand.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeliveryState {
    /// The last audit event looked at.
    pub cursor: u64,
    /// Audit numbers of the deliveries waiting, oldest first.
    #[serde(default)]
    pub queue: Vec<u64>,
    /// Consecutive failed attempts.
    #[serde(default)]
    pub failures: u32,
    /// No attempt before this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Delivered ones, newest last.
    #[serde(default)]
    pub recent: Vec<u64>,
    /// Dead ones, newest last, kept apart so that an outage's worth can still be retried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dead: Vec<u64>,
    /// Why deliveries stopped (a 410 from the receiver), until an admin retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<String>,
    /// The audit event the cursor waits at (its change not visible yet), since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<(u64, DateTime<Utc>)>,
    /// A deliverer at work until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<DateTime<Utc>>,
}

/// How a delivery ended, so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryOutcome {
    /// Waiting to be sent (again).
    Pending,
    /// A 2xx came back.
    Delivered,
    /// Given up.
    Dead,
}

/// One attempt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attempt {
    /// When it was made.
    pub at: DateTime<Utc>,
    /// The receiver's status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why it failed without an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One event to one subscription.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Delivery {
    /// `webhook-id`: the same on every attempt.
    pub id: String,
    /// The audit event it announces.
    pub seq: u64,
    /// Its event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request it is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// When the event happened.
    pub at: DateTime<Utc>,
    /// What the event says; rendered in the subscription's format at each attempt.
    pub data: serde_json::Value,
    /// When it was queued (or queued again by an admin).
    pub queued_at: DateTime<Utc>,
    /// Attempts so far, the last 20.
    pub attempts: Vec<Attempt>,
    /// Where it stands.
    pub outcome: DeliveryOutcome,
}

impl Delivery {
    /// What is sent (and signed), in `format`.
    pub fn body(&self, format: Format, source: &str) -> String {
        events::body(format, &self.kind, &self.id, self.at, self.data.clone(), source)
    }
}

/// What one pass did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeliveryReport {
    /// Deliveries queued.
    pub queued: usize,
    /// Deliveries sent and acknowledged.
    pub delivered: usize,
    /// Attempts that failed.
    pub failed: usize,
    /// Deliveries given up.
    pub dead: usize,
}

/// Delivers to every subscription, for at most `budget` of wall time.
pub fn run(env: &Env, http: &dyn HttpClient, budget: Duration) -> DeliveryReport {
    let started = Instant::now();
    let mut report = DeliveryReport::default();
    let names = match store::read_list(env.kv, keys::WEBHOOKS) {
        Ok(names) => names,
        Err(error) => {
            eprintln!("webhooks: reading the subscriptions: {error}");
            return report;
        }
    };
    // Each pass starts at another subscription: a slow one cannot keep the others waiting.
    let start = usize::try_from(env.now.timestamp() / 60).unwrap_or_default() % names.len().max(1);
    for name in names.iter().cycle().skip(start).take(names.len()) {
        if started.elapsed() >= budget {
            break;
        }
        let Ok(name) = WebhookName::parse(name) else { continue };
        if let Err(error) = deliver_to(env, http, &name, started + budget, &mut report) {
            eprintln!("webhooks: {name}: {}", error.internal.as_deref().unwrap_or(&error.message));
        }
    }
    report
}

/// One subscription's pass: take the lease, queue what is new, send what is due.
fn deliver_to(
    env: &Env,
    http: &dyn HttpClient,
    name: &WebhookName,
    deadline: Instant,
    report: &mut DeliveryReport,
) -> Result<(), ApiError> {
    let Some(subscription) = store::load::<Subscription>(env.kv, &keys::webhook(name))?.map(|v| v.value) else {
        return Ok(());
    };
    let Some(mut state) = store::load::<DeliveryState>(env.kv, &keys::webhook_state(name))? else { return Ok(()) };
    if state.value.lease_until.is_some_and(|until| until > env.now) {
        return Ok(());
    }
    state.value.lease_until = Some(env.now + LEASE);
    match store::save(env.kv, &keys::webhook_state(name), &state.value, Some(state.version)) {
        Ok(version) => state.version = version,
        // Another deliverer took it first.
        Err(StoreError::Conflict { .. }) => return Ok(()),
        Err(other) => return Err(other.into()),
    }
    let state = &mut state;
    // Whatever fails below, the lease is given back and what was done is kept.
    match enqueue(env, &subscription, &mut state.value) {
        Ok(queued) => report.queued += queued,
        Err(error) => eprintln!("webhooks: {name}: queueing: {}", error.internal.as_deref().unwrap_or(&error.message)),
    }
    let before = (report.delivered, state.value.queue.first().copied());
    let sent = send_due(env, http, &subscription, &mut state.value, deadline, report);
    state.value.lease_until = None;
    if let Err(error) = store::save(env.kv, &keys::webhook_state(name), &state.value, Some(state.version)) {
        // Deleted while this pass ran: what it queued meanwhile goes with it.
        if store::load::<Subscription>(env.kv, &keys::webhook(name))?.is_none() {
            let state = &state.value;
            for seq in state.queue.iter().chain(&state.recent).chain(&state.dead) {
                env.kv.delete(&keys::webhook_delivery(name, *seq))?;
            }
            return Ok(());
        }
        return Err(error.into());
    }
    sent?;
    let delivered = report.delivered - before.0;
    if delivered > 0 {
        // One event a pass, not one a delivery: the receiver's own log has the rest.
        let details = json!({"webhook": name, "delivered": delivered, "from_seq": before.1});
        env.record("webhook.delivered", Subject::default(), Outcome::Ok, details)?;
    }
    Ok(())
}

/// Reads the trail past the cursor and queues the events the subscription wants that took
/// effect. Stops at an event whose change may still be on its way to the store.
fn enqueue(env: &Env, subscription: &Subscription, state: &mut DeliveryState) -> Result<usize, ApiError> {
    let batch = log::head_batch(env.kv)?;
    let Some(head) = batch.last() else { return Ok(0) };
    let mut requests: HashMap<String, Option<AccessRequest>> = HashMap::new();
    let mut policies: HashMap<String, Option<Policy>> = HashMap::new();
    let mut queued = 0;
    for seq in state.cursor + 1..=head.seq.min(state.cursor + READ_PER_PASS) {
        if state.queue.len() >= QUEUE_CAP {
            break;
        }
        let event = match log::read(env.kv, seq)? {
            Slot::Event(event) => *event,
            // The newest events live in the head until the next append files them.
            Slot::Missing if let Some(event) = log::in_batch(&batch, seq) => event.clone(),
            Slot::Missing | Slot::Unreadable(_) => {
                eprintln!("webhooks: audit event {seq} cannot be read; skipped");
                state.cursor = seq;
                continue;
            }
        };
        match announce(env, subscription, &event, &mut requests, &mut policies)? {
            Announce::Skip => {}
            // Not visible yet: its writer may still be saving. Waited for from when this
            // subscription first found it so (never from the event's own time: a writer may
            // have started long before it appended), then passed over.
            Announce::NotYet => match state.waiting_since {
                Some((waiting, since)) if waiting == seq && env.now - since >= SETTLE => {}
                Some((waiting, _)) if waiting == seq => break,
                _ => {
                    state.waiting_since = Some((seq, env.now));
                    break;
                }
            },
            Announce::Queue(delivery) => {
                store::save(env.kv, &keys::webhook_delivery(&subscription.name, seq), &delivery, None).or_else(
                    |e| match e {
                        // Queued before by a deliverer that lost its lease: the same delivery.
                        StoreError::Conflict { .. } => Ok(0),
                        other => Err(other),
                    },
                )?;
                state.queue.push(seq);
                queued += 1;
            }
        }
        state.cursor = seq;
    }
    Ok(queued)
}

enum Announce {
    Skip,
    NotYet,
    Queue(Delivery),
}

/// What to do with one audit event for one subscription.
fn announce(
    env: &Env,
    subscription: &Subscription,
    event: &AuditEvent,
    requests: &mut HashMap<String, Option<AccessRequest>>,
    policies: &mut HashMap<String, Option<Policy>>,
) -> Result<Announce, ApiError> {
    let Some(kind) = kind_of(&event.action).filter(|_| event.outcome == Outcome::Ok) else { return Ok(Announce::Skip) };
    if !subscription.wants(kind, event.subject.policy.as_deref()) {
        return Ok(Announce::Skip);
    }
    let request = match &event.subject.request {
        Some(id) => {
            if !requests.contains_key(id) {
                // A record this build cannot read is not announced (never a stalled subscription).
                let loaded = match RequestId::parse(id) {
                    Ok(parsed) => store::load::<AccessRequest>(env.kv, &keys::request(&parsed))
                        .unwrap_or_else(|error| {
                            eprintln!("webhooks: request {id} cannot be read: {error}");
                            None
                        })
                        .map(|v| v.value),
                    Err(_) => None,
                };
                requests.insert(id.clone(), loaded);
            }
            let request = requests[id].as_ref();
            if !request.is_some_and(|r| took_effect(kind, event, r)) {
                return Ok(Announce::NotYet);
            }
            request
        }
        None => None,
    };
    let policy = match &event.subject.policy {
        Some(policy) => {
            if !policies.contains_key(policy) {
                let loaded = match PolicyName::parse(policy) {
                    Ok(name) => store::load::<Policy>(env.kv, &keys::policy(&name)).ok().flatten().map(|p| p.value),
                    Err(_) => None,
                };
                policies.insert(policy.clone(), loaded);
            }
            policies[policy].as_ref()
        }
        None => None,
    };
    let settings = &env.config.webhooks;
    // The one VM the event is about: the request's, or a one-VM policy's.
    let vm = match (request.map(|r| r.vms.as_slice()), policy.map(|p| p.vms.as_slice())) {
        (Some([one]), _) => Some(one.to_string()),
        (Some([]) | None, Some([only])) => Some(only.vm.to_string()),
        _ => None,
    };
    let mut data = events::data(kind, event, request, vm.as_deref(), &settings.public_url);
    // Chat messages about a waiting request carry links to decide (never the formats for
    // machines: a link is a capability).
    if let (Some(secret), Some(request), Some(policy)) = (&settings.link_secret, request, policy)
        && kind == "request.created"
        && request.state == State::Pending
        && matches!(subscription.format, Format::Slack | Format::Teams)
        && policy.chat_decisions == ChatDecisions::Confirm
    {
        let expires = (env.now + settings.link_ttl).min(request.pending_until.unwrap_or(env.now + settings.link_ttl));
        let url = |decision| {
            let token = crate::service::links::token(secret.expose().as_bytes(), &request.id, decision, expires);
            format!("{}/decide/{token}", settings.public_url)
        };
        data["decide"] =
            json!({"approve": url(LinkDecision::Approve), "deny": url(LinkDecision::Deny), "until": expires});
    }
    // Through the Slack app, on a policy that lets a click decide: buttons that do.
    if let (Some(request), Some(policy)) = (request, policy)
        && subscription.channel.is_some()
        && settings.slack.interactive()
        && policy.chat_decisions == ChatDecisions::Direct
        && ((kind == "request.created" && request.state == State::Pending) || kind == "grant.expiring")
    {
        data.as_object_mut().expect("an object").remove("decide");
        data["buttons"] = json!(if kind == "grant.expiring" { vec!["extend"] } else { vec!["approve", "deny"] });
    }
    Ok(Announce::Queue(Delivery {
        id: events::webhook_id(event),
        seq: event.seq,
        kind: kind.to_owned(),
        request: event.subject.request.clone(),
        at: event.at,
        data,
        queued_at: env.now,
        attempts: Vec::new(),
        outcome: DeliveryOutcome::Pending,
    }))
}

/// Sends the queue oldest first, until it is empty, an attempt fails, or time is up.
fn send_due(
    env: &Env,
    http: &dyn HttpClient,
    subscription: &Subscription,
    state: &mut DeliveryState,
    deadline: Instant,
    report: &mut DeliveryReport,
) -> Result<(), ApiError> {
    if state.disabled.is_some() || state.next_attempt_at.is_some_and(|at| at > env.now) {
        return Ok(());
    }
    let name = &subscription.name;
    while let Some(&seq) = state.queue.first() {
        if Instant::now() >= deadline {
            break;
        }
        let key = keys::webhook_delivery(name, seq);
        let Some(mut delivery) = store::load::<Delivery>(env.kv, &key)? else {
            state.queue.remove(0);
            continue;
        };
        let now = env.clock.now();
        let attempted = match &subscription.channel {
            Some(channel) => slack_attempt(env, http, subscription, channel, &delivery.value),
            None => Attempted::from(http.send(signed_request(
                subscription,
                &delivery.value,
                now,
                &env.config.webhooks.public_url,
            ))),
        };
        let Attempted { ok, status, error, retry_after } = attempted;
        let attempts = &mut delivery.value.attempts;
        attempts.push(Attempt { at: now, status, error });
        if attempts.len() > 20 {
            attempts.remove(0);
        }
        let details = |outcome: &str| json!({"webhook": name, "delivery": delivery.value.id, "seq": seq, "status": status, "attempts": delivery.value.attempts.len(), "outcome": outcome});
        match status {
            Some(200..=299) if ok => {
                delivery.value.outcome = DeliveryOutcome::Delivered;
                state.failures = 0;
                state.next_attempt_at = None;
                report.delivered += 1;
            }
            Some(410) => {
                // The receiver asks to be left alone: stop until an admin retries.
                state.disabled = Some("the receiver answered 410 Gone".into());
                store::save(env.kv, &key, &delivery.value, Some(delivery.version))?;
                env.record("webhook.disabled", Subject::default(), Outcome::Failed, details("disabled"))?;
                report.failed += 1;
                break;
            }
            _ if now - delivery.value.queued_at >= GIVE_UP_AFTER => {
                delivery.value.outcome = DeliveryOutcome::Dead;
                state.failures = 0;
                env.record("webhook.dead", Subject::default(), Outcome::Failed, details("dead"))?;
                report.dead += 1;
            }
            _ => {
                state.failures += 1;
                let step = BACKOFF_MINUTES[(state.failures as usize - 1).min(BACKOFF_MINUTES.len() - 1)];
                let wait = TimeDelta::minutes(step).max(TimeDelta::seconds(retry_after.unwrap_or(0).clamp(0, 86_400)));
                state.next_attempt_at = Some(env.now + wait);
                store::save(env.kv, &key, &delivery.value, Some(delivery.version))?;
                env.record("webhook.failed", Subject::default(), Outcome::Failed, details("retrying"))?;
                report.failed += 1;
                break;
            }
        }
        store::save(env.kv, &key, &delivery.value, Some(delivery.version))?;
        state.queue.remove(0);
        finish(env, name, state, seq, delivery.value.outcome == DeliveryOutcome::Dead)?;
    }
    Ok(())
}

/// How an attempt went.
struct Attempted {
    /// Whether it counts as delivered (a 2xx, and for Slack's Web API `"ok": true`).
    ok: bool,
    status: Option<u16>,
    error: Option<String>,
    /// The receiver's `Retry-After`, in seconds.
    retry_after: Option<i64>,
}

impl From<Result<crate::http::HttpResponse, crate::http::HttpError>> for Attempted {
    fn from(answer: Result<crate::http::HttpResponse, crate::http::HttpError>) -> Self {
        match answer {
            Ok(response) => Self {
                ok: (200..300).contains(&response.status),
                status: Some(response.status),
                error: None,
                retry_after: response.header("retry-after").and_then(|s| s.parse().ok()),
            },
            Err(error) => Self {
                ok: false,
                status: None,
                error: Some(error.to_string().chars().take(200).collect()),
                retry_after: None,
            },
        }
    }
}

/// One delivery through the Slack app: a new message for a new request (or a notice), and
/// an update of that message for every later change, so the channel shows the outcome.
fn slack_attempt(
    env: &Env,
    http: &dyn HttpClient,
    subscription: &Subscription,
    channel: &str,
    delivery: &Delivery,
) -> Attempted {
    let slack = &env.config.webhooks.slack;
    let posted_key = delivery.request.as_deref().map(|r| keys::slack_message(&subscription.name, r));
    let posted =
        posted_key.as_deref().and_then(|k| store::load::<slack::Posted>(env.kv, k).ok().flatten()).map(|p| p.value);
    let body = delivery.body(subscription.format, &env.config.webhooks.public_url);
    let mut message: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let notice = matches!(
        delivery.kind.as_str(),
        "request.created" | "request.reminder" | "grant.expiring" | "break_glass.used"
    );
    let method = match (&posted, notice) {
        (Some(posted), false) => {
            message["channel"] = json!(posted.channel);
            message["ts"] = json!(posted.ts);
            "chat.update"
        }
        _ => {
            message["channel"] = json!(channel);
            "chat.postMessage"
        }
    };
    let Some(call) = slack.call(method, &message) else {
        return Attempted {
            ok: false,
            status: None,
            error: Some("no slack_bot_token is configured".into()),
            retry_after: None,
        };
    };
    let response = match http.send(call) {
        Ok(response) => response,
        Err(error) => return Attempted::from(Err(error)),
    };
    let retry_after = response.header("retry-after").and_then(|s| s.parse().ok());
    match slack::judge(&response) {
        Ok(answer) => {
            if let (Some(key), "request.created", Some(channel), Some(ts)) =
                (&posted_key, delivery.kind.as_str(), answer["channel"].as_str(), answer["ts"].as_str())
            {
                let posted = slack::Posted { channel: channel.to_owned(), ts: ts.to_owned() };
                if let Err(error) = store::save(env.kv, key, &posted, None) {
                    eprintln!("webhooks: {}: keeping the Slack message of a request: {error}", subscription.name);
                }
            }
            if let Some(key) = &posted_key
                && posted.is_some()
                && is_final(&delivery.kind)
            {
                let _ = env.kv.delete(key);
            }
            Attempted { ok: true, status: Some(response.status), error: None, retry_after: None }
        }
        Err(reason) => Attempted { ok: false, status: Some(response.status), error: Some(reason), retry_after },
    }
}

/// Whether an event ends its request (its Slack message will not change again).
fn is_final(kind: &str) -> bool {
    matches!(
        kind,
        "request.denied"
            | "request.cancelled"
            | "request.timed_out"
            | "grant.expired"
            | "grant.revoked"
            | "grant.failed"
    )
}

/// Moves a finished delivery to the delivered or the dead list, forgetting the oldest.
fn finish(env: &Env, name: &WebhookName, state: &mut DeliveryState, seq: u64, dead: bool) -> Result<(), StoreError> {
    state.recent.retain(|s| *s != seq);
    state.dead.retain(|s| *s != seq);
    let (list, cap) = if dead { (&mut state.dead, DEAD_CAP) } else { (&mut state.recent, RECENT_CAP) };
    list.push(seq);
    let mut forgotten = Vec::new();
    while list.len() > cap {
        forgotten.push(list.remove(0));
    }
    for old in forgotten {
        if !state.queue.contains(&old) {
            env.kv.delete(&keys::webhook_delivery(name, old))?;
        }
    }
    Ok(())
}

/// The HTTP request of one attempt: signed with every current secret (both during a
/// rotation's overlap) over `<id>.<timestamp>.<body>`.
fn signed_request(subscription: &Subscription, delivery: &Delivery, now: DateTime<Utc>, source: &str) -> HttpRequest {
    let timestamp = now.timestamp();
    let body = delivery.body(subscription.format, source);
    let signature = subscription
        .signing_secrets(now)
        .iter()
        .map(|secret| secret.sign(&delivery.id, timestamp, body.as_bytes()))
        .collect::<Vec<_>>()
        .join(" ");
    let content_type =
        if subscription.format == Format::Cloudevents { "application/cloudevents+json" } else { "application/json" };
    HttpRequest {
        method: Method::Post,
        url: subscription.url.clone(),
        headers: vec![
            ("content-type".into(), content_type.into()),
            ("user-agent".into(), "portcullis-webhooks/1".into()),
            ("webhook-id".into(), delivery.id.clone()),
            ("webhook-timestamp".into(), timestamp.to_string()),
            ("webhook-signature".into(), signature),
        ],
        body: body.into_bytes(),
        timeout: ATTEMPT_TIMEOUT,
    }
}
