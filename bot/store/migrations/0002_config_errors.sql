-- The latest invalid pipeline file of each pull request, shown in its summary comment
-- until a newer run replaces it.
CREATE TABLE config_errors (
    forge           text NOT NULL,                   -- github, gitlab
    repository      text NOT NULL,
    pr_number       integer NOT NULL,
    sha             text NOT NULL,                   -- the commit whose pipeline file is invalid
    problems        jsonb NOT NULL,                  -- [{file, line, column, path, message}]
    run_url         text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (forge, repository, pr_number)
);
