"""Rotation construction: R = U·H·P (docs/calibration.md, "The method"), all in float64.

- ``H``: normalised Sylvester Hadamard [D, D], D a power of two, ``H @ H.T = I``.
- ``P``: bit-reversal permutation matrix [D, D] (column j of ``y @ P`` is ``y[bitrev(j)]``).
- ``U``: eigenvectors of a symmetric covariance C [D, D], columns sorted by eigenvalue descending.

With C = U Λ Uᵀ, the rotated covariance (U H)ᵀ C (U H) = Hᵀ Λ H has every diagonal entry equal to
tr(Λ)/D: after U·H every channel is exactly equally important. Row-vector convention: x_rot = x @ R.

Recipes: ``oscar`` (U·H·P), ``hadamard`` (H·P, data-oblivious), ``identity`` (no rotation).
Granularity: ``layer`` (covariances averaged over KV heads, one R per layer) or ``kv-head``.
"""

from __future__ import annotations

from typing import Literal

import torch

Recipe = Literal["oscar", "hadamard", "identity"]
Granularity = Literal["layer", "kv-head"]


def check_head_dim(d: int) -> None:
    """Raise ValueError unless ``d`` is a power of two (needed by the Sylvester Hadamard)."""
    if d <= 0 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two for the Hadamard rotation, got {d}")


def hadamard(d: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix [d, d] (symmetric and orthogonal)."""
    check_head_dim(d)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / d**0.5).to(dtype)


def bit_reversal(d: int) -> torch.Tensor:
    """int64 [d]: the bit-reversal permutation of 0..d-1 (an involution)."""
    check_head_dim(d)
    bits = d.bit_length() - 1
    return torch.tensor([int(format(i, f"0{bits}b")[::-1], 2) if bits else 0 for i in range(d)])


def permutation_matrix(perm: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[d, d] matrix P with ``(y @ P)[..., j] == y[..., perm[j]]``."""
    return torch.eye(len(perm), dtype=dtype)[:, perm]


def eigh_descending(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric C [..., D, D] -> (eigenvalues [..., D] descending, U [..., D, D] columns matching), float64."""
    c = c.double()
    evals, u = torch.linalg.eigh((c + c.transpose(-1, -2)) / 2)
    return evals.flip(-1), u.flip(-1)


def hadamard_rotation(d: int, bit_reversal_perm: bool = True) -> torch.Tensor:
    """Data-oblivious R = H·P, float64 [d, d]."""
    h = hadamard(d)
    return h @ permutation_matrix(bit_reversal(d)) if bit_reversal_perm else h


def oscar_rotation(c: torch.Tensor, bit_reversal_perm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """C [..., D, D] -> (R = U·H·P [..., D, D], eigenvalues [..., D] descending), float64."""
    evals, u = eigh_descending(c)
    return u @ hadamard_rotation(c.shape[-1], bit_reversal_perm), evals


def build_rotations(
    c_k: torch.Tensor | None,
    c_v: torch.Tensor | None,
    recipe: Recipe,
    granularity: Granularity,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    bit_reversal_perm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Rotations from per-(layer, KV head) covariances.

    ``c_k``, ``c_v``: float64 [L, H_kv, D, D] (needed only for ``oscar``). Returns float32
    ``(R_K, R_V, eig_K, eig_V)`` with R of shape [L, D, D] (layer) or [L, H_kv, D, D] (kv-head)
    and eigenvalues [L, D] / [L, H_kv, D] (None unless ``oscar``).
    """
    check_head_dim(head_dim)
    lead = (num_layers, num_kv_heads) if granularity == "kv-head" else (num_layers,)
    if recipe in ("identity", "hadamard"):
        base = torch.eye(head_dim, dtype=torch.float64) if recipe == "identity" \
            else hadamard_rotation(head_dim, bit_reversal_perm)
        r = base.expand(*lead, head_dim, head_dim).float().contiguous()
        return r, r.clone(), None, None
    if recipe != "oscar":
        raise ValueError(f"unknown recipe {recipe!r}: expected oscar, hadamard or identity")
    if c_k is None or c_v is None:
        raise ValueError("the oscar recipe needs the key and value covariances")
    if granularity == "layer":
        # Each head's C is already normalised (C_Q per row, C_V by its weight sum), so a plain mean
        # gives every KV head the same say in the shared rotation.
        c_k, c_v = c_k.mean(1), c_v.mean(1)
    elif granularity != "kv-head":
        raise ValueError(f"unknown granularity {granularity!r}: expected layer or kv-head")
    r_k, e_k = oscar_rotation(c_k, bit_reversal_perm)
    r_v, e_v = oscar_rotation(c_v, bit_reversal_perm)
    return r_k.float(), r_v.float(), e_k.float(), e_v.float()
