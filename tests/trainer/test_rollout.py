"""The vLLM rollout engine against a transformers forward pass of the same weights (float32, CPU).

One engine on the tiny model serves the module (start-up takes 20-50 s on 2 shared cores); `trainer_model` is
a transformers copy of the same weights, and tests that change weights change both (push) so later tests see
them in sync.
"""

from __future__ import annotations

import psutil
import pytest
import torch

from trainer.rollout import Rollout, RolloutEngine, RolloutError

TOL = 1e-4


def reference_logps(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) of each completion token after its prefix, by a plain transformers forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].double()
    logps = torch.log_softmax(logits[len(prompt) - 1:-1] / temperature, dim=-1)
    return logps.gather(-1, torch.tensor(completion)[:, None])[:, 0]


def _live_children() -> dict[int, str]:
    """pid -> command line of this process's descendants that are not zombies."""
    live = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                live[p.pid] = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            pass
    return live


@pytest.fixture(scope="module")
def _engines(tiny_model_dir):
    """One engine for the module (start-up is the slow part); the last test closes it and checks processes."""
    box = {"children_before": _live_children()}
    yield box
    if "engine" in box:
        box["engine"].close()


@pytest.fixture
def engine(_engines, tiny_model_dir):
    if "engine" not in _engines or _engines["engine"].closed:
        _engines["engine"] = RolloutEngine(tiny_model_dir, dtype="float32", seed=0, max_model_len=512, kv_cache_gib=1)
    return _engines["engine"]


@pytest.fixture(scope="module")
def trainer_model(tiny_model_dir):
    from trainer.models import load_causal_lm

    return load_causal_lm(tiny_model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    from trainer.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    texts = ["Write a function that adds two numbers.", "Reverse a string in Python."]
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False) for t in texts]


def test_push_weights_makes_engine_match_trainer(engine, trainer_model, prompts):
    prompt = prompts[0]
    completion = [int(t) for t in torch.randint(0, trainer_model.config.vocab_size, (24,),
                                                generator=torch.Generator().manual_seed(3))]
    before = torch.tensor(engine.logprobs_of(prompt, completion), dtype=torch.float64)
    assert torch.allclose(before, reference_logps(trainer_model, prompt, completion), atol=TOL, rtol=0)
    original = {n: p.detach().clone() for n, p in trainer_model.named_parameters()}

    noise = torch.Generator().manual_seed(11)
    optimizer = torch.optim.AdamW(trainer_model.parameters(), lr=3e-2)
    for round_ in range(3):
        if round_ < 2:  # two rounds of noise on every tensor (norms, tied embeddings, fused q/k/v, gate/up)
            with torch.no_grad():
                for p in trainer_model.parameters():
                    p.add_(torch.randn(p.shape, generator=noise) * 0.05)
        else:  # one real optimizer step that raises the completion's likelihood
            trainer_model.train()
            logits = trainer_model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor(completion))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trainer_model.eval()
        metrics = engine.push_weights(trainer_model.named_parameters())
        assert metrics["push/tensors"] == len(list(trainer_model.parameters()))
        expected = reference_logps(trainer_model, prompt, completion)
        after = torch.tensor(engine.logprobs_of(prompt, completion), dtype=torch.float64)
        assert torch.allclose(after, expected, atol=TOL, rtol=0), (after - expected).abs().max()
        assert (after - before).abs().max() > 100 * TOL  # the push changed what the engine computes
        before = after

    # Pushing the original weights back restores the original log-probs; a state dict (with the tied
    # lm_head.weight listed beside embed_tokens) works as well as named_parameters().
    with torch.no_grad():
        for n, p in trainer_model.named_parameters():
            p.copy_(original[n])
    assert "lm_head.weight" in trainer_model.state_dict()
    engine.push_weights(trainer_model.state_dict().items())
    restored = torch.tensor(engine.logprobs_of(prompt, completion), dtype=torch.float64)
    assert torch.allclose(restored, reference_logps(trainer_model, prompt, completion), atol=TOL, rtol=0)


def test_push_of_one_layer_leaves_the_others(engine, trainer_model, prompts):
    prompt, completion = prompts[1], list(range(1000, 1016))
    layer = [(n, p) for n, p in trainer_model.named_parameters() if ".layers.1." in n]
    assert len(layer) == 9  # q, k, v, o, gate, up, down, two norms: the fused groups arrive together
    with torch.no_grad():
        for _, p in layer:
            p.add_(0.05)
    engine.push_weights(layer)
    got = torch.tensor(engine.logprobs_of(prompt, completion), dtype=torch.float64)
    assert torch.allclose(got, reference_logps(trainer_model, prompt, completion), atol=TOL, rtol=0)
    with torch.no_grad():
        for _, p in layer:
            p.sub_(0.05)
    engine.push_weights(layer)


def test_generate_shapes_logps_and_seeds(engine, trainer_model, prompts):
    max_tokens = 12
    out = engine.generate(prompts, n=3, temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=7)
    assert len(out) == len(prompts) and all(len(group) == 3 for group in out)
    eos = trainer_model.config.eos_token_id
    for prompt, group in zip(prompts, out):
        assert len({tuple(r.token_ids) for r in group}) == 3  # n independent samples, not copies
        for r in group:
            assert isinstance(r, Rollout) and len(r.token_ids) == len(r.logps) <= max_tokens
            if r.finish_reason == "length":
                assert len(r.token_ids) == max_tokens
            else:
                assert r.finish_reason == "stop" and r.token_ids[-1] == eos
            expected = reference_logps(trainer_model, prompt, r.token_ids)
            assert torch.allclose(torch.tensor(r.logps, dtype=torch.float64), expected, atol=TOL, rtol=0)
            assert r.text == engine.tokenizer.decode(r.token_ids, skip_special_tokens=True)
    # A random model almost never emits its end token in 12 steps: every rollout stops at max_tokens.
    assert any(r.finish_reason == "length" for group in out for r in group)

    again = engine.generate(prompts, n=3, temperature=1.0, max_tokens=max_tokens, seed=7)
    assert [[r.token_ids for r in g] for g in again] == [[r.token_ids for r in g] for g in out]
    other = engine.generate(prompts, n=3, temperature=1.0, max_tokens=max_tokens, seed=8)
    assert [[r.token_ids for r in g] for g in other] != [[r.token_ids for r in g] for g in out]
    assert engine.generate([], n=3, temperature=1.0, max_tokens=max_tokens) == []
    with pytest.raises(RolloutError):
        engine.generate(prompts, n=0, temperature=1.0, max_tokens=max_tokens)


def test_generate_logps_are_of_the_tempered_distribution(engine, trainer_model, prompts):
    # Processed log-probs: log softmax(logits / T), the distribution the tokens were drawn from.
    out = engine.generate(prompts[:1], n=2, temperature=0.7, max_tokens=8, seed=1)
    for r in out[0]:
        tempered = reference_logps(trainer_model, prompts[0], r.token_ids, temperature=0.7)
        untempered = reference_logps(trainer_model, prompts[0], r.token_ids)
        got = torch.tensor(r.logps, dtype=torch.float64)
        assert torch.allclose(got, tempered, atol=TOL, rtol=0)
        assert (got - untempered).abs().max() > 100 * TOL


def test_score_batch_equals_single(engine, prompts):
    pairs = [(prompts[0], [5, 6, 7, 8]), (prompts[1], [9, 10])]
    batch = engine.score(pairs)
    assert [len(x) for x in batch] == [4, 2]
    for (p, c), scores in zip(pairs, batch):
        assert scores == pytest.approx(engine.logprobs_of(p, c), abs=TOL)
    with pytest.raises(RolloutError):
        engine.score([(prompts[0], [])])


def test_close_ends_engine_processes(engine, _engines):
    # Runs last in this module and closes the shared engine (a later test would start a new one).
    engine_pids = set(engine.process_ids())
    assert set(engine.worker_pids()) <= engine_pids and len(engine_pids) >= 2  # engine core + worker(s)
    assert engine_pids <= set(_live_children())
    engine.sleep()  # no-ops on CPU, but callable in the same phases as on GPU
    engine.wake_up()
    assert engine.generate([[1, 2, 3]], n=1, temperature=1.0, max_tokens=4, seed=0)[0][0].token_ids
    engine.close()
    engine.close()
    # Only multiprocessing's resource tracker (one per interpreter, started with the first engine) may stay.
    new = {pid: cmd for pid, cmd in _live_children().items() if pid not in _engines["children_before"]}
    assert {pid: cmd for pid, cmd in new.items() if "resource_tracker" not in cmd} == {}
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in engine_pids)
    with pytest.raises(RolloutError):
        engine.generate([[1, 2, 3]], n=1, temperature=1.0, max_tokens=4)


@pytest.mark.slow
def test_smollm2_engine_matches_transformers():
    from trainer.config import ModelConfig
    from trainer.models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model(ModelConfig())
    tok = load_tokenizer(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that returns n squared."}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    model = load_causal_lm(path, dtype="float32", device="cpu")
    with RolloutEngine(path, dtype="float32", seed=0, max_model_len=1024) as eng:
        rollout = eng.generate([prompt], n=1, temperature=1.0, max_tokens=48, seed=0)[0][0]
        expected = reference_logps(model, prompt, rollout.token_ids)
        assert torch.allclose(torch.tensor(rollout.logps, dtype=torch.float64), expected, atol=TOL, rtol=0)
        scored = torch.tensor(eng.logprobs_of(prompt, rollout.token_ids), dtype=torch.float64)
        assert torch.allclose(scored, expected, atol=TOL, rtol=0)
        # One optimizer-sized change to every tensor, pushed: the engine follows.
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01)
        eng.push_weights(model.named_parameters())
        after = torch.tensor(eng.logprobs_of(prompt, rollout.token_ids), dtype=torch.float64)
        assert torch.allclose(after, reference_logps(model, prompt, rollout.token_ids), atol=TOL, rtol=0)
