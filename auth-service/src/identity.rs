//! Who is calling: bearer tokens, password hashing, and the principal a
//! token stands for, with their roles evaluated fresh on every request.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use portico_core::presets::{preset_roles, system_app_role, system_proxy_role};
use portico_core::time::now_ms;
use portico_core::{AccessChecker, Error, Kind, Resource, Role, SystemRole};
use rand::Rng;
use sha2::{Digest, Sha256};

use crate::storage::{Backend, SessionRow};

pub use portico_core::PrincipalType;

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub ptype: PrincipalType,
    pub roles: Vec<String>,
    pub checker: AccessChecker,
    pub expires: Option<i64>,
    /// For a service: the system role its identity was issued for.
    pub service_role: Option<SystemRole>,
}

/// 32 random bytes, hex-encoded.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    hex(&bytes)
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

pub fn hash_token(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// The resource name of a join token: a prefix of its hash, never the secret.
pub fn token_name(token: &str) -> String {
    hash_token(token)[..32].to_string()
}

/// A strong generated password: 24 characters from a 62-letter alphabet.
pub fn generate_password() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..24)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Hashes with argon2id; CPU heavy, so it runs off the async threads.
pub async fn hash_password(password: String) -> Result<String, Error> {
    tokio::task::spawn_blocking(move || {
        let salt_bytes: [u8; 16] = rand::rng().random();
        let salt = SaltString::encode_b64(&salt_bytes)
            .map_err(|_| Error::internal("password hashing failed"))?;
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|_| Error::internal("password hashing failed"))
    })
    .await
    .map_err(|_| Error::internal("password hashing failed"))?
}

pub async fn verify_password(password: String, hash: String) -> bool {
    verify_blocking(password, hash, None).await
}

/// Verifies while holding `permit`, which goes back only when the hashing
/// itself is done: a caller that hangs up does not free its place early.
pub async fn verify_password_limited(
    password: String,
    hash: String,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> bool {
    verify_blocking(password, hash, Some(permit)).await
}

async fn verify_blocking(
    password: String,
    hash: String,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> bool {
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        PasswordHash::new(&hash)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// Reads `authorization: Bearer <token>`.
pub fn bearer(meta: &tonic::metadata::MetadataMap) -> Option<String> {
    let v = meta.get("authorization")?.to_str().ok()?;
    let t = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))?;
    let t = t.trim();
    (!t.is_empty() && t.len() <= 256).then(|| t.to_string())
}

/// Resolves a token to its principal, loading the user's current roles.
pub async fn authenticate(
    backend: &dyn Backend,
    token: Option<String>,
) -> Result<Principal, Error> {
    let Some(token) = token else {
        return Err(Error::unauthenticated(
            "no credentials: log in with psh login, or pass --identity",
        ));
    };
    let session = backend.session(&hash_token(&token)).await?;
    principal_of(backend, session).await
}

/// The principal of a session row read for a token (`None`: no such
/// session), as `authenticate` decides it.
pub async fn principal_of(
    backend: &dyn Backend,
    session: Option<SessionRow>,
) -> Result<Principal, Error> {
    let Some(session) = session else {
        return Err(Error::unauthenticated(
            "invalid or expired credentials: log in again",
        ));
    };
    if let Some(exp) = session.expires
        && exp < now_ms()
    {
        return Err(Error::unauthenticated("your session expired: log in again"));
    }
    let ptype = PrincipalType::parse(&session.ptype)
        .ok_or_else(|| Error::internal("an internal error occurred"))?;
    let mut service_role = None;
    let roles: Vec<Role> = match ptype {
        PrincipalType::Admin => preset_roles().into_iter().take(1).collect(),
        PrincipalType::Service => {
            let names: Vec<String> = serde_json::from_str(&session.roles).unwrap_or_default();
            service_role = names.iter().find_map(|n| SystemRole::parse(n));
            names
                .iter()
                .filter_map(|n| match SystemRole::parse(n)? {
                    SystemRole::App => Some(system_app_role()),
                    SystemRole::Proxy => Some(system_proxy_role()),
                })
                .collect()
        }
        PrincipalType::User => {
            let Some(rec) = backend.get(Kind::User, &session.principal).await? else {
                return Err(Error::unauthenticated(format!(
                    "user {:?} no longer exists",
                    session.principal
                )));
            };
            let Ok(Resource::User(user)) = Resource::from_json(Kind::User, &rec.value) else {
                return Err(Error::internal("an internal error occurred"));
            };
            if user.spec.locked {
                return Err(Error::unauthenticated(format!(
                    "user {:?} is locked",
                    session.principal
                )));
            }
            load_roles(backend, &user.spec.roles).await?
        }
    };
    Ok(Principal {
        name: session.principal,
        ptype,
        roles: roles.iter().map(|r| r.metadata.name.clone()).collect(),
        checker: AccessChecker::new(&roles),
        expires: session.expires,
        service_role,
    })
}

/// The stored roles with these names; missing ones grant nothing.
pub async fn load_roles(backend: &dyn Backend, names: &[String]) -> Result<Vec<Role>, Error> {
    let mut roles = Vec::with_capacity(names.len());
    for n in names {
        if let Some(rec) = backend.get(Kind::Role, n).await?
            && let Ok(Resource::Role(r)) = Resource::from_json(Kind::Role, &rec.value)
        {
            roles.push(r);
        }
    }
    Ok(roles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passwords_verify() {
        let h = hash_password("correct horse".into()).await.expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse".into(), h.clone()).await);
        assert!(!verify_password("wrong".into(), h).await);
    }

    #[test]
    fn tokens() {
        let t = random_token();
        assert_eq!(t.len(), 64);
        assert_ne!(t, random_token());
        assert_eq!(token_name(&t).len(), 32);
        assert_eq!(generate_password().len(), 24);
    }
}
