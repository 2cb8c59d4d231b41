"""Exponential-moving-average (EMA) teacher: momentum schedule, update and construction."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["cosine_momentum", "make_teacher", "update_ema"]


def cosine_momentum(step: int, total_steps: int, start: float = 0.99, end: float = 1.0) -> float:
    """EMA momentum on a cosine schedule from ``start`` to ``end``.

    ``m(step) = end - (end - start) * (1 + cos(pi * step / total_steps)) / 2``, so ``m(0) = start``
    and ``m(total_steps) = end``, monotone in between (as in BYOL/DINO). Steps before 0 give
    ``start``; steps at or after ``total_steps``, and any step when ``total_steps <= 0`` (no
    schedule length known), give ``end``.

    Parameters
    ----------
    step
        Current optimiser step (0-based).
    total_steps
        Number of steps of the schedule (e.g. ``trainer.estimated_stepping_batches``).
    start
        Momentum at step 0, in ``[0, 1]``.
    end
        Momentum at ``total_steps`` and after, in ``[0, 1]``.

    Returns
    -------
    The momentum, a float.

    Examples
    --------
    >>> cosine_momentum(0, 100), cosine_momentum(50, 100), cosine_momentum(100, 100)
    (0.99, 0.995, 1.0)
    """
    for name, value in (("start", start), ("end", end)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must be in [0, 1], got {value}.")
    if total_steps <= 0 or step >= total_steps:
        return float(end)
    if step <= 0:
        return float(start)
    return float(end - (end - start) * (1.0 + math.cos(math.pi * step / total_steps)) / 2.0)


def _check_matching(kind: str, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]):
    if student.keys() != teacher.keys():
        only_s = sorted(student.keys() - teacher.keys())
        only_t = sorted(teacher.keys() - student.keys())
        raise ValueError(
            f"student and teacher {kind} differ: only in student {only_s[:5]}"
            f"{' ...' if len(only_s) > 5 else ''}, only in teacher {only_t[:5]}"
            f"{' ...' if len(only_t) > 5 else ''}. Pass the unwrapped modules (not DDP/compiled "
            "wrappers) built from the same architecture."
        )
    for name, s in student.items():
        if s.shape != teacher[name].shape:
            raise ValueError(
                f"student and teacher {kind} {name!r} differ in shape: "
                f"{tuple(s.shape)} vs {tuple(teacher[name].shape)}."
            )


@torch.no_grad()
def update_ema(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """Move the teacher's weights towards the student's, in place.

    For every parameter, ``teacher_p = momentum * teacher_p + (1 - momentum) * student_p``;
    buffers (e.g. BatchNorm running statistics) are copied from the student.

    Parameters
    ----------
    student
        The trained module.
    teacher
        Its EMA copy (see :func:`make_teacher`), with the same parameter and buffer names and
        shapes; modified in place.
    momentum
        In ``[0, 1]``: 1 leaves the teacher's parameters unchanged, 0 copies the student's.

    Examples
    --------
    >>> student = nn.Linear(3, 2)
    >>> teacher = make_teacher(student)
    >>> with torch.no_grad():
    ...     _ = student.weight.add_(1.0)
    >>> update_ema(student, teacher, momentum=0.0)
    >>> bool(torch.equal(teacher.weight, student.weight))
    True
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"`momentum` must be in [0, 1], got {momentum}.")
    s_params: dict[str, torch.Tensor] = dict(student.named_parameters())
    t_params: dict[str, torch.Tensor] = dict(teacher.named_parameters())
    s_bufs = dict(student.named_buffers())
    t_bufs = dict(teacher.named_buffers())
    _check_matching("parameters", s_params, t_params)
    _check_matching("buffers", s_bufs, t_bufs)

    names = list(s_params)
    t_list = [t_params[n] for n in names]
    s_list = [s_params[n] for n in names]
    weight = 1.0 - momentum
    same_layout = all(
        t.device == s.device and t.dtype == s.dtype for t, s in zip(t_list, s_list, strict=True)
    )
    if t_list and same_layout and all(t.is_floating_point() for t in t_list):
        # One fused kernel per group of tensors instead of one per parameter.
        torch._foreach_lerp_(t_list, s_list, weight)
    else:
        for t, s in zip(t_list, s_list, strict=True):
            if t.is_floating_point():
                t.lerp_(s.to(device=t.device, dtype=t.dtype), weight)
            else:
                t.copy_(s)
    for name, s in s_bufs.items():
        t_bufs[name].copy_(s)


def make_teacher(student: nn.Module) -> nn.Module:
    """An EMA teacher for ``student``: a deep copy with gradients disabled, in eval mode.

    The copy's parameters have ``requires_grad=False`` and no ``.grad``. It is put in eval mode
    (BatchNorm uses the running statistics copied by :func:`update_ema`, dropout is off); a
    framework that calls ``.train()`` on a parent module switches it back, so the caller should
    call ``teacher.eval()`` again at the start of each training epoch.

    Parameters
    ----------
    student
        The module to copy.

    Returns
    -------
    The teacher module.

    Examples
    --------
    >>> teacher = make_teacher(nn.Linear(3, 2))
    >>> any(p.requires_grad for p in teacher.parameters()), teacher.training
    (False, False)
    """
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.grad = None
    return teacher.eval()
