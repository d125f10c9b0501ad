//! Standard Webhooks signatures: `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`,
//! keyed by a `whsec_<base64>` secret.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A signing secret: 32 random bytes, shown as `whsec_<base64>`.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(Vec<u8>);

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(***)")
    }
}

impl SigningSecret {
    /// A secret from random bytes (24 to 64 of them, as the specification asks).
    pub fn from_bytes(bytes: Vec<u8>) -> Option<Self> {
        (24..=64).contains(&bytes.len()).then_some(Self(bytes))
    }

    /// Reads `whsec_<base64>`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::from_bytes(STANDARD.decode(text.strip_prefix("whsec_")?).ok()?)
    }

    /// `whsec_<base64>`: the form shown to the subscriber, once.
    pub fn reveal(&self) -> String {
        format!("whsec_{}", STANDARD.encode(&self.0))
    }

    /// The `v1,<base64>` signature of one delivery attempt.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }

    /// Whether `header` (space-separated `version,signature` entries) holds a valid `v1`
    /// signature of the message; compared in constant time.
    pub fn verifies(&self, header: &str, id: &str, timestamp: i64, body: &[u8]) -> bool {
        let expected = self.sign(id, timestamp, body);
        header.split(' ').fold(false, |found, entry| {
            found | bool::from(subtle::ConstantTimeEq::ct_eq(entry.as_bytes(), expected.as_bytes()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_specifications_vectors_reproduce() {
        let a = SigningSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        assert_eq!(
            a.sign("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1649367553, body),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
        let b = SigningSecret::from_bytes((0u8..32).collect()).unwrap();
        assert_eq!(b.reveal(), "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
        let body = br#"{"type":"request.created","timestamp":"2026-01-02T03:04:05Z","data":{"request_id":"req_01"}}"#;
        assert_eq!(
            b.sign("evt_01HZX0000000000000000000", 1767323045, body),
            "v1,mT0+ZA8dx8ofg6OjmmcFn+ltCPGlbHNwdI0TQyMyaro="
        );
    }

    #[test]
    fn any_of_several_signatures_verifies_and_nothing_else_does() {
        let (old, new) =
            (SigningSecret::from_bytes(vec![1; 32]).unwrap(), SigningSecret::from_bytes(vec![2; 32]).unwrap());
        let header = format!("{} {}", old.sign("id", 1, b"x"), new.sign("id", 1, b"x"));
        assert!(old.verifies(&header, "id", 1, b"x") && new.verifies(&header, "id", 1, b"x"));
        assert!(!new.verifies(&header, "id", 2, b"x") && !new.verifies(&header, "id", 1, b"y"));
        assert!(SigningSecret::from_bytes(vec![0; 8]).is_none() && SigningSecret::parse("whsec_").is_none());
    }
}
