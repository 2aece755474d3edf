"""Spectrum (Hartford et al., 2024): freeze the weight matrices of lowest signal-to-noise ratio, whole tensors.

The SNR of a matrix W (n x m) is computed from its singular values s_1 >= ... >= s_k as Spectrum's
reference code (cognitivecomputations/spectrum, spectrum.py) does:

    sigma     = IQR(s) / 1.349                      the noise scale, from the interquartile range of s
                                                    (torch.quantile, linear interpolation)
    beta      = min(n, m) / max(n, m)
    eps       = sigma * (1 + sqrt(beta))            the Marchenko-Pastur bound on the singular values of
                                                    an n x m noise matrix of that scale
    signal    = sum of s_i > eps
    noise     = sum of s_i <= eps                   (1 when no singular value is at or below eps, as there)
    SNR       = (signal / noise) / s_1              normalised by the largest singular value

An all-zero matrix has SNR 0: it carries no signal. Spectrum's own configs always train the embeddings
and the LM head; conf/mask/spectrum.yaml leaves the embeddings out of the eligible set (mask.exclude) to do
the same (with exclude=null their matrices are ranked by SNR like the others).
Spectrum ranks each module type across layers separately; here one cut freezes the lowest-SNR matrices
over all of them (allocation=global) or within each layer (per_layer), whole tensors at a time, until the
frozen entries come closest to mask.ratio of the eligible ones.

Vectors (biases, LayerNorm gains) have one singular value and no SNR. They are ranked after every
matrix, so they train unless the ratio leaves nothing else to freeze; then they freeze in a seeded
random order, counted in tied_share.
"""

import math

import torch

from maskrun.masks import select

NEEDS_SCORES = False
ALLOCATIONS = ("global", "per_layer")  # per_tensor would freeze each matrix entirely or not at all, whatever its SNR
GRANULARITIES = ("tensor",)
IQR_TO_SIGMA = 1.349  # the interquartile range of a standard normal distribution


def signal_to_noise(weight: torch.Tensor) -> float:
    """Spectrum's SNR of a matrix (see the module docstring); the tensor is read as (rows, everything else)."""
    s = torch.linalg.svdvals(weight.detach().double().reshape(weight.shape[0], -1).cpu())
    if s[0] == 0:
        return 0.0
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / IQR_TO_SIGMA
    n, m = weight.shape[0], weight[0].numel()
    bound = sigma * (1 + math.sqrt(min(n, m) / max(n, m)))
    signal, noise = s[s > bound].sum(), s[s <= bound].sum()
    if not bool((s <= bound).any()):
        noise = torch.tensor(1.0, dtype=s.dtype)
    return float(signal / noise / s[0])


def build(mcfg, params: dict[str, torch.Tensor], scores, seed: int) -> select.Selection:
    snr = {name: torch.tensor(signal_to_noise(p) if p.dim() >= 2 else math.inf).expand(p.shape)
           for name, p in params.items()}
    return select.freeze_lowest(snr, mcfg.ratio, mcfg.allocation, "tensor", seed)
