"""A System for a CLI command when no daemon answers: the one "offline system" helper.

``a4ps image restore``, ``persona export``, ``curate``, ``finetune``, … talk to the
daemon when one runs; otherwise they build a System here, on the image, with no
service threads, holding the daemon's lock so no daemon starts meanwhile, and save
the image when done. A daemon that holds the lock but did not answer is reported as
:class:`DaemonBusy` (the message says what to do); each command prints it its way.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

from .lock import DataLock, DataLockHeld

if TYPE_CHECKING:
    from .config import Settings
    from .system import System


class DaemonBusy(RuntimeError):
    """A daemon holds the data directory but did not answer."""


@contextlib.contextmanager
def image_lock(settings: Settings, what: str) -> Iterator[DataLock]:
    """The daemon's lock, held while a command (``a4ps {what}``) works on the image
    itself, so no daemon starts on a half-written image; DaemonBusy when one holds it."""
    lock = DataLock.for_data_dir(settings.data_dir)
    try:
        lock.acquire()
    except DataLockHeld as e:
        raise DaemonBusy(f"{e}\n(a daemon holds {settings.data_dir} but did not answer; wait "
                         f"for it or stop it, then run `a4ps {what}` again)") from None
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def offline_system(settings: Settings, what: str) -> Iterator[System]:
    """A started System (services off) under the daemon lock; stopped (image saved) after."""
    with image_lock(settings, what) as lock:
        from .system import System               # every part (numpy, …): only when used
        system = System(settings, lock=lock)     # the System writes under our lock
        system.start(services=False)
        try:
            yield system
        finally:
            system.stop()                        # saves the image
