"""Precision selection: ``auto`` follows the hardware, stages inherit, identities are kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldcq import precision
from ldcq.config import compose
from ldcq.errors import ConfigError
from ldcq.pipeline import Context

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "pipelines" / "pointmaze-umaze.yaml"


def _cpu_caps(monkeypatch, **flags):
    caps = {"avx2": True, "amx_bf16": False, "avx512_bf16": False, **flags}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)


def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    _cpu_caps(monkeypatch)
    assert precision.resolve("auto", "cpu") == (
        "32-true",
        "auto: the CPU has no native bf16 matmul (AMX-BF16 or AVX512-BF16)",
    )
    _cpu_caps(monkeypatch, avx512_bf16=True)
    assert precision.resolve("auto", "cpu") == ("bf16-mixed", "auto: the CPU has AVX512-BF16")
    _cpu_caps(monkeypatch, amx_bf16=True)
    assert precision.resolve("auto", "cpu")[0] == "bf16-mixed"


def test_auto_on_a_gpu_needs_bf16_that_is_not_emulated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert precision.resolve("auto", "gpu") == (
        "32-true",
        "auto: the GPU (Tesla T4) has no native bf16",
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert precision.resolve("auto", "auto")[0] == "bf16-mixed"  # auto accelerator: the GPU


def test_an_explicit_precision_is_kept_and_a_wrong_one_is_refused(monkeypatch):
    _cpu_caps(monkeypatch, avx512_bf16=True)
    assert precision.resolve("32-true", "cpu") == ("32-true", "set in the config")
    with pytest.raises(ConfigError, match=r"trainer.precision='fp8'.*valid values"):
        precision.resolve("fp8", "cpu")
    with pytest.raises(ConfigError, match="16-mixed needs a CUDA GPU"):
        precision.resolve("16-mixed", "cpu")


def _ctx(overrides):
    cfg = compose(PIPELINE, ["trainer.accelerator=cpu", *overrides])
    return Context(cfg=cfg, root=Path("."), tracker=None, parent_run=None, dataset={"id": "x"})


def test_stages_inherit_the_shared_precision_and_the_bank_the_priors(monkeypatch):
    _cpu_caps(monkeypatch, avx512_bf16=True)
    ctx = _ctx(["diffusion_prior.trainer.precision=32-true"])
    assert ctx.precision("skill_vae") == ("bf16-mixed", "auto: the CPU has AVX512-BF16")
    assert ctx.precision("diffusion_prior") == ("32-true", "set in the config")
    assert ctx.precision("latent_bank") == ("32-true", "set in the config")  # samples the prior
    assert ctx.precision("evaluation") == ("32-true", "set in the config")  # as the bank
    assert ctx.trainer_kwargs("latent_bcq")["precision"] == "bf16-mixed"
    # The stage's other trainer keys, null ones included, reach Lightning unchanged.
    assert ctx.trainer_kwargs("skill_vae")["check_val_every_n_epoch"] is None
    bank = _ctx(["latent_bank.trainer.precision=32-true"])
    assert bank.precision("latent_bank")[0] == "32-true"
    assert bank.precision("diffusion_prior")[0] == "bf16-mixed"


def test_auto_without_native_bf16_keeps_the_identities_of_32_true(monkeypatch):
    # Results and artifacts recorded before auto existed ran in 32-true: on a host where auto
    # means 32-true they keep their fingerprints and config hashes.
    from ldcq.bench.score import config_hash

    _cpu_caps(monkeypatch)
    auto, explicit = _ctx([]), _ctx(["trainer.precision=32-true"])
    for stage in ("skill_vae", "diffusion_prior", "latent_bank", "latent_bcq", "evaluation"):
        assert auto.fingerprint(stage, []) == explicit.fingerprint(stage, [])
    hashes = [config_hash(PIPELINE, "quick", "q", o) for o in ([], ["trainer.precision=32-true"])]
    assert hashes[0] == hashes[1]
    _cpu_caps(monkeypatch, avx512_bf16=True)
    assert config_hash(PIPELINE, "quick", "q", []) != hashes[0]
    assert _ctx([]).fingerprint("skill_vae", []) != explicit.fingerprint("skill_vae", [])


def test_the_policy_samples_in_its_precision_and_returns_fp32_latents():
    from ldcq.evaluation.policy import LDCQPolicy

    seen = []

    class Prior:
        def sample(self, states, k, generator=None, **kw):
            seen.append(
                torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            )
            return torch.randn(len(states), k, 3, generator=generator).to(torch.bfloat16)

    class Q:
        def score(self, states, z):
            return z.sum(-1)

    class VAE:
        pass

    policy = LDCQPolicy(VAE(), Prior(), Q(), num_samples=4, precision="bf16-mixed")
    z = policy.select(torch.zeros(2, 4))
    assert z.dtype == torch.float32 and z.shape == (2, 3)
    assert seen == [torch.bfloat16]
    LDCQPolicy(VAE(), Prior(), Q(), num_samples=4).select(torch.zeros(2, 4))
    assert seen[-1] is None
    with pytest.raises(ConfigError, match="precision='fp8'"):
        LDCQPolicy(VAE(), Prior(), Q(), precision="fp8")


def test_the_evaluation_runs_the_inherited_precision_only_where_this_cpu_can(monkeypatch):
    # The bank may have been sampled on a GPU; the policy always runs on this CPU.
    _cpu_caps(monkeypatch)  # no native bf16 here
    ctx = _ctx(["trainer.precision=bf16-mixed"])
    assert ctx.precision("latent_bank") == ("bf16-mixed", "set in the config")
    concrete, why = ctx.precision("evaluation")
    assert concrete == "32-true" and "no native bf16" in why
    _cpu_caps(monkeypatch, amx_bf16=True)
    assert ctx.precision("evaluation") == ("bf16-mixed", "set in the config")


def test_lightnings_other_precision_names_pass_through(monkeypatch):
    _cpu_caps(monkeypatch)
    assert precision.resolve("bf16", "cpu") == ("bf16-mixed", "set in the config")
    assert precision.resolve("32", "cpu")[0] == "32-true"
    assert precision.resolve("64-true", "cpu")[0] == "64-true"
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        precision.resolve("16-true", "cpu")
