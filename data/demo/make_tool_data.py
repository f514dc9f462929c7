"""Writes the function-calling demo: asked about a city, the assistant calls the right tool with the right arguments.

    python data/demo/make_tool_data.py        (deterministic: the same files every time)

Two tools, `get_weather(city, unit)` and `get_time(city)`; each conversation is one question and the assistant's
tool call, the answer that `eval.generate` scores (the call parses, names a declared tool, its arguments fit the
schema and equal the reference's). The eval set holds (tool, city) pairs that never occur in training. Every call
has the same id: real ids are random, which a tiny model cannot learn in a minute, and the scores ignore ids.
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


def conversation(tool: str, city: str, rng: random.Random) -> dict:
    arguments = {"city": city, "unit": rng.choice(UNITS)} if tool == "get_weather" else {"city": city}
    call = {"id": CALL_ID, "type": "function", "function": {"name": tool, "arguments": json.dumps(arguments)}}
    question = rng.choice(QUESTIONS[tool]).format(**arguments)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "tool_calls": [call]}]
    return {"messages": messages, "tools": TOOLS}


def main() -> None:
    rng = random.Random(0)
    pairs = [(tool, city) for tool in QUESTIONS for city in CITIES]
    rng.shuffle(pairs)
    held_out, seen = pairs[:4], pairs[4:]
    train = [conversation(*rng.choice(seen), rng) for _ in range(300)]
    evaluation = [conversation(*pair, rng) for pair in held_out for _ in range(4)]
    folder = Path(__file__).parent
    for name, rows in (("tools_train.jsonl", train), ("tools_eval.jsonl", evaluation)):
        with open(folder / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
