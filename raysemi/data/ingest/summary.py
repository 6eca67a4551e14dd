"""What an ingest stored, in a few lines for the terminal (``raysemi ingest`` prints it)."""

from __future__ import annotations

from raysemi.data.shards import Manifest


def summarize(manifest: Manifest) -> str:
    """A few lines for the CLI: rows per split, quarantined, duplicates, conversions."""
    stored = sum(s.rows for s in manifest.splits.values())
    tag = " [SYNTHETIC]" if manifest.synthetic else ""
    lines = [f"{stored:,} images stored, {manifest.num_classes} classes: {', '.join(manifest.classes)}{tag}"]
    for name, s in manifest.splits.items():
        if s.rows == 0 and name == "unlabeled":
            continue
        per = ", ".join(f"{c} {n:,}" for c, n in s.label_counts.items())
        lines.append(
            f"  {name:<9} {s.rows:>7,} rows in {len(s.shards)} shards" + (f" ({per})" if per else "")
        )
    detail = "; ".join(f"{r}: {n}" for r, n in manifest.quarantined.items())
    lines.append(f"quarantined: {manifest.quarantined_total}" + (f" ({detail})" if detail else ""))
    lines.append(f"duplicates dropped: {manifest.duplicates}")
    converted = manifest.extra.get("converted") or {}
    if converted:
        lines.append("converted: " + "; ".join(f"{k}: {n}" for k, n in converted.items()))
    d = manifest.extra.get("dicom")
    if d:
        skipped = ", ".join(f"{k} {n}" for k, n in d["skipped"].items()) or "none"
        lines.append(
            f"DICOM: {d['files']} files (skipped: {skipped}); groups: salted hash of {d['group_key']}; "
            f"frames: {d['frames']}; rules: " + "; ".join(f"{r}: {n}" for r, n in d["rules"].items())
        )
    return "\n".join(lines)
