from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from rankbygene.model._ema import cosine_momentum, make_teacher, update_ema
from rankbygene.model._losses import distillation_loss


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 3))


def _train_student_a_bit(student: nn.Module) -> None:
    """Change parameters and BatchNorm statistics of the student."""
    student.train()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student(torch.randn(16, 4) * 3 + 1)  # updates running stats


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_make_teacher_is_a_frozen_eval_copy():
    student = _net()
    student(torch.randn(5, 4)).sum().backward()  # the student has grads; the copy must not
    teacher = make_teacher(student)
    assert teacher is not student
    assert not teacher.training
    for (name, s), (t_name, t) in zip(
        student.named_parameters(), teacher.named_parameters(), strict=True
    ):
        assert name == t_name
        assert torch.equal(s, t)
        assert s.data_ptr() != t.data_ptr()
        assert not t.requires_grad
        assert t.grad is None
    assert all(p.requires_grad for p in student.parameters())


def test_update_ema_momentum_one_keeps_parameters_copies_buffers():
    student = _net()
    teacher = make_teacher(student)
    before = {k: v.clone() for k, v in teacher.named_parameters()}
    _train_student_a_bit(student)
    update_ema(student, teacher, momentum=1.0)
    for name, p in teacher.named_parameters():
        assert torch.equal(p, before[name])
    for (name, s), (_, t) in zip(student.named_buffers(), teacher.named_buffers(), strict=True):
        assert torch.equal(s, t), name
    assert int(teacher[1].num_batches_tracked) == 1


def test_update_ema_momentum_zero_copies_student():
    student = _net()
    teacher = make_teacher(student)
    _train_student_a_bit(student)
    update_ema(student, teacher, momentum=0.0)
    s_state, t_state = _state(student), _state(teacher)
    assert s_state.keys() == t_state.keys()
    for k in s_state:
        assert torch.equal(s_state[k], t_state[k]), k


def test_update_ema_formula_and_mixed_dtype_fallback():
    student = _net()
    teacher = make_teacher(student)
    t0 = {k: v.clone() for k, v in teacher.named_parameters()}
    _train_student_a_bit(student)
    update_ema(student, teacher, momentum=0.9)
    for name, p in teacher.named_parameters():
        expected = 0.9 * t0[name] + 0.1 * dict(student.named_parameters())[name]
        assert torch.allclose(p, expected, atol=1e-6)
    # a float64 teacher (different dtype from the student) takes the per-tensor path
    teacher64 = make_teacher(student).double()
    update_ema(student, teacher64, momentum=0.0)
    for (_, s), (_, t) in zip(
        student.named_parameters(), teacher64.named_parameters(), strict=True
    ):
        assert t.dtype == torch.float64
        assert torch.allclose(t.float(), s)


def test_teacher_never_receives_gradients():
    student = _net()
    teacher = make_teacher(student)
    x = torch.randn(8, 4)
    student.train()
    loss = distillation_loss(student(x), teacher(x)) + student(x).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    for p in teacher.parameters():
        assert not p.requires_grad
        assert p.grad is None
    # even if the teacher output were not detached, it has no trainable leaves
    assert not teacher(x).requires_grad
    update_ema(student, teacher, momentum=0.5)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_update_ema_rejects_mismatched_modules():
    with pytest.raises(ValueError, match="shape"):
        update_ema(nn.Linear(3, 2), nn.Linear(3, 4), momentum=0.9)
    with pytest.raises(ValueError, match="only in student"):
        update_ema(nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2)), momentum=0.9)
    with pytest.raises(ValueError, match="buffers"):
        update_ema(
            nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)),
            nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)),
            momentum=0.9,
        )
    with pytest.raises(ValueError, match="momentum"):
        update_ema(nn.Linear(3, 2), nn.Linear(3, 2), momentum=1.5)


def test_cosine_momentum_schedule():
    total = 100
    values = [cosine_momentum(s, total, start=0.99, end=1.0) for s in range(total + 1)]
    assert values[0] == 0.99
    assert values[-1] == 1.0
    assert cosine_momentum(total // 2, total) == pytest.approx(0.995)
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert cosine_momentum(10 * total, total) == 1.0
    assert cosine_momentum(-3, total) == 0.99
    # no known schedule length: the final momentum
    assert cosine_momentum(0, 0) == 1.0
    assert cosine_momentum(5, -1, start=0.9, end=0.95) == 0.95
    # decreasing schedules are allowed and monotone the other way
    down = [cosine_momentum(s, 10, start=1.0, end=0.5) for s in range(11)]
    assert down[0] == 1.0
    assert down[-1] == 0.5
    assert all(b <= a for a, b in itertools.pairwise(down))
    with pytest.raises(ValueError, match="start"):
        cosine_momentum(0, 10, start=1.2)
