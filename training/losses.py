"""RadZero's multi-positive NCE over (sentence, image) cosines.

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
"""

from __future__ import annotations

import torch

from radflash.errors import InputError


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
