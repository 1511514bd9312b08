//! Postgres for a service: one schema of its own (`registry`, `jobs`, …) holding its tables
//! and its own `_sqlx_migrations`, reached through a pool whose `search_path` is that schema.
//! So services never see each other's tables, and a test can use a throwaway schema name.

use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};

use crate::StartupError;

/// The flag / env var every service reads its database URL from.
pub const URL_SETTING: &str = "LMFORGE_DATABASE_URL";

/// How a service reaches its schema.
#[derive(Debug, Clone)]
pub struct PgSettings {
    /// `postgres://user:password@host:port/database`.
    pub url: String,
    /// The service's schema; created when missing. Lowercase identifier.
    pub schema: String,
    /// Pool size.
    pub max_connections: u32,
    /// How long start-up keeps retrying an unreachable server.
    pub startup_timeout: Duration,
}

/// The URL with its password replaced, fit for logs and error messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparseable url>".to_owned(),
    }
}

/// Checks that `schema` is a plain lowercase SQL identifier (so it can be quoted safely).
pub fn validate_schema(schema: &str) -> Result<(), StartupError> {
    let valid = !schema.is_empty()
        && schema.len() <= 63
        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(StartupError::Invalid {
            setting: "database schema",
            reason: format!(
                "`{schema}` must be 1-63 chars of [a-z0-9_], not starting with a digit"
            ),
        })
    }
}

/// Parses a Postgres URL, naming [`URL_SETTING`] when it is malformed.
pub fn parse_url(url: &str) -> Result<PgConnectOptions, StartupError> {
    let invalid = |reason: String| StartupError::Invalid {
        setting: URL_SETTING,
        reason,
    };
    let parsed = url::Url::parse(url)
        .map_err(|e| invalid(format!("`{}` is not a URL: {e}", redact(url))))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(invalid(format!(
            "`{}` must start with postgres:// (got scheme `{}`)",
            redact(url),
            parsed.scheme()
        )));
    }
    PgConnectOptions::from_str(url)
        .map_err(|e| invalid(format!("`{}` is not a Postgres URL: {e}", redact(url))))
}

/// Connects (retrying until `startup_timeout`), creates the schema if missing and returns a
/// pool scoped to it.
pub async fn connect(settings: &PgSettings) -> Result<PgPool, StartupError> {
    validate_schema(&settings.schema)?;
    let options = parse_url(&settings.url)?;
    let started = Instant::now();
    let mut last_error;
    loop {
        match create_schema(&options, &settings.schema).await {
            Ok(()) => break,
            Err(error) => last_error = error,
        }
        if started.elapsed() >= settings.startup_timeout {
            return Err(StartupError::Unreachable {
                setting: URL_SETTING,
                target: redact(&settings.url),
                waited_secs: settings.startup_timeout.as_secs(),
                reason: last_error,
            });
        }
        tracing::debug!(reason = %last_error, "postgres not answering yet, retrying");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let scoped = options.options([("search_path", settings.schema.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(scoped);
    Ok(pool)
}

async fn create_schema(options: &PgConnectOptions, schema: &str) -> Result<(), String> {
    let mut conn =
        tokio::time::timeout(Duration::from_secs(3), PgConnection::connect_with(options))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
    let statement = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
    let result = sqlx::query(&statement).execute(&mut conn).await;
    let _ = conn.close().await;
    match result {
        Ok(_) => Ok(()),
        // Two replicas racing on CREATE SCHEMA IF NOT EXISTS: one of them gets a unique
        // violation although the schema now exists, which is all we wanted.
        Err(sqlx::Error::Database(db))
            if matches!(db.code().as_deref(), Some("23505") | Some("42P06")) =>
        {
            Ok(())
        }
        Err(error) => Err(error.to_string()),
    }
}

/// Applies `migrator` inside the pool's schema. sqlx holds a Postgres advisory lock while it
/// migrates, so replicas starting together apply each migration exactly once.
pub async fn migrate(pool: &PgPool, migrator: &Migrator, schema: &str) -> Result<(), StartupError> {
    migrator.run(pool).await.map_err(|e| StartupError::Migrate {
        schema: schema.to_owned(),
        reason: e.to_string(),
    })
}

/// One readiness probe: `SELECT 1` within two seconds.
pub async fn probe(pool: &PgPool) -> Result<(), String> {
    match tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no answer within 2s".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/lmforge"),
            "postgres://app:***@db:5432/lmforge"
        );
        assert_eq!(
            redact("postgres://app@db/lmforge"),
            "postgres://app@db/lmforge"
        );
        let error = parse_url("mysql://app:s3cret@db/x").expect_err("wrong scheme");
        let message = error.to_string();
        assert!(message.starts_with("LMFORGE_DATABASE_URL:"), "{message}");
        assert!(!message.contains("s3cret"), "{message}");
        assert!(parse_url("not a url").is_err());
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(validate_schema("registry").is_ok());
        assert!(validate_schema("t_1234_registry").is_ok());
        for bad in ["", "Registry", "1abc", "a-b", "x\"; drop", &"a".repeat(64)] {
            assert!(validate_schema(bad).is_err(), "{bad}");
        }
    }
}
