"""Generate the bundled demo dataset: tinytune/data/demo.jsonl.

The task is one a small instruct model does not do out of the box but learns in a few dozen steps:
read a sentence about a person and answer with one line of JSON in a fixed shape, the city in
capitals. Before training the model answers in prose or loose JSON; after, in the exact format —
and the eval loss on held-out sentences shows it. Everything here is generated from the word lists
below with a fixed seed, so the file is reproducible:

    python tools/make_demo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Marta", "Ken", "Aisha", "Lars", "Priya", "Tomas", "Yuki", "Omar", "Elena", "Kofi", "Ines", "Mateo",
         "Hana", "Sven", "Leila", "Diego", "Nora", "Ravi", "Zofia", "Emeka", "Clara", "Jonas", "Mei", "Idris"]
CITIES = ["Lyon", "Osaka", "Nairobi", "Bergen", "Pune", "Porto", "Quito", "Krakow", "Tunis", "Accra", "Leeds",
          "Hobart", "Cusco", "Malmo", "Dakar", "Busan", "Graz", "Cork", "Medan", "Tartu"]
JOBS = ["baker", "nurse", "pilot", "teacher", "carpenter", "chemist", "florist", "plumber", "librarian",
        "welder", "farmer", "dentist", "architect", "translator", "painter", "mechanic"]
TEMPLATES = [
    "{name} is {age} years old and works as a {job} in {city}.",
    "In {city}, a {age}-year-old {job} named {name} opened a shop.",
    "Meet {name}: {job}, {age}, living in {city}.",
    "{name}, aged {age}, moved to {city} to become a {job}.",
    "The {job} {name} ({age}) was born and raised in {city}.",
    "After years away, {name} returned to {city}; the {job} is now {age}.",
    "Our new {job} is {name}, {age}, who commutes from {city}.",
    "{city} welcomed {name}, a {job} of {age} years.",
]
INSTRUCTIONS = [
    "Extract the person as JSON.",
    "Turn this sentence into a JSON record.",
    "Give the name, age, job and city as JSON.",
]


def make(n: int = 320, seed: int = 1234) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        person = {"name": rng.choice(NAMES), "age": rng.randint(19, 78), "job": rng.choice(JOBS), "city": rng.choice(CITIES)}
        sentence = rng.choice(TEMPLATES).format(**person)
        answer = json.dumps({"name": person["name"], "age": person["age"], "job": person["job"],
                             "city": person["city"].upper()})
        rows.append({"instruction": rng.choice(INSTRUCTIONS), "input": sentence, "output": answer})
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tinytune" / "data" / "demo.jsonl")
    parser.add_argument("-n", type=int, default=320, help="records (default 320, the bundled set)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    args.out.write_text("".join(json.dumps(r) + "\n" for r in make(args.n, args.seed)))
    print(f"wrote {args.out}")
