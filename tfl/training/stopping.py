"""SIGTERM, what a cluster scheduler sends before it preempts a job, stops a training command the way Ctrl-C does:
the last checkpoint stays, the command says how to resume, and it exits at once (143, the shell's code for it).

`sigterm_stops()` (the CLI's training commands) installs the handler. Outside the trainer's loops SIGTERM raises
Terminated at once, as Ctrl-C raises KeyboardInterrupt. Inside them (`deferred()`: Trainer.run_stage and
Trainer.evaluate_all) it is only noted, so a step or a checkpoint save is never cut in half:
the trainer passes the note into its next step, whose all-reduce hands every replica of every worker the sum,
and every worker stops after that same step. So a multi-worker run stops together even when the scheduler
signals one worker only, or the workers a few steps apart, instead of the others waiting in an all-reduce for a
worker that has left. A single process stops before its next step.

Standard library only: the CLI imports this before TensorFlow.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM stopped the run. A KeyboardInterrupt, so that everything that cleans up after Ctrl-C (locks,
    scratch directories, temp files) does so after SIGTERM too, and `except Exception` does not catch it."""


_state = {"requested": False, "deferring": 0, "active": False}


def requested() -> bool:
    """True once SIGTERM arrived while `sigterm_stops()` is active."""
    return _state["requested"]


def _on_sigterm(signum, frame) -> None:
    _state["requested"] = True
    if not _state["deferring"]:
        raise Terminated()


@contextlib.contextmanager
def sigterm_stops():
    """While active, SIGTERM stops the work with Terminated (see the module doc); the previous handler after.
    Only the main thread can handle signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _state.update(requested=False, active=True)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _state.update(requested=False, active=False)


def reclaim() -> None:
    """Put the handler back after TensorFlow's multi-worker runtime has set up: its preemption notifier installs a
    SIGTERM handler of its own in C, over Python's, which only notes the signal for TensorFlow's own preemption
    API, so without this a worker would ignore SIGTERM altogether."""
    if _state["active"] and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def deferred():
    """SIGTERM inside is noted (requested()), not raised: the trainer stops at its next step."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
