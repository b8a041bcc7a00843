"""Generated PointMaze datasets: reproducibility, Minari layout, rewards, controller, errors."""

import itertools
import math

import minari
import numpy as np
import pytest

from ldcq.data.pointmaze import (
    GENERATED_NAMES,
    SUCCESS_RADIUS,
    dataset_id,
    generate_dataset,
    make_eval_env,
    parse_name,
    relabel_rewards,
)
from ldcq.data.waypoints import WaypointController

STEPS = 3100  # ten full 300-step umaze episodes and a 100-step remainder


@pytest.fixture
def datasets_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    return tmp_path


def _stream(dataset_id_: str) -> dict[str, np.ndarray]:
    episodes = list(minari.load_dataset(dataset_id_).iterate_episodes())
    return {
        "observations": np.concatenate([e.observations["observation"] for e in episodes]),
        "actions": np.concatenate([e.actions for e in episodes]),
        "rewards": np.concatenate([e.rewards for e in episodes]),
    }


def test_same_seed_same_data_other_seed_other_data(datasets_dir):
    first = _stream(generate_dataset("pointmaze-umaze", STEPS, seed=3, ref_episodes=3))
    again = _stream(
        generate_dataset("pointmaze-umaze", STEPS, seed=3, ref_episodes=3, overwrite=True)
    )
    other = _stream(
        generate_dataset("pointmaze-umaze", STEPS, seed=4, ref_episodes=3, overwrite=True)
    )
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["observations"], other["observations"])
    assert not np.array_equal(first["actions"], other["actions"])


@pytest.mark.parametrize("name", ["pointmaze-umaze", "pointmaze-umaze-dense"])
def test_stored_layout_and_relabeled_rewards(datasets_dir, name):
    dataset = minari.load_dataset(generate_dataset(name, STEPS, ref_episodes=3, progress=False))
    spec, dense = parse_name(name)
    episodes = list(dataset.iterate_episodes())

    assert len(episodes) == math.ceil(STEPS / spec.horizon)
    assert [len(e.actions) for e in episodes] == [300] * 10 + [100]
    for episode in episodes:
        n = len(episode.actions)
        assert episode.observations["observation"].shape == (n + 1, 4)
        assert episode.observations["desired_goal"].shape == (n + 1, 2)
        assert episode.infos["goal"].shape == (n + 1, 2)
        assert episode.infos["success"].shape == (n + 1,)
        assert not episode.terminations.any()
        assert episode.truncations[-1] and not episode.truncations[:-1].any()
        distance = np.linalg.norm(episode.observations["achieved_goal"][1:] - spec.goal_xy, axis=1)
        expected = np.exp(-distance) if dense else (distance <= SUCCESS_RADIUS).astype(float)
        np.testing.assert_allclose(episode.rewards, expected)
    for previous, following in itertools.pairwise(episodes):
        np.testing.assert_array_equal(
            previous.observations["observation"][-1], following.observations["observation"][0]
        )
    metadata = dataset.storage.metadata
    assert metadata["ref_min_score"] < metadata["ref_max_score"]
    # The stream reaches the fixed goal at least once, or the sparse check above proves little.
    assert sum(e.rewards.sum() for e in episodes) > 0


@pytest.mark.parametrize("name", ["pointmaze-umaze", "pointmaze-umaze-dense", "pointmaze-large"])
def test_the_eval_env_pays_exactly_what_the_data_rewards(name):
    spec, dense = parse_name(name)
    env = make_eval_env(name)
    paid, relabeled, successes = [], [], []
    rng = np.random.default_rng(0)
    for seed in range(30):
        # Start in the goal cell and wander: most steps lie near the radius, where a moved goal
        # and the data's goal disagree.
        obs, info = env.reset(seed=seed, options={"reset_cell": np.array(spec.goal_cell)})
        assert info["success"] == bool(
            np.linalg.norm(obs["achieved_goal"] - spec.goal_xy) <= SUCCESS_RADIUS
        )
        for _ in range(40):
            obs, reward, _, _, info = env.step(rng.uniform(-1, 1, 2))
            paid.append(reward)
            relabeled.append(relabel_rewards(obs["achieved_goal"][None], spec, dense)[0])
            successes.append(info["success"])
    env.close()
    np.testing.assert_allclose(paid, relabeled, rtol=0, atol=1e-12)
    if not dense:
        assert np.array_equal(np.asarray(paid) > 0, successes) and 0 < np.mean(paid) < 1


def test_the_moving_goal_protocol_keeps_the_envs_goal_noise():
    spec, _ = parse_name("pointmaze-umaze")
    env = make_eval_env("pointmaze-umaze", goal="moving")
    goals = np.array([env.reset(seed=s)[0]["desired_goal"] for s in range(10)])
    env.close()
    assert np.abs(goals - spec.goal_xy).max() <= 0.25 and len(np.unique(goals[:, 0])) == 10


def test_noise_free_controller_reaches_the_eval_goal():
    spec, _ = parse_name("pointmaze-umaze")
    env = make_eval_env("pointmaze-umaze")
    reached = []
    for seed in range(20):
        controller = WaypointController(spec, np.random.default_rng(seed))
        obs, info = env.reset(seed=seed)
        # The eval goal is exactly the goal cell's centre: the goal of the dataset's rewards.
        np.testing.assert_array_equal(obs["desired_goal"], spec.goal_xy)
        success = info["success"]
        truncated = False
        while not truncated:
            action = controller.act(obs["observation"], obs["desired_goal"])
            obs, _, _, truncated, info = env.step(action)
            success = success or info["success"]
        reached.append(success)
    env.close()
    assert np.mean(reached) >= 0.95


def test_names_and_ids():
    assert dataset_id("pointmaze-umaze") == "ldcq/pointmaze/umaze-v1"
    assert dataset_id("pointmaze-large-dense") == "ldcq/pointmaze/large-dense-v1"
    assert parse_name("pointmaze-medium-dense")[1]
    assert not parse_name("pointmaze-medium")[1]
    assert len(GENERATED_NAMES) == 6


@pytest.mark.parametrize("call", [dataset_id, parse_name, make_eval_env, generate_dataset])
def test_unknown_name_lists_valid_names(call):
    with pytest.raises(ValueError, match="pointmaze-large-dense") as error:
        call("pointmaze-huge")
    assert "pointmaze-huge" in str(error.value)


def test_existing_dataset_needs_overwrite(datasets_dir):
    generate_dataset("pointmaze-umaze", 300, ref_episodes=1, progress=False)
    with pytest.raises(FileExistsError, match=r"ldcq/pointmaze/umaze-v1.*overwrite"):
        generate_dataset("pointmaze-umaze", 300, ref_episodes=1, progress=False)


def test_an_older_dataset_version_is_refused_with_the_regenerate_command(datasets_dir):
    from ldcq.data.minari_io import read_episodes
    from ldcq.errors import DatasetError

    with pytest.raises(DatasetError, match=r"older version of pointmaze-umaze.*ldcq data generate"):
        read_episodes("ldcq/pointmaze/umaze-v0")
    # only the old version is on disk: the short name asks for the new one and says why
    (datasets_dir / "ldcq" / "pointmaze" / "umaze-v0" / "data").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"generate pointmaze-umaze` \(the older .*umaze-v0"):
        read_episodes("pointmaze-umaze")


def test_a_missing_generated_dataset_is_made_once_and_others_are_left_to_loading(
    datasets_dir, monkeypatch
):
    """bench-score and sweep call ensure_dataset first, so a fresh machine needs no separate
    `ldcq data generate` step; a downloaded dataset's id is not theirs to make."""
    from ldcq.data import pointmaze

    made = []

    def fake_generate(name):
        made.append(name)
        (datasets_dir / dataset_id(name) / "data").mkdir(parents=True)
        return dataset_id(name)

    monkeypatch.setattr(pointmaze, "generate_dataset", fake_generate)
    assert pointmaze.ensure_dataset("pointmaze-large") == "ldcq/pointmaze/large-v1"
    assert pointmaze.ensure_dataset("ldcq/pointmaze/large-v1") is None  # stored: kept
    assert pointmaze.ensure_dataset("ldcq/pointmaze/medium-dense-v1") == dataset_id(
        "pointmaze-medium-dense"
    )
    assert pointmaze.ensure_dataset("D4RL/antmaze/large-diverse-v1") is None
    assert made == ["pointmaze-large", "pointmaze-medium-dense"]
