"""The ``powerpool`` command line (``powerpool`` and ``python -m powerpool``).

The library never imports this package. By module:

* :mod:`.app`: the click app, one function per command (``run``, ``bench``,
  ``profile``, ``demo``), exit codes, and :func:`~.app.main`, the console entry point.
* :mod:`.params`: what the commands share: option types and groups, input checks.
* :mod:`.inputs`: reading the command line's input: ``MODULE:FUNC`` and records
  (JSON Lines or text lines) turned into calls; worker processes import it too,
  so it stays free of click.
* :mod:`.run`: the work of ``powerpool run`` (results, errors, checkpoint, summary).
* :mod:`.bench`: the work of ``powerpool bench`` (timings, Amdahl/USL fits, plot).
* :mod:`.profile`: the work of ``powerpool profile`` (profile, then auto's plan).

This file imports nothing, so that a worker process that unpickles a record
from :mod:`.inputs` does not pay for click.
"""
