"""The trial config: every setting documented, the choices shared with the sandbox agreeing with it, renamed
settings still read, and a resumed trial recognised under renamed settings."""

from __future__ import annotations

import json
from typing import get_args, get_type_hints

import pytest
from pydantic import BaseModel, ValidationError

from trainer.config import LossConfig, TrialConfig, format_validation_error
from trainer.errors import TrialConfigError
from trainer.options import CodeBlock, Isolation
from trainer.records import claim_out_dir


def settings(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield prefix + name, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from settings(field.annotation, prefix + name + ".")


def test_every_setting_has_a_description():
    undocumented = [name for name, field in settings(TrialConfig) if not (field.description or "").strip()]
    assert not undocumented


def test_choices_named_for_the_sandbox_are_the_sandbox_s():
    from sandbox.executor import Executor
    from sandbox.extract import CodeBlockMode

    assert set(get_args(CodeBlock)) == set(get_args(CodeBlockMode))
    assert set(get_args(Isolation)) == set(get_args(get_type_hints(Executor.__init__)["isolation"]))


def test_old_loss_setting_names_are_read_for_one_version():
    old = LossConfig.model_validate({"is_clip": 3.0, "rollout_is_clip": 1.5})
    assert (old.importance_ratio_clip, old.rollout_ratio_clip) == (3.0, 1.5)
    with pytest.raises(ValidationError, match="old name of loss.importance_ratio_clip"):
        LossConfig.model_validate({"is_clip": 3.0, "importance_ratio_clip": 2.0})


def test_sdpo_compat_turns_on_the_rollout_correction_at_2_and_refuses_another_clip():
    assert LossConfig().sdpo_compat is False and LossConfig().rollout_ratio_clip is None
    for given in ({"sdpo_compat": True}, {"sdpo_compat": "true", "rollout_ratio_clip": 2},
                  {"sdpo_compat": True, "rollout_is_clip": 2.0}):
        cfg = LossConfig.model_validate(given)
        assert cfg.sdpo_compat is True and cfg.rollout_ratio_clip == 2.0
        assert LossConfig.model_validate(cfg.model_dump()) == cfg  # the resolved config reads back the same
    for clip in (1.5, None):
        for name in ("rollout_ratio_clip", "rollout_is_clip"):
            with pytest.raises(ValidationError, match=f"loss.sdpo_compat .* loss.rollout_ratio_clip is {clip}"):
                LossConfig.model_validate({"sdpo_compat": True, name: clip})
    assert LossConfig(sdpo_compat=False, rollout_ratio_clip=1.5).rollout_ratio_clip == 1.5
    with pytest.raises(ValidationError, match="sdpo_compat"):
        LossConfig.model_validate({"sdpo_compat": "perhaps"})
    with pytest.raises(ValidationError) as raised:
        TrialConfig.model_validate({"loss": {"sdpo_compat": True, "rollout_ratio_clip": 3.0}})
    assert format_validation_error(raised.value).startswith("loss.sdpo_compat turns on the SDPO reference's rollout")


def test_a_trial_folder_written_under_old_setting_names_resumes(tmp_path):
    cfg = TrialConfig.model_validate({"loss": {"importance_ratio_clip": 3.0}})
    written = cfg.model_dump(mode="json")
    written["loss"]["is_clip"] = written["loss"].pop("importance_ratio_clip")
    written["loss"]["rollout_is_clip"] = written["loss"].pop("rollout_ratio_clip")
    (tmp_path / "config.json").write_text(json.dumps(written))
    claim_out_dir(cfg, tmp_path)  # the same trial: no error
    other = TrialConfig.model_validate({"loss": {"importance_ratio_clip": 2.5}})
    with pytest.raises(TrialConfigError, match="differing sections: loss"):
        claim_out_dir(other, tmp_path)


def test_gpu_only_rollout_settings_are_refused_on_cpu():
    with pytest.raises(ValidationError, match="rollout.weight_sync 'cuda_ipc' needs device 'cuda'"):
        TrialConfig.model_validate({"rollout": {"weight_sync": "cuda_ipc"}})
    with pytest.raises(ValidationError, match="rollout.sleep_between_phases needs device 'cuda'"):
        TrialConfig.model_validate({"rollout": {"sleep_between_phases": True}})
    with pytest.raises(ValidationError, match="weight_sync"):
        TrialConfig.model_validate({"device": "cuda", "rollout": {"weight_sync": "nccl"}})
    gpu = TrialConfig.model_validate({"device": "cuda", "model": {"dtype": "bfloat16"},
                                      "rollout": {"weight_sync": "cuda_ipc", "sleep_between_phases": True}})
    assert (gpu.rollout.weight_sync, gpu.rollout.sleep_between_phases) == ("cuda_ipc", True)
    # the defaults are the path the CPU tests run, on either device
    assert (TrialConfig().rollout.weight_sync, TrialConfig().rollout.sleep_between_phases) == ("shared_file", False)


def test_float32_on_cuda_is_refused_with_the_reason_unless_allowed():
    with pytest.raises(ValidationError, match="model.dtype float32 on device 'cuda': vLLM's FlashAttention and "
                                              "FlashInfer backends take only float16/bfloat16"):
        TrialConfig.model_validate({"device": "cuda"})  # float32 is the default dtype
    allowed = TrialConfig.model_validate({"device": "cuda", "rollout": {"allow_float32_on_cuda": True}})
    assert allowed.model.dtype == "float32"
    assert TrialConfig.model_validate({"device": "cuda", "model": {"dtype": "bfloat16"}}).model.dtype == "bfloat16"
    assert TrialConfig().model.dtype == "float32" and TrialConfig().device == "cpu"  # CPU runs float32


def test_the_fused_loss_is_the_default_and_zero3_needs_the_unfused_one():
    assert LossConfig().chunk_size == 256
    assert LossConfig(chunk_size=None).chunk_size is None
    with pytest.raises(ValidationError):
        LossConfig(chunk_size=0)
    assert TrialConfig.model_validate({"deepspeed": {"zero_stage": 3}}).loss.chunk_size is None  # left out: unfused
    with pytest.raises(ValidationError, match="zero_stage 3"):
        TrialConfig.model_validate({"deepspeed": {"zero_stage": 3}, "loss": {"chunk_size": 256}})
    cfg = TrialConfig.model_validate({"deepspeed": {"zero_stage": 3}, "loss": {"chunk_size": None}})
    assert cfg.loss.chunk_size is None
