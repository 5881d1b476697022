//! JSON Web Tokens as Pulsar's `AuthenticationProviderToken` reads them: signed with a secret
//! key (HS256) or a key pair (RS256/ES256); the role is one claim (`sub` by default); `exp` and
//! `nbf`, when present, are enforced with no leeway (as numbers of seconds, fractions allowed as
//! RFC 7519 allows them; any other value refuses the token); with an audience configured, `aud`
//! must be present and name it. `alg: none` and algorithms of another key family are refused
//! (the key decides which algorithms are acceptable, never the token).

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Header, Validation};
use serde_json::{Map, Value};

use crate::keys::{SigningKey, VerifyingKey};
use crate::AuthError;

/// Longest token accepted: a bigger one is refused before it is parsed.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Who a verified token speaks for, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub role: String,
    /// Seconds since the epoch after which the token is no longer valid (`exp`); None: never.
    pub expires_at: Option<u64>,
}

impl Principal {
    /// True once the credentials this principal came with have expired.
    pub fn expired(&self) -> bool {
        self.expires_at.is_some_and(|exp| exp < now_seconds())
    }
}

pub fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Checks tokens against one key.
pub struct TokenVerifier {
    key: VerifyingKey,
    role_claim: String,
    audience: Option<String>,
}

impl TokenVerifier {
    pub fn new(key: VerifyingKey, role_claim: String, audience: Option<String>) -> TokenVerifier {
        TokenVerifier {
            key,
            role_claim,
            audience,
        }
    }

    /// The principal of a valid token, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let token = token.trim();
        let token = token.strip_prefix("Bearer ").unwrap_or(token);
        if token.is_empty() {
            return Err(AuthError::Rejected("no token given".into()));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Rejected(format!(
                "token of {} bytes; at most {MAX_TOKEN_BYTES}",
                token.len()
            )));
        }
        let mut validation = Validation::new(self.key.algorithms[0]);
        validation.algorithms = self.key.algorithms.clone();
        validation.required_spec_claims = HashSet::new();
        // The times are checked below, where a value that is not a number is refused (the
        // library skips a claim it cannot read as a whole number).
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                // Without this, a token with no `aud` at all would pass.
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key.key, &validation)
            .map_err(|error| {
                AuthError::Rejected(match error.kind() {
                    ErrorKind::InvalidSignature => "token signature is invalid".to_string(),
                    ErrorKind::InvalidAlgorithm => {
                        "token algorithm does not match the configured key".to_string()
                    }
                    ErrorKind::InvalidAudience | ErrorKind::MissingRequiredClaim(_) => {
                        "token audience ('aud') does not name this broker's token_audience"
                            .to_string()
                    }
                    _ => format!("invalid token: {error}"),
                })
            })?;
        let role = match data.claims.get(&self.role_claim) {
            Some(Value::String(role)) if !role.is_empty() => role.clone(),
            _ => {
                return Err(AuthError::Rejected(format!(
                    "token has no '{}' claim naming a role",
                    self.role_claim
                )))
            }
        };
        let now = now_seconds();
        let expires_at = time_claim(&data.claims, "exp")?.map(|exp| exp.floor().max(0.0) as u64);
        if expires_at.is_some_and(|exp| exp < now) {
            return Err(AuthError::Rejected("token expired".into()));
        }
        if let Some(not_before) = time_claim(&data.claims, "nbf")? {
            if not_before.ceil() > now as f64 {
                return Err(AuthError::Rejected(format!(
                    "token not valid yet (nbf {not_before} is after now, {now})"
                )));
            }
        }
        Ok(Principal { role, expires_at })
    }
}

/// A time claim (`exp`, `nbf`): seconds since the epoch, None if absent; a value that is not a
/// finite number refuses the token.
fn time_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(value) => match value.as_f64().filter(|seconds| seconds.is_finite()) {
            Some(seconds) => Ok(Some(seconds)),
            None => Err(AuthError::Rejected(format!(
                "token claim '{name}' is not a number of seconds"
            ))),
        },
    }
}

/// A signed token for `subject` (in the `sub` claim), valid for `expiry` if given.
pub fn create_token(
    key: &SigningKey,
    subject: &str,
    expiry: Option<Duration>,
) -> Result<String, AuthError> {
    let mut claims = Map::new();
    claims.insert("sub".into(), Value::String(subject.to_string()));
    if let Some(expiry) = expiry {
        claims.insert("exp".into(), Value::from(now_seconds() + expiry.as_secs()));
    }
    let header = Header {
        typ: None,
        ..Header::new(key.algorithm)
    };
    jsonwebtoken::encode(&header, &claims, &key.key)
        .map_err(|error| AuthError::Key(format!("signing the token: {error}")))
}

/// A duration as `pulsar tokens create --expiry-time` takes it: a number with a unit
/// (`30s`, `10m`, `2h`, `7d`, `1w`, `1y`), or plain seconds.
pub fn parse_expiry(text: &str) -> Result<Duration, AuthError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| AuthError::Key(format!("expiry '{text}': expected e.g. 30s, 10m, 2h, 7d")))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "y" => 365 * 86_400,
        _ => {
            return Err(AuthError::Key(format!(
                "expiry '{text}': unknown unit '{unit}' (s, m, h, d, w, y)"
            )))
        }
    };
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{
        generate_key_pair, generate_secret_key, private_signing_key, public_verifying_key,
        secret_signing_key, secret_verifying_key, KeyKind,
    };
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    fn verifier(secret: &[u8]) -> TokenVerifier {
        TokenVerifier::new(
            secret_verifying_key(secret).expect("key"),
            "sub".into(),
            None,
        )
    }

    #[test]
    fn hs256_tokens_verify_and_forgeries_do_not() {
        let secret = generate_secret_key().expect("secret");
        let token = create_token(&secret_signing_key(&secret), "alice", None).expect("token");
        let principal = verifier(&secret).verify(&token).expect("valid");
        assert_eq!(principal.role, "alice");
        assert_eq!(principal.expires_at, None);
        let other = generate_secret_key().expect("secret");
        let error = verifier(&other).verify(&token).expect_err("forged");
        assert!(error.to_string().contains("signature"), "{error}");
    }

    #[test]
    fn expired_and_unsigned_tokens_are_refused() {
        let secret = generate_secret_key().expect("secret");
        let key = secret_signing_key(&secret);
        let mut claims = Map::new();
        claims.insert("sub".into(), Value::from("alice"));
        claims.insert("exp".into(), Value::from(now_seconds() - 10));
        let expired =
            jsonwebtoken::encode(&Header::new(key.algorithm), &claims, &key.key).expect("token");
        let error = verifier(&secret).verify(&expired).expect_err("expired");
        assert!(error.to_string().contains("expired"), "{error}");
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(br#"{"sub":"admin"}"#);
        assert!(verifier(&secret)
            .verify(&format!("{header}.{body}."))
            .is_err());
    }

    fn signed(secret: &[u8], claims: Value) -> String {
        let key = secret_signing_key(secret);
        jsonwebtoken::encode(&Header::new(key.algorithm), &claims, &key.key).expect("token")
    }

    #[test]
    fn time_claims_are_enforced_whatever_their_number_type() {
        let secret = generate_secret_key().expect("secret");
        let now = now_seconds();
        let refused = |claims: Value, why: &str| {
            let error = verifier(&secret)
                .verify(&signed(&secret, claims.clone()))
                .expect_err(why);
            assert!(error.to_string().contains(why), "{claims}: {error}");
        };
        refused(
            serde_json::json!({"sub": "a", "nbf": now + 3600}),
            "not valid yet",
        );
        refused(
            serde_json::json!({"sub": "a", "nbf": now as f64 + 3600.5}),
            "not valid yet",
        );
        refused(
            serde_json::json!({"sub": "a", "exp": now as f64 - 10.5}),
            "expired",
        );
        refused(serde_json::json!({"sub": "a", "exp": -1}), "expired");
        refused(
            serde_json::json!({"sub": "a", "exp": "never"}),
            "not a number",
        );
        refused(serde_json::json!({"sub": "a", "nbf": null}), "not a number");
        let valid = serde_json::json!({"sub": "a", "nbf": now - 1, "exp": now as f64 + 60.5});
        let principal = verifier(&secret)
            .verify(&signed(&secret, valid))
            .expect("valid");
        assert_eq!(principal.expires_at, Some(now + 60));
    }

    #[test]
    fn a_configured_audience_must_be_named() {
        let secret = generate_secret_key().expect("secret");
        let verifier = TokenVerifier::new(
            secret_verifying_key(&secret).expect("key"),
            "sub".into(),
            Some("meridian".into()),
        );
        for claims in [
            serde_json::json!({"sub": "a"}),
            serde_json::json!({"sub": "a", "aud": "other"}),
            serde_json::json!({"sub": "a", "aud": ["other"]}),
        ] {
            let error = verifier
                .verify(&signed(&secret, claims.clone()))
                .expect_err("wrong audience");
            assert!(error.to_string().contains("audience"), "{claims}: {error}");
        }
        for claims in [
            serde_json::json!({"sub": "a", "aud": "meridian"}),
            serde_json::json!({"sub": "a", "aud": ["other", "meridian"]}),
        ] {
            assert!(verifier.verify(&signed(&secret, claims)).is_ok());
        }
    }

    #[test]
    fn key_pairs_sign_and_verify_and_reject_the_other_family() {
        for kind in [KeyKind::Ec, KeyKind::Rsa] {
            let (private, public) = generate_key_pair(kind).expect("pair");
            let signing = private_signing_key(&private).expect("private");
            let token = create_token(&signing, "bob", Some(Duration::from_secs(60))).expect("t");
            let verifier = TokenVerifier::new(
                public_verifying_key(&public).expect("public"),
                "sub".into(),
                None,
            );
            let principal = verifier.verify(&token).expect("valid");
            assert_eq!(principal.role, "bob");
            assert!(principal.expires_at.is_some());
            // An HS256 token "signed" with the public key bytes is refused.
            let confused = create_token(&secret_signing_key(&public), "bob", None).expect("t");
            assert!(verifier.verify(&confused).is_err());
        }
    }

    #[test]
    fn expiry_units() {
        assert_eq!(parse_expiry("90").expect("s"), Duration::from_secs(90));
        assert_eq!(parse_expiry("2h").expect("h"), Duration::from_secs(7200));
        assert!(parse_expiry("3x").is_err());
    }
}
