//! An OpenID Connect issuer for tests: publishes a JWKS and mints real signed tokens (RS256
//! and ES256) with the fixture keys in `tests/fixtures/`, including broken ones on purpose.

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;

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
        Self { keys, published: vec!["rsa-1", "ec-1"] }
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
