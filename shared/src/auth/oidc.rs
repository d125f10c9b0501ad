//! OpenID Connect bearer tokens: signature against the issuer's JWKS (RS256 or ES256 only),
//! `iss`, `aud`, `exp` and `nbf` with 60 s of skew, and the caller taken from configured claims.

use std::collections::HashSet;

use chrono::{DateTime, TimeDelta, Utc};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use super::{AuthError, Caller, Role};
use crate::domain::{GroupName, Principal};
use crate::http::{HttpClient, HttpRequest, Method};
use crate::keys;
use crate::store::{self, KvStore};

/// Clock skew tolerated on `exp` and `nbf`.
const SKEW_SECS: u64 = 60;
/// An unknown `kid` refetches the JWKS at most this often (key rotation without a storm).
const REFETCH_AFTER: TimeDelta = TimeDelta::minutes(1);

/// Where tokens come from and how to read them.
#[derive(Clone, Debug)]
pub struct OidcSettings {
    /// Expected `iss` (`https://login.microsoftonline.com/<tenant>/v2.0`).
    pub issuer: String,
    /// Expected `aud`.
    pub audience: String,
    /// The issuer's JWKS.
    pub jwks_url: String,
    /// The claim naming the principal (`oid`, `preferred_username`, `upn` or `email`).
    pub principal_claim: String,
    /// The claim listing groups (`groups` or `roles`).
    pub groups_claim: String,
}

#[derive(Serialize, Deserialize)]
struct CachedJwks {
    fetched_at: DateTime<Utc>,
    keys: JwkSet,
}

fn invalid(reason: impl Into<String>) -> AuthError {
    AuthError::InvalidToken(reason.into())
}

/// Whether a bearer credential is shaped like a JWT (three base64url parts).
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.starts_with("eyJ")
}

/// Verifies a token and maps it to a caller, fetching the JWKS when it is not cached or does
/// not know the token's key.
pub fn authenticate(
    token: &str,
    settings: &OidcSettings,
    kv: &dyn KvStore,
    http: &dyn HttpClient,
    now: DateTime<Utc>,
) -> Result<Caller, AuthError> {
    let claims = verified_claims(token, settings, kv, http, now)?;
    // An ID token (the decision page's sign-in asks for one with a nonce) is proof of a
    // sign-in to a client, not a credential for the API, even where both share an audience.
    if claims.get("nonce").is_some() {
        return Err(invalid("an ID token is not an access token for the API"));
    }
    caller_from_claims(&claims, settings)
}

/// A token's claims once its signature, issuer, audience and times check out.
pub fn verified_claims(
    token: &str,
    settings: &OidcSettings,
    kv: &dyn KvStore,
    http: &dyn HttpClient,
    now: DateTime<Utc>,
) -> Result<serde_json::Value, AuthError> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(format!("unreadable token header: {e}")))?;
    let cached = store::load::<CachedJwks>(kv, keys::JWKS).ok().flatten().map(|v| v.value);
    let knows_key = |jwks: &JwkSet| header.kid.as_ref().is_none_or(|kid| jwks.find(kid).is_some());
    let jwks = match cached {
        Some(cached) if knows_key(&cached.keys) || now - cached.fetched_at < REFETCH_AFTER => cached.keys,
        _ => fetch_jwks(settings, kv, http, now)?,
    };
    check(token, &jwks, settings)
}

fn fetch_jwks(
    settings: &OidcSettings,
    kv: &dyn KvStore,
    http: &dyn HttpClient,
    now: DateTime<Utc>,
) -> Result<JwkSet, AuthError> {
    let request = HttpRequest {
        method: Method::Get,
        url: settings.jwks_url.clone(),
        headers: vec![],
        body: vec![],
        timeout: std::time::Duration::from_secs(5),
    };
    let response = http.send(request).map_err(|e| AuthError::Unavailable(format!("fetching the JWKS: {e}")))?;
    if response.status != 200 {
        return Err(AuthError::Unavailable(format!("the JWKS endpoint answered {}", response.status)));
    }
    let keys: JwkSet =
        serde_json::from_slice(&response.body).map_err(|e| AuthError::Unavailable(format!("unreadable JWKS: {e}")))?;
    let version = store::load::<serde_json::Value>(kv, keys::JWKS).ok().flatten().map(|v| v.version);
    // A cache write that loses a race or fails costs one more fetch later, nothing else.
    let _ = store::save(kv, keys::JWKS, &CachedJwks { fetched_at: now, keys: keys.clone() }, version);
    Ok(keys)
}

/// Checks a token against a key set and answers its claims; pure apart from the wall clock
/// `jsonwebtoken` reads.
pub fn check(token: &str, jwks: &JwkSet, settings: &OidcSettings) -> Result<serde_json::Value, AuthError> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(format!("unreadable token header: {e}")))?;
    // Only asymmetric algorithms: `none` never parses, and HS256 signed with a public RSA key
    // (the classic confusion attack) is refused here before any key is used.
    if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
        return Err(invalid(format!("algorithm {:?} is not accepted (RS256 or ES256 only)", header.alg)));
    }
    let jwk = match &header.kid {
        Some(kid) => jwks.find(kid).ok_or_else(|| invalid(format!("no key '{kid}' in the issuer's key set")))?,
        None if jwks.keys.len() == 1 => &jwks.keys[0],
        None => return Err(invalid("the token names no key (kid) and the issuer has several")),
    };
    check_key_matches(jwk, header.alg)?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| invalid(format!("unusable key in the key set: {e}")))?;
    super::jwt_crypto::install();
    let mut validation = Validation::new(header.alg);
    validation.leeway = SKEW_SECS;
    validation.validate_nbf = true;
    validation.set_issuer(&[&settings.issuer]);
    validation.set_audience(&[&settings.audience]);
    validation.required_spec_claims = HashSet::from(["exp".to_owned(), "iss".to_owned(), "aud".to_owned()]);
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind as K;
        invalid(match e.kind() {
            K::ExpiredSignature => "the token has expired".to_owned(),
            K::ImmatureSignature => "the token is not valid yet (nbf)".to_owned(),
            K::InvalidAudience => "the token is for another audience".to_owned(),
            K::InvalidIssuer => "the token is from another issuer".to_owned(),
            K::InvalidSignature => "the token's signature does not verify".to_owned(),
            K::MissingRequiredClaim(claim) => format!("the token has no '{claim}' claim"),
            other => format!("invalid token: {other:?}"),
        })
    })?;
    Ok(data.claims)
}

/// A key may only verify the algorithm of its family (RSA for RS256, P-256 for ES256).
fn check_key_matches(jwk: &Jwk, alg: Algorithm) -> Result<(), AuthError> {
    let fits = match (&jwk.algorithm, alg) {
        (AlgorithmParameters::RSA(_), Algorithm::RS256) => true,
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES256) => ec.curve == EllipticCurve::P256,
        _ => false,
    };
    let declared = jwk.common.key_algorithm.map(|a| format!("{a:?}"));
    if !fits || declared.is_some_and(|d| d != format!("{alg:?}")) {
        return Err(invalid(format!("the key named by the token is not a {alg:?} key")));
    }
    Ok(())
}

/// Longest display name kept (the rest is cut).
const MAX_DISPLAY_NAME: usize = 100;

/// The caller a verified token names.
pub fn caller_from_claims(claims: &serde_json::Value, settings: &OidcSettings) -> Result<Caller, AuthError> {
    let claim = |name: &str| claims[name].as_str().filter(|v| !v.is_empty());
    let missing = |name: &str| invalid(format!("the token has no '{name}' claim to name the caller"));
    let principal = match settings.principal_claim.as_str() {
        // Entra's object id is unique within its tenant only, and never reassigned: with the
        // tenant beside it, one person for good.
        "oid" => {
            format!("{}@{}", claim("oid").ok_or_else(|| missing("oid"))?, claim("tid").ok_or_else(|| missing("tid"))?)
        }
        other => claim(other).ok_or_else(|| missing(other))?.to_owned(),
    };
    let principal = Principal::parse(&principal).map_err(|e| invalid(e.to_string()))?;
    super::check_not_reserved(&principal).map_err(invalid)?;
    // Shown beside the principal (an object id means little to a person); never decided on.
    // Only what the directory holds (`name`, else the sign-in name), without the characters
    // that could make it display as something else.
    let display_name = ["name", "preferred_username"]
        .into_iter()
        .find_map(claim)
        .map(|name| {
            name.chars().filter(|c| !crate::domain::is_invisible(*c)).take(MAX_DISPLAY_NAME).collect::<String>()
        })
        .filter(|name| !name.trim().is_empty() && name != principal.as_str());
    let strings = |claim: &str| -> Vec<String> {
        claims[claim]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let groups = strings(&settings.groups_claim).iter().filter_map(|g| GroupName::parse(g).ok()).collect();
    // Entra app roles named like portcullis's roles grant them.
    let roles = strings("roles")
        .iter()
        .filter_map(|r| match r.as_str() {
            "admin" => Some(Role::Admin),
            "approver" => Some(Role::Approver),
            "requester" => Some(Role::Requester),
            "auditor" => Some(Role::Auditor),
            _ => None,
        })
        .collect();
    Ok(Caller { principal, display_name, groups, roles })
}
