//! The decision page behind chat buttons (see [`crate::service::links`]): `GET /decide/{token}`
//! shows the request; `POST` decides as the approver who signs in, either by the identity
//! provider (OIDC authorization code with PKCE, [`crate::auth::signin`]) or with an API key or
//! bearer token pasted into the form. Answers HTML.

use chrono::TimeDelta;
use serde_json::json;
use spin_sdk::http::{Method, Request, Response};

use super::Ctx;
use crate::api::{ApiError, query_param};
use crate::auth::Caller;
use crate::auth::signin::{self, BROWSER_COOKIE, SignIn};
use crate::domain::policy::ChatDecisions;
use crate::domain::{AccessRequest, Policy, State, WebhookName};
use crate::http::Clock;
use crate::service::Origin;
use crate::service::links::{self, Link, LinkDecision};
use crate::service::throttle::mark_once;
use crate::store::KvStore;
use crate::{keys, store};

/// What the page answers: a status, the HTML, a cookie to set, and the identity provider its
/// form may send the browser to.
struct Page {
    status: u16,
    html: String,
    cookie: Option<String>,
    provider: Option<String>,
}

impl Page {
    fn new(status: u16, html: String) -> Self {
        Self { status, html, cookie: None, provider: None }
    }
}

/// `scheme://host[:port]` of a URL, for the page's `form-action`.
fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split(['/', '?', '#']).next().filter(|h| !h.is_empty())?;
    Some(format!("{scheme}://{host}"))
}

fn gone() -> Page {
    Page::new(
        410,
        links::page(
            "This link cannot be used",
            "<p>It has expired, was already used, or was changed. Decide in portcullis itself, or ask for a new message.</p>",
        ),
    )
}

/// A link's request, while the link may still decide it: pending, under a policy that still
/// asks chat decisions to be confirmed here.
enum Usable {
    Yes(Box<AccessRequest>),
    No(Page),
}

fn usable(ctx: &Ctx, link: &Link) -> Result<Usable, ApiError> {
    let Some(stored) = store::load::<AccessRequest>(&ctx.kv, &keys::request(&link.request))? else {
        return Ok(Usable::No(gone()));
    };
    // A policy changed since the message was sent decides by its rules now.
    let policy = store::load::<Policy>(&ctx.kv, &keys::policy(&stored.value.policy))?;
    if policy.is_none_or(|p| p.value.chat_decisions != ChatDecisions::Confirm) {
        return Ok(Usable::No(gone()));
    }
    if stored.value.state != State::Pending {
        let text = format!(
            "<p>Request {} is already {}.</p>",
            links::escape(link.request.as_str()),
            stored.value.state.name()
        );
        return Ok(Usable::No(Page::new(409, links::page("Already decided", &text))));
    }
    Ok(Usable::Yes(Box::new(stored.value)))
}

/// The value of one cookie of the request; none when it comes twice (one of them planted).
fn cookie(request: &Request, name: &str) -> Option<String> {
    let header = request.header("cookie").and_then(|v| v.as_str())?;
    let mut values = header.split(';').filter_map(|pair| pair.trim().split_once('=')).filter(|(k, _)| *k == name);
    match (values.next(), values.next()) {
        (Some((_, value)), None) => Some(value.to_owned()),
        _ => None,
    }
}

fn browser_cookie(value: &str) -> String {
    // Lax: sent when the identity provider sends the browser back (a top-level GET), never
    // with another site's POST.
    format!("{BROWSER_COOKIE}={value}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=3600")
}

/// Serves `GET`/`POST /decide/{token}`.
pub fn serve_decision_link(request: &Request, token: &str) -> Response {
    let outcome = (|| -> Result<Page, ApiError> {
        let ctx = Ctx::load()?;
        if request.body().len() > ctx.config.max_body_bytes {
            return Err(ApiError::too_large("the form is too large"));
        }
        let Some(secret) = ctx.config.webhooks.link_secret.clone() else {
            return Ok(Page::new(
                404,
                links::page("Decision links are off", "<p>This portcullis has no decision_link_secret.</p>"),
            ));
        };
        let key = secret.expose().as_bytes();
        let Some(link) = links::verify(key, token, ctx.clock.now()) else { return Ok(gone()) };
        let stored = match usable(&ctx, &link)? {
            Usable::Yes(stored) => stored,
            Usable::No(page) => return Ok(page),
        };
        let sign_in = ctx.config.sign_in.as_ref();
        // Never the request's own path: `//host/...` would make the form post elsewhere.
        let action = format!("/decide/{token}");
        if *request.method() != Method::Post {
            // A fresh cookie at each opening binds a sign-in to this browser, and is the form's
            // CSRF token.
            let browser = sign_in.map(|_| hex::encode(super::random_bytes(32)));
            let cookie = browser.as_deref().map(browser_cookie);
            let html = links::form(&link, &stored, &action, browser.as_deref());
            let provider = sign_in.and_then(|s| origin(&s.authorize_url));
            return Ok(Page { status: 200, html, cookie, provider });
        }
        let form = String::from_utf8_lossy(request.body()).into_owned();
        let comment = query_param(&form, "comment").filter(|c| !c.trim().is_empty());
        if query_param(&form, "sign_in").is_some() {
            let Some(settings) = sign_in else {
                return Ok(Page::new(404, links::page("Sign-in is off", "<p>Use an API key or a bearer token.</p>")));
            };
            // Only the page's own form: another site's form cannot send the cookie along.
            let browser = cookie(request, BROWSER_COOKIE).unwrap_or_default();
            let sent = query_param(&form, "csrf").unwrap_or_default();
            if browser.is_empty() || !bool::from(subtle::ConstantTimeEq::ct_eq(browser.as_bytes(), sent.as_bytes())) {
                return Ok(Page::new(
                    403,
                    links::page("Not signed in", "<p>Open the link again and sign in from its page.</p>"),
                ));
            }
            let started = SignIn::start(token, comment, &super::random_bytes(16), ctx.clock.now());
            let location = started.authorize_url(settings, key, &browser);
            return Ok(Page { status: 303, html: location, cookie: None, provider: None });
        }
        let credential = query_param(&form, "credential").unwrap_or_default();
        let header = format!("Bearer {}", credential.trim());
        let caller = ctx.guard_login(request, || ctx.authenticate_header(Some(&header)))?;
        decide(&ctx, request, &link, &caller, comment)
    })();
    render(outcome)
}

/// Serves `GET /decide/signed-in`: the identity provider sends the browser back with a code;
/// redeemed, verified and found to be this browser's sign-in, it decides as whoever signed in.
pub fn serve_signed_in(request: &Request) -> Response {
    let outcome = (|| -> Result<Page, ApiError> {
        let ctx = Ctx::load()?;
        let (Some(settings), Some(oidc), Some(secret)) =
            (&ctx.config.sign_in, &ctx.config.oidc, ctx.config.webhooks.link_secret.clone())
        else {
            return Ok(Page::new(
                404,
                links::page(
                    "Sign-in is off",
                    "<p>Signing in to decision links needs oidc_client_id and decision_link_secret.</p>",
                ),
            ));
        };
        let key = secret.expose().as_bytes();
        let now = ctx.clock.now();
        let query = request.query();
        let browser = cookie(request, BROWSER_COOKIE).unwrap_or_default();
        let state = query_param(query, "state").unwrap_or_default();
        let Some(sign_in) = SignIn::verify(key, &state, &browser, now) else {
            return Ok(Page::new(
                410,
                links::page(
                    "This sign-in cannot be used",
                    "<p>It took too long, was started in another browser, or was changed. Open the link again.</p>",
                ),
            ));
        };
        if let Some(error) = query_param(query, "error") {
            let said = query_param(query, "error_description").unwrap_or(error);
            let text = format!("<p>The identity provider said: {}</p>", links::escape(&said));
            return Ok(Page::new(401, links::page("Not signed in", &text)));
        }
        let Some(link) = links::verify(key, &sign_in.link, now) else { return Ok(gone()) };
        if let Usable::No(page) = usable(&ctx, &link)? {
            return Ok(page);
        }
        let Some(code) = query_param(query, "code").filter(|c| !c.is_empty() && c.len() <= 4096) else {
            return Ok(Page::new(400, links::page("Not signed in", "<p>The identity provider sent no code.</p>")));
        };
        // Past the failed-login limit nothing is written, nor asked of the provider.
        let caller = ctx.guard_login(request, || {
            // One sign-in, one decision: a callback URL replayed (from history, a log) is refused.
            let once = keys::seen_message(&WebhookName::parse("signin").expect("a name"), &sign_in.random);
            let forget_at = chrono::DateTime::from_timestamp(sign_in.expires, 0).unwrap_or(now) + TimeDelta::minutes(1);
            if !mark_once(&ctx.kv, &once, forget_at)? {
                return Ok(None);
            }
            let caller = signin::redeem(&code, &sign_in, key, settings, oidc, &ctx.kv, &ctx.http, now)?;
            ctx.refuse_api_key_principal(caller).map(Some)
        })?;
        let Some(caller) = caller else { return Ok(gone()) };
        decide(&ctx, request, &link, &caller, sign_in.comment.clone())
    })();
    render(outcome)
}

/// Decides as `caller`, under every rule of the API, once per approver and link.
fn decide(
    ctx: &Ctx,
    request: &Request,
    link: &Link,
    caller: &Caller,
    comment: Option<String>,
) -> Result<Page, ApiError> {
    let origin = Origin::of(caller, ctx.client_ip(request));
    ctx.check_rate(request, caller, &origin)?;
    // Used once by each approver (a policy may need several): marked before deciding,
    // unmarked if the decision is refused.
    let used = keys::seen_message(&WebhookName::parse("link").expect("a name"), &link.mark);
    let used = format!("{used}:{}", caller.principal);
    if !mark_once(&ctx.kv, &used, link.expires + TimeDelta::minutes(1))? {
        return Ok(gone());
    }
    let id = link.request.as_str();
    let decided = ctx.run(origin, |env| match link.decision {
        LinkDecision::Approve => {
            crate::service::decisions::approve(env, caller, id, json!({"comment": comment}).to_string().as_bytes())
        }
        LinkDecision::Deny => {
            crate::service::decisions::deny(env, caller, id, json!({"reason": comment}).to_string().as_bytes())
        }
    });
    match decided {
        Ok(reply) => {
            let state = reply.body["state"].as_str().unwrap_or("decided").to_owned();
            let text = format!(
                "<p>{} by {}. The request is now <strong>{}</strong>.</p>",
                link.decision.verb(),
                links::escape(caller.principal.as_str()),
                links::escape(&state)
            );
            Ok(Page::new(200, links::page("Done", &text)))
        }
        Err(error) => {
            let _ = ctx.kv.delete(&used);
            Err(error)
        }
    }
}

/// The page as a response: errors become a page, a 303 sends the browser on (its `html` is
/// the location), and the page may not be framed, cached, or leak its URL.
fn render(outcome: Result<Page, ApiError>) -> Response {
    let page = outcome.unwrap_or_else(|error| {
        if let Some(cause) = &error.internal {
            eprintln!("error {}: {cause}", error.code);
        }
        Page::new(error.status, links::page("Not decided", &format!("<p>{}</p>", links::escape(&error.message))))
    });
    // A form's redirect must be allowed too: the sign-in button's goes to the provider.
    let form_action = page.provider.as_ref().map_or("'self'".to_owned(), |origin| format!("'self' {origin}"));
    let mut response = Response::builder();
    response
        .status(page.status)
        .header("cache-control", "no-store")
        .header("referrer-policy", "no-referrer")
        .header("x-frame-options", "DENY")
        .header(
            "content-security-policy",
            format!("default-src 'none'; style-src 'unsafe-inline'; form-action {form_action}; frame-ancestors 'none'"),
        );
    if let Some(cookie) = &page.cookie {
        response.header("set-cookie", cookie.as_str());
    }
    if page.status == 303 {
        return response.header("location", page.html).body(Vec::new()).build();
    }
    response.header("content-type", "text/html; charset=utf-8").body(page.html).build()
}
