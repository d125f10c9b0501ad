//! Sealing secrets that must be kept in the store (the cached ARM token, a bearer credential
//! for every VM's NSG): XChaCha20-Poly1305 under a key derived from a secret variable.
//!
//! The nonce is synthetic, an HMAC of the plaintext (as in SIV): no random source is needed,
//! two different plaintexts never share a nonce, and the same plaintext sealed twice gives the
//! same box, which reveals nothing but that equality. The store key is bound in as associated
//! data, so a box cannot be moved to another key.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A key for sealing, derived from a configured secret.
#[derive(Clone)]
pub struct SealingKey {
    cipher: [u8; 32],
    nonce: [u8; 32],
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealingKey(***)")
    }
}

fn derive(secret: &[u8], purpose: &str) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(purpose.as_bytes());
    mac.finalize().into_bytes().into()
}

impl SealingKey {
    /// Derives the key from a secret (any length; a long random one).
    pub fn from_secret(secret: &str) -> Self {
        Self {
            cipher: derive(secret.as_bytes(), "portcullis seal v1: cipher"),
            nonce: derive(secret.as_bytes(), "portcullis seal v1: nonce"),
        }
    }

    /// Seals `plaintext` for the store key `label`: `v1.<hex nonce>.<hex ciphertext>`.
    pub fn seal(&self, label: &str, plaintext: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.nonce).expect("HMAC takes any key length");
        mac.update(label.as_bytes());
        mac.update(&[0]);
        mac.update(plaintext);
        let tag = mac.finalize().into_bytes();
        let nonce = XNonce::from_slice(&tag[..24]);
        let sealed = XChaCha20Poly1305::new((&self.cipher).into())
            .encrypt(nonce, Payload { msg: plaintext, aad: label.as_bytes() })
            .expect("sealing in memory cannot fail");
        format!("v1.{}.{}", hex::encode(nonce), hex::encode(sealed))
    }

    /// Opens a box sealed for `label`; `None` when it is not one, was sealed under another
    /// key or for another label, or was changed.
    pub fn open(&self, label: &str, sealed: &str) -> Option<Vec<u8>> {
        let mut parts = sealed.strip_prefix("v1.")?.splitn(2, '.');
        let nonce = hex::decode(parts.next()?).ok().filter(|n| n.len() == 24)?;
        let ciphertext = hex::decode(parts.next()?).ok()?;
        XChaCha20Poly1305::new((&self.cipher).into())
            .decrypt(XNonce::from_slice(&nonce), Payload { msg: &ciphertext, aad: label.as_bytes() })
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_with_its_key_and_label_and_untouched() {
        let key = SealingKey::from_secret("a long random secret");
        let sealed = key.seal("cache:arm-token", b"eyJ0eXAi.secret-token");
        assert!(!sealed.contains("secret-token"));
        assert_eq!(key.open("cache:arm-token", &sealed).as_deref(), Some(b"eyJ0eXAi.secret-token".as_slice()));
        assert_eq!(key.open("cache:other", &sealed), None, "bound to its store key");
        assert_eq!(SealingKey::from_secret("another secret").open("cache:arm-token", &sealed), None);
        let mut changed = sealed.clone().into_bytes();
        let last = changed.len() - 1;
        changed[last] = if changed[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(key.open("cache:arm-token", std::str::from_utf8(&changed).unwrap()), None);
        assert_eq!(key.open("cache:arm-token", "{\"access_token\":\"x\"}"), None, "plain text is not a box");
    }

    #[test]
    fn different_secrets_get_different_nonces() {
        let key = SealingKey::from_secret("k");
        assert_ne!(key.seal("l", b"one")[..51], key.seal("l", b"two")[..51]);
        assert_eq!(key.seal("l", b"one"), key.seal("l", b"one"));
    }
}
