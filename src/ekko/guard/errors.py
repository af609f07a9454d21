"""Errors raised by the guard."""

from __future__ import annotations


class GuardConfigError(ValueError):
    """A guard setting is out of range; the message names the field and the value.

    Why a dedicated type: configuration is validated once, at construction, so a bad value
    fails at start-up with the field's name rather than as a silent mis-detection hours later.
    Subclassing ``ValueError`` keeps it catchable by generic callers.
    """


class GuardStateError(RuntimeError):
    """An event arrived that the health state machine does not allow in its current state.

    Why: an illegal event (``rollback_done`` while healthy, ``recovered`` while corrupted)
    means the controller driving the guard and the guard disagree about what happened. That is
    a bug to surface loudly, never an input to drop. The message names model, state and event.
    """

    def __init__(self, model: str, state: str, event: str) -> None:
        super().__init__(f"model {model!r}: event {event!r} is not allowed in state {state!r}")
        self.model = model
        self.state = state
        self.event = event


class TransitionLogError(RuntimeError):
    """The transition log is corrupted somewhere other than a torn last line.

    Why: a crash can only tear the record being written (the last one); damage earlier in the
    file is not crash debris, and silently skipping it would lose audit history.
    """


class PreimageError(LookupError):
    """A rollback target lies outside what the pre-image log can still restore.

    Why: the log is bounded in time and rows; asking for an older point must fail loudly with
    the earliest restorable time, never return a partial restore set.
    """


class QuarantineFileError(RuntimeError):
    """A source's quarantine file (its data dir's ``quarantine.json``) cannot be read.

    Why not start without it: the file says which tables a rollback still shields from the
    poisoned trainers' writes; a source that shrugged it off would take those writes at once.
    The message names the file and the entry; an operator removes the file to start anyway.
    """
