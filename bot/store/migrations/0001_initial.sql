-- KubeCI schema, version 1.
-- Every state change of a run and the events it emits commit in one transaction.

CREATE TABLE deliveries (
    id              bigserial PRIMARY KEY,
    forge           text NOT NULL,                 -- github, gitlab, manual
    delivery_id     text NOT NULL,                 -- X-GitHub-Delivery, GitLab event UUID, or a body hash
    event           text NOT NULL,                 -- X-GitHub-Event / X-Gitlab-Event value
    action          text,
    repository      text,
    received_at     timestamptz NOT NULL DEFAULT now(),
    outcome         text NOT NULL,                 -- started, ignored, cancelled, comment_stored, ...
    reason          text NOT NULL DEFAULT '',
    payload         jsonb,                         -- kept for comments (chat-ops) and for diagnosis
    UNIQUE (forge, delivery_id)
);

CREATE TABLE runs (
    id              bigserial PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    state           text NOT NULL DEFAULT 'running',  -- running, succeeded, failed, cancelled
    forge           text NOT NULL DEFAULT 'manual',   -- github, gitlab, manual
    repository      text NOT NULL DEFAULT '',
    sha             text NOT NULL DEFAULT '',
    ref             text NOT NULL DEFAULT '',
    pr_number       integer,
    trusted         boolean NOT NULL DEFAULT true,   -- false: server secrets are withheld
    labels          jsonb NOT NULL DEFAULT '{}',
    pipeline        jsonb NOT NULL,                  -- the loaded pipeline document (JSON form of .kubeci.yml)
    source          jsonb NOT NULL DEFAULT '{}',     -- forge routing data: installation id, project id, ...
    delivery_pk     bigint REFERENCES deliveries (id),
    message         text NOT NULL DEFAULT ''
);
CREATE INDEX runs_repo_pr ON runs (repository, pr_number);

CREATE TABLE jobs (
    id              bigserial PRIMARY KEY,
    run_id          bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    position        integer NOT NULL,
    name            text NOT NULL,
    state           text NOT NULL DEFAULT 'pending', -- pending, running, succeeded, failed, cancelled, skipped
    current_step    integer,
    deadline_at     timestamptz,                     -- from the job's timeout_s
    started_at      timestamptz,
    finished_at     timestamptz,
    message         text NOT NULL DEFAULT '',
    -- Superseding key: a new job of the same (repository, PR or branch, job name)
    -- cancels the older active ones.
    group_key       text NOT NULL DEFAULT '',
    spec            jsonb NOT NULL DEFAULT '{}',     -- the job as loaded (rules, timeout, notifiers)
    superseded_by   text,                            -- the SHA of the run that superseded this one
    UNIQUE (run_id, name)
);
CREATE INDEX jobs_group_active ON jobs (group_key) WHERE state IN ('pending', 'running');
CREATE INDEX jobs_active_deadline ON jobs (deadline_at) WHERE state = 'running';

CREATE TABLE steps (
    id              bigserial PRIMARY KEY,
    job_id          bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    position        integer NOT NULL,
    name            text NOT NULL,
    state           text NOT NULL DEFAULT 'pending', -- pending, running, succeeded, failed, cancelled, skipped
    decided_by      text,                            -- 'default' or the handler that ended the step
    spec            jsonb NOT NULL DEFAULT '{}',     -- the step as loaded, without its tasks
    started_at      timestamptz,
    finished_at     timestamptz,
    message         text NOT NULL DEFAULT '',
    UNIQUE (job_id, position)
);

CREATE TABLE tasks (
    id              bigserial PRIMARY KEY,
    step_id         bigint NOT NULL REFERENCES steps (id) ON DELETE CASCADE,
    run_id          bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    position        integer NOT NULL,
    name            text NOT NULL,
    action          text NOT NULL,
    state           text NOT NULL DEFAULT 'pending', -- pending, running, succeeded, failed, cancelled, skipped
    max_attempts    integer NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    allow_failure   boolean NOT NULL DEFAULT false,
    interruptible   boolean NOT NULL DEFAULT true,
    -- Same for every attempt of this task, sent as Idempotency-Key.
    idempotency_key text NOT NULL,
    timeout_s       double precision NOT NULL,       -- one attempt
    spec            jsonb NOT NULL DEFAULT '{}',     -- the task as loaded (arguments unrendered)
    -- True once the task's outcome no longer changes its step (the step ended first).
    detached        boolean NOT NULL DEFAULT false,
    started_at      timestamptz,
    finished_at     timestamptz,
    message         text NOT NULL DEFAULT '',
    UNIQUE (step_id, position)
);
CREATE INDEX tasks_run ON tasks (run_id);

CREATE TABLE attempts (
    id               bigserial PRIMARY KEY,
    task_id          bigint NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    number           integer NOT NULL,               -- 1 for the first attempt
    -- queued, running, waiting (parked until a callback), succeeded, failed, cancelled
    state            text NOT NULL DEFAULT 'queued',
    due_at           timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    lease_expires_at timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    deadline_at      timestamptz,                    -- set at first claim: now + task timeout_s
    started_at       timestamptz,
    finished_at      timestamptz,
    message          text NOT NULL DEFAULT '',
    response_status  integer,
    response_excerpt text,
    external_name    text,                           -- Kubernetes Job name, when there is one
    data             jsonb NOT NULL DEFAULT '{}',    -- action-owned progress data, survives a crash
    UNIQUE (task_id, number)
);
CREATE INDEX attempts_due ON attempts (due_at) WHERE state = 'queued';
CREATE INDEX attempts_lease ON attempts (lease_expires_at) WHERE state = 'running';
CREATE INDEX attempts_waiting ON attempts (deadline_at) WHERE state = 'waiting';

CREATE TABLE callbacks (
    token_hash      bytea PRIMARY KEY,               -- sha256 of the token; the token itself is never stored
    attempt_id      bigint NOT NULL REFERENCES attempts (id) ON DELETE CASCADE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    used_at         timestamptz
);
CREATE INDEX callbacks_attempt ON callbacks (attempt_id);

CREATE TABLE events (
    id              bigserial PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    run_id          bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    job_id          bigint,
    step_id         bigint,
    task_id         bigint,
    scope           text NOT NULL,                   -- run, job, step, task
    name            text NOT NULL,                   -- started, attempt_failed, failed, succeeded, complete, ...
    payload         jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX events_run ON events (run_id, id);

CREATE TABLE logs (
    id              bigserial PRIMARY KEY,
    attempt_id      bigint NOT NULL REFERENCES attempts (id) ON DELETE CASCADE,
    source          text NOT NULL DEFAULT '',        -- pod/container, or 'response'
    created_at      timestamptz NOT NULL DEFAULT now(),
    content         text NOT NULL,
    truncated       boolean NOT NULL DEFAULT false
);
CREATE INDEX logs_attempt ON logs (attempt_id, id);

CREATE TABLE outbox (
    id              bigserial PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    kind            text NOT NULL,                   -- sink kind, e.g. notifier.webhook, github.status
    -- Rows with the same ordering key are sent one at a time, oldest first.
    ordering_key    text NOT NULL,
    -- Rows with the same sink key report one remote object (a status context, a comment).
    sink_key        text NOT NULL,
    payload         jsonb NOT NULL,
    state           text NOT NULL DEFAULT 'pending', -- pending, sent, skipped, dead
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_owner     text,
    lease_expires_at timestamptz,
    last_error      text NOT NULL DEFAULT '',
    sent_at         timestamptz,
    run_id          bigint
);
CREATE INDEX outbox_pending ON outbox (ordering_key, id) WHERE state = 'pending';
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE state = 'pending';

CREATE TABLE sink_state (
    sink_key        text PRIMARY KEY,
    payload_hash    text NOT NULL,                   -- hash of the last payload sent
    remote_id       text,                            -- e.g. the comment id to edit in place
    updated_at      timestamptz NOT NULL DEFAULT now()
);
