//! A service's schema on real Postgres: created on first connect, migrations applied once
//! even when replicas start together, and tables kept out of every other schema.

use std::time::Duration;

use lmforge_runtime::postgres::{PgSettings, connect, migrate};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("tests/migrations");

fn settings(schema: &str) -> PgSettings {
    PgSettings {
        url: std::env::var("LMFORGE_DATABASE_URL")
            .unwrap_or_else(|_| lmforge_runtime::args::DEFAULT_DATABASE_URL.to_owned()),
        schema: schema.to_owned(),
        max_connections: 4,
        startup_timeout: Duration::from_secs(10),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_once() {
    let schema = format!("t{}_replicas", std::process::id());
    let replicas = (0..4).map(|_| {
        let settings = settings(&schema);
        async move {
            let pool = connect(&settings)
                .await
                .expect("Postgres answers (run `make services`)");
            migrate(&pool, &MIGRATOR, &settings.schema)
                .await
                .expect("concurrent migration succeeds");
            pool
        }
    });
    let pools = futures::future::join_all(replicas).await;
    let pool = &pools[0];

    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(pool)
        .await
        .expect("the migrations table lives in the schema");
    assert_eq!(applied, 2);
    sqlx::query("INSERT INTO widgets (name) VALUES ('a')")
        .execute(pool)
        .await
        .expect("unqualified names resolve in the service's schema");
    let color: String = sqlx::query_scalar("SELECT color FROM widgets WHERE name = 'a'")
        .fetch_one(pool)
        .await
        .expect("second migration applied");
    assert_eq!(color, "grey");
    let location: String = sqlx::query_scalar(
        "SELECT table_schema::text FROM information_schema.tables WHERE table_name = 'widgets' AND table_schema = $1",
    )
    .bind(&schema)
    .fetch_one(pool)
    .await
    .expect("the table is in the service's schema");
    assert_eq!(location, schema);

    // Starting again on an up-to-date schema changes nothing.
    migrate(pool, &MIGRATOR, &schema).await.expect("idempotent");
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(pool)
        .await
        .expect("cleanup");
}
