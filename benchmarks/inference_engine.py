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
    python benchmarks/inference_engine.py --model PATH                 # an existing model
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
    forward_seconds: list[float] = []
    timer = ForwardTimer(engine)
    outputs: list[list[int]] = []
    for _ in range(rounds):
        before = engine.stats()
        timer.seconds = 0.0
        start = time.perf_counter()
        handles = [engine.submit(r) for r in requests]
        results = [h.result(timeout=3600) for h in handles]
        round_seconds.append(time.perf_counter() - start)
        forward_seconds.append(timer.seconds)
        after = engine.stats()
        outputs = [list(r.token_ids) for r in results]
        tokens = after["generated_tokens"] - before["generated_tokens"]
        assert tokens == concurrency * new_tokens, (tokens, concurrency, new_tokens)
        steps = after["decode_steps"] - before["decode_steps"] + 1  # + the wave's prefill step
    timer.remove()
    median = sorted(range(rounds), key=lambda i: round_seconds[i])[rounds // 2]
    seconds = round_seconds[median]  # the median round: robust to a noisy neighbour
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
        # Everything but the model's forwards (scheduling, tensors to and from the device, sampling on the
        # dynamic path, detokenizing, streaming), per engine step.
        "host_ms_per_step": 1000 * (seconds - forward_seconds[median]) / steps,
        "outputs": outputs,
    }


class ForwardTimer:
    """Adds up the seconds an engine spends in model forwards (prefill and decode), synchronising on CUDA."""

    def __init__(self, engine: InferenceEngine) -> None:
        self.seconds = 0.0
        self._patched: list[tuple[Any, str, Any]] = []
        decoder = engine._scheduler._runner
        runner = getattr(decoder, "_runner", decoder)
        self._wrap(runner, "logits", engine.device)
        if decoder is not runner:  # the static decoder: its own prefill forward and its step
            self._wrap(decoder, "_prefill_logits", engine.device)
            self._wrap(decoder, "_step", engine.device)

    def _wrap(self, owner: Any, name: str, device: torch.device) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(device)
            start = time.perf_counter()
            result = original(*args, **kwargs)
            sync(device)
            self.seconds += time.perf_counter() - start
            return result

        self._patched.append((owner, name, vars(owner).get(name)))
        setattr(owner, name, timed)

    def remove(self) -> None:
        for owner, name, own in self._patched:
            if own is None:
                delattr(owner, name)  # back to the class's method
            else:
                setattr(owner, name, own)  # an instance attribute (the static decoder's possibly compiled step)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def copy_bandwidth_gbps(device: torch.device, gib: float = 1.0, repeats: int = 20) -> float:
    """Device memory bandwidth measured by a copy kernel (read + write), GB/s."""
    source = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    sync(device)
    return 2 * source.numel() * repeats / (time.perf_counter() - start) / 1e9


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
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=["dynamic", "static", "compiled"],
        default=["dynamic", "static", "compiled"],
        help="engine decode paths to run (InferenceEngine(decode=...))",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on CUDA")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 steadies CPU timings on a busy machine)")
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

        model_config = AutoConfig.from_pretrained(model_path).get_text_config(decoder=True)
        vocab_size = model_config.vocab_size
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
        for path in args.paths:
            with InferenceEngine(
                model_path, max_batch_size=max(args.concurrency), device=device, dtype=dtype, decode=path
            ) as engine:
                info = engine.info()
                eos = engine.tokenizer.eos_token_id
                for arm_adapters in arms:
                    run_engine(engine, prompts, max(args.concurrency), 4, arm_adapters, 1)  # warm-up, loads adapters
                    for concurrency in args.concurrency:
                        row = run_engine(engine, prompts, concurrency, args.new_tokens, arm_adapters, args.rounds)
                        row["arm"] = f"{path}: {row['arm']}"
                        results.append(row)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    bandwidth, kv_bytes = 0.0, 0
    if device.type == "cuda":
        bandwidth = copy_bandwidth_gbps(device)
        kv_bytes = kv_bytes_per_token(model_config, dtype)
    # HF's min_new_tokens forbids EOS while ignore_eos lets the engine pick it: compare up to the first EOS.
    single = next((r for r in results if r["concurrency"] == 1 and r["arm"].endswith(": engine")), None)
    matches = None
    if single is not None:
        ours = single["outputs"][0]
        end = next((i for i, t in enumerate(ours) if t == eos), len(ours))
        matches = ours[:end] == baseline["outputs"][0][:end]
    rows = [baseline, *library, *results]
    dynamic = {(r["arm"].split(": ", 1)[1], r["concurrency"]): r for r in results if r["arm"].startswith("dynamic: ")}
    for row in rows:
        row["vs_hf"] = row["tokens_per_s"] / baseline["tokens_per_s"]
        same = dynamic.get((row["arm"].split(": ", 1)[-1], row["concurrency"]))
        if same is not None and ": " in row["arm"]:
            row["vs_dynamic"] = row["tokens_per_s"] / same["tokens_per_s"]
        if device.type == "cuda":
            # A decode step reads every weight once and each row's KV cache (average context C):
            # B x BW / (W + B x C x kv_bytes_per_token).
            context = args.prompt_tokens + args.new_tokens / 2
            step_bytes = info["parameter_bytes"] + row["concurrency"] * context * kv_bytes
            row["bound_tokens_per_s"] = row["concurrency"] * bandwidth * 1e9 / step_bytes
            row["fraction_of_bound"] = row["tokens_per_s"] / row["bound_tokens_per_s"]
        del row["outputs"]

    print(
        f"model: {shape} ({info['parameters'] / 1e6:.1f}M parameters, {info['parameter_bytes'] / 2**20:.0f} MiB), "
        f"{info['dtype']} on {info['device']}; prompt {args.prompt_tokens} + {args.new_tokens} new tokens"
    )
    header = (
        f"{'arm':<36} {'conc':>5} {'tokens':>7} {'seconds':>8} {'tok/s':>10} {'ms/step':>8} {'host ms':>8} "
        f"{'vs HF':>7} {'vs dyn':>7}"
    )
    if device.type == "cuda":
        header += f" {'bound tok/s':>12} {'of bound':>9}"
    print(header)
    for row in rows:
        host = f"{row['host_ms_per_step']:>8.2f}" if "host_ms_per_step" in row else f"{'':>8}"
        vs_dynamic = f"{row['vs_dynamic']:>6.2f}x" if "vs_dynamic" in row else f"{'':>7}"
        line = (
            f"{row['arm']:<36} {row['concurrency']:>5} {row['tokens']:>7} {row['seconds']:>8.2f} "
            f"{row['tokens_per_s']:>10.1f} {row['ms_per_step']:>8.2f} {host} {row['vs_hf']:>6.2f}x {vs_dynamic}"
        )
        if device.type == "cuda":
            line += f" {row['bound_tokens_per_s']:>12.0f} {100 * row['fraction_of_bound']:>8.1f}%"
        print(line)
    if device.type == "cuda":
        print(f"copy-kernel bandwidth {bandwidth:.0f} GB/s; KV {kv_bytes} bytes/token")
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
