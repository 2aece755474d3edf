"""Generated arithmetic word problems with whole-number answers: an instruction task found on every machine.

A problem is a template (buying, giving away, sharing, prices, ages, packing) filled with names, objects
and numbers drawn from one seeded generator, so the same seed and difficulty give the same problems.
The prompt ends with "\\nAnswer:" and the response is the answer after one space: " 42".
"""

import ast
import operator
import random
import re
from dataclasses import dataclass
from fractions import Fraction

from maskrun.errors import ConfigError


@dataclass(frozen=True)
class Template:
    text: str     # {name}, {friend}, {other} are people; {item}/{items} an object; single letters are numbers
    formula: str  # the answer in the template's number slots
    counts: str = ""     # number slots that count people, bags or boxes: 2..9 at every difficulty
    years: bool = False  # an age problem: its numbers are years, 1..99 at every difficulty


@dataclass(frozen=True)
class Level:
    operations: int  # operations per problem
    low: int         # range of the amounts (objects, prices)
    high: int


LEVELS = {
    1: Level(operations=1, low=1, high=99),
    2: Level(operations=2, low=1, high=99),
    3: Level(operations=2, low=100, high=999),
    4: Level(operations=3, low=100, high=999),
}

TEMPLATES = [
    # one operation
    Template("{name} has {a} {items}. {name} buys {b} more {items}. How many {items} does {name} have now?", "a + b"),
    Template("{name} has {a} {items} and gives {b} of them to {friend}. How many {items} does {name} have left?", "a - b"),
    Template("One {item} costs {a} dollars. How many dollars do {k} {items} cost?", "a * k", counts="k"),
    Template("{name} shares {a} {items} equally among {k} friends. How many {items} does each friend get?", "a / k",
             counts="k"),
    Template("{name} is {a} years old. How old will {name} be in {b} years?", "a + b", years=True),
    Template("{name} is {a} years old and {friend} is {b} years younger. How old is {friend}?", "a - b", years=True),
    # two operations
    Template("{name} has {a} {items}, buys {b} more and then gives {c} to {friend}. How many {items} does {name} have now?",
             "a + b - c"),
    Template("{name} buys {k} {items} at {a} dollars each and pays with {b} dollars. How many dollars of change does "
             "{name} get?", "b - k * a", counts="k"),
    Template("{name} has {a} {items} and buys {b} more, then shares them equally among {k} friends. How many {items} "
             "does each friend get?", "(a + b) / k", counts="k"),
    Template("{name} is {a} years old. {friend} is {b} years older than {name}. How old will {friend} be in {c} years?",
             "a + b + c", years=True),
    Template("{name} packs {k} boxes with {a} {items} each and has {b} {items} left over. How many {items} did {name} "
             "have?", "k * a + b", counts="k"),
    # three operations
    Template("{name} has {a} {items}, buys {k} bags of {b} {items} each, and gives {c} {items} to {friend}. How many "
             "{items} does {name} have now?", "a + k * b - c", counts="k"),
    Template("{name} has {a} {items} and {friend} has {b}. They give {c} away and share the rest equally among {k} "
             "people. How many {items} does each person get?", "(a + b - c) / k", counts="k"),
    Template("{name} is {a} years old, {friend} is {b} years younger than {name}, and {other} is {c} years older than "
             "{friend}. How old will {other} be in {d} years?", "a - b + c + d", years=True),
]

NAMES = ["Ava", "Ben", "Chloe", "Daniel", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack", "Kira", "Liam", "Maya",
         "Noah", "Olga", "Pablo", "Rosa", "Sam", "Tara", "Yusuf"]
OBJECTS = [("apple", "apples"), ("pencil", "pencils"), ("sticker", "stickers"), ("marble", "marbles"),
           ("cookie", "cookies"), ("book", "books"), ("card", "cards"), ("shell", "shells"), ("stamp", "stamps"),
           ("balloon", "balloons"), ("orange", "oranges"), ("notebook", "notebooks"), ("ticket", "tickets"),
           ("sandwich", "sandwiches"), ("toy car", "toy cars")]
SLOT = re.compile(r"\b[a-z]\b")  # a number slot in a formula: a single letter
COUNTS = range(2, 10)
YEARS = range(1, 100)
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


@dataclass(frozen=True)
class Problem:
    prompt: str
    response: str    # " <answer>"
    expression: str  # the formula with the prompt's numbers in it, e.g. "(12 + 30) / 6"


def operations(formula: str) -> int:
    return sum(formula.count(op) for op in "+-*/")


def steps(node: ast.expr, numbers: dict[str, int]) -> list[Fraction]:
    """The value of every step of a formula's syntax tree, exactly, in evaluation order: the answer last."""
    if isinstance(node, ast.Name):
        return [Fraction(numbers[node.id])]
    left, right = steps(node.left, numbers), steps(node.right, numbers)
    return left + right + [OPERATORS[type(node.op)](left[-1], right[-1])]


ATTEMPTS_PER_PROBLEM = 50  # draws per distinct problem before a difficulty is declared too small for `count`


def problems(count: int, difficulty: int, seed: int) -> list[Problem]:
    """`count` problems at `difficulty` (a key of LEVELS), drawn from random.Random(seed)."""
    level = LEVELS[difficulty]
    templates = [t for t in TEMPLATES if operations(t.formula) == level.operations]
    rng = random.Random(seed)
    # One problem per computation: two stories over the same numbers and formula (in any order of a sum or a
    # product) are the same problem, and one of them in training would give the other's answer away in test.
    found: dict[str, Problem] = {}
    for _ in range(count * ATTEMPTS_PER_PROBLEM):
        drawn = problem(rng.choice(templates), level, rng)
        found.setdefault(canonical(ast.parse(drawn.expression, mode="eval").body), drawn)
        if len(found) == count:
            return list(found.values())
    raise ConfigError(f"dataset.num_examples={count} exceeds the {len(found)} distinct problems found at "
                      f"difficulty {difficulty}", "lower dataset.num_examples or raise dataset.difficulty")


def canonical(node: ast.expr) -> str:
    """An expression with the operands of each chain of + or of * in sorted order: equal for equal computations."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        operands, pending = [], [node]
        while pending:
            part = pending.pop()
            if isinstance(part, ast.BinOp) and type(part.op) is type(node.op):
                pending += [part.left, part.right]
            else:
                operands.append(canonical(part))
        return "(" + (" + " if isinstance(node.op, ast.Add) else " * ").join(sorted(operands)) + ")"
    if isinstance(node, ast.BinOp):
        return f"({canonical(node.left)} {type(node.op).__name__} {canonical(node.right)})"
    return ast.unparse(node)


def problem(template: Template, level: Level, rng: random.Random) -> Problem:
    """The template filled in; numbers are drawn again until every step (an age, what is left, a share) is a
    whole number >= 0, the answer included."""
    name, friend, other = rng.sample(NAMES, 3)
    item, items = rng.choice(OBJECTS)
    slots = sorted(set(SLOT.findall(template.formula)))
    amounts = YEARS if template.years else range(level.low, level.high + 1)
    tree = ast.parse(template.formula, mode="eval").body
    while True:
        numbers = {s: rng.choice(COUNTS if s in template.counts else amounts) for s in slots}
        values = steps(tree, numbers)
        if all(value >= 0 and value.denominator == 1 for value in values):
            break
    answer = values[-1]
    words = {"name": name, "friend": friend, "other": other, "item": item, "items": items}
    return Problem(prompt=template.text.format(**words, **numbers) + "\nAnswer:", response=f" {answer.numerator}",
                   expression=SLOT.sub(lambda m: str(numbers[m.group()]), template.formula))
