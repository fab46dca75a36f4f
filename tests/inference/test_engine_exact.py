"""Bit-exact batching: the numeric pieces, and logits equal to unbatched `generate` for every architecture."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationConfig, MixtralConfig, Qwen2MoeConfig

from inference.demo_models import DEMO_SPECS, _token_ids, train_tokenizer
from inference.engine import Engine, SamplingParams
from inference.engine.cache import KVStore
from inference.engine.exact import StepLayout, grouped_mm_rows, linear_rows, linear_runs, unary_rows
from inference.engine.runner import Runner, load_model
from tests.inference.conftest import run
from tests.inference.test_engine_batching import assert_overlapped, run_staggered


def test_linear_rows_equal_one_row_products() -> None:
    torch.manual_seed(0)
    x, weight, bias = torch.randn(19, 96), torch.randn(160, 96), torch.randn(160)
    alone = torch.cat([F.linear(x[i : i + 1], weight, bias) for i in range(19)])
    assert torch.equal(linear_rows(x, weight, bias), alone)


def test_linear_runs_multiply_each_segment_alone() -> None:
    torch.manual_seed(1)
    x, weight = torch.randn(30, 64), torch.randn(128, 64)
    runs = StepLayout([1, 1, 1, 7, 3, 1, 16], [5, 9, 2, 7, 3, 4, 16]).token_runs
    assert runs == [(0, 3, True), (3, 7, False), (10, 3, False), (13, 1, True), (14, 16, False)]
    expected = torch.cat([
        *(F.linear(x[i : i + 1], weight) for i in range(3)),
        F.linear(x[3:10], weight), F.linear(x[10:13], weight), F.linear(x[13:14], weight), F.linear(x[14:], weight),
    ])
    assert torch.equal(linear_runs(x, weight, None, runs), expected)


def test_grouped_rows_equal_one_row_grouped_products() -> None:
    torch.manual_seed(2)
    x, weight = torch.randn(9, 32), torch.randn(4, 32, 48)
    offs = torch.tensor([2, 2, 7, 9], dtype=torch.int32)  # expert 1 gets nothing
    out = grouped_mm_rows(x, weight, offs)
    for row, expert in enumerate([0, 0, 2, 2, 2, 2, 2, 3, 3]):
        assert torch.equal(out[row], (x[row : row + 1] @ weight[expert])[0])


@pytest.mark.parametrize("op", [torch.sigmoid, F.silu])
def test_unary_rows_equal_one_row_tensors(op) -> None:
    torch.manual_seed(3)
    x = torch.randn(21, 24) * 3  # 24 is not a multiple of the vector loop, so tails matter
    alone = torch.cat([op(x[i : i + 1]) for i in range(21)])
    assert torch.equal(unary_rows(op, x), alone)


# ---- architectures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moe_arch_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Write tiny random Mixtral and Qwen2-MoE models (test-only, not demo models) with the demo tokenizer."""
    tokenizer = train_tokenizer()
    ids = _token_ids(tokenizer)
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=2048, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, hidden_size=64, **ids)
    configs = {
        # intermediate 96 and 40 are not multiples of 32: SiLU tails are exercised too.
        "mixtral": MixtralConfig(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2, **common),
        "qwen2-moe": Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=40, shared_expert_intermediate_size=64,
                                    num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, **common),
    }
    out = {}
    for name, config in configs.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config = GenerationConfig(
            bos_token_id=ids["bos_token_id"], eos_token_id=[ids["eos_token_id"], ids["pad_token_id"]],
            pad_token_id=ids["pad_token_id"])
        target = tmp_path_factory.mktemp(name)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        out[name] = target
    return out


@pytest.fixture(params=[*DEMO_SPECS, "mixtral", "qwen2-moe"])
def model_dir(request, demo_dir: Path, moe_arch_dirs: dict[str, Path]) -> Iterator[Path]:
    yield demo_dir / request.param if request.param in DEMO_SPECS else moe_arch_dirs[request.param]


def test_batched_steps_give_bit_identical_logits(model_dir: Path) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 1000) for _ in range(n)] for n in (1, 2, 3, 6, 9, 12, 17, 30)]
    new = 12
    reference = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    runner = Runner.prepare(load_model(model_dir, "cpu"), exact=True)
    with torch.inference_mode():
        expected = []
        for prompt in prompts:
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                                     pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            expected.append((out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits)))  # [new, V]
        # Request i joins at step i: every step mixes prompts being prefilled with rows decoding.
        stores: dict[int, KVStore] = {}
        tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        logits: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(prompts))}
        for step in range(new + len(prompts)):
            active = [i for i in range(len(prompts)) if i <= step and len(tokens[i]) < new]
            if not active:
                break
            batch = []
            for i in active:
                if i not in stores:
                    stores[i] = KVStore(len(prompts[i]) + 4, len(prompts[i]) + new)  # it grows too
                batch.append(prompts[i] if stores[i].length == 0 else [tokens[i][-1]])
            rows = runner.step([stores[i] for i in active], batch)
            for i, row in zip(active, rows):
                tokens[i].append(int(row.argmax()))
                logits[i].append(row)
    for i, (ids, expected_logits) in enumerate(expected):
        assert tokens[i] == ids
        assert torch.equal(torch.stack(logits[i]), expected_logits), f"prompt {i} drifted"


def test_a_request_alone_runs_unsplit_and_still_equals_generate(model_dir: Path, monkeypatch) -> None:
    import inference.engine.exact as exact

    split = []
    for name in ("linear_rows", "linear_runs", "unary_rows", "unary_runs"):
        real = getattr(exact, name)
        monkeypatch.setattr(exact, name, lambda *a, _real=real, _name=name: split.append(_name) or _real(*a))
    prompt, new = [5, 17, 42, 99, 7, 300, 11], 10
    reference = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    runner = Runner.prepare(load_model(model_dir, "cpu"), exact=True)
    with torch.inference_mode():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        store, rows = KVStore(len(prompt) + 2, len(prompt) + new), []  # small, so that it grows as well
        tokens = prompt
        for _ in range(new):
            rows.append(runner.step([store], [tokens])[0])
            tokens = [int(rows[-1].argmax())]
    assert torch.equal(torch.stack(rows), torch.cat(out.logits))
    assert split == []  # no product was split: the step was the plain forward
    with torch.inference_mode():  # two requests are split again
        runner.step([KVStore(4, 4), KVStore(4, 4)], [[5, 17], [42]])
    assert split


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe"])
def test_engine_serves_other_moe_architectures_exactly(moe_arch_dirs: dict[str, Path], name: str) -> None:
    from inference.engine.telemetry import snapshot

    with Engine(moe_arch_dirs[name], device="cpu", exact=True) as engine:
        prompts = [engine.encode_chat([{"role": "user", "content": "word " * n}]) for n in (1, 4, 9, 20)]
        params = [SamplingParams(max_tokens=20, temperature=0)] * len(prompts)
        results = run(run_staggered(engine, prompts, params))
        telemetry = snapshot(engine)
    reference = AutoModelForCausalLM.from_pretrained(moe_arch_dirs[name], local_files_only=True)
    for prompt, (_, state) in zip(prompts, results):
        with torch.inference_mode():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
        assert state.output_ids == out[0, len(prompt):].tolist()
    assert_overlapped([state for _, state in results])
    assert telemetry["moe"] and telemetry["num_experts"] == 8 and len(telemetry["layers"]) == 2


@pytest.mark.parametrize("shape", [(1, 64), (4, 96), (24, 16), (25, 16), (1536, 128)])
def test_linear_rows_hold_for_tiny_and_large_layers(shape: tuple[int, int]) -> None:
    torch.manual_seed(4)
    x, weight = torch.randn(7, shape[1]), torch.randn(*shape)
    alone = torch.cat([F.linear(x[i : i + 1], weight) for i in range(7)])
    assert torch.equal(linear_rows(x, weight, None), alone)
