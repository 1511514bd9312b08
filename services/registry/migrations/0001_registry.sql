-- The model registry: registered models, immutable versions with their files and lineage,
-- movable aliases and the audit history of every alias move.

CREATE TABLE models (
    id           UUID PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    description  TEXT NOT NULL DEFAULT '',
    tags         JSONB NOT NULL DEFAULT '{}'::jsonb,
    -- The number the next version gets. Taken under the model row's lock in the same
    -- transaction that inserts the version, so numbers have no gaps and no duplicates.
    next_version INTEGER NOT NULL DEFAULT 1,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE versions (
    id                UUID PRIMARY KEY,
    model_id          UUID NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    version           INTEGER NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('pending', 'ready', 'failed')),
    status_message    TEXT NOT NULL DEFAULT '',
    format            TEXT NOT NULL,
    digest            TEXT NOT NULL DEFAULT '',
    -- {"base_model": {"name", "version", "digest"}, "dataset_version_id", "training_job_id",
    --  "parent_version": {"name", "version", "digest"}}
    lineage           JSONB NOT NULL DEFAULT '{}'::jsonb,
    hyperparameters   JSONB NOT NULL DEFAULT '{}'::jsonb,
    metrics           JSONB NOT NULL DEFAULT '{}'::jsonb,
    chat_template     TEXT NOT NULL DEFAULT '',
    architecture      TEXT NOT NULL DEFAULT '',
    context_length    INTEGER NOT NULL DEFAULT 0,
    parameter_count   BIGINT NOT NULL DEFAULT 0,
    description       TEXT NOT NULL DEFAULT '',
    tags              JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_by        TEXT NOT NULL DEFAULT '',
    client_request_id TEXT,
    -- sha256 of the creating request, so that a retry with the same id but different
    -- content is refused rather than silently answered with the first version.
    request_digest    TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    finalized_at      TIMESTAMPTZ,
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (model_id, version),
    UNIQUE (model_id, client_request_id)
);
CREATE INDEX versions_created_at ON versions (created_at DESC);

CREATE TABLE version_files (
    version_id   UUID NOT NULL REFERENCES versions (id) ON DELETE CASCADE,
    path         TEXT NOT NULL,
    size_bytes   BIGINT NOT NULL,
    sha256       TEXT NOT NULL,
    content_type TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (version_id, path)
);

CREATE TABLE aliases (
    model_id   UUID NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    alias      TEXT NOT NULL,
    -- RESTRICT: a version an alias points to cannot be deleted.
    version_id UUID NOT NULL REFERENCES versions (id) ON DELETE RESTRICT,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_by TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (model_id, alias)
);

-- Append-only audit of alias moves; kept when the model is deleted.
CREATE TABLE alias_events (
    sequence     BIGSERIAL PRIMARY KEY,
    model_name   TEXT NOT NULL,
    alias        TEXT NOT NULL,
    from_version INTEGER,
    to_version   INTEGER,
    actor        TEXT NOT NULL DEFAULT '',
    reason       TEXT NOT NULL DEFAULT '',
    at           TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX alias_events_by_alias ON alias_events (model_name, alias, sequence);
