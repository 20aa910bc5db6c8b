"""The training losses: RadZero's multi-positive NCE over (sentence, image) cosines, the map loss,
and CARZero's symmetric cross-entropy over its two score matrices.

:func:`multi_positive_nce` is the formula below on a cosine matrix; :func:`contrastive_loss` builds
that matrix from a batch (gathered over ranks under DDP, so negatives come from the global batch);
:func:`map_loss` is the optional pixel-map supervision on phantoms (BCE against patch coverage).

An image owns several minimal sentences, ALL of them positives (negated ones too: "There is no
pneumothorax" describes that image as much as "There is cardiomegaly" does). Rows are sentences,
columns images of the (globally gathered) batch; with e_kj = exp(ℓ_kj / τ) and g(k) the image of
sentence k:

    L_row(k) = −log( e_{k,g(k)} / Σ_j e_kj )
    L_col(k) = −log( e_{k,g(k)} / ( e_{k,g(k)} + Σ_{m: g(m) ≠ g(k)} e_{m,g(k)} ) )
    L        = ½ ( mean_k L_row + mean_k L_col )

The column term excludes the image's OTHER sentences from its own denominator, so sibling
positives never compete. An image without any sentence in the batch has no rows: its column
only ever appears as a negative in the row terms of other images' sentences.

CARZero (:func:`carzero_loss`) pairs each image with ONE text and scores every (image, text) pair of
the batch twice, s1 (i2t) and s2 (t2i), both (B, B) with the true pairs on the diagonal:

    CE_sym(s) = ½ ( CE(s, arange B) + CE(sᵀ, arange B) )      (the reference's ``DQNCOSLoss``)
    L         = CE_sym(s1) + CE_sym(s2)

with no temperature: the fusion head's scalar scores are the logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from radflash.errors import InputError
from radflash.models import RadZero
from radflash.training.data import Batch
from radflash.training.distributed import gather_from_ranks

if TYPE_CHECKING:
    from radflash.models.carzero import CARZero


def multi_positive_nce(cos: torch.Tensor, owner: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Scalar loss for cosines ``cos`` (K sentences × J images) and ``owner[k]`` = image of sentence k.

    Computed with logsumexp on ℓ/τ (exp(1/0.01) overflows fp32), differentiable in ``cos`` and ``tau``.
    """
    if cos.ndim != 2:
        raise InputError(f"cos must be (sentences, images), got shape {tuple(cos.shape)}")
    k, j = cos.shape
    if owner.ndim != 1 or owner.shape[0] != k:
        raise InputError(f"owner must have one image index per sentence ({k}), got shape {tuple(owner.shape)}")
    if k == 0:
        raise InputError("no sentences: the loss is undefined for an empty batch")
    if owner.dtype not in (torch.int64, torch.int32) or int(owner.min()) < 0 or int(owner.max()) >= j:
        raise InputError(f"owner must be integer image indices in [0, {j})")
    owner = owner.long()
    logits = cos / tau
    rows = torch.arange(k, device=cos.device)
    positive = logits[rows, owner]  # ℓ_{k,g(k)}/τ
    loss_row = torch.logsumexp(logits, dim=1) - positive
    # column term: C[k, m] = ℓ_{m,g(k)}/τ over sentences m of OTHER images, plus k itself
    col = logits[:, owner].T  # (K, K): row k holds column g(k) of the logits
    keep = (owner[None, :] != owner[:, None]) | torch.eye(k, dtype=torch.bool, device=cos.device)
    loss_col = torch.logsumexp(col.masked_fill(~keep, float("-inf")), dim=1) - positive
    return 0.5 * (loss_row.mean() + loss_col.mean())


def contrastive_loss(model: RadZero, tokens: torch.Tensor, text: torch.Tensor, batch: Batch,
                     *, distributed: bool = False, mask_duplicates: bool = False) -> torch.Tensor:
    """Multi-positive NCE on ℓ = cosine(LN tokens, LN sentence features), arranged sentences × images.

    ℓ is computed once per UNIQUE sentence text and then indexed per sentence instance.
    """
    text_index, owner, hashes = batch.text_index, batch.owner, batch.text_hash
    if mask_duplicates and hashes is None:
        raise ValueError("mask_duplicates needs batch.text_hash")
    if distributed:
        world, rank = dist.get_world_size(), dist.get_rank()
        b_local = torch.tensor([tokens.shape[0], text.shape[0]], device=tokens.device)
        counts = [torch.zeros_like(b_local) for _ in range(world)]
        dist.all_gather(counts, b_local)
        img_off = sum(int(c[0]) for c in counts[:rank])
        txt_off = sum(int(c[1]) for c in counts[:rank])
        tokens, text = gather_from_ranks(tokens), gather_from_ranks(text)
        text_index = gather_from_ranks(text_index + txt_off, grad=False)
        owner = gather_from_ranks(owner + img_off, grad=False)
        if mask_duplicates:
            hashes = gather_from_ranks(hashes, grad=False)
    cos = model.cosine(tokens.float(), text.float())  # (B, U)
    cos = cos[:, text_index].T  # (K, B)
    if mask_duplicates:
        h = hashes[text_index]  # (K,)
        owns = torch.nn.functional.one_hot(owner, cos.shape[1]).to(cos.dtype)  # (K, B)
        dup = ((h[:, None] == h[None, :]).to(cos.dtype) @ owns) > 0  # image j owns a copy of k's text
        dup[torch.arange(len(owner), device=cos.device), owner] = False
        # A finite "minus infinity": exp(-1e4/τ) is 0 in both NCE terms, and unlike -inf its gradient
        # with respect to τ is 0 · finite = 0, not 0 · inf = NaN.
        cos = cos.masked_fill(dup, -1e4)
    return multi_positive_nce(cos, owner, model.log_tau.exp())


def map_loss(model: RadZero, tokens: torch.Tensor, text: torch.Tensor, batch: Batch, *,
             balanced: bool = False, pointing_weight: float = 0.0) -> torch.Tensor:
    """BCE between the prompt maps sigmoid(s) (patch tokens, CLS dropped, as ``similarity_maps``) and
    the fraction of each patch covered by the prompt's finding (0 everywhere where it is false).

    ``balanced``: within a map that has a target, the covered patches weigh as much in total as the
    uncovered ones. ``pointing_weight``: plus that weight × the cross-entropy between softmax(s) over
    the patches and the target normalised to a distribution, on maps that have a target.
    """
    if batch.map_rows is None or batch.map_targets is None:
        raise ValueError("map_loss needs a batch collated with map_prompts")
    v = torch.nn.functional.normalize(tokens[:, 1:].float(), dim=-1)
    t = torch.nn.functional.normalize(text[batch.map_rows].float(), dim=-1)
    s = torch.einsum("bnd,fd->bfn", v, t) / model.log_tau.exp()  # (B, F, N)
    target = batch.map_targets.flatten(2).to(s.dtype)
    covered = target.sum(-1, keepdim=True)  # (B, F, 1)
    if balanced:
        # an empty map's weight is irrelevant: it only ever multiplies a zero target
        pos_weight = ((target.shape[-1] - covered) / covered.clamp(min=1e-6)).clamp(1.0, 1e3)
        loss = -(pos_weight * target * torch.nn.functional.logsigmoid(s)
                 + (1 - target) * torch.nn.functional.logsigmoid(-s)).mean()
    else:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(s, target)
    if pointing_weight:
        has = covered[..., 0] > 0  # (B, F)
        if has.any():
            q = target[has] / covered[has]
            loss = loss - pointing_weight * (q * torch.log_softmax(s[has], dim=-1)).sum(-1).mean()
    return loss


def carzero_loss(scores: torch.Tensor, duplicates: torch.Tensor | None = None) -> torch.Tensor:
    """CE_sym(s1) + CE_sym(s2) for scores (2, B, B) of B images (rows) against their own B texts.

    ``duplicates`` (B, B) bool, optional: pairs (i, j ≠ i) whose texts are identical, so text j
    describes image i as well as its own; they are dropped from both softmaxes (set to −∞, whose
    softmax weight and gradient are exactly 0) instead of being pushed apart. The diagonal must
    stay False: it holds the targets.
    """
    if scores.ndim != 3 or scores.shape[0] != 2 or scores.shape[1] != scores.shape[2]:
        raise InputError(f"scores must be (2, B, B): s1 and s2 of B images against their own B texts, "
                         f"got shape {tuple(scores.shape)}")
    b = scores.shape[1]
    if b == 0:
        raise InputError("no pairs: the loss is undefined for an empty batch")
    target = torch.arange(b, device=scores.device)
    if duplicates is not None:
        if duplicates.shape != (b, b) or bool(duplicates.diagonal().any()):
            raise InputError(f"duplicates must be a (B, B) = ({b}, {b}) mask with a False diagonal")
        scores = scores.masked_fill(duplicates, float("-inf"))
    total = scores.new_zeros(())
    for s in scores:  # s1 (i2t), then s2 (t2i)
        total = total + 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.T, target))
    return total


def carzero_pair_loss(model: CARZero, tokens: torch.Tensor, memory: torch.Tensor, batch: Batch, *,
                      distributed: bool = False, mask_duplicates: bool = False) -> torch.Tensor:
    """:func:`carzero_loss` of a batch whose image i owns exactly one text (``batch.owner`` = arange).

    ``tokens`` (B, 1 + N, D) are the image tokens and ``memory`` (U, 1 + L, D) the prompt memories
    [t; W] of the batch's U unique texts (``CARZero.image_tokens`` / ``prompt_memory``). The fusion
    scores all B × U pairs, once per unique text, and the columns are then indexed per image, so
    s[:, i, j] scores image i against image j's text: exactly ``CARZero.forward`` on the B texts.
    Under DDP both are all-gathered with gradients first and every rank scores the GLOBAL batch
    (negatives from all ranks; all_gather's backward hands each rank the global loss's gradient
    of its own features, as for RadZero's :func:`contrastive_loss`).
    """
    text_index, owner, hashes = batch.text_index, batch.owner, batch.text_hash
    if owner.shape[0] != tokens.shape[0] or not torch.equal(owner, torch.arange(len(owner), device=owner.device)):
        raise InputError("a CARZero batch pairs every image with exactly one text, in image order")
    if mask_duplicates and hashes is None:
        raise ValueError("mask_duplicates needs batch.text_hash")
    if distributed:
        world, rank = dist.get_world_size(), dist.get_rank()
        local = torch.tensor([memory.shape[0]], device=memory.device)
        counts = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(counts, local)
        txt_off = sum(int(c[0]) for c in counts[:rank])
        tokens, memory = gather_from_ranks(tokens), gather_from_ranks(memory)
        text_index = gather_from_ranks(text_index + txt_off, grad=False)
        if mask_duplicates:
            hashes = gather_from_ranks(hashes, grad=False)
    scores = model.pair_scores(tokens, memory[:, 0], model.fusion.memory_kv(memory))  # (2, B, U)
    scores = scores[:, :, text_index]  # (2, B, B): column j = image j's text
    duplicates = None
    if mask_duplicates:
        h = hashes[text_index]  # content hashes: equal texts match across ranks too
        duplicates = (h[:, None] == h[None, :]) & ~torch.eye(len(h), dtype=torch.bool, device=h.device)
    return carzero_loss(scores.float(), duplicates)
