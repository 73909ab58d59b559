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

-- Comments that chat-ops acted on. A comment can reach KubeCI through two webhooks (a
-- repository hook and an organisation hook), each with its own delivery id, so the
-- unique delivery id does not stop the second; this key does.
CREATE TABLE handled_comments (
    forge           text NOT NULL,                   -- github, gitlab
    repository      text NOT NULL,
    comment_id      bigint NOT NULL,                 -- the forge's comment or note id
    delivery_pk     bigint NOT NULL,                 -- deliveries.id of the delivery that acted
    handled_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (forge, repository, comment_id)
);
