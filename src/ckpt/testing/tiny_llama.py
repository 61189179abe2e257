"""A tiny LLaMA-style model cut into pipeline stages, and generated data it can learn.

Stage numbering is CheckFree's (:mod:`ckpt.recovery.checkfree`): stage 0 is
:class:`EmbedHead` (token embedding, final RMSNorm, untied output head), stages
1..S are one :class:`LlamaBlock` each (pre-norm; causal multi-head attention with
rotary position embeddings; SwiGLU feed-forward). A pipeline computes::

    h = stages[0].embed_tokens(tokens)
    for block in stages[1:]:
        h = block(h)
    loss = lm_loss(stages[0].logits(h), targets)

Everything is deterministic: no dropout, weights drawn from a ``torch.Generator``
seeded from ``(seed, stage index)`` only (:func:`build_stage`), and every batch of
:class:`SyntheticCorpus` a pure function of ``(seed, step, microbatch)``, so processes
that each build one stage and draw their own batches agree without sharing state.
The rotary tables are non-persistent buffers: every body stage has the same
state-dict keys and shapes, which the CheckFree averaging rule needs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ckpt.errors import ConfigError

INIT_STD = 0.02
"""Standard deviation of every initial weight matrix (output projections are scaled
down further by ``sqrt(2 * num_body_stages)``, as in GPT-2)."""


@dataclass(frozen=True, kw_only=True)
class TinyLlamaConfig:
    """Shape of the model and of its data; every field is checked on construction."""

    vocab_size: int = 256
    """Number of token ids (>= 2); also the size of the output head."""
    dim: int = 64
    """Width of the residual stream (a multiple of ``num_heads``)."""
    num_heads: int = 4
    """Attention heads per block; ``dim // num_heads`` must be even (RoPE rotates pairs)."""
    ffn_dim: int = 172
    """Hidden width of each SwiGLU feed-forward (LLaMA's ~8/3 * dim)."""
    seq_len: int = 64
    """Tokens per sequence; the longest input a block accepts (its RoPE table's length)."""
    num_body_stages: int = 6
    """Number of body stages S (one block each); stage 0 is the embedding/head stage."""
    norm_eps: float = 1e-5
    """Epsilon inside every RMSNorm's square root (> 0)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies (> 0)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_heads", "ffn_dim", "seq_len", "num_body_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"TinyLlamaConfig.{name} must be an int >= 1, found {value!r}")
        if self.vocab_size < 2:
            raise ConfigError(f"TinyLlamaConfig.vocab_size must be >= 2, found {self.vocab_size}")
        if self.seq_len < 2:
            raise ConfigError(f"TinyLlamaConfig.seq_len must be >= 2, found {self.seq_len}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ConfigError(
                f"TinyLlamaConfig.dim ({self.dim}) must be num_heads ({self.num_heads}) times an even "
                "head width (RoPE rotates pairs of channels); change dim or num_heads"
            )
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"TinyLlamaConfig.{name} must be a finite number > 0, found {value!r}")

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.dim // self.num_heads


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """(cos, sin), each ``[seq_len, head_dim // 2]``: the rotation angle of channel pair j at
    position p is ``p * theta ** (-2j / head_dim)``."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * freqs[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[batch, heads, seq, head_dim]`` by position: channel j pairs with
    j + head_dim/2 (the "rotate half" layout); ``cos``/``sin`` are ``[seq, head_dim/2]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class LlamaBlock(nn.Module):
    """One pre-norm transformer block: ``h + attn(norm(h))``, then ``h + swiglu(norm(h))``.

    Attention is causal multi-head with RoPE on queries and keys, no biases anywhere.
    The RoPE tables are non-persistent buffers (not in ``state_dict``).
    """

    def __init__(self, cfg: TinyLlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.w_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, h: Tensor) -> Tensor:
        """``[batch, seq, dim]`` -> the same shape; seq <= ``cfg.seq_len``."""
        h = h + self._attention(self.attn_norm(h))
        x = self.ffn_norm(h)
        return h + self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))

    def _attention(self, x: Tensor) -> Tensor:
        batch, seq, dim = x.shape
        if seq > self.cfg.seq_len:
            raise ConfigError(
                f"the block was built for sequences of <= {self.cfg.seq_len} tokens, got {seq}; "
                "raise TinyLlamaConfig.seq_len"
            )
        heads, head_dim = self.cfg.num_heads, self.cfg.head_dim

        def split(t: Tensor) -> Tensor:
            return t.view(batch, seq, heads, head_dim).transpose(1, 2)

        cos, sin = self.rope_cos[:seq].to(x.dtype), self.rope_sin[:seq].to(x.dtype)
        q = apply_rope(split(self.wq(x)), cos, sin)
        k = apply_rope(split(self.wk(x)), cos, sin)
        out = F.scaled_dot_product_attention(q, k, split(self.wv(x)), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, dim))


class EmbedHead(nn.Module):
    """Stage 0: the token embedding (``embed``), the final RMSNorm (``norm``) and the
    output head (``head``, a Linear not tied to the embedding)."""

    def __init__(self, cfg: TinyLlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """``[batch, seq]`` int64 token ids -> ``[batch, seq, dim]``."""
        return self.embed(tokens)

    def logits(self, h: Tensor) -> Tensor:
        """``[batch, seq, dim]`` (the last block's output) -> ``[batch, seq, vocab]``."""
        return self.head(self.norm(h))


# ----------------------------------------------------------------------------- building


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends only on ``parts`` (stable across processes and runs)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _check_stage_index(cfg: TinyLlamaConfig, index: int) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= cfg.num_body_stages:
        raise ConfigError(
            f"stage index must be in 0..{cfg.num_body_stages} (0 = embedding/head, 1..S = blocks), "
            f"found {index!r}"
        )


def build_stage(cfg: TinyLlamaConfig, index: int, seed: int) -> nn.Module:
    """Stage ``index`` of the model: :class:`EmbedHead` for 0, a :class:`LlamaBlock` for 1..S.

    Weights come from a ``torch.Generator`` seeded from ``(seed, index)`` only: the same
    arguments give the same weights in any process, whatever else it built before, and
    torch's global RNG is left as it was. Linear and embedding weights are N(0, 0.02²)
    (output projections ``wo``/``w_down`` N(0, (0.02/sqrt(2S))²)), norm weights 1.
    """
    _check_stage_index(cfg, index)
    with torch.random.fork_rng(devices=[]):
        module: nn.Module = EmbedHead(cfg) if index == 0 else LlamaBlock(cfg)
    gen = torch.Generator().manual_seed(derive_seed("tiny_llama.stage", seed, index))
    residual_std = INIT_STD / math.sqrt(2 * cfg.num_body_stages)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                std = residual_std if name.split(".")[0] in ("wo", "w_down") else INIT_STD
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return module


def build_stages(cfg: TinyLlamaConfig, seed: int) -> list[nn.Module]:
    """Every stage, 0..S: ``[build_stage(cfg, i, seed) for i in range(S + 1)]``."""
    return [build_stage(cfg, i, seed) for i in range(cfg.num_body_stages + 1)]


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (nats per token) of ``logits`` ``[B, T, V]`` against ``targets`` ``[B, T]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


# ----------------------------------------------------------------------------- data


class SyntheticCorpus:
    """Generated token sequences with structure a few-block model learns in a few hundred steps.

    Two sources, drawn per sequence:

    - a fixed random sparse Markov chain: each token has ``branching`` possible successors
      (distinct, random) with Dirichlet(1) probabilities, drawn once from ``seed``;
    - with probability ``copy_fraction``, the second half of the sequence repeats the first
      half (token ``t`` equals token ``t - L``, ``L = (seq_len + 1) // 2``), which attention
      can exploit (a look-back by a fixed offset) once it has seen the repeat start.

    :meth:`batch` is a pure function of ``(seed, step, microbatch, batch_size)``.
    """

    def __init__(self, cfg: TinyLlamaConfig, seed: int, *, branching: int = 4, copy_fraction: float = 0.5) -> None:
        if isinstance(branching, bool) or not isinstance(branching, int) or not 1 <= branching <= cfg.vocab_size:
            raise ConfigError(f"branching must be an int in 1..vocab_size ({cfg.vocab_size}), found {branching!r}")
        if not (isinstance(copy_fraction, (int, float)) and 0.0 <= copy_fraction <= 1.0):
            raise ConfigError(f"copy_fraction must be a probability in [0, 1], found {copy_fraction!r}")
        self.cfg, self.seed = cfg, int(seed)
        self.branching, self.copy_fraction = branching, float(copy_fraction)
        gen = torch.Generator().manual_seed(derive_seed("tiny_llama.corpus", seed))
        vocab = cfg.vocab_size
        # successors[v] : the `branching` distinct tokens that may follow v.
        self.successors = torch.rand(vocab, vocab, generator=gen).argsort(dim=1)[:, :branching]
        weights = -torch.rand(vocab, branching, generator=gen).clamp_min(1e-12).log()  # Exp(1) -> Dirichlet(1)
        self.probs = weights / weights.sum(dim=1, keepdim=True)
        self._cumulative = self.probs.cumsum(dim=1)

    def batch(self, step: int, microbatch: int, batch_size: int) -> tuple[Tensor, Tensor]:
        """``(tokens, targets)``, each ``[batch_size, seq_len]`` int64; ``targets`` is ``tokens``
        shifted by one (the next token at every position)."""
        for name, value, low in (("step", step, 0), ("microbatch", microbatch, 0), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"SyntheticCorpus.batch: {name} must be an int >= {low}, found {value!r}")
        gen = torch.Generator().manual_seed(derive_seed("tiny_llama.batch", self.seed, step, microbatch, batch_size))
        length = self.cfg.seq_len + 1
        seq = torch.empty(batch_size, length, dtype=torch.int64)
        seq[:, 0] = torch.randint(self.cfg.vocab_size, (batch_size,), generator=gen)
        uniforms = torch.rand(batch_size, length, generator=gen)
        for t in range(1, length):
            prev = seq[:, t - 1]
            choice = (uniforms[:, t : t + 1] > self._cumulative[prev]).sum(dim=1).clamp_max(self.branching - 1)
            seq[:, t] = self.successors[prev, choice]
        copies = torch.rand(batch_size, generator=gen) < self.copy_fraction
        half = length // 2 + length % 2
        seq[copies, half:] = seq[copies, : length - half]
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()

    def markov_entropy_nats(self) -> float:
        """Expected entropy (nats) of the next token under the Markov chain, averaged over the
        ``seq_len`` target positions of a sequence that starts from a uniform token: the best
        possible mean loss on sequences that do not repeat (repeated halves are predictable,
        so the corpus's best loss is lower)."""
        vocab = self.cfg.vocab_size
        transition = torch.zeros(vocab, vocab, dtype=torch.float64)
        transition.scatter_add_(1, self.successors, self.probs.double())
        p = self.probs.double()
        per_token = -(p * p.clamp_min(1e-300).log()).sum(dim=1)
        state = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
        total = 0.0
        for _ in range(self.cfg.seq_len):
            total += float(state @ per_token)
            state = state @ transition
        return total / self.cfg.seq_len
