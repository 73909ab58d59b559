"""Large pipelines built in code: jobs x steps x webhook tasks aimed at the bench target."""

from __future__ import annotations

import copy
from typing import Any

from pipelines_schema.loader import load_pipeline
from pipelines_schema.models import Pipeline, from_dict, to_dict

_ONE_TASK = """
version: 1
jobs:
  - name: job
    steps:
      - name: step
        tasks:
          - name: task
            action: webhook
            timeout_s: {timeout_s}
            arguments:
              url: "${{labels.target}}/{path}"
              mode: {mode}
              body: {{run: "${{run.id}}"}}
"""


def webhook_pipeline(
    jobs: int, steps: int, tasks: int, *, mode: str = "sync", timeout_s: float = 600.0
) -> Pipeline:
    """`jobs` jobs of `steps` serial steps of `tasks` parallel webhook tasks.

    Sync tasks POST to the target's /sync, async ones to /async. The loader checks one
    task; the rest are copies of it, which keeps building 10,000 tasks fast.
    """
    path = "sync" if mode == "sync" else "async"
    text = _ONE_TASK.format(timeout_s=timeout_s, path=path, mode=mode)
    data = to_dict(load_pipeline(text))
    job = data["jobs"][0]
    task = job["steps"][0]["tasks"][0]
    data["jobs"] = [_job(job, task, j, steps, tasks) for j in range(jobs)]
    return from_dict(data)


def _job(
    job: dict[str, Any], task: dict[str, Any], j: int, steps: int, tasks: int
) -> dict[str, Any]:
    step = {key: value for key, value in job["steps"][0].items() if key != "tasks"}
    return {
        **job,
        "name": f"job-{j:03d}",
        "steps": [
            {
                **copy.deepcopy(step),
                "name": f"step-{s:02d}",
                "tasks": [{**copy.deepcopy(task), "name": f"task-{t:03d}"} for t in range(tasks)],
            }
            for s in range(steps)
        ],
    }
