"""Load HotpotQA from the hub, a local file or directory, or the shipped sample, into ``HotpotRecord``.

Every source goes through ``datasets.load_dataset`` (the ``json`` / ``parquet`` builders for local
files, the hub name otherwise). Two row shapes are accepted, per row:

* the original release: ``_id``, ``context`` as ``[title, [sentences...]]`` pairs and
  ``supporting_facts`` as ``[title, sentence_index]`` pairs;
* the hub's columns: ``id``, ``context = {title: [...], sentences: [[...]]}`` and
  ``supporting_facts = {title: [...], sent_id: [...]}``.

Any problem (missing file, corrupt JSON, wrong shape, unreachable hub) raises one
:class:`HotpotDataError` naming the source and what is wrong.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from pydantic import ValidationError

from agemem.assets import SAMPLE_DATA
from agemem.data.records import EpisodeScript, HotpotRecord, Paragraph, SupportingFact

if TYPE_CHECKING:
    from agemem.settings import Settings

logger = logging.getLogger(__name__)

#: File suffixes and the ``datasets`` builder that reads them.
BUILDERS: dict[str, str] = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SAMPLE_SOURCE = "sample"
_BATCH = 2000


class HotpotDataError(ValueError):
    """The HotpotQA source cannot be read or does not look like HotpotQA."""


class UnlabelledDataError(HotpotDataError):
    """Records without a gold answer were given to something that needs labels (training)."""


def resolve_source(source: str) -> tuple[str, str | None, list[Path]]:
    """Classify ``data.source``: ``("hub", name, [])`` or ``(builder, None, files)``.

    A string that names an existing path, or looks like one (absolute, ``./``, ``~`` or a data-file
    suffix), is local; a missing local path is an error rather than a silent hub look-up.
    """
    if source == SAMPLE_SOURCE:
        return "json", None, [SAMPLE_DATA]
    path = Path(source).expanduser()
    looks_local = path.is_absolute() or source.startswith((".", "~")) or path.suffix.lower() in BUILDERS
    if not path.exists():
        if looks_local:
            raise HotpotDataError(f"{path}: no such file or directory (data.source)")
        return "hub", source, []
    if path.is_dir():
        return _files_in_dir(path)
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise HotpotDataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(BUILDERS)}")
    return builder, None, [path]


def _files_in_dir(path: Path) -> tuple[str, str | None, list[Path]]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
    if not files:
        raise HotpotDataError(f"{path}: directory holds no {'/'.join(sorted(BUILDERS))} files")
    builders = {BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise HotpotDataError(f"{path}: mixes JSON and parquet files; keep one format per directory")
    return builders.pop(), None, files


def _pick_split_files(files: list[Path], split: str) -> list[Path]:
    """In a directory, prefer files whose name mentions the split (``train``, ``validation``/``dev``)."""
    aliases = {split.lower()}
    if split.lower() in {"validation", "dev"}:
        aliases |= {"validation", "dev"}
    chosen = [p for p in files if any(a in p.name.lower() for a in aliases)]
    return chosen or files


def _load_dataset(settings: "Settings") -> tuple[Any, str]:
    """The ``datasets.Dataset`` for ``settings.data`` and a label naming it in errors."""
    import datasets

    cfg = settings.data
    builder, hub_name, files = resolve_source(cfg.source)
    if builder == "hub":
        label = f"hub dataset {hub_name!r} (config {cfg.hub_config!r}, split {cfg.split!r})"
        try:
            cache = str(settings.path(cfg.cache_dir)) if cfg.cache_dir else None
            return datasets.load_dataset(hub_name, cfg.hub_config, split=cfg.split, cache_dir=cache), label
        except Exception as exc:  # noqa: BLE001 - the hub raises many types; one clear message instead
            raise HotpotDataError(
                f"{label}: cannot load ({type(exc).__name__}: {exc}). Offline? Set data.source to a local "
                "file or directory, or 'sample'."
            ) from exc
    if len(files) > 1:
        files = _pick_split_files(files, cfg.split)
    label = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
    # Local files are cached under runs_dir, not the user's HF cache, so tests and runs stay contained.
    cache = settings.path(cfg.cache_dir or Path("runs/cache/datasets"))
    try:
        ds = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", cache_dir=str(cache)
        )
    except Exception as exc:  # noqa: BLE001 - datasets wraps parse errors in several types
        raise HotpotDataError(f"{label}: not readable as {builder.upper()}: {_root_cause(exc)}") from exc
    return ds, label


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


def _check_columns(columns: Sequence[str], label: str) -> None:
    missing = [c for c in ("question", "context") if c not in columns]
    if "_id" not in columns and "id" not in columns:
        missing.append("_id (or id)")
    if missing:
        raise HotpotDataError(
            f"{label}: does not look like HotpotQA: missing column(s) {', '.join(missing)}; found {list(columns)}"
        )


def _paragraphs(context: Any) -> list[Paragraph]:
    if isinstance(context, Mapping):  # hub shape
        titles, sentences = context.get("title") or [], context.get("sentences") or []
        # The reference cuts both lists to the shorter one; do the same rather than fail.
        pairs: Iterable[tuple[Any, Any]] = zip(titles, sentences)
    elif isinstance(context, list):  # original shape
        if any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in context):
            raise ValueError("context pairs must be [title, [sentences...]]")
        pairs = ((p[0], p[1]) for p in context)
    elif context is None:
        return []
    else:
        raise ValueError(f"context must be a list of pairs or a {{title, sentences}} mapping, got {type(context).__name__}")
    out = []
    for title, sents in pairs:
        if isinstance(sents, str) or not isinstance(sents, (list, tuple)):
            raise ValueError(f"paragraph {title!r}: sentences must be a list of strings")
        out.append(Paragraph(title=str(title), sentences=[str(s) for s in sents]))
    return out


def _facts(raw: Any, paragraphs: list[Paragraph]) -> list[SupportingFact]:
    if raw is None:
        return []
    if isinstance(raw, Mapping):
        pairs: Iterable[tuple[Any, Any]] = zip(raw.get("title") or [], raw.get("sent_id") or [])
    elif isinstance(raw, list):
        if any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in raw):
            raise ValueError("supporting_facts pairs must be [title, sentence_index]")
        pairs = ((p[0], p[1]) for p in raw)
    else:
        raise ValueError(f"supporting_facts must be pairs or a {{title, sent_id}} mapping, got {type(raw).__name__}")
    by_title = {p.title: p.sentences for p in paragraphs}
    facts = []
    for title, sent_id in pairs:
        sents = by_title.get(str(title), [])
        idx = int(sent_id)
        sentence = sents[idx].strip() if 0 <= idx < len(sents) else None
        facts.append(SupportingFact(title=str(title), sent_id=idx, sentence=sentence))
    return facts


def normalise_row(row: Mapping[str, Any]) -> HotpotRecord:
    """One row of either shape -> :class:`HotpotRecord` (supporting facts resolved to sentences).

    Raises ``ValueError`` (or pydantic's ``ValidationError``) describing the first problem.
    """
    paragraphs = _paragraphs(row.get("context"))
    answer = row.get("answer")
    answer = str(answer) if answer is not None and str(answer).strip() else None
    return HotpotRecord(
        id=str(row.get("_id") if row.get("_id") is not None else row.get("id")),
        question=row["question"],
        answer=answer,
        type=row.get("type") or None,
        level=row.get("level") or None,
        context=paragraphs,
        supporting_facts=_facts(row.get("supporting_facts"), paragraphs),
    )


def records_from_dataset(
    ds: Any, label: str, limit: int | None = None, progress: Callable[[int], None] | None = None
) -> list[HotpotRecord]:
    """Normalise a ``datasets.Dataset`` (column-batched for speed) into records."""
    _check_columns(ds.column_names, label)
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    records: list[HotpotRecord] = []
    seen: set[str] = set()
    for batch in ds.iter(batch_size=_BATCH):
        names = list(batch)
        for values in zip(*(batch[n] for n in names)):
            row = dict(zip(names, values))
            try:
                rec = normalise_row(row)
            except (ValueError, TypeError, KeyError, ValidationError) as exc:
                rid = row.get("_id", row.get("id"))
                raise HotpotDataError(f"{label}: record {len(records)} (id {rid!r}) has the wrong shape: {exc}") from exc
            if rec.id in seen:
                raise HotpotDataError(f"{label}: duplicate record id {rec.id!r}")
            seen.add(rec.id)
            records.append(rec)
        if progress is not None:
            progress(len(batch[names[0]]))
    return records


def load_records(settings: "Settings", progress: Callable[[int], None] | None = None) -> list[HotpotRecord]:
    """Load ``settings.data.source`` (``sample``, hub name, file or directory), keeping ``data.limit``.

    ``progress`` receives the number of records normalised per batch (for a progress bar).
    """
    ds, label = _load_dataset(settings)
    records = records_from_dataset(ds, label, settings.data.limit, progress)
    unlabelled = sum(not r.labelled for r in records)
    logger.info("loaded %d HotpotQA records from %s (%d unlabelled)", len(records), label, unlabelled)
    return records


def require_labelled(records: Sequence[HotpotRecord | EpisodeScript], purpose: str = "training") -> None:
    """Refuse records or episode scripts without a gold answer for ``purpose``.

    Unlabelled records are fine for inference; training and judged evaluation need the answer.
    """
    missing = [getattr(r, "id", None) or getattr(r, "record_id", "?") for r in records if not r.labelled]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise UnlabelledDataError(
            f"{len(missing)} of {len(records)} records have no answer and cannot be used for {purpose} "
            f"(ids: {shown}). Use a labelled split (e.g. train/validation), or run inference only."
        )