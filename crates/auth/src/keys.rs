//! Token keys: where they come from (Pulsar's `file:///path`, `data:;base64,...` or plain
//! base64), their formats (raw secret bytes; DER or PEM public and private keys, as
//! `pulsar tokens` writes DER), and generating new ones.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use crate::AuthError;

/// Bytes of a new HS256 secret key (256 bits, as `pulsar tokens create-secret-key`).
pub const SECRET_KEY_BYTES: usize = 32;
/// Bits of a new RSA key.
pub const RSA_KEY_BITS: usize = 2048;
/// Largest key file read: keys are small, a larger file is a mistake.
const MAX_KEY_BYTES: u64 = 64 * 1024;

/// Reads a key given the way Pulsar's settings give it: `file:///path` (or a plain path
/// starting with `/`), `data:;base64,<base64>`, or bare base64.
pub fn read_key_source(source: &str) -> Result<Vec<u8>, AuthError> {
    let source = source.trim();
    let path = source
        .strip_prefix("file://")
        .or_else(|| source.starts_with('/').then_some(source));
    if let Some(path) = path {
        let metadata = std::fs::metadata(path)
            .map_err(|error| AuthError::Key(format!("reading key file {path}: {error}")))?;
        if metadata.len() > MAX_KEY_BYTES {
            return Err(AuthError::Key(format!(
                "key file {path} has {} bytes; a key has at most {MAX_KEY_BYTES}",
                metadata.len()
            )));
        }
        return std::fs::read(path)
            .map_err(|error| AuthError::Key(format!("reading key file {path}: {error}")));
    }
    let encoded = source
        .strip_prefix("data:;base64,")
        .or_else(|| source.strip_prefix("data:base64,"))
        .unwrap_or(source);
    STANDARD
        .decode(encoded)
        .map_err(|error| AuthError::Key(format!("key is neither a file nor base64: {error}")))
}

/// The algorithm family of a public or private key, read from its encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    Ec,
}

/// Algorithm identifiers inside SubjectPublicKeyInfo / PKCS#8 (DER of the OIDs).
const RSA_OID: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const EC_OID: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// PEM text of a key: kept if it is PEM already, else DER wrapped with `label`.
fn as_pem(bytes: &[u8], label: &str) -> (String, Vec<u8>) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        if text.contains("-----BEGIN") {
            let der = text
                .lines()
                .filter(|line| !line.starts_with("-----"))
                .collect::<String>();
            let der = STANDARD.decode(der.trim()).unwrap_or_default();
            return (text.to_string(), der);
        }
    }
    (pem_of(bytes, label), bytes.to_vec())
}

/// DER bytes as PEM with `label` (64 columns).
pub fn pem_of(der: &[u8], label: &str) -> String {
    let encoded = STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

fn kind_of(der: &[u8]) -> Result<KeyKind, AuthError> {
    if contains(der, RSA_OID) {
        Ok(KeyKind::Rsa)
    } else if contains(der, EC_OID) {
        Ok(KeyKind::Ec)
    } else {
        Err(AuthError::Key(
            "key is neither RSA nor EC (expected SubjectPublicKeyInfo / PKCS#8, DER or PEM)".into(),
        ))
    }
}

/// A verification key and the algorithms tokens signed for it may use.
pub struct VerifyingKey {
    pub key: DecodingKey,
    pub algorithms: Vec<Algorithm>,
}

/// The key for HMAC tokens (HS256/384/512).
pub fn secret_verifying_key(secret: &[u8]) -> Result<VerifyingKey, AuthError> {
    if secret.is_empty() {
        return Err(AuthError::Key("the secret key is empty".into()));
    }
    Ok(VerifyingKey {
        key: DecodingKey::from_secret(secret),
        algorithms: vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
    })
}

/// The key for RSA (RS256/384/512, PS256/384/512) or EC (ES256/384) tokens, from a public key
/// in DER (as `pulsar tokens create-key-pair` writes it) or PEM.
pub fn public_verifying_key(bytes: &[u8]) -> Result<VerifyingKey, AuthError> {
    let (pem, der) = as_pem(bytes, "PUBLIC KEY");
    let invalid =
        |error: jsonwebtoken::errors::Error| AuthError::Key(format!("public key: {error}"));
    match kind_of(&der)? {
        KeyKind::Rsa => Ok(VerifyingKey {
            key: DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(invalid)?,
            algorithms: vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
        }),
        KeyKind::Ec => Ok(VerifyingKey {
            key: DecodingKey::from_ec_pem(pem.as_bytes()).map_err(invalid)?,
            algorithms: vec![Algorithm::ES256, Algorithm::ES384],
        }),
    }
}

/// A signing key and the algorithm `tokens create` uses with it.
pub struct SigningKey {
    pub key: EncodingKey,
    pub algorithm: Algorithm,
}

/// The key for signing HS256 tokens.
pub fn secret_signing_key(secret: &[u8]) -> SigningKey {
    SigningKey {
        key: EncodingKey::from_secret(secret),
        algorithm: Algorithm::HS256,
    }
}

/// The key for signing with a PKCS#8 private key (DER or PEM): RS256 for RSA, ES256 for EC.
pub fn private_signing_key(bytes: &[u8]) -> Result<SigningKey, AuthError> {
    let (pem, der) = as_pem(bytes, "PRIVATE KEY");
    let invalid =
        |error: jsonwebtoken::errors::Error| AuthError::Key(format!("private key: {error}"));
    match kind_of(&der)? {
        KeyKind::Rsa => Ok(SigningKey {
            key: EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(invalid)?,
            algorithm: Algorithm::RS256,
        }),
        KeyKind::Ec => Ok(SigningKey {
            key: EncodingKey::from_ec_pem(pem.as_bytes()).map_err(invalid)?,
            algorithm: Algorithm::ES256,
        }),
    }
}

/// A new random HS256 secret key.
pub fn generate_secret_key() -> Result<Vec<u8>, AuthError> {
    let mut key = vec![0u8; SECRET_KEY_BYTES];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| AuthError::Key("the system random generator failed".into()))?;
    Ok(key)
}

/// A new key pair as DER: (PKCS#8 private key, SubjectPublicKeyInfo public key).
pub fn generate_key_pair(kind: KeyKind) -> Result<(Vec<u8>, Vec<u8>), AuthError> {
    match kind {
        KeyKind::Rsa => {
            use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
            let mut rng = rsa::rand_core::OsRng;
            let private = rsa::RsaPrivateKey::new(&mut rng, RSA_KEY_BITS)
                .map_err(|error| AuthError::Key(format!("generating an RSA key: {error}")))?;
            let private_der = private
                .to_pkcs8_der()
                .map_err(|error| AuthError::Key(format!("encoding the RSA key: {error}")))?;
            let public_der = private
                .to_public_key()
                .to_public_key_der()
                .map_err(|error| AuthError::Key(format!("encoding the RSA key: {error}")))?;
            Ok((
                private_der.as_bytes().to_vec(),
                public_der.as_bytes().to_vec(),
            ))
        }
        KeyKind::Ec => {
            let random = SystemRandom::new();
            let document = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &random)
                .map_err(|_| AuthError::Key("generating an EC key failed".into()))?;
            let pair = EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                document.as_ref(),
                &random,
            )
            .map_err(|_| AuthError::Key("reading the new EC key failed".into()))?;
            // SubjectPublicKeyInfo for a P-256 key: the fixed header, then the 65-byte point.
            const P256_SPKI_HEADER: &[u8] = &[
                0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
                0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
            ];
            let mut public = P256_SPKI_HEADER.to_vec();
            public.extend_from_slice(pair.public_key().as_ref());
            Ok((document.as_ref().to_vec(), public))
        }
    }
}
