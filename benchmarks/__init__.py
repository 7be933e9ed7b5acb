"""powerpool's benchmark suite: the peers and powerpool, side by side.

Run it with ``python -m benchmarks`` from the repository root (``--help`` for
the options). It is kept out of the unit-test run; ``tests/test_benchmarks_smoke.py``
only checks that its machinery still works on tiny sizes.

Modules: :mod:`.workloads` (the jobs), :mod:`.contenders` (the ways to run
them), :mod:`.runner` (timing, checking, the worker sweep), :mod:`.report`
(JSON, Markdown, plots), :mod:`.httpserver` (the local slow server).
"""
