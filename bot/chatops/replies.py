"""Texts of chat-ops replies and notices, in Markdown. No I/O.

Every comment KubeCI posts begins with a hidden HTML comment marker, `<!-- kubeci...`
(reporting puts one first in each reply), so KubeCI recognises its own comments and
never acts on a command quoted in them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from bot.chatops.parse import Command
from bot.chatops.pipelines import LoadedPipeline

APPROVAL_MARKER = "<!-- kubeci:ok-to-test -->"
OK_TO_TEST_LABEL = "ok-to-test"
OK_TO_TEST_CONTEXT = "kubeci/ok-to-test"
FORGE_NAMES = {"github": "GitHub", "gitlab": "GitLab"}
# Problems of an invalid pipeline file listed in a reply.
MAX_PROBLEMS = 20
# The maximum number of names (jobs, commands) listed in a reply. Further names are counted.
MAX_LISTED_NAMES = 20

# Any hidden marker of KubeCI's comments (chat-ops replies, run summaries).
_KUBECI_MARKER = re.compile(r"<!--\s*kubeci\b", re.IGNORECASE)

_COMMAND_HELP = (
    ("/retest", "reruns the jobs that failed or were cancelled on the head commit"),
    ("/test <job>", "runs the named jobs on the head commit (several names may follow)"),
    ("/test all", "runs every job on the head commit"),
    ("/cancel", "cancels the running jobs of this pull request"),
    (
        "/ok-to-test",
        f"lets this pull request run: adds the `{OK_TO_TEST_LABEL}` label and runs the head commit",
    ),
    ("/help", "shows this list"),
)
COMMAND_LIST = ", ".join(f"`{usage}`" for usage, _ in _COMMAND_HELP)


def is_kubeci_text(body: str) -> bool:
    """Tell whether `body` contains a marker of a comment KubeCI posted."""
    return _KUBECI_MARKER.search(body) is not None


def short_sha(sha: str) -> str:
    return sha[:7]


def code_list(names: Iterable[str]) -> str:
    """Write names as a comma-separated list of inline code, or "none".

    Only the first MAX_LISTED_NAMES names are written, followed by "and N more".
    """
    quoted = [f"`{name}`" for name in names]
    if not quoted:
        return "none"
    listed = ", ".join(quoted[:MAX_LISTED_NAMES])
    hidden = len(quoted) - MAX_LISTED_NAMES
    return f"{listed} and {hidden} more" if hidden > 0 else listed


def _command_names(commands: Sequence[Command]) -> list[str]:
    """Return the distinct `/name`s of `commands`, in order."""
    return list(dict.fromkeys(f"/{command.name}" for command in commands))


def compose_reply(author: str, paragraphs: Sequence[str]) -> str:
    """Build one reply to `author` out of paragraphs."""
    return "\n\n".join([f"@{author}", *paragraphs])


def help_text(jobs_note: str) -> str:
    rows = "\n".join(f"| `{usage}` | {what} |" for usage, what in _COMMAND_HELP)
    return (
        "KubeCI reads these commands at the start of a line in a pull request comment. "
        "Only users with write access to the repository may use them; `/help` works for "
        f"everyone.\n\n| command | what it does |\n|---|---|\n{rows}\n\n{jobs_note}"
    ).rstrip()


def jobs_note(jobs: Sequence[str], filename: str, sha: str) -> str:
    return f"Jobs in `{filename}` at {short_sha(sha)}: {code_list(jobs)}."


def unknown_commands(commands: Sequence[Command]) -> str:
    names = _command_names(commands)
    verb = "is not a KubeCI command" if len(names) == 1 else "are not KubeCI commands"
    return f"{code_list(names)} {verb}. The commands are {COMMAND_LIST}."


def refusal(commands: Sequence[Command], repository: str) -> str:
    names = code_list(_command_names(commands))
    pronoun = "it" if len(commands) == 1 else "them"
    return (
        f"Only users with write access to {repository} may use {names}, so KubeCI "
        f"ignored {pronoun}. Ask a user with write access to comment the command. A pull "
        "request that waits for approval runs once such a user comments `/ok-to-test`."
    )


def pipeline_problem(loaded: LoadedPipeline) -> str:
    """Explain why the head commit has no usable pipeline file."""
    sha = short_sha(loaded.sha)
    if not loaded.filename:
        return f"There is no `.kubeci.yml` at {sha}, so there is nothing to run."
    count = len(loaded.problems)
    listed = "\n".join(f"- {problem.format()}" for problem in loaded.problems[:MAX_PROBLEMS])
    more = f"\n- and {count - MAX_PROBLEMS} more" if count > MAX_PROBLEMS else ""
    return (
        f"`{loaded.filename}` at {sha} is invalid, so nothing runs. Fix these problems "
        f"and push again:\n\n{listed}{more}"
    )


def rules_do_not_match(names: Sequence[str]) -> str:
    return (
        f"The rules of {code_list(names)} do not match this pull request (its labels have "
        "`trigger: comment`), so these jobs do not run."
    )


def already_ran(sha: str) -> str:
    return (
        f"The head commit {sha} has run already, so `/ok-to-test` started no run. "
        "`/retest` or `/test <job>` runs it again."
    )


def nothing_to_retest(sha: str) -> str:
    return (
        f"Nothing to retest: no job failed or was cancelled on {sha}. "
        "`/test <job>` or `/test all` runs jobs again anyway."
    )


def test_needs_job(jobs: Sequence[str]) -> str:
    return f"`/test` needs a job name or `all`, such as `/test all`. The jobs: {code_list(jobs)}."


def unknown_jobs(names: Sequence[str], jobs: Sequence[str]) -> str:
    names = list(dict.fromkeys(names))
    noun = "job" if len(names) == 1 else "jobs"
    return (
        f"The pipeline file has no {noun} {code_list(names)}, so `/test` ran nothing. "
        f"The jobs: {code_list(jobs)}, or `all`."
    )


def approval_notice(reason: str, repository: str) -> str:
    """Build the one notice on a pull request that must be approved before it runs."""
    return (
        f"{APPROVAL_MARKER}\nKubeCI does not run this pull request yet: {reason}. A user with "
        f"write access to {repository} must review the changes and comment `/ok-to-test`. "
        "Its runs get no secrets from KubeCI's configuration."
    )


def approval_status(reason: str) -> str:
    """Build the description of the pending `kubeci/ok-to-test` status (short enough for 140)."""
    return f"Not run: {reason}. A user with write access must comment /ok-to-test"


def approved_status(author: str) -> str:
    return f"Approved by {author} with /ok-to-test"


def stale_head(sha: str, newest_sha: str, forge: str) -> str:
    """Explain why a comment run on `sha` cancels no run of `newest_sha`."""
    name = FORGE_NAMES.get(forge, forge)
    return (
        f"{name} returned {short_sha(sha)} as the head commit, but the newest push that "
        f"KubeCI received for this pull request is {short_sha(newest_sha)}. KubeCI cannot "
        f"tell which is newer, so the run on {short_sha(sha)} cancels no other run."
    )
