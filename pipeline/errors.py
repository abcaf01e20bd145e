"""Expected failures, as typed errors the CLI prints as one line with a distinct exit code.

Exit codes of `r1v`:

    0    success
    1    config or input problem: invalid config or override, missing file or run directory, bad --where
    2    usage: the command line itself (unknown command or option, unknown step or stage name)
    3    the run's state does not allow it: an upstream step is missing or stale (the message names the
         command to run first), or another driver is running the same run directory
    4    a stage failed with an unexpected error (the one-line summary; `--debug` prints the traceback)
    130  interrupted (Ctrl-C / SIGINT): finished steps are kept; the same command resumes

Any module may raise these; `pipeline.cli` catches `R1vError` and exits with its `exit_code`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_INPUT = 1
EXIT_USAGE = 2
EXIT_STATE = 3
EXIT_FAILED = 4
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INPUT: "config or input problem (invalid config or override, missing file or run directory)",
    EXIT_USAGE: "usage: unknown command, option, step or stage name",
    EXIT_STATE: "run state: an upstream step is missing or stale (the message names the command to run "
                "first), or another driver holds the run",
    EXIT_FAILED: "a stage failed with an unexpected error (--debug prints the traceback)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); finished steps are kept, the same command resumes",
}


class R1vError(Exception):
    """An expected failure: the message is the whole story (one line, naming the fix)."""

    exit_code = EXIT_INPUT


class InputError(R1vError):
    """A missing or unusable input: a file, a run directory, a table, an expression."""


class PlanError(InputError, ValueError):
    """A config whose plan cannot be built: a step needs an input no configured step provides."""


class UsageError(R1vError):
    exit_code = EXIT_USAGE


class UnknownStepError(UsageError, ValueError):
    """A step or stage name that is not in the run's plan; suggests the nearest one."""

    def __init__(self, key: str, known: Iterable[str], what: str = "step or stage", where: str = "this run's plan"):
        self.key, self.known = key, list(known)
        super().__init__(f"no {what} {key!r} in {where}{did_you_mean(key, self.known)}; "
                         f"valid: {', '.join(self.known) or 'none'}")


class RunStateError(R1vError, RuntimeError):
    """The run directory's state forbids the command (raise a subclass: stale upstream, run locked)."""

    exit_code = EXIT_STATE


class StaleUpstreamError(RunStateError):
    """A step whose input step is missing or stale."""


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The closest of `choices` to a misspelt `word`, or None when nothing is close."""
    choices = [c for c in choices if c != word]
    hits = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not hits:  # a prefix ("gen" for "generate") or a different case
        low = word.lower()
        hits = [c for c in choices if c.lower() == low] or [c for c in choices if c.startswith(word) and len(word) >= 3]
    return hits[0] if hits else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    m = nearest(word, choices)
    return f" (did you mean `{m}`?)" if m else ""
