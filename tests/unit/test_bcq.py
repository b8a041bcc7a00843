"""Unit tests of the Q target, the BCQ loss, prioritized replay and the bank's chunk bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldcq.artifacts import ArtifactError
from ldcq.errors import ConfigError
from ldcq.stages.latent_bank import (
    block_seed,
    missing_rows,
    open_bank,
    plan_blocks,
    write_chunk,
)
from ldcq.stages.latent_bcq import LatentBCQ, q_target
from ldcq.stages.latent_data import draw_transitions
from ldcq.stages.replay import PrioritizedReplay, SumTree

S, Z, K = 3, 2, 4


def test_q_target_uses_the_other_nets_argmax_and_the_min_of_both():
    next_q1 = torch.tensor([[1.0, 5.0, 2.0], [0.0, 0.0, 9.0]])
    next_q2 = torch.tensor([[4.0, 3.0, 0.0], [1.0, 2.0, 3.0]])
    rewards, dones = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
    y1, y2 = q_target(rewards, dones, next_q1, next_q2, discount=0.5)
    # net 1: argmax of Q2_targ -> columns (0, 2); min(Q1, Q2) there = (1, 3)
    torch.testing.assert_close(y1, torch.tensor([1.0 + 0.5 * 1.0, 2.0 + 0.5 * 3.0]))
    # net 2: argmax of Q1_targ -> columns (1, 2); min there = (3, 3)
    torch.testing.assert_close(y2, torch.tensor([1.0 + 0.5 * 3.0, 2.0 + 0.5 * 3.0]))


def test_q_target_masks_the_bootstrap_of_terminal_transitions():
    next_q = torch.full((2, 3), 7.0)
    y1, y2 = q_target(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]), next_q, next_q, 0.9)
    torch.testing.assert_close(y1, torch.tensor([1.0, 1.0 + 0.9 * 7.0]))
    torch.testing.assert_close(y2, y1)


def _module(**kwargs) -> LatentBCQ:
    torch.manual_seed(0)
    return LatentBCQ(S, Z, horizon=3, hidden_dim=8, latent_hidden=8, **kwargs)


def _batch(b: int = 2, k: int = K, weights=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "states": torch.randn(b, S, generator=g),
        "latents": torch.randn(b, Z, generator=g),
        "rewards": torch.tensor([1.0, 0.0, 2.0, 0.5][:b]),
        "next_states": torch.randn(b, S, generator=g),
        "dones": torch.tensor([0.0, 1.0, 0.0, 0.0][:b]),
        "bank": torch.randn(b, k, Z, generator=g),
        "index": torch.arange(b),
        "weights": torch.ones(b) if weights is None else torch.tensor(weights),
    }


def test_td_targets_bootstrap_with_gamma_to_the_horizon(monkeypatch):
    m = _module(gamma=0.9, reward_scale=2.0, terminal_on_reward=True)
    q1 = torch.tensor([[1.0, 4.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    q2 = torch.tensor([[3.0, 2.0, 0.0, 0.0], [5.0, 1.0, 0.0, 0.0]])
    monkeypatch.setattr(m.target_q, "score", lambda s, z: (q1, q2))
    batch = _batch()
    batch["rewards"] = torch.tensor([0.0, 0.0])
    batch["dones"] = torch.tensor([0.0, 0.0])
    y1, y2 = m.td_targets(batch)
    # row 0: net 1 picks col 0 (Q2 max) -> min 1; net 2 picks col 1 (Q1 max) -> min 2
    torch.testing.assert_close(y1, torch.tensor([0.9**3 * 1.0, 0.9**3 * 2.0]))
    torch.testing.assert_close(y2, torch.tensor([0.9**3 * 2.0, 0.9**3 * 2.0]))
    # A positive (scaled) reward ends the bootstrap when terminal_on_reward is on.
    batch["rewards"] = torch.tensor([0.5, 0.0])
    y1, _ = m.td_targets(batch)
    torch.testing.assert_close(y1, torch.tensor([1.0, 0.9**3 * 2.0]))


def test_importance_weights_apply_per_sample():
    m = _module()
    base = _batch()
    y1, y2 = m.td_targets(base)
    q1, q2 = m.q(m.state_normalizer(base["states"]), base["latents"])
    d1, d2 = (q1 - y1).detach(), (q2 - y2).detach()
    assert not torch.isclose(d1[0].abs(), d1[1].abs())
    for w in ([1.0, 0.0], [0.0, 1.0], [0.25, 1.0]):
        wt = torch.tensor(w)
        loss = m.losses(_batch(weights=w))["loss"]
        expected = (wt * d1.square()).mean() + (wt * d2.square()).mean()
        torch.testing.assert_close(loss, expected)
        # The official (B,1)·(B,) broadcast reduces to mean(w)·mean(δ²): not what we compute.
        broadcast = wt.mean() * (d1.square().mean() + d2.square().mean())
        assert not torch.isclose(loss, broadcast)


def test_bank_column_subset_is_drawn_per_row():
    m = _module(num_bank_samples=2)
    bank = torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8, 1).expand(-1, -1, Z)
    picked = m._bank_columns(bank)
    assert picked.shape == (64, 2, Z)
    cols = (picked[..., 0] - 8 * torch.arange(64)[:, None]).long()
    assert ((cols >= 0) & (cols < 8)).all() and (cols[:, 0] != cols[:, 1]).all()
    assert len({tuple(c.tolist()) for c in cols}) > 1


def test_gradients_are_clipped_per_net():
    m = _module(grad_clip=0.5)
    for p in m.q.q1.parameters():
        p.grad = torch.full_like(p, 10.0)
    for p in m.q.q2.parameters():
        p.grad = torch.full_like(p, 1e-4)
    small = [p.grad.clone() for p in m.q.q2.parameters()]
    m.on_before_optimizer_step(None)
    norm1 = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.q.q1.parameters()]))
    assert norm1 == pytest.approx(0.5, rel=1e-4)
    for p, g in zip(m.q.q2.parameters(), small, strict=True):
        assert torch.equal(p.grad, g)


def test_score_is_the_min_of_both_nets():
    m = _module()
    states, latents = torch.randn(5, S), torch.randn(5, K, Z)
    q1, q2 = m.q.score(m.state_normalizer(states), latents)
    torch.testing.assert_close(m.score(states, latents), torch.minimum(q1, q2))


@pytest.mark.parametrize(
    "kwargs",
    [{"gamma": 0.0}, {"gamma": 1.5}, {"tau": 0.0}, {"tau": 2.0}, {"num_bank_samples": 0}],
)
def test_bad_hyperparameters_raise_config_errors(kwargs):
    with pytest.raises(ConfigError):
        _module(**kwargs)


def _assert_tree_consistent(tree: SumTree) -> None:
    inner = np.arange(1, tree.leaf_base)
    np.testing.assert_allclose(tree.nodes[inner], tree.nodes[2 * inner] + tree.nodes[2 * inner + 1])


def test_sampling_frequencies_follow_priorities_to_the_alpha():
    priorities = np.array([1.0, 2.0, 3.0, 4.0, 10.0, 0.5, 0.0, 6.0, 2.5, 1.5])
    replay = PrioritizedReplay(len(priorities), alpha=0.6, eps=0.0, seed=0)
    replay.add(len(priorities))
    replay.update(np.arange(len(priorities)), priorities)
    draws = np.concatenate([replay.sample(1000)[0] for _ in range(20)])
    counts = np.bincount(draws, minlength=len(priorities))
    expected = priorities**0.6 / (priorities**0.6).sum() * len(draws)
    assert counts[6] == 0  # a zero priority (eps = 0) is never drawn
    nz = expected > 0
    chi2 = (((counts[nz] - expected[nz]) ** 2) / expected[nz]).sum()
    assert chi2 < 27.9  # 99.9 % quantile of χ² with 8 degrees of freedom


def test_update_with_duplicate_indices_keeps_the_last_priority():
    replay = PrioritizedReplay(13, alpha=0.5, eps=0.0, seed=0)
    replay.add(13)
    replay.update(np.array([3, 3, 5, 3]), np.array([1.0, 7.0, 2.0, 4.0]))
    np.testing.assert_allclose(replay.tree.leaves(np.array([3, 5, 0])), [2.0, 2.0**0.5, 1.0])
    _assert_tree_consistent(replay.tree)
    assert replay.tree.total == pytest.approx(11 * 1.0 + 2.0 + 2.0**0.5)
    assert replay.max_priority == 7.0


def test_new_entries_get_the_max_priority_and_padding_is_never_drawn():
    replay = PrioritizedReplay(5, alpha=1.0, eps=0.0, seed=0)
    replay.add(3)
    replay.update(np.array([0, 1, 2]), np.array([0.5, 3.0, 1.0]))
    new = replay.add(2)
    np.testing.assert_allclose(replay.tree.leaves(new), [3.0, 3.0])
    idx, _ = replay.sample(5000)
    assert idx.min() >= 0 and idx.max() < 5


def test_importance_weights_and_beta_schedule():
    replay = PrioritizedReplay(4, alpha=1.0, beta_start=0.4, beta_end=1.0, beta_steps=4, eps=0.0)
    replay.add(4)
    replay.update(np.arange(4), np.array([1.0, 2.0, 3.0, 4.0]))
    idx, w = replay.sample(8)
    beta = 0.4 + 0.6 * 1 / 4
    probs = (idx + 1.0) / 10.0
    raw = (4 * probs) ** -beta
    np.testing.assert_allclose(w, raw / raw.max(), rtol=1e-6)
    for _ in range(10):
        replay.sample(2)
    assert replay.beta == 1.0


def test_replay_draw_is_sample_without_the_weights():
    a, b = PrioritizedReplay(20, seed=3), PrioritizedReplay(20, seed=3)
    for r in (a, b):
        r.add(20)
        r.update(np.arange(5), np.linspace(0.5, 4.0, 5))
    index, weights = a.sample(16)
    np.testing.assert_array_equal(b.draw(16), index)
    assert a.calls == b.calls == 1
    np.testing.assert_array_equal(b.weights(index), weights)


def test_replay_state_round_trips():
    replay = PrioritizedReplay(6, seed=0)
    replay.add(6)
    replay.update(np.array([1, 4]), np.array([3.0, 0.1]))
    replay.sample(3)
    other = PrioritizedReplay(6, seed=0)
    other.add(6)
    other.load_state_dict(replay.state_dict())
    np.testing.assert_array_equal(other.tree.nodes, replay.tree.nodes)
    assert (other.calls, other.max_priority) == (replay.calls, replay.max_priority)


def test_transition_draws_are_functions_of_their_rng():
    n = 50
    g = torch.Generator().manual_seed(0)
    tensors = {
        "states": torch.randn(n, S, generator=g),
        "latents": torch.randn(n, Z, generator=g),
        "rewards": torch.rand(n, generator=g),
        "next_states": torch.randn(n, S, generator=g),
        "dones": torch.zeros(n),
    }
    bank = np.random.default_rng(0).standard_normal((n, K, Z)).astype(np.float16)
    a = draw_transitions(tensors, bank, 8, np.random.default_rng((1, 0, 5)))
    b = draw_transitions(tensors, bank, 8, np.random.default_rng((1, 0, 5)))
    c = draw_transitions(tensors, bank, 8, np.random.default_rng((1, 1, 5)))
    assert torch.equal(a["index"], b["index"]) and not torch.equal(a["index"], c["index"])
    assert a["bank"].shape == (8, K, Z) and a["bank"].dtype == torch.float32
    assert torch.equal(a["states"], tensors["states"][a["index"]])
    assert torch.equal(a["weights"], torch.ones(8))
    replay = PrioritizedReplay(n, seed=0)
    replay.add(n)
    replay.update(np.arange(n), np.linspace(0.1, 5.0, n))
    p = draw_transitions(tensors, bank, 8, np.random.default_rng(2), replay)
    assert replay.calls == 1 and p["weights"].max() == 1.0
    np.testing.assert_array_equal(p["weights"].numpy(), replay.weights(p["index"].numpy()))


def test_missing_rows_and_aligned_blocks(tmp_path):
    samples = np.zeros((4, K, Z), dtype=np.float16)
    write_chunk(tmp_path, 0, np.arange(4, 8), samples)
    write_chunk(tmp_path, 1, np.arange(12, 14), samples[:2])
    # an unfinished chunk (no index file) does not count
    np.save(tmp_path / "rank1-000000000.npy", samples)
    missing = missing_rows(tmp_path, 15)
    np.testing.assert_array_equal(missing, [0, 1, 2, 3, 8, 9, 10, 11, 14])
    blocks = plan_blocks(missing, 4)
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3], [8, 9, 10, 11], [14]]
    assert plan_blocks(np.array([], dtype=np.int64), 4) == []
    np.testing.assert_array_equal(missing_rows(tmp_path / "absent", 3), [0, 1, 2])


def test_block_seed_depends_on_seed_and_first_row():
    assert block_seed(0, 0) == block_seed(0, 0)
    assert len({block_seed(0, 0), block_seed(0, 1024), block_seed(1, 0)}) == 3
    assert 0 <= block_seed(7, 10**9) < 2**63


def test_open_bank_refuses_missing_and_wrong_files(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        open_bank(tmp_path / "bank.npy")
    np.save(tmp_path / "bad.npy", np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ArtifactError, match="float16"):
        open_bank(tmp_path / "bad.npy")
    np.save(tmp_path / "good.npy", np.ones((3, 2, 4), dtype=np.float16))
    assert open_bank(tmp_path / "good.npy").shape == (3, 2, 4)


def test_compiled_target_scoring_matches_eager_and_a_failed_compile_warns_once(monkeypatch):
    eager, compiled = _module(), _module(compile=True)
    compiled.load_state_dict(eager.state_dict())
    batch = _batch()
    calls = []

    def fake_compile(fn, **kwargs):  # stands in for a backend: counts the compiled calls
        def run(*a, **kw):
            calls.append(1)
            return fn(*a, **kw)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    for a, b in zip(compiled.td_targets(batch), eager.td_targets(batch), strict=True):
        torch.testing.assert_close(a, b)
    assert calls == [1] and compiled._target_score.compile_s is not None

    def broken_compile(fn, **kwargs):
        def run(*a, **kw):
            inner = RuntimeError("no C++ compiler found\nlong traceback")
            raise torch._dynamo.exc.BackendCompilerFailed("inductor", inner, None)

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    failing = _module(compile=True)
    failing.load_state_dict(eager.state_dict())
    with pytest.warns(RuntimeWarning, match=r"latent_bcq.model.compile: torch.compile failed"):
        y = failing.td_targets(batch)
    torch.testing.assert_close(y[0], eager.td_targets(batch)[0])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eager from then on: no second warning
        failing.td_targets(batch)
    assert failing._target_score.failed.startswith("BackendCompilerFailed")
    # A compiled function that ran before and then raises is a real error: no fallback.
    state = {"calls": 0}

    def compiled_then_fails(fn, **kwargs):
        def run(*a, **kw):
            state["calls"] += 1
            if state["calls"] > 1:
                raise RuntimeError("shape mismatch")
            return fn(*a, **kw)

        return run

    monkeypatch.setattr(torch, "compile", compiled_then_fails)
    real = _module(compile=True)
    real.td_targets(batch)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        real.td_targets(batch)
    # A copy (as a checkpoint or DDP makes) holds no compiled function and compiles anew.
    import copy

    assert copy.deepcopy(compiled)._target_score._compiled is None
