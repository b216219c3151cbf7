"""Named arrays from an ``.npz`` file that may be damaged or hostile, never unpickled.

One reader for every ``.npz`` a fedgate command takes (a site's windows, simulated plant
runs), so that all of them refuse the same things the same way: a bare ``.npy`` array, a
missing array, object arrays, a truncated or damaged archive, a header numpy cannot parse,
a header declaring an array larger than memory. The caller words the refusal for its file
(:class:`NpzUnreadable` says which of these it was).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from tokenize import TokenError
from typing import Any

import numpy as np
import numpy.typing as npt

from fedgate_common.errors import NpzProblem, NpzUnreadable

__all__ = ["read_npz"]


def read_npz(
    path: Path, *, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, npt.NDArray[Any]]:
    """The ``required`` arrays of the ``.npz`` at ``path``, and the ``optional`` ones that
    are there; :class:`NpzUnreadable` for anything else."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise NpzUnreadable("single_array", "a bare .npy array", path=path)
        with loaded as archive:
            missing = tuple(name for name in required if name not in archive.files)
            if missing:
                raise NpzUnreadable(
                    "missing", f"no {', '.join(missing)}", path=path, missing=missing
                )
            return {
                name: np.asarray(archive[name])
                for name in (*required, *optional)
                if name in archive.files
            }
    except ValueError as exc:  # object arrays refuse to load without pickle; bad headers
        problem: NpzProblem = "pickle" if "pickle" in str(exc) else "unreadable"
        raise NpzUnreadable(problem, str(exc), path=path) from None
    # Missing, truncated, damaged; a header numpy cannot parse raises tokenize's TokenError
    # or SyntaxError.
    except (OSError, EOFError, zipfile.BadZipFile, SyntaxError, TokenError) as exc:
        raise NpzUnreadable("unreadable", str(exc), path=path) from None
    except MemoryError as exc:  # a header declaring a huge shape
        raise NpzUnreadable("too_large", str(exc), path=path) from None
