//! API keys: stored hashed (sha256 of the secret) in the `gateway` schema, looked up through a
//! short-lived in-memory cache so that a request costs no database round trip. A revocation
//! on this replica drops the cache at once; other replicas see it within [`KEY_CACHE_TTL`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::GatewayError;

/// How long a looked-up key is trusted before it is read again.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(5);

/// A key's record (never its secret).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ApiKey {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub allowed_models: Vec<String>,
    pub requests_per_minute: i32,
    pub tokens_per_minute: i32,
    pub admin: bool,
    pub metadata: sqlx::types::Json<HashMap<String, String>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl ApiKey {
    /// Whether the key may use the public model `model` (exact names or `prefix*` patterns;
    /// no entries → every model).
    pub fn may_use(&self, model: &str) -> bool {
        self.allowed_models.is_empty()
            || self
                .allowed_models
                .iter()
                .any(|pattern| match pattern.strip_suffix('*') {
                    Some(prefix) => model.starts_with(prefix),
                    None => pattern == model,
                })
    }

    /// Whether the key is neither revoked nor expired.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| at > now)
    }
}

/// What a new key gets.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub allowed_models: Vec<String>,
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
    pub admin: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub metadata: HashMap<String, String>,
}

/// Keys in Postgres plus the lookup cache.
#[derive(Clone)]
pub struct KeyStore {
    pool: PgPool,
    cache: moka::future::Cache<String, Option<Arc<ApiKey>>>,
    bootstrap_admin: Option<String>,
}

const COLUMNS: &str = "id, name, prefix, allowed_models, requests_per_minute, \
    tokens_per_minute, admin, metadata, expires_at, created_at, revoked_at, last_used_at";

/// sha256 of a secret, hex.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// `lmf_` + 40 base62 characters from two random UUIDs (244 random bits).
fn new_secret() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut random = Uuid::new_v4().as_u128() ^ (Uuid::new_v4().as_u128().rotate_left(64));
    let mut more = Uuid::new_v4().as_u128();
    let mut secret = String::from("lmf_");
    for i in 0..40 {
        let source = if i < 20 { &mut random } else { &mut more };
        secret.push(ALPHABET[(*source % 62) as usize] as char);
        *source /= 62;
    }
    secret
}

impl KeyStore {
    /// A store over `pool` (already migrated); `bootstrap_admin` is a configured admin secret.
    pub fn new(pool: PgPool, bootstrap_admin: Option<String>) -> Self {
        Self {
            pool,
            cache: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(KEY_CACHE_TTL)
                .build(),
            bootstrap_admin: bootstrap_admin.filter(|s| !s.is_empty()),
        }
    }

    /// Creates a key; returns its record and the secret (shown once).
    pub async fn create(&self, new: NewKey) -> Result<(ApiKey, String), GatewayError> {
        if new.name.is_empty() || new.name.chars().count() > 128 {
            return Err(GatewayError::invalid("name", "must be 1–128 characters"));
        }
        if new.metadata.len() > 16 {
            return Err(GatewayError::invalid("metadata", "at most 16 entries"));
        }
        if new.expires_at.is_some_and(|at| at <= Utc::now()) {
            return Err(GatewayError::invalid("expires_at", "must be in the future"));
        }
        let secret = new_secret();
        let key: ApiKey = sqlx::query_as(&format!(
            "INSERT INTO api_keys (id, name, prefix, secret_sha256, allowed_models, \
             requests_per_minute, tokens_per_minute, admin, metadata, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {COLUMNS}"
        ))
        .bind(Uuid::new_v4())
        .bind(&new.name)
        .bind(&secret[..12])
        .bind(hash_secret(&secret))
        .bind(&new.allowed_models)
        .bind(i32::try_from(new.requests_per_minute).unwrap_or(i32::MAX))
        .bind(i32::try_from(new.tokens_per_minute).unwrap_or(i32::MAX))
        .bind(new.admin)
        .bind(sqlx::types::Json(&new.metadata))
        .bind(new.expires_at)
        .fetch_one(&self.pool)
        .await?;
        Ok((key, secret))
    }

    /// Keys, newest first, after the `(created_at, id)` cursor `after`.
    pub async fn list(
        &self,
        limit: i64,
        after: Option<(DateTime<Utc>, Uuid)>,
        include_inactive: bool,
    ) -> Result<Vec<ApiKey>, GatewayError> {
        let (at, id) = after.unwrap_or((DateTime::<Utc>::MAX_UTC, Uuid::max()));
        Ok(sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM api_keys WHERE (created_at, id) < ($1, $2) \
             AND ($3 OR (revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now()))) \
             ORDER BY created_at DESC, id DESC LIMIT $4"
        ))
        .bind(at)
        .bind(id)
        .bind(include_inactive)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Revokes a key (idempotent) and forgets every cached lookup on this replica.
    pub async fn revoke(&self, id: &str, reason: &str) -> Result<ApiKey, GatewayError> {
        let uuid = Uuid::parse_str(id).map_err(|_| GatewayError::invalid("id", "not a UUID"))?;
        let key: Option<ApiKey> = sqlx::query_as(&format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()), \
             revoke_reason = CASE WHEN revoked_at IS NULL THEN $2 ELSE revoke_reason END \
             WHERE id = $1 RETURNING {COLUMNS}"
        ))
        .bind(uuid)
        .bind(reason)
        .fetch_optional(&self.pool)
        .await?;
        self.cache.invalidate_all();
        key.ok_or_else(|| GatewayError::NotFound(format!("no API key with id {id}")))
    }

    /// Authenticates an `Authorization` header value (`Bearer <secret>`).
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Arc<ApiKey>, GatewayError> {
        let secret = header
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                GatewayError::Unauthenticated(
                    "missing API key: send `Authorization: Bearer <key>`".to_owned(),
                )
            })?;
        if self.bootstrap_admin.as_deref() == Some(secret) {
            return Ok(Arc::new(bootstrap_key()));
        }
        let hash = hash_secret(secret);
        let pool = self.pool.clone();
        let found = self
            .cache
            .try_get_with(hash.clone(), async move {
                let key: Option<ApiKey> = sqlx::query_as(&format!(
                    "UPDATE api_keys SET last_used_at = now() WHERE secret_sha256 = $1 \
                     AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute') \
                     RETURNING {COLUMNS}"
                ))
                .bind(&hash)
                .fetch_optional(&pool)
                .await?;
                let key = match key {
                    Some(key) => Some(key),
                    None => {
                        sqlx::query_as(&format!(
                            "SELECT {COLUMNS} FROM api_keys WHERE secret_sha256 = $1"
                        ))
                        .bind(&hash)
                        .fetch_optional(&pool)
                        .await?
                    }
                };
                Ok::<_, sqlx::Error>(key.map(Arc::new))
            })
            .await
            .map_err(|e| GatewayError::from((*e).clone_error()))?;
        match found {
            Some(key) if key.is_active(Utc::now()) => Ok(key),
            Some(key) if key.revoked_at.is_some() => Err(GatewayError::Unauthenticated(
                "this API key has been revoked".to_owned(),
            )),
            Some(_) => Err(GatewayError::Unauthenticated(
                "this API key has expired".to_owned(),
            )),
            None => Err(GatewayError::Unauthenticated(
                "incorrect API key provided".to_owned(),
            )),
        }
    }
}

/// sqlx errors are not `Clone`; the cache shares one error between waiters.
trait CloneError {
    fn clone_error(&self) -> sqlx::Error;
}

impl CloneError for sqlx::Error {
    fn clone_error(&self) -> sqlx::Error {
        sqlx::Error::Protocol(self.to_string())
    }
}

/// The configured bootstrap admin key as a record: every model, no limits.
fn bootstrap_key() -> ApiKey {
    ApiKey {
        id: Uuid::nil(),
        name: "bootstrap-admin".to_owned(),
        prefix: String::new(),
        allowed_models: Vec::new(),
        requests_per_minute: 0,
        tokens_per_minute: 0,
        admin: true,
        metadata: sqlx::types::Json(HashMap::new()),
        expires_at: None,
        created_at: DateTime::<Utc>::UNIX_EPOCH,
        revoked_at: None,
        last_used_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_have_the_documented_shape() {
        let a = new_secret();
        assert_eq!(a.len(), 44);
        assert!(a.starts_with("lmf_"));
        assert!(a[4..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, new_secret());
    }

    #[test]
    fn allowed_models_match_names_and_prefixes() {
        let mut key = bootstrap_key();
        assert!(key.may_use("anything"));
        key.allowed_models = vec!["bank".into(), "small-*".into()];
        assert!(key.may_use("bank") && key.may_use("small-v2"));
        assert!(!key.may_use("banking") && !key.may_use("large"));
    }
}
