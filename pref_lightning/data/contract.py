"""The data-to-model contract: one frozen, serialisable object saying how a row becomes model input.

The data side owns it (`PreferenceDataModule.spec`): the encoder and the tokenized-pair cache key read
it, the model takes it in its constructor (so Lightning's hyperparameters, and so every checkpoint,
carry it), and prediction rebuilds the encoder from the checkpoint's copy. Adding an encoding setting
means one field here plus its config default in `conf/data/*.yaml`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pref_lightning.core.errors import UserError
from pref_lightning.data.text_stats import SIDE_FEATURES

# the side statistics the head receives: text statistics of one side, its token counts, the prompt's, then
# whether the side refuses and how alike the two answers are (the same value on both sides)
LEGACY_STATS_FEATURES: tuple[str, ...] = (*SIDE_FEATURES, "tokens", "prompt_chars", "prompt_turns", "prompt_tokens")
STATS_FEATURES: tuple[str, ...] = (*LEGACY_STATS_FEATURES, "refusal", "overlap", "identical")
LAYOUTS = ("siamese", "cross")
# cross-layout templates: `plain` [CLS] prompt [SEP] A [SEP] B [SEP] (encoders); `verdict` text markers and a
# closing question, the layout of the LMSYS / WSDM Cup winners' decoder LLMs (see pairs.VERDICT_MARKERS)
TEMPLATES = ("plain", "verdict")
# how a sequence longer than max_length is cut: `budgeted` (each segment keeps a share), or the whole text
# cut at one end, `left` keeping its end (the latest turns: 9th / 16th place LMSYS) or `right` its start
TRUNCATION_SIDES = ("budgeted", "left", "right")
CLASS_COUNTS = (2, 3)  # binary (A wins, B wins: WSDM Cup) or the competition's A / B / tie


@dataclass(frozen=True)
class EncodingSpec:
    """How records are encoded, and what the model may assume about its input.

    - `layout`: `siamese` (one `[CLS] prompt [SEP] response [SEP]` sequence per side, so neither
      answer is ever cut away) or `cross` (one sequence per row holding the prompt and both answers).
    - `max_length`: tokens per sequence, special tokens included.
    - `prompt_fraction`: the largest share of a sequence the prompt may take; `head_fraction`: the
      share of a truncated turn kept from its start (the rest from its end).
    - `naive_truncation`: cross layout only, the public notebooks' first-`max_length`-tokens cut.
    - `truncation_side`: `budgeted` (the budget above), `left` (the text between the first token and the
      closing tokens keeps its last tokens: the end of a long conversation) or `right` (its first tokens).
    - `template`: cross layout only, `plain` (special tokens between the segments) or `verdict` ("# Prompt",
      "# Response A", "# Response B" markers and a closing "which response is better" question, so a
      decoder's last token has read the question: last-token pooling).
    - `n_classes`: 3 (A wins, B wins, tie) or 2 (A wins, B wins).
    - `stats_features`: names of the per-side statistics (`stats` columns of a batch);
      `stats_norm`: their normalisation fitted on the training split (`stats_norm.py`), None before
      fitting.
    - `n_sources`: the training sources, a data fact the datamodule sets (not a setting): the training file
      (source 0) then each `data.sources[]` entry in order; a training batch's `source` (B,) holds indices
      below it. `model.source_heads=true` gives each source its own output layer (head.py). 1 in every
      checkpoint written before it existed.

    Raises `UserError` (one line naming the `data.` key) for a value outside its range.
    """

    layout: str = "siamese"
    max_length: int = 512
    prompt_fraction: float = 0.3
    head_fraction: float = 0.5
    naive_truncation: bool = False
    template: str = "plain"
    truncation_side: str = "budgeted"
    n_classes: int = 3
    stats_features: tuple[str, ...] = STATS_FEATURES
    stats_norm: Mapping[str, Any] | None = field(default=None, compare=True, hash=False)
    n_sources: int = 1

    def __post_init__(self) -> None:
        # plain types, whatever the caller passed (OmegaConf nodes, numpy numbers, lists)
        for name, kind in (("max_length", int), ("prompt_fraction", float), ("head_fraction", float),
                           ("naive_truncation", bool), ("n_classes", int),
                           ("n_sources", int)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "stats_features", tuple(str(s) for s in self.stats_features))
        if self.stats_norm is not None:
            object.__setattr__(self, "stats_norm", plain(self.stats_norm))
        if self.layout not in LAYOUTS:
            raise UserError(f"data.layout={self.layout!r}; choose from {', '.join(LAYOUTS)}")
        if self.template not in TEMPLATES:
            raise UserError(f"data.template={self.template!r}; choose from {', '.join(TEMPLATES)}")
        if self.template != "plain" and self.layout != "cross":
            raise UserError(f"data.template={self.template!r} needs data.layout=cross (the siamese layout has no template)")
        if self.truncation_side not in TRUNCATION_SIDES:
            raise UserError(f"data.truncation_side={self.truncation_side!r}; choose from {', '.join(TRUNCATION_SIDES)}")
        if self.naive_truncation and self.truncation_side != "budgeted":
            raise UserError(f"data.naive_truncation=true and data.truncation_side={self.truncation_side} exclude each "
                            "other; data.truncation_side=right is the first-max_length-tokens cut")
        if self.max_length < 8:
            raise UserError(f"data.max_length={self.max_length} is too small; use at least 8")
        if not 0.0 < self.prompt_fraction < 1.0:
            raise UserError(f"data.prompt_fraction={self.prompt_fraction} must lie in (0, 1)")
        if not 0.0 <= self.head_fraction <= 1.0:
            raise UserError(f"data.head_fraction={self.head_fraction} must lie in [0, 1]")
        unknown = [name for name in self.stats_features if name not in STATS_FEATURES]
        if unknown or not self.stats_features:
            raise UserError(f"data.stats_features: unknown statistic(s) {', '.join(unknown) or '(none given)'}; "
                            f"known: {', '.join(STATS_FEATURES)}")
        if self.n_classes not in CLASS_COUNTS:
            raise UserError(f"data.n_classes={self.n_classes}; choose 2 (A/B) or 3 (A/B/tie)")
        if self.n_sources < 1:
            raise UserError(f"n_sources={self.n_sources}: a run has at least one training source (its training file)")

    @property
    def n_stats(self) -> int:
        """Number of statistics per side (the width of a batch's `stats`)."""
        return len(self.stats_features)

    def replace(self, **changes: Any) -> EncodingSpec:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def tokenization_key(self) -> dict[str, Any]:
        """The settings tokenized pairs depend on (the cache key's share): all but the classes, the sources
        and the fitted normalisation, which are applied after tokenizing. `truncation_side` only when not `budgeted`
        (its default), so that pairs cached before it existed stay valid."""
        key = {k: v for k, v in self.to_dict().items() if k not in ("n_classes", "stats_norm", "n_sources")}
        if key["truncation_side"] == "budgeted":
            del key["truncation_side"]
        return key

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (lists, not tuples): what hyperparameters, YAML and JSON hold."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["stats_features"] = list(self.stats_features)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "encoding spec") -> EncodingSpec:
        """The spec `to_dict` wrote; an unknown key is a `UserError` naming it and `where` it came from."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            close = [m for key in unknown for m in difflib.get_close_matches(key, sorted(names), n=1)]
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(f"{where}: unknown encoding setting(s) {', '.join(unknown)}; {hint}"
                            f"known: {', '.join(sorted(names))}")
        return cls(**dict(values))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def plain(value: Any) -> Any:
    """Nested mappings and sequences (Hydra's DictConfig / ListConfig, numpy arrays) as dicts and lists of plain
    values (OmegaConf and numpy free: transformers' config validation, JSON and checkpoints take them)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        items = value.tolist()
        return [plain(v) for v in items] if isinstance(items, list) else items
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return value
