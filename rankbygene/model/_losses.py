"""Training losses of RankByGene: InfoNCE, cross-modal ranking consistency and distillation.

All functions are pure torch, work on CPU and CUDA, compute similarities in float32 even under
autocast, and (for the contrastive terms) can use the negatives of all processes under DDP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rankbygene._precision import float32_region

__all__ = [
    "cosine_similarity_matrix",
    "distillation_loss",
    "expression_similarity",
    "gather_with_grad",
    "get_rank_world_size",
    "info_nce",
    "rank_agreement",
    "ranking_consistency_loss",
]

# Elements of one (C x K x K) block of pairwise differences when ``chunk_size`` is None:
# 2**24 float32 values are 64 MiB per temporary, a few temporaries per chunk.
_MAX_CHUNK_ELEMENTS = 2**24


# ----------------------------------------------------------------------------------------------
# distributed helpers
# ----------------------------------------------------------------------------------------------


def get_rank_world_size() -> tuple[int, int]:
    """Rank of this process and number of processes.

    Returns
    -------
    ``(rank, world_size)`` of the default process group, or ``(0, 1)`` when ``torch.distributed``
    is unavailable or not initialised.

    Examples
    --------
    >>> get_rank_world_size()
    (0, 1)
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` from every process along dim 0, keeping gradients.

    Uses :func:`torch.distributed.nn.functional.all_gather`, whose backward sums the gradients of
    all processes into each process's own slice. Every process must pass a tensor of the same
    shape. Without an initialised process group of size > 1, ``x`` is returned unchanged.

    Parameters
    ----------
    x
        Local tensor, ``B_local x ...``.

    Returns
    -------
    ``(world_size * B_local) x ...`` tensor; process ``r``'s rows are at
    ``r * B_local : (r + 1) * B_local``.

    Examples
    --------
    >>> x = torch.randn(4, 8)
    >>> gather_with_grad(x) is x  # single process
    True
    """
    _, world_size = get_rank_world_size()
    if world_size == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


# ----------------------------------------------------------------------------------------------
# similarities
# ----------------------------------------------------------------------------------------------


def cosine_similarity_matrix(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Cosine similarities between the rows of ``x`` and the rows of ``y``, in float32.

    Parameters
    ----------
    x
        ``N x D`` embeddings.
    y
        ``M x D`` embeddings; ``x`` itself when None.

    Returns
    -------
    ``N x M`` float32 matrix ``S_ij = x_i . y_j / (|x_i| |y_j|)`` (autocast is disabled for the
    product so that half precision does not blur small differences of similarity).

    Examples
    --------
    >>> s = cosine_similarity_matrix(torch.randn(5, 16))
    >>> s.shape, bool(torch.allclose(s.diagonal(), torch.ones(5)))
    (torch.Size([5, 5]), True)
    """
    if x.ndim != 2:
        raise ValueError(f"`x` must be 2-D (N x D), got shape {tuple(x.shape)}.")
    if y is not None and (y.ndim != 2 or y.shape[1] != x.shape[1]):
        raise ValueError(
            f"`y` must be 2-D with {x.shape[1]} columns like `x`, got shape {tuple(y.shape)}."
        )
    with float32_region(x.device):
        xn = F.normalize(x.float(), dim=1)
        yn = xn if y is None else F.normalize(y.float(), dim=1)
        return xn @ yn.T


def expression_similarity(expr: Tensor) -> Tensor:
    """Pearson correlation between the expression vectors of spots.

    Each row is centred on its mean, then the cosine similarity of the centred rows is taken.
    A spot with constant expression (zero variance) has similarity 0 to every spot, itself
    included.

    Parameters
    ----------
    expr
        ``B x G`` expression (e.g. log-normalised counts over the gene panel).

    Returns
    -------
    ``B x B`` float32 correlation matrix.

    Examples
    --------
    >>> e = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.5], [3.0, 2.0, 1.0]])
    >>> expression_similarity(e).round(decimals=3)
    tensor([[ 1.0000,  0.9980, -1.0000],
            [ 0.9980,  1.0000, -0.9980],
            [-1.0000, -0.9980,  1.0000]])
    """
    if expr.ndim != 2:
        raise ValueError(f"`expr` must be 2-D (spots x genes), got shape {tuple(expr.shape)}.")
    with float32_region(expr.device):
        e = expr.float()
        return cosine_similarity_matrix(e - e.mean(dim=1, keepdim=True))


# ----------------------------------------------------------------------------------------------
# contrastive losses
# ----------------------------------------------------------------------------------------------


def info_nce(
    query: Tensor,
    key: Tensor,
    temperature: float = 0.07,
    symmetric: bool = True,
    gather_distributed: bool = False,
) -> Tensor:
    """InfoNCE (CLIP) loss between paired embeddings with in-batch negatives.

    Both inputs are L2-normalised here; row ``i`` of ``query`` is the positive of row ``i`` of
    ``key``, every other row is a negative. Logits are cosine similarities / ``temperature``,
    computed in float32.

    Parameters
    ----------
    query
        ``B x D`` embeddings.
    key
        ``B x D`` embeddings.
    temperature
        Softmax temperature (> 0). 0.07 is the CLIP/MoCo default.
    symmetric
        If True, the mean of the query->key and key->query cross-entropies; else query->key only.
    gather_distributed
        Under an initialised process group of size > 1, use the keys (and, for the symmetric term,
        the queries) of all processes as negatives, through :func:`gather_with_grad`. All processes
        must have the same local batch size ``B``: the positive of local row ``i`` on rank ``r`` is
        global row ``r * B + i``. The value on each process is its local mean; averaging over
        processes (as DDP does with gradients) gives the loss of the global batch.

    Returns
    -------
    Scalar float32 loss.

    Examples
    --------
    >>> z = torch.randn(8, 16)
    >>> bool(info_nce(z, z) < info_nce(z, z[torch.randperm(8)]))
    True
    """
    if query.ndim != 2 or query.shape != key.shape:
        raise ValueError(
            f"`query` and `key` must both be B x D with the same shape, got "
            f"{tuple(query.shape)} and {tuple(key.shape)}."
        )
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    with float32_region(query.device):
        q = F.normalize(query.float(), dim=1)
        k = F.normalize(key.float(), dim=1)
        rank, world_size = get_rank_world_size() if gather_distributed else (0, 1)
        if world_size > 1:
            all_k = gather_with_grad(k)
            all_q = gather_with_grad(q) if symmetric else None
        else:
            all_k, all_q = k, (q if symmetric else None)
        labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
        loss = F.cross_entropy(q @ all_k.T / temperature, labels)
        if all_q is not None:  # symmetric
            loss = 0.5 * (loss + F.cross_entropy(k @ all_q.T / temperature, labels))
    return loss


def distillation_loss(
    student: Tensor,
    teacher: Tensor,
    temperature: float = 0.07,
    gather_distributed: bool = False,
) -> Tensor:
    """Teacher-student distillation: symmetric InfoNCE between student and teacher embeddings.

    The teacher embeddings are detached, so only the student receives gradients.

    Parameters
    ----------
    student
        ``B x D`` student embeddings (e.g. of strongly augmented patches).
    teacher
        ``B x D`` teacher embeddings of the same spots (e.g. of weakly augmented patches).
    temperature
        Softmax temperature, see :func:`info_nce`.
    gather_distributed
        Use the negatives of all processes, see :func:`info_nce`.

    Returns
    -------
    Scalar float32 loss.

    Examples
    --------
    >>> s = torch.randn(8, 16, requires_grad=True)
    >>> t = torch.randn(8, 16, requires_grad=True)
    >>> distillation_loss(s, t).backward()
    >>> s.grad is not None, t.grad is None
    (True, True)
    """
    return info_nce(
        student,
        teacher.detach(),
        temperature=temperature,
        symmetric=True,
        gather_distributed=gather_distributed,
    )


# ----------------------------------------------------------------------------------------------
# ranking consistency
# ----------------------------------------------------------------------------------------------


def _candidates(gene_sim: Tensor, k: int | None) -> Tensor:
    """Candidate indices per anchor, ``B x K``: k gene-side nearest neighbours, or all others."""
    n = gene_sim.shape[0]
    if k is None:
        cols = torch.arange(n - 1, device=gene_sim.device)
        rows = torch.arange(n, device=gene_sim.device)
        # Row i lists 0..n-1 without i: shift the columns at or after the diagonal by one.
        return cols[None, :] + (cols[None, :] >= rows[:, None]).long()
    masked = gene_sim.clone()
    masked.fill_diagonal_(float("-inf"))
    return masked.topk(min(k, n - 1), dim=1).indices


def _pair_terms(
    img_j: Tensor,
    img_k: Tensor,
    gene_j: Tensor,
    gene_k: Tensor,
    tau: float,
    delta: float,
    weighted: bool,
) -> tuple[Tensor, Tensor]:
    """Sum of weighted pair costs and sum of weights for broadcastable (j, k) similarities."""
    d_gene = gene_j - gene_k
    valid = d_gene > delta
    # delta >= 0, so the valid differences are positive and |dS^G| is dS^G itself.
    w = torch.where(valid, d_gene, 0.0) if weighted else valid.to(d_gene.dtype)
    # tau * softplus(x / tau) is a smooth hinge: slope 1 for clear violations, as the
    # reference's relu, so its lambda_rank values carry over (unscaled, lambda 5 swamped the
    # contrastive term and hurt held-out prediction).
    cost = tau * F.softplus((img_k - img_j) / tau)
    return (w * cost).sum(), w.sum()


def _chunk_terms(
    s_img: Tensor, s_gene: Tensor, tau: float, delta: float, weighted: bool
) -> tuple[Tensor, Tensor]:
    """Exhaustive pair terms of a chunk of anchors; ``s_*`` are ``C x K`` candidate similarities."""
    # Index [c, j, k] of the C x K x K block is the ordered pair (j, k) of anchor c.
    return _pair_terms(
        s_img[:, :, None],
        s_img[:, None, :],
        s_gene[:, :, None],
        s_gene[:, None, :],
        tau,
        delta,
        weighted,
    )


def ranking_consistency_loss(
    image_sim: Tensor,
    gene_sim: Tensor,
    scales: Sequence[int | None] | int | None = (8, 32, None),
    tau: float = 0.05,
    delta: float = 0.0,
    weighted: bool = True,
    chunk_size: int | None = None,
    n_pairs: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Cross-modal ranking consistency loss (multi-scale).

    For anchor ``i`` and candidates ``j != k`` (both ``!= i``), the gene side orders the pair by
    ``S^G``: every ordered pair with ``S^G_ij - S^G_ik > delta`` costs
    ``tau * softplus((S^I_ik - S^I_ij) / tau)``, a smooth hinge (it tends to
    ``relu(S^I_ik - S^I_ij)`` as ``tau -> 0``) that penalises the image side when it does not
    rank ``j`` above ``k`` by a margin of a few ``tau``. With ``weighted``, each pair is weighted
    by ``|S^G_ij - S^G_ik|`` so that clear gene-side orderings count more than near ties.
    The loss at one scale is the weighted mean over all valid (anchor, j, k) triplets of the
    batch, ``sum(w * cost) / sum(w)``, and 0 (still attached to the graph) when there is none.

    Scales: for an integer ``k``, each anchor's candidates are its ``k`` nearest gene-side
    neighbours (largest ``S^G_ij``, ``j != i``; ``k`` is clipped to ``B - 1``), which enforces the
    local ordering; for None, all other spots of the batch (global ordering). The total is the sum
    over scales.

    Note: the reference implementation's ranking term reduces to
    :math:`\mathrm{relu}(|\Delta S^I| - |\Delta S^G|)`, which ignores whether the two orderings
    agree; this function implements the ordering constraint described in the paper.

    Parameters
    ----------
    image_sim
        ``B x B`` image-side similarities ``S^I`` (e.g. :func:`cosine_similarity_matrix` of the
        student embeddings); receives gradients.
    gene_sim
        ``B x B`` gene-side similarities ``S^G`` that define the target ordering (gene embeddings,
        or :func:`expression_similarity` of the expression); detached here.
    scales
        Neighbourhood sizes (int) and/or None (whole batch). A single int or None is one scale.
    tau
        Temperature of the smooth hinge (> 0). The default 0.05 sits at the scale of the
        differences between cosine similarities of neighbouring spots (~0.01-0.5) and of the
        contrastive temperature: a pair mis-ordered by 0.1 costs ~0.106 with slope ~0.88,
        a pair correctly ordered by 0.2 costs ~0.001, so the loss focuses on violations without
        the vanishing gradients of a near-0/1 relaxation (small ``tau``) or the indifference to
        the order of a nearly linear one (large ``tau``).
    delta
        Pairs whose gene similarities differ by ``<= delta`` (>= 0) are ignored (gene-side ties
        and noise).
    weighted
        Weight pairs by ``|S^G_ij - S^G_ik|`` (else weight 1).
    chunk_size
        Number of anchors per block of the exhaustive computation, which builds ``C x K x K``
        pairwise differences. None picks the largest chunk with ``C * K * K <= 2**24`` elements.
        When there is more than one chunk and gradients are needed, each chunk is checkpointed
        (recomputed in backward), so memory stays at one chunk rather than ``O(B * K^2)``. The
        value does not depend on the chunking (up to float rounding).
    n_pairs
        If given, the sampled-pairs variant: per anchor and scale, ``n_pairs`` random ordered pairs
        ``(j, k)``, ``j != k``, drawn uniformly among the candidates, with ``O(B * n_pairs)``
        memory beyond the inputs. Its value is a consistent estimate of the exhaustive loss (the
        ratio of the sampled sums), for very large batches.
    generator
        Random generator of the sampled variant (on the device it draws on; the indices are
        moved to the device of ``image_sim``).

    Returns
    -------
    Scalar float32 loss.

    Examples
    --------
    >>> g = torch.randn(16, 8)
    >>> gene_sim = cosine_similarity_matrix(g)
    >>> agree = ranking_consistency_loss(gene_sim * 10, gene_sim)
    >>> disagree = ranking_consistency_loss(-gene_sim * 10, gene_sim)
    >>> bool(agree < disagree)
    True
    """
    if image_sim.ndim != 2 or image_sim.shape[0] != image_sim.shape[1]:
        raise ValueError(
            f"`image_sim` must be a square B x B matrix, got {tuple(image_sim.shape)}."
        )
    if gene_sim.shape != image_sim.shape:
        raise ValueError(
            f"`gene_sim` must have the shape of `image_sim` {tuple(image_sim.shape)}, "
            f"got {tuple(gene_sim.shape)}."
        )
    if tau <= 0:
        raise ValueError(f"`tau` must be > 0, got {tau}.")
    if delta < 0:
        raise ValueError(f"`delta` must be >= 0, got {delta}.")
    if scales is None or isinstance(scales, int):
        scales = [scales]
    scales = list(scales)
    if not scales:
        raise ValueError("`scales` must name at least one scale (an int or None).")
    for s in scales:
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
            raise ValueError(f"`scales` entries must be ints >= 1 or None, got {s!r}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1 or None, got {chunk_size}.")
    if n_pairs is not None and n_pairs < 1:
        raise ValueError(f"`n_pairs` must be >= 1 or None, got {n_pairs}.")

    with float32_region(image_sim.device):
        s_img_full = image_sim.float()
        s_gene_full = gene_sim.detach().float()
        # Differentiable zero so that the result is attached to the graph even with no triplet.
        total = s_img_full.sum() * 0.0
        for scale in scales:
            cand = _candidates(s_gene_full, scale)
            n_cand = cand.shape[1]
            if n_cand < 2:
                continue
            s_img = s_img_full.gather(1, cand)
            s_gene = s_gene_full.gather(1, cand)
            if n_pairs is not None:
                num, den = _sampled_terms(s_img, s_gene, n_pairs, generator, tau, delta, weighted)
            else:
                num, den = _exhaustive_terms(s_img, s_gene, chunk_size, tau, delta, weighted)
            total = total + torch.where(
                den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), num * 0.0
            )
    return total


def _exhaustive_terms(
    s_img: Tensor,
    s_gene: Tensor,
    chunk_size: int | None,
    tau: float,
    delta: float,
    weighted: bool,
) -> tuple[Tensor, Tensor]:
    n, n_cand = s_img.shape
    if chunk_size is None:
        chunk_size = max(1, _MAX_CHUNK_ELEMENTS // (n_cand * n_cand))
    if chunk_size >= n:
        return _chunk_terms(s_img, s_gene, tau, delta, weighted)
    recompute = torch.is_grad_enabled() and s_img.requires_grad
    num: Tensor | None = None
    den: Tensor | None = None
    for start in range(0, n, chunk_size):
        args = (s_img[start : start + chunk_size], s_gene[start : start + chunk_size])
        if recompute:
            c_num, c_den = checkpoint(
                _chunk_terms, *args, tau, delta, weighted, use_reentrant=False
            )
        else:
            c_num, c_den = _chunk_terms(*args, tau, delta, weighted)
        num = c_num if num is None else num + c_num
        den = c_den if den is None else den + c_den
    assert num is not None  # n >= 1: at least one chunk
    assert den is not None
    return num, den


def _sampled_terms(
    s_img: Tensor,
    s_gene: Tensor,
    n_pairs: int,
    generator: torch.Generator | None,
    tau: float,
    delta: float,
    weighted: bool,
) -> tuple[Tensor, Tensor]:
    n, n_cand = s_img.shape
    device = generator.device if generator is not None else s_img.device
    # Uniform over ordered pairs with j != k: k is j shifted by 1..K-1 (mod K).
    j = torch.randint(0, n_cand, (n, n_pairs), generator=generator, device=device)
    shift = torch.randint(1, n_cand, (n, n_pairs), generator=generator, device=device)
    j = j.to(s_img.device)
    k = (j + shift.to(s_img.device)) % n_cand
    return _pair_terms(
        s_img.gather(1, j),
        s_img.gather(1, k),
        s_gene.gather(1, j),
        s_gene.gather(1, k),
        tau,
        delta,
        weighted,
    )


# ----------------------------------------------------------------------------------------------
# metric
# ----------------------------------------------------------------------------------------------


def _average_ranks(x: Tensor) -> Tensor:
    """Row-wise ranks (0-based) of ``x``, ties sharing the average of their ranks."""
    s = x.sort(dim=1).values
    lo = torch.searchsorted(s, x.contiguous(), side="left")
    hi = torch.searchsorted(s, x.contiguous(), side="right")
    return (lo + hi - 1).to(torch.float32) / 2


@torch.no_grad()
def rank_agreement(image_sim: Tensor, gene_sim: Tensor, k: int | None = None) -> Tensor:
    """Mean over anchors of the Spearman correlation between image- and gene-side orderings.

    For each anchor ``i``, the Spearman rank correlation (average ranks for ties) between row
    ``i`` of ``image_sim`` and row ``i`` of ``gene_sim`` over the other spots of the batch
    (the diagonal is excluded), or over the ``k`` nearest gene-side neighbours of ``i`` when
    ``k`` is given. Anchors whose correlation is undefined (a constant row) are left out of the
    mean; NaN when no anchor has a defined correlation. No gradients.

    Parameters
    ----------
    image_sim
        ``B x B`` image-side similarities.
    gene_sim
        ``B x B`` gene-side similarities.
    k
        Restrict to each anchor's ``k`` nearest gene-side neighbours (clipped to ``B - 1``).

    Returns
    -------
    Scalar float32 tensor in ``[-1, 1]``: 1 when the orderings agree, -1 when reversed.

    Examples
    --------
    >>> s = cosine_similarity_matrix(torch.randn(10, 4))
    >>> round(float(rank_agreement(s, s)), 4), round(float(rank_agreement(-s, s)), 4)
    (1.0, -1.0)
    """
    if image_sim.ndim != 2 or image_sim.shape[0] != image_sim.shape[1]:
        raise ValueError(
            f"`image_sim` must be a square B x B matrix, got {tuple(image_sim.shape)}."
        )
    if gene_sim.shape != image_sim.shape:
        raise ValueError(
            f"`gene_sim` must have the shape of `image_sim` {tuple(image_sim.shape)}, "
            f"got {tuple(gene_sim.shape)}."
        )
    if k is not None and k < 1:
        raise ValueError(f"`k` must be >= 1 or None, got {k}.")
    s_gene = gene_sim.float()
    cand = _candidates(s_gene, k)
    if cand.shape[1] < 2:
        return torch.tensor(float("nan"), device=image_sim.device)
    r_img = _average_ranks(image_sim.float().gather(1, cand))
    r_gene = _average_ranks(s_gene.gather(1, cand))
    r_img = r_img - r_img.mean(dim=1, keepdim=True)
    r_gene = r_gene - r_gene.mean(dim=1, keepdim=True)
    denom = r_img.norm(dim=1) * r_gene.norm(dim=1)
    rho = (r_img * r_gene).sum(dim=1) / denom
    rho = torch.where(denom > 0, rho, float("nan"))
    return rho.nanmean()
