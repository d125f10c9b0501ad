//! Spin adapters for the ports, and the request/response plumbing the three components share.

mod decide;
mod export;
mod http;
mod redis;
mod store;

use std::net::IpAddr;
use std::time::Duration;

pub use decide::{serve_decision_link, serve_signed_in};
pub use export::{answer, stream_export};
pub use http::SpinHttp;
pub use redis::RedisStore;
use serde_json::json;
use spin_sdk::http::{Method, Request, Response};
pub use store::SpinStore;

use crate::api::{ApiError, Reply};
use crate::arm::ArmClient;
use crate::audit::{Outcome, Subject};
use crate::auth::{self, Caller};
use crate::config::{Config, StoreChoice, Variables};
use crate::domain::RequestId;
use crate::http::{Clock, SystemClock};
use crate::service::throttle::Throttle;
use crate::service::{Env, Origin};
use crate::store::{Cached, KvStore};

/// How long the sweep may spend on webhook deliveries.
const SWEEP_DELIVERY_BUDGET: Duration = Duration::from_secs(20);
/// How long a handler may spend on them after it has answered.
const AFTER_ANSWER_DELIVERY_BUDGET: Duration = Duration::from_secs(5);

/// How long one invocation may spend waiting on ARM (backoff and polling) before it leaves
/// the rest to the sweep.
const ARM_WAIT_BUDGET: Duration = Duration::from_secs(15);

/// The component's Spin variables.
pub struct SpinVariables;

impl Variables for SpinVariables {
    fn get(&self, name: &str) -> Option<String> {
        spin_sdk::variables::get(name).ok()
    }
}

/// Everything one invocation works with, built from Spin's variables and store.
pub struct Ctx {
    kv: Cached<Box<dyn KvStore>>,
    http: SpinHttp,
    clock: SystemClock,
    /// Configuration, read once.
    pub config: Config,
}

impl Ctx {
    /// Reads configuration and opens the default store; failures are logged, not shown.
    pub fn load() -> Result<Self, ApiError> {
        let config = Config::load(&SpinVariables).map_err(|e| ApiError::internal(format!("configuration: {e:#}")))?;
        let store: Box<dyn KvStore> = match &config.store {
            StoreChoice::KeyValue => Box::new(SpinStore::open().map_err(ApiError::internal)?),
            StoreChoice::Redis { url } => Box::new(RedisStore::open(url.expose()).map_err(ApiError::internal)?),
        };
        let kv = Cached::new(store);
        Ok(Self { kv, http: SpinHttp, clock: SystemClock, config })
    }

    /// The caller behind the request's bearer credential: an OIDC token when an issuer is
    /// configured and the credential is a JWT, else an API key.
    pub fn authenticate(&self, request: &Request) -> Result<Caller, ApiError> {
        self.authenticate_header(request.header("authorization").and_then(|v| v.as_str()))
    }

    /// The caller behind an `Authorization` header value (see [`Ctx::authenticate`]).
    pub fn authenticate_header(&self, header: Option<&str>) -> Result<Caller, ApiError> {
        let bearer = header.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim);
        match (&self.config.oidc, bearer) {
            (Some(oidc), Some(token)) if auth::oidc::looks_like_jwt(token) => {
                let caller = auth::oidc::authenticate(token, oidc, &self.kv, &self.http, self.clock.now())?;
                self.refuse_api_key_principal(caller)
            }
            _ => Ok(self.config.api_keys.authenticate(header)?),
        }
    }

    /// A signed-in caller, unless it names an API key's principal: one name, one identity.
    pub fn refuse_api_key_principal(&self, caller: Caller) -> Result<Caller, ApiError> {
        if self.config.api_keys.has_principal(&caller.principal) {
            return Err(ApiError::unauthorized(format!(
                "the token names '{}', an API key's principal: OIDC and API-key principals must differ",
                caller.principal
            )));
        }
        Ok(caller)
    }

    /// The caller's IP address (see [`auth::client_ip`]).
    pub fn client_ip(&self, request: &Request) -> Option<IpAddr> {
        let peer = request.header("spin-client-addr").and_then(|v| v.as_str());
        let forwarded = request.header("x-forwarded-for").and_then(|v| v.as_str());
        auth::client_ip(peer, forwarded, &self.config.trusted_proxies)
    }

    /// The ARM client of this invocation.
    pub fn arm(&self) -> ArmClient<'_> {
        ArmClient::new(&self.http, &self.kv, &self.clock, &self.config.arm, ARM_WAIT_BUDGET)
    }

    /// The ports wired up, the time read once, and who the audit trail will name.
    pub fn env<'a>(&'a self, arm: &'a ArmClient<'a>, origin: Origin) -> Env<'a> {
        Env::new(&self.kv, arm, &self.config, self.clock.now(), &self.clock, origin)
    }

    /// Runs a sweep, with a second ARM client (time of its own) for the reconciler's share,
    /// then the webhook deliveries, with a time budget of their own: a receiver that hangs
    /// never holds up a close.
    pub fn sweep(&self) -> Result<crate::service::sweep::SweepReport, ApiError> {
        let (arm, reconciler_arm) = (self.arm(), self.arm());
        let report = crate::service::sweep::sweep_with(&self.env(&arm, Origin::system()), &reconciler_arm)?;
        self.deliver_webhooks(SWEEP_DELIVERY_BUDGET);
        Ok(report)
    }

    /// Sends what the webhook subscriptions are owed, for at most `budget`.
    pub fn deliver_webhooks(&self, budget: Duration) {
        let arm = self.arm();
        let report = crate::webhooks::deliver::run(&self.env(&arm, Origin::system()), &self.http, budget);
        if report.queued + report.delivered + report.failed + report.dead > 0 {
            eprintln!(
                "webhooks: {} queued, {} delivered, {} failed attempts, {} dead",
                report.queued, report.delivered, report.failed, report.dead
            );
        }
    }

    /// Runs an operation for `origin` (see [`Ctx::env`]).
    pub fn run<T>(&self, origin: Origin, operation: impl FnOnce(&Env) -> T) -> T {
        let arm = self.arm();
        operation(&self.env(&arm, origin))
    }

    /// The rate limits of this call.
    pub fn throttle(&self) -> Throttle<'_> {
        Throttle::new(&self.kv, self.clock.now(), self.config.rate_limits)
    }

    /// Authenticates an API call (see [`Ctx::guard_login`]).
    pub fn caller(&self, request: &Request) -> Result<(Caller, Origin), ApiError> {
        let caller = self.guard_login(request, || self.authenticate(request))?;
        let origin = Origin::of(&caller, self.client_ip(request));
        Ok((caller, origin))
    }

    /// Runs a credential check under the failed-login limits: an address over its limit is
    /// refused (429) before its credential is looked at; every failed login (401) is counted,
    /// and the 1st, 10th, 100th... of an address's minute is audited (as `anonymous`, with the
    /// reason but never the credential; see [`crate::service::throttle`]).
    pub fn guard_login<T>(
        &self,
        request: &Request,
        check: impl FnOnce() -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let anonymous = Origin::anonymous(self.client_ip(request));
        let throttle = self.throttle();
        if throttle.is_blocked(anonymous.source_ip) {
            let error = ApiError::rate_limited(
                format!("too many failed logins from this address; retry in {} s", throttle.retry_after()),
                throttle.retry_after(),
            );
            self.record_failed_login(&throttle, request, anonymous, &error);
            return Err(error);
        }
        check().inspect_err(|error| {
            if error.status == 401 {
                self.record_failed_login(&throttle, request, anonymous, error);
            }
        })
    }

    /// Counts a failed login that no limit held back (the sweep's secret is compared first,
    /// so that nobody sharing the scheduler's address can lock the sweep out).
    pub fn count_failed_login(&self, request: &Request, error: &ApiError) {
        let origin = Origin::anonymous(self.client_ip(request));
        self.record_failed_login(&self.throttle(), request, origin, error);
    }

    /// Counts a failed login and audits it when it is one to record.
    fn record_failed_login(&self, throttle: &Throttle, request: &Request, origin: Origin, error: &ApiError) {
        let Some(counted) = throttle.failed_login(origin.source_ip) else { return };
        if counted.record {
            let counts = json!({
                "failures_from_address_this_minute": counted.from_address,
                "failures_this_minute": counted.all,
                "throttled": error.status == 429,
            });
            self.record_refusal(request, origin, "auth.failed", error, counts);
        }
    }

    /// Counts a change against the caller's rate limits; over one, the change is refused (429)
    /// and the 1st, 10th, 100th... refusal of the minute is audited.
    pub fn check_rate(&self, request: &Request, caller: &Caller, origin: &Origin) -> Result<(), ApiError> {
        let Err(limited) = self.throttle().change(&caller.principal, origin.source_ip) else { return Ok(()) };
        let error = ApiError::rate_limited(
            format!("too many changes from this {} this minute; retry in {} s", limited.scope, limited.retry_after),
            limited.retry_after,
        );
        if limited.to_record() {
            let counts = json!({"limit": limited.scope, "over_limit_this_minute": limited.over});
            self.record_refusal(request, origin.clone(), "rate.limited", &error, counts);
        }
        Err(error)
    }

    /// Audits a refused call with `counts` beside what was asked; a failure to record goes to
    /// the log, and the caller gets the refusal either way. Every field the caller chose is
    /// cut to 200 characters.
    pub fn record_refusal(
        &self,
        request: &Request,
        origin: Origin,
        action: &'static str,
        error: &ApiError,
        counts: serde_json::Value,
    ) {
        let mut details = json!({
            // Any token is a method to HTTP: never more than a known one's length.
            "method": request.method().to_string().chars().take(16).collect::<String>(),
            "path": request.path().chars().take(200).collect::<String>(),
            "code": error.code,
            // The reason can quote what the caller sent (a token's `kid`): never all of it.
            "reason": error.message.chars().take(200).collect::<String>(),
        });
        if let (Some(details), serde_json::Value::Object(counts)) = (details.as_object_mut(), counts) {
            details.extend(counts);
        }
        let recorded = self.run(origin, |env| env.record(action, Subject::default(), Outcome::Refused, details));
        if let Err(failure) = recorded {
            eprintln!("could not audit {action}: {}", failure.internal.unwrap_or(failure.message));
        }
    }
}

/// Whether a call asks for a change (anything but reads).
fn is_change(request: &Request) -> bool {
    !matches!(request.method(), Method::Get | Method::Head | Method::Options)
}

/// Serves an authenticated API call: reads configuration, authenticates the caller, runs
/// `route` with the ports wired up, and renders the outcome. Every `/api` component is this
/// plus its route table. Refused attempts at changes (401, 403) are audited.
pub fn serve_api(request: &Request, route: impl FnOnce(&Ctx, &Env, &Caller) -> Result<Reply, ApiError>) -> Response {
    let outcome = Ctx::load().and_then(|ctx| {
        // Before anything reads it, and before authentication: a flood of large bodies costs
        // nothing more than the bytes.
        if request.body().len() > ctx.config.max_body_bytes {
            return Err(ApiError::too_large(format!("request bodies are at most {} bytes", ctx.config.max_body_bytes)));
        }
        let (caller, origin) = ctx.caller(request)?;
        if is_change(request) {
            ctx.check_rate(request, &caller, &origin)?;
        }
        let outcome = ctx.run(origin.clone(), |env| route(&ctx, env, &caller));
        if let Err(error) = &outcome
            && error.status == 403
            && is_change(request)
        {
            ctx.record_refusal(request, origin, "auth.forbidden", error, json!({}));
        }
        ANSWERED.with(|slot| *slot.borrow_mut() = Some(ctx));
        outcome
    });
    respond(outcome)
}

thread_local! {
    /// The context of the call just answered, for the work after the answer: its
    /// configuration is read, and what it read of the store is known (any decision there ends
    /// in a compare-and-swap, which sees the store as it is).
    static ANSWERED: std::cell::RefCell<Option<Ctx>> = const { std::cell::RefCell::new(None) };
}

/// Serves a decision from an integration (`POST /webhooks/decision`): its Standard Webhooks
/// signature names the integration (failures count as failed logins), a message is taken
/// once, and the decision is made under the API's rules (see [`crate::service::inbound`]).
pub fn serve_integration(request: &Request) -> Response {
    use crate::service::inbound;
    let outcome = Ctx::load().and_then(|ctx| {
        if request.body().len() > ctx.config.max_body_bytes {
            return Err(ApiError::too_large(format!("request bodies are at most {} bytes", ctx.config.max_body_bytes)));
        }
        let header = |name: &str| request.header(name).and_then(|v| v.as_str());
        let signed = inbound::Signed {
            id: header("webhook-id"),
            timestamp: header("webhook-timestamp"),
            signature: header("webhook-signature"),
        };
        let now = ctx.clock.now();
        let (integration, id) =
            ctx.guard_login(request, || inbound::authenticate(&ctx.config.integrations, &signed, request.body(), now))?;
        let decision: inbound::InboundDecision = crate::api::parse_json(request.body(), false)?;
        let caller = decision.caller(integration);
        let origin = Origin::of(&caller, ctx.client_ip(request));
        ctx.check_rate(request, &caller, &origin)?;
        let mark = inbound::first_time(&ctx.kv, integration, &id, now)?;
        ctx.run(origin, |env| decision.decide(env, &caller)).inspect_err(|_| {
            // Not decided: the sender may send the same message again.
            let _ = ctx.kv.delete(&mark);
        })
    });
    respond(outcome)
}

/// A Slack click, verified and acknowledged, to act on once Slack has its answer.
pub struct SlackClick(crate::webhooks::slack::Click);

/// Acknowledges a Slack interactivity callback (`POST /webhooks/slack`) within Slack's 3
/// seconds: the signature (`v0`, 5 minutes) is checked and a replay refused before anything
/// is read; what the click asks is done after the answer ([`follow_up_slack`]).
pub fn accept_slack(request: &Request) -> (Response, Option<SlackClick>) {
    use crate::webhooks::slack;
    let accepted = Ctx::load().and_then(|ctx| {
        let settings = &ctx.config.webhooks.slack;
        let Some(secret) = settings.signing_secret.as_ref().filter(|_| settings.interactive()) else {
            return Err(ApiError::not_found(
                "integration_not_configured",
                "Slack interactivity is not configured (slack_signing_secret)",
            ));
        };
        let header = |name: &str| request.header(name).and_then(|v| v.as_str());
        let signature = header("x-slack-signature");
        let now = ctx.clock.now();
        ctx.guard_login(request, || {
            if slack::verify(secret, header("x-slack-request-timestamp"), signature, request.body(), now) {
                Ok(())
            } else {
                Err(ApiError::unauthorized(
                    "the Slack signature does not verify (or its timestamp is over 5 minutes away)",
                ))
            }
        })?;
        let seen_by = crate::domain::WebhookName::parse("slack").expect("a name");
        let mark: String = signature.unwrap_or_default().chars().filter(char::is_ascii_hexdigit).take(64).collect();
        let seen = crate::keys::seen_message(&seen_by, &mark);
        if !crate::service::throttle::mark_once(&ctx.kv, &seen, now + slack::TOLERANCE * 2)? {
            return Err(ApiError::conflict("replayed", "this callback was already taken"));
        }
        Ok(slack::click(request.body()).map(SlackClick))
    });
    match accepted {
        Ok(click) => (Response::builder().status(200).body(Vec::<u8>::new()).build(), click),
        Err(error) => (respond(Err(error)), None),
    }
}

/// Does what an acknowledged Slack click asks, as the clicker's mapped principal and under
/// the API's rules, where the policy lets a click decide; the clicker is told the outcome
/// (only them: an ephemeral message), and the channel's message is updated.
pub fn follow_up_slack(click: SlackClick) {
    use crate::service::decisions;
    let SlackClick(click) = click;
    let Ok(ctx) = Ctx::load() else { return };
    let settings = &ctx.config.webhooks;
    let tell = |text: &str| {
        let Some(url) = click.response_url.as_deref().filter(|url| crate::webhooks::reachable(url, settings)) else {
            return;
        };
        let body = json!({"response_type": "ephemeral", "replace_original": false, "text": text}).to_string();
        let request = crate::http::HttpRequest {
            method: crate::http::Method::Post,
            url: url.to_owned(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.into_bytes(),
            timeout: Duration::from_secs(5),
        };
        if let Err(error) = crate::http::HttpClient::send(&ctx.http, request) {
            eprintln!("slack: answering a click: {error}");
        }
    };
    if settings.slack.team_id.as_deref() != Some(click.team_id.as_str()) {
        return tell("Clicks from this Slack workspace do not count in portcullis.");
    }
    let by_email = || -> Option<Caller> {
        // Opt-in: the Slack email names the principal; groups and roles are those of the API
        // key with that principal, if there is one, else an approver in no group.
        let request = settings.slack.user_info(&click.user_id)?;
        let answer = crate::http::HttpClient::send(&ctx.http, request).ok()?;
        let principal = settings.slack.principal_by_email(&crate::webhooks::slack::judge(&answer).ok()?)?;
        crate::auth::check_not_reserved(&principal).ok()?;
        Some(ctx.config.api_keys.caller_of(&principal).unwrap_or(Caller {
            principal,
            display_name: None,
            groups: Vec::new(),
            roles: vec![crate::auth::Role::Approver],
        }))
    };
    let Some(caller) = settings.slack.caller(&click.user_id).or_else(by_email) else {
        return tell(
            "Your Slack user is not mapped to anyone in portcullis (slack_users): decide through the link or the API.",
        );
    };
    let Ok(id) = RequestId::parse(&click.request) else { return tell("That request does not exist.") };
    let allowed = crate::store::load::<crate::domain::AccessRequest>(&ctx.kv, &crate::keys::request(&id))
        .ok()
        .flatten()
        .and_then(|r| {
            crate::store::load::<crate::domain::Policy>(&ctx.kv, &crate::keys::policy(&r.value.policy)).ok().flatten()
        })
        .is_some_and(|p| p.value.chat_decisions == crate::domain::policy::ChatDecisions::Direct);
    if !allowed {
        return tell("This policy does not let a chat click decide: sign in through the link, or use the API.");
    }
    let origin = Origin::of(&caller, None);
    let outcome = ctx.run(origin, |env| match click.action.as_str() {
        "approve" => decisions::approve(env, &caller, id.as_str(), br#"{"comment":"from Slack"}"#),
        "deny" => decisions::deny(env, &caller, id.as_str(), br#"{"reason":"from Slack"}"#),
        _ => {
            let duration = crate::store::load::<crate::domain::AccessRequest>(env.kv, &crate::keys::request(&id))?
                .map(|r| r.value.duration.to_string())
                .unwrap_or_default();
            decisions::extend(env, &caller, id.as_str(), json!({ "duration": duration }).to_string().as_bytes())
        }
    });
    match outcome {
        Ok(reply) => tell(&format!("Done: the request is now {}.", reply.body["state"].as_str().unwrap_or("changed"))),
        Err(error) => tell(&format!("Not done: {}", error.message)),
    }
    ctx.deliver_webhooks(AFTER_ANSWER_DELIVERY_BUDGET);
}

/// Serves a call that takes no credential (the health check): configuration and the store,
/// no caller; it must not change anything.
pub fn serve_public(route: impl FnOnce(&Env) -> Result<Reply, ApiError>) -> Response {
    respond(Ctx::load().and_then(|ctx| ctx.run(Origin::anonymous(None), route)))
}

/// The path below `prefix` as segments (`/api/requests/x/approve` -> `["requests", "x", "approve"]`).
pub fn segments<'a>(request: &'a Request, prefix: &str) -> Vec<&'a str> {
    let path = request.path();
    let path = path.strip_prefix(prefix).unwrap_or(path);
    path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect()
}

/// Delivers webhooks once the handler has answered (the sweep sends whatever this leaves:
/// work after the answer is lost when the host stops the instance).
pub fn deliver_after_answer() {
    match ANSWERED.with(|slot| slot.borrow_mut().take()).map_or_else(Ctx::load, Ok) {
        Ok(ctx) => ctx.deliver_webhooks(AFTER_ANSWER_DELIVERY_BUDGET),
        Err(error) => eprintln!("webhooks: {}", error.internal.unwrap_or(error.message)),
    }
}

/// `n` random bytes from the host (signing secrets).
pub fn random_bytes(n: u64) -> Vec<u8> {
    wasi::random::random::get_random_bytes(n)
}

/// A fresh request id: 96 random bits as hex.
pub fn new_request_id() -> RequestId {
    let bytes = wasi::random::random::get_random_bytes(12);
    RequestId::parse(&hex::encode(bytes)).expect("hex is a valid id")
}

/// Reads an incoming request whole; when it cannot be read, the 400 to answer instead.
pub async fn read_request(incoming: spin_sdk::http::IncomingRequest) -> Result<Request, Response> {
    use spin_sdk::http::conversions::TryFromIncomingRequest;
    // A new call: nothing of an earlier one's is reused, should the host reuse an instance.
    ANSWERED.with(|slot| slot.borrow_mut().take());
    Request::try_from_incoming_request(incoming).await.map_err(|error| {
        respond(Err(ApiError::bad_request("unreadable_request", format!("cannot read the request: {error}"))))
    })
}

/// Renders an operation's outcome; a 5xx's cause goes to stderr (the host's log), never to
/// the client.
pub fn respond(result: Result<Reply, ApiError>) -> Response {
    let retry_after = result.as_ref().err().and_then(|error| error.retry_after);
    let (status, body) = match result {
        Ok(reply) => (reply.status, reply.body),
        Err(error) => {
            if let Some(cause) = &error.internal {
                eprintln!("error {}: {cause}", error.code);
            }
            (error.status, error.body())
        }
    };
    let mut response = Response::builder();
    response.status(status).header("content-type", "application/json");
    if let Some(seconds) = retry_after {
        response.header("retry-after", seconds.to_string());
    }
    response.body(body.to_string()).build()
}
