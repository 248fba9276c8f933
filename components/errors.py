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
