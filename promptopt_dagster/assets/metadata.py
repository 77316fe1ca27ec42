"""How values are shown in Dagster metadata: numbers rounded to 4 significant digits, prompts
wrapped so a metadata panel shows them whole, tables with blanks instead of `nan`."""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Mapping

import dagster as dg
import pandas as pd

SIGNIFICANT_DIGITS = 4
# Prompt lines longer than this are wrapped. In an asset's Overview at a 1600 px wide window, the
# metadata table is wider than its panel: about 60 characters of a value show, the rest is cut.
WRAP_CHARS = 60


def rounded(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """`value` to `digits` significant digits (0.833333 -> 0.8333, 0.000123456 -> 0.0001235)."""
    if not math.isfinite(value) or value == 0:
        return float(value)
    return float(f"{value:.{digits}g}")


def number(value: float | None) -> dg.MetadataValue:
    """A float metadata value rounded to 4 significant digits; null when there is none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return dg.MetadataValue.null()
    return dg.MetadataValue.float(rounded(float(value)))


def wrap(text: str, width: int = WRAP_CHARS) -> str:
    """`text` with every line longer than `width` broken at spaces (or inside a long word)."""
    lines: list[str] = []
    for line in text.splitlines() or [""]:
        if len(line) <= width:
            lines.append(line)
            continue
        indent = line[: len(line) - len(line.lstrip())]
        pieces = textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False)
        lines.extend(piece.rstrip() for piece in pieces)
    return "\n".join(lines)


def code_block(text: str) -> str:
    """`text` wrapped, in a fenced code block whose fence no backtick run in `text` can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{wrap(text)}\n{fence}"


def prompt_markdown(system_prompt: str, output_prompt: str) -> dg.MetadataValue:
    """A prompt as markdown: system and output prompt in code blocks, lines wrapped at WRAP_CHARS."""
    return dg.MetadataValue.md(
        f"**System prompt**\n\n{code_block(system_prompt or '(none)')}\n\n"
        f"**Output prompt**\n\n{code_block(output_prompt)}"
    )


def usage_metadata(usage: Mapping[str, float]) -> dict[str, dg.MetadataValue]:
    """LLM usage (calls, tokens, seconds, cost) as `llm_*` entries: counts as ints, the rest rounded."""
    return {
        (k if k.startswith("llm_") else f"llm_{k}"): number(float(v))
        if isinstance(v, float)
        else dg.MetadataValue.int(int(v))
        for k, v in usage.items()
    }


def markdown_table(frame: pd.DataFrame) -> str:
    """`frame` as a markdown table: floats to 4 significant digits, missing values blank."""
    if frame.empty:
        return "(none)"
    shown = frame.astype(object).map(_cell)
    return shown.to_markdown(index=False, disable_numparse=True)


def _plain(value: object) -> object:
    """numpy scalars as the Python numbers they hold."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, str) else value


def _cell(value: object) -> str:
    value = _plain(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{rounded(value):g}"
    return str(value)


def table_value(value: object) -> str | int | float | bool | None:
    """A value as a TableRecord holds it: floats rounded, NaN and None as None (a blank cell)."""
    value = _plain(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return rounded(value)
    return str(value)
