"""The ``optgen`` command's entry point.

Importing optgen imports JAX, which takes about a second; a Ctrl-C in that second must be
a message and exit status 130 like one during a command (``optgen/cli.py``), not a
traceback. A KeyboardInterrupt raised inside an import can land in a garbage-collector
callback, where Python prints it and carries on, so while importing, Ctrl-C exits at
once (nothing has been written yet); the commands then get Python's usual handler back.
"""

import os
import signal
import sys


def _interrupted(signum, frame) -> None:
    sys.stderr.write("optgen: interrupted while starting; nothing was written\n")
    sys.stderr.flush()
    os._exit(130)


def main() -> None:
    signal.signal(signal.SIGINT, _interrupted)
    from optgen.cli import main as cli

    signal.signal(signal.SIGINT, signal.default_int_handler)
    cli()


if __name__ == "__main__":
    main()
