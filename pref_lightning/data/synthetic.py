"""Synthetic arena-format preference data whose labels come from known probabilities.

Each row is a prompt about one topic and two answers. Every answer gets a latent quality score from
things a reader can see in its text:

* length (longer is better, log-shaped and saturating),
* whether it talks about the prompt's topic or about another topic (same length/format distribution,
  so text statistics cannot tell; the first sentence is topic-dense so truncated answers still show it),
* refusals ("I'm sorry, but I can't help with that ...", followed by normal-length filler),
* markdown formatting (lists, headers, code blocks on technical topics),
* tone: confident vs hedging openers, closings and scattered cue words.

The two scores become P(A wins), P(B wins), P(tie) with a Davidson-style model (ties likely when the
answers are alike, very likely when they are identical), and the label is drawn from them. The frame
keeps those probabilities (``p_model_a``, ``p_model_b``, ``p_tie``) so the oracle log loss is known.
About 2% of rows have identical answers, and ~0.5% of answers are empty or contain a JSON ``null``
turn, as in the real dump. Everything is drawn from one numpy Generator, so a seed fixes the output.

CLI: ``python -m pref_lightning.data.synthetic --rows 10000 --seed 0 --out data/train.csv``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pref_lightning.core.atomic import atomic_path
from pref_lightning.core.metrics import log_loss, prior_log_loss, softmax
from pref_lightning.data import text_stats
from pref_lightning.data.records import parse_turns

__all__ = [
    "KAGGLE_COLUMNS",
    "CLASS_COLUMNS",
    "MODEL_NAMES",
    "PROB_COLUMNS",
    "TOPICS",
    "SyntheticData",
    "generate",
    "main",
    "prior_log_loss",
    "summary",
    "text_stats_log_loss",
    "write_csv",
]

KAGGLE_COLUMNS: tuple[str, ...] = (
    "id",
    "model_a",
    "model_b",
    "prompt",
    "response_a",
    "response_b",
    "winner_model_a",
    "winner_model_b",
    "winner_tie",
)
CLASS_COLUMNS: tuple[str, ...] = ("winner_model_a", "winner_model_b", "winner_tie")
PROB_COLUMNS: tuple[str, ...] = ("p_model_a", "p_model_b", "p_tie")

# --------------------------------------------------------------------------------------------------
# Word lists. Real English words so that pretrained tokenizers/embeddings see meaningful text.
# --------------------------------------------------------------------------------------------------

TOPICS: dict[str, str] = {
    "cooking": "recipe oven garlic onion simmer skillet butter flour seasoning saute broth marinade "
    "spatula boil roast knife chop vinegar pepper sauce pan stove herbs tomato braise grill "
    "dough olive salt kitchen",
    "gardening": "soil compost seedling prune mulch fertilizer tomato trellis weeds watering garden "
    "shovel bulbs perennial annual greenhouse sprout roots pots harvest rake hose pollinator "
    "aphids shade raised beds germinate hedge lawn",
    "astronomy": "telescope galaxy nebula orbit planet comet asteroid eclipse supernova constellation "
    "redshift quasar pulsar moon jupiter saturn stars lightyear cosmos meteor observatory "
    "gravity exoplanet solar lunar parallax magnitude spectrum universe equinox",
    "python": "python function variable list dictionary tuple import module class method loop "
    "iterator generator decorator exception pip virtualenv lambda string integer indentation "
    "syntax interpreter pandas numpy script argument return boolean comprehension traceback",
    "javascript": "javascript browser dom node npm promise async await callback closure react "
    "component state props webpack typescript console event listener json fetch frontend "
    "html css selector render bundle element prototype undefined",
    "databases": "database sql query table index join schema primary key foreign transaction "
    "postgres mysql select insert update delete normalization row column constraint "
    "migration replica shard cursor view trigger backup sqlite",
    "machine_learning": "model training dataset neural network gradient loss overfitting regularization "
    "epoch batch optimizer feature label classifier regression accuracy validation transformer "
    "embedding tensor layer dropout inference hyperparameter precision recall cluster "
    "pretrained",
    "personal_finance": "budget savings debt credit score mortgage interest loan emergency fund "
    "expenses income paycheck retirement pension taxes refund insurance bills frugal "
    "allowance checking account overdraft spending deposit rent installment",
    "investing": "stocks bonds portfolio dividend index fund shares broker equity valuation "
    "volatility diversification etf yield bull bear market earnings ticker options hedge "
    "capital asset allocation compounding inflation returns securities",
    "fitness": "workout exercise squat deadlift cardio stretching muscles treadmill dumbbell "
    "repetitions sets endurance strength gym warmup running cycling plank pushups "
    "lunges flexibility recovery trainer kettlebell sprint stamina posture core",
    "nutrition": "protein carbohydrates fiber vitamins minerals calories diet sugar sodium "
    "cholesterol vegetables fruit grains hydration metabolism snack breakfast portion "
    "omega iron calcium supplements nutrients legumes dairy fasting antioxidants",
    "medicine": "symptoms diagnosis doctor treatment prescription dosage infection fever "
    "antibiotic vaccine chronic clinic patient therapy blood pressure allergy inflammation "
    "immune surgery nurse pharmacy headache recovery hospital virus tablet",
    "travel": "passport itinerary flight hotel luggage visa airport destination backpacking "
    "sightseeing tourist booking hostel train museum beach souvenir currency map guide "
    "excursion resort cruise layover adventure journey boarding suitcase landmarks",
    "ancient_history": "empire rome caesar senate legion pharaoh pyramid papyrus athens sparta "
    "republic gladiator temple dynasty chronicle archaeology ruins conquest emperor "
    "aqueduct colosseum bronze mesopotamia scroll oracle tribute citadel amphitheater",
    "music_theory": "chord scale melody harmony rhythm tempo major minor interval octave "
    "key signature cadence tonic dominant triad arpeggio notation staff treble bass "
    "syncopation modulation measure beat timbre composer counterpoint",
    "film": "movie director cinematography screenplay actor actress scene plot sequel "
    "trailer editing soundtrack premiere studio camera frame genre thriller comedy "
    "documentary festival casting script producer montage dialogue blockbuster",
    "poetry": "poem stanza rhyme meter verse sonnet haiku metaphor imagery poet couplet "
    "alliteration ballad lyric quatrain iambic simile refrain anthology elegy ode "
    "symbolism tone narrator syllable free form rhythmic epic",
    "chemistry": "molecule atom electron bond reaction catalyst acid base solution compound "
    "element periodic oxidation reduction ion covalent polymer titration molar solvent "
    "isotope enzyme buffer precipitate laboratory beaker organic ionic equilibrium",
    "physics": "velocity acceleration momentum energy force friction quantum particle wave "
    "photon relativity entropy thermodynamics voltage current magnetism inertia mass "
    "frequency wavelength nucleus torque pendulum circuit kinetic potential vacuum",
    "genetics": "gene dna chromosome mutation allele protein genome heredity trait cell "
    "nucleotide sequencing rna inheritance dominant recessive evolution species "
    "genotype phenotype replication crispr mitosis meiosis offspring variation ancestry",
    "climate": "climate emissions carbon warming greenhouse glacier drought renewable solar wind "
    "temperature ocean pollution ecosystem deforestation methane sea level biodiversity "
    "sustainability recycling heatwave wildfire conservation footprint mitigation",
    "geology": "rock mineral volcano earthquake tectonic plate magma sediment fossil erosion "
    "granite basalt limestone crust mantle lava quartz canyon glacier strata faultline "
    "crystal geologist mountain bedrock seismic sandstone quarry",
    "marine_life": "ocean whale dolphin coral reef shark plankton tide jellyfish octopus kelp "
    "seagrass turtle current fisherman lagoon seabed krill salmon tuna seal estuary "
    "anemone starfish crab migration sonar aquarium shoal",
    "pets": "dog cat puppy kitten leash litter veterinarian grooming treats training bark "
    "collar breed adoption kennel fetch toy scratching fur paws vaccination shelter "
    "hamster parrot aquarium feeding walk obedience crate",
    "cars": "engine transmission brakes tires oil battery mileage fuel sedan suv hybrid "
    "electric horsepower clutch gearbox mechanic dashboard steering suspension exhaust "
    "radiator coolant headlights warranty dealership torque ignition alignment",
    "aviation": "airplane pilot cockpit runway takeoff landing altitude turbulence jet wing "
    "fuselage propeller airspeed navigation radar tower hangar aircraft glider helicopter "
    "autopilot throttle rudder aileron flaps cabin crosswind airline",
    "soccer": "goal striker midfielder defender goalkeeper penalty offside corner tackle "
    "dribble pass league tournament stadium referee coach formation kickoff header "
    "freekick transfer season fans jersey substitute volley winger",
    "basketball": "hoop dunk rebound dribble assist layup point guard center forward "
    "playoffs court foul freethrow buzzer timeout coach roster draft rookie three "
    "pointer defense offense arena jump shot crossover",
    "chess": "chess pawn knight bishop rook queen king checkmate castling opening endgame "
    "gambit tactics strategy fork pin sacrifice grandmaster tournament board move "
    "stalemate promotion defense sicilian rating blitz notation",
    "video_games": "game console controller level quest boss multiplayer character inventory "
    "graphics patch update server guild loot speedrun sandbox platformer shooter "
    "strategy rpg mod achievement save checkpoint respawn lobby",
    "photography": "camera lens aperture shutter exposure iso tripod portrait landscape "
    "lighting flash focus zoom sensor composition editing lightroom raw bokeh "
    "viewfinder megapixel filter contrast saturation framing photographer",
    "painting": "painting canvas brush acrylic watercolor oil palette pigment sketch easel "
    "portrait landscape gallery artist color texture stroke shading perspective "
    "abstract mural impressionism gouache varnish primer composition studio",
    "home_renovation": "renovation drywall plumbing tiles flooring contractor permit insulation "
    "paint hammer drill cabinet countertop roof window door wiring electrician "
    "carpenter lumber grout ceiling basement remodel bathroom sanding",
    "law": "contract lawyer court judge lawsuit statute plaintiff defendant liability "
    "clause agreement attorney jurisdiction evidence verdict appeal testimony settlement "
    "tenant landlord lease copyright trademark negligence damages legal",
    "psychology": "anxiety motivation memory behavior cognition emotion therapy stress habit "
    "personality perception attention learning conditioning bias resilience mindset "
    "trauma depression wellbeing empathy self esteem therapist mindfulness",
    "philosophy": "ethics morality existence consciousness logic reason virtue truth "
    "metaphysics epistemology plato aristotle kant socrates argument dilemma utilitarian "
    "free will knowledge belief justice meaning paradox stoicism",
    "education": "teacher student classroom homework curriculum school lesson exam grades "
    "tutoring reading writing learning university lecture syllabus assignment study "
    "parents kindergarten literacy quiz semester scholarship textbook",
    "linux": "linux terminal shell bash command directory permissions sudo kernel package "
    "apt grep sed awk chmod process cron ssh file path environment variable script "
    "systemd mount distro pipe",
    "cybersecurity": "password encryption firewall malware phishing vulnerability exploit "
    "authentication token certificate vpn hacker breach patch antivirus ransomware "
    "network router protocol port scan intrusion audit privacy credentials",
    "economics": "supply demand inflation gdp recession unemployment market price tariff "
    "trade currency monetary fiscal policy interest rates central bank growth productivity "
    "wages consumer producer equilibrium elasticity deficit",
    "mathematics": "equation algebra calculus derivative integral theorem proof matrix vector "
    "probability statistics geometry triangle angle polynomial function limit "
    "sequence series prime fraction variable graph logarithm",
}

# Technical topics where a code block is a plus (elsewhere it is neutral).
TECH_TOPICS: frozenset[str] = frozenset(
    {"python", "javascript", "databases", "machine_learning", "linux", "cybersecurity", "mathematics"}
)

_FUNCTION_WORDS = (
    "the a an of to and in is that for it with as on be this by can are or from you your will "
    "more also these which when about so if into than some most each other only then both very "
    "often because while should may not all their there its what how"
).split()
_CONTENT_WORDS = (
    "important approach result process example system method detail point step option value part "
    "way idea case factor issue question answer reason effect change level time area form type "
    "goal plan task tool rule basis context benefit risk cost quality structure pattern practice "
    "principle concept aspect element component resource solution problem difference balance range "
    "amount number version source term order key main simple common specific general useful "
    "practical careful different similar several many new good small large high low basic complex "
    "typical usually generally typically consider use make help provide include depend involve "
    "require allow improve reduce increase create develop choose check keep start follow explain "
    "describe understand ensure support apply compare focus build handle manage avoid remember note "
    "find show need work give take people things first second next final overall specific daily "
    "long short early later current standard personal simple effective efficient reliable extra "
    "matter purpose outcome situation condition experience evidence knowledge information decision "
    "opportunity challenge limit advantage feedback progress habit routine schedule budget priority "
    "framework guideline requirement assumption estimate measure signal trend average maximum minimum "
    "sequence stage phase cycle layer section chapter summary overview background reference detail "
    "common rare recent modern traditional popular natural obvious subtle direct indirect accurate "
    "flexible stable consistent significant minor major primary secondary optional essential "
    "quickly slowly easily carefully directly mostly rarely frequently recently gradually roughly "
    "adjust prepare review measure replace combine organize identify prevent protect reflect "
    "discover discuss suggest recommend respond connect contain deliver maintain observe operate "
    "store track update plan test learn share read write watch wait change grow"
).split()
# Numbers (years, counts, percentages) give the vocabulary digits, like real answers have.
_NUMBERS = (
    [str(i) for i in range(0, 101)]
    + [str(y) for y in range(1950, 2025)]
    + [f"{p}%" for p in range(5, 100, 5)]
)
_CONTENT_WORDS = list(dict.fromkeys(_CONTENT_WORDS))  # drop repeats, keep order (determinism)
# Function words twice, so filler has a natural-ish mix of glue and content.
_GENERIC = _FUNCTION_WORDS * 2 + _CONTENT_WORDS

_CONFIDENT_WORDS = "definitely clearly certainly precisely exactly reliably always guaranteed".split()
_HEDGE_WORDS = "maybe perhaps possibly might probably somewhat unsure apparently".split()

_CONFIDENT_OPENERS = (
    "Certainly! Here is a clear and complete answer.",
    "Great question. The short answer is simple.",
    "Absolutely, here is exactly how it works.",
    "Sure! Here is a precise, step by step explanation.",
    "Of course. This is well understood, so let me be direct.",
)
_HEDGE_OPENERS = (
    "I'm not entirely sure, but maybe this helps.",
    "I think, although I could be wrong, it might be like this.",
    "Hmm, it is hard to say, but possibly something like this.",
    "This is just a guess, and I may be mistaken.",
    "I'm not an expert, so perhaps take this with caution.",
)
_NEUTRAL_OPENERS = ("Here is some information.", "Let me explain.", "Here are a few thoughts.", "", "", "")
_CONFIDENT_CLOSINGS = (
    "In summary, this approach works reliably.",
    "Follow these points and you will get the right result.",
    "That is the complete picture.",
)
_HEDGE_CLOSINGS = (
    "But I might be wrong, so please double check.",
    "I'm not completely certain about all of this.",
    "Again, this is only my best guess.",
)
_NEUTRAL_CLOSINGS = ("I hope this helps.", "Let me know if you have other questions.", "", "", "")
_REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I'm sorry, but I cannot assist with this.",
    "As an AI language model, I am unable to provide that information.",
    "I apologize, but I can't comply with this request.",
    "Unfortunately, I'm not able to help with that.",
    "I'm afraid I can't provide assistance with that topic.",
)
# Non-refusal openers that share refusal words, so "sorry" alone is not the cue.
_SOFT_APOLOGIES = (
    "Sorry to hear you are dealing with this.",
    "Sorry for the confusion earlier.",
    "Unfortunately, there is no single answer, but here is an overview.",
)
_REFUSAL_FILLERS = (
    "If you have any other questions, feel free to ask.",
    "Please consult an appropriate professional or official resource instead.",
    "It is important to follow the relevant guidelines and policies.",
)
_PROMPT_STARTS = (
    "How do I",
    "Can you explain",
    "What is the best way to understand",
    "Write a short guide about",
    "Give me tips on",
    "Why does",
    "Tell me about",
    "Help me understand",
    "What are the main ideas of",
    "Compare",
    "Summarize",
    "I have a question about",
)
_FOLLOW_UPS = ("And what about", "Can you expand on", "Now explain", "Thanks. What about", "Go deeper into")
_CODE_LANGS = ("python", "python", "python", "")

MODEL_NAMES: tuple[str, ...] = (
    "gpt-sim-4",
    "claude-sim-3",
    "llama-sim-70b",
    "mistral-sim-7b",
    "gemma-sim-9b",
    "qwen-sim-72b",
    "vicuna-sim-13b",
    "falcon-sim-40b",
    "phi-sim-3",
    "yi-sim-34b",
)
# Per fake model: verbosity multiplier, P(refusal), P(off-topic), P(some formatting), P(confident), P(hedge).
# Model identity shifts the attribute mix but never enters the score directly.
_MODEL_PROFILES = np.array(
    [
        [1.35, 0.10, 0.05, 0.75, 0.48, 0.12],
        [1.25, 0.16, 0.05, 0.70, 0.42, 0.18],
        [1.10, 0.13, 0.10, 0.55, 0.36, 0.24],
        [0.85, 0.06, 0.18, 0.40, 0.30, 0.30],
        [0.95, 0.11, 0.14, 0.50, 0.30, 0.24],
        [1.15, 0.10, 0.08, 0.65, 0.42, 0.18],
        [0.75, 0.08, 0.22, 0.25, 0.18, 0.42],
        [0.70, 0.05, 0.25, 0.20, 0.18, 0.42],
        [0.80, 0.08, 0.18, 0.35, 0.24, 0.36],
        [1.00, 0.11, 0.12, 0.50, 0.36, 0.24],
    ]
)

# Score weights (answer quality, in logit units) and Davidson tie parameters.
_W_LEN = 1.7  # times tanh(log(chars / _LEN_REF) / _LEN_SCALE)
_LEN_REF = 350.0
_LEN_SCALE = 1.3
_W_OFF_TOPIC = -3.0
_W_REFUSAL = -3.2
_W_FORMAT = (0.0, 0.5, 0.7, 0.9)  # plain, list, headers, code (code only counts on TECH_TOPICS)
_W_TONE = 1.3  # times +1 (confident) / -1 (hedging)
_W_EMPTY = -5.0  # empty or null answer replaces all other terms
_LOG_NU = 1.2  # tie propensity at equal quality
_TIE_KAPPA = 0.6  # extra tie penalty per unit |score difference|
_TIE_IDENTICAL = 1.2  # identical answers: much more tie mass
_TIE_BOTH_BAD = 0.5  # both refuse / off-topic / empty: "tie (both bad)"

# Text-shape constants.
_CHARS_PER_WORD = 6.9  # average incl. the space, measured on the generated filler
_FORMATS = ("plain", "list", "headers", "code")


# --------------------------------------------------------------------------------------------------
# Vocabulary table: one flat array of tokens (each with a ","-suffixed twin) addressed by offsets.
# --------------------------------------------------------------------------------------------------

_TOPIC_NAMES: tuple[str, ...] = tuple(TOPICS)
_TOPIC_WORDS: tuple[tuple[str, ...], ...] = tuple(tuple(TOPICS[t].split()) for t in _TOPIC_NAMES)
_TOPIC_SIZE = np.array([len(w) for w in _TOPIC_WORDS])
_IS_TECH = np.array([t in TECH_TOPICS for t in _TOPIC_NAMES])

_VOCAB: list[str] = list(_GENERIC) + _CONFIDENT_WORDS + _HEDGE_WORDS + _NUMBERS
_OFF_GENERIC = 0
_OFF_CONF = len(_GENERIC)
_OFF_HEDGE = _OFF_CONF + len(_CONFIDENT_WORDS)
_OFF_NUMBER = _OFF_HEDGE + len(_HEDGE_WORDS)
_TOPIC_OFFSET = np.zeros(len(_TOPIC_NAMES), dtype=np.int64)
for _i, _words in enumerate(_TOPIC_WORDS):
    _TOPIC_OFFSET[_i] = len(_VOCAB)
    _VOCAB.extend(_words)
_N_VOCAB = len(_VOCAB)
_TOKENS = np.array(_VOCAB + [w + "," for w in _VOCAB], dtype=object)


@dataclass(frozen=True)
class _Answer:
    """Latent attributes of one answer (shared by all of its turns)."""

    topic: int  # topic the answer talks about (== prompt topic unless off-topic)
    refusal: bool
    tone: int  # +1 confident, 0 neutral, -1 hedging
    fmt: int  # index into _FORMATS
    chars: float  # target total characters
    kind: str  # "text", "empty" or "null"


def _word_stream(rng: np.random.Generator, n: int, topic: int, tone: int, p_topic: float) -> list[str]:
    """n filler words: topic words with prob p_topic (denser in the first sentence), tone cues, glue."""
    n = max(n, 1)
    u = rng.random(n)
    p = np.full(n, p_topic)
    p[:12] = 0.55  # topic-dense opening sentence, so truncated answers still reveal the topic
    is_topic = u < p
    is_tone = (~is_topic) & (u < p + 0.035) & (tone != 0)
    r = rng.random(n)
    ids = _OFF_GENERIC + (r * len(_GENERIC)).astype(np.int64)
    topic_ids = _TOPIC_OFFSET[topic] + (r * _TOPIC_SIZE[topic]).astype(np.int64)
    ids = np.where(is_topic, topic_ids, ids)
    if tone != 0:
        base, size = (_OFF_CONF, len(_CONFIDENT_WORDS)) if tone > 0 else (_OFF_HEDGE, len(_HEDGE_WORDS))
        ids = np.where(is_tone, base + (r * size).astype(np.int64), ids)
    v = rng.random(n)
    ids = np.where(v < 0.015, _OFF_NUMBER + (r * len(_NUMBERS)).astype(np.int64), ids)
    ids = ids + _N_VOCAB * ((v > 0.015) & (v < 0.075))  # occasional commas
    return _TOKENS[ids].tolist()


def _sentences(rng: np.random.Generator, words: list[str]) -> list[str]:
    """Cut a word list into capitalised sentences of 6-21 words ending with '.' (or '?' / '!')."""
    lengths = rng.integers(6, 22, size=len(words) // 6 + 2)
    ends = rng.random(lengths.size)
    out = []
    pos = 0
    for length, end in zip(lengths.tolist(), ends.tolist(), strict=True):
        if pos >= len(words):
            break
        chunk = words[pos : pos + length]
        pos += length
        text = " ".join(chunk).rstrip(",")
        out.append(text[:1].upper() + text[1:] + ("?" if end < 0.03 else "!" if end < 0.05 else "."))
    return out


def _title(rng: np.random.Generator, topic: int) -> str:
    words = _TOPIC_WORDS[topic]
    picks = rng.integers(0, len(words), size=int(rng.integers(1, 4)))
    return " ".join(words[i] for i in picks.tolist()).title()


def _code_block(rng: np.random.Generator, topic: int) -> str:
    """A fenced block of 1-3 small functions named after topic words."""
    words = _TOPIC_WORDS[topic]
    lang = _CODE_LANGS[int(rng.integers(len(_CODE_LANGS)))]
    lines = []
    for a, b, c, d in rng.integers(0, len(words), size=(int(rng.integers(1, 4)), 4)).tolist():
        lines += [
            f"def {words[a]}_{words[b]}({words[c]}):",
            f"    # {words[d]} the {words[c]} before the {words[b]}",
            f"    {words[d]} = {words[b]}({words[c]}, {a % 7})",
            f"    return {words[d]}.{words[a]}()",
        ]
    return f"```{lang}\n" + "\n".join(lines) + "\n```"


def _layout(rng: np.random.Generator, sentences: list[str], fmt: int, topic: int) -> str:
    """Arrange sentences as plain paragraphs, a bullet/numbered list, headed sections or code + prose."""
    blocks: list[str] = []
    i = 0
    n = len(sentences)

    def paragraph(k: int) -> None:
        nonlocal i
        if i < n:
            blocks.append(" ".join(sentences[i : i + k]))
            i += k

    def bullet_list(k: int) -> None:
        nonlocal i
        numbered = rng.random() < 0.4
        items = []
        for j, s in enumerate(sentences[i : i + k]):
            bold = f"**{_title(rng, topic)}**: " if rng.random() < 0.3 else ""
            items.append((f"{j + 1}. " if numbered else "- ") + bold + s)
        i += k
        if items:
            blocks.append("\n".join(items))

    if fmt == 0:
        while i < n:
            paragraph(int(rng.integers(2, 6)))
    elif fmt == 1:
        paragraph(int(rng.integers(1, 3)))
        while i < n:
            bullet_list(int(rng.integers(3, 8)))
            paragraph(int(rng.integers(1, 4)))
    elif fmt == 2:
        paragraph(1)
        while i < n:
            blocks.append("#" * int(rng.integers(2, 4)) + " " + _title(rng, topic))
            if rng.random() < 0.5:
                bullet_list(int(rng.integers(2, 6)))
            else:
                paragraph(int(rng.integers(2, 5)))
    else:
        paragraph(int(rng.integers(1, 3)))
        blocks.append(_code_block(rng, topic))
        while i < n:
            paragraph(int(rng.integers(2, 5)))
            if i < n and rng.random() < 0.3:
                blocks.append(_code_block(rng, topic))
    return "\n\n".join(blocks)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _answer_turn(rng: np.random.Generator, ans: _Answer, chars: float) -> str:
    """One turn of an answer: [refusal | opener] + topic-dense first sentence + body + closing."""
    head: list[str] = []
    tail: list[str] = []
    if ans.refusal:
        head.append(_pick(rng, _REFUSALS))
        if rng.random() < 0.5:
            head.append(_pick(rng, _REFUSAL_FILLERS))
    else:
        if rng.random() < 0.04:
            head.append(_pick(rng, _SOFT_APOLOGIES))
        tone_openers = {1: _CONFIDENT_OPENERS, -1: _HEDGE_OPENERS, 0: _NEUTRAL_OPENERS}[ans.tone]
        head.append(_pick(rng, tone_openers))
    tone_closings = {1: _CONFIDENT_CLOSINGS, -1: _HEDGE_CLOSINGS, 0: _NEUTRAL_CLOSINGS}[ans.tone]
    tail.append(_pick(rng, tone_closings))
    head_text = " ".join(h for h in head if h)
    tail_text = " ".join(t for t in tail if t)
    budget = max(chars - len(head_text) - len(tail_text), 30.0)
    words = _word_stream(rng, int(budget / _CHARS_PER_WORD), ans.topic, ans.tone, p_topic=0.22)
    body = _layout(rng, _sentences(rng, words), ans.fmt, ans.topic)
    # Openers go on the first paragraph; closings get their own line, like chat answers do.
    parts = [f"{head_text} {body}" if head_text else body]
    if tail_text:
        parts.append(tail_text)
    return "\n\n".join(parts)


def _prompt_turn(rng: np.random.Generator, topic: int, chars: float, follow_up: bool) -> str:
    start = _pick(rng, _FOLLOW_UPS if follow_up else _PROMPT_STARTS)
    words = _word_stream(rng, int(chars / _CHARS_PER_WORD), topic, 0, p_topic=0.45)
    first = " ".join(words[:12]).rstrip(",") + "?"
    rest = _sentences(rng, words[12:])
    return " ".join([f"{start} {first}", *rest])


def _davidson(s_a: np.ndarray, s_b: np.ndarray, tie_bonus: np.ndarray) -> np.ndarray:
    """(n, 3) probabilities [A, B, tie] from quality scores; ties favoured when |sA - sB| is small.

    Logits [sA, sB, log(nu) + (sA + sB) / 2 - kappa * |sA - sB| + bonus], written here after
    subtracting the common (sA + sB) / 2. With kappa = 0 this is Davidson's (1970) tie model.
    """
    d = s_a - s_b
    return softmax(np.stack([d / 2, -d / 2, _LOG_NU - _TIE_KAPPA * np.abs(d) + tie_bonus], axis=1))


def _score(ans: _Answer, total_chars: int, prompt_topic: int) -> float:
    if ans.kind != "text" or total_chars == 0:
        return _W_EMPTY
    s = _W_LEN * math.tanh(math.log(max(total_chars, 1) / _LEN_REF) / _LEN_SCALE)
    if ans.topic != prompt_topic:
        s += _W_OFF_TOPIC
    if ans.refusal:
        s += _W_REFUSAL
    if ans.fmt < 3 or _IS_TECH[prompt_topic]:
        s += _W_FORMAT[ans.fmt]
    s += _W_TONE * ans.tone
    return s


def _is_bad(ans: _Answer, prompt_topic: int) -> bool:
    return ans.kind != "text" or ans.refusal or ans.topic != prompt_topic


@dataclass
class SyntheticData:
    """Generated rows: ``frame`` is Kaggle format plus the true probabilities in PROB_COLUMNS."""

    frame: pd.DataFrame
    seed: int
    # Per-row latent attributes (topic, scores, refusal/off-topic/tone/format per side) for analysis.
    latents: pd.DataFrame | None = None

    @property
    def labels(self) -> np.ndarray:
        """0 = model_a, 1 = model_b, 2 = tie."""
        return _labels(self.frame)

    @property
    def true_proba(self) -> np.ndarray:
        return self.frame[list(PROB_COLUMNS)].to_numpy(dtype=np.float64)

    @property
    def oracle_log_loss(self) -> float:
        """Mean -log p_true[label]: the best log loss any model can expect on these rows."""
        return log_loss(self.true_proba, self.labels)


def _labels(frame: pd.DataFrame) -> np.ndarray:
    return frame[list(CLASS_COLUMNS)].to_numpy().argmax(axis=1)


def generate(
    n_rows: int,
    seed: int = 0,
    multi_turn_rate: float = 0.13,
    identical_rate: float = 0.02,
    empty_rate: float = 0.003,
    null_rate: float = 0.002,
) -> SyntheticData:
    """Generate n_rows arena-format rows, deterministically from seed.

    ``null_rate`` answers contain a JSON ``null`` turn (as in the real dump, where the parser maps it to
    text_stats.NULL_TURN); ``empty_rate`` answers are a single empty string. Both score as very bad.
    """
    if n_rows < 0:
        raise ValueError("n_rows must be >= 0")
    rng = np.random.default_rng(seed)
    n_topics = len(_TOPIC_NAMES)
    n_models = len(MODEL_NAMES)

    # Row-level latents, drawn vectorised.
    topics = rng.integers(0, n_topics, size=n_rows)
    multi = rng.random(n_rows) < multi_turn_rate
    n_turns = np.where(multi, rng.choice([2, 3, 4], size=n_rows, p=[0.55, 0.30, 0.15]), 1)
    model_a = rng.integers(0, n_models, size=n_rows)
    model_b = (model_a + rng.integers(1, n_models, size=n_rows)) % n_models  # never the same model
    # Mostly short questions, plus ~8% pasted-context prompts (real p95 is ~1,500 chars).
    pasted = rng.random(n_rows) < 0.08
    prompt_chars = np.exp(rng.normal(np.where(pasted, math.log(900.0), math.log(65.0)), 0.9)).clip(10, 6000)
    # Row-level "how long should an answer be" + per-answer noise: A/B lengths are correlated, like real data.
    row_len = rng.normal(0.0, 0.45, size=n_rows)
    identical = rng.random(n_rows) < identical_rate

    models = np.stack([model_a, model_b], axis=1)
    prof = _MODEL_PROFILES[models]  # (n, 2, 6)
    u = rng.random((n_rows, 2, 6))
    log_chars = math.log(900.0) + np.log(prof[..., 0]) + row_len[:, None] + rng.normal(0.0, 0.5, (n_rows, 2))
    # Heavy tail: a few answers are several times longer than usual (>10k chars in the real data).
    log_chars += (u[..., 5] < 0.02) * rng.uniform(1.0, 2.2, size=(n_rows, 2))
    chars = np.exp(log_chars).clip(40, 30000)
    refusal = u[..., 0] < prof[..., 1]
    off_topic = u[..., 1] < prof[..., 2]
    # Formatted answers: code mostly on technical topics, otherwise lists (common) or headed sections.
    fmt_u = rng.random((n_rows, 2))
    tech = _IS_TECH[topics][:, None]
    styled = np.where(
        tech, np.where(fmt_u < 0.6, 3, np.where(fmt_u < 0.9, 1, 2)), np.where(fmt_u < 0.75, 1, 2)
    )
    fmt = np.where(u[..., 2] < prof[..., 3], styled, 0)
    tone = np.where(u[..., 3] < prof[..., 4], 1, np.where(u[..., 3] > 1 - prof[..., 5], -1, 0))
    other_topic = (topics[:, None] + rng.integers(1, n_topics, size=(n_rows, 2))) % n_topics
    kind_u = u[..., 4]
    kinds = np.where(kind_u < null_rate, "null", np.where(kind_u < null_rate + empty_rate, "empty", "text"))

    rows = []
    probs_in: list[tuple[float, float, float]] = []
    latent_rows: list[tuple] = []
    for r in range(n_rows):
        t = int(topics[r])
        k = int(n_turns[r])
        # Multi-turn: each turn shorter so totals stay comparable with single-turn rows.
        share = 1.0 / k**0.8
        prompt = [
            _prompt_turn(rng, t, prompt_chars[r] * (1.0 if j == 0 else 0.6), follow_up=j > 0)
            for j in range(k)
        ]
        answers: list[_Answer] = []
        texts: list[list[str | None]] = []
        for side in range(2):
            if side == 1 and identical[r]:
                answers.append(answers[0])
                texts.append(list(texts[0]))
                break
            ans = _Answer(
                topic=int(other_topic[r, side]) if off_topic[r, side] else t,
                refusal=bool(refusal[r, side]),
                tone=int(tone[r, side]),
                fmt=int(fmt[r, side]),
                chars=float(chars[r, side]),
                kind=str(kinds[r, side]),
            )
            if ans.kind == "empty":
                turns: list[str | None] = [""] * k
            else:
                turns = [
                    _answer_turn(rng, ans, min(ans.chars * share * rng.lognormal(0.0, 0.25), 30000 / k))
                    for _ in range(k)
                ]
                if ans.kind == "null":
                    turns[-1] = None
            answers.append(ans)
            texts.append(turns)
        totals = [sum(len(x) for x in turns if x) for turns in texts]
        s_a = _score(answers[0], totals[0], t)
        s_b = _score(answers[1], totals[1], t)
        bonus = _TIE_IDENTICAL * bool(identical[r]) + _TIE_BOTH_BAD * (
            _is_bad(answers[0], t) and _is_bad(answers[1], t)
        )
        probs_in.append((s_a, s_b, bonus))
        latent_rows.append(
            (t, k, bool(identical[r]), s_a, s_b)
            + tuple(v for a in answers for v in (a.topic != t, a.refusal, a.tone, _FORMATS[a.fmt], a.kind))
        )
        rows.append(
            (
                MODEL_NAMES[int(model_a[r])],
                MODEL_NAMES[int(model_b[r])],
                json.dumps(prompt),
                json.dumps(texts[0]),
                json.dumps(texts[1]),
            )
        )

    arr = np.array(probs_in, dtype=np.float64).reshape(n_rows, 3)
    proba = _davidson(arr[:, 0], arr[:, 1], arr[:, 2])
    # Inverse-CDF draw of the label from the known probabilities.
    label = (rng.random(n_rows)[:, None] > np.cumsum(proba, axis=1)[:, :2]).sum(axis=1)
    onehot = np.eye(3, dtype=np.int64)[label]
    ids = np.sort(rng.choice(np.arange(10_000, 10_000 + 50 * max(n_rows, 1)), size=n_rows, replace=False))
    frame = pd.DataFrame(rows, columns=["model_a", "model_b", "prompt", "response_a", "response_b"])
    frame.insert(0, "id", ids.astype(np.int64))
    for j, col in enumerate(CLASS_COLUMNS):
        frame[col] = onehot[:, j]
    for j, col in enumerate(PROB_COLUMNS):
        frame[col] = proba[:, j]
    side_cols = [
        f"{name}_{side}" for side in "ab" for name in ("off_topic", "refusal", "tone", "format", "kind")
    ]
    latents = pd.DataFrame(
        latent_rows, columns=["topic", "n_turns", "identical", "score_a", "score_b", *side_cols]
    )
    latents["topic"] = [_TOPIC_NAMES[i] for i in latents["topic"]] if n_rows else []
    return SyntheticData(frame=frame, seed=seed, latents=latents)


def text_stats_log_loss(frame: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> float:
    """Cross-validated log loss of the logistic regression on text_stats.pair_stats features."""
    X = text_stats.pair_stats_matrix(
        (parse_turns(p), parse_turns(a), parse_turns(b))
        for p, a, b in zip(frame["prompt"], frame["response_a"], frame["response_b"], strict=True)
    )
    return text_stats.cross_validated_log_loss(X, _labels(frame), n_folds=n_folds, seed=seed)


def summary(data: SyntheticData, with_text_stats: bool = True) -> dict:
    """Headline numbers: class balance and the prior / text-stats / oracle log losses, length shape."""
    frame = data.frame
    labels = data.labels
    answer_chars = np.array(
        [sum(len(t) for t in json.loads(c) if t) for col in ("response_a", "response_b") for c in frame[col]]
    )
    prompt_chars = np.array([sum(len(t) for t in json.loads(c) if t) for c in frame["prompt"]])
    n_turns = np.array([len(json.loads(c)) for c in frame["prompt"]])
    balance = np.bincount(labels, minlength=3) / max(len(labels), 1)
    out = {
        "n_rows": len(frame),
        "seed": data.seed,
        "class_balance": {name: round(float(v), 4) for name, v in zip(CLASS_COLUMNS, balance, strict=True)},
        "prior_log_loss": round(prior_log_loss(labels, labels), 4),
        "oracle_log_loss": round(data.oracle_log_loss, 4),
        "answer_chars": {
            "median": float(np.median(answer_chars)),
            "p95": float(np.percentile(answer_chars, 95)),
            "max": int(answer_chars.max()) if answer_chars.size else 0,
            "frac_over_10k": round(float((answer_chars > 10_000).mean()), 4),
        },
        "prompt_chars_median": float(np.median(prompt_chars)),
        "multi_turn_fraction": round(float((n_turns > 1).mean()), 4),
    }
    if with_text_stats:
        # Five-fold CV needs a handful of rows per fold; report None for toy-sized frames.
        out["text_stats_log_loss"] = round(text_stats_log_loss(frame), 4) if len(frame) >= 25 else None
    return out


def write_csv(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write frame as CSV atomically: temp file in the target folder, then os.replace.

    Readers never see a half-written file, and a crash leaves the previous file intact.
    """
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate synthetic arena-format preference data.")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="CSV path to write")
    parser.add_argument("--no-probs", action="store_true", help="drop the p_* columns (pure Kaggle format)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    data = generate(args.rows, seed=args.seed)
    t1 = time.perf_counter()
    frame = data.frame.drop(columns=list(PROB_COLUMNS)) if args.no_probs else data.frame
    write_csv(frame, args.out)
    t2 = time.perf_counter()
    info = summary(data)
    info["generate_seconds"] = round(t1 - t0, 3)
    info["write_seconds"] = round(t2 - t1, 3)
    info["summary_seconds"] = round(time.perf_counter() - t2, 3)
    info["out"] = str(args.out)
    json.dump(info, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
