"""``python -m novita_async``: the same as the ``novita-async`` command."""

import sys

from novita_async._cli_common import EXIT_INTERRUPTED

try:
    from novita_async._cli import entry
except KeyboardInterrupt:
    # Ctrl-C while the command's modules load: the line and exit code main()
    # gives once it runs, not a traceback of the import.
    sys.stderr.write("novita-async: interrupted\n")
    sys.exit(EXIT_INTERRUPTED)

entry()
