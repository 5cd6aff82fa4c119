"""Scaled data preparation: N HotpotQA records (the shipped sample replicated with new ids).

Writes the records in the hub's parquet column shape (what `hotpotqa/hotpot_qa` downloads as) and,
with --json, also as one original-shape JSON file, then times load -> scripts -> offline distractors
through the real public functions. Prints a markdown table.

    .venv/bin/python benchmarks/prepare_data.py [--records 90000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from agemem.assets import SAMPLE_DATA  # noqa: E402
from agemem.data.distractors import synthesize  # noqa: E402
from agemem.data.episodes_io import read_json  # noqa: E402
from agemem.data.prepare import prepare_scripts  # noqa: E402
from agemem.settings import load_settings  # noqa: E402


def replicate(n: int) -> list[dict]:
    sample = json.loads(SAMPLE_DATA.read_text(encoding="utf-8"))
    rows = []
    for i in range(n):
        row = dict(sample[i % len(sample)])
        row["_id"] = f"{row['_id']}-{i}"
        rows.append(row)
    return rows


def hub_rows(rows: list[dict]) -> list[dict]:
    return [
        {
            "id": r["_id"], "question": r["question"], "answer": r["answer"], "type": r["type"], "level": r["level"],
            "supporting_facts": {"title": [t for t, _ in r["supporting_facts"]], "sent_id": [i for _, i in r["supporting_facts"]]},
            "context": {"title": [t for t, _ in r["context"]], "sentences": [s for _, s in r["context"]]},
        }
        for r in rows
    ]  # fmt: skip


def run(source: Path, runs: Path, n: int) -> dict[str, float]:
    settings = load_settings("paper", {"runs_dir": str(runs), "data": {"source": str(source), "limit": None}})
    t0 = time.perf_counter()
    scripts = prepare_scripts(settings)
    t1 = time.perf_counter()
    episodes = synthesize(settings, scripts)
    t2 = time.perf_counter()
    stats = read_json(scripts.with_name("scripts.stats.json"))
    assert stats["episodes"] == n, stats
    return {
        "load": stats["seconds"]["load"],
        "scripts": stats["seconds"]["scripts"],
        "prepare total": t1 - t0,
        "offline distractors": t2 - t1,
        "total": t2 - t0,
        "episodes MB": episodes.stat().st_size / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=90_000)
    parser.add_argument("--json", action="store_true", help="also time an original-shape JSON file")
    args = parser.parse_args()
    n = args.records
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        rows = replicate(n)
        inputs = {"parquet (hub shape)": base / "validation.parquet"}
        pq.write_table(pa.Table.from_pylist(hub_rows(rows)), inputs["parquet (hub shape)"])
        if args.json:
            inputs["json (original shape)"] = base / "hotpot.json"
            inputs["json (original shape)"].write_text(json.dumps(rows))
        del rows
        print(f"\n{n} records, {os.cpu_count()} CPUs\n")
        print("| input | load s | scripts s | offline distractors s | total s | records/s load | records/s scripts | records/s distractors |")
        print("|---|---|---|---|---|---|---|---|")
        for label, path in inputs.items():
            r = run(path, base / f"runs-{path.suffix[1:]}", n)
            print(
                f"| {label} | {r['load']:.1f} | {r['scripts']:.1f} | {r['offline distractors']:.1f} | {r['total']:.1f} "
                f"| {n / r['load']:,.0f} | {n / max(r['scripts'], 1e-9):,.0f} | {n / r['offline distractors']:,.0f} |"
            )
        print(f"\nbudget: total under 120 s for {n} records (prepare + offline distractors, excluding input generation)")


if __name__ == "__main__":
    main()
