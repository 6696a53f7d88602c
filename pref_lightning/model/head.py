"""Pooled side vectors -> 3 logits (A wins, B wins, tie), or 2 (A wins, B wins) in binary tasks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pref_lightning.core.errors import UserError

COMBINATIONS = ("a", "b", "diff", "prod", "absdiff")
# model.symmetric_head: false (an MLP over the combination), true (equivariant MLPs), davidson (per-side score)
SYMMETRIC_FORMS = (False, True, "davidson")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, hidden) states of each row's last non-padding token (the position of the last 1 in `mask`),
    exact for right and left padding alike: what a causal decoder has read the whole sequence at.
    `hidden` (batch, length, hidden), `mask` (batch, length); a row without tokens gives position 0."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask.bool(), positions, 0).amax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


POOLINGS = ("mean", "cls", "mean_cls", "last", "last_mean")


def pool(hidden: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """(batch, hidden) vectors (twice as wide for `mean_cls`, `last_mean`) of `hidden` (batch, length,
    hidden) under `mask` (batch, length). `cls` suits encoders; `last` suits causal decoder LLMs, whose
    first token has seen nothing. Raises UserError for an unknown `method`."""
    if method == "mean":
        return mean_pool(hidden, mask)
    if method == "cls":
        return hidden[:, 0]
    if method == "mean_cls":
        return torch.cat([mean_pool(hidden, mask), hidden[:, 0]], dim=-1)
    if method == "last":
        return last_token_pool(hidden, mask)
    if method == "last_mean":
        return torch.cat([last_token_pool(hidden, mask), mean_pool(hidden, mask)], dim=-1)
    raise UserError(f"model.pooling={method!r}; choose from {', '.join(POOLINGS)}")


def pool_packed(hidden: torch.Tensor, lengths: torch.Tensor, method: str) -> torch.Tensor:
    """`pool` of sequences packed end to end: `hidden` (T, hidden) holds n sequences of `lengths` (n,)
    tokens each (sum T), the packed (padding-free) layout; (n, pooled) vectors equal to `pool` of the same
    sequences right-padded. Raises UserError for an unknown `method`."""
    ends = torch.cumsum(lengths, 0)
    starts = ends - lengths

    def mean() -> torch.Tensor:
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
        sums = torch.zeros(len(lengths), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        return sums.index_add_(0, rows, hidden) / lengths.clamp(min=1).unsqueeze(1).to(hidden.dtype)

    def last() -> torch.Tensor:
        return hidden[(ends - 1).clamp(min=0)]

    parts = {"mean": [mean], "cls": [lambda: hidden[starts]], "mean_cls": [mean, lambda: hidden[starts]],
             "last": [last], "last_mean": [last, mean]}
    if method not in parts:
        raise UserError(f"model.pooling={method!r}; choose from {', '.join(POOLINGS)}")
    return torch.cat([part() for part in parts[method]], dim=-1)


def pooled_size(hidden_size: int, method: str) -> int:
    return 2 * hidden_size if method in ("mean_cls", "last_mean") else hidden_size


def mlp(in_size: int, hidden: int, out_size: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_size, hidden), nn.GELU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, out_size))
    return nn.Sequential(*layers)


def output_layers(head: nn.Module) -> list[nn.Linear]:
    """The last Linear of each of the head's MLPs and every extra source's output layer (model.source_heads):
    what the anchored head starts at zero."""
    layers = [m[-1] for m in head.modules() if isinstance(m, nn.Sequential) and isinstance(m[-1], nn.Linear)]
    extra = getattr(head, "source_outputs", None)
    if extra is not None:
        layers += [layer for outputs in extra.values() for layer in outputs]
    return layers


def build_source_outputs(mlps: Mapping[str, nn.Sequential], n_sources: int) -> nn.ModuleDict | None:
    """`model.source_heads`: for each MLP of a head (by its attribute name), one more output layer per extra
    training source (sources 1 .. n_sources - 1), shaped as the MLP's own last Linear, which stays source 0's
    (the training file's: the head validation, prediction and checkpoints use, under its old name). None for
    a single source: the head is exactly the one-head model."""
    if n_sources <= 1:
        return None
    return nn.ModuleDict({name: nn.ModuleList(nn.Linear(m[-1].in_features, m[-1].out_features)
                                               for _ in range(n_sources - 1)) for name, m in mlps.items()})


def routed(mlp_: nn.Sequential, extra: nn.ModuleList | None, x: torch.Tensor,
           source: torch.Tensor | None) -> torch.Tensor:
    """`mlp_(x)` (n, out) with each row's output layer chosen by its `source` (n,) long: 0 the MLP's own
    last Linear, s > 0 `extra[s - 1]`, all over the shared trunk `mlp_[:-1]`. A row's loss reaches only its
    own source's output layer (the others get zero gradient from it). `source` None or no `extra`: `mlp_(x)`."""
    if extra is None or source is None:
        return mlp_(x)
    trunk = mlp_[:-1](x)
    outs = torch.stack([mlp_[-1](trunk), *(layer(trunk) for layer in extra)], 1)  # (n, n_sources, out)
    index = source.to(device=x.device, dtype=torch.long).view(-1, 1, 1).expand(-1, 1, outs.shape[-1])
    return outs.gather(1, index).squeeze(1)


class PairHead(nn.Module):
    """Two side vectors (pooled encoder output, optionally with per-side text statistics) -> 3 logits.

    `symmetric=False`: an MLP over the combination `combine` ([a, b, a-b, a*b] by default).
    `symmetric=True`: position-equivariant by construction. One MLP scores "this side wins" from
    (self, other, self-other, self*other), applied as f(a, b) and f(b, a); another scores the tie from
    the order-free (a+b, |a-b|, a*b). Swapping A and B swaps the two win logits exactly and leaves the
    tie logit unchanged (with `n_classes=2`, tie-less data: the two win logits alone). `symmetric="davidson"`:
    equivariant too, and each side's win logit is a score of that side alone, a Bradley-Terry reward with
    Davidson's (1970) tie class: one MLP scores each side, s_a = g(a), s_b = g(b), d = s_a - s_b, and the logits
    are [d / 2, -d / 2, t(a, b) - kappa * |d|], with t the order-free tie MLP above and kappa >= 0 learned (ties
    less likely the more the scores differ; Davidson's model is kappa = 0). Every row then teaches the one
    per-side score, whichever side it is on. Freshly initialised, so it gets its own (higher) learning rate.

    `n_sources` > 1 (`model.source_heads`): each MLP's last Linear is source 0's and every extra training
    source has its own output layer beside it (`source_outputs`, `routed`); `forward(..., source=None)` is
    source 0's head. Symmetric: per source, its own win and tie output layers, so it stays equivariant.
    """

    def __init__(self, in_size: int, combine: Sequence[str] = ("a", "b", "diff", "prod"), hidden: int = 256,
                 dropout: float = 0.0, n_classes: int = 3, stats_size: int = 0, symmetric: bool | str = False,
                 n_sources: int = 1) -> None:
        super().__init__()
        unknown = [c for c in combine if c not in COMBINATIONS]
        if unknown or not combine:
            raise UserError(f"model.combine={list(combine)}; choose from {', '.join(COMBINATIONS)}")
        if symmetric not in SYMMETRIC_FORMS:
            raise UserError(f"model.symmetric_head={symmetric!r}; choose false, true or davidson")
        if symmetric and n_classes not in (2, 3):
            raise UserError(f"the symmetric head predicts A wins, B wins (and tie); {n_classes} classes given")
        self.combine = tuple(combine)
        self.symmetric = symmetric
        self.davidson = symmetric == "davidson"
        self.stats_size = stats_size
        self.norm = nn.LayerNorm(in_size)  # keeps the head's input scale fixed whatever the backbone
        side = in_size + stats_size
        if self.davidson:
            self.score = mlp(side, hidden, 1, dropout)
            self.tie = mlp(3 * side, hidden, 1, dropout) if n_classes == 3 else None
            # kappa = softplus(raw), 0.5 at the start (the synthetic oracle's is 0.6)
            self.tie_kappa = nn.Parameter(torch.tensor(math.log(math.expm1(0.5)))) if n_classes == 3 else None
            self.source_outputs = build_source_outputs(
                {"score": self.score, **({"tie": self.tie} if self.tie is not None else {})}, n_sources)
        elif symmetric:
            self.win = mlp(4 * side, hidden, 1, dropout)
            # tie-less (binary) data: the two win logits alone, still exactly swapped with the sides
            self.tie = mlp(3 * side, hidden, 1, dropout) if n_classes == 3 else None
            self.source_outputs = build_source_outputs(
                {"win": self.win, **({"tie": self.tie} if self.tie is not None else {})}, n_sources)
        else:
            self.mlp = mlp(side * len(self.combine), hidden, n_classes, dropout)
            self.source_outputs = build_source_outputs({"mlp": self.mlp}, n_sources)

    def _run(self, name: str, x: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        extra = None if self.source_outputs is None else self.source_outputs[name]
        return routed(getattr(self, name), extra, x, source)

    def features(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        parts = {"a": lambda: a, "b": lambda: b, "diff": lambda: a - b, "prod": lambda: a * b,
                 "absdiff": lambda: (a - b).abs()}
        return torch.cat([parts[c]() for c in self.combine], dim=-1)

    def forward(self, a: torch.Tensor, b: torch.Tensor, stats_a: torch.Tensor | None = None,
                stats_b: torch.Tensor | None = None, source: torch.Tensor | None = None) -> torch.Tensor:
        """(n, K) logits of sides `a`, `b` (n, in_size) and statistics (n, stats_size); `source` (n,) long picks
        each row's output layer (None: source 0's, the training file's)."""
        a, b = self.norm(a), self.norm(b)
        if self.stats_size:
            if stats_a is None or stats_b is None:
                raise ValueError("this head was built with text statistics; the batch has none")
            a, b = torch.cat([a, stats_a.to(a.dtype)], -1), torch.cat([b, stats_b.to(b.dtype)], -1)
        if not self.symmetric:
            return self._run("mlp", self.features(a, b), source)
        if self.davidson:
            d = self._run("score", a, source) - self._run("score", b, source)  # (n, 1)
            if self.tie is None:
                return torch.cat([d / 2, -d / 2], -1)
            return torch.cat([d / 2, -d / 2, self._tie(a, b, source) - F.softplus(self.tie_kappa) * d.abs()], -1)
        win_a = self._run("win", torch.cat([a, b, a - b, a * b], -1), source)
        win_b = self._run("win", torch.cat([b, a, b - a, a * b], -1), source)
        if self.tie is None:
            return torch.cat([win_a, win_b], -1)
        return torch.cat([win_a, win_b, self._tie(a, b, source)], -1)

    def _tie(self, a: torch.Tensor, b: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        """(n, 1) tie logit of the symmetric forms, from the order-free (a + b, |a - b|, a * b)."""
        return self._run("tie", torch.cat([a + b, (a - b).abs(), a * b], -1), source)


class CrossHead(nn.Module):
    """Cross-encoder layout: one pooled vector per row (prompt, A and B read together) -> 3 logits,
    with the two sides' text statistics (and their difference) beside it when enabled; `n_sources` > 1: one
    output layer per training source, as in `PairHead`."""

    def __init__(self, in_size: int, hidden: int = 256, dropout: float = 0.0, stats_size: int = 0,
                 n_classes: int = 3, n_sources: int = 1) -> None:
        super().__init__()
        self.stats_size = stats_size
        self.norm = nn.LayerNorm(in_size)
        self.mlp = mlp(in_size + 3 * stats_size, hidden, n_classes, dropout)
        self.source_outputs = build_source_outputs({"mlp": self.mlp}, n_sources)

    def forward(self, pooled: torch.Tensor, stats_a: torch.Tensor | None = None,
                stats_b: torch.Tensor | None = None, source: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(pooled)
        if self.stats_size:
            if stats_a is None or stats_b is None:
                raise ValueError("this head was built with text statistics; the batch has none")
            x = torch.cat([x, stats_a.to(x.dtype), stats_b.to(x.dtype), (stats_a - stats_b).to(x.dtype)], -1)
        return routed(self.mlp, None if self.source_outputs is None else self.source_outputs["mlp"], x, source)


HEADS = ("mlp", "verdict_tokens")
VERDICT_TOKENS = (" A", " B", " tie")  # what follows the verdict template's question, one class each


def verdict_token_ids(tokenizer, tokens: Sequence[str], n_classes: int) -> list[int]:
    """The token id of each of `tokens` (`model.verdict_tokens`: A wins, B wins[, tie]). Raises UserError,
    naming the setting, unless there are `n_classes` of them, each one token of `tokenizer`, all distinct."""
    tokens = list(tokens or [])
    if len(tokens) != n_classes:
        raise UserError(f"model.verdict_tokens={tokens}: data.n_classes={n_classes} needs {n_classes} tokens "
                        f"(A wins, B wins{', tie' if n_classes == 3 else ''})")
    ids = []
    for token in tokens:
        if not isinstance(token, str) or not token:
            raise UserError(f"model.verdict_tokens: {token!r} is not a non-empty string")
        pieces = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise UserError(f"model.verdict_tokens: {token!r} is {len(pieces)} tokens of this tokenizer "
                            f"({tokenizer.convert_ids_to_tokens(pieces)}); each verdict must be a single token")
        ids.append(int(pieces[0]))
    if len(set(ids)) != len(ids):
        raise UserError(f"model.verdict_tokens={tokens}: two of them are the same token; each class needs its own")
    return ids


def check_head(head: str, layout: str, template: str, pooling: str, backbone: str, anchor_head: bool = False) -> None:
    """Raise UserError (one line naming the setting) for a `model.head` this model cannot have."""
    if head not in HEADS:
        raise UserError(f"model.head={head!r}; choose from {', '.join(HEADS)}")
    if head != "verdict_tokens":
        return
    if layout != "cross" or template != "verdict":
        raise UserError("model.head=verdict_tokens reads the answer to the verdict question: it needs data.layout=cross "
                        "data.template=verdict (experiment=llm_lora sets both)")
    if pooling != "last":
        raise UserError(f"model.head=verdict_tokens reads the last real token; model.pooling={pooling!r} must be last")
    if backbone == "tiny":
        raise UserError("model.head=verdict_tokens needs a decoder LLM with its LM head: model.backbone=/path/to/model")
    if anchor_head:
        raise UserError("model.anchor_head=true starts a head's output layer at zero; model.head=verdict_tokens has "
                        "none (the LM head is pretrained): use one or the other")


class VerdictHead(nn.Module):
    """Cross layout, decoder LLM: the class logits are the language model's own logits of the verdict tokens
    (`token_ids`, e.g. " A", " B", " tie") at each row's last real token, read through the backbone's LM head
    (`read`): no new randomly initialised layer, so step 0 is what the LM already says. With text statistics,
    a linear offset on (stats_a, stats_b, stats_a - stats_b) is added, starting at zero."""

    def __init__(self, token_ids: Sequence[int], stats_size: int = 0, n_classes: int = 3) -> None:
        super().__init__()
        if len(token_ids) != n_classes:
            raise ValueError(f"{len(token_ids)} verdict tokens for {n_classes} classes")
        self.register_buffer("token_ids", torch.tensor(list(token_ids), dtype=torch.long))
        self.stats_size = stats_size
        self.stats: nn.Linear | None = None
        if stats_size:
            self.stats = nn.Linear(3 * stats_size, n_classes)
            nn.init.zeros_(self.stats.weight)
            nn.init.zeros_(self.stats.bias)

    def read(self, last_hidden: torch.Tensor, lm_head: nn.Module, softcap: float | None = None) -> torch.Tensor:
        """(n, K) logits of the verdict tokens: `lm_head(last_hidden)` (n, vocab) at `token_ids`, soft-capped
        as the model caps its final logits (Gemma-2: cap * tanh(logits / cap)). The whole LM head runs, so a
        LoRA adapter on it (target_modules with lm_head) takes part."""
        logits = lm_head(last_hidden)[:, self.token_ids]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def forward(self, logits: torch.Tensor, stats_a: torch.Tensor | None = None,
                stats_b: torch.Tensor | None = None) -> torch.Tensor:
        if self.stats is None:
            return logits
        if stats_a is None or stats_b is None:
            raise ValueError("this head was built with text statistics; the batch has none")
        x = torch.cat([stats_a, stats_b, stats_a - stats_b], -1).to(logits.dtype)
        return logits + self.stats(x)


# ---- prompt-answer interaction (model.interaction) -------------------------------------------------
INTERACTIONS = ("none", "prompt_answer", "prompt_answer_embeddings")


def check_interaction(interaction: str, layout: str, head: str) -> None:
    """Raise UserError (one line naming the setting) for a `model.interaction` this model cannot have."""
    if interaction not in INTERACTIONS:
        raise UserError(f"model.interaction={interaction!r}; choose from {', '.join(INTERACTIONS)}")
    if interaction != "none" and (layout != "siamese" or head != "mlp"):
        raise UserError(f"model.interaction={interaction} compares each side's prompt and answer segments: it needs "
                        "data.layout=siamese and model.head=mlp")


def interaction_size(hidden_size: int, interaction: str) -> int:
    """Extra width the interaction adds to each side's pooled vector (0 for `none`)."""
    return 0 if interaction == "none" else hidden_size


def segment_masks(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, answer) masks (n, L) of siamese sides `[CLS] prompt [SEP] answer [SEP]` (`input_ids`, `mask`
    (n, L), padded on either side), special tokens excluded from both.

    The separator is read from each row itself (its last real token, which `PairEncoder` always makes the
    separator), so no tokenizer is needed and any backbone works. Turns inside a segment are joined by the
    same separator: with c separators strictly inside the row, the prompt ends at the ceil(c / 2)-th one,
    exact when the prompt and the answer kept the same number of turns (every single-turn row, and a
    multi-turn row that was not truncated); a row whose prompt lost early turns to truncation puts the
    boundary a turn or so late. A row with no inner separator has an empty prompt segment."""
    real = mask.bool()
    n, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device).expand(n, length)
    last = torch.where(real, positions, -1).amax(dim=1, keepdim=True)
    first = torch.where(real, positions, length).amin(dim=1, keepdim=True)
    sep = input_ids.gather(1, last.clamp(min=0))
    inner = real & (input_ids == sep) & (positions > first) & (positions < last)
    count = inner.sum(1, keepdim=True)
    rank = torch.cumsum(inner.long(), 1)  # separators seen so far, inclusive
    boundary_rank = (count + 1) // 2
    # position of the boundary separator: the first inner separator whose rank reaches boundary_rank
    is_boundary = inner & (rank == boundary_rank)
    boundary = torch.where(is_boundary, positions, length).amin(dim=1, keepdim=True)
    boundary = torch.where(count > 0, boundary, first)
    prompt = real & (positions > first) & (positions < boundary) & ~inner
    answer = real & (positions > boundary) & (positions < last) & ~inner
    return prompt, answer


def prompt_answer_interaction(hidden: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(n, hidden) feature of how alike each side's prompt and answer are: with p and r the mean hidden
    states (n, hidden) over the prompt and answer segments (`segment_masks`), both scaled to unit length,
    hidden * p * r elementwise, whose mean over the dimensions is their cosine similarity. A linear layer
    of the head over its A - B difference reads "which answer is closer to the prompt" directly (a
    learned bilinear match), which a pooled vector of the whole side (prompt and answer mixed) does not
    expose. `hidden` (n, L, hidden); an empty segment gives zeros."""
    prompt, answer = segment_masks(input_ids, mask)
    p = nn.functional.normalize(mean_pool(hidden, prompt).float(), dim=-1, eps=1e-6)
    r = nn.functional.normalize(mean_pool(hidden, answer).float(), dim=-1, eps=1e-6)
    return (hidden.shape[-1] * p * r).to(hidden.dtype)


RELEVANCE_TEMPERATURE = 0.1  # InfoNCE temperature of `relevance_loss` (cosines / 0.1: SimCSE-like sharpness)


def relevance_loss(states: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                   temperature: float = RELEVANCE_TEMPERATURE) -> torch.Tensor:
    """Label-free auxiliary loss (`model.relevance_weight`): each side's prompt should be closer to its own
    answer than to the other rows' answers. InfoNCE (van den Oord et al. 2018; in-batch negatives as in DPR,
    Karpukhin et al. 2020) over the mean-pooled prompt and answer segments (`segment_masks`) of the batch's
    siamese sides. The answer on the other side of the same row (the same prompt) is left out of the
    negatives. It shapes the states that `model.interaction` compares from every row, whatever its label,
    so "is this answer about the prompt" need not be learnt from the few rows where it decides the label.

    `states` (2B, L, hidden) of the sides, A rows then B rows (`input_ids`, `mask` (2B, L)) -> a scalar
    (nats); 0 when no side has both segments."""
    prompt, answer = segment_masks(input_ids, mask)
    p = nn.functional.normalize(mean_pool(states, prompt).float(), dim=-1, eps=1e-6)
    r = nn.functional.normalize(mean_pool(states, answer).float(), dim=-1, eps=1e-6)
    logits = p @ r.T / temperature  # (2B, 2B): side i's prompt against side j's answer
    n = logits.shape[0]
    index = torch.arange(n, device=logits.device)
    twin = (index + n // 2) % n  # the row's other side: the same prompt
    excluded = torch.zeros_like(logits, dtype=torch.bool)
    excluded[index, twin] = n > 1
    excluded |= ~answer.any(1).unsqueeze(0)  # an empty answer segment is no candidate
    logits = logits.masked_fill(excluded, float("-inf"))
    rows = prompt.any(1) & answer.any(1)
    if not rows.any():
        return logits.new_zeros(())
    return nn.functional.cross_entropy(logits[rows], index[rows])

