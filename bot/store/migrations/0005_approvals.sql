-- The `/ok-to-test` approval of each pull request or merge request that is not trusted.
-- Its runs start only while this row exists and the ok-to-test label is on the pull
-- request. Removing the label deletes the row, so a label added by a user without
-- write access approves nothing.
CREATE TABLE approvals (
    forge           text NOT NULL,                   -- github, gitlab
    repository      text NOT NULL,
    pr_number       integer NOT NULL,
    approved_by     text NOT NULL,                   -- login of the user who commented /ok-to-test
    comment_id      bigint NOT NULL,                 -- the comment or note that approved
    approved_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (forge, repository, pr_number)
);
