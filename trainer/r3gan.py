"""R3GAN (Huang et al. 2024) relativistic pairing loss with zero-centred R1/R2 penalties, for a
discriminator with per-pixel logits (MUNet). Penalties differentiate the *mean* logit, so their
size does not grow with the patch area (the original used the sum)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def generator_adv_loss(disc: nn.Module, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """L_G = E[softplus(D(real) - D(fake))]; gradients reach the generator through `fake`."""
    return F.softplus(disc(real.detach()) - disc(fake)).mean()


def _grad_penalty(disc: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    logits = disc(x)
    (grad,) = torch.autograd.grad(logits.mean(dim=(1, 2, 3)).sum(), x, create_graph=True)
    return logits, grad.pow(2).flatten(1).sum(1).mean()


def discriminator_loss(disc: nn.Module, fake: torch.Tensor, real: torch.Tensor, *, r1_gamma: float,
                       r2_gamma: float) -> tuple[torch.Tensor, dict[str, float]]:
    """L_D = E[softplus(D(fake) - D(real))] + r1/2 E|grad D(real)|^2 + r2/2 E|grad D(fake)|^2."""
    d_real, r1 = _grad_penalty(disc, real)
    d_fake, r2 = _grad_penalty(disc, fake)
    adv = F.softplus(d_fake - d_real).mean()
    total = adv + r1_gamma / 2 * r1 + r2_gamma / 2 * r2
    return total, {"d_adv": float(adv.detach()), "r1": float(r1.detach()), "r2": float(r2.detach())}
