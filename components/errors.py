"""The one exception base of the project.

Every error a user can fix (a bad config key, a missing teacher, an unreadable corpus, a
checkpoint from another run, a diverged loss) derives from :class:`LetRecipesError`. The
recipes' runner turns exactly these into one ``error: ... Fix: ...`` line and exit status
1; anything else is a bug and keeps its traceback. Each module defines its own subclass
(``TeacherError``, ``DataError``, ...) next to the code that raises it.

It derives from ``ValueError`` because most of these are bad values a user supplied, and
so that ``except ValueError`` in user code written against earlier versions still works.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Iterator, List, Optional


class LetRecipesError(ValueError):
    """An error the user can fix; reported as one line with the fix."""


class StopRequested(BaseException):
    """A stop that a signal asked for, raised from its handler wherever the main thread was
    (:mod:`preemption`). Like ``KeyboardInterrupt`` it derives from ``BaseException``: raised
    as a ``ValueError`` (every :class:`LetRecipesError` is one), a SIGTERM that landed inside
    an ``except ValueError`` or ``except Exception`` on the way (a JSON read's fallback, a
    library's retry) was taken for that code's own failure and dropped, and the run trained
    on as if no signal had come. The recipes' runner reports it as one line, like the errors."""


def in_words(names: List[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``: names listed in a message."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def closest_name(word: str, names: Iterable[str]) -> Optional[str]:
    """The name a mistyped ``word`` most likely meant: difflib's closest, else the one name
    that begins with it (``temp`` for ``temperature``, ``warmup`` for ``warmup_steps``, too
    short for difflib's likeness); None when neither answers."""
    names = list(names)
    close = difflib.get_close_matches(word, names, n=1)
    if close:
        return close[0]
    starting = [name for name in names if len(word) >= 3 and name.startswith(word)]
    return starting[0] if len(starting) == 1 else None


def errors_within(err: Optional[BaseException]) -> Iterator[BaseException]:
    """``err``, then each error behind it, once: its cause and context, and the per-rank
    failures that torch.distributed.checkpoint wraps in a ``CheckpointException`` (its
    ``failures``: rank -> (error, traceback)). Nearest first: a reader takes the first that
    answers its question (an OS error's errno, a stop a signal asked for, a thread start)."""
    seen, queue = set(), [err]
    while queue:
        e = queue.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        for failure in failures.values() if isinstance(failures, dict) else ():
            queue.append(failure[0] if isinstance(failure, tuple) else failure)
        queue += [e.__cause__, e.__context__]


def stop_within(err: BaseException) -> Optional["StopRequested"]:
    """The signal's stop that ``err`` carries, where a library caught it and raised its own
    error around it (DCP's ``CheckpointException`` gathers each rank's failure)."""
    return next((e for e in errors_within(err) if isinstance(e, StopRequested)), None)


class LetRecipesWarning(UserWarning):
    """Something the user should know of that does not stop the run (a recovery, a
    setting rarely meant); shown as one ``warning: ...`` line by :func:`warnings_as_lines`."""


def warnings_as_lines() -> None:
    """Format :class:`LetRecipesWarning` as one ``warning: ...`` line, like the errors: the
    message names the key and the fix, so Python's file, line number and source line of
    the code that warned are noise to a user. Other warnings keep Python's format; a
    ``warnings.catch_warnings(record=True)`` still records them all. The recipes' and the
    CLI's entry points call this; importing the package changes nothing."""
    import warnings

    formatted = warnings.formatwarning
    if getattr(formatted, "letrecipes", False):
        return

    def format_warning(message, category, filename, lineno, line=None):
        if issubclass(category, LetRecipesWarning):
            return f"warning: {message}\n"
        return formatted(message, category, filename, lineno, line)

    format_warning.letrecipes = True
    warnings.formatwarning = format_warning
