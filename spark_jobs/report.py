"""A prepare run's bookkeeping and what it reports: the counts that must add up, the features
section and the manifest dict, and the summary table that ends a run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from seqrec.config import PrepareConfig, to_dict
from seqrec.data import schema
from spark_jobs.rows import USER_REASONS
from spark_jobs.validate import QUARANTINE_REASONS
from spark_jobs.vocab import ItemFeatures, Vocab

ROW_FILTERS = ("min_rating", "actions", "time_window")
"""Row-wise filters (spark_jobs/filters.py)."""
FILTER_REASONS = (*ROW_FILTERS, "min_item_events", "k_core", *USER_REASONS)
"""Every reason an event can be filtered for, in the order the filters run."""


@dataclass(slots=True)
class Counts:
    """The bookkeeping that must add up: events_in = kept + quarantined + duplicates + filtered."""

    events_in: int = 0
    quarantine: dict[str, int] = field(default_factory=lambda: dict.fromkeys(QUARANTINE_REASONS, 0))
    duplicates: int = 0
    filtered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTER_REASONS, 0))
    kept: int = 0

    def check(self) -> None:
        total = self.kept + sum(self.quarantine.values()) + self.duplicates + sum(self.filtered.values())
        assert total == self.events_in, f"counts do not add up: {total} != events_in {self.events_in}: {self}"


def features_section(vocabs: dict[str, Vocab], side: ItemFeatures) -> dict[str, dict]:
    """manifest["features"]: kind and table size of every feature (max_values for multi-valued ones)."""
    section = {"item": {"kind": schema.KIND_ITEM, "num_embeddings": vocabs["item"].num_embeddings}}
    for name, vocab in side.vocabs.items():
        multi = name in side.max_values
        section[name] = {
            "kind": schema.KIND_ITEM_MULTI if multi else schema.KIND_ITEM_SINGLE,
            "num_embeddings": vocab.num_embeddings,
        }
        if multi:
            section[name]["max_values"] = side.max_values[name]
    for name, vocab in vocabs.items():
        if name != "item":
            section[name] = {"kind": schema.KIND_EVENT, "num_embeddings": vocab.num_embeddings}
    return section


def manifest(
    cfg: PrepareConfig,
    c: Counts,
    source: str,
    features: dict,
    splits: dict,
    users: int,
    items: int,
    spark_version: str,
    t0: float,
) -> dict[str, Any]:
    """The manifest.json contents (schema in seqrec/data/schema.py)."""
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "dataset": cfg.dataset_name,
        "source": {
            "path": source,
            "format": cfg.input.format,
            "item_features_path": cfg.input.item_features_path,
        },
        "config": to_dict(cfg),
        "max_len": cfg.split.max_len,
        "split_kind": cfg.split.kind,
        "features": features,
        "vocab": {name: f"{schema.VOCAB_DIR}/{name}.parquet" for name in features},
        "item_features": schema.ITEM_FEATURES_FILE,
        "splits": splits,
        "stats": {
            "events_in": c.events_in,
            "kept": c.kept,
            "quarantined": sum(c.quarantine.values()),
            "duplicates": c.duplicates,
            "filtered": sum(c.filtered.values()),
            "users": users,
            "items": items,
        },
        "quarantine": c.quarantine,
        "filtered": c.filtered,
        "spark_version": spark_version,
        "elapsed_s": round(time.time() - t0, 3),
    }


def nonzero(by_reason: dict) -> str:
    parts = [f"{r} {c:,}" for r, c in by_reason.items() if r is not None and c]
    return ", ".join(parts) or "none"


def format_summary(m: dict[str, Any], output: str) -> str:
    """The table that ends a run."""
    s = m["stats"]
    lines = [
        f"seqrec prepare: {m['dataset']} -> {output} ({m['elapsed_s']:.1f} s, Spark {m['spark_version']})",
        f"  {'events in':<14}{s['events_in']:>14,}",
        f"  {'kept':<14}{s['kept']:>14,}",
        f"  {'quarantined':<14}{s['quarantined']:>14,}  {nonzero(m['quarantine'])}",
        f"  {'duplicates':<14}{s['duplicates']:>14,}",
        f"  {'filtered':<14}{s['filtered']:>14,}  {nonzero(m['filtered'])}",
        f"  {'users':<14}{s['users']:>14,}",
        f"  {'items':<14}{s['items']:>14,}",
        f"  {'split':<14}{'rows':>14}{'tokens':>14}{'files':>7}{'row groups':>12}",
    ]
    for name, sp in m["splits"].items():
        groups = sum(f["row_groups"] for f in sp["files"])
        lines.append(f"  {name:<14}{sp['rows']:>14,}{sp['tokens']:>14,}{len(sp['files']):>7}{groups:>12}")
    return "\n".join(lines)
