"""Start-up and exit of the command-line tools: Python's cyclic garbage collector.

Importing torch creates a few hundred thousand Python objects. While they are created the
collector runs again and again over all of them, and at exit the interpreter's final
collections walk them once more: measured 0.07 s and 0.3 s of CPU (of about 1.5 s for
``import torch`` and exit) on the development machine. None of these objects is garbage, so
they are moved to the collector's permanent generation (:func:`gc.freeze`), which it skips.
"""
import atexit
import contextlib
import gc
import sys


@contextlib.contextmanager
def bulk_imports():
    """Heavy imports (torch, numpy...) without collections in a fresh process; the objects they
    made are then frozen, so that later collections skip them. Nothing is changed where torch
    is imported already (a library user, a test calling ``main``)."""
    if "torch" in sys.modules or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def freeze_at_exit():
    """For a script's ``__main__``: at exit, freeze what is alive before the interpreter's final
    collections, which then skip it (the objects are freed all the same)."""
    atexit.register(gc.freeze)
