"""Inference engine throughput: generated tokens/s at several concurrencies vs plain sequential HF `generate`.

Engine-level (no Celery, no API): the same process builds or loads one model, times plain greedy
`model.generate` on a few prompts one after the other (the baseline), transformers' own continuous
batching (`generate_batch`) on all prompts at once (the library option), then the `InferenceEngine` with
`concurrency` requests submitted at once (they run as one continuous batch), each generating exactly
`--new-tokens` tokens (`ignore_eos=True`; the baseline uses `min_new_tokens`); each level runs `--rounds`
waves and reports the median one. Prompts are random token ids, so no tokenizer has to cover the vocabulary.
On CUDA it also prints the memory-bandwidth bound of a decode
step, `concurrency x HBM bandwidth / weight bytes` tokens/s (every step reads all weights once; KV-cache reads
and prefill are ignored, so the bound is optimistic), and the fraction of it reached.

    python benchmarks/inference_engine.py                              # tiny random Llama, CPU, ~15 s
    python benchmarks/inference_engine.py --adapters 3                 # + an arm mixing 3 LoRA adapters
    python benchmarks/inference_engine.py --shape tinyllama            # random TinyLlama-1.1B shape, bf16, CUDA
    python benchmarks/inference_engine.py --model PATH --hbm-gbps 4800 # an existing model (4800: H200)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.inference import GenerationRequest, InferenceEngine  # noqa: E402
from workers.training.tiny_model import build_tiny_model, build_tokenizer  # noqa: E402

TINYLLAMA: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
}
FIRST_ID = 5  # prompts use ids from here on: the tiny tokenizer's special tokens (pad, unk, BOS, EOS, ...) are 0-4


def build_tinyllama(out: Path, device: torch.device, dtype: torch.dtype) -> Path:
    """A random-init LlamaForCausalLM of TinyLlama-1.1B's shape, saved as safetensors with the tiny tokenizer."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(512)  # decodes ids >= 512 to nothing: fine, prompts are ids, not text
    ids: dict[str, Any] = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = LlamaConfig(**TINYLLAMA, **ids, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = LlamaForCausalLM(config)  # initialised in float32 (HF's init), then cast
    model = model.to(dtype)
    model.generation_config = GenerationConfig(**ids, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    del model
    return out


def build_adapters(model_path: Path, out: Path, count: int, dtype: torch.dtype) -> dict[str, Path]:
    """`count` random LoRA adapters (r=16 on the attention projections; random lora_B, so not no-ops)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(base, config)
    paths = {}
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
        paths[f"lora{index}"] = out / f"lora{index}"
        model.save_pretrained(str(paths[f"lora{index}"]))
    return paths


def random_prompts(count: int, length: int, vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(FIRST_ID, vocab_size, (count, length), generator=generator).tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_hf_baseline(
    model_path: Path, prompts: list[list[int]], new_tokens: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """Plain greedy `model.generate`, one prompt after the other."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_path, use_safetensors=True, dtype=dtype)
    model = model.to(device).eval()
    pad = model.generation_config.pad_token_id

    def generate(prompt: list[int], tokens: int) -> list[int]:
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            output = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        return [int(t) for t in output[0, len(prompt) :].tolist()]

    generate(prompts[0], 4)  # warm-up (allocator, kernels)
    outputs, seconds = [], []
    for prompt in prompts:
        sync(device)
        start = time.perf_counter()
        outputs.append(generate(prompt, new_tokens))
        sync(device)
        seconds.append(time.perf_counter() - start)
    tokens = sum(len(o) for o in outputs)
    total = sum(seconds)
    return {
        "arm": "HF generate, sequential",
        "concurrency": 1,
        "requests": len(prompts),
        "tokens": tokens,
        "seconds": total,
        "tokens_per_s": tokens / total,
        "ms_per_step": 1000 * statistics.median(seconds) / new_tokens,
        "outputs": outputs,
    }


def run_hf_continuous_batching(
    model_path: Path,
    prompts: list[list[int]],
    new_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    attn: str,
) -> dict[str, Any]:
    """transformers' own continuous batching (`generate_batch`), all prompts at once: the library option
    the engine has to beat (it packs sequences into one row, so it cannot mix LoRA adapters per row)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model: Any = AutoModelForCausalLM.from_pretrained(
        model_path, use_safetensors=True, dtype=dtype, attn_implementation=attn
    )
    model = model.to(device).eval()
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=-1,  # never stops early
        pad_token_id=model.generation_config.pad_token_id,
    )
    model.generate_batch(
        inputs=prompts[:2],
        generation_config=GenerationConfig(
            max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=config.pad_token_id
        ),
    )  # warm-up
    sync(device)
    start = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=config)
    sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return {
        "arm": f"HF generate_batch ({attn})",
        "concurrency": len(prompts),
        "requests": len(prompts),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ms_per_step": 1000 * seconds / new_tokens,
        "outputs": [[]],
    }


def run_engine(
    engine: InferenceEngine,
    prompts: list[list[int]],
    concurrency: int,
    new_tokens: int,
    adapters: dict[str, Path],
    rounds: int,
) -> dict[str, Any]:
    """`rounds` waves of `concurrency` requests submitted at once; every request generates `new_tokens`."""
    names = sorted(adapters)
    requests = [
        GenerationRequest(
            prompt_ids=prompts[i % len(prompts)],
            max_tokens=new_tokens,
            temperature=0.0,
            ignore_eos=True,
            adapter=names[i % len(names)] if names else None,
            adapter_path=adapters[names[i % len(names)]] if names else None,
        )
        for i in range(concurrency)
    ]
    round_seconds: list[float] = []
    outputs: list[list[int]] = []
    for _ in range(rounds):
        before = engine.stats()
        start = time.perf_counter()
        handles = [engine.submit(r) for r in requests]
        results = [h.result(timeout=3600) for h in handles]
        round_seconds.append(time.perf_counter() - start)
        after = engine.stats()
        outputs = [list(r.token_ids) for r in results]
        tokens = after["generated_tokens"] - before["generated_tokens"]
        assert tokens == concurrency * new_tokens, (tokens, concurrency, new_tokens)
        steps = after["decode_steps"] - before["decode_steps"] + 1  # + the wave's prefill step
    seconds = statistics.median(round_seconds)  # the median round: robust to a noisy neighbour
    tokens = concurrency * new_tokens
    return {
        "arm": f"engine, {len(names)} adapters mixed" if names else "engine",
        "concurrency": concurrency,
        "requests": concurrency,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "best_tokens_per_s": tokens / min(round_seconds),
        "ms_per_step": 1000 * seconds / steps,
        "round_seconds": round_seconds,
        "outputs": outputs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="an existing HF causal LM directory (safetensors)")
    source.add_argument("--shape", choices=["tiny", "tinyllama"], default="tiny")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--baseline-prompts", type=int, default=4, help="prompts HF generate runs, sequentially")
    parser.add_argument("--rounds", type=int, default=3, help="waves per concurrency level (the median is shown)")
    parser.add_argument("--adapters", type=int, default=0, help="also run an arm mixing N random LoRA adapters")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on CUDA")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 steadies CPU timings on a busy machine)")
    parser.add_argument("--hbm-gbps", type=float, default=3350.0, help="GPU memory bandwidth (H100 SXM: 3350)")
    parser.add_argument(
        "--hf-batch-attn",
        default="sdpa",
        help="attention of the transformers generate_batch arm (sdpa, paged|sdpa, ...); '' skips it",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "inference_engine.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.model is not None:
            model_path, shape = args.model, "model"
        elif args.shape == "tinyllama":
            model_path, shape = build_tinyllama(root / "tinyllama", device, dtype), "tinyllama"
        else:
            model_path, shape = build_tiny_model(root / "tiny", seed=0), "tiny"
        adapters = build_adapters(model_path, root / "adapters", args.adapters, dtype) if args.adapters else {}

        from transformers import AutoConfig

        vocab_size = AutoConfig.from_pretrained(model_path).get_text_config(decoder=True).vocab_size
        prompts = random_prompts(max(args.concurrency), args.prompt_tokens, vocab_size)
        baseline = run_hf_baseline(model_path, prompts[: args.baseline_prompts], args.new_tokens, device, dtype)
        library = []
        if args.hf_batch_attn:
            library = [
                run_hf_continuous_batching(
                    model_path, prompts[: max(args.concurrency)], args.new_tokens, device, dtype, args.hf_batch_attn
                )
            ]
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

        results = []
        arms = [{}, adapters] if adapters else [{}]
        with InferenceEngine(model_path, max_batch_size=max(args.concurrency), device=device, dtype=dtype) as engine:
            info = engine.info()
            eos = engine.tokenizer.eos_token_id
            for arm_adapters in arms:
                run_engine(engine, prompts, max(args.concurrency), 4, arm_adapters, 1)  # warm-up, loads adapters
                for concurrency in args.concurrency:
                    results.append(run_engine(engine, prompts, concurrency, args.new_tokens, arm_adapters, args.rounds))
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    # HF's min_new_tokens forbids EOS while ignore_eos lets the engine pick it: compare up to the first EOS.
    single = next((r for r in results if r["concurrency"] == 1 and r["arm"] == "engine"), None)
    matches = None
    if single is not None:
        ours = single["outputs"][0]
        end = next((i for i, t in enumerate(ours) if t == eos), len(ours))
        matches = ours[:end] == baseline["outputs"][0][:end]
    rows = [baseline, *library, *results]
    for row in rows:
        row["vs_hf"] = row["tokens_per_s"] / baseline["tokens_per_s"]
        if device.type == "cuda":
            row["bound_tokens_per_s"] = row["concurrency"] * args.hbm_gbps * 1e9 / info["parameter_bytes"]
            row["fraction_of_bound"] = row["tokens_per_s"] / row["bound_tokens_per_s"]
        del row["outputs"]

    print(
        f"model: {shape} ({info['parameters'] / 1e6:.1f}M parameters, {info['parameter_bytes'] / 2**20:.0f} MiB), "
        f"{info['dtype']} on {info['device']}; prompt {args.prompt_tokens} + {args.new_tokens} new tokens"
    )
    header = f"{'arm':<30} {'conc':>5} {'tokens':>7} {'seconds':>8} {'tok/s':>10} {'ms/step':>8} {'vs HF':>7}"
    if device.type == "cuda":
        header += f" {'bound tok/s':>12} {'of bound':>9}"
    print(header)
    for row in rows:
        line = (
            f"{row['arm']:<30} {row['concurrency']:>5} {row['tokens']:>7} {row['seconds']:>8.2f} "
            f"{row['tokens_per_s']:>10.1f} {row['ms_per_step']:>8.2f} {row['vs_hf']:>6.2f}x"
        )
        if device.type == "cuda":
            line += f" {row['bound_tokens_per_s']:>12.0f} {100 * row['fraction_of_bound']:>8.1f}%"
        print(line)
    print(f"engine greedy output (concurrency 1, prompt 0) equals HF generate's: {matches}")
    if peak is not None:
        print(f"peak GPU memory of the engine runs: {peak / 2**30:.2f} GiB")

    report = {
        "shape": shape,
        "model": str(args.model) if args.model else None,
        "info": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "peak_gpu_bytes": peak,
        "greedy_matches_hf": matches,
        "results": rows,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
