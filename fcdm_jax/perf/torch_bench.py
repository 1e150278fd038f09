"""The PyTorch side of the benchmark's `--vs-torch`: the published-structure module's
training step and sampling forward, at the JAX side's batch, precision and remat."""

from __future__ import annotations

import contextlib
from typing import Any


class TorchBench:
  """The published-structure PyTorch FCDM: its training step (network, label dropout, an
  epsilon/velocity MSE on every output channel, AdamW, EMA) and its sampling forward."""

  def __init__(self, config, batch: int, dtype: str, remat: str, device: str, log):
    if config.model.condition != "class":
      raise ValueError(f"the PyTorch module is the published class-conditional FCDM; "
                       f"condition={config.model.condition!r} has no PyTorch side to compare")
    import torch   # optional: only the `--vs-torch` comparison needs it
    from fcdm_jax import torch_fcdm   # imports torch
    self.torch, self.log = torch, log
    self.device = torch.device(device)
    self.dtype = dtype
    self.model = torch_fcdm.from_config(config.model, checkpoint_blocks=remat != "none",
                                        device=self.device)
    opt = config.optimizer
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=opt.learning_rate,
                                 betas=(opt.b1, opt.b2), eps=opt.eps,
                                 weight_decay=opt.weight_decay)
    self.params = [p for p in self.model.parameters()]
    self.ema = [p.detach().clone() for p in self.params]
    self.decay = float(config.ema_decay)
    gen = torch.Generator().manual_seed(0)
    c, size = config.model.in_channels, config.latent_size
    self.x = torch.randn(batch, c, size, size, generator=gen).to(self.device)
    self.y = torch.randint(0, config.model.num_classes, (batch,), generator=gen).to(self.device)
    self.t = (torch.rand(batch, generator=gen) * 999).to(self.device)
    self.in_channels = c
    self.flow = config.objective == "flow"
    betas = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
    self.alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(self.device)

  def _autocast(self):
    if self.dtype == "bfloat16":
      return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)
    return contextlib.nullcontext()

  def _sync(self):
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def train_step(self) -> None:
    torch = self.torch
    self.model.train()
    noise = torch.randn_like(self.x)
    if self.flow:
      t = torch.rand(self.x.shape[0], device=self.device)
      tb = t[:, None, None, None]
      x_t, target = tb * self.x + (1 - tb) * noise, self.x - noise
    else:
      t = torch.randint(0, 1000, (self.x.shape[0],), device=self.device)
      a = self.alphas_cumprod[t][:, None, None, None]
      x_t, target = a.sqrt() * self.x + (1 - a).sqrt() * noise, noise
      t = t.float()
    with self._autocast():
      out = self.model(x_t, t, self.y)
    out = out.float()
    c = self.in_channels
    loss = (out[:, :c] - target).square().mean()
    if out.shape[1] > c:  # the variance channels take part in the loss (and backward) too
      loss = loss + 1e-3 * out[:, c:].square().mean()
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    with torch.no_grad():
      torch._foreach_mul_(self.ema, self.decay)
      torch._foreach_add_(self.ema, self.params, alpha=1 - self.decay)
    self._sync()

  def sample_step(self) -> None:
    self.model.eval()
    with self.torch.inference_mode(), self._autocast():
      self.model(self.x, self.t, self.y)
    self._sync()

  def peak_memory(self) -> dict[str, Any]:
    if self.device.type == "cuda":
      return dict(peak_bytes=int(self.torch.cuda.max_memory_allocated()),
                  source="torch.cuda.max_memory_allocated")
    return dict(peak_bytes=None, source="not measured on CPU (shared process)")
