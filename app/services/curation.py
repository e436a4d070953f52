"""Curation: a dataset version made from another by filters, and datasets streamed back out.

A curation never edits rows: it keeps or drops whole rows of the parent, in the parent's order, and stores
the result as a new dataset whose ``parent_id`` and ``origin`` say where it came from and what each
filter dropped (so the same request on the same parent gives the same version). Filters run in a fixed
order: short answers, token bounds, exact duplicates, near duplicates, then the sample.

Near duplicates are found with MinHash LSH (datasketch) over word 3-grams of a row's text: a row is
dropped when its estimated Jaccard similarity to an earlier kept row reaches ``near_threshold``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from datasketch import MinHash, MinHashLSH
from sqlmodel import Session

from app.core.layout import dataset_rows_key, read_dataset_rows
from app.core.storage import Storage
from app.datasets.formats import to_training_record
from app.datasets.readers import Limits
from app.models import Dataset, DatasetCurate, DatasetFormat
from app.services.chat_templates import load_renderer
from app.services.datasets import create_from_rows
from app.services.errors import InvalidRequest
from app.services.principal import Principal

MINHASH_PERMUTATIONS = 128
SHINGLE_WORDS = 3
_WORD = re.compile(r"\w+", re.UNICODE)


def curate(
    *,
    session: Session,
    storage: Storage,
    actor: Principal,
    parent: Dataset,
    body: DatasetCurate,
    model_dir: Path | None,
    limits: Limits,
) -> Dataset:
    """Make the curated version of ``parent``; ``model_dir`` (a local model) is needed for token bounds."""
    if (body.min_tokens is not None or body.max_tokens is not None) and model_dir is None:
        raise InvalidRequest("base_model", "min_tokens and max_tokens count tokens with a base model's tokenizer")
    if body.min_tokens is not None and body.max_tokens is not None and body.min_tokens > body.max_tokens:
        raise InvalidRequest("min_tokens", "must not exceed max_tokens")
    rows = read_dataset_rows(storage, parent.id)
    kept = list(range(len(rows)))
    dropped: dict[str, int] = {}

    def apply(name: str, keep: Callable[[list[int]], list[int]]) -> None:
        nonlocal kept
        before = len(kept)
        kept = keep(kept)
        dropped[name] = before - len(kept)

    texts = [row_text(row, parent.format) for row in rows]
    if body.min_answer_chars:
        least = body.min_answer_chars
        apply(
            "short_answers", lambda idx: [i for i in idx if len(answer_text(rows[i], parent.format).strip()) >= least]
        )
    if model_dir is not None and (body.min_tokens is not None or body.max_tokens is not None):
        count = token_counter(model_dir)
        low, high = body.min_tokens or 0, body.max_tokens
        apply(
            "token_bounds",
            lambda idx: [i for i in idx if low <= count(texts[i]) and (high is None or count(texts[i]) <= high)],
        )
    if body.dedup in ("exact", "near"):
        apply("exact_duplicates", lambda idx: first_of_each(idx, [canonical(rows[i]) for i in idx]))
    if body.dedup == "near":
        apply("near_duplicates", lambda idx: drop_near_duplicates(idx, texts, body.near_threshold))
    if body.sample is not None and body.sample < len(kept):
        chosen = set(random.Random(body.seed).sample(kept, body.sample))  # noqa: S311  (a reproducible sample)
        apply("sampled_out", lambda idx: [i for i in idx if i in chosen])
    if not kept:
        raise InvalidRequest("dedup", f"the filters leave no row of the {len(rows)} (dropped: {dropped})")

    filters = body.model_dump(exclude={"name"}, exclude_none=True)
    origin = {"curated_from": str(parent.id), "filters": filters, "dropped": dropped, "rows_before": len(rows)}
    return create_from_rows(
        session=session,
        storage=storage,
        actor=actor,
        name=body.name or f"{parent.name} (curated)"[:200],
        rows=[rows[i] for i in kept],
        fmt=parent.format,
        eval_fraction=parent.eval_fraction if body.eval_fraction is None else body.eval_fraction,
        limits=limits,
        parent_id=parent.id,
        origin=origin,
    )


# --- what a row says ---------------------------------------------------------------------------------------


def row_text(row: dict[str, Any], fmt: DatasetFormat) -> str:
    """All the text of a row, in reading order (what duplicates and token bounds are measured on)."""
    if fmt is DatasetFormat.preference:
        return "\n".join(str(row.get(k, "")) for k in ("prompt", "chosen", "rejected"))
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
        return str(row.get("chosen", ""))
    record = to_training_record(row, fmt)
    if "messages" in record:
        answers = [m for m in record["messages"] if m.get("role") == "assistant"]
        return str(answers[-1].get("content", "")) if answers else ""
    if "prompt" in record:
        return str(record["completion"])
    return str(record["text"])


def canonical(row: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def first_of_each(indices: list[int], keys: list[str]) -> list[int]:
    """The first row of each key, in order."""
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


def drop_near_duplicates(indices: list[int], texts: list[str], threshold: float) -> list[int]:
    """Keep a row unless an earlier kept row is at least ``threshold`` similar (MinHash estimate of the
    Jaccard similarity of their word 3-grams)."""
    lsh = MinHashLSH(threshold=threshold, num_perm=MINHASH_PERMUTATIONS)
    signatures: dict[str, MinHash] = {}
    kept = []
    for index in indices:
        signature = MinHash(num_perm=MINHASH_PERMUTATIONS)
        signature.update_batch(list(shingles(texts[index])))
        # LSH candidates can fall a little under the threshold: confirm with the estimate itself.
        if not any(signatures[key].jaccard(signature) >= threshold for key in lsh.query(signature)):
            lsh.insert(str(index), signature)
            signatures[str(index)] = signature
            kept.append(index)
    return kept


def token_counter(model_dir: Path) -> Callable[[str], int]:
    """Tokens of a text with the model's own tokenizer (the `tokenizers` library reading tokenizer.json)."""
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file() or load_renderer(model_dir) is None:
        raise InvalidRequest("base_model", "token bounds need a local model directory with a tokenizer.json")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    cache: dict[str, int] = {}

    def count(text: str) -> int:
        if text not in cache:
            cache[text] = len(tokenizer.encode(text, add_special_tokens=False).ids)
        return cache[text]

    return count


# --- export ------------------------------------------------------------------------------------------------


def export_jsonl(storage: Storage, dataset: Dataset) -> Iterator[bytes]:
    """The stored rows, one JSON object a line, streamed as they are stored."""
    with storage.open(dataset_rows_key(dataset.id)) as f:
        while chunk := f.read(1 << 20):
            yield chunk


def export_parquet(storage: Storage, dataset: Dataset) -> Iterator[bytes]:
    """The rows as one Parquet file, in record batches of ``EXPORT_BATCH_ROWS``: a first pass unifies the
    batches' schemas (an optional key may first appear late, an integer column hold a float), a second
    writes them to a spool file, which the returned iterator streams and then deletes. Memory holds one
    batch at a time. Written before anything is sent, so rows with no common table shape are a 422."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    spool = Path(tempfile.mkdtemp(prefix="studio-export-"))
    path = spool / "rows.parquet"
    try:
        # pa.array infers a struct over the keys of every row (Table.from_pylist only reads the first row's).
        schemas = [pa.schema(list(pa.array(batch).type)) for batch in _row_batches(storage, dataset)]
        schema = pa.unify_schemas(schemas, promote_options="permissive")
        with pq.ParquetWriter(path, schema) as writer:
            for batch in _row_batches(storage, dataset):
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        shutil.rmtree(spool, ignore_errors=True)
        raise InvalidRequest("format", f"these rows have no common Parquet table shape ({exc}); export jsonl") from None
    except BaseException:
        shutil.rmtree(spool, ignore_errors=True)
        raise
    return _stream_and_delete(path, spool)


def _stream_and_delete(path: Path, spool: Path) -> Iterator[bytes]:
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk
    finally:
        shutil.rmtree(spool, ignore_errors=True)


EXPORT_BATCH_ROWS = 10_000


def _row_batches(storage: Storage, dataset: Dataset) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    with storage.open(dataset_rows_key(dataset.id)) as f:
        for line in f:
            if line.strip():
                batch.append(json.loads(line))
            if len(batch) >= EXPORT_BATCH_ROWS:
                yield batch
                batch = []
    if batch:
        yield batch
