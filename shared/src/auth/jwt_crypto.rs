//! The one piece of cryptography the OIDC check needs: verifying RS256 and ES256 signatures,
//! as `jsonwebtoken`'s crypto provider. Its built-in RustCrypto provider links every signer
//! and verifier it knows (RSA private keys, PSS, P-384, Ed25519), about 350 KB of every
//! component that checks tokens, for algorithms [`super::oidc::check`] refuses anyway.

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{ErrorKind, Result};
use jsonwebtoken::signature::{Error, Verifier};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey};
use rsa::{BigUint, Pkcs1v15Sign, RsaPublicKey};
use sha2::{Digest, Sha256};

/// Verifies RS256 and ES256, signs nothing.
static PROVIDER: CryptoProvider =
    CryptoProvider { signer_factory: no_signer, verifier_factory: verifier, key_utils: KeyUtils::new_unimplemented() };

/// Makes [`PROVIDER`] the process's provider (once; later calls change nothing).
pub fn install() {
    // Fails only when a provider is already installed: this one, or (in native tests that
    // also sign tokens) the one the crate's features chose.
    let _ = PROVIDER.install_default();
}

fn no_signer(_: &Algorithm, _: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
    Err(ErrorKind::InvalidAlgorithm.into())
}

fn verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    match (algorithm, key.kind()) {
        (Algorithm::RS256, DecodingKeyKind::RsaModulusExponent { n, e }) => {
            let key = RsaPublicKey::new(BigUint::from_bytes_be(n), BigUint::from_bytes_be(e))
                .map_err(|_| ErrorKind::InvalidRsaKey("not an RSA public key".into()))?;
            Ok(Box::new(Rs256(key)))
        }
        (Algorithm::ES256, DecodingKeyKind::SecretOrDer(point)) => {
            let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(|_| ErrorKind::InvalidEcdsaKey)?;
            Ok(Box::new(Es256(key)))
        }
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    }
}

struct Rs256(RsaPublicKey);

impl Verifier<Vec<u8>> for Rs256 {
    fn verify(&self, message: &[u8], signature: &Vec<u8>) -> std::result::Result<(), Error> {
        let digest = Sha256::digest(message);
        self.0.verify(Pkcs1v15Sign::new::<Sha256>(), &digest, signature).map_err(Error::from_source)
    }
}

impl JwtVerifier for Rs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::RS256
    }
}

struct Es256(p256::ecdsa::VerifyingKey);

impl Verifier<Vec<u8>> for Es256 {
    fn verify(&self, message: &[u8], signature: &Vec<u8>) -> std::result::Result<(), Error> {
        let signature = p256::ecdsa::Signature::from_slice(signature).map_err(Error::from_source)?;
        self.0.verify(message, &signature)
    }
}

impl JwtVerifier for Es256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::ES256
    }
}
