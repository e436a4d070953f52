"""Curation: a dataset version made from another by filters, and datasets streamed back out.

A curation never edits rows: it keeps or drops whole rows of the parent, in the parent's order, and stores
the result as a new dataset whose ``parent_id`` and ``origin`` say where it came from and what each
filter dropped (so the same request on the same parent gives the same version). Filters run in a fixed
order: short answers, token bounds, exact duplicates, near duplicates, then the sample.

Near duplicates are found with MinHash LSH (datasketch) over word 3-grams of a row's text: a row is
dropped when its estimated Jaccard similarity to an earlier kept row reaches ``near_threshold``
(``app.datasets.quality``, which the dataset report shares).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlmodel import Session

from app.core.layout import dataset_rows_key, read_dataset_rows
from app.core.storage import Storage
from app.datasets.quality import answer_text, canonical, first_of_each, near_duplicates, row_text, token_counter
from app.datasets.readers import Limits
from app.models import Dataset, DatasetCurate
from app.services.datasets import create_from_rows
from app.services.errors import InvalidRequest
from app.services.principal import Principal


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
        if count is None:
            raise InvalidRequest("base_model", "token bounds need a local model directory with a tokenizer.json")
        low, high = body.min_tokens or 0, body.max_tokens
        apply(
            "token_bounds",
            lambda idx: [i for i in idx if low <= count(texts[i]) and (high is None or count(texts[i]) <= high)],
        )
    if body.dedup in ("exact", "near"):
        apply("exact_duplicates", lambda idx: first_of_each(idx, [canonical(rows[i]) for i in idx]))
    if body.dedup == "near":

        def drop_near(idx: list[int]) -> list[int]:
            duplicates = near_duplicates(idx, texts, body.near_threshold)
            return [i for i in idx if i not in duplicates]

        apply("near_duplicates", drop_near)
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
