"""Skill diagnostics: the out-of-support rate, mode coverage at junctions and reconstruction, on
tiny modules and data where the right answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_dataset

from ldcq.evaluation import diagnostics as diag
from ldcq.evaluation.plots import MazeLayout
from ldcq.stages.diffusion_prior import LatentDiffusionPrior
from ldcq.stages.skill_vae import SkillVAE

S, A, Z, H = 4, 2, 3, 5


def _episode(rng, length=40):
    # A point wandering over an open 3 x 3 maze of unit cells centred on the origin.
    xy = np.clip(np.cumsum(rng.normal(0, 0.15, (length + 1, 2)), axis=0), -1.4, 1.4)
    obs = np.concatenate([xy, rng.normal(0, 0.1, (length + 1, 2))], axis=1)
    return {
        "observations": {"observation": obs},
        "actions": rng.uniform(-1, 1, (length, A)).astype(np.float32),
        "rewards": np.zeros(length),
    }


@pytest.fixture
def dataset(minari_root):
    rng = np.random.default_rng(0)
    return write_dataset("test/diag-v0", [_episode(rng) for _ in range(30)])


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return SkillVAE(state_dim=S, action_dim=A, horizon=H, latent_dim=Z, hidden_dim=8).eval()


def _data_cfg(dataset):
    return {"dataset": dataset, "horizon": H, "stride": 1, "batch_size": 16, "val_fraction": 0.2}


OPEN = MazeLayout(np.zeros((3, 3), dtype=bool), 1.0, np.zeros(2), {})


def test_junctions_are_free_cells_with_three_or_more_free_neighbours():
    walls = np.array([[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 1, 0, 1, 1], [1, 1, 0, 1, 1]], bool)
    assert diag.junctions(walls) == [(1, 2)]
    assert diag.junctions(np.zeros((1, 3), bool)) == []  # a corridor has none


def test_direction_shares_name_the_dominant_axis_and_skip_small_moves():
    shift = np.array([[1.0, 0.2], [-0.1, 2.0], [0.05, 0.0], [-3.0, 1.0]])
    shares = diag.direction_shares(shift, min_move=0.5)
    assert dict(zip(diag.DIRECTIONS, shares, strict=True)) == {
        "east": 0.25,
        "north": 0.25,
        "west": 0.25,
        "south": 0.0,
    }


def test_cell_of_inverts_cell_xy():
    maze = MazeLayout(np.zeros((4, 6), dtype=bool), 2.0, np.zeros(2), {})
    rows, cols = np.array([0, 3, 2]), np.array([5, 0, 3])
    xy = maze.cell_xy(rows + 0.5, cols + 0.5)
    assert [r.tolist() for r in diag.cell_of(maze, xy)] == [rows.tolist(), cols.tolist()]


class _EchoPrior:
    """A stand-in prior whose samples are chosen latents: the nearest data latent's (shift 0,
    in support) or far away (shift 100)."""

    def __init__(self, latents, shift):
        self.latents, self.shift = latents, shift

    def sample(self, states, k, generator=None):
        return (self.latents[:, None] + self.shift).expand(-1, k, -1)


def test_samples_on_the_data_are_in_support_and_far_ones_are_not(dataset, vae):
    from ldcq.data.datamodules import TrajectorySnippetDataModule

    dm = TrajectorySnippetDataModule(**_data_cfg(dataset))
    dm.setup()
    held = dm.val_set.__getitems__(np.arange(len(dm.val_set)))
    ref = dm.train_set.__getitems__(np.arange(len(dm.train_set)))
    z_held = vae.encode(held["states"], held["actions"])[0]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for shift, rate in ((0.0, pytest.approx(0.01, abs=0.011)), (100.0, 1.0)):
            prior = _EchoPrior(z_held, shift)
            metrics, arrays, reference = diag.out_of_support(vae, prior, held, ref, 4, 8, gen)
            assert metrics["diag/oos_rate_diffusion"] == rate
            assert reference.tau == metrics["diag/support_threshold"] > 0
    # The held-out data latents are beyond τ in about 1 % of cases, by construction.
    data = arrays["held-out data"]
    assert (data > reference.tau).mean() <= 0.01 + 1 / len(data)
    assert arrays["VAE prior"].shape == (len(z_held) * 4,)


class _OneFarPrior:
    """A stand-in prior that, at each state, samples the data latent of the nearest of
    ``states`` K - 1 times (in support) and once shifted far away (out of support)."""

    def __init__(self, states, latents):
        self.states, self.latents = states, latents

    def sample(self, states, k, generator=None):
        z = self.latents[torch.cdist(states, self.states).argmin(dim=1)]
        samples = z[:, None].repeat(1, k, 1)
        samples[:, 0] += 100.0
        return samples


class _NormQ:
    """A stand-in Q that values a latent by its norm (``sign`` +1: the far one is best)."""

    def __init__(self, sign):
        self.sign = sign

    def score(self, states, latents):
        return self.sign * latents.norm(dim=-1)


def test_the_support_of_q_s_pick_is_measured_where_it_picks(dataset, vae):
    from ldcq.data.datamodules import TrajectorySnippetDataModule

    dm = TrajectorySnippetDataModule(**_data_cfg(dataset))
    dm.setup()
    held = dm.val_set.__getitems__(np.arange(len(dm.val_set)))
    ref = dm.train_set.__getitems__(np.arange(len(dm.train_set)))
    gen = torch.Generator().manual_seed(0)
    k = 4
    with torch.no_grad():
        z_held = vae.encode(held["states"], held["actions"])[0]
        _, _, reference = diag.out_of_support(vae, _EchoPrior(z_held, 0.0), held, ref, k, 8, gen)
        states = held["states"][:, 0]
        inside = reference.distances(vae, states, z_held[:, None])[:, 0] <= reference.tau
        stalls = states[inside][:3]  # states whose own data latent is in support
        prior = _OneFarPrior(states, z_held)
        greedy = diag.choice_support(vae, prior, _NormQ(1.0), reference, stalls, num_samples=k)
        modest = diag.choice_support(vae, prior, _NormQ(-1.0), reference, stalls, num_samples=k)
        no_stalls = diag.choice_support(vae, prior, _NormQ(1.0), reference, num_samples=k)
    # A Q that prefers the far latent picks out of support everywhere, one sample in K being so.
    assert greedy == {
        "diag/pick_oos_rate": 1.0,
        "diag/stalled_pick_oos_share": 1.0,
        "diag/stalled_sample_oos_rate": 1 / k,
    }
    # One that prefers the data latent picks out of support only where the data latent itself is
    # beyond τ (about 1 % of held-out latents by construction), and never at the chosen stalls.
    assert modest["diag/pick_oos_rate"] == pytest.approx(float((~inside).float().mean()))
    assert modest["diag/pick_oos_rate"] <= 0.01 + 1 / len(states)
    assert modest["diag/stalled_pick_oos_share"] == 0.0
    assert no_stalls == {"diag/pick_oos_rate": 1.0}  # without stalls, the held-out states only


def test_reconstruction_is_relative_to_the_action_variance(dataset, vae):
    from ldcq.data.datamodules import TrajectorySnippetDataModule

    dm = TrajectorySnippetDataModule(**_data_cfg(dataset))
    dm.setup()
    batch = dm.val_set.__getitems__(np.arange(len(dm.val_set)))
    with torch.no_grad():
        out = diag.reconstruction(vae, batch["states"], batch["actions"])
        # An untrained decoder predicts about zero: its error is the actions' second moment.
        second = float((batch["actions"] ** 2).mean())
    assert out["diag/recon_mse"] == pytest.approx(second, rel=0.5)
    assert out["diag/recon_mse_relative"] > 0.5


def test_skill_diagnostics_measure_both_priors_and_draw_them(dataset, vae, tmp_path):
    prior = LatentDiffusionPrior(
        state_dim=S, latent_dim=Z, hidden_dims=[8], time_embed_dim=8, state_embed_dim=8
    ).eval()
    result = diag.skill_diagnostics(
        vae, prior, _data_cfg(dataset), maze=OPEN, num_samples=8, seed=0, per_cell=4
    )
    m = result.metrics
    for key in ("recon_mse", "oos_rate_diffusion", "oos_rate_vae_prior", "support_threshold"):
        assert np.isfinite(m[f"diag/{key}"])
    # Every cell of an open 3 x 3 grid has three or four free neighbours.
    assert 1 <= m["diag/junctions"] <= 9 and 0 < m["diag/data_modes"] <= 4
    assert 0.0 <= m["diag/mode_coverage_diffusion"] <= 1.0
    assert 0.0 <= m["diag/mode_coverage_vae_prior"] <= 1.0
    path = diag.plot_diagnostics(result, OPEN, tmp_path / "diagnostics.png")
    assert path.stat().st_size > 0
    # Without a maze (Kitchen) or without held-out episodes a note says what was skipped.
    alone = diag.skill_diagnostics(vae, prior, _data_cfg(dataset), maze=None, num_samples=4)
    assert "diag/junctions" not in alone.metrics and "mode coverage" in alone.notes[0]
    none_held = {**_data_cfg(dataset), "val_fraction": 0.0}
    assert diag.skill_diagnostics(vae, prior, none_held).metrics == {}


def test_held_out_means_held_out_from_the_prior_too(dataset, vae):
    from ldcq.data.windows import split_episodes

    prior = LatentDiffusionPrior(
        state_dim=S, latent_dim=Z, hidden_dims=[8], time_embed_dim=8, state_embed_dim=8
    ).eval()
    kwargs = {"maze": None, "num_samples": 4, "seed": 0}
    alone = diag.skill_diagnostics(vae, prior, _data_cfg(dataset), **kwargs)
    same = diag.skill_diagnostics(vae, prior, _data_cfg(dataset), prior_split=(0.2, 0), **kwargs)
    assert same.metrics == alone.metrics  # the default: one split for both stages
    # Prior splits (seeds) that share some of the VAE's held-out episodes, and none of them.
    vae_val = set(split_episodes(30, 0.2, 0)[1])
    overlap = {seed: len(vae_val & set(split_episodes(30, 0.2, seed)[1])) for seed in range(1, 60)}
    partly = next(s for s, n in overlap.items() if 0 < n < len(vae_val))
    disjoint = next(s for s, n in overlap.items() if n == 0)
    fewer = diag.skill_diagnostics(
        vae, prior, _data_cfg(dataset), prior_split=(0.2, partly), **kwargs
    )
    assert len(fewer.support["held-out data"]) < len(alone.support["held-out data"])
    none = diag.skill_diagnostics(
        vae, prior, _data_cfg(dataset), prior_split=(0.2, disjoint), **kwargs
    )
    assert none.metrics == {} and "held out from both" in none.notes[0]


# A dead end: the goal at the bottom left (row 3, col 0); the corridor of row 1 runs east to a
# dead end at (1, 3), and the only way down is the column col 0.
DEAD_END = np.array(
    [
        [1, 1, 1, 1, 1],
        [0, 0, 0, 0, 1],
        [0, 1, 1, 1, 1],
        [0, 1, 1, 1, 1],
    ],
    dtype=bool,
)


def test_maze_distances_count_moves_through_free_cells_only():
    dist = diag.maze_distances(DEAD_END, (3, 0))
    assert dist[1].tolist() == [2, 3, 4, 5, -1]
    assert dist[:, 0].tolist() == [-1, 2, 1, 0]
    assert (dist[DEAD_END] == -1).all()


def _values(by_cell):
    values = np.full(DEAD_END.shape, np.nan)
    for cell, v in by_cell.items():
        values[cell] = v
    return values


def test_a_value_that_falls_with_every_move_from_the_goal_ascends_everywhere_and_correlates_fully():
    dist = diag.maze_distances(DEAD_END, (3, 0))
    free = [tuple(c) for c in np.argwhere(dist >= 0)]
    rising = _values({c: 10.0 - float(dist[c]) for c in free})
    assert diag.value_shape(rising, dist) == {
        "diag/value_ascent_share": 1.0,
        "diag/value_distance_corr": pytest.approx(1.0),
        "diag/value_cells": 5.0,
    }
    # Turned around, the value rises into the dead end: nothing ascends, the correlation is -1.
    falling = _values({c: float(dist[c]) for c in free})
    shape = diag.value_shape(falling, dist)
    assert shape["diag/value_ascent_share"] == 0.0
    assert shape["diag/value_distance_corr"] == pytest.approx(-1.0)


def test_a_value_peaked_in_the_dead_end_shows_in_both_measures():
    # Credit that did not propagate: the corridor's value peaks at (1, 2) instead of falling
    # toward the dead end. (1, 1) and (1, 2) do not ascend; (1, 3) still does (toward the peak).
    dist = diag.maze_distances(DEAD_END, (3, 0))
    values = _values(
        {(3, 0): 10.0, (2, 0): 5.0, (1, 0): 1.0, (1, 1): 2.0, (1, 2): 3.0, (1, 3): 2.5}
    )
    shape = diag.value_shape(values, dist)
    assert shape["diag/value_ascent_share"] == pytest.approx(3 / 5)
    # Ranks of V (0..5) against ranks of closeness: 1 - 6 Σd² / (n (n² - 1)) with no ties.
    v = np.array([5, 4, 0, 1, 3, 2])  # goal, (2,0), (1,0), (1,1), (1,2), (1,3)
    c = np.array([5, 4, 3, 2, 1, 0])
    expected = 1 - 6 * ((v - c) ** 2).sum() / (6 * 35)
    assert shape["diag/value_distance_corr"] == pytest.approx(expected)
    assert 0 < expected < 1


def test_ranks_average_ties():
    assert diag._ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]


class _XYQ:
    """A stand-in Q whose value at a state is minus its distance to the point ``target``."""

    def __init__(self, target):
        self.target = torch.as_tensor(target, dtype=torch.float32)

    def score(self, states, latents):
        value = -(states[:, :2] - self.target).norm(dim=1)
        return value[:, None].expand(-1, latents.shape[1])


class _ZeroPrior:
    def sample(self, states, k, generator=None):
        return torch.zeros(len(states), k, Z)


def test_value_propagation_measures_the_q_at_every_free_cell_centre_against_the_paid_goal():
    template = {
        "observation": np.zeros(4),
        "achieved_goal": np.zeros(2),
        "desired_goal": np.zeros(2),
    }
    maze = MazeLayout(DEAD_END, 1.0, np.zeros(2), template)
    goal = maze.cell_xy(np.array([3.5]), np.array([0.5]))[0]  # the centre of cell (3, 0)
    maze = MazeLayout(DEAD_END, 1.0, goal, template)
    near_goal = diag.value_propagation(_ZeroPrior(), _XYQ(goal), maze, ["observation"], 4)
    # Straight-line closeness to the goal rises along the corridor and down the column: all ascend.
    assert near_goal["diag/value_ascent_share"] == 1.0
    assert near_goal["diag/value_distance_corr"] > 0.9
    # A Q that values the dead end (1, 3) instead: nothing ascends, V rises away from the goal.
    dead_end = maze.cell_xy(np.array([1.5]), np.array([3.5]))[0]
    trapped = diag.value_propagation(_ZeroPrior(), _XYQ(dead_end), maze, ["observation"], 4)
    assert trapped["diag/value_ascent_share"] == 0.0 and trapped["diag/value_distance_corr"] < -0.9

    # A state without the position (obs_keys that leave out xy) gives V no way to vary: no measure.
    blind = MazeLayout(
        DEAD_END, 1.0, goal, {"observation": np.ones(3), "achieved_goal": np.zeros(2)}
    )
    assert diag.value_propagation(_ZeroPrior(), _XYQ(goal[:2]), blind, ["observation"], 4) == {}


def test_stalled_episodes_are_failures_that_stop_moving_counted_by_cell():
    maze = MazeLayout(np.zeros((4, 6), dtype=bool), 2.0, np.zeros(2), {})  # 2 xy units a cell
    t = np.arange(300.0)[:, None]
    walking = np.concatenate([0.03 * t - 5.0, np.zeros_like(t)], axis=1)  # never stops
    # walks to the centre of cell (row 1, col 1), (-3, 1), and stays there
    pinned = np.concatenate([np.minimum(0.02 * t - 5.0, -3.0), np.ones_like(t)], axis=1)
    jitter = pinned + 0.09 * np.sin(t) * np.array([0.0, 1.0])  # within 0.1 cells of its end
    short = np.full((300, 2), np.nan)  # 50 steps standing at (row 2, col 4)'s centre, then padding
    short[:50] = [3.0, -1.0]
    positions = np.stack([walking, pinned, jitter, pinned, short])
    lengths = np.array([300, 300, 300, 300, 50])
    success = np.array([False, False, False, True, False])  # the 4th reached the goal once
    ends = diag.stall_points(positions, lengths, success, maze)
    assert ends.tolist() == [[-3.0, 1.0], [-3.0, 1.0 + 0.09 * np.sin(299.0)], [3.0, -1.0]]
    metrics, cell = diag.stalled_episodes(ends, len(positions), maze)
    assert metrics == {"diag/stalled_share": 0.6, "diag/stalled_top_cell_share": 0.4}
    assert cell == (1, 1)
    # wider jitter than 0.1 cells (0.2 in xy) is still moving
    positions[2] = pinned + 0.3 * np.sin(t) * np.array([0.0, 1.0])
    stalls = diag.stall_points(positions, lengths, success, maze)
    metrics, _ = diag.stalled_episodes(stalls, len(positions), maze)
    assert metrics == {"diag/stalled_share": 0.4, "diag/stalled_top_cell_share": 0.2}
    empty = np.zeros((0, 300, 2))
    no_ends = diag.stall_points(empty, np.zeros(0), np.zeros(0, dtype=bool), maze)
    assert no_ends.shape == (0, 2)
    none, no_cell = diag.stalled_episodes(no_ends, 0, maze)
    assert none == {"diag/stalled_share": 0.0, "diag/stalled_top_cell_share": 0.0}
    assert no_cell is None
