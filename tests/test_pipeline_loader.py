"""The `.kubeci.yml` loader: models, defaults, problem positions and robustness."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml
from jsonschema import Draft202012Validator

from pipelines_schema import models
from pipelines_schema.loader import MAX_FILE_BYTES, load_pipeline, validate_text
from pipelines_schema.models import (
    Backoff,
    Job,
    Notifier,
    Pipeline,
    Rule,
    RuleGroup,
    Step,
    Task,
    from_dict,
    to_dict,
)
from pipelines_schema.problems import PipelineError, Problem
from pipelines_schema.schema import load_schema

FULL_EXAMPLE = """\
version: 1
jobs:
  - name: build-and-deploy
    rules:
      all:
        - {label: event, exact: push}
        - any:
            - {label: branch, exact: main}
            - {label: branch, regex: "release/.+"}
        - {label: pr.labels, exact: skip-ci, invert: true}
    timeout_s: 3600
    notifiers:
      - {name: chat, type: slack, url: "${secrets.SLACK_WEBHOOK}", events: [failed, succeeded]}
    steps:
      - name: test
        event_handlers: {failed: set_job_failure}
        notifiers:
          - {name: audit, type: webhook, url: "https://audit.example.com/ci", events: [complete]}
        tasks:
          - name: unit
            action: kubernetes_job
            arguments: {image: "python:3.12", command: [pytest, -q]}
            timeout_s: 600
            retries: 1
            backoff: {initial_s: 5, factor: 2, max_s: 60}
          - name: lint
            action: webhook
            arguments:
              url: "https://lint.example.com/run"
              method: POST
              mode: async
              headers: {Authorization: "Bearer ${secrets.LINT_TOKEN}"}
              body: {sha: "${sha}", callback: "${callback_url}"}
              connect_timeout_s: 5
              request_timeout_s: 20
              success_status: [200, 202]
            allow_failure: true
            event_handlers: {succeeded: set_step_success}
      - name: deploy
        rules: {label: branch, exact: main}
        tasks:
          - name: rollout
            action: kubernetes_deployment
            interruptible: false
            arguments:
              namespace: prod
              name: web
              images: {web: "registry.example.com/web:${sha}"}
              replicas: 3
              env: {LOG_LEVEL: info, DEBUG: null}
              rollback_on_failure: true
            timeout_s: 900
"""

# Keys the example above leaves out: task rules and notifiers, webhook notifier options,
# Slack text, a Job manifest and every inline kubernetes_job argument.
OTHER_KEYS_EXAMPLE = """\
jobs:
  - name: nightly
    rules: {label: trigger, exists: true}
    steps:
      - name: only
        tasks:
          - name: migrate
            action: kubernetes_job
            rules: {label: labels.migrate, exact: "yes"}
            arguments:
              namespace: batch
              manifest:
                apiVersion: batch/v1
                kind: Job
                metadata: {generateName: migrate-}
                spec: {template: {spec: {containers: [{name: m, image: "m:1"}]}}}
            notifiers:
              - name: hook
                type: webhook
                url: "https://hooks.example.com/${run.id}"
                method: PUT
                headers: {X-Run: "${run.url}"}
                body: {task: migrate, labels: ["${pr.labels}"]}
                verify_tls: false
                events: [attempt_failed]
              - name: team
                type: slack
                url: "https://slack.example.com/x"
                text: "run ${run.id}"
                events: [failed]
          - name: inline
            action: kubernetes_job
            arguments:
              image: "busybox:1"
              command: [sh, -c]
              args: ["echo $${HOME}"]
              env: {MODE: fast}
              resources: {limits: {cpu: "1"}}
              service_account: runner
              image_pull_secrets: [registry-pull]
              namespace: ci
"""


def _load(text: str) -> Pipeline:
    return load_pipeline(textwrap.dedent(text))


def _problems(text: str) -> list[Problem]:
    return validate_text(textwrap.dedent(text))


# -- a valid file ----------------------------------------------------------------------


def test_full_example_models() -> None:
    expected = Pipeline(
        version=1,
        jobs=(
            Job(
                name="build-and-deploy",
                rules=RuleGroup(
                    mode="all",
                    members=(
                        Rule(label="event", exact="push"),
                        RuleGroup(
                            mode="any",
                            members=(
                                Rule(label="branch", exact="main"),
                                Rule(label="branch", regex="release/.+"),
                            ),
                        ),
                        Rule(label="pr.labels", exact="skip-ci", invert=True),
                    ),
                ),
                timeout_s=3600.0,
                notifiers=(
                    Notifier(
                        name="chat",
                        type="slack",
                        events=("failed", "succeeded"),
                        url="${secrets.SLACK_WEBHOOK}",
                    ),
                ),
                steps=(
                    Step(
                        name="test",
                        event_handlers={"failed": "set_job_failure"},
                        notifiers=(
                            Notifier(
                                name="audit",
                                type="webhook",
                                events=("complete",),
                                url="https://audit.example.com/ci",
                            ),
                        ),
                        tasks=(
                            Task(
                                name="unit",
                                action="kubernetes_job",
                                arguments={"image": "python:3.12", "command": ["pytest", "-q"]},
                                timeout_s=600.0,
                                retries=1,
                                backoff=Backoff(initial_s=5.0, factor=2.0, max_s=60.0),
                            ),
                            Task(
                                name="lint",
                                action="webhook",
                                arguments={
                                    "url": "https://lint.example.com/run",
                                    "method": "POST",
                                    "mode": "async",
                                    "headers": {"Authorization": "Bearer ${secrets.LINT_TOKEN}"},
                                    "body": {"sha": "${sha}", "callback": "${callback_url}"},
                                    "connect_timeout_s": 5,
                                    "request_timeout_s": 20,
                                    "success_status": [200, 202],
                                },
                                allow_failure=True,
                                event_handlers={"succeeded": "set_step_success"},
                            ),
                        ),
                    ),
                    Step(
                        name="deploy",
                        rules=Rule(label="branch", exact="main"),
                        tasks=(
                            Task(
                                name="rollout",
                                action="kubernetes_deployment",
                                interruptible=False,
                                arguments={
                                    "namespace": "prod",
                                    "name": "web",
                                    "images": {"web": "registry.example.com/web:${sha}"},
                                    "replicas": 3,
                                    "env": {"LOG_LEVEL": "info", "DEBUG": None},
                                    "rollback_on_failure": True,
                                },
                                timeout_s=900.0,
                            ),
                        ),
                    ),
                ),
            ),
        ),
    )
    assert load_pipeline(FULL_EXAMPLE) == expected


def test_other_keys_example_models() -> None:
    pipeline = load_pipeline(OTHER_KEYS_EXAMPLE)
    job = pipeline.job("nightly")
    migrate, inline = job.steps[0].tasks
    hook, team = migrate.notifiers
    assert job.rules == Rule(label="trigger", exists=True)
    assert migrate.rules == Rule(label="labels.migrate", exact="yes")
    assert migrate.arguments["manifest"]["kind"] == "Job"
    assert hook == Notifier(
        name="hook",
        type="webhook",
        events=("attempt_failed",),
        url="https://hooks.example.com/${run.id}",
        method="PUT",
        headers={"X-Run": "${run.url}"},
        body={"task": "migrate", "labels": ["${pr.labels}"]},
        verify_tls=False,
    )
    assert team.text == "run ${run.id}"
    assert inline.arguments["args"] == ["echo $${HOME}"]
    assert inline.arguments["image_pull_secrets"] == ["registry-pull"]


def test_round_trip_through_json() -> None:
    pipeline = load_pipeline(FULL_EXAMPLE)
    stored = json.loads(json.dumps(to_dict(pipeline)))
    assert from_dict(stored) == pipeline


def test_task_defaults() -> None:
    pipeline = _load(
        """\
        jobs:
          - name: j
            steps:
              - name: s
                tasks:
                  - {name: call, action: webhook, arguments: {url: "https://x.example.com"}}
                  - {name: job, action: kubernetes_job, arguments: {image: alpine}}
                  - name: roll
                    action: kubernetes_deployment
                    arguments: {namespace: prod, name: web, replicas: 2}
        """
    )
    job = pipeline.jobs[0]
    call, kube_job, roll = job.steps[0].tasks

    assert pipeline.version == 1
    assert job.timeout_s is None
    assert job.rules is None

    assert call.timeout_s == 3600.0
    assert call.retries == 0
    assert call.backoff == Backoff(initial_s=5.0, factor=2.0, max_s=300.0)
    assert call.allow_failure is False
    assert call.interruptible is True
    assert kube_job.interruptible is True
    assert roll.interruptible is False

    assert call.arguments == {
        "url": "https://x.example.com",
        "method": "POST",
        "mode": "sync",
        "headers": {},
        "connect_timeout_s": 10,
        "request_timeout_s": 30,
    }
    assert kube_job.arguments == {"image": "alpine"}
    assert roll.arguments["rollback_on_failure"] is False


def test_partial_backoff_keeps_other_defaults() -> None:
    pipeline = _load(
        """\
        jobs:
          - name: j
            steps:
              - name: s
                tasks:
                  - name: t
                    action: webhook
                    arguments: {url: "https://x.example.com"}
                    backoff: {initial_s: 0.01}
        """
    )
    assert pipeline.jobs[0].steps[0].tasks[0].backoff == Backoff(0.01, 2.0, 300.0)


def test_anchors_and_merge_keys() -> None:
    pipeline = _load(
        """\
        x-call: &call
          action: webhook
          retries: 2
          arguments: {url: "https://x.example.com"}
        jobs:
          - name: j
            steps:
              - name: s
                tasks:
                  - {<<: *call, name: first}
                  - {<<: *call, name: second, retries: 5}
        """
    )
    first, second = pipeline.jobs[0].steps[0].tasks
    assert first.retries == 2
    assert second.retries == 5
    assert second.arguments["url"] == "https://x.example.com"


def test_aliased_arguments_are_copied() -> None:
    pipeline = _load(
        """\
        jobs:
          - name: j
            steps:
              - name: s
                tasks:
                  - {name: a, action: kubernetes_job, arguments: &args {image: alpine}}
                  - {name: b, action: kubernetes_job, arguments: *args}
        """
    )
    first, second = pipeline.jobs[0].steps[0].tasks
    assert first.arguments == second.arguments
    assert first.arguments is not second.arguments


def test_yaml_11_words_stay_keys() -> None:
    pipeline = _load(
        """\
        jobs:
          - name: j
            steps:
              - name: s
                tasks:
                  - name: t
                    action: kubernetes_job
                    arguments: {image: alpine, env: {on: "1", NO: "0"}}
        """
    )
    assert pipeline.jobs[0].steps[0].tasks[0].arguments["env"] == {"on": "1", "NO": "0"}


def test_bytes_with_bom_load() -> None:
    pipeline = load_pipeline(b"\xef\xbb\xbf" + FULL_EXAMPLE.encode())
    assert pipeline.jobs[0].name == "build-and-deploy"


def test_invalid_file_raises_pipeline_error() -> None:
    with pytest.raises(PipelineError) as caught:
        load_pipeline("jobs: []\n", filename="ci/.kubeci.yml")
    assert caught.value.problems == [
        Problem("ci/.kubeci.yml", 1, 7, "jobs", "the file has no jobs; add at least one job")
    ]
    assert "ci/.kubeci.yml:1:7: jobs:" in str(caught.value)


def test_valid_file_has_no_problems() -> None:
    assert validate_text(FULL_EXAMPLE) == []


# -- problem positions -------------------------------------------------------------------

# A one-task file; each case below replaces one line of it.
BASE = """\
jobs:
  - name: build
    steps:
      - name: test
        tasks:
          - name: unit
            action: webhook
            arguments: {url: "https://ci.example.com/run"}
"""


def _variant(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new)


# (case, file text, line, column, path, words the message must contain)
POSITION_CASES = [
    (
        "unknown action",
        _variant("action: webhook", "action: kubernetes-job"),
        7,
        21,
        "jobs[0].steps[0].tasks[0].action",
        "unknown action 'kubernetes-job'; expected one of webhook, kubernetes_job, "
        "kubernetes_deployment",
    ),
    (
        "unknown task key",
        _variant("action: webhook", "action: webhook\n            timeout: 5"),
        8,
        13,
        "jobs[0].steps[0].tasks[0].timeout",
        "unknown key 'timeout' in task",
    ),
    (
        "unknown top-level key",
        "job:\n  - x\n" + BASE,
        1,
        1,
        "job",
        "unknown key 'job' in the top level",
    ),
    (
        "job event handlers",
        _variant("steps:\n", "event_handlers: {failed: set_job_failure}\n    steps:\n"),
        3,
        5,
        "jobs[0].event_handlers",
        "event_handlers are not allowed on a job",
    ),
    (
        "wrong type",
        _variant("action: webhook", "action: webhook\n            retries: many"),
        8,
        22,
        "jobs[0].steps[0].tasks[0].retries",
        "retries must be an integer, got string 'many'",
    ),
    (
        "invalid job name",
        _variant("name: build", "name: Build_1"),
        2,
        11,
        "jobs[0].name",
        "invalid job name 'Build_1'",
    ),
    (
        "missing task name",
        _variant("          - name: unit\n            action", "          - action"),
        6,
        13,
        "jobs[0].steps[0].tasks[0]",
        "missing required key 'name' in task",
    ),
    (
        "duplicate job name",
        BASE + BASE.removeprefix("jobs:\n"),
        9,
        11,
        "jobs[1].name",
        "duplicate job name 'build'",
    ),
    (
        "duplicate step name",
        BASE + BASE.split("    steps:\n")[1],
        9,
        15,
        "jobs[0].steps[1].name",
        "duplicate step name 'test'",
    ),
    (
        "duplicate task name",
        BASE + BASE.split("        tasks:\n")[1],
        9,
        19,
        "jobs[0].steps[0].tasks[1].name",
        "duplicate task name 'unit'",
    ),
    (
        "empty steps",
        "jobs:\n  - name: build\n    steps: []\n",
        3,
        12,
        "jobs[0].steps",
        "the job has no steps",
    ),
    (
        "empty tasks",
        "jobs:\n  - name: build\n    steps:\n      - name: s\n        tasks: []\n",
        5,
        16,
        "jobs[0].steps[0].tasks",
        "the step has no tasks",
    ),
    (
        "duplicate yaml key",
        _variant("action: webhook", "action: webhook\n            action: webhook"),
        8,
        13,
        "jobs[0].steps[0].tasks[0].action",
        "duplicate key 'action'; the same key is already at line 7, column 13",
    ),
    (
        "handler event unknown",
        _variant(
            "action: webhook",
            "action: webhook\n            event_handlers: {done: set_step_failure}",
        ),
        8,
        30,
        "jobs[0].steps[0].tasks[0].event_handlers.done",
        "unknown handler event 'done'; handlers take failed or succeeded",
    ),
    (
        "handler action of another level",
        _variant(
            "action: webhook",
            "action: webhook\n            event_handlers: {failed: set_job_failure}",
        ),
        8,
        38,
        "jobs[0].steps[0].tasks[0].event_handlers.failed",
        "'set_job_failure' is not allowed on a task",
    ),
    (
        "step handler action of another level",
        _variant("tasks:\n", "event_handlers: {succeeded: set_step_success}\n        tasks:\n"),
        5,
        37,
        "jobs[0].steps[0].event_handlers.succeeded",
        "'set_step_success' is not allowed on a step",
    ),
    (
        "notifier event of another level",
        _variant(
            "steps:\n",
            "notifiers: [{name: n, type: slack, url: 'https://s.example.com', "
            "events: [attempt_failed]}]\n    steps:\n",
        ),
        3,
        79,
        "jobs[0].notifiers[0].events[0]",
        "unknown job event 'attempt_failed'",
    ),
    (
        "notifier unknown type",
        _variant(
            "steps:\n",
            "notifiers: [{name: n, type: email, url: 'https://s.example.com', "
            "events: [failed]}]\n    steps:\n",
        ),
        3,
        33,
        "jobs[0].notifiers[0].type",
        "unknown notifier type 'email'; expected one of webhook, slack",
    ),
    (
        "slack notifier with headers",
        _variant(
            "steps:\n",
            "notifiers: [{name: n, type: slack, url: 'https://s.example.com', "
            "events: [failed], headers: {}}]\n    steps:\n",
        ),
        3,
        88,
        "jobs[0].notifiers[0].headers",
        "unknown key 'headers' in slack notifier",
    ),
    (
        "invalid regex",
        _variant("steps:\n", "rules: {label: branch, regex: 'release/(.+'}\n    steps:\n"),
        3,
        35,
        "jobs[0].rules.regex",
        "invalid regex 'release/(.+'",
    ),
    (
        "rule with two tests",
        _variant("steps:\n", "rules: {label: branch, exact: a, exists: true}\n    steps:\n"),
        3,
        38,
        "jobs[0].rules.exists",
        "a rule has one test, but this one has both 'exact' and 'exists'",
    ),
    (
        "rule without a test",
        _variant("steps:\n", "rules: {label: branch}\n    steps:\n"),
        3,
        12,
        "jobs[0].rules",
        "the rule on label 'branch' needs one of exact, exists or regex",
    ),
    (
        "rule exact not a string",
        _variant("steps:\n", "rules: {label: fork, exact: false}\n    steps:\n"),
        3,
        33,
        "jobs[0].rules.exact",
        'exact must be a string, got false; quote it to make it a string: "false"',
    ),
    (
        "nested rule unknown key",
        _variant(
            "steps:\n",
            "rules:\n      any:\n        - all:\n            - {label: a, exists: true, "
            "inverse: true}\n    steps:\n",
        ),
        6,
        40,
        "jobs[0].rules.any[0].all[0].inverse",
        "unknown key 'inverse' in rule",
    ),
    (
        "empty rule group",
        _variant("steps:\n", "rules: {all: []}\n    steps:\n"),
        3,
        18,
        "jobs[0].rules.all",
        "all is empty; list at least one rule",
    ),
    (
        "rule group with both modes",
        _variant(
            "steps:\n",
            "rules: {all: [{label: a, exists: true}], any: [{label: b, exists: true}]}\n"
            "    steps:\n",
        ),
        3,
        46,
        "jobs[0].rules.any",
        "a rule group contains either 'all' or 'any', not both",
    ),
    (
        "unknown placeholder",
        _variant('{url: "https://ci.example.com/run"}', '{url: "https://x.example.com/${brnach}"}'),
        8,
        30,
        "jobs[0].steps[0].tasks[0].arguments.url",
        "unknown placeholder ${brnach} (did you mean ${branch}?)",
    ),
    (
        "callback url in sync webhook",
        _variant(
            '{url: "https://ci.example.com/run"}',
            '{url: "https://x.example.com", body: "${callback_url}"}',
        ),
        8,
        61,
        "jobs[0].steps[0].tasks[0].arguments.body",
        "${callback_url} is only available in the arguments of a webhook task with mode: async",
    ),
    (
        "unclosed placeholder",
        _variant('{url: "https://ci.example.com/run"}', '{url: "https://x.example.com/${sha"}'),
        8,
        30,
        "jobs[0].steps[0].tasks[0].arguments.url",
        "unclosed placeholder '${sha'",
    ),
    (
        "webhook argument unknown",
        _variant(
            '{url: "https://ci.example.com/run"}', '{url: "https://x.example.com", verb: GET}'
        ),
        8,
        55,
        "jobs[0].steps[0].tasks[0].arguments.verb",
        "unknown key 'verb' in webhook arguments",
    ),
    (
        "webhook argument missing url",
        _variant('{url: "https://ci.example.com/run"}', "{method: GET}"),
        8,
        24,
        "jobs[0].steps[0].tasks[0].arguments",
        "missing required key 'url' in webhook arguments",
    ),
    (
        "webhook mode unknown",
        _variant(
            '{url: "https://ci.example.com/run"}', '{url: "https://x.example.com", mode: later}'
        ),
        8,
        61,
        "jobs[0].steps[0].tasks[0].arguments.mode",
        "unknown mode 'later'; expected one of sync, async",
    ),
    (
        "webhook header not a string",
        _variant(
            '{url: "https://ci.example.com/run"}',
            '{url: "https://x.example.com", headers: {X-Count: 5}}',
        ),
        8,
        74,
        "jobs[0].steps[0].tasks[0].arguments.headers.X-Count",
        "X-Count must be a string, got integer 5",
    ),
    (
        "webhook url scheme",
        _variant('{url: "https://ci.example.com/run"}', '{url: "ftp://x.example.com"}'),
        8,
        30,
        "jobs[0].steps[0].tasks[0].arguments.url",
        "must start with http:// or https://",
    ),
    (
        "kubernetes_job without image",
        _variant(
            'action: webhook\n            arguments: {url: "https://ci.example.com/run"}',
            "action: kubernetes_job\n            arguments: {command: [ls]}",
        ),
        8,
        24,
        "jobs[0].steps[0].tasks[0].arguments",
        "missing required key 'image' in kubernetes_job arguments",
    ),
    (
        "kubernetes_job manifest with image",
        _variant(
            'action: webhook\n            arguments: {url: "https://ci.example.com/run"}',
            "action: kubernetes_job\n            arguments: {image: a, manifest: "
            "{apiVersion: batch/v1, kind: Job, spec: {template: {}}}}",
        ),
        8,
        25,
        "jobs[0].steps[0].tasks[0].arguments.image",
        "'image' cannot be combined with 'manifest'",
    ),
    (
        "kubernetes_job manifest of another kind",
        _variant(
            'action: webhook\n            arguments: {url: "https://ci.example.com/run"}',
            "action: kubernetes_job\n            arguments: {manifest: "
            "{apiVersion: apps/v1, kind: Job, spec: {template: {}}}}",
        ),
        8,
        48,
        "jobs[0].steps[0].tasks[0].arguments.manifest.apiVersion",
        "apiVersion must be \"batch/v1\", got string 'apps/v1'",
    ),
    (
        "kubernetes_job manifest without spec",
        _variant(
            'action: webhook\n            arguments: {url: "https://ci.example.com/run"}',
            "action: kubernetes_job\n            arguments: {manifest: "
            "{apiVersion: batch/v1, kind: Job}}",
        ),
        8,
        35,
        "jobs[0].steps[0].tasks[0].arguments.manifest",
        "missing required key 'spec' in 'manifest'",
    ),
    (
        "kubernetes_job command not a list",
        _variant(
            'action: webhook\n            arguments: {url: "https://ci.example.com/run"}',
            "action: kubernetes_job\n            arguments: {image: a, command: pytest}",
        ),
        8,
        44,
        "jobs[0].steps[0].tasks[0].arguments.command",
        "command must be a list, got string 'pytest'",
    ),
    (
        "kubernetes_job callback placeholder",
        _variant(
            'action: webhook\n            arguments: {url: "https://ci.example.com/run"}',
            'action: kubernetes_job\n            arguments: {image: a, args: ["${callback_url}"]}',
        ),
        8,
        42,
        "jobs[0].steps[0].tasks[0].arguments.args[0]",
        "KUBECI_CALLBACK_URL",
    ),
    (
        "deployment negative replicas",
        _variant(
            'action: webhook\n            arguments: {url: "https://ci.example.com/run"}',
            "action: kubernetes_deployment\n            arguments: {namespace: a, name: b, "
            "replicas: -1}",
        ),
        8,
        58,
        "jobs[0].steps[0].tasks[0].arguments.replicas",
        "replicas must be at least 0, got integer -1",
    ),
    (
        "deployment changes nothing",
        _variant(
            'action: webhook\n            arguments: {url: "https://ci.example.com/run"}',
            "action: kubernetes_deployment\n            arguments: {namespace: a, name: b}",
        ),
        8,
        24,
        "jobs[0].steps[0].tasks[0].arguments",
        "set at least one of images, replicas or env",
    ),
    (
        "deployment container name",
        _variant(
            'action: webhook\n            arguments: {url: "https://ci.example.com/run"}',
            "action: kubernetes_deployment\n            arguments: {namespace: a, name: b, "
            "images: {Web_1: 'w:1'}}",
        ),
        8,
        57,
        "jobs[0].steps[0].tasks[0].arguments.images.Web_1",
        "invalid container name 'Web_1'",
    ),
    (
        "unsupported version",
        "version: 2\n" + BASE,
        1,
        10,
        "version",
        "unsupported version 2; this KubeCI reads version 1",
    ),
    (
        "timeout not positive",
        _variant("action: webhook", "action: webhook\n            timeout_s: 0"),
        8,
        24,
        "jobs[0].steps[0].tasks[0].timeout_s",
        "timeout_s must be greater than 0",
    ),
    (
        "invalid yaml",
        _variant("action: webhook", "action: [webhook"),
        8,
        22,
        "",
        "invalid YAML:",
    ),
    (
        "tab indentation",
        "jobs:\n\t- name: x\n",
        2,
        1,
        "",
        "indent with spaces, not tabs",
    ),
    (
        "unicode columns",
        _variant("name: unit", 'name: "ünït ✓"\n            retries: x'),
        7,
        22,
        "jobs[0].steps[0].tasks[0].retries",
        "retries must be an integer",
    ),
    (
        "undefined alias",
        _variant("action: webhook", "action: *hook"),
        7,
        21,
        "jobs[0].steps[0].tasks[0].action",
        "undefined alias '*hook'",
    ),
    (
        "unsupported tag",
        _variant("action: webhook", "action: !!binary d2ViaG9vaw=="),
        7,
        21,
        "jobs[0].steps[0].tasks[0].action",
        "unsupported YAML tag '!!binary'",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "column", "path", "words"),
    [case[1:] for case in POSITION_CASES],
    ids=[case[0] for case in POSITION_CASES],
)
def test_problem_position(text: str, line: int, column: int, path: str, words: str) -> None:
    problems = validate_text(text)
    assert len(problems) == 1, [problem.format() for problem in problems]
    problem = problems[0]
    assert words in problem.message
    assert (problem.line, problem.column) == (line, column), problem.format()
    assert problem.path == path
    assert problem.file == ".kubeci.yml"


def test_every_problem_at_once() -> None:
    problems = _problems(
        """\
        version: 3
        jobs:
          - name: Build
            steps:
              - name: s
                tasks:
                  - name: t
                    action: webhok
                    arguments: {}
                    retries: -1
                  - name: t
                    action: webhook
                    arguments: {url: "https://x.example.com/${nope}"}
                    allow_failure: sometimes
          - name: other
            steps: []
        """
    )
    found = {(problem.line, problem.column, problem.path) for problem in problems}
    assert found == {
        (1, 10, "version"),
        (3, 11, "jobs[0].name"),
        (8, 21, "jobs[0].steps[0].tasks[0].action"),
        (10, 22, "jobs[0].steps[0].tasks[0].retries"),
        (11, 19, "jobs[0].steps[0].tasks[1].name"),
        (13, 30, "jobs[0].steps[0].tasks[1].arguments.url"),
        (14, 28, "jobs[0].steps[0].tasks[1].allow_failure"),
        (16, 12, "jobs[1].steps"),
    }


def test_problems_sorted_by_position() -> None:
    problems = _problems(
        """\
        jobs:
          - name: B
            steps: []
          - name: C
            steps: []
        """
    )
    positions = [(problem.line, problem.column) for problem in problems]
    assert positions == sorted(positions)


def test_known_placeholders_accepted() -> None:
    arguments = ", ".join(
        f'"${{{name}}}"'
        for name in (
            "sha",
            "pr.number",
            "comment.author",
            "run.id",
            "run.url",
            "labels.env",
            "secrets.API_TOKEN",
            "callback_url",
        )
    )
    text = _variant(
        '{url: "https://ci.example.com/run"}',
        f'{{url: "https://x.example.com", mode: async, body: [{arguments}, "$${{literal}}"]}}',
    )
    assert validate_text(text) == []


def test_rule_regex_in_runtime_syntax_accepted() -> None:
    # `\p{...}` is valid for the `regex` package that matches rules, not for `re`.
    text = _variant("steps:\n", "rules: {label: branch, regex: '\\p{Lu}+'}\n    steps:\n")
    assert validate_text(text) == []


# (case, escape in a double-quoted string, the character it writes)
UNSTORABLE_ESCAPES = [
    ("nul", "\\0", "U+0000"),
    ("escape character", "\\e", "U+001B"),
    ("hex control", "\\x01", "U+0001"),
]


@pytest.mark.parametrize(
    ("escape", "code"),
    [case[1:] for case in UNSTORABLE_ESCAPES],
    ids=[case[0] for case in UNSTORABLE_ESCAPES],
)
def test_control_escape_in_value_rejected(escape: str, code: str) -> None:
    text = _variant('run"}', f'run", body: "a{escape}b"}}')
    problems = validate_text(text)
    assert len(problems) == 1, problems
    assert problems[0].path == "jobs[0].steps[0].tasks[0].arguments.body"
    assert f"invalid character {code}" in problems[0].message
    line = text.splitlines()[7]
    assert (problems[0].line, problems[0].column) == (8, line.index('"a') + 1)


def test_control_escape_in_key_rejected() -> None:
    text = _variant('run"}', 'run", headers: {"X-A\\0": "1"}}')
    problems = validate_text(text)
    assert len(problems) == 1, problems
    assert problems[0].path == 'jobs[0].steps[0].tasks[0].arguments.headers["X-A\\u0000"]'
    assert "invalid character U+0000" in problems[0].message
    assert "in the key" in problems[0].message


def test_allowed_escapes_accepted() -> None:
    text = _variant('run"}', 'run", body: "tab\\tline\\nreturn\\r\\u00e9"}')
    assert validate_text(text) == []


def test_nul_escape_raises_pipeline_error() -> None:
    with pytest.raises(PipelineError) as caught:
        load_pipeline(_variant('run"}', 'run", body: "a\\0b"}'))
    assert "arguments.body" in str(caught.value)


def test_nested_placeholder_rejected() -> None:
    text = _variant('"https://ci.example.com/run"', '"https://x.example.com/${labels.${x}}"')
    problems = validate_text(text)
    assert len(problems) == 1, problems
    assert problems[0].path == "jobs[0].steps[0].tasks[0].arguments.url"
    assert "nested placeholder: '${labels.${x'" in problems[0].message


def test_version_true_written_as_yaml() -> None:
    problems = validate_text("version: true\n" + BASE)
    messages = " ".join(problem.message for problem in problems)
    assert "unsupported version true;" in messages
    assert "True" not in messages


# (case, task key and value, the value, expected words, loadable fix)
EXPONENT_CASES = [
    (
        "number",
        "backoff: {factor: 1e308}",
        "1e308",
        "write 1.0e+308",
        "backoff: {factor: 1.0e+308}",
    ),
    ("unsigned exponent", "timeout_s: 2.5e3", "2.5e3", "write 2.5e+3", "timeout_s: 2.5e+3"),
    ("negative exponent", "timeout_s: 5e-1", "5e-1", "write 5.0e-1", "timeout_s: 5.0e-1"),
    ("integer", "retries: 1e1", "1e1", "write 10", "retries: 10"),
]


def _task_line(line: str) -> str:
    return _variant("action: webhook\n", f"action: webhook\n            {line}\n")


@pytest.mark.parametrize(
    ("line", "written", "words", "fixed"),
    [case[1:] for case in EXPONENT_CASES],
    ids=[case[0] for case in EXPONENT_CASES],
)
def test_exponent_without_dot_hint(line: str, written: str, words: str, fixed: str) -> None:
    problems = validate_text(_task_line(line))
    assert len(problems) == 1, problems
    assert f"YAML reads {written} as a string" in problems[0].message
    assert words in problems[0].message
    assert validate_text(_task_line(fixed)) == []


def test_exponent_hint_only_for_numbers() -> None:
    text = _variant('run"}', 'run", headers: {X-Size: 1e3}}')
    assert validate_text(text) == []


# -- input that is not a pipeline ---------------------------------------------------------

JUNK_CASES = [
    ("empty", "", "the file is empty"),
    ("comments only", "# nothing\n", "the file is empty"),
    ("null document", "~\n", "the file is empty"),
    ("top-level list", "- jobs\n", "the top level must be a mapping"),
    ("top-level string", "jobs", "the top level must be a mapping"),
    ("two documents", BASE + "---\n" + BASE, "more than one YAML document"),
    ("nul character", "jobs: \x00\n", "invalid character U+0000"),
    ("lone surrogate", "jobs: '\ud800'\n", "invalid character U+D800"),
    ("complex key", "? [a]\n: b\n" + BASE, "a mapping key must be a plain string"),
    ("huge integer", "version: " + "9" * 5000 + "\n" + BASE, "invalid !!int value"),
    ("infinity", "version: .inf\n" + BASE, "is not a finite number"),
    ("python tag", "jobs: !!python/object:os.system x\n", "unsupported YAML tag"),
    ("recursive alias", "x-a: &a [*a]\n" + BASE, "refers to a node that contains it"),
    ("deep nesting", "x-a: " + "[" * 150 + "]" * 150 + "\n" + BASE, "nests deeper than"),
    ("flow nesting over libyaml limit", "x-a: " + "[" * 2000, "invalid YAML"),
    (
        "alias bomb",
        "x-a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"x-{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n"
            for i in range(6)
        )
        + BASE,
        "once aliases are expanded",
    ),
    ("bad merge value", "jobs:\n  - <<: 5\n", "the merge key '<<' takes a mapping"),
]


@pytest.mark.parametrize(
    ("text", "words"),
    [case[1:] for case in JUNK_CASES],
    ids=[case[0] for case in JUNK_CASES],
)
def test_junk_gives_problem(text: str, words: str) -> None:
    problems = validate_text(text)
    assert any(words in problem.message for problem in problems), problems
    assert all(problem.line >= 1 for problem in problems)
    assert all(problem.column >= 1 for problem in problems)


def test_invalid_utf8_position() -> None:
    problems = validate_text(b"jobs:\n  - name: \xff\n")
    assert [(problem.line, problem.column) for problem in problems] == [(2, 11)]
    assert "not valid UTF-8" in problems[0].message


def test_binary_junk_never_raises() -> None:
    junk = bytes(range(256)) * 40
    problems = validate_text(junk)
    assert problems


def test_size_limit() -> None:
    text = BASE + "#" * MAX_FILE_BYTES
    problems = validate_text(text)
    assert len(problems) == 1
    assert "over the limit of 1048576 bytes" in problems[0].message


def test_mutated_example_never_raises() -> None:
    # Deterministic damage: one character replaced at every 29th offset of the example.
    for offset in range(0, len(FULL_EXAMPLE), 29):
        for replacement in ("", ":", "[", "&x ", "*x", "${", "\t", "-", "'"):
            text = FULL_EXAMPLE[:offset] + replacement + FULL_EXAMPLE[offset + 1 :]
            for problem in validate_text(text):
                assert problem.line >= 1
                assert problem.column >= 1


# -- the JSON Schema ---------------------------------------------------------------------


def test_schema_is_valid_draft_2020_12() -> None:
    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_accepts_examples() -> None:
    validator = Draft202012Validator(load_schema())
    for example in (FULL_EXAMPLE, OTHER_KEYS_EXAMPLE):
        assert list(validator.iter_errors(yaml.safe_load(example))) == []


def test_schema_rejects_unknown_action() -> None:
    validator = Draft202012Validator(load_schema())
    document = yaml.safe_load(_variant("action: webhook", "action: kubernetes-job"))
    assert not validator.is_valid(document)


def test_schema_rejects_rule_with_two_tests() -> None:
    validator = Draft202012Validator(load_schema())
    document = yaml.safe_load(
        _variant("steps:\n", "rules: {label: a, exact: b, regex: c}\n    steps:\n")
    )
    assert not validator.is_valid(document)


def test_schema_rejects_task_event_on_job() -> None:
    validator = Draft202012Validator(load_schema())
    notifier = "notifiers: [{name: n, type: slack, url: 'https://s.example.com', events: [%s]}]"
    for event, valid in (("failed", True), ("attempt_failed", False)):
        text = _variant("steps:\n", notifier % event + "\n    steps:\n")
        assert validator.is_valid(yaml.safe_load(text)) is valid, event


def test_schema_events_match_models() -> None:
    definitions = load_schema()["$defs"]
    for level, events in (
        ("job", models.JOB_EVENTS),
        ("step", models.STEP_EVENTS),
        ("task", models.TASK_EVENTS),
    ):
        items = definitions[f"{level}_notifiers"]["items"]
        assert items["properties"]["events"]["items"]["enum"] == list(events)


def test_schema_handlers_match_models() -> None:
    definitions = load_schema()["$defs"]
    step = definitions["step_event_handlers"]
    task = definitions["task_event_handlers"]
    assert step["propertyNames"]["enum"] == list(models.HANDLER_EVENTS)
    assert step["additionalProperties"]["enum"] == list(models.STEP_HANDLER_ACTIONS)
    assert task["additionalProperties"]["enum"] == list(models.TASK_HANDLER_ACTIONS)


def test_schema_actions_match_models() -> None:
    task = load_schema()["$defs"]["task"]
    assert task["properties"]["action"]["enum"] == list(models.ACTIONS)


def test_notifier_event_placeholders_accepted() -> None:
    text = (
        "jobs:\n  - name: a\n    notifiers:\n"
        "      - {name: n, type: slack, url: 'https://hooks.example.com/x',"
        " text: '${event.job} ${event.name}', events: [failed]}\n"
        "    steps:\n      - name: s\n        tasks:\n"
        "          - {name: t, action: webhook, arguments: {url: 'https://x.example.com'}}\n"
    )
    assert validate_text(text) == []


def test_event_placeholder_rejected_in_arguments() -> None:
    text = (
        "jobs:\n  - name: a\n    steps:\n      - name: s\n        tasks:\n"
        "          - {name: t, action: webhook,"
        " arguments: {url: 'https://x.example.com/${event.name}'}}\n"
    )
    problems = validate_text(text)
    assert len(problems) == 1
    assert "event.name" in problems[0].message
