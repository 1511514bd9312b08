-- Training jobs: the source of truth for every job's state. JetStream only carries the work;
-- whatever a worker reports is written here before the worker gets its answer.

CREATE TABLE jobs (
    id                 UUID PRIMARY KEY,
    -- Idempotency key of the submit (empty → none); see common.proto.
    client_request_id  TEXT,
    -- The JobSpec as submitted with defaults filled in (protobuf bytes) and the request's
    -- fingerprint (sha256 of the spec as submitted) for idempotent retries.
    spec               BYTEA NOT NULL,
    request_sha256     TEXT NOT NULL,
    state              TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    attempt            INTEGER NOT NULL DEFAULT 0,
    max_attempts       INTEGER NOT NULL,
    failure_code       TEXT NOT NULL DEFAULT '',
    failure_message    TEXT NOT NULL DEFAULT '',
    cancel_requested   BOOLEAN NOT NULL DEFAULT false,
    priority           INTEGER NOT NULL DEFAULT 0,
    output_model_name  TEXT NOT NULL,
    base_model_name    TEXT NOT NULL DEFAULT '',
    -- ResolvedModel (protobuf bytes); NULL for from-scratch.
    resolved_base      BYTEA,
    resolved_dataset_version_id TEXT NOT NULL,
    -- ResolvedModel of the registered result; set when succeeded.
    result_version     BYTEA,
    result_metrics     JSONB NOT NULL DEFAULT '{}'::jsonb,
    -- JobProgress (protobuf bytes) of the latest report.
    latest_progress    BYTEA,
    trained_tokens     BIGINT NOT NULL DEFAULT 0,
    worker_id          TEXT NOT NULL DEFAULT '',
    checkpoint_count   INTEGER NOT NULL DEFAULT 0,
    -- Dispatch: the JetStream sequence of the job's work message.
    stream_seq         BIGINT,
    -- Last sign of life from the worker holding the job.
    heartbeat_at       TIMESTAMPTZ,
    deadline           TIMESTAMPTZ,
    -- Next per-job event and log sequence numbers (taken under the job row's lock).
    next_event_seq     BIGINT NOT NULL DEFAULT 1,
    next_log_seq       BIGINT NOT NULL DEFAULT 1,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at         TIMESTAMPTZ,
    finished_at        TIMESTAMPTZ,
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX jobs_client_request_id ON jobs (client_request_id) WHERE client_request_id IS NOT NULL;
CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_state ON jobs (state) WHERE state IN ('queued', 'running');
CREATE INDEX jobs_stream_seq ON jobs (stream_seq);

-- Every event a WatchJob stream sends after its snapshot (JobEvent protobuf bytes).
CREATE TABLE events (
    job_id   UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    sequence BIGINT NOT NULL,
    kind     TEXT NOT NULL,
    event    BYTEA NOT NULL,
    PRIMARY KEY (job_id, sequence)
);

CREATE TABLE logs (
    job_id    UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    sequence  BIGINT NOT NULL,
    time      TIMESTAMPTZ NOT NULL,
    level     INTEGER NOT NULL,
    message   TEXT NOT NULL,
    attempt   INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    PRIMARY KEY (job_id, sequence)
);

CREATE TABLE checkpoints (
    job_id     UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step       BIGINT NOT NULL,
    attempt    INTEGER NOT NULL,
    -- JobCheckpoint protobuf bytes.
    checkpoint BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, step)
);
