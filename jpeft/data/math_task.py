"""Embedded GSM8K-style arithmetic word problems.

A deterministic, seeded generator of grade-school word problems whose solutions follow the GSM8K format: one
sentence per arithmetic step with a calculator annotation ``<<a+b=c>>c`` and a final line ``#### N``. It is the
default task when no external data is available.

Every problem is first built as an abstract *skeleton* (story template plus the sequence of arithmetic events and
their operands) and then rendered to text (names, items, phrasing, optional distractor sentence). The split a problem
belongs to is a hash of its skeleton, so two problems that only differ in names or phrasing always land in the same
split, and ``train``/``valid``/``test`` are disjoint by construction, independently of the seed. Within a split,
skeletons are never repeated.

Problems are produced from a fixed candidate stream (candidate ``i`` is generated from its own RNG derived from
``(seed, i)``), and each split keeps the candidates that hash to it in stream order. Asking for more items therefore
never changes the first ones (prefix stability).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

__all__ = [
  "SPLITS",
  "TEMPLATE_NAMES",
  "MathTaskConfig",
  "MathProblem",
  "PRESETS",
  "iter_problems",
  "make_problems",
  "make_split",
  "as_dataset",
]

SPLITS = ("train", "valid", "test")
_ALLOWED_OPS = ("+", "-", "*", "/")


@dataclass(frozen=True)
class MathTaskConfig:
  """Difficulty and composition of the generated problems.

  Attributes:
      min_steps, max_steps: number of arithmetic steps (calculator annotations) per problem, drawn uniformly.
      ops: operations that may be used. ``"/"`` is optional and only ever produces exact divisions as the final
          step ("share equally among k ...").
      distractor_prob: probability that a problem contains one irrelevant sentence with a number in it.
      max_operand: largest number stated in a problem for additive quantities (starting amounts, amounts added
          or removed, per-item quantities in a product).
      min_operand: smallest such number.
      max_factor: largest count / multiplier / divisor used in ``*`` and ``/`` steps.
      max_result: upper bound for every intermediate and final value.
      templates: restrict the story templates (names from ``TEMPLATE_NAMES``); ``None`` uses all of them.
      split_fractions: expected share of the skeleton space assigned to train / valid / test.
  """

  min_steps: int = 2
  max_steps: int = 4
  ops: tuple[str, ...] = ("+", "-", "*")
  distractor_prob: float = 0.5
  max_operand: int = 50
  min_operand: int = 2
  max_factor: int = 10
  max_result: int = 1000
  templates: Optional[tuple[str, ...]] = None
  split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)

  def __post_init__(self) -> None:
    object.__setattr__(self, "ops", tuple(self.ops))
    if self.templates is not None:
      object.__setattr__(self, "templates", tuple(self.templates))
    object.__setattr__(self, "split_fractions", tuple(float(f) for f in self.split_fractions))

    if not 1 <= self.min_steps <= self.max_steps:
      raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
    if not self.ops:
      raise ValueError("ops must not be empty")
    bad = [op for op in self.ops if op not in _ALLOWED_OPS]
    if bad:
      raise ValueError(f"unsupported ops {bad}; allowed: {_ALLOWED_OPS}")
    if not set(self.ops) & {"+", "-", "*"}:
      raise ValueError("ops must contain at least one of '+', '-', '*'")
    if not 0.0 <= self.distractor_prob <= 1.0:
      raise ValueError(f"distractor_prob must be in [0, 1], got {self.distractor_prob}")
    if not 1 <= self.min_operand <= self.max_operand:
      raise ValueError(f"need 1 <= min_operand <= max_operand, got {self.min_operand}, {self.max_operand}")
    if self.max_factor < 2:
      raise ValueError(f"max_factor must be >= 2, got {self.max_factor}")
    if self.max_result < 2 * self.max_operand:
      raise ValueError(f"max_result ({self.max_result}) must be at least 2 * max_operand ({self.max_operand})")
    if self.templates is not None:
      unknown = [t for t in self.templates if t not in TEMPLATE_NAMES]
      if unknown or not self.templates:
        raise ValueError(f"unknown templates {unknown}; available: {TEMPLATE_NAMES}")
    if len(self.split_fractions) != 3 or min(self.split_fractions) <= 0:
      raise ValueError(f"split_fractions must be three positive numbers, got {self.split_fractions}")
    if abs(sum(self.split_fractions) - 1.0) > 1e-6:
      raise ValueError(f"split_fractions must sum to 1, got {self.split_fractions}")

  def to_dict(self) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "MathTaskConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown MathTaskConfig fields: {sorted(unknown)}")
    return cls(**d)


@dataclass(frozen=True)
class MathProblem:
  question: str
  answer: str
  split: str
  index: int  # position of the source candidate in the stream
  template: str
  num_steps: int
  final_value: int
  has_distractor: bool
  key: str  # hex digest of the skeleton

  def as_record(self) -> dict[str, str]:
    return {"question": self.question, "answer": self.answer}


# --------------------------------------------------------------------------------------------------------------------
# word lists
# --------------------------------------------------------------------------------------------------------------------

_FEMALE = (
  "Maria",
  "Emma",
  "Sofia",
  "Aisha",
  "Lena",
  "Priya",
  "Olivia",
  "Hannah",
  "Chloe",
  "Mei",
  "Fatima",
  "Grace",
  "Nora",
  "Zoe",
  "Isabel",
  "Amara",
  "Julia",
  "Yuki",
  "Rosa",
  "Ingrid",
)
_MALE = (
  "James",
  "Liam",
  "Omar",
  "Lucas",
  "Mateo",
  "Noah",
  "Ethan",
  "Raj",
  "Daniel",
  "Kenji",
  "Samuel",
  "Felix",
  "Hugo",
  "Tariq",
  "Leo",
  "Ben",
  "Carlos",
  "Pavel",
  "Kwame",
  "Owen",
)
_PRONOUNS = {
  "f": {"pro": "she", "Pro": "She", "pos": "her", "Pos": "Her", "obj": "her"},
  "m": {"pro": "he", "Pro": "He", "pos": "his", "Pos": "His", "obj": "him"},
}

_POOLS: dict[str, tuple[str, ...]] = {
  "store": ("grocery store", "bookstore", "mall", "farmers market", "hardware store", "toy store"),
  "gift": ("scarf", "board game", "coffee mug", "picture frame", "plant", "puzzle"),
  "goods": ("notebooks", "T-shirts", "mugs", "comic books", "water bottles", "candles"),
  "snack": ("crackers", "juice boxes", "granola bars", "pretzels"),
  "goal": ("bicycle", "guitar", "skateboard", "tablet", "telescope", "tent"),
  "place": ("the coast", "the mountains", "her aunt's town", "the national park", "the lake", "the city"),
  "other": ("marbles", "comic books", "houseplants", "stamps", "puzzles", "toy cars"),
  "station": ("Maple Street", "Central Station", "Riverside", "Oak Park", "Harbor View", "Hillcrest"),
  "feed": ("pounds of feed", "pounds of hay", "scoops of grain"),
}

_GENERIC_DISTRACTORS = (
  "{name} is {d} years old.",
  "{Pos} friend {friend} has {d} {other} at home.",
  "It is {d} degrees outside that day.",
  "There are {d} days left until {pos} birthday.",
  "{friend} lives {d} blocks away from {name}.",
)


# --------------------------------------------------------------------------------------------------------------------
# story templates
#
# Placeholders: {name} {friend} {pro} {Pro} {pos} {Pos} {obj} {item} {item_s} and the pool keys above; {a} start
# value, {b} {c} operands of a product or the amount added/removed, {k} multiplier/divisor, {d} a distractor number.
# In solutions {calc} is one annotated step and {calc1}/{calc2} the two steps of a grouped event (product, then
# adding or removing it). Money templates write "$" before amounts themselves; {calc} adds "$<<" when needed.
# Each event is a list of (question sentence, solution sentence) pairs; "convert" entries carry a third field that
# says whether the converted result is money.
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Template:
  name: str
  money: bool
  items: tuple[tuple[str, str], ...]
  intro: tuple[str, ...]
  intro_group: tuple[tuple[str, str], ...]
  add: tuple[tuple[str, str], ...]
  sub: tuple[tuple[str, str], ...]
  group_add: tuple[tuple[str, str], ...]
  group_sub: tuple[tuple[str, str], ...]
  ask: tuple[str, ...]
  scale: tuple[tuple[str, str], ...] = ()
  convert: tuple[tuple[str, str, bool], ...] = ()
  split: tuple[tuple[str, str], ...] = ()
  distractors: tuple[str, ...] = ()


_TEMPLATES: tuple[_Template, ...] = (
  _Template(
    name="shopping",
    money=True,
    items=(("dollars", "dollar"),),
    intro=(
      "{name} has ${a} to spend at the {store}.",
      "{name} goes to the {store} with ${a} in {pos} wallet.",
    ),
    intro_group=(
      ("{name} takes {b} bills worth ${c} each to the {store}.", "{name} starts with {calc}."),
      ("{name} has {b} gift cards worth ${c} each to use at the {store}.", "The gift cards are worth {calc}."),
    ),
    add=(
      ("At the entrance, {pro} finds ${b} in {pos} coat pocket.", "After finding the money, {name} has {calc}."),
      ("{friend} pays {obj} back the ${b} {friend} borrowed last week.", "Now {name} has {calc}."),
      ("{Pro} returns an old purchase and gets a ${b} refund.", "With the refund, {pro} has {calc}."),
    ),
    sub=(
      ("{Pro} spends ${b} on a {gift}.", "After buying the {gift}, {pro} has {calc} left."),
      ("{Pro} pays ${b} for lunch.", "After lunch, {name} has {calc} left."),
      ("{Pro} buys a birthday present for {friend} that costs ${b}.", "The present leaves {obj} with {calc}."),
    ),
    group_add=(
      (
        "{Pro} sells {b} old {goods} to {friend} for ${c} each.",
        "{Pro} earns {calc1} from the sale.\nSo {pro} has {calc2}.",
      ),
      (
        "{Pro} sells {b} raffle tickets for ${c} each and keeps the money.",
        "The tickets bring in {calc1}.\nNow {name} has {calc2}.",
      ),
    ),
    group_sub=(
      (
        "{Pro} buys {b} {goods} that cost ${c} each.",
        "The {goods} cost {calc1} in total.\n{name} has {calc2} left.",
      ),
      (
        "{Pro} picks up {b} packs of {snack} for ${c} per pack.",
        "The {snack} cost {calc1}.\nThat leaves {obj} with {calc2}.",
      ),
    ),
    split=(
      (
        "{Pro} divides the money that is left equally among {pos} {k} cousins. How much money does each cousin get?",
        "Each cousin gets {calc}.",
      ),
    ),
    ask=("How much money does {name} have left?", "How many dollars does {name} have at the end?"),
    distractors=("The {store} has {d} aisles.", "The {store} opened {d} years ago."),
  ),
  _Template(
    name="saving",
    money=True,
    items=(("dollars", "dollar"),),
    intro=(
      "{name} is saving for a new {goal}. {Pro} already has ${a} in {pos} piggy bank.",
      "{name} wants to buy a {goal} and has saved ${a} so far.",
    ),
    intro_group=(
      (
        "{name} is saving for a new {goal}. {Pro} saved ${c} a week for {b} weeks.",
        "{Pro} saved {calc} so far.",
      ),
      (
        "{name} wants to buy a {goal}. {Pro} earned ${c} on each of {b} weekends by helping at a bakery.",
        "{Pro} earned {calc} so far.",
      ),
    ),
    add=(
      ("{Pos} grandmother gives {obj} ${b} for {pos} birthday.", "After the birthday gift, {pro} has {calc}."),
      ("{Pro} earns ${b} by washing {pos} neighbor's car.", "{Pro} now has {calc}."),
      ("{Pro} finds ${b} under the couch cushions and adds it to {pos} savings.", "That makes {calc}."),
    ),
    sub=(
      ("{Pro} takes out ${b} to buy a present for {friend}.", "{Pro} has {calc} left after buying the present."),
      ("{Pro} spends ${b} on a movie ticket and popcorn.", "After the movie, {pro} has {calc}."),
      ("{Pro} spends ${b} on a new pair of headphones.", "After buying the headphones, {pro} has {calc} left."),
    ),
    group_add=(
      (
        "{Pro} walks {pos} neighbor's dog {b} times and earns ${c} each time.",
        "Walking the dog earns {obj} {calc1}.\nNow {pro} has {calc2}.",
      ),
      ("{Pro} mows {b} lawns for ${c} per lawn.", "Mowing earns {obj} {calc1}.\nSo {pro} has {calc2} saved."),
    ),
    group_sub=(
      (
        "{Pro} buys {b} {goods} for ${c} each.",
        "The {goods} cost {calc1}.\n{Pro} has {calc2} left in savings.",
      ),
      (
        "{Pro} pays for {b} swimming lessons that cost ${c} each.",
        "The lessons cost {calc1}.\nThat leaves {calc2} in savings.",
      ),
    ),
    split=(
      (
        "{Pro} splits all of the savings equally into {k} envelopes. How much money goes into each envelope?",
        "Each envelope gets {calc}.",
      ),
    ),
    ask=("How much money does {name} have saved now?", "How many dollars has {name} saved in the end?"),
    distractors=("The {goal} {name} wants is {d} inches long.", "{name} has been saving for {d} days."),
  ),
  _Template(
    name="baking",
    money=False,
    items=(("cookies", "cookie"), ("cupcakes", "cupcake"), ("muffins", "muffin"), ("brownies", "brownie")),
    intro=("{name} bakes {a} {item} for a bake sale.", "{name} made {a} {item} on Saturday morning."),
    intro_group=(
      ("{name} bakes {b} trays of {item} with {c} {item} on each tray.", "{Pro} bakes {calc} {item}."),
      ("{name} makes {b} batches of {item}, and each batch has {c} {item}.", "{Pro} makes {calc} {item}."),
    ),
    add=(
      ("{Pos} friend {friend} brings {b} more {item}.", "Now there are {calc} {item}."),
      ("{Pro} bakes another {b} {item} in the afternoon.", "That makes {calc} {item}."),
      ("{Pos} neighbor drops off {b} {item} as a gift.", "That brings the total to {calc} {item}."),
    ),
    sub=(
      ("{Pos} family eats {b} of the {item}.", "After that, {calc} {item} are left."),
      ("{Pro} drops {b} {item} on the floor and throws them away.", "{Pro} has {calc} {item} left."),
      ("{Pro} sells {b} {item} to {friend}.", "Then {calc} {item} remain."),
    ),
    group_add=(
      (
        "Then {pro} bakes {b} more batches with {c} {item} in each batch.",
        "The new batches have {calc1} {item}.\nIn total {pro} has {calc2} {item}.",
      ),
      (
        "{friend} drops off {b} boxes that each hold {c} {item}.",
        "The boxes hold {calc1} {item}.\nNow there are {calc2} {item}.",
      ),
    ),
    group_sub=(
      (
        "{Pro} gives {c} {item} to each of {pos} {b} neighbors.",
        "{Pro} gives away {calc1} {item}.\nSo {pro} has {calc2} {item} left.",
      ),
      (
        "{Pro} fills {b} gift bags with {c} {item} each.",
        "The gift bags take {calc1} {item}.\nThat leaves {calc2} {item}.",
      ),
    ),
    convert=(("{Pro} sells every {item_s} for ${k}. How much money does {pro} make?", "{Pro} makes {calc}.", True),),
    split=(
      (
        "{Pro} packs the {item} equally into {k} boxes. How many {item} go in each box?",
        "Each box gets {calc} {item}.",
      ),
    ),
    ask=("How many {item} does {name} have now?", "How many {item} does {name} have in the end?"),
    distractors=("The oven takes {d} minutes to heat up.", "The recipe was written {d} years ago."),
  ),
  _Template(
    name="road_trip",
    money=False,
    items=(("miles", "mile"),),
    intro=(
      "{name} is driving to {place}, which is {a} miles away.",
      "{name} starts a road trip to {place}. The whole route is {a} miles long.",
    ),
    intro_group=(
      (
        "{name} plans a trip to {place}. The route has {b} stretches that are each {c} miles long.",
        "The trip is {calc} miles long.",
      ),
      (
        "{name} is driving to {place}. The map shows {b} legs of {c} miles each.",
        "The trip is {calc} miles in total.",
      ),
    ),
    add=(
      (
        "A closed bridge forces {obj} to take a detour that adds {b} miles to the trip.",
        "The detour makes the remaining distance {calc} miles.",
      ),
      (
        "{Pro} has to pick up {friend} on the way, which adds {b} miles.",
        "Picking up {friend} makes it {calc} miles to go.",
      ),
      ("{Pro} misses an exit and has to drive {b} extra miles.", "The missed exit makes it {calc} miles to go."),
    ),
    sub=(
      ("Before lunch, {pro} drives {b} miles.", "After that, {pro} still has {calc} miles to go."),
      ("{Pro} stops for gas after driving {b} miles.", "At the gas station, {calc} miles remain."),
      ("{Pro} drives {b} miles and then stops to stretch {pos} legs.", "Then {calc} miles are left."),
    ),
    group_add=(
      (
        "Road work adds {b} detours of {c} miles each.",
        "The detours add {calc1} miles.\nThe remaining distance is now {calc2} miles.",
      ),
      (
        "Because of heavy traffic, {pro} takes {b} side roads that each add {c} miles.",
        "The side roads add {calc1} miles.\nNow {calc2} miles remain.",
      ),
    ),
    group_sub=(
      (
        "After lunch, {pro} drives for {b} hours at {c} miles per hour.",
        "In those hours {pro} covers {calc1} miles.\nThat leaves {calc2} miles.",
      ),
      (
        "Later, {pro} drives {b} stretches of {c} miles each.",
        "The stretches cover {calc1} miles.\nSo {calc2} miles remain.",
      ),
    ),
    split=(
      (
        "{Pro} wants to drive the rest of the way in {k} equal parts. How many miles long is each part?",
        "Each part is {calc} miles.",
      ),
    ),
    ask=("How many miles does {name} still have to drive?", "How far is {name} from {place} now, in miles?"),
    distractors=("{Pos} car is {d} years old.", "The radio station plays {d} songs every hour."),
  ),
  _Template(
    name="train",
    money=False,
    items=(("passengers", "passenger"),),
    intro=(
      "A train leaves {station} with {a} passengers on board.",
      "{name} is the conductor of a train that leaves {station} with {a} passengers.",
    ),
    intro_group=(
      (
        "A train leaves {station} with {b} cars, and each car carries {c} passengers.",
        "The train starts with {calc} passengers.",
      ),
      (
        "{name}'s train has {b} cars with {c} passengers in each car.",
        "There are {calc} passengers at the start.",
      ),
    ),
    add=(
      ("At the next station, {b} passengers get on.", "Now there are {calc} passengers."),
      ("At {station2}, {b} more people board the train.", "The train then carries {calc} passengers."),
      ("At a small village stop, {b} passengers climb aboard.", "There are now {calc} passengers."),
    ),
    sub=(
      ("At {station3}, {b} passengers get off.", "That leaves {calc} passengers."),
      ("{b} passengers leave the train at the airport stop.", "Now {calc} passengers remain."),
      ("At the next stop, {b} passengers leave the train.", "Then {calc} passengers are still on board."),
    ),
    group_add=(
      (
        "Then {b} families of {c} people board the train.",
        "The families add {calc1} passengers.\nThe train now carries {calc2} passengers.",
      ),
      (
        "At {station4}, {b} tour groups with {c} people each get on.",
        "The tour groups bring {calc1} people.\nThe train now has {calc2} passengers.",
      ),
    ),
    group_sub=(
      (
        "At the museum stop, {b} school groups of {c} students each get off.",
        "The groups have {calc1} students.\nThere are {calc2} passengers left.",
      ),
      (
        "At the stadium stop, {b} teams of {c} players get off.",
        "The teams have {calc1} players.\nThat leaves {calc2} passengers.",
      ),
    ),
    convert=(
      (
        "Every passenger still on the train paid ${k} for a ticket. How much money did these passengers pay in total?",
        "They paid {calc}.",
        True,
      ),
    ),
    split=(
      (
        "The passengers spread out evenly across {k} cars. How many passengers are in each car?",
        "Each car has {calc} passengers.",
      ),
    ),
    ask=("How many passengers are on the train now?", "How many people are riding the train at the end?"),
    distractors=("The train has been in service for {d} years.", "The trip to {station2} takes {d} minutes."),
  ),
  _Template(
    name="school_supplies",
    money=False,
    items=(
      ("pencils", "pencil"),
      ("markers", "marker"),
      ("erasers", "eraser"),
      ("crayons", "crayon"),
      ("stickers", "sticker"),
    ),
    intro=("{name} has {a} {item} in {pos} backpack.", "{name} keeps {a} {item} in {pos} desk at school."),
    intro_group=(
      ("{name} buys {b} boxes of {item} with {c} {item} in each box.", "{Pro} has {calc} {item}."),
      ("{name} gets {b} packs of {item}, and each pack has {c} {item}.", "That is {calc} {item}."),
    ),
    add=(
      ("{Pos} teacher gives {obj} {b} more {item}.", "{Pro} now has {calc} {item}."),
      ("{Pro} finds {b} {item} at the bottom of {pos} locker.", "That gives {obj} {calc} {item}."),
      ("{friend} gives {obj} {b} {item}.", "Now {pro} has {calc} {item}."),
    ),
    sub=(
      ("{Pro} lends {b} {item} to {friend}.", "{Pro} has {calc} {item} left."),
      ("{Pro} loses {b} {item} on the bus.", "After that, {pro} has {calc} {item}."),
      ("{Pro} throws away {b} worn-out {item}.", "{Pro} has {calc} {item} remaining."),
    ),
    group_add=(
      (
        "{Pro} wins {b} packs of {item} in a raffle, and each pack has {c} {item}.",
        "The packs hold {calc1} {item}.\nThat brings {obj} to {calc2} {item}.",
      ),
      (
        "{Pro} buys {b} more boxes with {c} {item} in each.",
        "The boxes have {calc1} {item}.\n{Pro} now has {calc2} {item}.",
      ),
    ),
    group_sub=(
      (
        "{Pro} gives {c} {item} to each of {b} classmates.",
        "{Pro} gives away {calc1} {item}.\n{Pro} keeps {calc2} {item}.",
      ),
      (
        "{Pro} hands out {c} {item} to each of {b} teams in a class game.",
        "The teams get {calc1} {item}.\nThat leaves {obj} with {calc2} {item}.",
      ),
    ),
    convert=(("Each {item_s} costs ${k}. How much are all of {name}'s {item} worth?", "They are worth {calc}.", True),),
    split=(
      (
        "{Pro} puts the {item} into {k} cups with the same number in each cup. How many {item} are in each cup?",
        "Each cup has {calc} {item}.",
      ),
    ),
    ask=("How many {item} does {name} have now?", "How many {item} does {name} end up with?"),
    distractors=(
      "There are {d} students in {name}'s class.",
      "{Pos} school day lasts {d} minutes longer on Fridays.",
    ),
  ),
  _Template(
    name="farm",
    money=False,
    items=(("chickens", "chicken"), ("sheep", "sheep"), ("goats", "goat"), ("ducks", "duck"), ("cows", "cow")),
    intro=("Farmer {name} has {a} {item}.", "{name} runs a small farm with {a} {item}."),
    intro_group=(
      (
        "Farmer {name} keeps {item} in {b} pens, with {c} {item} in each pen.",
        "{Pro} has {calc} {item}.",
      ),
      ("{name} has {b} barns, and each barn holds {c} {item}.", "{Pro} has {calc} {item}."),
    ),
    add=(
      ("{Pro} buys {b} more {item} at the market.", "{Pro} now has {calc} {item}."),
      ("In the spring, {b} young {item} are born on the farm.", "That makes {calc} {item}."),
      ("A neighbor gives {obj} {b} {item}.", "So {pro} has {calc} {item}."),
    ),
    sub=(
      ("{Pro} sells {b} {item} to a neighbor.", "{Pro} has {calc} {item} left."),
      ("{b} of the {item} escape through a hole in the fence.", "{Pro} is left with {calc} {item}."),
      ("{Pro} gives {b} {item} to {pos} cousin.", "That leaves {calc} {item}."),
    ),
    group_add=(
      (
        "{Pro} buys {b} groups of {c} {item} from another farm.",
        "The groups have {calc1} {item}.\nNow the farm has {calc2} {item}.",
      ),
      (
        "{b} neighbors each give {obj} {c} {item}.",
        "The neighbors give {obj} {calc1} {item}.\nNow {pro} has {calc2} {item}.",
      ),
    ),
    group_sub=(
      (
        "{Pro} sells {c} {item} to each of {b} neighbors.",
        "{Pro} sells {calc1} {item}.\n{Pro} keeps {calc2} {item}.",
      ),
      (
        "{Pro} sends {b} trucks to a fair, and each truck carries {c} {item}.",
        "The trucks carry {calc1} {item}.\nThat leaves {calc2} {item} on the farm.",
      ),
    ),
    scale=(
      (
        "A year later, {pro} has {k} times as many {item}.",
        "A year later there are {calc} {item}.",
      ),
      (
        "Over the next few years, the number of {item} becomes {k} times as large.",
        "Then there are {calc} {item}.",
      ),
    ),
    convert=(
      (
        "Each {item_s} needs {k} {feed} per week. How many {feed} does {name} need each week?",
        "{Pro} needs {calc} {feed}.",
        False,
      ),
    ),
    split=(
      (
        "{Pro} divides the {item} equally among {k} fields. How many {item} are in each field?",
        "Each field has {calc} {item}.",
      ),
    ),
    ask=("How many {item} does {name} have now?", "How many {item} are on the farm at the end?"),
    distractors=("The farm is {d} miles from the nearest town.", "{name}'s barn was built {d} years ago."),
  ),
  _Template(
    name="fruit_picking",
    money=False,
    items=(("apples", "apple"), ("oranges", "orange"), ("peaches", "peach"), ("pears", "pear"), ("plums", "plum")),
    intro=("{name} picks {a} {item} at the orchard.", "{name} brings home {a} {item} from the market."),
    intro_group=(
      (
        "{name} picks {b} baskets of {item}, and each basket holds {c} {item}.",
        "{Pro} picks {calc} {item}.",
      ),
      ("{name} fills {b} bags with {c} {item} each at the orchard.", "{Pro} has {calc} {item}."),
    ),
    add=(
      ("{friend} gives {obj} {b} more {item}.", "{Pro} now has {calc} {item}."),
      ("{Pro} picks {b} more {item} from the last tree.", "That makes {calc} {item}."),
      ("{Pro} buys {b} {item} at a roadside stand.", "Then {pro} has {calc} {item}."),
    ),
    sub=(
      ("{Pro} uses {b} {item} to make jam.", "{Pro} has {calc} {item} left."),
      ("{b} of the {item} are bruised, so {pro} throws them away.", "That leaves {calc} {item}."),
      ("{Pro} gives {b} {item} to {friend}.", "{Pro} has {calc} {item} remaining."),
    ),
    group_add=(
      (
        "{Pos} neighbor brings over {b} bags with {c} {item} in each bag.",
        "The bags hold {calc1} {item}.\nAltogether {pro} has {calc2} {item}.",
      ),
      (
        "{Pro} buys {b} crates of {item} with {c} {item} in each crate.",
        "The crates hold {calc1} {item}.\nNow {pro} has {calc2} {item}.",
      ),
    ),
    group_sub=(
      (
        "{Pro} bakes {b} pies and uses {c} {item} in each pie.",
        "The pies use {calc1} {item}.\n{Pro} has {calc2} {item} left.",
      ),
      (
        "{Pro} gives {c} {item} to each of {b} friends.",
        "{Pro} gives away {calc1} {item}.\n{Pro} has {calc2} {item} left.",
      ),
    ),
    convert=(
      (
        "{Pro} sells each {item_s} for ${k} at the market. How much money does {pro} earn?",
        "{Pro} earns {calc}.",
        True,
      ),
    ),
    split=(
      (
        "{Pro} puts the {item} into {k} bags with the same number in each. How many {item} are in each bag?",
        "Each bag has {calc} {item}.",
      ),
    ),
    ask=("How many {item} does {name} have now?", "How many {item} does {name} have at the end?"),
    distractors=("The orchard has {d} rows of trees.", "The market is open {d} hours a week."),
  ),
)

TEMPLATE_NAMES: tuple[str, ...] = tuple(t.name for t in _TEMPLATES)
_TEMPLATE_BY_NAME = {t.name: t for t in _TEMPLATES}

# operations used by each event kind and the number of annotated steps it produces
_EVENT_OPS = {
  "intro_group": ("*",),
  "add": ("+",),
  "sub": ("-",),
  "group_add": ("*", "+"),
  "group_sub": ("*", "-"),
  "scale": ("*",),
  "convert": ("*",),
  "split": ("/",),
}
_FINAL_ONLY = ("convert", "split")
_EVENT_WEIGHTS = {
  "add": 1.0,
  "sub": 1.2,
  "group_add": 0.8,
  "group_sub": 0.9,
  "scale": 0.5,
  "convert": 0.7,
  "split": 0.6,
}
_INTRO_GROUP_PROB = 0.3
_SKELETON_TRIES = 20

# "default" is the difficulty the comparison suite is calibrated on (experiments/README.md, "Default budget"):
# SmolLM2-135M-Instruct scores 0 % untrained and LoRA r32 learns it part-way within a CPU-sized budget, so
# methods separate instead of saturating. "medium" (MathTaskConfig's own defaults: 2-4 steps, distractors,
# operands up to 50) is for larger budgets or models; "hard" adds division and longer chains.
_EASY = MathTaskConfig(min_steps=1, max_steps=2, distractor_prob=0.0, max_operand=20, max_factor=5, max_result=200)
PRESETS: dict[str, MathTaskConfig] = {
  "default": _EASY,
  "easy": _EASY,
  "medium": MathTaskConfig(),
  "hard": MathTaskConfig(
    min_steps=3,
    max_steps=5,
    ops=("+", "-", "*", "/"),
    distractor_prob=0.8,
    max_operand=99,
    max_factor=12,
    max_result=5000,
  ),
}


# --------------------------------------------------------------------------------------------------------------------
# skeletons
# --------------------------------------------------------------------------------------------------------------------


def _randint(rng: random.Random, lo: int, hi: int) -> Optional[int]:
  return rng.randint(lo, hi) if lo <= hi else None


def _try_event(kind: str, rng: random.Random, cur: int, cfg: MathTaskConfig) -> Optional[tuple[tuple, int]]:
  """Draw operands for ``kind`` applied to ``cur``; ``None`` if impossible under the config bounds."""
  lo, hi = cfg.min_operand, cfg.max_operand
  if kind == "add":
    b = _randint(rng, lo, min(hi, cfg.max_result - cur))
    return None if b is None else (("add", b), cur + b)
  if kind == "sub":
    b = _randint(rng, lo, min(hi, cur - 2))
    return None if b is None else (("sub", b), cur - b)
  if kind == "group_add":
    b = _randint(rng, 2, min(cfg.max_factor, (cfg.max_result - cur) // 2))
    if b is None:
      return None
    c = _randint(rng, 2, min(hi, (cfg.max_result - cur) // b))
    return None if c is None else (("group_add", b, c), cur + b * c)
  if kind == "group_sub":
    b = _randint(rng, 2, min(cfg.max_factor, (cur - 2) // 2))
    if b is None:
      return None
    c = _randint(rng, 2, min(hi, (cur - 2) // b))
    return None if c is None else (("group_sub", b, c), cur - b * c)
  if kind == "scale":
    k = _randint(rng, 2, min(cfg.max_factor, 5, cfg.max_result // max(cur, 1)))
    return None if k is None else (("scale", k), cur * k)
  if kind == "convert":
    k = _randint(rng, 2, min(cfg.max_factor, cfg.max_result // max(cur, 1)))
    return None if k is None else (("convert", k), cur * k)
  if kind == "split":
    divisors = [k for k in range(2, min(cfg.max_factor, cur // 2) + 1) if cur % k == 0]
    if not divisors:
      return None
    k = rng.choice(divisors)
    return ("split", k), cur // k
  raise AssertionError(kind)


def _supports(template: _Template, kind: str) -> bool:
  return bool(getattr(template, kind))


def _skeleton(rng: random.Random, cfg: MathTaskConfig, template: _Template) -> Optional[tuple[tuple, int, int]]:
  """Returns (events, final value, number of steps) or None if this draw failed."""
  ops = set(cfg.ops)
  n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
  remaining = n_steps
  events: list[tuple] = []
  if "*" in ops and template.intro_group and rng.random() < _INTRO_GROUP_PROB:
    b = rng.randint(2, min(cfg.max_factor, cfg.max_result // 2))
    c = rng.randint(2, max(2, min(cfg.max_operand, cfg.max_result // b)))
    events.append(("intro_group", b, c))
    cur = b * c
    remaining -= 1
  else:
    cur = rng.randint(cfg.min_operand, cfg.max_operand)
    events.append(("intro", cur))

  used_ops: set[str] = {"*"} if events[0][0] == "intro_group" else set()
  while remaining > 0:
    pool = [
      kind
      for kind in _EVENT_WEIGHTS
      if _supports(template, kind)
      and set(_EVENT_OPS[kind]) <= ops
      and len(_EVENT_OPS[kind]) <= remaining
      and (kind not in _FINAL_ONLY or len(_EVENT_OPS[kind]) == remaining)
    ]
    result = None
    while pool and result is None:
      kind = rng.choices(pool, weights=[_EVENT_WEIGHTS[k] for k in pool])[0]
      pool.remove(kind)
      result = _try_event(kind, rng, cur, cfg)
    if result is None:
      return None
    event, cur = result
    events.append(event)
    used_ops.update(_EVENT_OPS[event[0]])
    remaining -= len(_EVENT_OPS[event[0]])

  if n_steps >= 2 and len(ops) > 1 and len(used_ops) < 2:
    return None  # ask for a mix of operations whenever more than one is allowed
  return tuple(events), cur, n_steps


def _skeleton_key(template: _Template, events: tuple) -> str:
  return hashlib.sha256(repr((template.name, events)).encode()).hexdigest()


def _split_of(key: str, fractions: tuple[float, float, float]) -> str:
  u = int(key[:16], 16) / float(1 << 64)
  if u < fractions[0]:
    return "train"
  if u < fractions[0] + fractions[1]:
    return "valid"
  return "test"


def _candidate_rng(seed: int, index: int) -> random.Random:
  digest = hashlib.sha256(f"jpeft-math-task/{seed}/{index}".encode()).digest()
  return random.Random(int.from_bytes(digest[:8], "little"))


# --------------------------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------------------------


def _calc(x: int, op: str, y: int, value: int, money: bool) -> str:
  expr = f"{x}{op}{y}"
  return f"{expr} = {'$' if money else ''}<<{expr}={value}>>{value}"


class _Picker:
  """Chooses phrases without repeating one inside a problem while alternatives remain."""

  def __init__(self, rng: random.Random) -> None:
    self.rng = rng
    self.left: dict[str, list] = {}

  def pick(self, kind: str, options: Sequence) -> Any:
    if not self.left.get(kind):
      self.left[kind] = list(options)
    choice = self.rng.choice(self.left[kind])
    self.left[kind].remove(choice)
    return choice


def _render(rng: random.Random, cfg: MathTaskConfig, template: _Template, events: tuple) -> tuple[str, str, bool]:
  gender = rng.choice(("f", "m"))
  name = rng.choice(_FEMALE if gender == "f" else _MALE)
  friend = rng.choice([n for n in _FEMALE + _MALE if n != name])
  item, item_s = rng.choice(template.items)
  stations = rng.sample(_POOLS["station"], 4)
  fields: dict[str, Any] = {key: rng.choice(words) for key, words in _POOLS.items()}
  fields.update(_PRONOUNS[gender])
  fields.update(name=name, friend=friend, item=item, item_s=item_s)
  fields.update(station=stations[0], station2=stations[1], station3=stations[2], station4=stations[3])
  if gender == "m":
    fields["place"] = fields["place"].replace("her aunt's", "his aunt's")
  picker = _Picker(rng)
  money = template.money

  sentences: list[str] = []
  solution: list[str] = []
  final_question: Optional[str] = None
  cur = 0
  for event in events:
    kind = event[0]
    if kind == "intro":
      cur = event[1]
      sentences.append(picker.pick(kind, template.intro).format_map({**fields, "a": cur}))
      continue
    if kind == "intro_group":
      _, b, c = event
      q, s = picker.pick(kind, template.intro_group)
      value = b * c
      f = {**fields, "b": b, "c": c, "calc": _calc(b, "*", c, value, money)}
    elif kind in ("add", "sub"):
      b = event[1]
      op = "+" if kind == "add" else "-"
      value = cur + b if kind == "add" else cur - b
      q, s = picker.pick(kind, getattr(template, kind))
      f = {**fields, "b": b, "calc": _calc(cur, op, b, value, money)}
    elif kind in ("group_add", "group_sub"):
      _, b, c = event
      product = b * c
      op = "+" if kind == "group_add" else "-"
      value = cur + product if kind == "group_add" else cur - product
      q, s = picker.pick(kind, getattr(template, kind))
      f = {
        **fields,
        "b": b,
        "c": c,
        "calc1": _calc(b, "*", c, product, money),
        "calc2": _calc(cur, op, product, value, money),
      }
    elif kind == "scale":
      k = event[1]
      value = cur * k
      q, s = picker.pick(kind, template.scale)
      f = {**fields, "k": k, "calc": _calc(cur, "*", k, value, money)}
    elif kind == "convert":
      k = event[1]
      value = cur * k
      q, s, result_money = picker.pick(kind, template.convert)
      f = {**fields, "k": k, "calc": _calc(cur, "*", k, value, result_money)}
    elif kind == "split":
      k = event[1]
      value = cur // k
      q, s = picker.pick(kind, template.split)
      f = {**fields, "k": k, "calc": _calc(cur, "/", k, value, money)}
    else:
      raise AssertionError(kind)
    text = q.format_map(f)
    if kind in _FINAL_ONLY:
      final_question = text
    else:
      sentences.append(text)
    solution.extend(s.format_map(f).split("\n"))
    cur = value

  if final_question is None:
    final_question = rng.choice(template.ask).format_map(fields)
  # drawn last, so that a problem differs from its distractor-free version only by the inserted sentence
  has_distractor = rng.random() < cfg.distractor_prob
  if has_distractor:
    pattern = rng.choice(template.distractors + _GENERIC_DISTRACTORS)
    d = rng.randint(2, max(2, cfg.max_operand))
    sentences.insert(rng.randint(1, len(sentences)), pattern.format_map({**fields, "d": d}))
  sentences.append(final_question)
  solution.append(f"#### {cur}")
  return " ".join(sentences), "\n".join(solution), has_distractor


# --------------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------------


def _resolve_templates(cfg: MathTaskConfig) -> tuple[_Template, ...]:
  names = cfg.templates if cfg.templates is not None else TEMPLATE_NAMES
  return tuple(_TEMPLATE_BY_NAME[n] for n in names)


def iter_problems(
  name: str, seed: int = 0, config: Optional[MathTaskConfig] = None, *, max_misses: int = 200_000
) -> Iterator[MathProblem]:
  """Endless stream of unique problems of split ``name`` (``"train"``, ``"valid"`` or ``"test"``).

  Raises RuntimeError when ``max_misses`` consecutive candidates yield nothing new (configuration space exhausted).
  """
  if name not in SPLITS:
    raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
  cfg = config if config is not None else MathTaskConfig()
  templates = _resolve_templates(cfg)
  seen: set[str] = set()
  index = 0
  misses = 0
  while True:
    rng = _candidate_rng(seed, index)
    index += 1
    misses += 1
    if misses > max_misses:
      raise RuntimeError(
        f"no new {name!r} problem in {max_misses} candidates ({len(seen)} generated); "
        "the configuration allows too few distinct problems"
      )
    template = rng.choice(templates)
    skeleton = None
    for _ in range(_SKELETON_TRIES):
      skeleton = _skeleton(rng, cfg, template)
      if skeleton is not None:
        break
    if skeleton is None:
      continue
    events, final_value, n_steps = skeleton
    key = _skeleton_key(template, events)
    if key in seen or _split_of(key, cfg.split_fractions) != name:
      continue
    seen.add(key)
    misses = 0
    question, answer, has_distractor = _render(rng, cfg, template, events)
    yield MathProblem(
      question=question,
      answer=answer,
      split=name,
      index=index - 1,
      template=template.name,
      num_steps=n_steps,
      final_value=final_value,
      has_distractor=has_distractor,
      key=key,
    )


def make_problems(name: str, n: int, seed: int = 0, config: Optional[MathTaskConfig] = None) -> list[MathProblem]:
  """First ``n`` problems of split ``name``, with metadata."""
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  out: list[MathProblem] = []
  if n == 0:
    return out
  for problem in iter_problems(name, seed, config):
    out.append(problem)
    if len(out) >= n:
      break
  return out


def make_split(name: str, n: int, seed: int = 0, config: Optional[MathTaskConfig] = None) -> list[dict[str, str]]:
  """First ``n`` problems of split ``name`` as GSM8K-style records ``{"question": ..., "answer": ...}``."""
  return [p.as_record() for p in make_problems(name, n, seed, config)]


def as_dataset(name: str, n: int, seed: int = 0, config: Optional[MathTaskConfig] = None):
  """``make_split`` as a ``datasets.Dataset`` with columns ``question`` and ``answer``."""
  import datasets

  records = make_split(name, n, seed, config)
  return datasets.Dataset.from_dict(
    {"question": [r["question"] for r in records], "answer": [r["answer"] for r in records]}
  )
