"""The small jobs every report writer does: a markdown table, the geometric-mean ratio over
domains, and files written whole or not at all.

    text = markdown_table(["model", "ppl"], [["original", "51.20"], ["sharp", "63.01"]])
    geo, worst = geomean_ratio({"chat": 9.0, "code": 4.0}, {"chat": 3.0, "code": 2.0})  # (2.449..., 3.0)
    write_report(Path("runs/x/report"), md=text + "\n", record={"rows": ...}, fig=fig)  # report.{md,json,png}

A reader never sees half a file: ``write_atomic`` writes a temporary file beside the target and
renames it over the target (``os.replace`` is atomic within one file system). Folders have their
own helper, ``sharp_mlx.io.checkpoint.atomic_dir``.
"""

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Tuple, Union

ALIGN = {None: "---", "l": ":---", "c": ":---:", "r": "---:"}


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]], align: Optional[Sequence] = None) -> str:
    """A markdown table: the header, the separator, one line per row (cells as ``str`` gives
    them), without a final newline. ``align``: one of None, "l", "c", "r" per column (None:
    markdown's default)."""
    align = list(align) if align is not None else [None] * len(header)
    if len(align) != len(header):
        raise ValueError(f"{len(align)} alignments for {len(header)} columns")

    def line(cells) -> str:
        return "| " + " | ".join(map(str, cells)) + " |"

    return "\n".join([line(header), "|" + "|".join(ALIGN[a] for a in align) + "|", *map(line, rows)])


def geomean(values: Iterable[float]) -> float:
    """The geometric mean of positive numbers (summed logs over their count, in their order)."""
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values))


def geomean_ratio(ppl: Mapping[str, float], base: Mapping[str, float]) -> Tuple[float, float]:
    """(geometric mean, worst) of ``ppl[d] / base[d]`` over ``base``'s keys, in their order: how
    far a model's perplexities are from the original's, over domains."""
    ratios = [ppl[d] / base[d] for d in base]
    return geomean(ratios), max(ratios)


Content = Union[str, bytes, Callable[[Path], Any]]


def write_atomic(path: Union[str, Path], data: Content) -> Path:
    """Write ``data`` to ``path`` whole or not at all: text (UTF-8), bytes, or a function that
    writes the file at the path it is given (``lambda p: fig.savefig(p, format="png")``; the
    temporary name has no useful suffix, so name the format). Makes the folder; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(data, str):
            tmp.write_bytes(data.encode("utf-8"))
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            data(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_figure(fig, path: Union[str, Path], dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    try:
        return write_atomic(path, lambda p: fig.savefig(p, dpi=dpi, format="png"))
    finally:
        plt.close(fig)


def write_report(
    prefix: Union[str, Path], md: Optional[str] = None, record: Any = None, fig=None, dpi: int = 120
) -> None:
    """PREFIX.md (``md`` as given), PREFIX.json (``record`` as JSON, indent 1) and PREFIX.png
    (a matplotlib figure, closed after), each only if given, each atomically."""
    if md is not None:
        write_atomic(f"{prefix}.md", md)
    if record is not None:
        write_atomic(f"{prefix}.json", json.dumps(record, indent=1))
    if fig is not None:
        save_figure(fig, f"{prefix}.png", dpi)
