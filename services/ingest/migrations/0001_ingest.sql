-- Datasets and their immutable versions. A version row is written only once its shards are
-- in the artifact store, in one transaction with its splits, shards and report, so a reader
-- never sees a half-written version.

CREATE TABLE datasets (
    id           UUID PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    description  TEXT NOT NULL DEFAULT '',
    tags         JSONB NOT NULL DEFAULT '{}'::jsonb,
    -- The number the next version gets, taken under the dataset row's lock.
    next_version INTEGER NOT NULL DEFAULT 1,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE versions (
    id                UUID PRIMARY KEY,
    dataset_id        UUID NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    version           INTEGER NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('processing', 'ready', 'failed')),
    digest            TEXT NOT NULL DEFAULT '',
    -- lmforge.v1.DatasetFormat value used to parse.
    format            INTEGER NOT NULL,
    -- lmforge.v1.IngestConfig as applied (protobuf bytes).
    config            BYTEA NOT NULL,
    record_count      BIGINT NOT NULL,
    source            TEXT NOT NULL DEFAULT '',
    -- The raw upload, kept in the artifact store beside the shards.
    source_sha256     TEXT NOT NULL,
    source_size_bytes BIGINT NOT NULL,
    description       TEXT NOT NULL DEFAULT '',
    client_request_id TEXT,
    -- lmforge.v1.DatasetReport (protobuf bytes; ids and version filled in on read).
    report            BYTEA NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at      TIMESTAMPTZ,
    UNIQUE (dataset_id, version),
    UNIQUE (dataset_id, client_request_id)
);
CREATE INDEX versions_digest ON versions (dataset_id, digest);

CREATE TABLE version_splits (
    version_id   UUID NOT NULL REFERENCES versions (id) ON DELETE CASCADE,
    -- lmforge.v1.DatasetSplit value.
    split        INTEGER NOT NULL,
    record_count BIGINT NOT NULL,
    size_bytes   BIGINT NOT NULL,
    sha256       TEXT NOT NULL,
    token_count  BIGINT NOT NULL,
    PRIMARY KEY (version_id, split)
);

-- Each split is one or more zstd-compressed JSONL shards, content-addressed in the store.
CREATE TABLE version_shards (
    version_id   UUID NOT NULL REFERENCES versions (id) ON DELETE CASCADE,
    split        INTEGER NOT NULL,
    idx          INTEGER NOT NULL,
    sha256       TEXT NOT NULL,
    record_count BIGINT NOT NULL,
    raw_size     BIGINT NOT NULL,
    PRIMARY KEY (version_id, split, idx)
);
CREATE INDEX version_shards_sha256 ON version_shards (sha256);
