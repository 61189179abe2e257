"""The contract of ckpt.testing.tiny_llama: shapes, deterministic stages, identical body-stage
state dicts (what CheckFree averages), causal RoPE attention, a pure-function corpus, and a
model that learns from it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ckpt.errors import ConfigError
from ckpt.testing.tiny_llama import (
    EmbedHead,
    LlamaBlock,
    RMSNorm,
    SyntheticCorpus,
    TinyLlamaConfig,
    apply_rope,
    build_stage,
    build_stages,
    lm_loss,
    rope_tables,
)

SMALL = TinyLlamaConfig(vocab_size=32, dim=16, num_heads=2, ffn_dim=24, seq_len=12, num_body_stages=4)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _forward(stages: list[torch.nn.Module], tokens: torch.Tensor) -> torch.Tensor:
    h = stages[0].embed_tokens(tokens)
    for block in stages[1:]:
        h = block(h)
    return stages[0].logits(h)


def test_default_config_is_the_documented_one():
    cfg = TinyLlamaConfig()
    assert (cfg.vocab_size, cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.seq_len, cfg.num_body_stages) == (
        256, 64, 4, 172, 64, 6)
    assert (cfg.norm_eps, cfg.rope_theta, cfg.head_dim) == (1e-5, 10000.0, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 32  # type: ignore[misc]
    with pytest.raises(TypeError):
        TinyLlamaConfig(256)  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize("bad", [
    {"vocab_size": 1}, {"dim": 0}, {"num_heads": 3}, {"dim": 12, "num_heads": 4},  # head width 3 is odd
    {"seq_len": 1}, {"num_body_stages": 0}, {"ffn_dim": True}, {"norm_eps": 0.0},
    {"rope_theta": float("inf")}, {"dim": 16.0},
])
def test_config_rejects_bad_values_with_config_error(bad):
    with pytest.raises(ConfigError):
        TinyLlamaConfig(**bad)


def test_stage_types_and_shapes():
    stages = build_stages(SMALL, seed=0)
    assert len(stages) == SMALL.num_body_stages + 1
    head = stages[0]
    assert isinstance(head, EmbedHead)
    assert isinstance(head.embed, torch.nn.Embedding) and isinstance(head.norm, RMSNorm)
    assert isinstance(head.head, torch.nn.Linear) and head.head.weight is not head.embed.weight
    assert all(isinstance(s, LlamaBlock) for s in stages[1:])
    tokens = torch.randint(SMALL.vocab_size, (3, SMALL.seq_len))
    h = head.embed_tokens(tokens)
    assert h.shape == (3, SMALL.seq_len, SMALL.dim)
    assert stages[1](h).shape == h.shape
    assert stages[1](h[:, :5]).shape == (3, 5, SMALL.dim)  # shorter sequences are fine
    assert head.logits(h).shape == (3, SMALL.seq_len, SMALL.vocab_size)
    with pytest.raises(ConfigError):
        stages[1](torch.zeros(1, SMALL.seq_len + 1, SMALL.dim))


def test_build_stage_depends_only_on_seed_and_index():
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    first = build_stage(SMALL, 2, seed=7)
    assert torch.equal(torch.get_rng_state(), global_state), "build_stage must not consume the global RNG"
    build_stages(SMALL, seed=99)  # anything built in between changes nothing
    again = build_stage(SMALL, 2, seed=7)
    for (k, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    all_stages = build_stages(SMALL, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(all_stages[2].state_dict().values(), first.state_dict().values()))
    other_seed = build_stage(SMALL, 2, seed=8).state_dict()
    other_index = build_stage(SMALL, 3, seed=7).state_dict()
    assert not torch.equal(other_seed["wq.weight"], first.state_dict()["wq.weight"])
    assert not torch.equal(other_index["wq.weight"], first.state_dict()["wq.weight"])
    with pytest.raises(ConfigError):
        build_stage(SMALL, SMALL.num_body_stages + 1, seed=0)


def test_body_stages_have_identical_state_dict_layout_without_rope_tables():
    stages = build_stages(SMALL, seed=0)
    layouts = [{k: (tuple(v.shape), v.dtype) for k, v in s.state_dict().items()} for s in stages[1:]]
    assert all(layout == layouts[0] for layout in layouts)
    assert not any("rope" in k for k in layouts[0])
    assert {"rope_cos", "rope_sin"} <= {name for name, _ in stages[1].named_buffers()}
    norms = [v for k, v in stages[1].state_dict().items() if k.endswith("norm.weight")]
    assert len(norms) == 2 and all(torch.equal(n, torch.ones(SMALL.dim)) for n in norms)


def test_rmsnorm_normalises_the_last_dimension():
    norm = RMSNorm(8, eps=1e-6)
    x = torch.randn(2, 3, 8) * 5
    out = norm(x)
    assert torch.allclose(out.pow(2).mean(-1), torch.ones(2, 3), atol=1e-4)


def test_rope_rotation_preserves_norms_and_depends_on_relative_position_only():
    cos, sin = rope_tables(16, 8, 10000.0)
    assert torch.allclose(cos[0], torch.ones(4)) and torch.allclose(sin[0], torch.zeros(4))
    q, k = torch.randn(8), torch.randn(8)
    rotate = lambda x, p: apply_rope(x.view(1, 1, 1, 8), cos[p:p + 1], sin[p:p + 1]).view(8)  # noqa: E731
    assert torch.allclose(rotate(q, 5).norm(), q.norm(), atol=1e-5)
    # <R_m q, R_n k> depends on m - n only.
    assert torch.allclose(rotate(q, 7) @ rotate(k, 3), rotate(q, 10) @ rotate(k, 6), atol=1e-4)
    assert not torch.allclose(rotate(q, 7) @ rotate(k, 3), rotate(q, 7) @ rotate(k, 6), atol=1e-4)


def test_attention_is_causal_and_position_aware():
    stages = build_stages(SMALL, seed=1)
    tokens = torch.randint(SMALL.vocab_size, (2, SMALL.seq_len), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % SMALL.vocab_size
    with torch.no_grad():
        a, b = _forward(stages, tokens), _forward(stages, changed)
    assert torch.equal(a[:, :8], b[:, :8]), "a later token changed an earlier output"
    assert not torch.allclose(a[:, 8:], b[:, 8:])
    # Position matters: without position information, the output at the last position would
    # not change when two earlier inputs trade places (attention sums over a set of keys).
    block = stages[1]
    x = torch.randn(1, 3, SMALL.dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = block(x)[0, 2]
        swapped = block(x[:, [1, 0, 2]])[0, 2]
    assert not torch.allclose(out, swapped, atol=1e-6)


def test_corpus_batches_are_a_pure_function_of_seed_step_microbatch():
    first = SyntheticCorpus(SMALL, seed=3)
    other_object = SyntheticCorpus(SMALL, seed=3)
    first.batch(0, 0, 4)  # earlier calls change nothing
    tokens, targets = first.batch(5, 1, 4)
    again_tokens, again_targets = other_object.batch(5, 1, 4)
    assert torch.equal(tokens, again_tokens) and torch.equal(targets, again_targets)
    assert tokens.shape == targets.shape == (4, SMALL.seq_len) and tokens.dtype == torch.int64
    assert torch.equal(tokens[:, 1:], targets[:, :-1])  # targets are the next tokens
    assert int(tokens.min()) >= 0 and int(tokens.max()) < SMALL.vocab_size
    assert not torch.equal(first.batch(5, 0, 4)[0], tokens)
    assert not torch.equal(first.batch(6, 1, 4)[0], tokens)
    assert not torch.equal(SyntheticCorpus(SMALL, seed=4).batch(5, 1, 4)[0], tokens)
    with pytest.raises(ConfigError):
        first.batch(-1, 0, 4)
    with pytest.raises(ConfigError):
        first.batch(0, 0, 0)


def test_corpus_follows_its_markov_chain_and_repeats_halves():
    corpus = SyntheticCorpus(SMALL, seed=0, copy_fraction=0.0)
    tokens, targets = corpus.batch(0, 0, 64)
    allowed = corpus.successors[tokens]  # [B, T, branching]
    assert bool((allowed == targets.unsqueeze(-1)).any(-1).all())
    assert 0 < corpus.markov_entropy_nats() <= torch.log(torch.tensor(4.0)).item() + 1e-9
    repeating = SyntheticCorpus(SMALL, seed=0, copy_fraction=1.0)
    tokens, targets = repeating.batch(0, 0, 8)
    full = torch.cat([tokens, targets[:, -1:]], dim=1)  # the seq_len + 1 generated tokens
    half = (SMALL.seq_len + 2) // 2
    assert torch.equal(full[:, half:], full[:, :full.shape[1] - half])
    with pytest.raises(ConfigError):
        SyntheticCorpus(SMALL, seed=0, copy_fraction=1.5)


def test_a_few_training_steps_lower_the_loss():
    stages = build_stages(SMALL, seed=0)
    corpus = SyntheticCorpus(SMALL, seed=0)
    optimizers = [torch.optim.AdamW(s.parameters(), lr=1e-2) for s in stages]
    losses = []
    for step in range(30):
        tokens, targets = corpus.batch(step, 0, 16)
        loss = lm_loss(_forward(stages, tokens), targets)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - torch.log(torch.tensor(float(SMALL.vocab_size))).item()) < 0.2  # starts near uniform
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0]


def test_lm_loss_is_mean_cross_entropy():
    logits = torch.randn(2, 3, 5)
    targets = torch.randint(5, (2, 3))
    expected = torch.nn.functional.cross_entropy(logits.view(6, 5), targets.view(6))
    assert torch.allclose(lm_loss(logits, targets), expected)
