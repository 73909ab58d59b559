-- How many of a running step's tasks have not ended and still decide it (tasks that are
-- running and not detached), split into shards; `tasks.counter_shard` says which shard a
-- started task counts on. A task's completion decrements its shard without taking the
-- job's lock. Only a completion that brings a shard to zero locks the job and checks
-- whether the step is decided. Shards keep concurrent completions of a large step from
-- queueing on one row lock. The counters live in their own table because the step's row
-- is updated under the job lock while that transaction waits for task rows, and a
-- completion that holds its task row must never wait for the step's row.
CREATE TABLE step_counters (
    step_id         bigint NOT NULL REFERENCES steps (id) ON DELETE CASCADE,
    shard           integer NOT NULL,
    unfinished      integer NOT NULL,
    PRIMARY KEY (step_id, shard)
);

-- NULL for tasks started before this migration: their steps are decided under the job
-- lock, as before.
ALTER TABLE tasks ADD COLUMN counter_shard integer;
