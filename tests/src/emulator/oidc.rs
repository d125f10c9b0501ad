//! An OpenID Connect issuer for tests: publishes a JWKS and mints real signed tokens (RS256
//! and ES256) with the fixture keys in `tests/fixtures/`, including broken ones on purpose;
//! and signs users in by the authorization-code flow with PKCE (`S256` only), as a browser
//! would see it: `login_hint` picks the user instead of a login form.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::state::Answer;

/// Test keys: never used outside tests.
const KEYS: [(&str, Algorithm, &[u8]); 3] = [
    ("rsa-1", Algorithm::RS256, include_bytes!("../../fixtures/oidc-rsa-1.pem")),
    ("rsa-2", Algorithm::RS256, include_bytes!("../../fixtures/oidc-rsa-2.pem")),
    ("ec-1", Algorithm::ES256, include_bytes!("../../fixtures/oidc-ec-1.pem")),
];

struct SigningKey {
    kid: &'static str,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Jwk,
}

/// The issuer's keys and which of them its JWKS publishes.
pub struct Issuer {
    keys: Vec<SigningKey>,
    published: Vec<&'static str>,
    /// Who can sign in (by `login_hint`), with the claims of their ID tokens.
    users: HashMap<String, Value>,
    /// Codes issued and not yet redeemed.
    codes: HashMap<String, Grant>,
    /// Codes redeemed, and refused, so far.
    pub redeemed: u32,
    /// Claims laid over the next ID token (a provider that misbehaves, on purpose).
    pub next_override: Option<Value>,
}

/// What a code was issued for.
struct Grant {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    nonce: Option<String>,
    /// Asked to sign the user in now (`prompt=login`): `auth_time` is the token's `iat`.
    fresh: bool,
    claims: Value,
}

fn oauth_error(code: &str, description: &str) -> Answer {
    (400, vec![], json!({"error": code, "error_description": description}).to_string())
}

impl Issuer {
    /// `rsa-1` and `ec-1` published; `rsa-2` kept back for a rotation.
    pub fn new() -> Self {
        let keys = KEYS
            .iter()
            .map(|(kid, alg, pem)| {
                let key = match alg {
                    Algorithm::ES256 => EncodingKey::from_ec_pem(pem),
                    _ => EncodingKey::from_rsa_pem(pem),
                }
                .expect("fixture key");
                let mut jwk = Jwk::from_encoding_key(&key, *alg).expect("fixture JWK");
                jwk.common.key_id = Some((*kid).to_owned());
                SigningKey { kid, alg: *alg, key, jwk }
            })
            .collect();
        Self {
            keys,
            published: vec!["rsa-1", "ec-1"],
            users: HashMap::new(),
            codes: HashMap::new(),
            redeemed: 0,
            next_override: None,
        }
    }

    /// Lets `login_hint` sign in, with these claims in the ID token (`aud` and `nonce` added).
    pub fn add_user(&mut self, login_hint: &str, claims: Value) {
        self.users.insert(login_hint.to_owned(), claims);
    }

    /// `GET /oidc/authorize`: sends the browser back to `redirect_uri` with a code, or with
    /// `error=access_denied` for a user it does not know.
    pub fn authorize(&mut self, query: &str) -> Answer {
        let params: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        let param = |name: &str| params.get(name).cloned().unwrap_or_default();
        if param("response_type") != "code" || param("code_challenge_method") != "S256" {
            return oauth_error("invalid_request", "code flow with an S256 challenge only");
        }
        let (redirect_uri, state) = (param("redirect_uri"), param("state"));
        if redirect_uri.is_empty() || param("client_id").is_empty() || param("code_challenge").is_empty() {
            return oauth_error("invalid_request", "client_id, redirect_uri and code_challenge are required");
        }
        let back = |pairs: &[(&str, &str)]| {
            let query = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
            (302, vec![("location".to_owned(), format!("{redirect_uri}?{query}"))], String::new())
        };
        let Some(claims) = self.users.get(&param("login_hint")).cloned() else {
            return back(&[("error", "access_denied"), ("error_description", "the user cancelled"), ("state", &state)]);
        };
        let code = uuid::Uuid::new_v4().simple().to_string();
        let grant = Grant {
            client_id: param("client_id"),
            redirect_uri: redirect_uri.clone(),
            challenge: param("code_challenge"),
            nonce: params.get("nonce").cloned(),
            fresh: param("prompt") == "login",
            claims,
        };
        self.codes.insert(code.clone(), grant);
        back(&[("code", &code), ("state", &state)])
    }

    /// `POST /oidc/token`: a code for an ID token, once, to the client it was issued to, with
    /// the verifier of its challenge.
    pub fn redeem(&mut self, body: &[u8]) -> Answer {
        let params: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
        let param = |name: &str| params.get(name).cloned().unwrap_or_default();
        self.redeemed += 1;
        if param("grant_type") != "authorization_code" {
            return oauth_error("unsupported_grant_type", "authorization_code only");
        }
        let Some(grant) = self.codes.remove(&param("code")) else {
            return oauth_error("invalid_grant", "unknown or already redeemed code");
        };
        if grant.client_id != param("client_id") || grant.redirect_uri != param("redirect_uri") {
            return oauth_error("invalid_grant", "the code was issued to another client or redirect URI");
        }
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(param("code_verifier").as_bytes()));
        if challenge != grant.challenge {
            return oauth_error("invalid_grant", "the code verifier does not match the challenge");
        }
        let mut claims = grant.claims;
        claims["aud"] = json!(grant.client_id);
        if let Some(nonce) = grant.nonce {
            claims["nonce"] = json!(nonce);
        }
        if grant.fresh {
            claims["auth_time"] = claims["iat"].clone();
        }
        if let Some(Value::Object(patch)) = self.next_override.take() {
            for (name, value) in patch {
                claims[name] = value;
            }
        }
        let id_token = self.mint("rsa-1", &claims, true);
        // The access token: the same person, for the same registration (the API's own), and
        // no nonce (it is not an ID token).
        let mut access = claims;
        access.as_object_mut().expect("claims are an object").remove("nonce");
        let access_token = self.mint("rsa-1", &access, true);
        let body =
            json!({"token_type": "Bearer", "id_token": id_token, "access_token": access_token, "expires_in": 3600});
        // A page signing in from the browser redeems its code across origins (as Entra's SPA
        // registrations allow).
        (200, vec![("access-control-allow-origin".into(), "*".into())], body.to_string())
    }

    /// Adds a key to the published set (a rotation).
    pub fn publish(&mut self, kid: &'static str) {
        if !self.published.contains(&kid) {
            self.published.push(kid);
        }
    }

    /// The published key set.
    pub fn jwks(&self) -> JwkSet {
        JwkSet { keys: self.keys.iter().filter(|k| self.published.contains(&k.kid)).map(|k| k.jwk.clone()).collect() }
    }

    /// A token signed with key `kid` (whether published or not); `with_kid: false` leaves the
    /// header's `kid` out.
    pub fn mint(&self, kid: &str, claims: &Value, with_kid: bool) -> String {
        let key = self.keys.iter().find(|k| k.kid == kid).expect("a fixture key id");
        let mut header = Header::new(key.alg);
        header.kid = with_kid.then(|| kid.to_owned());
        jsonwebtoken::encode(&header, claims, &key.key).expect("signing a test token")
    }
}

impl Default for Issuer {
    fn default() -> Self {
        Self::new()
    }
}
