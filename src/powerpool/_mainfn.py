"""How what a script defines in ``__main__`` travels to worker processes.

Workers never import the user's script: a script without an
``if __name__ == "__main__":`` guard would run again in every worker (its
prints, its files, its own pools). So everything defined in ``__main__``
(functions, lambdas, classes, initializers) travels by value, with
cloudpickle, whatever the start method, and is rebuilt in the worker so that
it behaves as if it still lived in one module:

* Every such function is bound to ONE namespace per worker, :data:`NAMESPACE`,
  standing in for the script's module: an initializer that sets a global
  (``global model; model = load()``) or fills a global dict is seen by every
  function that runs after it, as it would be if both were imported by name.
* Each global a function uses travels with it, with a digest of its pickled
  value. The worker installs a value only when its digest differs from the
  one it installed last under that name: a global changed in the caller
  (``k = 100`` between two maps) reaches the worker, while one the caller
  left alone keeps whatever the worker's own code made of it (the
  initializer's model, a cache filled by earlier items).

Decided "always by value" rather than "by value only without a guard": one
rule whatever the script looks like, a changed global is never stale, and
the worker never depends on importing a file that may have changed on disk
since the caller started.

The fork server would still make each worker it forks run the script
(``multiprocessing.spawn.prepare`` re-imports ``__main__`` in every child,
and the fork server's own ``__main__`` preload never receives the path): the
module :mod:`powerpool._backends._preload`, imported only in the fork server,
calls :func:`keep_workers_off_the_script` to skip that step for powerpool's
workers alone. spawn children run ``prepare`` before any powerpool code, so
spawn truly needs the guard; the process backend says so (see
:func:`require_guard`) instead of letting workers die at start.
"""

from __future__ import annotations

import ast
import functools
import io
import pickle
import sys
import types
from collections.abc import Callable
from typing import Any

# Imported with this module, not at first use: the process engine imports this
# module before it forks its workers (and the fork server imports it through
# _preload), so every worker inherits cloudpickle instead of importing it
# again to load the first function (measured: a cold script's first item
# starts ~7 ms sooner on 2 cores). Only the process and Dask engines import
# this module; a function pickled by name then pays it for nothing (~5 ms).
import cloudpickle

try:
    # The built-in blake2b: hashlib's import also loads OpenSSL (3-5 ms of every
    # cold process run), and blake2b is all this module hashes with.
    from _blake2 import blake2b
except ImportError:  # a CPython built without its own hashes
    from hashlib import blake2b

from ._errors import PowerpoolError

__all__ = [
    "NAMESPACE",
    "WORKER_NAME_PREFIX",
    "Install",
    "by_value",
    "digest",
    "keep_workers_off_the_script",
    "load",
    "refresh",
    "require_guard",
]

WORKER_NAME_PREFIX = "powerpool-worker-"
"""Process names of powerpool's workers (how the fork server tells them apart)."""

_PICKLE = pickle.HIGHEST_PROTOCOL

Install = tuple[str, bytes, Any]
"""One global a ``__main__`` function brought along: (name, digest, value)."""

NAMESPACE: dict[str, Any] = {"__name__": "__main__"}
"""The worker's stand-in for the script's module (see the module docstring)."""

# Invariant: _installed[name] is the digest of the caller's value last put in
# NAMESPACE[name]; the worker's own code may have changed NAMESPACE since.
_installed: dict[str, bytes] = {}
# Globals installed while load() unpickles a function (the worker loop is
# single-threaded); None outside load().
_loading: list[Install] | None = None


def digest(blob: bytes) -> bytes:
    """A short content digest: equal bytes, equal digest (collisions: 2**-64)."""
    return blake2b(blob, digest_size=16).digest()


# -- in the caller ---------------------------------------------------------------


def by_value(obj: Any) -> bytes:
    """cloudpickle, with every ``__main__`` function bound to the worker's NAMESPACE."""
    buffer = io.BytesIO()
    _main_pickler()(buffer, protocol=_PICKLE).dump(obj)
    return buffer.getvalue()


def _is_main_function(func: types.FunctionType) -> bool:
    main = sys.modules.get("__main__")
    return func.__globals__ is NAMESPACE or (main is not None and func.__globals__ is vars(main))


@functools.cache
def _main_pickler() -> type[Any]:
    """cloudpickle's Pickler, rebuilding ``__main__`` functions by this module's rules.

    cloudpickle reduces a dynamic function to ``(_make_function, (code,
    base_globals, name, argdefs, closure), state, None, None, setstate)``
    (stable since cloudpickle 1.5); only ``__main__``'s are rewritten, and
    any other shape is left alone (each function then gets its own globals).
    """

    class MainPickler(cloudpickle.Pickler):  # type: ignore[misc]
        def _dynamic_function_reduce(self, func: types.FunctionType) -> Any:
            reduced = super()._dynamic_function_reduce(func)
            if not _is_main_function(func) or len(reduced) != 6:
                return reduced
            _make, newargs, state, _, _, setstate = reduced
            code, _globals, name, argdefs, closure = newargs
            captured = state[1]["__globals__"]
            digests = {
                key: digest(cloudpickle.dumps(value, _PICKLE)) for key, value in captured.items()
            }
            return (
                _make_main_function,
                (code, name, argdefs, closure),
                (setstate, state, digests),
                None,
                None,
                _set_main_state,
            )

    return MainPickler


# -- in the worker ---------------------------------------------------------------


def _make_main_function(
    code: types.CodeType, name: str, argdefs: tuple[Any, ...] | None, closure: Any
) -> types.FunctionType:
    NAMESPACE["__builtins__"] = __builtins__
    return types.FunctionType(code, NAMESPACE, name, argdefs, closure)


_FunctionState = tuple[dict[str, Any], dict[str, Any]]
"""cloudpickle's state of a function: (its ``__dict__``, its slots incl. ``__globals__``)."""


def _set_main_state(
    func: types.FunctionType,
    state: tuple[Callable[[Any, _FunctionState], None], _FunctionState, dict[str, bytes]],
) -> None:
    setstate, (attributes, slots), digests = state
    installs = [(key, digests[key], value) for key, value in slots["__globals__"].items()]
    slots["__globals__"] = {}  # installed here, by the digest rule, not overwritten
    refresh(installs)
    if _loading is not None:
        _loading.extend(installs)
    setstate(func, (attributes, slots))


def refresh(installs: list[Install]) -> None:
    """Put the caller's values in NAMESPACE where they changed since last installed."""
    for name, fingerprint, value in installs:
        if _installed.get(name) != fingerprint:
            NAMESPACE[name] = value
            _installed[name] = fingerprint


def load(blob: bytes) -> tuple[Any, list[Install]]:
    """Unpickle a function; also the ``__main__`` globals it brought (for :func:`refresh`)."""
    global _loading  # one load at a time: the worker loop is single-threaded
    _loading = []
    try:
        return pickle.loads(blob), _loading
    finally:
        _loading = None


# -- start methods -----------------------------------------------------------------


def keep_workers_off_the_script() -> None:
    """Make children named WORKER_NAME_PREFIX... skip re-importing ``__main__``.

    Call only in the fork server (see :mod:`powerpool._backends._preload`):
    other children of the same server (the user's own multiprocessing
    processes) still get the script, as multiprocessing intends.
    """
    from multiprocessing import process, spawn

    for attribute in ("_fixup_main_from_path", "_fixup_main_from_name"):
        original = getattr(spawn, attribute, None)
        if original is None or getattr(original, "powerpool_skips_workers", False):
            continue

        def fixup(target: str, _original: Callable[[str], None] = original) -> None:
            if not process.current_process().name.startswith(WORKER_NAME_PREFIX):
                _original(target)

        fixup.powerpool_skips_workers = True  # type: ignore[attr-defined]
        setattr(spawn, attribute, fixup)


def require_guard(
    start_method: str, remedy: str = "or let powerpool choose the start method"
) -> None:
    """Raise if ``start_method`` would re-run an unguarded script in every worker.

    ``remedy`` completes the message with the way out other than the guard.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or _has_guard(path):
        return
    raise PowerpoolError(
        f"start method {start_method!r} runs the script {path} again in every worker "
        f'process, and it has no `if __name__ == "__main__":` guard: put the script\'s '
        f"work under that guard, {remedy}"
    )


@functools.cache
def _has_guard(path: str) -> bool:
    """Whether the script has a top-level ``if __name__ == "__main__":`` (unreadable: yes)."""
    try:
        with open(path, "rb") as file:
            tree = ast.parse(file.read(), path)
    except (OSError, SyntaxError, ValueError):
        return True
    for node in tree.body:
        test = node.test if isinstance(node, ast.If) else None
        if isinstance(test, ast.Compare) and len(test.comparators) == 1:
            sides = [test.left, test.comparators[0]]
            names = [s.id for s in sides if isinstance(s, ast.Name)]
            texts = [s.value for s in sides if isinstance(s, ast.Constant)]
            if names == ["__name__"] and texts == ["__main__"]:
                return True
    return False
