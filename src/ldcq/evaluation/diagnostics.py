"""Skill diagnostics: does the diffusion prior keep its samples in the data's support, and does it
cover more of the data's behaviour modes than the VAE's Gaussian prior? (``evaluation.diagnostics``)

Three measures. The held-out windows are those of episodes held out from both the skill VAE and
the prior (their ``data.val_fraction`` splits); the reference the samples are measured against is
the training data's own, since support means the training data's support:

- **Reconstruction**: the skill decoder's action error on held-out windows, each encoded to its
  posterior mean and decoded step by step on the window's own states (teacher-forced): the mean
  squared error of π's mean action, and that error over the held-out actions' variance (1.0 is
  no better than predicting the mean action).
- **Out-of-support rate**: for a held-out window starting at state s with data latent z, its
  *support distance* is the distance from z to the nearest latent of the ``neighbours`` training
  windows whose start states are nearest to s (in the VAE's normalized state space). The
  threshold τ is the 99th percentile of that distance over the held-out data latents: by
  construction about 1 % of real latents lie beyond it. K latents are drawn at each held-out s
  from the diffusion prior and from the VAE's Gaussian prior p(z | s); a sample is out of support
  when its own support distance exceeds τ. Distances are Euclidean in the raw latent space.
- **Mode coverage** (maze datasets with a state decoder): at each junction (a free cell with at
  least three free neighbours), the directions the data takes from it are those, among east,
  north, west and south, toward which at least ``share`` of the training windows starting in the
  cell move more than half a cell in H steps. Up to ``per_cell`` of those windows' start states
  each get K prior samples, whose end points the VAE's state decoder predicts; a data direction
  is covered when at least ``share`` of the pooled samples take it. Coverage is the covered share
  of the data's directions, averaged over junctions.

And one of the Q-function (:func:`value_propagation`, mazes): has the goal's value propagated
back through the maze? At the centre of every free cell, standing still, V(s) is the best of K
prior latents' min(Q1, Q2), as in the Q map, averaged over 8 independent draws of the K; the maze
distance of a cell is its number of moves to the goal cell through free cells. A cell *ascends*
when a neighbour one move closer to the goal has a higher V; the *value-distance correlation* is
Spearman's rank correlation of V with minus the maze distance (1: V falls with every move away
from the goal). A walk that follows the highest neighbour is not measured: within one skill's
reach of the goal V is flat, and which cell of that plateau tops it is decided by sampling noise.

And one of the rollouts (:func:`stall_points`, :func:`stalled_episodes`, mazes): how do the
failures fail? An episode *stalls* when it ends without success and its last ``window`` steps
stay within ``radius`` cells of where it ends: the agent keeps choosing a skill that does not
move it (pressing into a wall). Stalls gathered in one cell point at one place where Q prefers a
skill the maze blocks.

And one of Q's choices (:func:`choice_support`): is the latent Q picks among K prior samples
inside the data's support, by the out-of-support rate's own distance and τ? At the held-out start
states (the rate of Q's picks against the rate of all samples: does Q prefer unsupported
latents?) and, on a maze, at the stalled episodes' end points, standing still (is the skill a
stalled agent keeps choosing one the data never took from there?).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ldcq.data.datamodules import SnippetDataset, TrajectorySnippetDataModule
from ldcq.data.windows import make_windows, split_episodes

DIRECTIONS = ("east", "north", "west", "south")
_UNIT = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
_ROWS = 2048  # windows per encoder call


@dataclass
class DiagnosticsResult:
    metrics: dict[str, float]
    support: dict[str, np.ndarray] = field(default_factory=dict)  # support distances by source
    junctions: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reference: SupportReference | None = None  # what the support distance measures against

    @property
    def threshold(self) -> float:
        """τ of the out-of-support rate (NaN when it was not measured)."""
        return float("nan") if self.reference is None else self.reference.tau


@dataclass
class SupportReference:
    """The training windows a sample's support distance is measured against: their start states
    in the VAE's normalized space ``(N, S)``, their encoded latents ``(N, Z)``, the number of
    nearest windows that count, τ, and the held-out start states ``(M, S)`` τ was measured at."""

    states: Tensor
    latents: Tensor
    neighbours: int
    tau: float
    held_states: Tensor

    def distances(self, vae, states: Tensor, candidates: Tensor) -> Tensor:
        """Support distances of ``candidates (M, K, Z)`` at raw ``states (M, S)`` -> (M, K)."""
        dist = torch.cdist(vae.state_normalizer(states), self.states)
        near = dist.topk(min(self.neighbours, len(self.states)), dim=1, largest=False).indices
        return support_distances(candidates, self.latents, near)


def _encode(vae, states: Tensor, actions: Tensor) -> Tensor:
    return torch.cat(
        [
            vae.encode(s, a)[0]
            for s, a in zip(states.split(_ROWS), actions.split(_ROWS), strict=True)
        ]
    )


def reconstruction(vae, states: Tensor, actions: Tensor) -> dict[str, float]:
    """Teacher-forced action error of the decoder on windows ``states (W, H+1, S)``, ``actions
    (W, H, A)`` encoded to their posterior means."""
    h = vae.hparams.horizon
    errors = []
    for s, a in zip(states.split(_ROWS), actions.split(_ROWS), strict=True):
        z = vae.encode(s, a)[0]
        mean, _ = vae.policy(vae.state_normalizer(s[:, :h]), z[:, None].expand(-1, h, -1), a)
        errors.append(((mean - a) ** 2).flatten(0, 1))
    squared = torch.cat(errors)
    variance = actions.flatten(0, 1).var(dim=0, unbiased=False).clamp_min(1e-12)
    return {
        "diag/recon_mse": float(squared.mean()),
        "diag/recon_mse_relative": float((squared.mean(0) / variance).mean()),
    }


def support_distances(
    candidates: Tensor, reference: Tensor, neighbours: Tensor, rows: int = 256
) -> Tensor:
    """Distance from each candidate latent to the nearest reference latent among its state's
    neighbours: ``candidates (M, K, Z)``, ``reference (N, Z)``, ``neighbours (M, n)`` indices
    into ``reference`` -> ``(M, K)``."""
    out = []
    for c, nb in zip(candidates.split(rows), neighbours.split(rows), strict=True):
        near = reference[nb]  # (m, n, Z)
        out.append(torch.cdist(c, near).amin(dim=-1))
    return torch.cat(out)


def out_of_support(
    vae,
    prior,
    held: dict[str, Tensor],
    ref: dict[str, Tensor],
    num_samples: int,
    neighbours: int,
    generator: torch.Generator,
) -> tuple[dict[str, float], dict[str, np.ndarray], SupportReference]:
    """The out-of-support rates of the diffusion prior's and the VAE prior's samples at the
    held-out start states (see the module docstring); also the distances and the reference
    (with τ) they were measured against."""
    s_held = held["states"][:, 0]
    reference = SupportReference(
        states=vae.state_normalizer(ref["states"][:, 0]),
        latents=_encode(vae, ref["states"], ref["actions"]),
        neighbours=neighbours,
        tau=float("nan"),
        held_states=s_held,
    )
    z_held = _encode(vae, held["states"], held["actions"])
    data = reference.distances(vae, s_held, z_held[:, None])[:, 0]
    reference.tau = tau = float(torch.quantile(data, 0.99))
    samples = _prior_samples(vae, prior, s_held, num_samples, generator)
    d_diff = reference.distances(vae, s_held, samples["diffusion prior"])
    d_vae = reference.distances(vae, s_held, samples["VAE prior"])
    metrics = {
        "diag/oos_rate_diffusion": float((d_diff > tau).float().mean()),
        "diag/oos_rate_vae_prior": float((d_vae > tau).float().mean()),
        "diag/support_threshold": tau,
    }
    arrays = {
        "held-out data": data.numpy(),
        "diffusion prior": d_diff.flatten().numpy(),
        "VAE prior": d_vae.flatten().numpy(),
    }
    return metrics, arrays, reference


@torch.no_grad()
def pick_support(
    vae, prior, q, states: Tensor, reference: SupportReference, num_samples: int, generator
) -> tuple[float, float]:
    """At each raw state of ``states (M, S)``: K prior samples, Q's pick among them (the argmax of
    min(Q1, Q2), as the policy picks); the share of the M picks out of support and the share of
    all M·K samples out of support (``prior`` samples with the policy's settings)."""
    picked, sampled = [], []
    for chunk in states.split(_ROWS // 8):
        latents = prior.sample(chunk, num_samples, generator)
        out = reference.distances(vae, chunk, latents) > reference.tau
        best = q.score(chunk, latents).argmax(dim=1)
        picked.append(out[torch.arange(len(chunk)), best])
        sampled.append(out.flatten())
    return float(torch.cat(picked).float().mean()), float(torch.cat(sampled).float().mean())


@torch.no_grad()
def choice_support(
    vae,
    prior,
    q,
    reference: SupportReference,
    stall_states: Tensor | None = None,
    num_samples: int = 50,
    seed: int = 0,
    sampling: dict[str, Any] | None = None,
) -> dict[str, float]:
    """:func:`pick_support` at the held-out start states τ was measured at
    (``diag/pick_oos_rate``, beside ``diag/oos_rate_diffusion`` of all samples) and, given raw
    ``stall_states (M, S)``, at the stalls (``diag/stalled_pick_oos_share``,
    ``diag/stalled_sample_oos_rate``); ``sampling`` as in :func:`skill_diagnostics`."""
    generator = torch.Generator().manual_seed(seed)
    sampler = _Sampling(prior, sampling or {})
    held = reference.held_states
    picked, _ = pick_support(vae, sampler, q, held, reference, num_samples, generator)
    metrics = {"diag/pick_oos_rate": picked}
    if stall_states is not None and len(stall_states):
        picked, sampled = pick_support(
            vae, sampler, q, stall_states, reference, num_samples, generator
        )
        metrics["diag/stalled_pick_oos_share"] = picked
        metrics["diag/stalled_sample_oos_rate"] = sampled
    return metrics


def cell_of(maze, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of the maze cell holding each ``xy (N, 2)`` (the inverse of
    :meth:`MazeLayout.cell_xy`)."""
    h, w = maze.walls.shape
    cols = np.floor(xy[:, 0] / maze.scale + w / 2).astype(int)
    rows = np.floor(h / 2 - xy[:, 1] / maze.scale).astype(int)
    return np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)


def junctions(walls: np.ndarray) -> list[tuple[int, int]]:
    """Free cells with at least three free neighbours (of four)."""
    h, w = walls.shape
    found = []
    for r in range(h):
        for c in range(w):
            if walls[r, c]:
                continue
            free = sum(
                0 <= r + dr < h and 0 <= c + dc < w and not walls[r + dr, c + dc]
                for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
            )
            if free >= 3:
                found.append((r, c))
    return found


def direction_shares(shift: np.ndarray, min_move: float) -> np.ndarray:
    """Share of the displacements ``shift (N, 2)`` that move more than ``min_move`` toward each
    of east, north, west, south (the unit direction with the largest projection)."""
    if not len(shift):
        return np.zeros(len(DIRECTIONS))
    moved = np.linalg.norm(shift, axis=1) > min_move
    which = (shift @ _UNIT.T).argmax(axis=1)
    return np.bincount(which[moved], minlength=len(DIRECTIONS)) / len(shift)


def mode_coverage(
    vae,
    prior,
    train: dict[str, np.ndarray],
    maze,
    num_samples: int,
    per_cell: int,
    share: float,
    rng: np.random.Generator,
    generator: torch.Generator,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Mode coverage at the maze's junctions (see the module docstring). ``train`` holds the
    training windows' ``start (W, S)`` and ``end (W, S)`` states."""
    start_xy, end_xy = train["start"][:, :2], train["end"][:, :2]
    rows, cols = cell_of(maze, start_xy)
    min_move = 0.5 * maze.scale
    found = []
    for r, c in junctions(maze.walls):
        in_cell = np.flatnonzero((rows == r) & (cols == c))
        data_shares = direction_shares(end_xy[in_cell] - start_xy[in_cell], min_move)
        data_dirs = data_shares >= share
        if len(in_cell) < 10 or not data_dirs.any():
            continue
        pick = rng.choice(in_cell, size=min(per_cell, len(in_cell)), replace=False)
        s0 = torch.from_numpy(train["start"][pick])
        covered = {}
        for name, latents in _prior_samples(vae, prior, s0, num_samples, generator).items():
            s_rep = s0[:, None].expand(-1, num_samples, -1).reshape(-1, s0.shape[1])
            mean, _ = vae.state_decoder(vae.state_normalizer(s_rep), latents.flatten(0, 1))
            end = vae.state_normalizer.unnormalize(mean)
            shares = direction_shares((end - s_rep)[:, :2].numpy(), min_move)
            covered[name] = (shares >= share) & data_dirs
        found.append(
            {
                "cell": (r, c),
                "xy": maze.cell_xy(np.array([r + 0.5]), np.array([c + 0.5]))[0],
                "data": data_dirs,
                "covered": covered,
            }
        )
    if not found:
        return {}, []
    metrics = {"diag/junctions": float(len(found))}
    metrics["diag/data_modes"] = float(np.mean([j["data"].sum() for j in found]))
    for name, key in (("diffusion prior", "diffusion"), ("VAE prior", "vae_prior")):
        ratios = [j["covered"][name].sum() / j["data"].sum() for j in found]
        metrics[f"diag/mode_coverage_{key}"] = float(np.mean(ratios))
    return metrics, found


def _prior_samples(vae, prior, states: Tensor, k: int, generator) -> dict[str, Tensor]:
    """K latents per state (N, K, Z) from the diffusion prior and from the VAE's Gaussian prior."""
    mean, std = vae.prior(vae.state_normalizer(states))
    noise = torch.randn((len(states), k, mean.shape[1]), generator=generator)
    return {
        "diffusion prior": prior.sample(states, k, generator=generator),
        "VAE prior": mean[:, None] + std[:, None] * noise,
    }


class _Sampling:
    """The prior with the policy's sampler settings bound (None leaves the prior's own)."""

    def __init__(self, prior, settings: dict[str, Any]) -> None:
        self.prior = prior
        self.settings = {k: v for k, v in settings.items() if v is not None}

    def sample(self, states: Tensor, k: int, generator=None) -> Tensor:
        return self.prior.sample(states, k, generator=generator, **self.settings)


@torch.no_grad()
def skill_diagnostics(
    vae,
    prior,
    data_cfg: dict[str, Any],
    maze=None,
    num_samples: int = 50,
    seed: int = 0,
    held_out: int = 1024,
    reference: int = 20000,
    neighbours: int = 64,
    per_cell: int = 16,
    share: float = 0.1,
    prior_split: tuple[float, int] | None = None,
    sampling: dict[str, Any] | None = None,
) -> DiagnosticsResult:
    """Every diagnostic of the module docstring for the trained ``vae`` and ``prior``; ``data_cfg``
    is the skill VAE's ``data`` section (its windows and its held-out split). ``prior_split``:
    the prior data's ``(val_fraction, seed)``, so that held-out means held out from both.
    ``sampling``: the policy's ``sampler``, ``sampling_steps``, ``extra_steps`` (None: the
    prior's own), so the samples measured are those the policy draws."""
    dm = TrajectorySnippetDataModule(**data_cfg)
    dm.setup()
    result = DiagnosticsResult(metrics={})
    val, note = _held_out(dm, prior_split)
    if val is None:
        result.notes.append(note)
        return result
    train = dm.train_set
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    ref = train.__getitems__(rng.choice(len(train), min(reference, len(train)), replace=False))
    held = val.__getitems__(rng.choice(len(val), min(held_out, len(val)), replace=False))
    result.metrics.update(reconstruction(vae, held["states"], held["actions"]))
    prior = _Sampling(prior, sampling or {})
    metrics, result.support, result.reference = out_of_support(
        vae, prior, held, ref, num_samples, neighbours, generator
    )
    result.metrics.update(metrics)
    if maze is None:
        result.notes.append("not a maze: mode coverage skipped")
    elif vae.state_decoder is None:
        result.notes.append("the skill VAE has no state decoder: mode coverage skipped")
    else:
        starts = train.state_starts.numpy()
        obs = train.observations.numpy()
        windows = {"start": obs[starts], "end": obs[starts + vae.hparams.horizon]}
        metrics, result.junctions = mode_coverage(
            vae, prior, windows, maze, num_samples, per_cell, share, rng, generator
        )
        result.metrics.update(metrics)
        if not result.junctions:
            result.notes.append("no junction with enough data: mode coverage skipped")
    return result


def _held_out(dm, prior_split: tuple[float, int] | None):
    """The windows of the episodes held out from the skill VAE (and, given its ``(val_fraction,
    seed)``, from the prior too), or None and why there are none."""
    if dm.val_set is None or not len(dm.val_set):
        return None, "no held-out episodes (skill_vae.data.val_fraction is 0): skipped"
    if prior_split is None:
        return dm.val_set, ""
    _, prior_val = split_episodes(dm.episodes.num_episodes, *prior_split)
    both = np.intersect1d(dm.split()[1], prior_val)
    if not len(both):
        return None, (
            "no episode is held out from both the skill VAE and the prior (their "
            "data.val_fraction or data.seed differ): skipped"
        )
    windows = make_windows(dm.episodes, dm.hparams.horizon, dm.hparams.stride, episode_subset=both)
    return SnippetDataset(dm.val_set.observations, dm.val_set.actions, windows), ""


def plot_diagnostics(result: DiagnosticsResult, maze, path: str | Path) -> Path:
    """Support distances (histograms, τ marked) and, on a maze, the junctions' data directions
    and which of them each prior covers."""
    from matplotlib import pyplot as plt

    from ldcq.evaluation.plots import _draw_maze, _save

    panels = 2 if result.junctions else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.5), squeeze=False)
    ax = axes[0, 0]
    top = max(float(np.quantile(v, 0.995)) for v in result.support.values())
    bins = np.linspace(0.0, max(top, result.threshold * 1.5), 60)
    for (name, values), color in zip(
        result.support.items(), ("black", "tab:blue", "tab:orange"), strict=False
    ):
        rate = float((values > result.threshold).mean())
        ax.hist(
            values,
            bins=bins,
            density=True,
            histtype="step",
            lw=1.8,
            color=color,
            label=f"{name}: {100 * rate:.1f} % beyond τ",
        )
    ax.axvline(result.threshold, color="red", ls="--", lw=1.2, label="τ (99th pct of data)")
    ax.set_xlabel("distance to the nearest data latent of nearby states")
    ax.set_ylabel("density")
    ax.set_title("support of sampled latents (held-out states)")
    ax.legend(fontsize=8)
    if result.junctions:
        ax = axes[0, 1]
        _draw_maze(ax, maze)
        offsets = {"diffusion prior": -0.12, "VAE prior": 0.12}
        colors = {"diffusion prior": "tab:blue", "VAE prior": "tab:orange"}
        for j in result.junctions:
            x, y = j["xy"]
            for d, unit in enumerate(_UNIT):
                if not j["data"][d]:
                    continue
                length = 0.4 * maze.scale
                ax.arrow(x, y, *(unit * length), color="0.6", width=0.03 * maze.scale, zorder=3)
                for name, off in offsets.items():
                    if j["covered"][name][d]:
                        px, py = (x, y) + unit * length * 0.7 + unit[::-1] * off * maze.scale
                        ax.plot(px, py, "o", ms=5, color=colors[name], zorder=4)
        for name, color in colors.items():
            ax.plot([], [], "o", color=color, label=f"covered by the {name}")
        ax.plot([], [], color="0.6", lw=4, label="direction in the data")
        ax.legend(fontsize=7, loc="lower left")
        ax.set_title("behaviour modes at junctions")
    fig.tight_layout()
    path = _save(fig, path)
    plt.close(fig)
    return path


_MOVES = ((0, 1), (-1, 0), (0, -1), (1, 0))  # (row, col) steps to the east, north, west, south


def maze_distances(walls: np.ndarray, goal: tuple[int, int]) -> np.ndarray:
    """Moves from every free cell to ``goal`` through free cells (breadth first): ``(H, W)``
    int, -1 on walls and on cells that cannot reach it."""
    dist = np.full(walls.shape, -1, dtype=np.int64)
    if walls[goal]:
        return dist
    dist[goal] = 0
    frontier = [goal]
    while frontier:
        nxt = []
        for r, c in frontier:
            for dr, dc in _MOVES:
                n = (r + dr, c + dc)
                if (
                    0 <= n[0] < walls.shape[0]
                    and 0 <= n[1] < walls.shape[1]
                    and not walls[n]
                    and dist[n] < 0
                ):
                    dist[n] = dist[r, c] + 1
                    nxt.append(n)
        frontier = nxt
    return dist


def _neighbours(cell: tuple[int, int], dist: np.ndarray):
    for dr, dc in _MOVES:
        n = (cell[0] + dr, cell[1] + dc)
        if 0 <= n[0] < dist.shape[0] and 0 <= n[1] < dist.shape[1] and dist[n] >= 0:
            yield n


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` (0-based), ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, tie, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(tie, weights=ranks) / counts)[tie]


def value_shape(values: np.ndarray, dist: np.ndarray) -> dict[str, float]:
    """The measures of :func:`value_propagation` for a value per cell ``values (H, W)`` (NaN off
    the maze) and the maze distances ``dist`` of :func:`maze_distances`: the ascent share over
    the cells that can reach the goal, the goal cell aside; the rank correlation over those cells
    and the goal cell."""
    cells = [tuple(c) for c in np.argwhere(dist > 0)]
    if not cells:
        return {}
    ascends = sum(
        any(dist[n] == dist[c] - 1 and values[n] > values[c] for n in _neighbours(c, dist))
        for c in cells
    )
    reach = dist >= 0
    v, d = _ranks(values[reach]), _ranks(-dist[reach].astype(float))
    spread = v.std() * d.std()
    corr = float(((v - v.mean()) * (d - d.mean())).mean() / spread) if spread > 0 else 0.0
    return {
        "diag/value_ascent_share": ascends / len(cells),
        "diag/value_distance_corr": corr,
        "diag/value_cells": float(len(cells)),
    }


@torch.no_grad()
def value_propagation(
    prior,
    q,
    maze,
    obs_keys,
    num_samples: int = 50,
    seed: int = 0,
    sampling: dict[str, Any] | None = None,
    draws: int = 8,
) -> dict[str, float]:
    """``diag/value_ascent_share`` and ``diag/value_distance_corr`` (module docstring) of the
    trained ``q`` over ``prior``'s samples on ``maze`` (a :class:`~ldcq.evaluation.plots.MazeLayout`
    whose goal is the one the evaluation pays at); ``sampling`` as in :func:`skill_diagnostics`.
    Empty when the state (``obs_keys``) does not hold the agent's position."""
    cells = np.argwhere(~maze.walls)
    xy = maze.cell_xy(cells[:, 0] + 0.5, cells[:, 1] + 0.5)
    states = torch.as_tensor(maze.states_at(xy, obs_keys))
    if len(states) < 2 or not bool((states != states[0]).any()):
        return {}  # the state does not hold the position: V cannot vary over the maze
    generator = torch.Generator().manual_seed(seed)
    sampler = _Sampling(prior, sampling or {})
    # The planner's value at a state: the best of K prior samples, averaged over ``draws``
    # independent sets of K (one set's max is noisy enough to move a walk's end by a cell).
    rows = states.repeat_interleave(draws, dim=0)
    best = [
        q.score(chunk, sampler.sample(chunk, num_samples, generator)).max(dim=1).values
        for chunk in rows.split(_ROWS // 8)
    ]
    values = np.full(maze.walls.shape, np.nan)
    mean = torch.cat(best).float().view(len(states), draws).mean(dim=1)
    values[cells[:, 0], cells[:, 1]] = mean.numpy()
    goal = tuple(int(i[0]) for i in cell_of(maze, maze.goal_xy[None]))
    return value_shape(values, maze_distances(maze.walls, goal))


def stall_points(
    positions: np.ndarray,
    lengths: np.ndarray,
    success: np.ndarray,
    maze,
    window: int = 100,
    radius: float = 0.1,
) -> np.ndarray:
    """Where each stalled episode (see the module docstring) ends, xy ``(M, 2)``, among rollouts
    with xy ``positions (N, T, 2)``, ``lengths (N,)`` and ``success (N,)``."""
    ends = []
    for xy, length, ok in zip(positions, lengths, success, strict=True):
        if ok or length < 1:
            continue
        last = xy[max(0, int(length) - window) : int(length)]
        if np.linalg.norm(last - last[-1], axis=1).max() <= radius * maze.scale:
            ends.append(last[-1])
    return np.array(ends, dtype=float).reshape(-1, 2)


def stalled_episodes(
    ends: np.ndarray, episodes: int, maze
) -> tuple[dict[str, float], tuple[int, int] | None]:
    """The stalled episodes' end points ``ends (M, 2)`` (:func:`stall_points`) among
    ``episodes``: ``diag/stalled_share`` (of all episodes) and ``diag/stalled_top_cell_share`` (of
    all episodes, those stalled in the cell holding the most stalls), and that cell (row, col),
    None when nothing stalled."""
    n = max(episodes, 1)
    metrics = {"diag/stalled_share": len(ends) / n, "diag/stalled_top_cell_share": 0.0}
    if not len(ends):
        return metrics, None
    rows, cols = cell_of(maze, ends)
    cells, counts = np.unique(np.stack([rows, cols], axis=1), axis=0, return_counts=True)
    top = int(counts.argmax())
    metrics["diag/stalled_top_cell_share"] = float(counts[top]) / n
    return metrics, (int(cells[top][0]), int(cells[top][1]))
