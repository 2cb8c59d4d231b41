"""Processes that share a cohort: tasks of a job array, ranks of ``torch.distributed``.

Two ways to spread work, which combine: a job array (SLURM, Grid Engine) runs independent tasks
that cannot talk to each other, so each takes a fixed shard of the cohort, the same whatever
has been done before; the ranks of a ``torch.distributed`` process group (``torchrun``) talk
through the group, so they share out what is left to do.
"""

from __future__ import annotations

import heapq
import itertools
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

#: How long a process waits for the others at a collective. The ranks meet after checking the
#: cohort and after embedding their slides: a rank may wait there for a slower one to finish a
#: slide, so the wait is generous (a rank that dies breaks the wait at once; torchrun then
#: stops the others).
COLLECTIVE_TIMEOUT = timedelta(hours=24)

#: Job arrays whose environment tells a task its place: task id, first id, last id or number
#: of tasks, step.
_ARRAY_VARIABLES = {
    "SLURM": ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT"),
    "Grid Engine": ("SGE_TASK_ID", "SGE_TASK_FIRST", "SGE_TASK_LAST"),
}

Shard = tuple[int, int] | Literal["array"] | None

#: Process groups started here so far (every process starts the same ones, in the same order).
_STARTED = itertools.count()


def resolve_shard(shard: Shard, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(index, count)`` of a shard given as a pair, ``"array"`` (the job array's) or ``None``.

    Parameters
    ----------
    shard
        ``None``: the whole cohort, ``(0, 1)``; ``(index, count)``: shard ``index`` of ``count``
        (0-based); ``"array"``: this task's place in a SLURM (``SLURM_ARRAY_TASK_ID``,
        ``SLURM_ARRAY_TASK_MIN``, ``SLURM_ARRAY_TASK_COUNT``, ``SLURM_ARRAY_TASK_STEP``) or Grid
        Engine (``SGE_TASK_ID``, ``SGE_TASK_FIRST``, ``SGE_TASK_LAST``, ``SGE_TASK_STEPSIZE``)
        job array.
    environ
        Environment variables (default: ``os.environ``).

    Raises
    ------
    ValueError
        A pair out of range, or ``"array"`` outside a job array or in one whose task ids are not
        a range (``--array=1,5,7``): pass ``(index, count)`` then.
    """
    if shard is None:
        return 0, 1
    if isinstance(shard, str):
        if shard != "array":
            raise ValueError(f"shard must be (index, count), 'array' or None; got {shard!r}.")
        return _array_task(os.environ if environ is None else environ)
    try:
        index, count = (int(value) for value in shard)
    except (TypeError, ValueError):
        raise ValueError(f"shard must be (index, count), 'array' or None; got {shard!r}.") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(
            f"shard=(index, count) needs count >= 1 and 0 <= index < count; got {shard!r}."
        )
    return index, count


def _array_task(environ: Mapping[str, str]) -> tuple[int, int]:
    for scheduler, (id_key, first_key, count_key) in _ARRAY_VARIABLES.items():
        task = environ.get(id_key, "")
        if not task or task == "undefined":  # Grid Engine sets "undefined" outside arrays
            continue
        try:
            task_id = int(task)
            first = int(environ[first_key])
            if scheduler == "SLURM":
                step = int(environ.get("SLURM_ARRAY_TASK_STEP", "1"))
                count = int(environ[count_key])
            else:
                step = int(environ.get("SGE_TASK_STEPSIZE", "1"))
                count = (int(environ[count_key]) - first) // step + 1
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"{id_key}={task!r}, but the {scheduler} job array's other variables are "
                f"missing or not integers ({err}); pass shard=(index, count)."
            ) from None
        offset = task_id - first
        if step < 1 or offset % step or not 0 <= offset // step < count:
            raise ValueError(
                f"The {scheduler} array task {id_key}={task_id} is not one of {count} tasks "
                f"from {first} in steps of {step}: its task ids are not a range. Pass "
                "shard=(index, count)."
            )
        return offset // step, count
    raise ValueError(
        "shard='array' takes this task's place from a job array's environment "
        "(SLURM_ARRAY_TASK_ID or SGE_TASK_ID), and none is set: run inside an array job "
        "(sbatch --array=0-N), or pass shard=(index, count)."
    )


def balance(sizes: Sequence[float], n_parts: int) -> list[list[int]]:
    """Share items out between ``n_parts`` so that the parts' total sizes come out even.

    Largest first, each to the part with the least so far (ties: the lower part); the result
    depends only on ``sizes`` and ``n_parts``, so processes that compute it apart agree.

    Parameters
    ----------
    sizes
        Size of each item (the work it stands for).
    n_parts
        Number of parts.

    Returns
    -------
    The positions of each part's items, largest first.

    Examples
    --------
    >>> balance([1, 5, 3, 3], 2)
    [[1, 0], [2, 3]]
    """
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    loads = [(0.0, part) for part in range(n_parts)]
    for item in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, part = heapq.heappop(loads)
        parts[part].append(item)
        heapq.heappush(loads, (load + sizes[item], part))
    return parts


@dataclass(frozen=True)
class Processes:
    """The processes working on one cohort together, as seen from one of them."""

    rank: int = 0
    size: int = 1
    #: This process's place among those of its machine (the GPU it takes).
    local_rank: int = 0
    group: Any = None

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order (a collective: all processes call it)."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered


@contextmanager
def joined_processes() -> Iterator[Processes]:
    """This process's place in a running ``torch.distributed`` job, or alone outside one.

    Inside a process group (one started by Lightning or the user), the processes talk through a
    new gloo group of their own (small Python objects; a long timeout); under ``torchrun``
    without a group, the default group is started from its environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and ended on leaving.
    """
    import torch.distributed as dist

    started = False
    if not dist.is_available():
        yield Processes()
        return
    if dist.is_initialized():
        if dist.get_world_size() == 1:
            yield Processes()
            return
        group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    elif _launched(os.environ):
        store, rank, size = next(dist.rendezvous("env://"))
        # keys of its own in the launcher's store: a group started again later (by the next
        # call, or by Lightning) must not read this one's addresses, left under the same keys
        store = dist.PrefixStore(f"rankbygene/{next(_STARTED)}", store)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT
        )
        group, started = None, True
    else:
        yield Processes()
        return
    rank, size = dist.get_rank(), dist.get_world_size()
    try:
        yield Processes(rank, size, _local_rank(rank), group)
    finally:
        dist.destroy_process_group(None if started else group)


def _launched(environ: Mapping[str, str]) -> bool:
    """Whether torchrun (or a launcher like it) started this process as one of several."""
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return all(key in environ for key in needed) and int(environ["WORLD_SIZE"]) > 1


def _local_rank(rank: int) -> int:
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    import torch

    return rank % max(torch.cuda.device_count(), 1)


def portable(error: BaseException) -> BaseException:
    """``error`` itself if it can go to another process (pickled), else a RuntimeError saying it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        portable_error = RuntimeError(f"{type(error).__name__}: {error}")
        for note in getattr(error, "__notes__", []):
            portable_error.add_note(note)
        return portable_error
    return error
