"""Every public name (``qtoolkit.__all__``) has a docstring with an ``Example`` that runs as a doctest.

The examples run here as the API reference shows them (``scripts/build_api_docs.sh``): in the namespace of the
module that defines the name, with doctest's default options (those of ``--doctest-modules``).
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import time
from typing import Any

import pytest

import qtoolkit as qt

#: public names without a runnable example yet (defined in modules being edited elsewhere); the list shrinks
KNOWN_MISSING: frozenset[str] = frozenset()

#: public constants (no docstring of their own): the module whose docstring holds their example
CONSTANT_HOMES = {"PRESETS": "qtoolkit.config"}

#: wall seconds all examples may take together (they used about 9 s of CPU time on a 2-core Zen 4; slack for a shared box)
BUDGET_S = 60.0


def _own_doc(obj: Any) -> str | None:
    """The docstring written for ``obj`` itself (not one inherited from its type or a base class)."""
    if inspect.isclass(obj):
        return obj.__dict__.get("__doc__")
    if inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj):
        return obj.__doc__
    return None  # a constant: its type's docstring is not its own


def _example(name: str) -> doctest.DocTest | None:
    obj = getattr(qt, name)
    if name in CONSTANT_HOMES:
        module = importlib.import_module(CONSTANT_HOMES[name])
        doc = module.__doc__ or ""
        if name not in doc or ">>>" not in doc:
            return None
        return doctest.DocTestParser().get_doctest(doc, dict(vars(module)), f"{module.__name__}.{name}", module.__file__, 0)
    doc = _own_doc(obj)
    if not doc or "Example" not in doc or ">>>" not in doc:
        return None
    module = importlib.import_module(obj.__module__)
    return doctest.DocTestParser().get_doctest(doc, dict(vars(module)), f"{obj.__module__}.{name}", module.__file__, 0)


def _missing() -> list[str]:
    return sorted(n for n in qt.__all__ if _example(n) is None)


def test_no_new_public_name_lacks_an_example() -> None:
    assert sorted(set(_missing()) - KNOWN_MISSING) == []


def test_every_public_name_has_an_example() -> None:
    assert _missing() == []


def test_the_public_examples_run(one_thread: None) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    runner = doctest.DocTestRunner(optionflags=0)
    failed, took = [], {}
    start = time.perf_counter()
    for name in qt.__all__:
        test = _example(name)
        if test is None:
            continue
        t0 = time.perf_counter()
        result = runner.run(test, out=lambda s: None, clear_globs=True)
        took[name] = time.perf_counter() - t0
        if result.failed:
            failed.append(name)
    total = time.perf_counter() - start
    assert failed == [], f"examples that fail (run them with: python -m doctest -v on the module): {failed}"
    assert len(took) >= len(qt.__all__) - len(KNOWN_MISSING)
    slow = sorted(took.items(), key=lambda kv: -kv[1])[:5]
    assert total < BUDGET_S, f"examples took {total:.1f} s (budget {BUDGET_S} s); slowest: {slow}"


def test_the_checker_sees_a_missing_and_a_failing_example() -> None:
    def documented() -> None:
        """Example::

        >>> 1 + 1
        3
        """

    def undocumented() -> None:
        pass

    assert _own_doc(undocumented) is None and _own_doc(qt.PRESETS) is None
    test = doctest.DocTestParser().get_doctest(_own_doc(documented), {}, "documented", None, 0)
    assert doctest.DocTestRunner().run(test, out=lambda s: None).failed == 1
