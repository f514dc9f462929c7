"""Writes the function-calling sets: asked about a city, the assistant calls the right tool with the right arguments.

    python data/demo/make_tool_data.py        (deterministic: the same files every time)

Each conversation is one question and the assistant's tool call, the answer that `eval.generate` scores (the call
parses, names a declared tool, its arguments fit the schema and equal the reference's). Every call has the same id:
real ids are random, which a tiny model cannot learn in a minute, and the scores ignore ids. Two sets:
- tools_train/tools_eval.jsonl: two tools, `get_weather(city, unit)` and `get_time(city)`, where each score can fail
  on its own (a unit out of the enum, a required key missing); the eval set holds (tool, city) pairs that never occur
  in training.
- tools_demo_train/tools_demo_eval.jsonl, which configs/demo-tools.yaml teaches the demo's tiny model: one tool of
  one string parameter, so that its tools block is short (47 tokens), and each question ending with its city, one
  token there. The eval set holds (phrasing, city) pairs that never occur in training, one per city: a right answer
  reads the city from the question, as the greetings demo reads the name. Every city is in training, in other
  phrasings: the random model does not write a city it was never trained to write.
"""

import json
import random
from pathlib import Path

CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Oslo", "Lima"]
UNITS = ["celsius", "fahrenheit"]
CALL_ID = "a1b2c3d4e"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": UNITS}},
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The local time in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
]
QUESTIONS = {
    "get_weather": ["What is the weather in {city}, in {unit}?", "Weather for {city} please ({unit})."],
    "get_time": ["What time is it in {city}?", "Tell me the time in {city}."],
}

DEMO_CITIES = [
    "Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Delhi", "Sydney",
    "Moscow", "Dublin", "Vienna", "Boston", "Chicago", "Seattle", "Miami", "Denver",
]  # fmt: skip
DEMO_TOOLS = [
    {
        "type": "function",
        "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
    }
]
DEMO_QUESTIONS = ["Weather in {city}", "Is it raining in {city}", "How warm is it in {city}", "Forecast for {city}"]


def conversation(tool: str, city: str, rng: random.Random) -> dict:
    arguments = {"city": city, "unit": rng.choice(UNITS)} if tool == "get_weather" else {"city": city}
    call = {"id": CALL_ID, "type": "function", "function": {"name": tool, "arguments": json.dumps(arguments)}}
    question = rng.choice(QUESTIONS[tool]).format(**arguments)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "tool_calls": [call]}]
    return {"messages": messages, "tools": TOOLS}


def demo_conversation(city: str, phrasing: int) -> dict:
    call = {"id": CALL_ID, "type": "function", "function": {"name": "weather", "arguments": json.dumps({"city": city})}}
    question = DEMO_QUESTIONS[phrasing].format(city=city)
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "tool_calls": [call]}],
        "tools": DEMO_TOOLS,
    }


def demo_sets() -> tuple[list[dict], list[dict]]:
    """400 training conversations drawn from the (city, phrasing) pairs seen, and one held-out pair per city."""
    rng = random.Random(0)
    held_out = [(city, i % len(DEMO_QUESTIONS)) for i, city in enumerate(DEMO_CITIES)]
    seen = [(city, p) for city in DEMO_CITIES for p in range(len(DEMO_QUESTIONS)) if (city, p) not in held_out]
    return [demo_conversation(*rng.choice(seen)) for _ in range(400)], [demo_conversation(*pair) for pair in held_out]


def main() -> None:
    rng = random.Random(0)
    pairs = [(tool, city) for tool in QUESTIONS for city in CITIES]
    rng.shuffle(pairs)
    held_out, seen = pairs[:4], pairs[4:]
    train = [conversation(*rng.choice(seen), rng) for _ in range(300)]
    evaluation = [conversation(*pair, rng) for pair in held_out for _ in range(4)]
    demo_train, demo_evaluation = demo_sets()
    folder = Path(__file__).parent
    for name, rows in (
        ("tools_train.jsonl", train),
        ("tools_eval.jsonl", evaluation),
        ("tools_demo_train.jsonl", demo_train),
        ("tools_demo_eval.jsonl", demo_evaluation),
    ):
        with open(folder / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
