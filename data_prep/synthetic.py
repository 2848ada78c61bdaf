#!/usr/bin/env python3
"""A seeded synthetic corpus of spoken English, made with eSpeak NG.

Why this exists: the toolkit needs an end-to-end speech-to-text corpus that any
machine can build from pip packages alone in a couple of minutes, with no
downloads of real recordings. eSpeak NG is small, deterministic and very fast
(hundreds of times real time on one core), and the PyPI package
``espeakng-loader`` ships the library and its voice data. Speech from a formant
synthesiser is far easier than real speech, but a model that cannot learn *this*
has a bug, which is exactly what a smoke-test corpus is for.

What it contains:

* Sentences from a small grammar (see ``TEMPLATES``) over word lists holding
  well over 1,000 distinct everyday English words: lower case, no punctuation,
  numbers spelled out, 4 to 9 words each (about 1.5 to 4 seconds of speech).
  Every slot (noun, plural noun, past-tense verb, ...) deals its words from a
  shuffled "deck" instead of drawing independently, so all word forms come round
  equally often: in the default 3,000 training sentences nearly every one of the
  ~2,200 word forms occurs, most of them 2 to 6 times.
* Splits by sentence: train, valid and test hold disjoint sets of sentence
  texts, so test scores measure generalisation to new word sequences.
* Eight eSpeak English accents (``TRAIN_VOICES``) times fifteen voice variants
  (``TRAIN_VARIANTS``), with random speaking rate (130-200 words per minute) and
  pitch (30-70 on eSpeak's 0-100 scale).
* Held-out speaker: the TEST split is spoken only by ``en-us+m3`` (``HELD_OUT``),
  General American with the ``m3`` variant. ``m3`` is a plain male voice (close
  to neutral formants), not an effect voice, and no train or valid utterance uses
  the ``m3`` variant with any accent, so the test speaker is unseen in training
  while being ordinary speech. Valid uses the training speakers, so valid and
  test together separate "in-domain" from "new speaker" error.
* Mild white or pink background noise at a random 20-35 dB SNR, 0.05-0.3 s of
  random leading and trailing silence, and a random peak level of 0.5-0.95 (no
  clipping).
* 16 kHz mono 16-bit PCM wav files in ``OUT/wavs/{split}/{id}.wav``, resampled
  from eSpeak's 22,050 Hz with ``torchaudio.functional.resample``.
* Manifests ``OUT/{train,valid,test}.jsonl``: one JSON object a line with
  ``id``, ``audio`` (relative to the manifest's folder), ``duration`` (seconds,
  3 decimals), ``text`` and ``speaker`` (``voice+variant``); ``OUT/README.txt``
  describes the corpus.

Determinism: all choices (sentences, splits, voices, rates, silences, noise)
come from the seed and are fixed before the work is spread over processes, and
every utterance is synthesised from a pristine eSpeak state (see
:class:`LibraryEspeak`), so manifests and wav files are identical byte for byte
for a seed, whatever ``--jobs`` is, on the same eSpeak NG build. (Another eSpeak
NG version may time its speech differently and so change durations.) A stamp file
records the parameters; a rerun with the same ones returns at once.

Usage::

    python data_prep/synthetic.py --out DIR [--num-train 3000] [--num-valid 200]
        [--num-test 200] [--seed 0] [--jobs 2] [--force]
    python data_prep/synthetic.py --out DIR [same --num-* --seed] --lm-text lm.txt.gz
        [--lm-sentences 20000]     # text for a language model (no audio; see lm_sentences)

Backends: the ``espeakng_loader`` library through ctypes (preferred), else the
``espeak-ng`` program (Debian package ``espeak-ng``), whose 1.51 build speaks the
same voices.
"""

from __future__ import annotations

import _ctypes
import argparse
import ctypes
import dataclasses
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------
# Word lists
# --------------------------------------------------------------------------------------
# Everyday words that eSpeak pronounces sensibly. Heteronyms whose sound depends on
# meaning (read, live, close, lead, tear, wind, bow, present, desert, polish, ...) are
# left out on purpose: a transcript word should map to one pronunciation.


def _words(block: str) -> tuple[str, ...]:
    """Split a whitespace-separated block into a tuple of words, keeping order."""
    return tuple(block.split())


NOUNS = _words(
    """
    cat dog horse cow pig sheep goat chicken duck goose rabbit mouse rat bird fish frog
    snake bear wolf fox deer lion tiger monkey elephant whale dolphin shark turtle bee ant
    spider butterfly owl eagle parrot pony donkey camel zebra kitten puppy squirrel
    apple banana orange lemon peach pear grape cherry melon tomato potato carrot onion
    cabbage bean egg cake cookie biscuit sandwich pizza pie sausage burger muffin pancake
    cucumber pumpkin strawberry sweet lollipop
    cup mug plate bowl spoon fork knife pan pot kettle bottle jar glass basket bucket box
    bag suitcase backpack wallet purse key lock chain rope needle button ribbon blanket
    pillow towel carpet curtain mirror lamp candle clock watch radio camera phone computer
    laptop keyboard screen printer battery cable pencil pen crayon marker notebook book
    magazine newspaper letter envelope stamp ticket map card calendar poster picture
    painting photo frame chair table desk sofa couch bed shelf drawer cupboard door window
    wall floor ceiling roof fence gate ladder hammer nail screw saw shovel brush broom mop
    tray umbrella hat cap scarf glove coat jacket shirt skirt dress sweater sock shoe boot
    belt necklace bracelet tie pocket wheel bicycle car truck bus train boat ship plane
    helicopter tractor van taxi rocket kite balloon ball doll toy puzzle game drum guitar
    piano violin flute trumpet whistle bell flag tent sign statue fountain bench bridge
    tower tunnel road path street
    baby child boy girl man woman friend teacher doctor nurse farmer driver pilot cook
    baker painter singer dancer player student neighbor brother sister mother father uncle
    aunt cousin grandmother grandfather king queen prince princess soldier sailor officer
    waiter clerk artist writer captain farmer pirate wizard giant robot
    tree flower leaf branch rock stone stick shell feather cloud star moon hill mountain
    river lake pond island seed bush plant coin gift song story poem joke idea question
    answer plan list message sandal helmet engine button candle toothbrush hairbrush
    teapot saucer napkin jug barrel crate parcel package bone carton notebook sticker
    magnet compass telescope microscope globe trophy medal crown sword shield arrow
    apron blender fridge oven stove sink toaster heater fan vase rug cushion quilt
    mattress hanger zipper pin clip ladle whisk grater flask lunchbox cone donut cupcake
    waffle pretzel noodle dumpling omelet salad pea plum apricot coconut pineapple mango
    walnut peanut almond raisin olive radish turnip mushroom hamster gorilla kangaroo
    penguin ostrich swan pigeon crow seagull lizard crab lobster snail worm beetle moth
    bat bull lamb calf hen rooster ruler eraser stapler folder locker mailbox doorbell
    chimney staircase elevator wagon sled scooter skateboard canoe raft anchor paddle
    """
)
"""Countable concrete nouns (duplicates are removed when the lists are frozen)."""

PLACES = _words(
    """
    kitchen garden station market school library park office hospital beach bakery bank
    restaurant church museum theater cinema airport harbor hotel garage factory farm zoo
    castle village city town shop store supermarket pharmacy gym stadium playground
    classroom bathroom bedroom hallway basement attic balcony yard forest jungle valley
    meadow corner square mall campus studio laboratory cottage cabin barn stable port pier
    lighthouse palace temple workshop warehouse hall cellar greenhouse orchard dentist
    gallery canteen bookshop barbershop bus kindergarten university aquarium marina
    arcade laundry diner motel hostel chapel plaza avenue highway countryside seaside
    riverbank waterfall cave volcano canyon harbor bakery
    """
)
"""Places, used after 'the' with in/at/near/to."""

ADJECTIVES = _words(
    """
    big small large tiny huge little tall short long wide narrow thick thin heavy light
    old new young ancient modern fresh hot cold warm cool wet dry clean dirty soft hard
    smooth rough sharp quiet loud bright dark happy sad angry calm brave shy kind rude
    funny silly clever lazy busy tired hungry thirsty sleepy rich poor cheap expensive
    easy difficult simple strange lovely pretty ugly beautiful handsome strong weak fast
    slow early late empty full open broken shiny dusty rusty wooden plastic golden silver
    red blue green yellow purple pink brown black white gray sweet sour bitter salty spicy
    tasty delicious crunchy juicy round square flat gentle friendly famous lucky careful
    careless curious nervous proud polite honest noisy crowded peaceful sunny rainy windy
    cloudy snowy foggy stormy frozen giant fluffy fuzzy hairy striped spotted colorful
    plain fancy useful useless perfect terrible wonderful awful excellent special normal
    ordinary secret hidden missing lost favorite important dangerous safe healthy sick
    lonely messy neat tidy cozy chilly quick wild tame loyal clumsy grumpy cheerful jolly
    elegant enormous tiny glad fair wise silent sticky muddy smelly shallow deep
    brilliant gloomy damp soggy crispy creamy fragile sturdy tough tender bumpy silky
    greasy rotten ripe stale spotless faded crooked curly straight bald cranky
    """
)
"""Adjectives; 'orange', 'square' and 'giant' double as nouns."""

# Verbs: "base" or "base:past" where the past tense is irregular. The third person
# singular and the -ing form follow the spelling rules in ``_inflect_verb``; verbs whose
# final consonant doubles before -ed/-ing are listed in ``_DOUBLING``.
TRANSITIVE_VERBS = _words(
    """
    see:saw find:found buy:bought sell:sold bring:brought take:took make:made give:gave
    hold:held keep:kept hide:hid draw:drew throw:threw catch:caught eat:ate drink:drank
    write:wrote break:broke build:built carry clean paint wash open fix move push pull
    drop lift fill empty kick touch watch follow visit help call count cook bake boil
    cut:cut fold pack lend:lent borrow order share check collect deliver repair sweep:swept
    wrap chase feed:fed grab hug like want need hear:heard smell taste forget:forgot
    remember lose:lost steal:stole climb cross pass plant pick choose:chose test measure
    weigh dry cover shake:shook spill sign mark print copy send:sent receive ask
    teach:taught show meet:met greet bury dig:dug water rent hire park drive:drove
    ride:rode sing:sang play win:won tie bend:bent stir slice peel chop mix pour fry
    toast heat freeze:froze melt lock unlock hit:hit roll spin:spun sort stack hang:hung
    join explore discover describe invite thank save protect guard warn brush comb iron
    sew knit mend trim wipe scrub rinse sniff return replace fetch study imagine enjoy
    admire notice carve decorate paint sketch photograph wear:wore
    """
)
"""Verbs that take a direct object ('tom found the key')."""

INTRANSITIVE_VERBS = _words(
    """
    sleep:slept sit:sat stand:stood wait play sing:sang dance laugh cry smile rest work
    swim:swam jump shout whisper cough sneeze yawn stay relax shiver listen talk practice
    exercise hum clap wave nod knock camp fish skate jog snore giggle wander paint cook
    study eat:ate hide:hid
    """
)
"""Verbs used without an object ('anna slept quietly in the garden')."""

MOTION_VERBS = _words(
    """
    go:went walk run:ran drive:drove ride:rode fly:flew hurry rush return travel come:came
    move swim:swam climb race sail march crawl wander jog cycle hike skip
    """
)
"""Verbs of motion, used with 'to the PLACE'."""

ADVERBS = _words(
    """
    quickly slowly quietly loudly carefully happily sadly suddenly gently softly together
    again alone easily badly calmly eagerly nervously patiently politely proudly
    finally silently smoothly safely bravely kindly wisely
    lazily angrily cheerfully honestly neatly early late outside upstairs downstairs
    """
)
"""Adverbs of manner, frequency and place."""

DEGREES = _words("very quite really rather too so extremely fairly")
"""Degree words placed before an adjective."""

NAMES = _words(
    """
    tom anna james mary david sarah peter laura john emma michael lucy paul kate mark jane
    daniel alice robert helen george susan william ruth henry rachel jack grace sam emily
    ben olivia chris sophie adam julia oliver nina simon rose frank amy harry claire
    steven lily andrew maria kevin diana brian linda eric karen martin hannah victor fiona
    oscar molly leo ella max zoe
    """
)
"""First names that eSpeak reads as names."""

PRONOUNS = _words("i you he she we they")
"""Subject pronouns (only used with tenses where they all agree)."""

DAYS = _words("monday tuesday wednesday thursday friday saturday sunday")
MONTHS = _words(
    "january february march april may june july august september october november december"
)
MEALS = _words("breakfast lunch dinner supper school work")
"""Things one does something 'after'."""

_ANY_TIME: tuple[str, ...] = (
    "at noon",
    "at midnight",
    "at dawn",
    *(f"on {day}" for day in DAYS),
    *(f"in {month}" for month in MONTHS),
)
PAST_TIMES: tuple[str, ...] = (
    "yesterday",
    "last night",
    "last week",
    "last month",
    "last year",
    "this morning",
    "earlier",
    *_ANY_TIME,
)
"""Time adverbials for past-tense sentences."""
FUTURE_TIMES: tuple[str, ...] = (
    "tomorrow",
    "tonight",
    "next week",
    "next month",
    "next year",
    "soon",
    "later",
    *_ANY_TIME,
)
"""Time adverbials for future sentences."""
PRESENT_TIMES: tuple[str, ...] = (
    "today",
    "tonight",
    "now",
    "right now",
    "this morning",
    "this afternoon",
    "this evening",
    "at the moment",
)
"""Time adverbials for present-tense sentences (tenses agree, so an LM learns no nonsense)."""

OBJECT_PREPOSITIONS: tuple[str, ...] = (
    "on",
    "under",
    "near",
    "behind",
    "beside",
    "inside",
    "above",
    "below",
    "next to",
    "in front of",
)
"""Where a thing can be relative to another thing."""

PLACE_PREPOSITIONS: tuple[str, ...] = ("in", "at", "near", "behind", "outside", "inside")
"""Where something happens relative to a place."""

_UNITS = _words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
)
_TENS = _words("zero ten twenty thirty forty fifty sixty seventy eighty ninety")


def number_words(n: int) -> str:
    """Spell ``1 <= n <= 999`` as English words without hyphens ("forty two")."""
    if not 1 <= n <= 999:
        raise ValueError(f"number out of range: {n}")
    parts: list[str] = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        parts += [_UNITS[hundreds], "hundred"]
        if rest:
            parts.append("and")
    if rest >= 20:
        tens, units = divmod(rest, 10)
        parts.append(_TENS[tens])
        if units:
            parts.append(_UNITS[units])
    elif rest:
        parts.append(_UNITS[rest])
    return " ".join(parts)


# --------------------------------------------------------------------------------------
# Inflection (regular English spelling rules plus the few exceptions we use)
# --------------------------------------------------------------------------------------

_IRREGULAR_PLURALS = {
    "child": "children",
    "man": "men",
    "woman": "women",
    "mouse": "mice",
    "knife": "knives",
    "leaf": "leaves",
    "shelf": "shelves",
    "wolf": "wolves",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
    "potato": "potatoes",
    "tomato": "tomatoes",
    "bus": "buses",
    "goose": "geese",
    "scarf": "scarves",
    "calf": "calves",
}
_DOUBLING = frozenset(
    _words(
        "drop grab hug stir chop trim scrub knit skip jog nod hum clap dig cut hit spin sit "
        "run swim shop plan stop wrap"
    )
)
_VOWELS = frozenset("aeiou")


def plural(noun: str) -> str:
    """English plural of a countable noun."""
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "sh", "ch", "x", "z")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in _VOWELS:
        return noun[:-1] + "ies"
    return noun + "s"


@dataclasses.dataclass(frozen=True)
class Verb:
    """The four surface forms of a verb that the grammar uses."""

    base: str
    third: str
    past: str
    ing: str


def _inflect_verb(spec: str) -> Verb:
    """Build a :class:`Verb` from ``"base"`` or ``"base:past"`` using spelling rules."""
    base, _, past = spec.partition(":")
    stem = base + base[-1] if base in _DOUBLING else base
    if base in ("go", "do") or base.endswith(("s", "sh", "ch", "x", "z")):
        third = base + "es"
    elif base.endswith("y") and base[-2] not in _VOWELS:
        third = base[:-1] + "ies"
    else:
        third = base + "s"
    if not past:
        if base.endswith("e"):
            past = base + "d"
        elif base.endswith("y") and base[-2] not in _VOWELS:
            past = base[:-1] + "ied"
        else:
            past = stem + "ed"
    if base.endswith("ie"):
        ing = base[:-2] + "ying"
    elif base.endswith("e") and not base.endswith(("ee", "ye", "oe")):
        ing = base[:-1] + "ing"
    else:
        ing = stem + "ing"
    return Verb(base, third, past, ing)


def _unique(items: Sequence[str]) -> tuple[str, ...]:
    """Remove duplicates, keeping the first occurrence (order matters for seeding)."""
    return tuple(dict.fromkeys(items))


def _unique_verbs(specs: Sequence[str]) -> tuple[Verb, ...]:
    """Inflect verb specs, dropping repeated base forms."""
    seen: dict[str, Verb] = {}
    for spec in specs:
        verb = _inflect_verb(spec)
        seen.setdefault(verb.base, verb)
    return tuple(seen.values())


_NOUNS = _unique(NOUNS)
_PLACES = _unique(PLACES)
_ADJECTIVES = _unique(ADJECTIVES)
_TRANSITIVE = _unique_verbs(TRANSITIVE_VERBS)
_INTRANSITIVE = _unique_verbs(INTRANSITIVE_VERBS)
_MOTION = _unique_verbs(MOTION_VERBS)
_NUMBERS = tuple(number_words(n) for n in range(2, 100))

# 'an' before a vowel sound; these spellings start with a consonant sound or vice versa.
_A_EXCEPTIONS = frozenset({"useful", "useless", "university", "uniform", "unicorn"})
_AN_EXCEPTIONS = frozenset({"honest", "hour"})


def article(word: str) -> str:
    """Indefinite article for the word that follows it ("a" or "an")."""
    if word in _AN_EXCEPTIONS:
        return "an"
    if word[0] in _VOWELS and word not in _A_EXCEPTIONS:
        return "an"
    return "a"


# --------------------------------------------------------------------------------------
# Grammar
# --------------------------------------------------------------------------------------

TEMPLATES: tuple[str, ...] = (
    # statements, past
    "the {adj} {noun} {tv.past} the {nouns}",
    "{pron} {tv.past} {a_adj_noun} {time.past}",
    "{name} {tv.past} the {noun} in {month}",
    "{name} {tv.past} the {adj} {nouns}",
    "{pron} {tv.past} {num} {nouns} for the {noun}",
    "our {adj} {noun} {tv.past} {a_noun}",
    "the {nouns} {tv.past} the {noun}",
    "{name} {iv.past} {adv} {pprep} the {place}",
    "the {noun} {iv.past} {adv} {time.past}",
    "the {nouns} {iv.past} {oprep} the {noun}",
    "{name} and {name} {mv.past} to the {place} {time.past}",
    "{name} {mv.past} {adv} to the {place}",
    "the {nouns} {mv.past} to the {noun}",
    "{pron} saw {num} {nouns} {oprep} the {noun}",
    "{name} said the {nouns} were {deg} {adj}",
    "{name} was {tv.ing} {a_noun} {time.past}",
    "the {nouns} were {tv.ing} the {noun}",
    "the {noun} was {tv.ing} {a_noun}",
    # statements, present
    "{name} {tv.s} the {nouns} every {day}",
    "{name} often {tv.s} {a_adj_noun}",
    "my {noun} never {tv.s} the {nouns}",
    "nobody {tv.s} the {adj} {nouns}",
    "{name} {tv.s} {num} {nouns} {time.now}",
    "{name} {tv.s} the {noun} {adv}",
    "everyone {tv.s} {a_adj_noun}",
    "{name} {tv.s} {nouns} on {day}",
    "we are {tv.ing} {num} {nouns} {time.now}",
    "{name} is {tv.ing} the {adj} {nouns} {time.now}",
    "they are {tv.ing} the {noun} {time.now}",
    "stop {tv.ing} the {nouns}",
    "{name} {iv.s} {pprep} the {place} every {day}",
    "{name} {iv.s} {adv} every {day}",
    "{name} is {iv.ing} {pprep} the {place}",
    "the {adj} {noun} is {iv.ing} {adv}",
    "we like to {iv} {pprep} the {place}",
    "please do not {iv} {pprep} the {place}",
    "{pron} can {iv} {adv} {pprep} the {place}",
    "the {noun} {mv.s} to the {place} every {day}",
    "{name} {mv.s} to the {place} {adv}",
    "{name} is {mv.ing} to the {place} {time.now}",
    "my {noun} is {deg} {adj}",
    "the {nouns} are {deg} {adj} {time.now}",
    "the {noun} and the {noun} are {adj}",
    "there are {num} {adj} {nouns} {pprep} the {place}",
    "{name} has {num} {adj} {nouns}",
    "i think the {noun} is {oprep} the {noun}",
    # statements, future and requests
    "{name} will {tv} {num} {nouns} {pprep} the {place}",
    "{pron} will {tv} the {adj} {nouns} {time.future}",
    "{pron} will never {tv} that {adj} {noun} again",
    "{name} wants to {tv} the {nouns}",
    "please {tv} the {nouns} {oprep} the {noun}",
    "let us {tv} the {nouns} after {meal}",
    # questions
    "did you {tv} the {adj} {noun} {time.past} ?",
    "how many {nouns} did {name} {tv} ?",
    "can you {tv} {a_adj_noun} for {name} ?",
    "when will {name} {tv} the {nouns} ?",
    "who {tv.past} the {noun} and the {nouns} ?",
    "why did the {noun} {mv} to the {place} ?",
    "can {name} {mv} to the {place} ?",
    "why are the {nouns} {iv.ing} ?",
    "where is the {adj} {noun} ?",
    "where are my {nouns} ?",
    "is your {noun} {deg} {adj} ?",
    "are the {nouns} {oprep} the {noun} ?",
    "do you want {a_noun} or {a_noun} ?",
)
"""Sentence templates. ``{slot}`` is filled from a word deck; a final ``?`` marks a
question, which is spoken with question intonation but not written in the transcript."""


def _verb_forms(verbs: Sequence[Verb], prefix: str) -> dict[str, tuple[str, ...]]:
    return {
        prefix: _unique([v.base for v in verbs]),
        f"{prefix}.s": _unique([v.third for v in verbs]),
        f"{prefix}.past": _unique([v.past for v in verbs]),
        f"{prefix}.ing": _unique([v.ing for v in verbs]),
    }


SLOTS: dict[str, tuple[str, ...]] = {
    "noun": _NOUNS,
    "nouns": _unique([plural(n) for n in _NOUNS]),
    "place": _PLACES,
    "adj": _ADJECTIVES,
    **_verb_forms(_TRANSITIVE, "tv"),
    **_verb_forms(_INTRANSITIVE, "iv"),
    **_verb_forms(_MOTION, "mv"),
    "adv": _unique(ADVERBS),
    "deg": DEGREES,
    "name": _unique(NAMES),
    "pron": PRONOUNS,
    "time.past": PAST_TIMES,
    "time.future": FUTURE_TIMES,
    "time.now": PRESENT_TIMES,
    "day": DAYS,
    "month": MONTHS,
    "meal": MEALS,
    "oprep": OBJECT_PREPOSITIONS,
    "pprep": PLACE_PREPOSITIONS,
    "num.small": _NUMBERS[:11],
    "num.any": _NUMBERS,
}
"""Word deck for each slot kind. ``{num}``, ``{a_noun}`` and ``{a_adj_noun}`` are
composed from these decks (see :meth:`SentenceGenerator._fill`)."""

MIN_WORDS = 4
MAX_WORDS = 9


class _Deck:
    """Draw items in shuffled rounds: every item is used once per round.

    Why: plain uniform sampling leaves some of ~1,000 words seen only once or twice
    in 3,000 sentences by bad luck; rounds make word counts nearly equal.
    """

    def __init__(self, items: Sequence[Any], rng: random.Random) -> None:
        self._items = list(items)
        self._rng = rng
        self._pending: list[Any] = []

    def draw(self) -> Any:
        if not self._pending:
            self._pending = self._items[:]
            self._rng.shuffle(self._pending)
        return self._pending.pop()


class SentenceGenerator:
    """Seeded sentence source over :data:`TEMPLATES` and the word lists.

    Every slot kind (``noun``, ``nouns``, ``tv.past`` ...) has its own deck of surface
    forms, so each inflected form, not just each lemma, comes round equally often.
    The same seed yields the same sequence of sentences. ``next()`` returns
    ``(transcript, spoken_text)``: the transcript is lower case without punctuation;
    the spoken text adds a final ``.`` or ``?`` so eSpeak uses the right intonation.
    """

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(f"sentences-{seed}")
        self._templates = _Deck(TEMPLATES, self._rng)
        self._decks = {slot: _Deck(words, self._rng) for slot, words in SLOTS.items()}

    def _fill(self, slot: str) -> str:
        """Return the words for one ``{slot}``."""
        if slot == "num":
            # Small counts are more natural; larger ones still cover every number word.
            return self._decks["num.small" if self._rng.random() < 0.5 else "num.any"].draw()
        if slot == "a_noun":
            noun = self._decks["noun"].draw()
            return f"{article(noun)} {noun}"
        if slot == "a_adj_noun":
            adj, noun = self._decks["adj"].draw(), self._decks["noun"].draw()
            return f"{article(adj)} {adj} {noun}"
        return self._decks[slot].draw()

    def next(self) -> tuple[str, str]:
        """Return the next ``(transcript, spoken_text)`` with 4 to 9 words."""
        while True:
            template = self._templates.draw()
            question = template.endswith("?")
            words: list[str] = []
            for token in template.rstrip(" ?").split():
                if token.startswith("{"):
                    words.extend(self._fill(token[1:-1]).split())
                else:
                    words.append(token)
            if MIN_WORDS <= len(words) <= MAX_WORDS:
                transcript = " ".join(words)
                return transcript, transcript + ("?" if question else ".")

    def __iter__(self) -> Iterator[tuple[str, str]]:
        while True:
            yield self.next()


def vocabulary() -> frozenset[str]:
    """Every distinct word the grammar can produce (slot decks plus template words)."""
    words: set[str] = {"a", "an"}
    for entries in SLOTS.values():
        for entry in entries:
            words.update(entry.split())
    for template in TEMPLATES:
        words.update(t for t in template.split() if not t.startswith("{") and t != "?")
    return frozenset(words)


def split_sentences(
    seed: int, num_train: int, num_valid: int, num_test: int
) -> dict[str, list[tuple[str, str]]]:
    """Draw distinct sentences and split them into train/valid/test.

    Sentences are de-duplicated *before* splitting, so no sentence text can appear in
    two splits. Returns ``{split: [(transcript, spoken_text), ...]}``.
    """
    total = num_train + num_valid + num_test
    generator = SentenceGenerator(seed)
    seen: dict[str, str] = {}
    attempts = 0
    while len(seen) < total:
        attempts += 1
        if attempts > 20 * total + 1000:
            raise RuntimeError(f"could not draw {total} distinct sentences")
        transcript, spoken = generator.next()
        seen.setdefault(transcript, spoken)
    pool = list(seen.items())
    random.Random(f"split-{seed}").shuffle(pool)
    return {
        "test": pool[:num_test],
        "valid": pool[num_test : num_test + num_valid],
        "train": pool[num_test + num_valid :],
    }


def held_out_sentences(
    seed: int, num_train: int, num_valid: int, num_test: int, corpus_dir: Path | None = None
) -> set[str]:
    """The valid and test transcripts of the corpus these settings make, and those of the
    manifests in ``corpus_dir`` if it holds any (the corpus actually on disk)."""
    splits = split_sentences(seed, num_train, num_valid, num_test)
    held = {text for split in ("valid", "test") for text, _ in splits[split]}
    for split in ("valid", "test"):
        manifest = corpus_dir / f"{split}.jsonl" if corpus_dir is not None else None
        if manifest is not None and manifest.is_file():
            held |= {json.loads(line)["text"] for line in manifest.read_text().splitlines() if line.strip()}
    return held


def lm_sentences(count: int, seed: int, held_out: set[str]) -> list[str]:
    """``count`` sentences of the grammar for a language model, none of them in ``held_out``.

    Drawn from a generator of their own (``SentenceGenerator(f"lm-{seed}")``), so they are new
    sentences, not the corpus's training transcripts again, with the grammar's frequencies
    (repeats allowed, as in real text); a valid or test sentence is never written: an LM that
    had read the test sentences would make the test WER with fusion meaningless.
    """
    generator = SentenceGenerator(f"lm-{seed}")  # type: ignore[arg-type]  # any str seeds the rng
    sentences: list[str] = []
    while len(sentences) < count:
        text, _ = generator.next()
        if text not in held_out:
            sentences.append(text)
    return sentences


def write_lm_text(path: Path, sentences: Sequence[str]) -> None:
    """One sentence a line, gzip-compressed if ``path`` ends in ``.gz``; written atomically."""
    data = "".join(f"{s}\n" for s in sentences).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    tmp.replace(path)


# --------------------------------------------------------------------------------------
# Voices and per-utterance plans
# --------------------------------------------------------------------------------------

TRAIN_VOICES: tuple[str, ...] = (
    "en-us",
    "en",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
"""eSpeak English accents used for train and valid ("en" is British English)."""

TRAIN_VARIANTS: tuple[str, ...] = (
    "m1",
    "m2",
    "m4",
    "m5",
    "m6",
    "m7",
    "m8",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "klatt",
    "klatt2",
    "klatt3",
)
"""eSpeak voice variants used for train and valid; ``m3`` is deliberately absent."""

HELD_OUT = ("en-us", "m3")
"""(voice, variant) that speaks the whole test split and nothing else."""

SPLITS = ("train", "valid", "test")
SAMPLE_RATE = 16_000
RATE_WPM = (130, 200)
PITCH = (30, 70)
SNR_DB = (20.0, 35.0)
SILENCE_S = (0.05, 0.3)
PEAK = (0.5, 0.95)
GENERATOR_VERSION = 1
"""Bump when a change alters the output, so old corpora are not reused (see stamp)."""


@dataclasses.dataclass(frozen=True)
class UtterancePlan:
    """Everything random about one utterance, fixed up front from the seed.

    Why up front: worker processes then do pure, order-independent work, so the
    corpus does not depend on ``--jobs`` or on scheduling.
    """

    split: str
    utt_id: str
    text: str
    spoken: str
    voice: str
    variant: str
    rate: int
    pitch: int
    lead_s: float
    trail_s: float
    noise: str
    snr_db: float
    peak: float
    noise_seed: int

    @property
    def speaker(self) -> str:
        return f"{self.voice}+{self.variant}"

    @property
    def audio(self) -> str:
        return f"wavs/{self.split}/{self.utt_id}.wav"


def plan_corpus(
    seed: int,
    num_train: int,
    num_valid: int,
    num_test: int,
    voices: Sequence[str] = TRAIN_VOICES,
    variants: Sequence[str] = TRAIN_VARIANTS,
) -> list[UtterancePlan]:
    """Sentences, split and all per-utterance random choices for a seed."""
    sentences = split_sentences(seed, num_train, num_valid, num_test)
    plans: list[UtterancePlan] = []
    for split in SPLITS:
        rng = random.Random(f"audio-{seed}-{split}")
        for index, (text, spoken) in enumerate(sentences[split]):
            if split == "test":
                voice, variant = HELD_OUT
            else:
                voice, variant = rng.choice(voices), rng.choice(variants)
            plans.append(
                UtterancePlan(
                    split=split,
                    utt_id=f"{split}_{index:05d}",
                    text=text,
                    spoken=spoken,
                    voice=voice,
                    variant=variant,
                    rate=rng.randint(*RATE_WPM),
                    pitch=rng.randint(*PITCH),
                    lead_s=round(rng.uniform(*SILENCE_S), 3),
                    trail_s=round(rng.uniform(*SILENCE_S), 3),
                    noise=rng.choice(("white", "pink")),
                    snr_db=round(rng.uniform(*SNR_DB), 2),
                    peak=round(rng.uniform(*PEAK), 3),
                    noise_seed=rng.getrandbits(32),
                )
            )
    return plans


# --------------------------------------------------------------------------------------
# eSpeak NG backends
# --------------------------------------------------------------------------------------

INSTALL_HINT = (
    "eSpeak NG is needed to synthesise the corpus: `pip install espeakng-loader` "
    "(preferred; ships the library and voices) or `apt-get install espeak-ng`."
)


class EspeakUnavailable(RuntimeError):
    """Raised when neither eSpeak NG backend can be used."""


def _seed_c_rand(seed: int) -> None:
    """Seed the C library's ``rand()`` (process-global, so not reset by reloading eSpeak)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # pragma: no cover - not a POSIX system
        return
    libc.srand.argtypes = [ctypes.c_uint]
    libc.srand(seed & 0xFFFFFFFF)


class LibraryEspeak:
    """eSpeak NG called in-process through ctypes (library from ``espeakng_loader``).

    Uses ``AUDIO_OUTPUT_SYNCHRONOUS``: ``espeak_Synth`` returns only when the text is
    spoken, having handed the samples (22,050 Hz int16) to our callback in chunks.

    Why the library is loaded afresh for every utterance: eSpeak keeps synthesis
    state in C statics (glottal phase, flutter position, ...) that neither
    ``espeak_Terminate`` nor ``espeak_Initialize`` resets, so the same text comes
    out a few samples longer or shorter depending on what was spoken before. That
    would make durations depend on which worker spoke what. Loading a private copy
    of the shared object, speaking once and ``dlclose``-ing it gives every utterance
    the same pristine state, for ~5 ms (initialisation reads the phoneme data).
    """

    name = "espeakng_loader"
    _AUDIO_OUTPUT_SYNCHRONOUS = 2
    _POS_CHARACTER = 1
    _CHARS_UTF8 = 1
    _RATE, _PITCH = 1, 3
    _CALLBACK = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
    )

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise EspeakUnavailable(INSTALL_HINT) from exc
        self.data_path = Path(espeakng_loader.get_data_path())
        # A private copy: nobody else in the process holds it, so dlclose unloads it.
        self._tmp = tempfile.TemporaryDirectory(prefix="espeak-lib-")
        self._lib_path = os.path.join(self._tmp.name, "libespeak-ng-private.so")
        shutil.copyfile(espeakng_loader.get_library_path(), self._lib_path)
        self._chunks: list[np.ndarray] = []
        # Keep a reference: ctypes frees the trampoline if the object is collected.
        self._callback = self._CALLBACK(self._collect)
        lib = self._load()
        try:
            self.version = f"eSpeak NG {lib.espeak_Info(None).decode()} (espeakng_loader)"
        finally:
            self._unload(lib)

    def _load(self) -> ctypes.CDLL:
        """Load and initialise a fresh instance of the library."""
        try:
            lib = ctypes.CDLL(self._lib_path)
        except OSError as exc:  # pragma: no cover - broken install
            raise EspeakUnavailable(f"cannot load libespeak-ng: {exc}. {INSTALL_HINT}")
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [self._CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        self.sample_rate = lib.espeak_Initialize(
            self._AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), 0
        )
        if self.sample_rate <= 0:
            self._unload(lib)
            raise EspeakUnavailable(f"espeak_Initialize failed ({self.sample_rate})")
        lib.espeak_SetSynthCallback(self._callback)
        return lib

    @staticmethod
    def _unload(lib: ctypes.CDLL) -> None:
        lib.espeak_Terminate()
        dlclose = getattr(_ctypes, "dlclose", None)
        if dlclose is not None:
            dlclose(lib._handle)

    def _collect(self, wav: Any, num_samples: int, _events: Any) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = continue synthesis

    def available(self) -> set[str]:
        """Lower-case voice and variant names found in the shipped data."""
        names = {p.name.lower() for p in (self.data_path / "lang").rglob("*") if p.is_file()}
        names |= {p.name.lower() for p in (self.data_path / "voices" / "!v").iterdir()}
        return names

    def synthesize(
        self, text: str, voice: str, variant: str, rate: int, pitch: int, seed: int = 1
    ) -> np.ndarray:
        """Speak ``text``; return float32 samples in [-1, 1] at ``self.sample_rate``.

        ``seed`` seeds the C library's ``rand()``, which eSpeak uses for breath noise
        (variants f2, f3, f5), so the samples, not only their count, are reproducible.
        """
        lib = self._load()
        try:
            _seed_c_rand(seed)
            if hasattr(lib, "espeak_ng_SetRandSeed"):
                lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
            if lib.espeak_SetVoiceByName(f"{voice}+{variant}".encode()) != 0:
                raise RuntimeError(f"eSpeak voice not found: {voice}+{variant}")
            # Parameters are set after the voice: choosing a voice may reset them.
            lib.espeak_SetParameter(self._RATE, rate, 0)
            lib.espeak_SetParameter(self._PITCH, pitch, 0)
            data = text.encode() + b"\0"
            self._chunks = []
            status = lib.espeak_Synth(
                data, len(data), 0, self._POS_CHARACTER, 0, self._CHARS_UTF8, None, None
            )
        finally:
            self._unload(lib)
        if status != 0 or not self._chunks:
            raise RuntimeError(f"espeak_Synth failed ({status}) for {text!r}")
        samples = np.concatenate(self._chunks)
        self._chunks = []
        return samples.astype(np.float32) / 32768.0


class CommandEspeak:
    """eSpeak NG through the ``espeak-ng`` program (fallback; one process per utterance)."""

    name = "espeak-ng"

    def __init__(self) -> None:
        program = shutil.which("espeak-ng")
        if program is None:
            raise EspeakUnavailable(INSTALL_HINT)
        self._program = program
        self._tmp = tempfile.TemporaryDirectory(prefix="espeak-")
        self.sample_rate = 22_050

    @property
    def version(self) -> str:
        out = subprocess.run(
            [self._program, "--version"], check=False, capture_output=True, text=True
        )
        first = out.stdout.strip().splitlines()[0] if out.stdout.strip() else "espeak-ng"
        return first.split("  Data at")[0].strip() + " (espeak-ng program)"

    def available(self) -> set[str]:
        """Lower-case voice and variant names listed by ``espeak-ng --voices``."""
        names: set[str] = set()
        for query in ("--voices=en", "--voices=variant"):
            out = subprocess.run(
                [self._program, query], check=False, capture_output=True, text=True
            )
            for line in out.stdout.splitlines()[1:]:
                fields = line.split()
                if len(fields) >= 5:
                    names.add(fields[1].lower())
                    names.add(fields[4].rsplit("/", 1)[-1].lower())
        return names

    def synthesize(
        self, text: str, voice: str, variant: str, rate: int, pitch: int, seed: int = 1
    ) -> np.ndarray:
        """Speak ``text``; return float32 samples in [-1, 1] at the file's rate.

        ``seed`` is unused: a fresh process always starts from the same state.
        """
        import soundfile

        path = os.path.join(self._tmp.name, "utt.wav")
        command = [self._program, "-v", f"{voice}+{variant}", "-s", str(rate)]
        command += ["-p", str(pitch), "-w", path, "--", text]
        subprocess.run(command, check=True, capture_output=True)
        samples, self.sample_rate = soundfile.read(path, dtype="float32")
        return samples if samples.ndim == 1 else samples.mean(axis=1)


Backend = LibraryEspeak | CommandEspeak


def find_backend(preferred: str | None = None) -> str:
    """Name of a usable backend: ``"library"`` if espeakng_loader imports, else ``"command"``.

    Raises :class:`EspeakUnavailable` with install instructions when neither works.
    """
    if preferred in (None, "library"):
        try:
            import espeakng_loader  # noqa: F401

            return "library"
        except ImportError:
            if preferred == "library":
                raise EspeakUnavailable(INSTALL_HINT) from None
    if shutil.which("espeak-ng"):
        return "command"
    raise EspeakUnavailable(INSTALL_HINT)


def make_backend(kind: str) -> Backend:
    """Instantiate a backend by the name :func:`find_backend` returns."""
    return LibraryEspeak() if kind == "library" else CommandEspeak()


# --------------------------------------------------------------------------------------
# Audio rendering
# --------------------------------------------------------------------------------------


def _noise(kind: str, num: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS white or pink (1/f power) noise of ``num`` samples."""
    white = rng.standard_normal(num)
    if kind == "pink":
        spectrum = np.fft.rfft(white)
        freqs = np.arange(len(spectrum), dtype=np.float64)
        freqs[0] = 1.0
        white = np.fft.irfft(spectrum / np.sqrt(freqs), n=num)
    rms = float(np.sqrt(np.mean(white**2))) or 1.0
    return white / rms


def render(plan: UtterancePlan, backend: Backend) -> np.ndarray:
    """Synthesize, resample to 16 kHz, pad, add noise and normalise one utterance.

    Returns float32 samples in [-1, 1] at :data:`SAMPLE_RATE`.
    """
    import torch
    import torchaudio.functional as AF

    speech = backend.synthesize(
        plan.spoken, plan.voice, plan.variant, plan.rate, plan.pitch, seed=plan.noise_seed
    )
    speech = (
        AF.resample(torch.from_numpy(speech), backend.sample_rate, SAMPLE_RATE)
        .numpy()
        .astype(np.float64)
    )
    rng = np.random.default_rng(plan.noise_seed)
    lead, trail = round(plan.lead_s * SAMPLE_RATE), round(plan.trail_s * SAMPLE_RATE)
    signal = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
    # SNR against the speech level (not the padded signal, whose silence would lower it).
    speech_rms = float(np.sqrt(np.mean(speech**2))) or 1e-4
    signal += _noise(plan.noise, len(signal), rng) * speech_rms / 10 ** (plan.snr_db / 20)
    peak = float(np.max(np.abs(signal))) or 1.0
    return (signal * (plan.peak / peak)).astype(np.float32)


def render_all(plans: Sequence[UtterancePlan], backend_kind: str, out_dir: Path) -> dict[str, int]:
    """Render ``plans`` into ``out_dir`` in this process; return ``{utt_id: num_samples}``.

    Torch runs single-threaded meanwhile (the caller's setting is restored): the
    per-utterance tensors are tiny, and with other work on the cores, thread
    hand-offs made resampling ~8x slower than one thread.
    """
    import soundfile
    import torch

    backend = make_backend(backend_kind)
    num_samples: dict[str, int] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for plan in plans:
            audio = render(plan, backend)
            soundfile.write(out_dir / plan.audio, audio, SAMPLE_RATE, subtype="PCM_16")
            num_samples[plan.utt_id] = len(audio)
    finally:
        torch.set_num_threads(threads)
    return num_samples


def _render_in_processes(
    plans: Sequence[UtterancePlan], backend_kind: str, out_dir: Path, jobs: int
) -> dict[str, int]:
    """Render with ``jobs`` worker processes, each running this file with ``--worker``.

    Why fresh interpreters rather than a ``multiprocessing`` pool: forking a parent
    that may already run torch threads can deadlock, and a spawn pool must re-import
    this module by name, which fails when it was loaded from a path (it lives in a
    script folder, not a package). Each worker sets up eSpeak once and renders a
    round-robin shard; since every plan is fixed up front the result does not depend
    on the number of workers.
    """
    num_samples: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="synthetic-shards-") as tmp:
        procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        for index in range(jobs):
            shard = [dataclasses.asdict(plan) for plan in plans[index::jobs]]
            task = Path(tmp) / f"shard{index}.json"
            task.write_text(
                json.dumps({"backend": backend_kind, "out_dir": str(out_dir), "plans": shard})
            )
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(task)]
            procs.append((subprocess.Popen(command), task.with_suffix(".done.json")))
        failed = [proc.args for proc, _ in procs if proc.wait() != 0]
        if failed:
            raise RuntimeError(f"{len(failed)} synthesis worker(s) failed (see stderr above)")
        for _, result in procs:
            num_samples.update(json.loads(result.read_text()))
    return num_samples


def _worker_main(task_path: str) -> int:
    """Entry point of a ``--worker`` process: render one shard, write its sample counts."""
    task = json.loads(Path(task_path).read_text())
    plans = [UtterancePlan(**plan) for plan in task["plans"]]
    num_samples = render_all(plans, task["backend"], Path(task["out_dir"]))
    Path(task_path).with_suffix(".done.json").write_text(json.dumps(num_samples))
    return 0


# --------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------

STAMP_NAME = ".synthetic_stamp.json"


@dataclasses.dataclass
class CorpusSummary:
    """What :func:`generate_corpus` made (or found already made)."""

    out_dir: Path
    counts: dict[str, int]
    hours: float
    seconds: float
    skipped: bool

    def line(self) -> str:
        counts = ", ".join(f"{split} {self.counts.get(split, 0)}" for split in SPLITS)
        verb = "already up to date" if self.skipped else f"generated in {self.seconds:.1f} s"
        return (
            f"synthetic corpus: {sum(self.counts.values())} utterances ({counts}), "
            f"{self.hours:.2f} h of audio, {verb} -> {self.out_dir}"
        )


def _stamp(seed: int, num_train: int, num_valid: int, num_test: int, backend: str) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_valid": num_valid,
        "num_test": num_test,
        "backend": backend,
    }


def _read_manifest_stats(out_dir: Path) -> tuple[dict[str, int], float]:
    """Counts and hours of an existing corpus; raises if a listed wav file is missing."""
    counts: dict[str, int] = {}
    seconds = 0.0
    for split in SPLITS:
        records = [
            json.loads(line) for line in (out_dir / f"{split}.jsonl").read_text().splitlines()
        ]
        for record in records:
            if not (out_dir / record["audio"]).is_file():
                raise FileNotFoundError(out_dir / record["audio"])
        counts[split] = len(records)
        seconds += sum(record["duration"] for record in records)
    return counts, seconds / 3600


def _readme(
    plans: Sequence[UtterancePlan],
    durations: dict[str, float],
    seed: int,
    backend_version: str,
    voices: Sequence[str],
    variants: Sequence[str],
) -> str:
    by_split: dict[str, list[UtterancePlan]] = {
        s: [p for p in plans if p.split == s] for s in SPLITS
    }
    train_words = {w for p in by_split["train"] for w in p.text.split()}
    used_words = {w for p in plans for w in p.text.split()}
    test_oov = sorted({w for p in by_split["test"] for w in p.text.split()} - train_words)
    lines = [
        "Synthetic spoken English corpus (speechformer data_prep/synthetic.py)",
        "",
        f"seed: {seed}",
        f"synthesiser: {backend_version}",
        f"audio: {SAMPLE_RATE} Hz mono 16-bit PCM wav under wavs/<split>/",
        (
            "manifests: train.jsonl valid.jsonl test.jsonl "
            "(id, audio relative to this folder, duration s, text, speaker)"
        ),
        "",
    ]
    for split in SPLITS:
        secs = sum(durations[p.utt_id] for p in by_split[split])
        count = len(by_split[split])
        mean = secs / count if count else 0.0
        lines.append(
            f"{split}: {count} utterances, {secs / 3600:.3f} h, mean {mean:.2f} s, "
            f"{len({p.speaker for p in by_split[split]})} speakers"
        )
    lines += [
        "",
        f"train/valid voices: {' '.join(voices)}",
        f"train/valid variants: {' '.join(variants)}",
        f"HELD-OUT test speaker: {HELD_OUT[0]}+{HELD_OUT[1]} speaks the whole test split and",
        f"  nothing else; variant {HELD_OUT[1]} is never used in train or valid.",
        f"speaking rate: {RATE_WPM[0]}-{RATE_WPM[1]} wpm; pitch {PITCH[0]}-{PITCH[1]} (0-100)",
        (
            f"noise: white or pink at {SNR_DB[0]:g}-{SNR_DB[1]:g} dB SNR; silence "
            f"{SILENCE_S[0]:g}-{SILENCE_S[1]:g} s each end; peak {PEAK[0]:g}-{PEAK[1]:g}"
        ),
        "",
        "text: lower case, no punctuation, numbers as words; 4-9 words per sentence;",
        "  train, valid and test hold disjoint sets of sentences.",
        (
            f"grammar vocabulary: {len(vocabulary())} distinct words; used in this corpus: "
            f"{len(used_words)}; in train: {len(train_words)}"
        ),
        f"test words never seen in train: {len(test_oov)}"
        + (f" ({' '.join(test_oov[:20])})" if test_oov else ""),
        "",
    ]
    return "\n".join(lines)


def generate_corpus(
    out_dir: str | os.PathLike[str],
    num_train: int = 3000,
    num_valid: int = 200,
    num_test: int = 200,
    seed: int = 0,
    jobs: int = 2,
    force: bool = False,
    backend: str | None = None,
) -> CorpusSummary:
    """Build (or reuse) the corpus in ``out_dir``; see the module docstring.

    ``backend`` forces ``"library"`` or ``"command"``; by default the library is used
    when importable. Raises :class:`EspeakUnavailable` when no backend works.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    kind = find_backend(backend)
    stamp = _stamp(seed, num_train, num_valid, num_test, kind)
    stamp_path = out / STAMP_NAME
    manifests = [out / f"{split}.jsonl" for split in SPLITS]
    if not force and stamp_path.exists() and all(m.exists() for m in manifests):
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                counts, hours = _read_manifest_stats(out)
                return CorpusSummary(out, counts, hours, time.perf_counter() - start, True)
        except (ValueError, KeyError, FileNotFoundError):
            pass  # unreadable stamp or manifest, or missing audio: regenerate

    probe = make_backend(kind)
    available = probe.available()
    voices = [v for v in TRAIN_VOICES if v in available]
    variants = [v for v in TRAIN_VARIANTS if v in available]
    if HELD_OUT[0] not in available or HELD_OUT[1] not in available:
        raise EspeakUnavailable(f"the held-out voice {'+'.join(HELD_OUT)} is missing")
    if not voices or not variants:
        raise EspeakUnavailable("no English eSpeak voices found")
    backend_version = probe.version
    del probe

    plans = plan_corpus(seed, num_train, num_valid, num_test, voices, variants)
    stamp_path.unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(out / "wavs" / split, ignore_errors=True)
        (out / "wavs" / split).mkdir(parents=True, exist_ok=True)

    if jobs <= 1 or len(plans) < 2:
        num_samples = render_all(plans, kind, out)
    else:
        num_samples = _render_in_processes(plans, kind, out, min(jobs, len(plans)))

    durations = {uid: round(n / SAMPLE_RATE, 3) for uid, n in num_samples.items()}
    for split, manifest in zip(SPLITS, manifests):
        tmp = manifest.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for plan in plans:
                if plan.split == split:
                    record = {
                        "id": plan.utt_id,
                        "audio": plan.audio,
                        "duration": durations[plan.utt_id],
                        "text": plan.text,
                        "speaker": plan.speaker,
                    }
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        tmp.replace(manifest)
    (out / "README.txt").write_text(
        _readme(plans, durations, seed, backend_version, voices, variants), encoding="utf-8"
    )
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    counts = {split: sum(p.split == split for p in plans) for split in SPLITS}
    hours = sum(durations.values()) / 3600
    return CorpusSummary(out, counts, hours, time.perf_counter() - start, False)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 2 and argv[0] == "--worker":  # internal: see _render_in_processes
        return _worker_main(argv[1])
    parser = argparse.ArgumentParser(
        description="Generate a seeded synthetic spoken English corpus with eSpeak NG."
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=3000)
    parser.add_argument("--num-valid", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="worker processes (default: 2, or 1 on a single-CPU machine)",
    )
    parser.add_argument(
        "--force", action="store_true", help="regenerate even if the stamp says up to date"
    )
    parser.add_argument(
        "--lm-text",
        type=Path,
        default=None,
        help="instead of the corpus: write --lm-sentences grammar sentences for a language model "
        "to this file (.txt or .txt.gz), none of them a valid or test sentence of the corpus "
        "these settings make (or of the manifests in --out)",
    )
    parser.add_argument("--lm-sentences", type=int, default=20000)
    parser.add_argument(
        "--backend",
        choices=("library", "command"),
        default=None,
        help="espeakng_loader library or espeak-ng program (default: library if installed)",
    )
    args = parser.parse_args(argv)
    for name in ("num_train", "num_valid", "num_test", "lm_sentences"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.lm_text is not None:
        held = held_out_sentences(args.seed, args.num_train, args.num_valid, args.num_test, Path(args.out))
        write_lm_text(args.lm_text, lm_sentences(args.lm_sentences, args.seed, held))
        print(f"synthetic LM text: {args.lm_sentences} sentences (none of the {len(held)} valid/test "
              f"sentences) -> {args.lm_text}")
        return 0
    try:
        summary = generate_corpus(
            args.out,
            args.num_train,
            args.num_valid,
            args.num_test,
            args.seed,
            args.jobs,
            force=args.force,
            backend=args.backend,
        )
    except EspeakUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
