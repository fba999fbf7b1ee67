"""GPU memory per phase from config.json alone: the parameter count against transformers' own models, the
model states against DeepSpeed's estimators, two models checked by hand, and the verdicts a user sees from
`opsd sweep plan` and `opsd sweep run` before any GPU-hour is spent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.errors import SweepError
from orchestrator.gpu_memory import GiB, estimate_trial_memory, fit_problem, model_states, trial_memory
from orchestrator.model_shape import KNOWN_CONFIGS, ModelConfigError, ModelShape, read_model_shape
from orchestrator.plan import memory_estimates
from orchestrator.sweep_file import RESOURCE_PRESETS, load_sweep
from trainer.config import TrialConfig

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"
OPSD = [sys.executable, "-m", "orchestrator.cli"]

# The published config.json values (huggingface.co/Qwen/Qwen3-8B and Qwen/Qwen3-0.6B, config.json), written
# out here rather than read from KNOWN_CONFIGS.
QWEN3_8B = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "max_position_embeddings": 40960, "tie_word_embeddings": False, "attention_bias": False}
QWEN3_06B = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
             "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
             "max_position_embeddings": 40960, "tie_word_embeddings": True, "attention_bias": False}
B200 = int(178.35 * GiB)
H100 = int(79.1 * GiB)


def trial(**sections) -> TrialConfig:
    return TrialConfig.model_validate({"device": "cuda", **sections})


def paper_trial(model: str, world_size: int = 8, **rollout) -> TrialConfig:
    """The trial settings of sweeps/paper_fig1.yaml on b200-8."""
    return trial(model={"path": model, "dtype": "bfloat16"},
                 context={"max_teacher_prompt_tokens": 10240},
                 rollout={"max_response_tokens": 32768, "max_prompt_tokens": 2048, "gpu_memory_utilization": 0.45,
                          **rollout},
                 optim={"mini_batch_size": 8, "micro_batch_size": 1, "gradient_checkpointing": True},
                 deepspeed={"zero_stage": 2, "bf16": True, "world_size": world_size})


@pytest.mark.parametrize("name", sorted(KNOWN_CONFIGS))
def test_parameters_and_largest_layer_match_transformers_models(name):
    """Built on the meta device (no memory, no weights) by transformers itself, tied weights counted once."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = dict(KNOWN_CONFIGS[name])
    config_class = {"qwen3": transformers.Qwen3Config, "olmo3": transformers.Olmo3Config,
                    "llama": transformers.LlamaConfig}[config.pop("model_type")]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config_class(**config))
    parameters = sum({id(p): p.numel() for p in model.parameters()}.values())
    # DeepSpeed's "largest layer" (estimate_zero3_model_states_mem_needs_all_live): a module's own parameters.
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    shape = ModelShape.from_config(KNOWN_CONFIGS[name])
    assert (shape.parameters, shape.largest_layer) == (parameters, largest)
    if shape.layer_types:  # sliding and full attention layers where transformers puts them
        assert list(shape.layer_types) == list(model.config.layer_types)


@pytest.mark.parametrize("zero_stage", [2, 3])
@pytest.mark.parametrize("world_size", [1, 4, 8])
@pytest.mark.parametrize("name", ["Qwen/Qwen3-0.6B", "Qwen/Qwen3-8B", "allenai/Olmo-3-7B-Instruct"])
def test_model_states_are_deepspeeds_estimates(name, world_size, zero_stage):
    """bf16 ZeRO-2 and ZeRO-3 without offload: DeepSpeed's own estimators, called, to the byte."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = ModelShape.from_config(KNOWN_CONFIGS[name])
    ours = model_states(shape.parameters, shape.largest_layer, zero_stage=zero_stage, world_size=world_size,
                        mixed=True, dtype_bytes=2)
    if zero_stage == 2:
        _, gpu = estimate_zero2_model_states_mem_needs(shape.parameters, num_gpus_per_node=world_size,
                                                       cpu_offload=False)
    else:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(shape.parameters, shape.largest_layer,
                                                          num_gpus_per_node=world_size, cpu_offload=False)
    assert ours.total == gpu


def test_qwen3_8b_on_b200s_by_hand():
    """sweeps/paper_fig1.yaml's Qwen3-8B trial on 8 B200s, every figure computed here by hand."""
    shape = ModelShape.from_config(QWEN3_8B)
    # Parameters: embeddings 151,936 x 4,096 = 622,329,856, twice (the LM head is not tied); per layer q and o
    # 4,096 x 4,096 = 16,777,216 each, k and v 4,096 x 1,024 = 4,194,304 each, q/k norms 2 x 128, the MLP
    # 3 x 4,096 x 12,288 = 150,994,944, two norms 8,192: 192,946,432, x 36 = 6,946,071,552; the final norm 4,096.
    assert shape.parameters == 2 * 622_329_856 + 6_946_071_552 + 4_096 == 8_190_735_360
    mem = estimate_trial_memory(shape, paper_trial("Qwen/Qwen3-8B"), gpu_bytes=B200)
    # ZeRO-2 over 8 ranks: bf16 weights 2 x P, then 18 x P / 8 of gradients (2 + 4) and optimizer (4 + 8).
    assert mem.states.weights == 16_381_470_720
    assert mem.states.gradients == 6 * 8_190_735_360 // 8 == 6_143_051_520
    assert mem.states.optimizer == 12 * 8_190_735_360 // 8 == 12_286_103_040
    assert mem.teacher == 2 * 8_190_735_360  # the bf16 copy: 15.3 GiB (its fp32 master is on the host)
    # vLLM: 0.45 of the B200; bf16 weights 2 x P; the sampler over 1,024 rows x 151,936 logits x 24 bytes
    # (3,733,979,136) outweighs the forward of 16,384 tokens (16,384 x 59,392 x 2 = 1,946,157,056); one sequence
    # of 10,240 + 32,768 = 43,008 tokens, capped at Qwen3-8B's 40,960 positions, at 36 layers x 2 x 8 heads x
    # 128 x 2 bytes = 147,456 bytes a token.
    assert mem.vllm.share == pytest.approx(0.45 * B200, abs=1)
    assert (mem.vllm.weights, mem.vllm.working) == (16_381_470_720, 3_733_979_136)
    assert (mem.vllm.max_model_len, mem.vllm.kv_per_sequence) == (40_960, 40_960 * 147_456)
    # Activations at 2,048 + 32,768 = 34,816 tokens, checkpointed: each layer's input, 36 x 34,816 x 4,096 x 2
    # bytes = 10,267,656,192, plus one layer recomputed, twice: per token 2 x (6 x 4,096 + 4 x 12,288 +
    # 4 x 5,120) + 4 x (2 x 4,096 + 5,120) = 241,664 bytes, x 34,816 x 2 = 16,827,547,648.
    assert mem.activations.student_forward_backward == 10_267_656_192 + 16_827_547_648
    # The fused loss: teacher hidden states and the student's hidden gradient (32,768 x 4,096 x 2 bytes each),
    # the head's float32 gradient 151,936 x 4,096 x 4, and 8 float32 [256, 151,936] chunk tensors.
    assert mem.activations.loss == 2 * 268_435_456 + 2_489_319_424 + 1_244_659_712
    # The teacher's forward without gradient at 10,240 + 32,768 = 43,008 tokens: one layer and the residual
    # stream per token (241,664 + 8,192 bytes), and the response's hidden states kept.
    assert mem.activations.no_grad_forward == 43_008 * 249_856 + 268_435_456
    assert mem.ema_update == 0  # a bf16 teacher is updated on its fp32 master, on the host
    # The phases on rank 0 (vLLM awake throughout: sleep_between_phases is off) and on ranks 1-7: with an
    # engine on every rank (the default) each holds what rank 0 holds, with rank 0's engine alone only the trainer.
    trainer = 16_381_470_720 + 6_143_051_520 + 12_286_103_040 + 16_381_470_720 + GiB
    student = 27_095_203_840 + 4_270_850_048
    trainer_phases = {"rollout": trainer, "teacher_forward": trainer + 11_014_242_304,
                      "student_forward_backward": trainer + student, "push_and_ema": trainer}
    engine = 0.45 * B200 + GiB
    assert mem.rank0 == pytest.approx({phase: b + engine for phase, b in trainer_phases.items()}, abs=1)
    assert mem.other_ranks == mem.rank0
    one_engine = estimate_trial_memory(shape, paper_trial("Qwen/Qwen3-8B", engines="main"), gpu_bytes=B200)
    assert (one_engine.rank0, one_engine.other_ranks) == (mem.rank0, trainer_phases)
    assert mem.rank0["student_forward_backward"] == pytest.approx(trainer + student + 0.45 * B200 + GiB, abs=1)
    assert mem.peak() == ("student_forward_backward", mem.rank0["student_forward_backward"])
    assert mem.rank0["student_forward_backward"] / GiB == pytest.approx(159.15, abs=0.01)
    assert fit_problem(mem, "B200") is None
    # With vLLM at 0.65 the same trial does not fit: 0.20 x 178.35 = 35.67 GiB more.
    over = estimate_trial_memory(shape, paper_trial("Qwen/Qwen3-8B", gpu_memory_utilization=0.65), gpu_bytes=B200)
    assert over.rank0["student_forward_backward"] / GiB == pytest.approx(159.15 + 35.67, abs=0.01)
    assert fit_problem(over, "B200").startswith("rank 0 needs 194.8 GiB in the student forward+backward phase")


def test_qwen3_0_6b_on_one_h100_by_hand():
    """The other branches: one H100, ZeRO-3 with the unfused loss, no checkpointing, two padded rows per
    micro-batch, the teacher offloaded, vLLM asleep while training; tied embeddings."""
    shape = ModelShape.from_config(QWEN3_06B)
    # Embeddings 151,936 x 1,024 = 155,582,464 (the head is tied: once); per layer q and o 1,024 x 2,048 =
    # 2,097,152 each, k and v 1,024 x 1,024 = 1,048,576 each, q/k norms 256, the MLP 3 x 1,024 x 3,072 =
    # 9,437,184, norms 2,048: 15,730,944, x 28 = 440,466,432; the final norm 1,024.
    assert shape.parameters == 155_582_464 + 440_466_432 + 1_024 == 596_049_920
    cfg = trial(model={"path": "Qwen/Qwen3-0.6B", "dtype": "bfloat16"}, context={"max_teacher_prompt_tokens": 1536},
                rollout={"max_response_tokens": 2048, "max_prompt_tokens": 1024, "gpu_memory_utilization": 0.3,
                         "sleep_between_phases": True},
                optim={"micro_batch_size": 2}, teacher={"offload": True},
                deepspeed={"zero_stage": 3, "bf16": True, "world_size": 1})
    assert cfg.loss.chunk_size is None  # ZeRO-3 gets the unfused loss
    mem = estimate_trial_memory(shape, cfg, gpu_bytes=H100)
    # ZeRO-3 on one rank: 4 x the largest layer (the embeddings) + 18 x P.
    assert mem.states.total == 4 * 155_582_464 + 18 * 596_049_920 == 11_351_228_416
    assert (mem.teacher, mem.teacher_loaded) == (0, 2 * 596_049_920)  # on the host; bf16 weights per forward
    # Per token and layer: 2 x (6 x 1,024 + 4 x 3,072 + 4 x 3,072) + 4 x (2 x 1,024 + 3,072) = 81,920 bytes.
    # No checkpointing at 1,024 + 2,048 = 3,072 tokens x 2 rows: 28 layers kept + one more in the backward,
    # and the padded rows' boolean mask 2 x 3,072 x 3,072.
    assert mem.activations.student_forward_backward == 29 * 2 * 3_072 * 81_920 + 2 * 3_072 ** 2
    # Unfused: the teacher's hidden states 2 x 2,048 x 1,024 x 2, both sides' bf16 logits 2 x (2 x 2,048 x
    # 151,936 x 2) and 8 float32 [2 x 2,048, 151,936] tensors.
    assert mem.activations.loss == 8_388_608 + 2_489_319_424 + 8 * 2 * 2_048 * 151_936 * 4
    # Forward without gradient at 1,536 + 2,048 = 3,584 tokens: (81,920 + 2,048) bytes per token and row, the
    # mask 2 x 3,584^2, the kept hidden states.
    assert mem.activations.no_grad_forward == 2 * 3_584 * 83_968 + 2 * 3_584 ** 2 + 8_388_608
    # vLLM on a 79 GiB GPU: 16,384 batched tokens and 1,024 sequences; the sampler (3,733,979,136) again; the KV
    # cache of 3,584 tokens at 28 x 2 x 8 x 128 x 2 = 114,688 bytes a token.
    assert (mem.vllm.working, mem.vllm.kv_per_sequence) == (3_733_979_136, 3_584 * 114_688)
    # EMA: offloaded, so nothing on the GPU but ZeRO-3's gathered bucket (the embeddings, 2 bytes each).
    assert mem.ema_update == 2 * 155_582_464
    resident = 11_351_228_416 + GiB
    asleep = GiB + 3_733_979_136
    assert mem.rank0["teacher_forward"] == resident + 1_192_099_840 + 635_961_344 + asleep
    assert mem.rank0["student_forward_backward"] == resident + 14_615_052_288 + 22_412_263_424 + asleep
    assert mem.rank0["push_and_ema"] == pytest.approx(resident + 311_164_928 + 0.3 * H100 + GiB, abs=1)
    assert mem.other_ranks == {}  # one rank
    assert fit_problem(mem, "H100") is None


def test_olmo3_sliding_window_layers_hold_at_most_the_window_and_a_batch():
    shape = read_model_shape("allenai/Olmo-3-7B-Instruct")
    # 8 full-attention layers keep all 26,624 tokens; 24 sliding ones 4,095 + 16,384 = 20,479 (vLLM's admission
    # bound); 2 x 32 heads x 128 x 2 bytes = 16,384 bytes per token and layer.
    assert shape.kv_bytes(26_624, dtype_bytes=2, max_num_batched_tokens=16_384) == 16_384 * (8 * 26_624 + 24 * 20_479)
    # Shorter than the bound: every layer holds the whole sequence.
    assert shape.kv_bytes(4_000, dtype_bytes=2, max_num_batched_tokens=16_384) == 16_384 * 32 * 4_000


def test_too_small_a_vllm_share_is_refused_naming_the_setting():
    mem = estimate_trial_memory(read_model_shape("Qwen/Qwen3-8B"),
                                paper_trial("Qwen/Qwen3-8B", gpu_memory_utilization=0.2), gpu_bytes=H100)
    problem = fit_problem(mem, "H100")
    assert problem.startswith("rollout.gpu_memory_utilization 0.20 of H100 gives vLLM 15.8 GiB")
    # One sequence of 40,960 tokens (Qwen3-8B's limit) x 147,456 bytes = 5.6 GiB.
    assert "less than one 40,960-token sequence needs (5.6 GiB)" in problem


def test_model_config_from_a_folder_the_hub_cache_or_the_table(tmp_path, monkeypatch):
    import huggingface_hub.constants

    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**QWEN3_06B, "num_hidden_layers": 2}))
    assert read_model_shape(str(folder)).num_layers == 2
    local = trial_memory(trial(model={"path": str(folder), "dtype": "bfloat16"}), gpu_bytes=H100)
    assert local.shape.num_layers == 2 and local.gpu_bytes == H100
    # A hub id's config.json in the Hugging Face cache wins over the table.
    cache = tmp_path / "hub"
    snapshot = cache / "models--Qwen--Qwen3-8B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({**QWEN3_8B, "num_hidden_layers": 3}))
    (cache / "models--Qwen--Qwen3-8B" / "refs").mkdir()
    (cache / "models--Qwen--Qwen3-8B" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert read_model_shape("Qwen/Qwen3-8B").num_layers == 3
    assert read_model_shape("Qwen/Qwen3-4B").num_layers == 36  # the table
    with pytest.raises(ModelConfigError, match=r"^org/unknown: no config.json .* `hf download org/unknown "
                                               r"config.json`"):
        read_model_shape("org/unknown")
    (folder / "config.json").unlink()
    with pytest.raises(ModelConfigError, match="no config.json in the folder"):
        read_model_shape(str(folder))
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps({**QWEN3_8B, "model_type": "qwen3_moe", "num_experts": 128}))
    with pytest.raises(ModelConfigError, match="mixture-of-experts"):
        read_model_shape(str(moe))


def test_gpu_presets_and_custom_gpus():
    assert RESOURCE_PRESETS["h100-8"].memory_per_gpu_bytes == int(79.1 * GiB)
    assert RESOURCE_PRESETS["b200-1"].memory_per_gpu_bytes == int(178.35 * GiB)
    assert RESOURCE_PRESETS["cpu"].memory_per_gpu_bytes is None


def _paper_variant(tmp_path: Path, old: str, new: str) -> Path:
    text = (SWEEPS / "paper_fig1.yaml").read_text()
    assert old in text
    path = tmp_path / "fig1.yaml"
    path.write_text(text.replace(old, new))
    return path


def test_unknown_gpu_is_refused_and_a_custom_one_is_checked(tmp_path):
    custom = "resources: {gpus: 8, cpus: 128, sandbox_workers: 96, gpu: A100}"
    with pytest.raises(SweepError, match=r"resources.gpu: unknown GPU 'A100' \(known: B200, H100\)"):
        load_sweep(_paper_variant(tmp_path, "resources: b200-8", custom + "\n#"))
    with_memory = custom[:-1] + ", gpu_memory_gib: 79.2}\n#"
    sweep, points = load_sweep(_paper_variant(tmp_path, "resources: b200-8", with_memory))
    memories = memory_estimates(sweep, points)
    assert [m.label for m in memories] == ["qwen3-8b", "olmo-3-7b-instruct"]
    assert memories[0].problem.startswith("rank 0 needs") and "more than one A100's 79.2 GiB" in memories[0].problem
    sweep, points = load_sweep(_paper_variant(tmp_path, "resources: b200-8", "resources: {gpus: 8}\n#"))
    assert memory_estimates(sweep, points) == []  # no GPU named: nothing to check against


def test_paper_sweeps_fit_b200s_and_h100s_or_float32_are_refused_in_one_line(tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    plan = subprocess.run([*OPSD, "sweep", "plan", str(SWEEPS / "paper_fig1.yaml")], capture_output=True, text=True,
                          timeout=120, env=env)
    assert plan.returncode == 0, plan.stderr
    assert "GPU memory of qwen3-8b (Qwen/Qwen3-8B: 8.19B parameters) per B200 of 178.3 GiB" in plan.stdout
    assert "qwen3-8b fits: rank 0 peaks at 159.1 of 178.3 GiB (student forward+backward)" in plan.stdout
    assert "olmo-3-7b-instruct fits: rank 0 peaks at 153.4 of 178.3 GiB" in plan.stdout
    fig3 = subprocess.run([*OPSD, "sweep", "plan", str(SWEEPS / "paper_fig3.yaml")], capture_output=True,
                          text=True, timeout=120, env=env)
    assert fig3.returncode == 0 and fig3.stdout.count(" fits: rank 0 peaks at ") == 4, fig3.stderr

    h100 = _paper_variant(tmp_path, "resources: b200-8", "resources: h100-8\n#")
    for command in ("plan", "run"):  # run refuses before it starts Ray
        result = subprocess.run([*OPSD, "sweep", command, str(h100)], capture_output=True, text=True, timeout=120,
                                env=env)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        # The trainer's 83,631,891,712 bytes of test_qwen3_8b_on_b200s_by_hand (77.89 GiB), vLLM's 0.45 of
        # 79.1 GiB (35.60) and its process (1.00): 114.5 GiB.
        assert result.stderr.startswith(f"opsd sweep: error: {h100}: models[0] (Qwen/Qwen3-8B) does not fit "
                                        "8 x H100: rank 0 needs 114.5 GiB in the student forward+backward phase, "
                                        "more than one H100's 79.1 GiB: vLLM 36.6 (rollout.gpu_memory_utilization")
    float32 = _paper_variant(tmp_path, "    dtype: bfloat16  ", "    dtype: float32  ")
    result = subprocess.run([*OPSD, "sweep", "plan", str(float32)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"opsd sweep: error: {float32}:9: models[0]: model.dtype float32 on device "
                                    "'cuda': vLLM's FlashAttention and FlashInfer backends take only float16/bfloat16")
