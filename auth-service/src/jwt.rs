//! The cluster's JWT key: ES256 tokens that tell an upstream MCP server
//! (an app with `identity: jwt`) which user is calling and with which
//! roles. The key is made once and kept in storage, like the CA's; its
//! public half is served as a JWK set (the proxy publishes it at
//! `/.well-known/jwks.json`).

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use portico_core::Error;
use portico_core::time::now_ms;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::storage::Backend;

/// The name of the key in `cluster_keys`.
const KEY_NAME: &str = "jwt-es256";
/// How long an app JWT lasts; agents renew it while a session lives.
pub const JWT_TTL_MS: i64 = 5 * 60 * 1000;
/// What the tokens say issued them.
pub const ISSUER: &str = "portico";

pub struct JwtKey {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
    kid: String,
    jwk: Value,
}

fn pem(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END PRIVATE KEY-----\n");
    out
}

fn unpem(text: &str) -> Result<Vec<u8>, Error> {
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    STANDARD
        .decode(body.trim())
        .map_err(|_| Error::internal("the stored JWT key is not valid PEM"))
}

impl JwtKey {
    /// The stored key, made now if there is none (concurrent first starts
    /// agree on one through the database).
    pub async fn load_or_create(backend: &dyn Backend) -> Result<JwtKey, Error> {
        let rng = SystemRandom::new();
        let fresh = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| Error::internal("cannot make a JWT key"))?;
        let stored = backend
            .init_cluster_key(KEY_NAME, &pem(fresh.as_ref()))
            .await?;
        Self::from_pkcs8(&unpem(&stored)?)
    }

    fn from_pkcs8(der: &[u8]) -> Result<JwtKey, Error> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|_| Error::internal("the stored JWT key does not load"))?;
        // An uncompressed point: 0x04, then X and Y, 32 bytes each.
        let point = pair.public_key().as_ref();
        if point.len() != 65 || point[0] != 4 {
            return Err(Error::internal("the JWT key's public point is not P-256"));
        }
        let (x, y) = (
            URL_SAFE_NO_PAD.encode(&point[1..33]),
            URL_SAFE_NO_PAD.encode(&point[33..]),
        );
        // RFC 7638 thumbprint: the required members, sorted, no spaces.
        let thumb = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(thumb.as_bytes()));
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "x": x, "y": y,
            "use": "sig", "alg": "ES256", "kid": kid,
        });
        Ok(JwtKey {
            pair,
            rng,
            kid,
            jwk,
        })
    }

    /// `{"keys": [...]}`.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk] })
    }

    /// A token for `user` (with `roles`) calling `app`; with its expiry.
    pub fn issue(&self, app: &str, user: &str, roles: &[String]) -> Result<(String, i64), Error> {
        let now = now_ms();
        let exp = now + JWT_TTL_MS;
        let mut jti = [0u8; 16];
        ring::rand::SecureRandom::fill(&self.rng, &mut jti)
            .map_err(|_| Error::internal("no randomness for a JWT id"))?;
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let claims = json!({
            "iss": ISSUER,
            "sub": user,
            "aud": app,
            "username": user,
            "roles": roles,
            "iat": now / 1000,
            "nbf": now / 1000 - 30,
            "exp": exp / 1000,
            "jti": URL_SAFE_NO_PAD.encode(jti),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .pair
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| Error::internal("cannot sign a JWT"))?;
        Ok((
            format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())),
            exp,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

    #[test]
    fn tokens_verify_with_the_published_key() {
        let rng = SystemRandom::new();
        let der =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
        let key = JwtKey::from_pkcs8(&unpem(&pem(der.as_ref())).expect("pem")).expect("loads");
        let (token, _) = key
            .issue("weather", "alice", &["dev".into()])
            .expect("token");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let jwk = &key.jwks()["keys"][0];
        let mut point = vec![4u8];
        for c in ["x", "y"] {
            point.extend(
                URL_SAFE_NO_PAD
                    .decode(jwk[c].as_str().expect(c))
                    .expect("b64"),
            );
        }
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).expect("sig");
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .expect("verifies");
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["aud"], "weather");
        assert_eq!(claims["roles"], json!(["dev"]));
    }
}
