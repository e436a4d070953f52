"""A tiny, deterministic Llama model and BPE tokenizer for tests and smoke runs.

Everything is built locally (no Hub access): the tokenizer is trained with the `tokenizers` library on a
small English corpus generated in code, and the model weights come from a seeded random init. Building
twice with the same arguments gives byte-identical files.
"""

from __future__ import annotations

import itertools
from pathlib import Path

BOS_TOKEN = "<s>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
IM_START_TOKEN = "<|im_start|>"
SPECIAL_TOKENS = [PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN]

# ChatML. The `{% generation %}` markers let TRL build assistant-only loss masks; they render to nothing
# otherwise. The end-of-turn token sits inside the markers so the model is trained to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- generation -%}"
    "{{ message['content'] + '<|im_end|>' }}"
    "{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)

# ChatML with tools in the Hermes / Qwen2.5 way: the function definitions go into a system turn, the model
# calls with `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, results come back as `tool` turns.
TOOL_CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{ '<|im_start|>system\nYou may call these functions. Write each call as <tool_call>"
    '{"name": <name>, "arguments": <object>}</tool_call>.\n\' }}'
    "{%- for tool in tools -%}{{ tool | tojson }}{{ '\n' }}{%- endfor -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- for call in message['tool_calls'] -%}"
    "{{ '<tool_call>' }}{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{{ '</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- endif -%}"
)

_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our team", "the model", "a robot", "the user"]
_VERBS = ["likes", "reads", "writes", "finds", "answers", "builds", "learns", "tells"]
_OBJECTS = [
    "a short story",
    "the answer",
    "a simple question",
    "the new plan",
    "some code",
    "a long letter",
    "the right word",
    "a good example",
]
_TAILS = ["today.", "every morning.", "with care.", "in the garden.", "before lunch.", "very quickly."]
_QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Can you write a haiku?",
    "Why is the sky blue?",
    "What time is it?",
    "Please summarize this text.",
    "Translate hello to Spanish.",
    "Hello, who are you?",
]
_ANSWERS = [
    "The capital of France is Paris.",
    "A spider has eight legs.",
    "Quiet pond, a frog jumps in, the water sounds.",
    "Sunlight scatters off the air.",
    "I do not have a clock.",
    "The text is about a cat and a dog.",
    "Hello is hola in Spanish.",
    "I am a helpful assistant.",
]


def tiny_corpus() -> list[str]:
    """A few hundred deterministic English lines covering the words used by the test datasets."""
    lines = [
        f"{s.capitalize()} {v} {o} {t}"
        for s, v, o, t in itertools.islice(itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _TAILS), 0, None, 7)
    ]
    lines += [f"user: {q} assistant: {a}" for q, a in zip(_QUESTIONS, _ANSWERS, strict=True)]
    lines += [f"system: You are a helpful assistant. {q} {a}" for q, a in zip(_QUESTIONS, _ANSWERS, strict=True)]
    lines += [" ".join(str(n) for n in range(i, i + 10)) for i in range(0, 100, 10)]
    return lines


def build_tokenizer(vocab_size: int = 512, chat_template: str = CHAT_TEMPLATE):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE so any UTF-8 text is encodable without <unk>.
    core = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START_TOKEN],
        chat_template=chat_template,
        model_max_length=2048,
        padding_side="right",
    )


def build_tiny_model(
    output_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    chat_template: str = CHAT_TEMPLATE,
) -> Path:
    """Build a random tiny `LlamaForCausalLM` plus its tokenizer in `output_dir` and return the path
    (`TOOL_CHAT_TEMPLATE` for one whose chat template renders tools)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size, chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # fork_rng keeps the caller's global RNG state untouched, so building a model inside a test does not
    # shift the randomness of whatever runs next.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build a tiny random Llama with a locally trained tokenizer.")
    parser.add_argument("output_dir", nargs="?", default="tiny-llama")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    args = parser.parse_args()
    print(build_tiny_model(args.output_dir, seed=args.seed))
