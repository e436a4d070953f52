"""What can be known of a dataset's rows before training: their text, duplicates exact and near, short
answers, encoding and language anomalies, token lengths. Pure functions over rows (no database), used by
curation and by the dataset report, in the API or in a worker.

Near duplicates are found with MinHash LSH (datasketch) over word 3-grams of a row's text: a row is a near
duplicate when its estimated Jaccard similarity to an earlier row reaches the threshold.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datasketch import MinHash, MinHashLSH

from app.datasets.formats import preference_texts, to_training_record
from app.models.datasets import DatasetFormat

MINHASH_PERMUTATIONS = 128
SHINGLE_WORDS = 3
_WORD = re.compile(r"\w+", re.UNICODE)
# Bytes of UTF-8 read as Latin-1/CP1252 and encoded again: "Ã©" for "é", "â€™" for "’".
_MOJIBAKE = re.compile("Ã[\u0080-\u00bf]|â€[\u0080-\u00bf\u2018-\u203a]|Â[\u00a0-\u00bf]")
_CONTROL_OK = {"\n", "\r", "\t"}
SCRIPT_MAJORITY = 0.8  # a row's script is an anomaly only where one script holds this share of the rows


def row_text(row: dict[str, Any], fmt: DatasetFormat) -> str:
    """All the text of a row, in reading order (what duplicates and anomalies are measured on)."""
    if fmt is DatasetFormat.preference:
        return "\n".join(preference_texts(row))
    record = to_training_record(row, fmt)
    if "messages" in record:
        return "\n".join(str(m.get("content", "")) for m in record["messages"])
    if "prompt" in record:
        return f"{record['prompt']}{record['completion']}"
    return str(record["text"])


def answer_text(row: dict[str, Any], fmt: DatasetFormat) -> str:
    """The part the model learns to write: the last assistant turn, the completion, the chosen answer,
    or the whole text of a plain-text row."""
    if fmt is DatasetFormat.preference:
        return preference_texts(row)[1]
    record = to_training_record(row, fmt)
    if "messages" in record:
        answers = [m for m in record["messages"] if m.get("role") == "assistant"]
        return str(answers[-1].get("content", "")) if answers else ""
    if "prompt" in record:
        return str(record["completion"])
    return str(record["text"])


def canonical(row: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def exact_groups(keys: Sequence[str]) -> list[list[int]]:
    """Indices sharing a key, for every key held by more than one index (in order of first index)."""
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return [g for g in groups.values() if len(g) > 1]


def first_of_each(indices: list[int], keys: list[str]) -> list[int]:
    """The first index of each key, in order."""
    seen: set[str] = set()
    kept = []
    for index, key in zip(indices, keys, strict=True):
        if key not in seen:
            seen.add(key)
            kept.append(index)
    return kept


def shingles(text: str) -> set[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) < SHINGLE_WORDS:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + SHINGLE_WORDS]).encode() for i in range(len(words) - SHINGLE_WORDS + 1)}


def near_duplicates(indices: list[int], texts: Sequence[str], threshold: float) -> dict[int, int]:
    """Each index that is a near duplicate of an earlier kept one, mapped to that one (an index that is
    kept is never mapped). The LSH candidates are confirmed with the MinHash estimate itself, since LSH
    can return pairs a little under the threshold."""
    lsh = MinHashLSH(threshold=threshold, num_perm=MINHASH_PERMUTATIONS)
    signatures: dict[str, MinHash] = {}
    duplicate_of: dict[int, int] = {}
    for index in indices:
        signature = MinHash(num_perm=MINHASH_PERMUTATIONS)
        signature.update_batch(list(shingles(texts[index])))
        match = next((int(k) for k in lsh.query(signature) if signatures[k].jaccard(signature) >= threshold), None)
        if match is None:
            lsh.insert(str(index), signature)
            signatures[str(index)] = signature
        else:
            duplicate_of[index] = match
    return duplicate_of


def encoding_anomaly(text: str) -> str | None:
    """Why a text looks broken in encoding, or None."""
    if "\ufffd" in text:
        return "holds U+FFFD (bytes that were not valid text where it was made)"
    if _MOJIBAKE.search(text):
        return "looks like UTF-8 read as Latin-1 (mojibake such as 'Ã©' for 'é')"
    control = next((c for c in text if unicodedata.category(c) == "Cc" and c not in _CONTROL_OK), None)
    if control is not None:
        return f"holds control character U+{ord(control):04X}"
    return None


def dominant_script(text: str) -> str | None:
    """The writing system of most of a text's letters (the first word of their Unicode names: LATIN,
    CYRILLIC, CJK, ARABIC, ...), or None when it has no letters."""
    scripts: Counter[str] = Counter()
    for char in text[:2000]:  # a prefix is plenty to tell
        if char.isalpha():
            scripts[unicodedata.name(char, "UNKNOWN").split(" ")[0]] += 1
    return scripts.most_common(1)[0][0] if scripts else None


def script_outliers(texts: Sequence[str]) -> tuple[str | None, dict[int, str]]:
    """The dataset's main script (held by at least SCRIPT_MAJORITY of the rows with letters) and the rows
    written in another one; nothing when no script dominates (a multilingual dataset)."""
    scripts = [dominant_script(t) for t in texts]
    counted = Counter(s for s in scripts if s)
    if not counted:
        return None, {}
    main, count = counted.most_common(1)[0]
    if count < SCRIPT_MAJORITY * sum(counted.values()):
        return None, {}
    return main, {i: s for i, s in enumerate(scripts) if s and s != main}


def histogram(values: Sequence[int], bins: int = 20) -> list[dict[str, int]]:
    """Equal-width bins over [min, max] (each `start` inclusive, `end` exclusive but the last)."""
    if not values:
        return []
    low, high = min(values), max(values)
    width = max(1, -(-(high - low + 1) // bins))
    counts = Counter((v - low) // width for v in values)
    return [
        {"start": low + b * width, "end": low + (b + 1) * width, "count": counts.get(b, 0)}
        for b in range((high - low) // width + 1)
    ]


def percentile(values: Sequence[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0


def token_counter(model_dir: Path) -> Callable[[str], int] | None:
    """Tokens of a text with the model's own tokenizer (the `tokenizers` library reading tokenizer.json),
    or None when the model directory has none."""
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    return count


def tokenizer_digest(model_dir: Path) -> str:
    """What identifies a model's tokenization: its tokenizer files' bytes (a cache key of reports)."""
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        path = model_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
