"""Config composition: the order of the parts, a task's own retuning of a scale, typos refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldcq.config import compose
from ldcq.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _pipeline(tmp_path: Path, body: str) -> Path:
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "pipelines").mkdir()
    path = tmp_path / "pipelines" / "task.yaml"
    path.write_text(
        "include: [configs/family/ldcq.yaml, configs/family/maze2d.yaml]\n"
        "name: task\ndataset: pointmaze-large\n" + body
    )
    return path


def test_a_pipelines_scales_section_retunes_only_that_scale(tmp_path):
    path = _pipeline(
        tmp_path,
        "latent_bcq: {data: {stride: 3}}\n"
        "scales:\n  cpu:\n    latent_bcq: {data: {stride: 4}, trainer: {max_steps: 123}}\n",
    )
    cpu = compose(path, scale="cpu")
    assert (cpu.latent_bcq.data.stride, cpu.latent_bcq.trainer.max_steps) == (4, 123)
    quick = compose(path, scale="quick")
    assert quick.latent_bcq.data.stride == 3  # the body, over the quick preset
    assert quick.latent_bcq.trainer.max_steps == 4000
    assert "scales" not in cpu
    # The command line still has the last word.
    assert compose(path, ["latent_bcq.data.stride=7"], scale="cpu").latent_bcq.data.stride == 7


def test_a_typo_in_a_pipeline_file_is_refused_with_the_closest_key(tmp_path):
    path = _pipeline(tmp_path, "scales:\n  cpu:\n    latent_bcq: {data: {strde: 4}}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'latent_bcq\.data\.strde'.*stride"):
        compose(path, scale="cpu")
    compose(path, scale="quick")  # the section of another scale is not merged


def test_a_scales_section_naming_no_scale_is_refused(tmp_path):
    path = _pipeline(tmp_path, "scales:\n  cpuu:\n    seed: 1\n")
    with pytest.raises(ConfigError, match=r"scales\.cpuu names no configs/scale"):
        compose(path, scale="cpu")


def test_a_neutral_option_at_its_neutral_value_leaves_identities_as_they_were():
    # Options added after results were recorded: at their neutral value they are not part of a
    # fingerprint or config hash, so earlier artifacts and results keep theirs.
    from omegaconf import OmegaConf

    from ldcq.artifacts import fingerprint
    from ldcq.bench.score import config_hash
    from ldcq.config import NEUTRAL, without_neutral

    pipeline = REPO / "pipelines" / "pointmaze-umaze.yaml"
    cfg = OmegaConf.to_container(compose(pipeline), resolve=True)
    for key, value in NEUTRAL.items():
        node = cfg
        for part in key.split(".")[:-1]:
            node = node[part]
        assert node[key.rsplit(".", 1)[-1]] == value  # the family default is the neutral value
        del node[key.rsplit(".", 1)[-1]]
    assert fingerprint(without_neutral(OmegaConf.to_container(compose(pipeline)))) == fingerprint(
        cfg
    )
    base = config_hash(pipeline, "quick", "q", [])
    assert config_hash(pipeline, "quick", "q", ["diffusion_prior.model.denoiser=film_unet"]) == base
    assert config_hash(pipeline, "quick", "q", ["diffusion_prior.model.denoiser=mlp"]) != base
    assert config_hash(pipeline, "quick", "q", ["evaluation.diagnostics=true"]) != base
