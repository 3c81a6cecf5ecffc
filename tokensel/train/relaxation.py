"""A hard top-k keep mask that passes a gradient to its chunk scores (the end-to-end stage 2's relaxation).

Perturbed top-k (Berthet et al. 2020, "Learning with differentiable perturbed optimizers"): the
forward pass is the selection rule itself (`select_mask`: prefix always, budget k, ties to the earlier
chunk, short last chunk cut), so training sees exactly the tokens inference keeps; the backward pass
is the gradient of the Gaussian-smoothed rule. Chosen over Gumbel / soft top-k because it needs no
second, relaxed definition of the rule, and its samples are cheap: only the rule runs per sample.
"""

from __future__ import annotations

import torch

from tokensel.select.rule import select_mask


class PerturbedMask(torch.autograd.Function):
    """Hard keep mask from `select_mask` forward; perturbed-optimizer gradient backward.

    apply(scores [B, C], n [B], sigma [B], k, prefix, chunk, width, samples, generator) -> [B, width]
    float 0/1 mask. The backward pass estimates d/ds E_Z[<g, mask(s + sigma Z)>] with Z ~ N(0, I):
    E[<g, mask(s + sigma Z)> Z] / sigma, antithetic (Z, -Z) pairs, the per-item mean of <g, mask>
    subtracted as a baseline (E[Z] = 0, so the expectation is unchanged).
    """

    @staticmethod
    def forward(ctx, scores, n, sigma, k, prefix, chunk, width, samples, generator):
        mask = select_mask(scores.detach(), n, k=k, prefix=prefix, chunk=chunk, width=width)
        ctx.save_for_backward(scores.detach(), n, sigma)
        ctx.rule = (k, prefix, chunk, width, samples, generator)
        return mask.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        scores, n, sigma = ctx.saved_tensors
        k, prefix, chunk, width, samples, generator = ctx.rule
        B, C = scores.shape
        half = max(1, samples // 2)
        z = torch.randn(half, B, C, generator=generator).to(scores.device)
        z = torch.cat([z, -z])
        M = z.shape[0]
        pert = (scores[None] + sigma[None, :, None] * z).reshape(M * B, C)
        masks = select_mask(pert, n.repeat(M), k=k, prefix=prefix, chunk=chunk, width=width).reshape(M, B, width)
        f = (masks.to(grad.dtype) * grad[None]).sum(-1)  # [M, B]
        f = f - f.mean(0, keepdim=True)
        g = (f[..., None] * z).mean(0) / sigma[:, None].clamp(min=1e-12)
        return g, None, None, None, None, None, None, None, None


def relative_sigma(scores: torch.Tensor, n_chunks_valid: torch.Tensor, sigma: float) -> torch.Tensor:
    """[B] noise scale: sigma times the std of each item's real chunk scores (1 where undefined)."""
    C = scores.shape[1]
    valid = torch.arange(C, device=scores.device)[None] < n_chunks_valid[:, None]
    s = scores.detach().masked_fill(~valid, 0.0)
    cnt = valid.sum(1).clamp(min=1)
    mean = s.sum(1) / cnt
    var = ((s - mean[:, None]) ** 2).masked_fill(~valid, 0.0).sum(1) / cnt
    std = var.sqrt()
    return sigma * torch.where(std > 0, std, torch.ones_like(std))
