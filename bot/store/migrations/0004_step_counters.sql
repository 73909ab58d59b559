-- The number of a running step's tasks that have not ended and still decide it (tasks
-- that are running and not detached). A task's completion decrements it without taking
-- the job's lock; only the completion that brings it to zero locks the job and decides
-- the step. It lives in its own table because the step's row is updated under the job
-- lock while that holder waits for task rows, and a completion holding its task row
-- must never wait for the step's row.
CREATE TABLE step_counters (
    step_id         bigint PRIMARY KEY REFERENCES steps (id) ON DELETE CASCADE,
    unfinished      integer NOT NULL
);

-- Steps already running when this migration runs.
INSERT INTO step_counters (step_id, unfinished)
SELECT s.id, count(t.id) FILTER (WHERE t.state IN ('pending', 'running') AND NOT t.detached)
FROM steps s LEFT JOIN tasks t ON t.step_id = s.id
WHERE s.state = 'running'
GROUP BY s.id;
