"""V-LoRA's accuracy-aware adapter generation: fuse tasks into as few adapters as their accuracy floors allow."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Union

from .._validation import check, check_int, check_real
from ._inputs import real_values

__all__ = ["TaskGrouping", "group_tasks"]


@dataclass
class TaskGrouping:
    """The result of :func:`group_tasks`.

    Attributes:
        groups: task indices of each fused adapter, in creation order (each list in the order tasks joined).
        adapters: the fused adapter of each group (what ``fuse`` / ``train`` returned for it).
        accuracies: per task, its accuracy with its group's adapter (as ``evaluate`` reported it).
        single_accuracies: per task, its accuracy with its own adapter alone (fused/trained from itself only).
        floors: per task, the floor it had to meet.
        below_floor: tasks that miss their floor even alone; each is left in a group of its own (after the
            fused groups).
        evaluations: how many times ``evaluate`` was called.
    """

    groups: List[List[int]]
    adapters: List[Any]
    accuracies: List[float]
    single_accuracies: List[float]
    floors: List[float]
    below_floor: List[int] = field(default_factory=list)
    evaluations: int = 0

    def group_of(self, task: int) -> int:
        """Index of the group that serves ``task``."""
        for g, members in enumerate(self.groups):
            if task in members:
                return g
        raise ValueError(f"task: expected an index in [0, {len(self.accuracies)}), got {task}")


def _default_fuse(items: List[Any]) -> Any:
    from .task_vectors import task_arithmetic

    return task_arithmetic(items, 1.0, rank="exact")


def group_tasks(
    adapters: Sequence[Any],
    evaluate: Callable[[Any, List[int]], Union[Sequence[float], Mapping]],
    floors: Union[float, Sequence[float]],
    *,
    fuse: Optional[Callable[[List[Any]], Any]] = None,
    train: Optional[Callable[[List[Any]], Any]] = None,
    order: Union[str, Sequence[int]] = "given",
) -> TaskGrouping:
    """Greedily fuse tasks into as few adapters as possible while every task stays at or above its floor.

    Semantics (V-LoRA's accuracy-aware LoRA adapter generation, first-fit greedy):
        1. every task alone: ``acc1[t] = evaluate(fuse([adapters[t]]), [t])``; a task with ``acc1[t] < floor[t]``
           cannot be helped by fusion: it gets its own group and is reported in ``below_floor``.
        2. the other tasks in ``order``: task t joins the first existing group G for which the adapter fused from
           ``G + [t]`` keeps every member's accuracy ``>= floor`` (one ``fuse`` and one ``evaluate`` per group
           tried); if none does, t starts a new group. Accepted groups keep the fused adapter and accuracies
           of their last accepted candidate.
        The number of groups is greedy, not guaranteed minimal (the minimum is a set-partitioning problem);
        ``order`` changes which greedy solution is found.

    Two ways to make an adapter for a group of tasks:
        - ``fuse(list of task adapters) -> adapter`` (default: exact task arithmetic with lambda 1,
          ``task_arithmetic(items, 1.0, rank="exact")``; e.g. ``functools.partial(ties, density=0.2)`` instead).
          ``adapters`` are then task adapters in any form :func:`task_arithmetic` accepts.
        - ``train(list of task data) -> adapter``: V-LoRA's way, one adapter trained on the union of the
          group's data. ``adapters`` are then the per-task data (any objects), handed to ``train`` unchanged.

    Args:
        adapters: one entry per task (adapters, or task data with ``train``).
        evaluate: ``evaluate(adapter, tasks) -> accuracies``, the accuracy of each task in ``tasks`` (a list of
            indices) when served by ``adapter``: a sequence aligned with ``tasks`` or a mapping task -> accuracy.
            Higher is better.
        floors: the minimum accuracy of every task (one float, or one per task).
        fuse, train: see above (at most one of them).
        order: ``"given"`` (index order), ``"headroom"`` (largest ``acc1 - floor`` first), ``"tightest"``
            (smallest first), or a permutation of the task indices.

    Returns:
        :class:`TaskGrouping`.

    Raises:
        TypeError / ValueError naming the argument: no tasks, floors of the wrong length, type (bool, str) or
        non-finite, both ``fuse`` and ``train``, a bad ``order`` (not a permutation of integers), or ``evaluate``
        returning the wrong number of accuracies, or values that are not finite real numbers
        (``evaluate: ...``).
    """
    if isinstance(adapters, (Mapping, str)) or not isinstance(adapters, Sequence):
        raise TypeError(f"adapters: expected a sequence (one entry per task), got {type(adapters).__name__}")
    n = len(adapters)
    check(n >= 1, "adapters", "at least one task", "an empty sequence")
    check(callable(evaluate), "evaluate", "a callable (adapter, tasks) -> accuracies", type(evaluate).__name__,
          TypeError)
    fl = real_values("floors", floors, n)  # finite real numbers (never bool / str): one, or one per task
    check(fuse is None or train is None, "fuse", "None when train is given (one way to make an adapter)", fuse)
    make = train if train is not None else (fuse if fuse is not None else _default_fuse)
    check(callable(make), "train" if train is not None else "fuse", "a callable", type(make).__name__, TypeError)
    if isinstance(order, str):
        check(order in ("given", "headroom", "tightest"), "order", "'given', 'headroom', 'tightest' or a "
              "permutation", repr(order))
    else:
        check(isinstance(order, Sequence), "order", "'given', 'headroom', 'tightest' or a permutation",
              type(order).__name__, TypeError)
        order = [check_int("order", t) for t in order]  # (ints of any integer type; 1.0 is refused)
        check(sorted(order) == list(range(n)), "order", f"a permutation of 0..{n - 1}", order)

    calls = 0

    def measure(adapter: Any, tasks: List[int]) -> List[float]:
        nonlocal calls
        calls += 1
        res = evaluate(adapter, list(tasks))
        if isinstance(res, Mapping):
            check(all(t in res for t in tasks), "evaluate", f"accuracies for tasks {tasks}", sorted(res))
            res = [res[t] for t in tasks]
        else:
            res = list(res)
            check(len(res) == len(tasks), "evaluate", f"{len(tasks)} accuracies (one per task of {tasks})",
                  len(res))
        # real numbers (float("0.9") of a str, or True as 1.0, would guess): TypeError / ValueError naming evaluate
        return [check_real("evaluate", v) for v in res]

    single_adapters = [make([adapters[t]]) for t in range(n)]
    acc1 = [measure(single_adapters[t], [t])[0] for t in range(n)]
    if order == "given":
        seq = list(range(n))
    elif order == "headroom":
        seq = sorted(range(n), key=lambda t: (-(acc1[t] - fl[t]), t))
    elif order == "tightest":
        seq = sorted(range(n), key=lambda t: (acc1[t] - fl[t], t))
    else:
        seq = [int(t) for t in order]

    groups: List[List[int]] = []
    fused: List[Any] = []
    acc = list(acc1)
    below = [t for t in range(n) if acc1[t] < fl[t]]
    for t in seq:
        if t in below:
            continue
        for g, members in enumerate(groups):
            cand = members + [t]
            adapter = make([adapters[j] for j in cand])
            vals = measure(adapter, cand)
            if all(v >= fl[j] for v, j in zip(vals, cand)):
                groups[g], fused[g] = cand, adapter
                for v, j in zip(vals, cand):
                    acc[j] = v
                break
        else:
            groups.append([t])
            fused.append(single_adapters[t])
    for t in below:  # each alone, after the fused groups
        groups.append([t])
        fused.append(single_adapters[t])
    return TaskGrouping(groups, fused, acc, acc1, fl, below, calls)
