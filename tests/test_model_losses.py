from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from rankbygene.model._losses import (
    cosine_similarity_matrix,
    distillation_loss,
    expression_similarity,
    gather_with_grad,
    get_rank_world_size,
    info_nce,
    rank_agreement,
    ranking_consistency_loss,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_ranking(image_sim, gene_sim, scales, tau, delta, weighted):
    """Loop-by-loop transcription of the definition, for small B."""
    n = image_sim.shape[0]
    total = 0.0
    for scale in scales:
        num = den = 0.0
        for i in range(n):
            others = [j for j in range(n) if j != i]
            if scale is not None:
                others = sorted(others, key=lambda j: -float(gene_sim[i, j]))[: min(scale, n - 1)]
            for j in others:
                for k in others:
                    d = float(gene_sim[i, j] - gene_sim[i, k])
                    if j == k or d <= delta:
                        continue
                    w = abs(d) if weighted else 1.0
                    x = float(image_sim[i, k] - image_sim[i, j]) / tau
                    num += w * tau * math.log1p(math.exp(x))
                    den += w
        total += num / den if den > 0 else 0.0
    return total


# ------------------------------------------------------------------------------------------------
# similarities
# ------------------------------------------------------------------------------------------------


def test_cosine_similarity_matrix_is_float32_and_normalised():
    x = torch.randn(6, 5, generator=_gen()) * 7
    y = torch.randn(4, 5, generator=_gen(1))
    s = cosine_similarity_matrix(x, y)
    assert s.dtype == torch.float32
    assert s.shape == (6, 4)
    assert torch.allclose(s, F.cosine_similarity(x[:, None], y[None], dim=-1), atol=1e-6)
    assert torch.allclose(cosine_similarity_matrix(x).diagonal(), torch.ones(6), atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s_ac = cosine_similarity_matrix(x.bfloat16(), y)
    assert s_ac.dtype == torch.float32
    with pytest.raises(ValueError, match="columns"):
        cosine_similarity_matrix(x, torch.randn(4, 3))


def test_expression_similarity_is_pearson():
    e = torch.rand(7, 30, generator=_gen()) * 5
    expected = torch.corrcoef(e)
    assert torch.allclose(expression_similarity(e), expected, atol=1e-5)
    # constant row: similarity 0, not NaN
    e[0] = 2.0
    s = expression_similarity(e)
    assert torch.isfinite(s).all()
    assert torch.all(s[0] == 0)


# ------------------------------------------------------------------------------------------------
# InfoNCE / distillation
# ------------------------------------------------------------------------------------------------


def test_info_nce_matched_lower_than_shuffled():
    q = torch.randn(16, 8, generator=_gen())
    k = q + 0.1 * torch.randn(16, 8, generator=_gen(1))
    perm = torch.roll(torch.arange(16), 1)
    assert info_nce(q, k) < info_nce(q, k[perm])


def test_info_nce_symmetric_is_mean_of_directions():
    q = torch.randn(10, 6, generator=_gen())
    k = torch.randn(10, 6, generator=_gen(1))
    t = 0.1
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    labels = torch.arange(10)
    q2k = F.cross_entropy(qn @ kn.T / t, labels)
    k2q = F.cross_entropy(kn @ qn.T / t, labels)
    assert torch.allclose(info_nce(q, k, temperature=t), (q2k + k2q) / 2, atol=1e-6)
    assert torch.allclose(info_nce(q, k, temperature=t, symmetric=False), q2k, atol=1e-6)


def test_info_nce_scale_invariant_and_float32_under_autocast():
    q = torch.randn(8, 4, generator=_gen())
    k = torch.randn(8, 4, generator=_gen(1))
    ref = info_nce(q, k)
    assert torch.allclose(info_nce(3.0 * q, 0.01 * k), ref, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = info_nce(q.bfloat16(), k.bfloat16())
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=5e-2)
    with pytest.raises(ValueError, match="same shape"):
        info_nce(q, k[:4])


def test_distillation_teacher_gets_no_gradient():
    s = torch.randn(8, 4, generator=_gen(), requires_grad=True)
    t = torch.randn(8, 4, generator=_gen(1), requires_grad=True)
    loss = distillation_loss(s, t)
    loss.backward()
    assert t.grad is None
    assert s.grad is not None
    assert s.grad.abs().sum() > 0
    assert torch.allclose(loss, info_nce(s.detach(), t.detach()), atol=1e-6)


def test_gather_without_process_group_is_identity():
    x = torch.randn(3, 2)
    assert get_rank_world_size() == (0, 1)
    assert gather_with_grad(x) is x
    assert torch.equal(info_nce(x, x, gather_distributed=True), info_nce(x, x))


# ------------------------------------------------------------------------------------------------
# ranking consistency
# ------------------------------------------------------------------------------------------------


def _gene_and_image(n: int = 12, d: int = 6, seed: int = 0):
    g = torch.randn(n, d, generator=_gen(seed))
    x = torch.randn(n, d, generator=_gen(seed + 100))
    return cosine_similarity_matrix(g), cosine_similarity_matrix(x)


def test_ranking_hand_computed_tiny():
    # 3 spots, anchor 0 only has the pair (1, 2) to order; anchors 1 and 2 likewise one pair.
    gene = torch.tensor([[1.0, 0.5, 0.1], [0.5, 1.0, 0.3], [0.1, 0.3, 1.0]])
    img = torch.tensor([[1.0, 0.2, 0.4], [0.2, 1.0, 0.0], [0.4, 0.0, 1.0]])
    tau = 0.1

    def sp(x):
        return tau * F.softplus(x)

    # anchor 0: S^G_01 > S^G_02 (w 0.4) -> tau * softplus((I02 - I01)/tau)
    # anchor 1: S^G_10 > S^G_12 (w 0.2) -> tau * softplus((I12 - I10)/tau)
    # anchor 2: S^G_21 > S^G_20 (w 0.2) -> tau * softplus((I20 - I21)/tau)
    c0 = sp(torch.tensor((0.4 - 0.2) / tau))
    c1 = sp(torch.tensor((0.0 - 0.2) / tau))
    c2 = sp(torch.tensor((0.4 - 0.0) / tau))
    expected = (0.4 * c0 + 0.2 * c1 + 0.2 * c2) / 0.8
    out = ranking_consistency_loss(img, gene, scales=None, tau=tau)
    assert torch.allclose(out, expected, atol=1e-6)
    unweighted = ranking_consistency_loss(img, gene, scales=None, tau=tau, weighted=False)
    assert torch.allclose(unweighted, (c0 + c1 + c2) / 3, atol=1e-6)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("delta", [0.0, 0.15])
def test_ranking_matches_loop_reference_4x4(weighted, delta):
    gene = torch.tensor(
        [
            [1.0, 0.8, 0.1, -0.3],
            [0.8, 1.0, 0.4, 0.0],
            [0.1, 0.4, 1.0, 0.6],
            [-0.3, 0.0, 0.6, 1.0],
        ]
    )
    img = torch.tensor(
        [
            [1.0, 0.2, 0.5, 0.1],
            [0.2, 1.0, 0.3, 0.7],
            [0.5, 0.3, 1.0, -0.2],
            [0.1, 0.7, -0.2, 1.0],
        ]
    )
    scales = (2, None)
    out = ranking_consistency_loss(
        img, gene, scales=scales, tau=0.1, delta=delta, weighted=weighted
    )
    ref = _reference_ranking(img, gene, scales, 0.1, delta, weighted)
    assert abs(float(out) - ref) < 1e-5


def test_ranking_matches_loop_reference_random():
    gene, img = _gene_and_image(9)
    scales = (3, 20, None)  # 20 is clipped to B - 1
    out = ranking_consistency_loss(img, gene, scales=scales, tau=0.05, delta=0.05)
    ref = _reference_ranking(img, gene, scales, 0.05, 0.05, True)
    assert abs(float(out) - ref) < 1e-4 * max(1.0, abs(ref))


def test_ranking_zero_when_orderings_agree_with_margin():
    gene, _ = _gene_and_image(10)
    # Image similarities in the same order as the gene ones, consecutive gaps of 1 >> tau.
    ranks = gene.argsort(dim=1).argsort(dim=1).float()
    out = ranking_consistency_loss(ranks, gene, tau=0.05)
    assert float(out) < 1e-6
    reversed_ = ranking_consistency_loss(-ranks, gene, tau=0.05)
    assert float(reversed_) > 0.5


def test_ranking_disagree_costs_more_than_agree():
    gene, _ = _gene_and_image(16)
    agree = ranking_consistency_loss(gene, gene)
    reverse = ranking_consistency_loss(-gene, gene)
    random_ = ranking_consistency_loss(_gene_and_image(16, seed=5)[1], gene)
    assert agree < random_ < reverse


def test_ranking_gradient_step_improves_agreement():
    n, d = 24, 8
    g = torch.randn(n, d, generator=_gen(1))
    gene = cosine_similarity_matrix(g)
    x = torch.randn(n, d, generator=_gen(2), requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.05)
    with torch.no_grad():
        loss0 = ranking_consistency_loss(cosine_similarity_matrix(x), gene)
        agree0 = rank_agreement(cosine_similarity_matrix(x), gene)
    for _ in range(40):
        opt.zero_grad()
        loss = ranking_consistency_loss(cosine_similarity_matrix(x), gene)
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss1 = ranking_consistency_loss(cosine_similarity_matrix(x), gene)
        agree1 = rank_agreement(cosine_similarity_matrix(x), gene)
    assert loss1 < 0.8 * loss0
    assert agree1 > agree0 + 0.2


def test_ranking_gene_side_gets_no_gradient():
    g = torch.randn(10, 4, generator=_gen(), requires_grad=True)
    x = torch.randn(10, 4, generator=_gen(1), requires_grad=True)
    gene = cosine_similarity_matrix(g)
    gene.retain_grad()
    ranking_consistency_loss(cosine_similarity_matrix(x), gene).backward()
    assert g.grad is None
    assert gene.grad is None
    assert x.grad is not None
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("scales", [(3,), (None,), (2, 5, None)])
def test_ranking_chunked_equals_unchunked(scales):
    g = torch.randn(13, 5, generator=_gen(3))
    x0 = torch.randn(13, 5, generator=_gen(4))
    gene = cosine_similarity_matrix(g)

    def value_and_grad(chunk_size):
        x = x0.clone().requires_grad_(True)
        loss = ranking_consistency_loss(
            cosine_similarity_matrix(x), gene, scales=scales, delta=0.01, chunk_size=chunk_size
        )
        loss.backward()
        return loss.detach(), x.grad

    ref_value, ref_grad = value_and_grad(13)
    for chunk_size in (None, 1, 2, 5, 100):
        value, grad = value_and_grad(chunk_size)
        assert torch.allclose(value, ref_value, atol=1e-6), chunk_size
        assert torch.allclose(grad, ref_grad, atol=1e-6), chunk_size
    # also without gradients (no recomputation)
    with torch.no_grad():
        v = ranking_consistency_loss(
            cosine_similarity_matrix(x0), gene, scales=scales, delta=0.01, chunk_size=3
        )
    assert torch.allclose(v, ref_value, atol=1e-6)


def test_ranking_delta_masks_all_pairs():
    n = 8
    gene = 0.1 * torch.rand(n, n, generator=_gen())
    gene = (gene + gene.T) / 2
    x = torch.randn(n, 4, generator=_gen(1), requires_grad=True)
    loss = ranking_consistency_loss(cosine_similarity_matrix(x), gene, delta=0.2)
    assert float(loss.detach()) == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert torch.all(x.grad == 0)
    # the sampled variant too
    loss_s = ranking_consistency_loss(
        cosine_similarity_matrix(x), gene, delta=0.2, n_pairs=10, generator=_gen()
    )
    assert float(loss_s.detach()) == 0.0
    assert loss_s.requires_grad
    # a smaller delta keeps some pairs
    assert ranking_consistency_loss(cosine_similarity_matrix(x), gene, delta=0.01) > 0


def test_ranking_tiny_batches_are_zero_and_attached():
    x = torch.randn(2, 3, requires_grad=True)
    loss = ranking_consistency_loss(cosine_similarity_matrix(x), torch.eye(2))
    assert float(loss.detach()) == 0.0
    assert loss.requires_grad


def test_ranking_sampled_close_to_exhaustive_and_deterministic():
    gene, img = _gene_and_image(12, seed=7)
    scales = (4, None)
    exact = float(ranking_consistency_loss(img, gene, scales=scales))
    gen = _gen(123)
    draws = torch.stack(
        [
            ranking_consistency_loss(img, gene, scales=scales, n_pairs=32, generator=gen)
            for _ in range(200)
        ]
    )
    assert abs(float(draws.mean()) - exact) < 0.03 * exact
    assert draws.std() > 0  # really random
    a = ranking_consistency_loss(img, gene, scales=scales, n_pairs=16, generator=_gen(5))
    b = ranking_consistency_loss(img, gene, scales=scales, n_pairs=16, generator=_gen(5))
    assert torch.equal(a, b)


def test_ranking_sampled_has_gradients():
    gene, _ = _gene_and_image(12)
    x = torch.randn(12, 6, generator=_gen(9), requires_grad=True)
    loss = ranking_consistency_loss(cosine_similarity_matrix(x), gene, n_pairs=8, generator=_gen())
    loss.backward()
    assert x.grad.abs().sum() > 0


def test_ranking_under_autocast_is_float32():
    gene, img = _gene_and_image(10)
    ref = ranking_consistency_loss(img, gene)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ranking_consistency_loss(img.bfloat16(), gene.bfloat16())
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, rtol=5e-2)


def test_ranking_validates_input():
    gene, img = _gene_and_image(6)
    with pytest.raises(ValueError, match="square"):
        ranking_consistency_loss(img[:, :3], gene)
    with pytest.raises(ValueError, match="shape"):
        ranking_consistency_loss(img, gene[:5, :5])
    with pytest.raises(ValueError, match="tau"):
        ranking_consistency_loss(img, gene, tau=0)
    with pytest.raises(ValueError, match="delta"):
        ranking_consistency_loss(img, gene, delta=-0.1)
    with pytest.raises(ValueError, match="scales"):
        ranking_consistency_loss(img, gene, scales=(0,))
    with pytest.raises(ValueError, match="scales"):
        ranking_consistency_loss(img, gene, scales=())
    # a single scale need not be wrapped in a tuple
    assert torch.allclose(
        ranking_consistency_loss(img, gene, scales=3),
        ranking_consistency_loss(img, gene, scales=(3,)),
    )


# ------------------------------------------------------------------------------------------------
# rank agreement
# ------------------------------------------------------------------------------------------------


def test_rank_agreement_values():
    gene, img = _gene_and_image(15)
    assert torch.allclose(rank_agreement(gene, gene), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(rank_agreement(-gene, gene), torch.tensor(-1.0), atol=1e-5)
    # monotone transforms do not change ranks
    assert torch.allclose(rank_agreement(torch.exp(3 * gene), gene), torch.tensor(1.0), atol=1e-5)
    r = rank_agreement(img, gene, k=5)
    assert -1.0 <= float(r) <= 1.0
    # k restricts to gene-side neighbours: matches a per-row Spearman computed by hand
    n, k = gene.shape[0], 5
    rhos = []
    for i in range(n):
        masked = gene[i].clone()
        masked[i] = -float("inf")
        idx = masked.topk(k).indices
        a = img[i, idx].argsort().argsort().float()
        b = gene[i, idx].argsort().argsort().float()
        rhos.append(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert torch.allclose(r, torch.stack(rhos).mean(), atol=1e-5)


def test_rank_agreement_no_grad_and_ties():
    x = torch.randn(6, 3, requires_grad=True)
    r = rank_agreement(cosine_similarity_matrix(x), cosine_similarity_matrix(x))
    assert not r.requires_grad
    # a constant image row has no defined correlation and is left out of the mean
    gene, img = _gene_and_image(6)
    img = img.clone()
    img[0] = 0.5
    assert torch.isfinite(rank_agreement(img, gene))
    assert torch.isnan(rank_agreement(torch.zeros(6, 6), gene))


# ------------------------------------------------------------------------------------------------
# DDP: 2 CPU processes with gloo
# ------------------------------------------------------------------------------------------------


def _ddp_worker(rank, world_size, init_file, out_dir, q_full, k_full):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        b = q_full.shape[0] // world_size
        q = q_full[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        k = k_full[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        assert get_rank_world_size() == (rank, world_size)
        assert gather_with_grad(q).shape == q_full.shape
        loss = info_nce(q, k, temperature=0.1, gather_distributed=True)
        loss.backward()
        local = info_nce(q.detach(), k.detach(), temperature=0.1, gather_distributed=False)
        torch.save(
            {"loss": loss.detach(), "local": local, "q_grad": q.grad, "k_grad": k.grad},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_info_nce_gather_distributed_matches_full_batch(tmp_path):
    import torch.multiprocessing as mp

    world_size, n = 2, 12
    q_full = torch.randn(n, 5, generator=_gen(1))
    k_full = torch.randn(n, 5, generator=_gen(2))
    t0 = time.perf_counter()
    mp.spawn(
        _ddp_worker,
        args=(world_size, str(tmp_path / "init"), str(tmp_path), q_full, k_full),
        nprocs=world_size,
        join=True,
    )
    elapsed = time.perf_counter() - t0
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]

    q = q_full.clone().requires_grad_(True)
    k = k_full.clone().requires_grad_(True)
    full = info_nce(q, k, temperature=0.1)
    full.backward()

    # Each rank's loss is the mean over its rows against the negatives of all ranks, so the
    # mean over ranks is the full-batch loss (equal local batch sizes).
    mean_loss = torch.stack([r["loss"] for r in results]).mean()
    assert torch.allclose(mean_loss, full.detach(), atol=1e-6)
    # With only local negatives the value differs: the gather really added negatives.
    assert not torch.allclose(results[0]["loss"], results[0]["local"], atol=1e-4)
    # Gradients flow across ranks: the all-gather backward sums over ranks, so each rank holds
    # world_size x the full-batch gradient of its rows (DDP's averaging divides it back).
    b = n // world_size
    for r, res in enumerate(results):
        rows = slice(r * b, (r + 1) * b)
        assert torch.allclose(res["q_grad"], world_size * q.grad[rows], atol=1e-6)
        assert torch.allclose(res["k_grad"], world_size * k.grad[rows], atol=1e-6)
    # informative only: spawning two interpreters dominates the runtime
    assert elapsed < 120


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_losses_on_cuda_under_fp16_autocast():
    dev = torch.device("cuda")
    g = torch.randn(40, 16, generator=_gen(1)).to(dev)
    x = torch.randn(40, 16, generator=_gen(2)).to(dev).requires_grad_(True)
    gene = cosine_similarity_matrix(g)
    ref = ranking_consistency_loss(cosine_similarity_matrix(x), gene)
    with torch.autocast("cuda", dtype=torch.float16):
        img = cosine_similarity_matrix(x.half())
        out = ranking_consistency_loss(img, gene, chunk_size=7)
        nce = info_nce(x, g)
        sampled = ranking_consistency_loss(
            img, gene, n_pairs=8, generator=torch.Generator(dev).manual_seed(0)
        )
    assert out.dtype == nce.dtype == sampled.dtype == torch.float32
    assert torch.allclose(out, ref, rtol=1e-2)
    (out + nce + sampled).backward()
    assert torch.isfinite(x.grad).all()


def test_module_samples_ranking_pairs_only_for_large_batches():
    from rankbygene.model import RankByGeneModule
    from rankbygene.model._module import ALL_PAIRS_MAX_BATCH, AUTO_N_PAIRS

    module = RankByGeneModule(n_genes=5, backbone=None, n_input_features=4, n_latent=4)
    assert module.rank_n_pairs == "auto"  # the default
    assert module.pairs_per_anchor(ALL_PAIRS_MAX_BATCH) is None  # every pair
    assert module.pairs_per_anchor(ALL_PAIRS_MAX_BATCH + 1) == AUTO_N_PAIRS
    for explicit in (None, 16):
        module = RankByGeneModule(5, None, n_input_features=4, rank_n_pairs=explicit)
        assert module.pairs_per_anchor(4096) == explicit
    with pytest.raises(ValueError, match="rank_n_pairs"):
        RankByGeneModule(5, None, n_input_features=4, rank_n_pairs=0)
