"""A tiny transformer, a synthetic token stream and a training loop.

Used by ``ckpt demo`` and by the fault tests: small enough to train in
seconds on a CPU, yet it has everything a resume must get right — dropout
(global RNG), AdamW moments, a learning-rate schedule, and a data stream
whose position is state of its own.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True, kw_only=True)
class TinyConfig:
    """Shape of the demo model and its data."""

    vocab_size: int = 128
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    seq_len: int = 32
    batch_size: int = 8
    dropout: float = 0.1


class TinyTransformer(nn.Module):
    """A causal transformer language model (pre-norm blocks, learned positions)."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.num_heads, 4 * cfg.d_model, cfg.dropout,
            batch_first=True, norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        mask = torch.triu(torch.full((cfg.seq_len, cfg.seq_len), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        x = self.blocks(x, mask=self.causal_mask, is_causal=True)
        return self.head(self.norm(x))


class SyntheticTokens:
    """An endless stream of token batches: a noisy repeating pattern a model can learn.

    Its position and generator are state: ``state_dict`` / ``load_state_dict``
    let a resumed run continue with the very next batch.
    """

    def __init__(self, cfg: TinyConfig, seed: int = 0, rank: int = 0) -> None:
        self.cfg = cfg
        self.position = 0
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        start = torch.randint(0, cfg.vocab_size, (cfg.batch_size, 1), generator=self.generator)
        ramp = torch.arange(cfg.seq_len + 1).unsqueeze(0)
        tokens = (start + 3 * ramp) % cfg.vocab_size
        noise = torch.rand(tokens.shape, generator=self.generator) < 0.05
        tokens = torch.where(noise, torch.randint_like(tokens, cfg.vocab_size, generator=self.generator), tokens)
        self.position += 1
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self) -> dict:
        return {"position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self.generator.set_state(state["generator"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_training(cfg: TinyConfig, *, seed: int = 0, total_steps: int = 100, lr: float = 3e-3):
    """Build (model, optimizer, scheduler) deterministically from ``seed``."""
    seed_everything(seed)
    model = TinyTransformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, total_steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return model, optimizer, scheduler


def train_step(model: nn.Module, optimizer, scheduler, data: SyntheticTokens) -> float:
    """One step: forward, backward, an extra random draw (so RNG state matters), update."""
    inputs, targets = data.next_batch()
    logits = model(inputs)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss = loss + 0.0 * random.random() + 0.0 * float(np.random.rand())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach())


def final_state_arrays(model: nn.Module, optimizer) -> dict[str, np.ndarray]:
    """Everything a bit-exact comparison looks at, as numpy arrays keyed by name."""
    out: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        out[f"model/{name}"] = _to_numpy(tensor)
    names = {id(p): n for n, p in model.named_parameters()}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value):
                out[f"optim/{names.get(id(param), id(param))}/{key}"] = _to_numpy(value)
    for i, group in enumerate(optimizer.param_groups):
        out[f"optim/group{i}/lr"] = np.array(group["lr"], dtype=np.float64)
    out["rng/torch"] = torch.get_rng_state().numpy().copy()
    out["rng/python"] = np.array(random.getstate()[1], dtype=np.uint64)
    out["rng/numpy"] = np.random.get_state()[1].copy()
    return out


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if hasattr(tensor, "full_tensor"):  # DTensor: compare the whole value
        tensor = tensor.full_tensor()
    return tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().copy()


def compare_arrays(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> list[str]:
    """Names whose bytes differ (or are missing on either side); empty means bit-exact."""
    diffs = sorted(set(expected) ^ set(actual))
    for name in sorted(set(expected) & set(actual)):
        if expected[name].shape != actual[name].shape or not np.array_equal(expected[name], actual[name]):
            diffs.append(name)
    return diffs
