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


class LetRecipesError(ValueError):
    """An error the user can fix; reported as one line with the fix."""


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
