//! Browser sign-in for decision links: the OpenID Connect authorization-code flow with PKCE
//! (RFC 7636, `S256`), so an approver who follows a chat button proves who they are to the
//! identity provider (with its MFA) before the decision counts.
//!
//! Nothing is stored until the provider sends the browser back: the `state` parameter carries
//! what the flow needs (the link, the comment, an expiry and a random value), MACed with the
//! link secret together with a cookie only the approver's browser holds. The PKCE verifier and
//! the nonce are derived from that MAC key, so they never leave portcullis. A `state` replayed
//! from another browser, altered, or older than ten minutes verifies to nothing.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeDelta, Utc};
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AuthError;
use super::oidc::OidcSettings;
use crate::config::Secret;
use crate::http::{HttpClient, HttpRequest, Method};
use crate::store::KvStore;

/// How long a sign-in may take, from the click to the provider sending the browser back.
pub const SIGN_IN_WINDOW: TimeDelta = TimeDelta::minutes(10);
/// The cookie that binds a sign-in to the browser that started it (and is the page's CSRF
/// token). `__Host-`: only this exact host can set it, over HTTPS, for the whole site.
pub const BROWSER_COOKIE: &str = "__Host-portcullis-decide";
/// Where the provider sends the browser back, under `public_url`.
pub const CALLBACK_PATH: &str = "/decide/signed-in";
/// Longest comment carried through a sign-in (it travels in the `state` parameter).
pub const MAX_COMMENT: usize = 300;

/// A client registered with the issuer for the decision page.
#[derive(Clone, Debug)]
pub struct SignInSettings {
    /// The registered client (`oidc_client_id`); also the `aud` of its ID tokens.
    pub client_id: String,
    /// Confidential clients' secret (`oidc_client_secret`); public clients rely on PKCE alone.
    pub client_secret: Option<Secret>,
    /// The authorization endpoint (`oidc_authorize_url`).
    pub authorize_url: String,
    /// The token endpoint (`oidc_token_url`).
    pub token_url: String,
    /// `public_url` + [`CALLBACK_PATH`], as registered with the issuer.
    pub redirect_uri: String,
}

/// What a verified `state` carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignIn {
    /// The decision link being used.
    #[serde(rename = "l")]
    pub link: String,
    /// The approver's comment, if any.
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Until when the provider may send the browser back (Unix seconds).
    #[serde(rename = "e")]
    pub expires: i64,
    /// Random: makes every sign-in's verifier, nonce and single-use mark its own.
    #[serde(rename = "r")]
    pub random: String,
}

/// Characters left as they are in a query value (RFC 3986 unreserved).
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

fn encode(value: &str) -> String {
    utf8_percent_encode(value, QUERY_VALUE).to_string()
}

fn mac(key: &[u8], label: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"portcullis sign-in v1\0");
    mac.update(label.as_bytes());
    for part in parts {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

impl SignIn {
    /// A sign-in for `link`, started `now`; `random` comes from the host.
    pub fn start(link: &str, comment: Option<String>, random: &[u8], now: DateTime<Utc>) -> Self {
        let comment = comment.map(|c| c.chars().take(MAX_COMMENT).collect());
        Self {
            link: link.to_owned(),
            comment,
            expires: (now + SIGN_IN_WINDOW).timestamp(),
            random: hex::encode(random),
        }
    }

    /// The `state` parameter: this sign-in, MACed with the browser's cookie.
    pub fn state(&self, key: &[u8], browser: &str) -> String {
        let payload = serde_json::to_vec(self).expect("a sign-in serialises");
        let tag = mac(key, "state", &[&payload, browser.as_bytes()]);
        format!("{}.{}", URL_SAFE_NO_PAD.encode(&payload), URL_SAFE_NO_PAD.encode(tag))
    }

    /// Reads a `state` sent back with the browser's cookie; `None` unless it was made for that
    /// browser with `key` and has not expired.
    pub fn verify(key: &[u8], state: &str, browser: &str, now: DateTime<Utc>) -> Option<Self> {
        if state.len() > 4096 || browser.is_empty() {
            return None;
        }
        let (payload, tag) = state.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let expected = mac(key, "state", &[&payload, browser.as_bytes()]);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(tag.as_slice(), expected.as_slice())) {
            return None;
        }
        let sign_in: Self = serde_json::from_slice(&payload).ok()?;
        (now.timestamp() < sign_in.expires).then_some(sign_in)
    }

    /// The PKCE code verifier (43 characters of base64url, as RFC 7636 asks).
    pub fn verifier(&self, key: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(mac(key, "verifier", &[self.random.as_bytes()]))
    }

    /// The OIDC nonce the ID token must carry back.
    pub fn nonce(&self, key: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(&mac(key, "nonce", &[self.random.as_bytes()])[..18])
    }

    /// Where to send the browser: the provider's authorization endpoint, asking for a code
    /// bound to this sign-in's verifier.
    pub fn authorize_url(&self, settings: &SignInSettings, key: &[u8], browser: &str) -> String {
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(self.verifier(key).as_bytes()));
        let params = [
            ("response_type", "code"),
            ("client_id", settings.client_id.as_str()),
            ("redirect_uri", settings.redirect_uri.as_str()),
            ("scope", "openid profile email"),
            ("response_mode", "query"),
            ("state", &self.state(key, browser)),
            ("nonce", &self.nonce(key)),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
            // A session left open in a shared browser, or silent single sign-on in a page
            // someone else opened, must not decide: the approver signs in now.
            ("prompt", "login"),
        ];
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
        let separator = if settings.authorize_url.contains('?') { '&' } else { '?' };
        format!("{}{separator}{}", settings.authorize_url, query.join("&"))
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    id_token: Option<String>,
}

/// Redeems the provider's `code` for an ID token and verifies it: signed by the issuer, for
/// this client, carrying this sign-in's nonce. Answers the token's claims' caller.
#[allow(clippy::too_many_arguments)]
pub fn redeem(
    code: &str,
    sign_in: &SignIn,
    key: &[u8],
    settings: &SignInSettings,
    oidc: &OidcSettings,
    kv: &dyn KvStore,
    http: &dyn HttpClient,
    now: DateTime<Utc>,
) -> Result<super::Caller, AuthError> {
    let verifier = sign_in.verifier(key);
    let mut fields = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", settings.redirect_uri.as_str()),
        ("client_id", settings.client_id.as_str()),
        ("code_verifier", verifier.as_str()),
    ];
    if let Some(secret) = &settings.client_secret {
        fields.push(("client_secret", secret.expose()));
    }
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
    let request = HttpRequest {
        method: Method::Post,
        url: settings.token_url.clone(),
        headers: vec![("content-type".into(), "application/x-www-form-urlencoded".into())],
        body: body.join("&").into_bytes(),
        timeout: std::time::Duration::from_secs(10),
    };
    let response = http.send(request).map_err(|e| AuthError::Unavailable(format!("the token endpoint: {e}")))?;
    match response.status {
        200 => {}
        // The provider refuses the code: used, expired, or not this verifier's.
        400 | 401 => return Err(AuthError::InvalidToken("the identity provider refused the sign-in code".into())),
        status => return Err(AuthError::Unavailable(format!("the token endpoint answered {status}"))),
    }
    let answer: TokenAnswer = serde_json::from_slice(&response.body)
        .map_err(|e| AuthError::Unavailable(format!("unreadable token endpoint answer: {e}")))?;
    let id_token =
        answer.id_token.ok_or_else(|| AuthError::Unavailable("the token endpoint sent no id_token".into()))?;
    // An ID token is for this client, not for the API's audience.
    let for_client = OidcSettings { audience: settings.client_id.clone(), ..oidc.clone() };
    let claims = super::oidc::verified_claims(&id_token, &for_client, kv, http, now)?;
    let nonce = claims["nonce"].as_str().unwrap_or_default();
    if !bool::from(subtle::ConstantTimeEq::ct_eq(nonce.as_bytes(), sign_in.nonce(key).as_bytes())) {
        return Err(AuthError::InvalidToken("the ID token is not for this sign-in (nonce)".into()));
    }
    // `prompt=login` asked for a sign-in now: one from before this flow began does not count.
    let started = sign_in.expires - SIGN_IN_WINDOW.num_seconds();
    if claims["auth_time"].as_i64().is_some_and(|at| at < started - 60) {
        return Err(AuthError::InvalidToken("the identity provider reused an earlier sign-in (auth_time)".into()));
    }
    super::oidc::caller_from_claims(&claims, oidc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::at;

    const KEY: &[u8] = b"a-long-random-decision-link-secret-value";

    fn settings() -> SignInSettings {
        SignInSettings {
            client_id: "portcullis-web".into(),
            client_secret: None,
            authorize_url: "https://login.example.com/tenant/oauth2/v2.0/authorize".into(),
            token_url: "https://login.example.com/tenant/oauth2/v2.0/token".into(),
            redirect_uri: "https://jit.example.com/decide/signed-in".into(),
        }
    }

    #[test]
    fn a_state_is_good_only_in_the_browser_that_started_it_and_only_for_ten_minutes() {
        let sign_in = SignIn::start("link-token", Some("ok & fine".into()), &[7; 16], at(0));
        let state = sign_in.state(KEY, "cookie-a");
        assert_eq!(SignIn::verify(KEY, &state, "cookie-a", at(9)), Some(sign_in.clone()));
        assert_eq!(SignIn::verify(KEY, &state, "cookie-b", at(1)), None, "another browser");
        assert_eq!(SignIn::verify(KEY, &state, "", at(1)), None, "no cookie");
        assert_eq!(SignIn::verify(KEY, &state, "cookie-a", at(10)), None, "too late");
        assert_eq!(SignIn::verify(b"another key entirely, long enough", &state, "cookie-a", at(1)), None);
        // Another link cannot be slipped in under the same tag.
        let other = SignIn { link: "another-link".into(), ..sign_in.clone() };
        let (_, tag) = state.split_once('.').unwrap();
        let forged = format!("{}.{tag}", other.state(KEY, "cookie-a").split_once('.').unwrap().0);
        assert_eq!(SignIn::verify(KEY, &forged, "cookie-a", at(1)), None);
    }

    #[test]
    fn the_provider_gets_a_challenge_never_the_verifier() {
        let sign_in = SignIn::start("link-token", None, &[1; 16], at(0));
        let url = sign_in.authorize_url(&settings(), KEY, "cookie");
        let verifier = sign_in.verifier(KEY);
        assert_eq!(verifier.len(), 43);
        assert!(!url.contains(&verifier), "{url}");
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        assert!(url.contains(&format!("code_challenge={challenge}&code_challenge_method=S256")), "{url}");
        assert!(url.contains("redirect_uri=https%3A%2F%2Fjit.example.com%2Fdecide%2Fsigned-in"), "{url}");
        assert!(url.starts_with("https://login.example.com/tenant/oauth2/v2.0/authorize?response_type=code&"));
        assert!(url.ends_with("&prompt=login"), "{url}");
        // Each sign-in its own verifier and nonce.
        let another = SignIn::start("link-token", None, &[2; 16], at(0));
        assert_ne!(another.verifier(KEY), verifier);
        assert_ne!(another.nonce(KEY), sign_in.nonce(KEY));
    }

    #[test]
    fn long_comments_are_cut_to_what_a_state_may_carry() {
        let sign_in = SignIn::start("l", Some("é".repeat(1000)), &[0; 16], at(0));
        assert_eq!(sign_in.comment.unwrap().chars().count(), MAX_COMMENT);
    }
}
