"""All-or-nothing mutation of library-owned state (issue 13: a refusal or an exception changes nothing).

A mutating method of :class:`~lora_kernels.LoRAWeights`, :class:`~lora_kernels.DualLoRAWeights` or
:class:`~lora_kernels.AdapterPool` runs in two phases:

1. *plan*: validate and convert every argument (shapes, dtypes, devices, numbers, free slot and rows), writing
   nothing; every refusal is raised here;
2. *write*: inside a :func:`transaction`, each device region is saved (:meth:`Transaction.save`) before it is
   overwritten, and each object's host bookkeeping is captured (:meth:`Transaction.track`) before it changes.

If anything raises during the write phase (an out-of-memory error, a failed copy, an interrupt), the saved bytes
are copied back, latest first, and the host states restored, so the objects are bit-identical to what they were
before the call; then the exception propagates. Nested operations (the pool adding an adapter to every layer)
share one transaction, so a failure in the last layer also undoes the first.

Tracked objects implement ``_host_state() -> state`` (a copy of their Python bookkeeping, sharing the immutable
values so identities that caches compare stay valid) and ``_restore_host_state(state)`` (in place).
Rollback is best effort only against a *second* failure during the rollback itself: it then keeps restoring the
rest and adds a note to the original exception.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Tuple

import torch

__all__ = ["Transaction", "transaction"]


class Transaction:
    """A write journal: device regions saved before writes, host states captured before changes."""

    def __init__(self) -> None:
        self._views: List[Tuple[torch.Tensor, torch.Tensor, Any]] = []
        self._hosts: List[Tuple[Any, Any]] = []
        self._tracked: set = set()

    def save(self, view: torch.Tensor) -> torch.Tensor:
        """Keep a copy of ``view`` (a view of library storage about to be written); returns ``view``. On CUDA the
        copy and a later restore run on the stream current now, the stream the writes that follow are queued on,
        so they stay ordered with them without a host sync."""
        stream = torch.cuda.current_stream(view.device) if view.is_cuda else None
        with torch.no_grad():
            self._views.append((view, view.detach().clone(), stream))
        return view

    def track(self, obj: Any) -> None:
        """Capture ``obj``'s host bookkeeping (once per transaction) before it is changed."""
        if id(obj) not in self._tracked:
            self._hosts.append((obj, obj._host_state()))
            self._tracked.add(id(obj))

    def rollback(self, exc: Optional[BaseException] = None) -> None:
        """Restore every saved region (latest first) and every tracked host state."""
        failed = []
        with torch.no_grad():
            for view, old, stream in reversed(self._views):
                try:
                    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                        view.copy_(old)
                except BaseException as e:  # noqa: BLE001 - keep restoring the rest
                    failed.append(e)
        for obj, state in reversed(self._hosts):
            obj._restore_host_state(state)
        if failed and exc is not None and hasattr(exc, "add_note"):
            exc.add_note(f"lora_kernels: rollback after this error could not restore {len(failed)} device "
                         f"region(s) ({failed[0]!r}); the adapter storage may be inconsistent")


@contextlib.contextmanager
def transaction(parent: Optional[Transaction] = None) -> Iterator[Transaction]:
    """``with transaction() as txn:`` roll back everything journaled in ``txn`` if the block raises. With
    ``parent`` the block joins that transaction (the outermost one rolls back)."""
    if parent is not None:
        yield parent
        return
    txn = Transaction()
    try:
        yield txn
    except BaseException as e:
        txn.rollback(e)
        raise
