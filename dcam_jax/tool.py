"""How the ``python -m`` tools of the project (eval.*, toy.*, checkpoints_convert, data.shapes_samples) run their
absl ``main``: :func:`run_tool`. It sits on the lowest floor (absl only), so every tool can use it without
importing the ``dcam`` command line."""

from __future__ import annotations

import os
import sys

from absl import app


def run_tool(tool_main) -> None:
    """Run an absl ``main(argv)`` (the ``python -m`` tools: eval.*, toy.train, checkpoints_convert, ...) so that
    bad input ends in one line on stderr instead of a traceback or the whole help text.

    ``app.UsageError`` prints ``error: MESSAGE`` and a pointer to ``--help`` (exit 2); ImageError,
    CheckpointError, other ValueErrors and OSErrors (a missing file, a path under a file, no permission) print
    ``error: MESSAGE`` (exit 1).
    Any other exception is a bug and keeps its traceback. Set ``DCAM_TRACEBACK=1`` to see the traceback of the
    handled errors too.
    """
    prog = os.path.basename(sys.argv[0]) if sys.argv else "tool"
    module = sys.modules["__main__"].__spec__.name if getattr(sys.modules.get("__main__"), "__spec__", None) else prog

    def wrapped(argv):
        try:
            return tool_main(argv)
        except app.UsageError as e:
            if os.environ.get("DCAM_TRACEBACK"):
                raise
            print(f"error: {e}\nRun `python -m {module} --help` for the flags.", file=sys.stderr)
            sys.exit(2)
        except (ValueError, OSError) as e:  # ImageError and CheckpointError are ValueErrors
            if os.environ.get("DCAM_TRACEBACK"):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(wrapped)
