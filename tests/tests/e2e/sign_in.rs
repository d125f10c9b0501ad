//! Signing in at the identity provider from a decision link: the authorization-code flow with
//! PKCE, through the real approve component and the emulator's authorization and token
//! endpoints, as a browser that does not follow redirects by itself would walk it.

use reqwest::redirect::Policy;
use serde_json::json;

use crate::support::*;
use crate::webhooks::{subscribe, wait_for};

const PUBLIC: &str = "https://jit.example.com";

async fn world() -> World {
    let world = World::with_variables(&SIGN_IN_VARIABLES).await;
    world.manual_policy(2).await;
    subscribe(&world, "teams", "/teams", json!({"events": ["request.created"], "format": "teams"})).await;
    world
}

/// A browser: its own cookie jar of one cookie, and no automatic redirects.
struct Browser {
    client: reqwest::Client,
    cookie: Option<String>,
}

/// What the browser saw at the end of a walk.
struct Seen {
    status: u16,
    html: String,
    /// The provider's redirect back to portcullis, to replay.
    callback: Option<String>,
}

impl Browser {
    fn new() -> Self {
        Self { client: reqwest::Client::builder().redirect(Policy::none()).build().unwrap(), cookie: None }
    }

    fn local(world: &World, url: &str) -> String {
        url.replace(PUBLIC, &world.local.host.url())
    }

    async fn get(&mut self, url: &str) -> reqwest::Response {
        let mut request = self.client.get(url);
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().await.unwrap();
        if let Some(set) = response.headers().get("set-cookie") {
            self.cookie = Some(set.to_str().unwrap().split(';').next().unwrap().to_owned());
        }
        response
    }

    /// Opens the link's page and answers the CSRF token its sign-in form carries.
    async fn open(&mut self, world: &World, link: &str) -> (String, String) {
        let page = self.get(&Self::local(world, link)).await;
        assert_eq!(page.status(), 200);
        let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
        let html = page.text().await.unwrap();
        let csrf = html.split("name=\"csrf\" value=\"").nth(1).expect("a sign-in form").split('"').next().unwrap();
        (csrf.to_owned(), csp)
    }

    /// Presses "Sign in and approve" with `csrf`: answers the status and where it sends the
    /// browser.
    async fn press(&self, world: &World, link: &str, csrf: &str) -> (u16, Option<String>) {
        let mut request = self
            .client
            .post(Self::local(world, link))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("sign_in=provider&csrf={csrf}&comment=checked+the+ticket"));
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().await.unwrap();
        let location = response.headers().get("location").map(|l| l.to_str().unwrap().to_owned());
        (response.status().as_u16(), location)
    }

    /// The whole walk: page, button, provider (as `who`), back to portcullis.
    async fn sign_in(&mut self, world: &World, link: &str, who: &str) -> Seen {
        let (csrf, _) = self.open(world, link).await;
        let (status, provider) = self.press(world, link, &csrf).await;
        assert_eq!(status, 303);
        let provider = provider.unwrap();
        assert!(provider.starts_with(&format!("{}/oidc/authorize?", world.local.emulator.url())), "{provider}");
        let back = self.get(&format!("{provider}&login_hint={who}")).await;
        assert_eq!(back.status(), 302);
        let callback = back.headers()["location"].to_str().unwrap().to_owned();
        assert!(callback.starts_with(&format!("{PUBLIC}/decide/signed-in?")), "{callback}");
        let seen = self.get(&Self::local(world, &callback)).await;
        Seen { status: seen.status().as_u16(), html: seen.text().await.unwrap(), callback: Some(callback) }
    }
}

/// A request's state and how many approvals it has.
async fn progress(world: &World, request: &str) -> (String, usize) {
    let body = world.get_request(request).await;
    (body["state"].as_str().unwrap().to_owned(), body["approvals"].as_array().map_or(0, Vec::len))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sign_in_at_the_provider_decides_as_that_person_once_in_the_browser_that_started_it() {
    let world = world().await;
    for (who, groups, roles) in [
        ("grace@example.com", &["devs"][..], &["requester"][..]),
        ("frank@example.com", &["ops"][..], &["approver"][..]),
        ("henry@example.com", &["ops"][..], &["approver"][..]),
    ] {
        world.local.emulator.add_oidc_user(who, world.claims(who, groups, roles));
    }
    let grace = world.token("grace@example.com", &["devs"], &["requester"]);
    let (status, request) = world.request(&grace, &ssh("PT1H")).await;
    assert_eq!(status, 201, "{request}");
    let request = id(&request);
    let card = wait_for(&world, "/teams", 1).await.remove(0).body;
    let approve = card["attachments"][0]["content"]["actions"][0]["url"].as_str().unwrap().to_owned();

    // The page lets its form send the browser to the provider, and nowhere else; its cookie
    // is the host's own, never sent to scripts or over plain HTTP.
    let mut browser = Browser::new();
    let page = browser.client.get(Browser::local(&world, &approve)).send().await.unwrap();
    let set = page.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.starts_with("__Host-portcullis-decide="), "{set}");
    for attribute in ["Path=/", "Secure", "HttpOnly", "SameSite=Lax"] {
        assert!(set.split("; ").any(|a| a == attribute), "{attribute} in {set}");
    }
    let (csrf, csp) = browser.open(&world, &approve).await;
    assert!(csp.contains(&format!("form-action 'self' {}", world.local.emulator.url())), "{csp}");
    assert_eq!(csrf.len(), 64);
    // Another site's form cannot start a sign-in: it has not the cookie, or not its value.
    assert_eq!(Browser::new().press(&world, &approve, &csrf).await.0, 403);
    assert_eq!(browser.press(&world, &approve, "0".repeat(64).as_str()).await.0, 403);

    // The requester herself signs in: refused, as through the API.
    let seen = browser.sign_in(&world, &approve, "grace@example.com").await;
    assert_eq!(seen.status, 403, "no self-approval: {}", seen.html);
    // The approver cancels at the provider: nothing.
    let seen = browser.sign_in(&world, &approve, "nobody@example.com").await;
    assert_eq!(seen.status, 401, "{}", seen.html);
    assert!(seen.html.contains("the user cancelled"), "{}", seen.html);
    // A code changed on the way, or brought back in another browser: nothing, and the second
    // is refused before the provider is asked.
    let (csrf, _) = browser.open(&world, &approve).await;
    let (_, provider) = browser.press(&world, &approve, &csrf).await;
    let back = browser.get(&format!("{}&login_hint=frank@example.com", provider.unwrap())).await;
    let callback = back.headers()["location"].to_str().unwrap().to_owned();
    let redeemed = world.local.emulator.codes_redeemed();
    let mut elsewhere = Browser::new();
    let other = elsewhere.get(&Browser::local(&world, &callback)).await;
    assert_eq!(other.status(), 410, "another browser");
    elsewhere.open(&world, &approve).await;
    assert_eq!(elsewhere.get(&Browser::local(&world, &callback)).await.status(), 410, "a cookie of its own");
    assert_eq!(world.local.emulator.codes_redeemed(), redeemed, "refused without asking the provider");
    let tampered = callback.replace("code=", "code=x");
    assert_eq!(browser.get(&Browser::local(&world, &tampered)).await.status(), 401, "the provider refuses it");
    // A cookie planted beside the browser's own: the sign-in is not trusted.
    let planted = Browser::local(&world, &callback);
    let doubled = browser
        .client
        .get(&planted)
        .header("cookie", format!("{}; __Host-portcullis-decide=planted", browser.cookie.clone().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(doubled.status(), 410);
    // An ID token the provider got wrong: another sign-in's nonce, another client, another
    // issuer, or a sign-in from before this one began.
    for (claims, why) in [
        (json!({"nonce": "another-sign-in"}), "nonce"),
        (json!({"aud": "another-client"}), "audience"),
        (json!({"iss": "https://evil.example.com/v2.0"}), "issuer"),
        (json!({"auth_time": world.local.host.clock().now().timestamp() - 3600}), "auth_time"),
    ] {
        world.local.emulator.override_next_id_token(claims);
        let seen = browser.sign_in(&world, &approve, "frank@example.com").await;
        assert_eq!(seen.status, 401, "{why}: {}", seen.html);
    }
    assert_eq!(progress(&world, &request).await, ("pending".to_owned(), 0));

    // Frank signs in: his approval counts, as his, with his comment.
    let seen = browser.sign_in(&world, &approve, "frank@example.com").await;
    assert_eq!(seen.status, 200, "{}", seen.html);
    assert!(seen.html.contains("frank@example.com"), "{}", seen.html);
    assert_eq!(progress(&world, &request).await, ("pending".to_owned(), 1), "one of two");
    let approved = world.audit(&format!("request={request}&action=request.approval_added")).await;
    assert_eq!(approved.last().unwrap()["actor"], "frank@example.com", "{approved:#?}");
    // His callback replayed, or a second sign-in of his through the same link: nothing more.
    let replay = browser.get(&Browser::local(&world, seen.callback.as_deref().unwrap())).await;
    assert_eq!(replay.status(), 410);
    assert_eq!(browser.sign_in(&world, &approve, "frank@example.com").await.status, 410);
    assert_eq!(progress(&world, &request).await.1, 1);
    // An ID token (one with a nonce) is no credential for the API, though its audience is.
    let mut claims = world.claims("frank@example.com", &["ops"], &["approver"]);
    let (status, _) =
        world.call("GET", "/api/requests", Some(&world.local.emulator.mint("rsa-1", &claims)), None).await;
    assert_eq!(status, 200, "the same claims as an access token");
    claims["nonce"] = json!("a-sign-in");
    let (status, _) =
        world.call("GET", "/api/requests", Some(&world.local.emulator.mint("rsa-1", &claims)), None).await;
    assert_eq!(status, 401);

    // Henry, the second approver, in his own browser: the request is approved and opens.
    let seen = Browser::new().sign_in(&world, &approve, "henry@example.com").await;
    assert_eq!(seen.status, 200, "{}", seen.html);
    assert_eq!(progress(&world, &request).await.0, "active");
    assert_eq!(world.jit_rules().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_registered_client_the_page_offers_only_a_credential() {
    let world = World::with_variables(&[("decision_link_secret", "a-long-random-decision-link-secret-value")]).await;
    world.manual_policy(1).await;
    subscribe(&world, "teams", "/teams", json!({"events": ["request.created"], "format": "teams"})).await;
    world.request(ALICE, &ssh("PT1H")).await;
    let card = wait_for(&world, "/teams", 1).await.remove(0).body;
    let approve = card["attachments"][0]["content"]["actions"][0]["url"].as_str().unwrap().to_owned();
    let page = world.client.get(Browser::local(&world, &approve)).send().await.unwrap();
    assert!(page.headers().get("set-cookie").is_none());
    assert!(page.headers()["content-security-policy"].to_str().unwrap().contains("form-action 'self';"));
    let html = page.text().await.unwrap();
    assert!(!html.contains("sign_in") && html.contains("name=\"credential\""), "{html}");
    let callback = world.client.get(format!("{}/decide/signed-in?code=x&state=y", world.local.host.url()));
    assert_eq!(callback.send().await.unwrap().status(), 404);
}
