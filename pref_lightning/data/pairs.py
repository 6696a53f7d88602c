"""Records -> tokenized pairs: one (prompt, response) token sequence per side for a shared encoder.

Each side is `[CLS] prompt [SEP] response [SEP]`, turns inside a segment joined by `[SEP]`. When a
side does not fit, a token budget is spent so that the prompt and the response always keep a share;
inside a segment the latest turns are kept first, and a turn that must be cut keeps its head and tail.
Because A and B are encoded separately, neither answer can ever be truncated away by the other.

The cross layout holds the prompt and both answers in one row, each segment with its own share of the
budget (an answer is never cut away either), and also the row with A and B exchanged: one pass cannot serve
both orders, so swap augmentation picks one of the two rows and swap TTA averages both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pref_lightning.core.errors import UserError
from pref_lightning.data.contract import STATS_FEATURES, EncodingSpec
from pref_lightning.data.records import PairRecord
from pref_lightning.data.text_stats import answer_overlap, refusal, side_stats

__all__ = ["STATS_FEATURES", "VERDICT_MARKERS", "EncodedPair", "PairEncoder"]
CHARS_PER_TOKEN_CAP = 16  # pre-clip very long turns in characters before tokenizing (speed only)
# user text is never tokenized into control tokens: chat data holds "</s>", "[SEP]", "<pad>" as text (code,
# tokenizer questions), and a pad = eos model would read an eos mid-answer (part of the cache key)
SPLIT_SPECIAL_TOKENS = True
# template=verdict: the segments' markers and the closing question, in the spirit of the LMSYS winners'
# prompts (1st place, Gemma-2 9B: "<prompt>...<response_a>...<response_b>..." then the question); plain
# text, so any tokenizer reads them, and the question comes last, where a decoder's last token pools
VERDICT_MARKERS = {
    "prompt": "# Prompt\n",
    "a": "\n\n# Response A\n",
    "b": "\n\n# Response B\n",
    "verdict": "\n\n# Which response is better: A, B or tie?\n",
}


@dataclass
class EncodedPair:
    ids_a: np.ndarray  # int32 token ids of side A, special tokens included (cross layout: the row in order A, B)
    ids_b: np.ndarray | None  # side B (cross layout: the row with the answers exchanged, B then A)
    label: int  # -1 when unknown (test rows)
    index: int  # position of the record in its input, to restore order after length sorting
    stats_a: np.ndarray | None = None  # float32 STATS_FEATURES of side A (normalised by the datamodule)
    stats_b: np.ndarray | None = None
    padding: bool = False  # a copy filling an evaluation batch under DDP: scored, never counted
    # training only (set by the datamodule, see losses.py): may the row's source say "tie", its loss
    # weight, and its target probabilities (K,) float32 when a teacher is used (None: the hard label)
    ties: bool = True
    weight: float = 1.0
    target: np.ndarray | None = None
    # training only: the row's source, 0 the training file, i + 1 the i-th data.sources[] entry (the output
    # layer it trains with model.source_heads=true; validation and prediction rows are all source 0)
    source: int = 0

    def __len__(self) -> int:
        return len(self.ids_a) if self.ids_b is None else max(len(self.ids_a), len(self.ids_b))


def head_tail(ids: Sequence[int], budget: int, head_fraction: float = 0.5) -> list[int]:
    """Keep the first and last tokens of `ids` within `budget` tokens."""
    if budget <= 0:
        return []
    if len(ids) <= budget:
        return list(ids)
    head = int(np.ceil(budget * head_fraction))
    tail = budget - head
    return list(ids[:head]) + (list(ids[len(ids) - tail:]) if tail else [])


def fit_turns(turns: Sequence[Sequence[int]], budget: int, sep_id: int, head_fraction: float = 0.5) -> list[int]:
    """Join turns with `sep_id` in at most `budget` tokens, latest turns first."""
    kept: list[list[int]] = []
    remaining = budget
    for turn in reversed(turns):
        cost_sep = 1 if kept else 0
        room = remaining - cost_sep
        if room <= 0:
            break
        piece = head_tail(turn, room, head_fraction)
        kept.append(piece)
        remaining -= len(piece) + cost_sep
        if len(piece) < len(turn):
            break
    out: list[int] = []
    for i, piece in enumerate(reversed(kept)):
        if i:
            out.append(sep_id)
        out.extend(piece)
    return out


def segment_length(turns: Sequence[Sequence[int]]) -> int:
    return sum(len(t) for t in turns) + max(len(turns) - 1, 0)


def split_budget(prompt_len: int, response_len: int, budget: int, prompt_fraction: float) -> tuple[int, int]:
    """Tokens for (prompt, response): the prompt gets at most `prompt_fraction` of the budget (at least
    one token) unless the response leaves room; the response gets the rest."""
    if prompt_len + response_len <= budget:
        return prompt_len, response_len
    prompt_cap = max(1, int(budget * prompt_fraction))
    prompt_alloc = min(prompt_len, prompt_cap)
    response_alloc = min(response_len, budget - prompt_alloc)
    prompt_alloc = min(prompt_len, budget - response_alloc)  # unused response room goes back
    return prompt_alloc, response_alloc


class PairEncoder:
    """Tokenize records into `EncodedPair`s with a fast tokenizer, in batches, as `spec` (the
    `EncodingSpec`; default: its defaults) says.

    `layout="siamese"` (default): one `[CLS] prompt [SEP] response [SEP]` sequence per side.
    `layout="cross"`: one `[CLS] prompt [SEP] A [SEP] B [SEP]` sequence per row (`template="verdict"`:
    `[CLS] # Prompt ... # Response A ... # Response B ... # Which response is better ...? [SEP]`, see
    `VERDICT_MARKERS`), with the same budgeted truncation (prompt share, then A and B halves), or, with
    `naive_truncation=True`, simply the first `max_length` tokens as the public notebooks did,
    which can cut answer B away entirely. `ids_b` holds the same row with A and B exchanged.
    Where a turn is cut, `head_fraction` says which end survives (1: its start, as right truncation;
    0: its end, as left truncation); the latest turns are kept first. `truncation_side=left` / `right`
    replace that budget by one cut of the whole text between the first token and the closing tokens (the
    verdict question and the last separator stay): left keeps its end (the latest turns and answer B),
    right its start.
    """

    def __init__(self, tokenizer, spec: EncodingSpec | None = None, batch_size: int = 2048) -> None:
        self.spec = spec or EncodingSpec()
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # texts per tokenizer call
        # decoder LLM tokenizers: bos / eos mark the segments (eos also starts a row when there is no bos, Qwen2)
        self.cls_id = _special_id(tokenizer, "cls_token_id", "bos_token_id", "eos_token_id")
        self.sep_id = _special_id(tokenizer, "sep_token_id", "eos_token_id")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # the spec's statistics, by name, from every statistic computed (older checkpoints name fewer)
        self.stats_columns = [STATS_FEATURES.index(name) for name in self.spec.stats_features]
        self.markers: dict[str, list[int]] | None = None
        if self.spec.layout == "cross" and self.spec.template == "verdict":
            self.markers = {k: list(tokenizer(v, add_special_tokens=False)["input_ids"])
                            for k, v in VERDICT_MARKERS.items()}
            fixed = 2 + sum(len(m) for m in self.markers.values())
            if self.max_length < fixed + 8:
                raise UserError(f"data.max_length={self.max_length} leaves no room for text with data.template=verdict "
                                f"(its markers take {fixed} tokens); use at least {fixed + 8}")

    @property
    def max_length(self) -> int:
        return self.spec.max_length

    def _clip_chars(self, text: str) -> str:
        # very long turns (100k characters occur) would be tokenized only to be cut: keep head and tail
        cap = self.max_length * CHARS_PER_TOKEN_CAP
        if len(text) <= 2 * cap:
            return text
        return text[:cap] + " " + text[-cap:]

    def tokenize_turns(self, texts: list[str]) -> list[list[int]]:
        out: list[list[int]] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [self._clip_chars(t) for t in texts[start:start + self.batch_size]]
            # verbose=False: turns are tokenized whole and truncated here, so "sequence length is longer
            # than the specified maximum" would be a false alarm. split_special_tokens: user text that spells a
            # control token ("</s>", "[SEP]", a chat marker) is tokenized as text, never as the token itself
            out.extend(self.tokenizer(chunk, add_special_tokens=False, verbose=False,
                                      split_special_tokens=SPLIT_SPECIAL_TOKENS)["input_ids"])
        return out

    def cut(self, head: Sequence[int], body: Sequence[int], tail: Sequence[int]) -> np.ndarray:
        """`truncation_side` left or right: `head` + `body` + `tail` in `max_length` tokens, the body keeping
        its last (left) or first (right) tokens; the first token and the closing tokens always stay."""
        room = max(0, self.max_length - len(head) - len(tail))
        if len(body) > room:
            body = body[len(body) - room:] if self.spec.truncation_side == "left" else body[:room]
        return np.asarray([*head, *body, *tail], dtype=np.int32)

    def build_side(self, prompt: Sequence[Sequence[int]], response: Sequence[Sequence[int]]) -> np.ndarray:
        if self.spec.truncation_side != "budgeted":
            whole = [*fit_turns(prompt, segment_length(prompt), self.sep_id), self.sep_id,
                     *fit_turns(response, segment_length(response), self.sep_id)]
            return self.cut([self.cls_id], whole, [self.sep_id])
        budget = self.max_length - 3
        p_alloc, r_alloc = split_budget(segment_length(prompt), segment_length(response), budget,
                                        self.spec.prompt_fraction)
        p_ids = fit_turns(prompt, p_alloc, self.sep_id, self.spec.head_fraction)
        r_ids = fit_turns(response, r_alloc, self.sep_id, self.spec.head_fraction)
        return np.asarray([self.cls_id, *p_ids, self.sep_id, *r_ids, self.sep_id], dtype=np.int32)

    def build_cross(self, prompt: Sequence[Sequence[int]], a: Sequence[Sequence[int]],
                    b: Sequence[Sequence[int]]) -> np.ndarray:
        """One cross row: the prompt, then answer `a` shown first and `b` second."""
        # what precedes the prompt, a and b and follows b (plain: [CLS] prompt [SEP] a [SEP] b [SEP])
        m = self.markers or {"prompt": [], "a": [self.sep_id], "b": [self.sep_id], "verdict": []}
        segments = (prompt, a, b)
        if self.spec.truncation_side != "budgeted":
            whole = [*m["prompt"]]
            for segment, marker in zip(segments, (m["a"], m["b"], [])):
                whole += fit_turns(segment, segment_length(segment), self.sep_id) + marker
            return self.cut([self.cls_id], whole, [*m["verdict"], self.sep_id])
        if self.spec.naive_truncation:
            joined = [self.cls_id, *m["prompt"]]
            for segment, marker in zip(segments, (m["a"], m["b"], m["verdict"])):
                joined += fit_turns(segment, segment_length(segment), self.sep_id) + marker
            return np.asarray((joined + [self.sep_id])[: self.max_length], dtype=np.int32)
        budget = self.max_length - 2 - sum(len(v) for v in m.values())
        p_alloc, answers = split_budget(segment_length(prompt), segment_length(a) + segment_length(b), budget,
                                        self.spec.prompt_fraction)
        a_alloc, b_alloc = split_budget(segment_length(a), segment_length(b), answers, 0.5)
        p_alloc = min(segment_length(prompt), budget - a_alloc - b_alloc)
        parts = [fit_turns(seg, n, self.sep_id, self.spec.head_fraction) for seg, n in
                 zip(segments, (p_alloc, a_alloc, b_alloc))]
        return np.asarray([self.cls_id, *m["prompt"], *parts[0], *m["a"], *parts[1], *m["b"], *parts[2],
                           *m["verdict"], self.sep_id], dtype=np.int32)

    def encode(self, records: Sequence[PairRecord]) -> list[EncodedPair]:
        # flatten every turn of every record into one batched tokenizer call
        texts: list[str] = []
        spans: list[tuple[tuple[int, int], ...]] = []
        for record in records:
            row_spans = []
            for turns in (record.prompt, record.response_a, record.response_b):
                row_spans.append((len(texts), len(texts) + len(turns)))
                texts.extend(turns)
            spans.append(tuple(row_spans))
        ids = self.tokenize_turns(texts)
        pairs = []
        for index, (record, ((p0, p1), (a0, a1), (b0, b1))) in enumerate(zip(records, spans)):
            prompt = ids[p0:p1]
            prompt_stats = side_stats(record.prompt)
            prompt_part = [prompt_stats[0], len(record.prompt), np.log1p(segment_length(prompt))]
            overlap, identical = answer_overlap(record.response_a, record.response_b)
            if self.spec.layout == "cross":
                # both orders: swap augmentation and TTA need the exchanged row (a different sequence)
                a, b = ids[a0:a1], ids[b0:b1]
                ids_a, ids_b = self.build_cross(prompt, a, b), self.build_cross(prompt, b, a)
            else:
                ids_a, ids_b = self.build_side(prompt, ids[a0:a1]), self.build_side(prompt, ids[b0:b1])
            pairs.append(EncodedPair(
                ids_a=ids_a,
                ids_b=ids_b,
                label=-1 if record.label is None else int(record.label),
                index=index,
                stats_a=side_features(record.response_a, segment_length(ids[a0:a1]), prompt_part, overlap,
                                      identical)[self.stats_columns],
                stats_b=side_features(record.response_b, segment_length(ids[b0:b1]), prompt_part, overlap,
                                      identical)[self.stats_columns],
            ))
        return pairs


def side_features(response: Sequence[str], n_tokens: int, prompt_part: Sequence[float], overlap: float,
                  identical: float) -> np.ndarray:
    """All STATS_FEATURES of one side (raw, before normalisation): its text statistics, its tokens, the
    prompt's characters, turns and tokens, its refusal flag, then the answers' overlap and identity."""
    return np.concatenate([side_stats(response), [np.log1p(n_tokens)], prompt_part,
                           [refusal(response), overlap, identical]]).astype(np.float32)


def _special_id(tokenizer, *names: str) -> int:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has none of {', '.join(names)}")
