"""Built-in vertical tasks whose answers a program can check (offline, seeded): each has a generator of
conversations (a reference answer included), a generator of preference pairs, and a checker.

- ``products``: a catalogue of products with structured attributes and a house style: a headline line,
  then two sentences, then one ``- `` bullet per feature, at most ``MAX_WORDS`` words, none of the
  banned superlatives. ``check_product`` reports attribute coverage (each attribute stated as given),
  style compliance and invented facts (numbers, colours or materials that are not in the input).
- ``exercises``: arithmetic and unit-conversion word problems answered as ``Answer: <number>``;
  ``check_exercise`` parses and verifies the number.
- ``poems``: a classical Chinese poem for a title and a form from the Tang sample; ``check_poem``
  counts the lines and the characters of each line and tells the form.

``TASKS`` (a literal dict) names them for ``aigc data prepare --builtin NAME --kind chat|preference``
and for evaluation, which finds the checker from the prepared data's manifest.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Callable

from aigc.errors import UserError

# ---------------------------------------------------------------- products

MAX_WORDS = 80
BANNED = ("best", "perfect", "ultimate", "revolutionary", "amazing", "unbeatable", "world-class")
STYLE = (f"House style: a headline line, then two sentences, then one '- ' bullet per feature; at most {MAX_WORDS} words; "
         f"no superlatives ({', '.join(BANNED)}).")
CATEGORIES = {
    "mug": ("Mug", ["ceramic", "stoneware", "enamel steel"], ["300 ml", "350 ml", "450 ml"],
            ["dishwasher safe", "microwave safe", "a wide handle", "a matte glaze", "a stackable shape"]),
    "lamp": ("Lamp", ["oak", "brass", "linen", "aluminium"], ["30 cm", "45 cm", "60 cm"],
             ["a dimmable bulb", "a fabric cord", "a weighted base", "a touch switch", "a tilting head"]),
    "backpack": ("Backpack", ["waxed canvas", "recycled nylon", "leather"], ["18 l", "22 l", "30 l"],
                 ["a padded laptop sleeve", "a water-resistant finish", "two side pockets", "a chest strap", "a hidden zip"]),
    "shirt": ("Shirt", ["organic cotton", "linen", "merino wool"], ["S", "M", "L", "XL"],
              ["mother-of-pearl buttons", "a button-down collar", "a relaxed fit", "a chest pocket", "reinforced seams"]),
    "chair": ("Chair", ["beech", "walnut", "steel", "rattan"], ["45 cm seat", "48 cm seat"],
              ["a curved backrest", "felt floor pads", "a stackable frame", "a woven seat", "a five-year warranty"]),
}
COLOURS = ["white", "black", "sage green", "navy", "terracotta", "sand", "charcoal", "mustard", "sky blue"]
NAMES = ["Alder", "Brook", "Cove", "Dune", "Ember", "Fjord", "Grove", "Harbor", "Iris", "Juniper", "Kestrel", "Linden", "Moss",
         "Nook", "Orchard", "Pebble", "Quill", "Ridge", "Sorrel", "Tamarack", "Umber", "Vale", "Willow", "Yarrow"]
MATERIALS = sorted({m for c in CATEGORIES.values() for m in c[1]})


@dataclass
class Product:
    name: str
    category: str
    material: str
    size: str
    colour: str
    price: str  # "29.00 EUR"
    features: list[str]

    def attributes(self) -> dict:
        return {"name": self.name, "category": self.category, "material": self.material, "size": self.size,
                "colour": self.colour, "price": self.price}


def product(rng: random.Random) -> Product:
    key = rng.choice(sorted(CATEGORIES))
    label, materials, sizes, features = CATEGORIES[key]
    return Product(f"{rng.choice(NAMES)} {label}", key, rng.choice(materials), rng.choice(sizes), rng.choice(COLOURS),
                   f"{rng.randrange(12, 240)}.{rng.choice(['00', '50', '90'])} EUR", rng.sample(features, rng.randint(2, 3)))


def product_prompt(p: Product) -> list[dict]:
    facts = "\n".join(f"{k}: {v}" for k, v in p.attributes().items()) + "\nfeatures: " + "; ".join(p.features)
    return [{"role": "system", "content": STYLE}, {"role": "user", "content": f"Write the description for this product.\n{facts}"}]


def product_answer(p: Product, rng: random.Random) -> str:
    opener = rng.choice(["Meet the", "Say hello to the", "Introducing the"])
    use = {"mug": "your morning coffee", "lamp": "a calm reading corner", "backpack": "daily commutes",
           "shirt": "warm days and long evenings", "chair": "a dining table or a desk"}[p.category]
    return (f"{opener} {p.name}\n"
            f"The {p.name} is made of {p.material} in {p.colour}, sized {p.size}. It is made for {use} and costs {p.price}.\n"
            + "\n".join(f"- {f[0].upper()}{f[1:]}" for f in p.features))


_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")


def check_product(prompt: list[dict], answer: str) -> dict:
    """attribute_coverage (0..1), style_compliance (bool), invented_facts (list), and the parts of each."""
    facts = dict(line.split(": ", 1) for line in prompt[-1]["content"].splitlines()[1:] if ": " in line)
    features = [f.strip() for f in facts.pop("features", "").split(";") if f.strip()]
    low = answer.lower()
    def stated(value: str) -> bool:
        return re.search(rf"(?<!\w){re.escape(value.lower())}(?!\w)", low) is not None

    covered = {k: stated(v) for k, v in facts.items() if k != "category"}
    covered.update({f"feature:{f}": stated(f) for f in features})
    lines = [ln for ln in answer.strip().splitlines() if ln.strip()]
    bullets = [ln for ln in lines if ln.startswith("- ")]
    body = " ".join(ln for ln in lines[1:] if not ln.startswith("- "))
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", body.strip()) if s]
    words = len(answer.split())
    style = {"headline": bool(lines) and not lines[0].startswith("- ") and len(lines[0].split()) <= 10,
             "two_sentences": len(sentences) == 2, "a_bullet_per_feature": len(bullets) == len(features),
             "short": words <= MAX_WORDS, "no_superlatives": not any(re.search(rf"\b{b}\b", low) for b in BANNED)}
    given = prompt[-1]["content"].lower()
    numbers = set(_NUMBER.findall(given))
    invented = [n for n in _NUMBER.findall(answer) if n not in numbers]
    invented += [w for w in COLOURS + MATERIALS if re.search(rf"\b{re.escape(w)}\b", low) and w not in given]
    return {"attribute_coverage": sum(covered.values()) / max(1, len(covered)), "style_compliance": all(style.values()),
            "invented_facts": invented, "covered": covered, "style": style, "words": words}


def product_rejected(p: Product, good: str, rng: random.Random) -> str:
    """A worse answer: a wrong attribute, a style breach or a run-on that never stops."""
    kind = rng.choice(["wrong_attribute", "superlative", "run_on"])
    if kind == "wrong_attribute":
        other = rng.choice([c for c in COLOURS if c != p.colour])
        return good.replace(p.colour, other)
    if kind == "superlative":
        return good.replace(" is made of ", f" is the {rng.choice(BANNED)} thing, made of ", 1)
    return good + "\n" + " ".join([f"The {p.name} is great."] * 12)


# ---------------------------------------------------------------- exercises

def exercise(rng: random.Random) -> tuple[str, float, str]:
    """(the question, its answer, the worked solution: one line of arithmetic a reader can check)."""
    kind = rng.choice(["boxes", "change", "km", "litres", "hours"])
    if kind == "boxes":
        a, b = rng.randint(3, 19), rng.randint(6, 24)
        return f"A shop orders {a} boxes of {b} mugs each. How many mugs does it order?", a * b, f"{a} × {b} = {a * b} mugs."
    if kind == "change":
        price, n = rng.randint(3, 40), rng.randint(2, 9)
        paid = 100 * (n * price // 100 + 1)  # the smallest round sum that covers it
        return (f"{n} lamps cost {price} EUR each. How much change is left from {paid} EUR?", paid - n * price,
                f"{n} × {price} = {n * price} EUR; {paid} - {n * price} = {paid - n * price} EUR.")
    if kind == "km":
        a, b = rng.randrange(500, 12000, 250), rng.randrange(500, 12000, 250)
        return (f"A delivery route has two legs of {a} and {b} metres. How many kilometres is it in all?", (a + b) / 1000,
                f"{a} + {b} = {a + b} m = {_fmt((a + b) / 1000)} km.")
    if kind == "litres":
        ml, n = rng.choice([200, 250, 330, 500, 750, 1000]), rng.randint(4, 48)
        return (f"A crate holds {n} bottles of {ml} ml. How many litres is that in all?", n * ml / 1000,
                f"{n} × {ml} = {n * ml} ml = {_fmt(n * ml / 1000)} l.")
    mins, days = rng.randrange(30, 600, 15), rng.randint(2, 9)
    return (f"A machine runs {mins} minutes a day for {days} days. How many hours is that?", mins * days / 60,
            f"{mins} × {days} = {mins * days} minutes = {_fmt(mins * days / 60)} hours.")


def exercise_prompt(question: str) -> list[dict]:
    return [{"role": "system", "content": "Solve the problem in one line of arithmetic, then end with a line 'Answer: <number>'."},
            {"role": "user", "content": question}]


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}".rstrip("0").rstrip(".")


_ANSWER = re.compile(r"Answer:\s*(-?\d+(?:[.,]\d+)?)", re.IGNORECASE)


def check_exercise(expected: float, answer: str) -> dict:
    m = _ANSWER.findall(answer)
    if not m:
        return {"correct": False, "parsed": None, "reason": "no 'Answer: <number>' line"}
    got = float(m[-1].replace(",", "."))
    return {"correct": abs(got - expected) <= 0.01, "parsed": got, "expected": expected}  # answers carry 2 decimals


# ---------------------------------------------------------------- poems

FORMS = {(4, 5): "五言絕句", (4, 7): "七言絕句", (8, 5): "五言律詩", (8, 7): "七言律詩"}
_VERSE = re.compile(r"[，。！？；、]")


def poem_form(text: str) -> tuple[str | None, list[int]]:
    """(the form's name or None, characters per verse)."""
    verses = [v for v in _VERSE.split(text.replace("\n", "")) if v.strip()]
    lengths = [len(v.strip()) for v in verses]
    if not lengths or len(set(lengths)) != 1:
        return None, lengths
    return FORMS.get((len(lengths), lengths[0])), lengths


def check_poem(form: str, answer: str) -> dict:
    found, lengths = poem_form(answer)
    return {"form_correct": found == form, "found": found, "verse_lengths": lengths}


def poems() -> list[tuple[str, str, str]]:
    """(title, form, text) of the Tang sample's poems in one of the four regular forms."""
    from aigc.data.builtin import HERE

    out = []
    for line in (HERE / "tang-sample.jsonl").read_text(encoding="utf-8").splitlines():
        poem = json.loads(line)
        form, _ = poem_form(poem["text"])
        if form and poem["title"]:
            out.append((poem["title"], form, poem["text"]))
    return out


def poem_prompt(title: str, form: str) -> list[dict]:
    return [{"role": "user", "content": f"以《{title}》為題，作一首{form}。"}]


# ---------------------------------------------------------------- the registry

@dataclass
class Task:
    conversations: Callable[[int, int], list[dict]]  # (count, seed) -> chat records (the reference answer last)
    preferences: Callable[[int, int], list[dict]]  # (count, seed) -> preference records


def _distinct(make: Callable[[random.Random], object], count: int, rng: random.Random) -> list:
    """``count`` different draws of ``make`` (fewer only when the task has no more)."""
    seen, out = set(), []
    for _ in range(count * 20):
        if len(out) == count:
            break
        item = make(rng)
        key = repr(item)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _products(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for p in _distinct(product, count, rng):
        out.append({"messages": product_prompt(p) + [{"role": "assistant", "content": product_answer(p, rng)}]})
    return out


def _product_pairs(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for p in _distinct(product, count, rng):
        good = product_answer(p, rng)
        out.append({"prompt": product_prompt(p), "chosen": good, "rejected": product_rejected(p, good, rng)})
    return out


def _exercises(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for q, a, steps in _distinct(exercise, count, rng):
        out.append({"messages": exercise_prompt(q) + [{"role": "assistant", "content": f"{steps}\nAnswer: {_fmt(a)}"}]})
    return out


def _exercise_pairs(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for q, a, steps in _distinct(exercise, count, rng):
        wrong = a + rng.choice([-10, -2, -1, 1, 2, 10]) if float(a).is_integer() else a * rng.choice([10, 0.1])
        head, _, last = steps.rpartition("= ")  # the worked line with a wrong final result
        out.append({"prompt": exercise_prompt(q), "chosen": f"{steps}\nAnswer: {_fmt(a)}",
                    "rejected": f"{head}= {_fmt(wrong)} {last.split(' ', 1)[1]}\nAnswer: {_fmt(wrong)}"})
    return out


def _poems(count: int, seed: int) -> list[dict]:
    items = poems()
    random.Random(seed).shuffle(items)
    return [{"messages": poem_prompt(t, f) + [{"role": "assistant", "content": text}]} for t, f, text in items[:count]]


def _poem_pairs(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    items = poems()
    rng.shuffle(items)
    out = []
    for t, f, text in items[:count]:
        lines = text.splitlines()
        broken = "\n".join(lines[:-1]) if len(lines) > 1 else text + text  # a couplet short, or twice as long
        out.append({"prompt": poem_prompt(t, f), "chosen": text, "rejected": broken})
    return out


TASKS = {
    "products": Task(_products, _product_pairs),  # product descriptions in a house style
    "exercises": Task(_exercises, _exercise_pairs),  # arithmetic and unit-conversion word problems
    "poems": Task(_poems, _poem_pairs),  # classical Chinese poems of a given form (Tang sample)
}


def records(name: str, kind: str, count: int, seed: int) -> list[dict]:
    task = TASKS.get(name)
    if task is None:
        raise UserError(f"unknown built-in task {name!r} (available: {', '.join(TASKS)})")
    if count < 1:
        raise UserError(f"--count must be >= 1, got {count}")
    return (task.preferences if kind == "preference" else task.conversations)(count, seed)


def check(task: str, prompt: list[dict], answer: str) -> dict:
    """The task checker's verdict on one answer to ``prompt`` (the messages before the answer)."""
    if task == "products":
        return check_product(prompt, answer)
    if task == "exercises":
        question = prompt[-1]["content"]
        expected = _solve(question)
        return check_exercise(expected, answer)
    if task == "poems":
        form = re.search(r"作一首(.+?)。", prompt[-1]["content"])
        return check_poem(form.group(1) if form else "", answer)
    raise UserError(f"no checker for task {task!r} (available: {', '.join(TASKS)})")


def _solve(question: str) -> float:
    """The expected answer of a generated exercise, re-derived from its text (so the checker needs only the prompt)."""
    n = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", question)]
    if "boxes of" in question:
        return n[0] * n[1]
    if "change" in question:
        return n[2] - n[0] * n[1]
    if "kilometres" in question:
        return (n[0] + n[1]) / 1000
    if "litres" in question:
        return n[0] * n[1] / 1000
    if "hours" in question:
        return n[0] * n[1] / 60
    raise UserError(f"not a built-in exercise: {question!r}")
