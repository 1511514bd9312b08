-- The gateway's API keys. Only a sha256 of each secret is stored; the secret is shown once.
CREATE TABLE api_keys (
    id              UUID PRIMARY KEY,
    name            TEXT NOT NULL,
    prefix          TEXT NOT NULL,
    secret_sha256   TEXT NOT NULL UNIQUE,
    allowed_models  TEXT[] NOT NULL DEFAULT '{}',
    requests_per_minute INTEGER NOT NULL DEFAULT 0,
    tokens_per_minute   INTEGER NOT NULL DEFAULT 0,
    admin           BOOLEAN NOT NULL DEFAULT false,
    metadata        JSONB NOT NULL DEFAULT '{}'::jsonb,
    expires_at      TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at      TIMESTAMPTZ,
    revoke_reason   TEXT NOT NULL DEFAULT '',
    last_used_at    TIMESTAMPTZ
);

CREATE INDEX api_keys_created_at ON api_keys (created_at DESC, id DESC);
