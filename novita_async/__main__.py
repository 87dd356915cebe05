"""``python -m novita_async``: the same as the ``novita-async`` command."""

from novita_async._cli import entry

entry()
