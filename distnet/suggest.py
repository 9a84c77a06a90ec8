"""'Did you mean' for a name that is not known: the closest known one, if any is close."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: object, known: Iterable[object]) -> str:
    """``" (did you mean 'adam'?)"`` for the known name closest to ``word`` (as difflib ranks
    them, ratio >= 0.6), or '' when none is close: appended to an 'unknown ...' message."""
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
