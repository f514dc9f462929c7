"""Writes the demo's conversations: greetings in a fixed format, a skill a tiny model learns in a minute.

    python data/demo/make_demo_data.py        (deterministic: the same files every time)

The user asks to greet a person at a time of day, in one of several phrasings; the assistant answers
"Good <time>, <Name>!". Learning it means reading two words from the prompt and following the template.
The eval set holds (name, time) pairs that never occur in training.
"""

import json
import random
from pathlib import Path

NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry"]
TIMES = ["morning", "afternoon", "evening", "night"]
PHRASINGS = [
    "Greet {name} in the {time}.",
    "Please say hi to {name}, it is {time}.",
    "It's {time}. Welcome {name}.",
    "{name} just arrived this {time}. Greet them.",
]
SYSTEM = "You greet people politely and briefly."


def conversation(name: str, time: str, rng: random.Random) -> dict:
    messages = [
        {"role": "user", "content": rng.choice(PHRASINGS).format(name=name, time=time)},
        {"role": "assistant", "content": f"Good {time}, {name}!"},
    ]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": messages}


def main() -> None:
    rng = random.Random(0)
    pairs = [(n, t) for n in NAMES for t in TIMES]
    rng.shuffle(pairs)
    held_out, seen = pairs[:8], pairs[8:]
    train = [conversation(*rng.choice(seen), rng) for _ in range(400)]
    evaluation = [conversation(*pair, rng) for pair in held_out for _ in range(4)]
    folder = Path(__file__).parent
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        with open(folder / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
