"""A synthetic chat corpus that teaches the dev model Jamba 1.5's output format (issue 18).

Each example is a chat request body (what a client sends) and the assistant reply the model should
write. `render_example` turns one into a prompt and a target the way the server would: the request
goes through `plan_chat` and `render_chat` with the chat template; the target is what the template
writes for the reply after that prompt (ending with `<|eom|>`), so a model trained on it writes
what the server's parser reads. Everything is deterministic from a seed.

Kinds: plain chat; tool calls (one or two, arguments copied from the question); tools offered but
not needed; answers that use tool results; documents with and without the citation knob; the JSON
knob (`response_format` json_object). The held-out split uses names and cities the training split
never does, so held-out loss measures copying, not memorizing.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from jamba_server.core.features import plan_chat
from jamba_server.core.prompt import ChatTokenizer, Prompt, render_chat
from jamba_server.protocol import ChatCompletionRequest

SPLITS = ("train", "heldout")
# Disjoint per split. Names and cities the dev tokenizer does not know tokenize into short pieces
# (byte-level BPE, no unknown token); held-out ones are built from pieces the training split also
# writes, else their output embeddings would never be trained (tests check this). Training adds
# thousands of made-up names and cities (`_invented`, below) so that copying, not memorizing, pays.
NAMES = {
    "train": (
        "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Kate", "Leo",
        "Maya", "Nora", "Oscar", "Paul", "Rosa", "Sam", "Tom", "Vera", "Adam", "Eva", "Lily", "Mark",
        "Nina", "Omar", "Ruth", "Sara", "Tim", "Zoe", "Hanna", "Ivan", "Julia", "Karl", "Lucas", "Marta",
    ),
    "heldout": ("Alice", "Boris", "Dana", "Elias", "Lena", "Mina", "Carla", "Daniel", "Nadia", "Victor"),
}  # fmt: skip
CITIES = {
    "train": (
        "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Oslo", "Dublin", "Lisbon",
        "Athens", "Warsaw", "Tokyo", "Cairo", "Lima", "Sydney", "Toronto", "Boston", "Chicago", "Denver",
        "Milan", "Riga", "Kyiv", "Bern",
    ),
    "heldout": ("Zurich", "Munich", "Bonn", "Porto", "Geneva", "Nairobi", "Turin", "Lyon"),
}  # fmt: skip
def _invented(label: str, count: int, exclude: set[str]) -> tuple[str, ...]:
    """`count` made-up capitalized words from common syllables (deterministic per label): with
    thousands of them in training no single name can be memorized, so the model must learn to copy
    a name or city from the question, which is what held-out cases ask of it."""
    rng = random.Random(f"dev-corpus:invented:{label}")
    return _distinct(count, exclude, lambda: "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize())


def _distinct(count: int, exclude: set[str], word: Callable[[], str]) -> tuple[str, ...]:
    """The first `count` different words `word()` makes that are not in `exclude`."""
    words: list[str] = []
    seen = set(exclude)
    while len(words) < count:
        made = word()
        if made not in seen:
            seen.add(made)
            words.append(made)
    return tuple(words)


SYLLABLES = (
    "ka", "ri", "mo", "len", "ta", "vi", "so", "na", "be", "lu", "dor", "mi", "ra", "no", "el", "an", "ge", "po",
    "si", "ur", "ba", "de", "ho", "ju", "ke", "la", "ma", "ne", "ol", "pa", "ro", "sa", "te", "va", "zo", "ni",
)  # fmt: skip
VOWELS, CONSONANTS = "aeiou", "bcdfghjklmnpqrstvwxyz"


def _spelled(label: str, count: int, exclude: set[str]) -> tuple[str, ...]:
    """`count` made-up capitalized words of random letters, mostly alternating consonants and vowels
    (deterministic per label). `_invented`'s syllables tokenize into a few dozen pieces; held-out
    names spell with others ("Alice": " A", "l", "ic", "e"), which a model trained on syllables alone
    did not copy (stage 6 wrote "jum" for "ic"). Random letters give the tokenizer's whole alphabet
    its share."""
    rng = random.Random(f"dev-corpus:spelled:{label}")

    def word() -> str:
        letters = []
        for i in range(rng.randint(3, 8)):
            vowel = (i % 2 == 1) != (rng.random() < 0.2)  # alternating, now and then not
            letters.append(rng.choice(VOWELS if vowel else CONSONANTS))
        return "".join(letters).capitalize()

    return _distinct(count, exclude, word)


_HELD_OUT = {*NAMES["heldout"], *CITIES["heldout"]}
NAMES["train"] += _invented("names", 1500, _HELD_OUT | set(NAMES["train"]) | set(CITIES["train"]))
CITIES["train"] += _invented("cities", 1000, _HELD_OUT | set(NAMES["train"]) | set(CITIES["train"]))
NAMES["train"] += _spelled("names", 3000, _HELD_OUT | set(NAMES["train"]) | set(CITIES["train"]))
CITIES["train"] += _spelled("cities", 2000, _HELD_OUT | set(NAMES["train"]) | set(CITIES["train"]))

JOBS = ("teacher", "doctor", "farmer", "pilot", "baker", "nurse", "driver", "painter", "writer", "cook")
TOPICS = ("lunch", "the meeting", "the report", "the trip", "the party", "the invoice")
SYSTEM_PROMPTS = ("", "You are a helpful assistant.", "Answer briefly.")
MODEL_NAME = "jamba-tiny-dev"
GREETING_REPLY = "Hello! How can I help you today?"


@dataclass(frozen=True)
class Example:
    kind: str
    request: dict[str, Any]  # a chat request body without `model`
    reply: dict[str, Any]  # the assistant message to learn: content, tool_calls, citations


@dataclass(frozen=True)
class RenderedExample:
    example: Example
    prompt: Prompt  # what the server renders for the request
    target_text: str  # what the model should write after it, `<|eom|>` included
    target_ids: list[int]


@dataclass(frozen=True)
class Vocab:
    names: tuple[str, ...]
    cities: tuple[str, ...]


# --- tools -----------------------------------------------------------------------------------------


def _tool(function: str, description: str, **properties: dict[str, Any]) -> dict[str, Any]:
    required = [key for key in properties if key != "unit"]
    return {
        "type": "function",
        "function": {
            "name": function,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


_STRING = {"type": "string"}
TOOLS = {
    "get_weather": _tool(
        "get_weather", "Weather in a city.", city=_STRING, unit={"type": "string", "enum": ["celsius", "fahrenheit"]}
    ),
    "get_time": _tool("get_time", "Local time in a city.", city=_STRING),
    "get_population": _tool("get_population", "Population of a city.", city=_STRING),
    "send_email": _tool("send_email", "Send an email.", to=_STRING, subject=_STRING),
    "get_phone": _tool("get_phone", "Phone number of a person.", name=_STRING),
}


@dataclass(frozen=True)
class ToolUse:
    """One call a question asks for, the tool's result, and the sentence that reports it."""

    name: str
    arguments: dict[str, Any]
    result: dict[str, Any]
    answer: str


def _tool_use(rng: random.Random, vocab: Vocab, name: str) -> tuple[str, ToolUse]:
    """A question clause that needs tool `name`, and its use."""
    city, person = rng.choice(vocab.cities), rng.choice(vocab.names)
    if name == "get_weather":
        degrees, unit = rng.randint(-5, 35), "fahrenheit" if rng.random() < 0.3 else "celsius"
        arguments = {"city": city, "unit": unit} if unit == "fahrenheit" else {"city": city}
        clause = f"the weather in {city}" + (" in fahrenheit" if unit == "fahrenheit" else "")
        result, answer = {"temperature": degrees, "unit": unit}, f"It is {degrees} degrees {unit} in {city}."
    elif name == "get_time":
        time = f"{rng.randint(0, 23):02d}:{rng.choice(('00', '15', '30', '45'))}"
        clause, arguments, result, answer = f"the time in {city}", {"city": city}, {"time": time}, f"It is {time} in {city}."
    elif name == "get_population":
        people = rng.randint(1, 40) * 100000
        clause, arguments = f"the population of {city}", {"city": city}
        result, answer = {"population": people}, f"{city} has {people} people."
    elif name == "get_phone":
        phone = f"555-{rng.randint(0, 9999):04d}"
        clause, arguments = f"the phone number of {person}", {"name": person}
        result, answer = {"phone": phone}, f"The phone number of {person} is {phone}."
    else:
        topic = rng.choice(TOPICS)
        clause, arguments = f"an email to {person} about {topic}", {"to": person, "subject": topic}
        result, answer = {"status": "sent"}, f"The email to {person} about {topic} was sent."
    return clause, ToolUse(name, arguments, result, answer)


def _question(clauses: list[str]) -> str:
    """`Send an email to X about Y.` or `What is the weather in X and the time in Y?`"""
    if clauses[0].startswith("an email"):
        return "Send " + " and ".join(clauses) + "."
    return "What is " + " and ".join(clauses) + "?"


def _tool_names(rng: random.Random) -> list[str]:
    """The functions a question needs: one, or two (emails are never mixed with questions: the
    sentence would not read)."""
    count = 1 if rng.random() < 0.6 else 2
    first = rng.choice(sorted(TOOLS))
    if first == "send_email":
        return [first] * count
    return [first] + [rng.choice([n for n in sorted(TOOLS) if n != "send_email"]) for _ in range(count - 1)]


def _tool_uses(
    rng: random.Random, vocab: Vocab, names: list[str] | None = None
) -> tuple[list[dict[str, Any]], str, list[ToolUse]]:
    """Tools offered, a question, and the calls of `names` (default `_tool_names`) it needs; two
    calls are never the same call twice: "the time in Porto and the time in Porto" asks for one."""
    names = names or _tool_names(rng)
    count = len(names)
    clauses, uses = zip(*(_tool_use(rng, vocab, name) for name in names))
    while len({(u.name, json.dumps(u.arguments)) for u in uses}) < count:
        clauses, uses = zip(*(_tool_use(rng, vocab, name) for name in names))
    extra = rng.sample([n for n in sorted(TOOLS) if n not in names], rng.randint(0, 2))
    offered = sorted(dict.fromkeys([*names, *extra]), key=lambda n: rng.random())  # not a set: its order varies by process
    return [TOOLS[n] for n in offered], _question(list(clauses)), list(uses)


def _assistant_calls(uses: list[ToolUse]) -> list[dict[str, Any]]:
    return [
        {"id": f"call_{i}", "type": "function", "function": {"name": u.name, "arguments": json.dumps(u.arguments)}}
        for i, u in enumerate(uses)
    ]


# --- kinds ------------------------------------------------------------------------------------------


def _system(rng: random.Random) -> list[dict[str, Any]]:
    text = rng.choice(SYSTEM_PROMPTS)
    return [{"role": "system", "content": text}] if text else []


def _small_talk(rng: random.Random, vocab: Vocab) -> tuple[str, str]:
    """A user message that needs no tool or document, and its reply."""
    choice = rng.randrange(5)
    if choice == 0:
        return rng.choice(("Hello!", "Hi!", "Hello.")), GREETING_REPLY
    if choice == 1:
        return "How are you?", "I am fine, thank you."
    if choice == 2:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    name = rng.choice(vocab.names)
    if choice == 3:
        return f"My name is {name}.", f"Nice to meet you, {name}!"
    word = rng.choice((*vocab.names, *vocab.cities))
    return f"Repeat after me: {word}", word


def copy_example(rng: random.Random, vocab: Vocab) -> Example:
    """Short requests whose reply repeats words of the question: cheap to train on (a few dozen
    tokens against hundreds for a tool request), they teach the copying every other kind needs."""
    words = [rng.choice((*vocab.names, *vocab.cities)) for _ in range(rng.randint(1, 3))]
    phrase = " ".join(words)
    form = rng.randrange(3)
    if form == 0:
        question, answer = f"Repeat after me: {phrase}", phrase
    elif form == 1:
        question, answer = f"Say {phrase}.", f"{phrase}."
    else:
        question, answer = f"My name is {words[0]}.", f"Nice to meet you, {words[0]}!"
    return Example("copy", {"messages": [*_system(rng), {"role": "user", "content": question}]}, {"content": answer})


def chat_example(rng: random.Random, vocab: Vocab) -> Example:
    question, answer = _small_talk(rng, vocab)
    messages = [*_system(rng), {"role": "user", "content": question}]
    return Example("chat", {"messages": messages}, {"content": answer})


def tool_call_example(rng: random.Random, vocab: Vocab) -> Example:
    tools, question, uses = _tool_uses(rng, vocab)
    request = {"messages": [*_system(rng), {"role": "user", "content": question}], "tools": tools}
    return Example("tool_call", request, {"content": "", "tool_calls": _assistant_calls(uses)})


def tool_call_twice_example(rng: random.Random, vocab: Vocab) -> Example:
    """A curriculum kind: questions that ask one function twice ("an email to Carla about the report
    and an email to Dana about the meeting"), a sixth of `tool_call`'s and most of stage 8's misses
    there: its second call repeated the first one's arguments."""
    name = rng.choice(sorted(TOOLS))
    tools, question, uses = _tool_uses(rng, vocab, [name, name])
    request = {"messages": [*_system(rng), {"role": "user", "content": question}], "tools": tools}
    return Example("tool_call_twice", request, {"content": "", "tool_calls": _assistant_calls(uses)})


def tool_none_example(rng: random.Random, vocab: Vocab) -> Example:
    tools, _, _ = _tool_uses(rng, vocab)
    question, answer = _small_talk(rng, vocab)
    request = {"messages": [*_system(rng), {"role": "user", "content": question}], "tools": tools}
    return Example("tool_none", request, {"content": answer})


def tool_answer_example(rng: random.Random, vocab: Vocab) -> Example:
    tools, question, uses = _tool_uses(rng, vocab)
    calls = _assistant_calls(uses)
    results = [
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(use.result)} for call, use in zip(calls, uses)
    ]
    messages = [
        *_system(rng),
        {"role": "user", "content": question},
        {"role": "assistant", "content": "", "tool_calls": calls},
        *results,
    ]
    return Example("tool_answer", {"messages": messages, "tools": tools}, {"content": " ".join(u.answer for u in uses)})


def document_example(rng: random.Random, vocab: Vocab) -> Example:
    """People documents; a question one of them answers (or none: the person is not in them). With
    the citation knob the answer ends with the id of the document it copied."""
    people = rng.sample(vocab.names, rng.randint(2, 4))
    facts = [(name, rng.choice(vocab.cities), rng.choice(JOBS)) for name in people]
    documents = [{"title": name, "text": f"{name} lives in {city} and works as a {job}."} for name, city, job in facts]
    citing = rng.random() < 0.7
    asked = rng.randrange(len(people) + (1 if citing else 0))
    if asked == len(people):
        stranger = rng.choice([n for n in vocab.names if n not in people])
        question, answer, cited = f"Where does {stranger} live?", "The documents do not say.", []
    else:
        name, city, job = facts[asked]
        if rng.random() < 0.5:
            question, answer = f"Where does {name} live?", f"{name} lives in {city}."
        else:
            question, answer = f"What does {name} do?", f"{name} works as a {job}."
        cited = [asked]
    request: dict[str, Any] = {"messages": [*_system(rng), {"role": "user", "content": question}], "documents": documents}
    reply: dict[str, Any] = {"content": answer}
    if citing:
        request["citation_mode"] = "fast"
        reply["citations"] = cited
    return Example("citation" if citing else "documents", request, reply)


def citation_who_example(rng: random.Random, vocab: Vocab) -> Example:
    """A curriculum kind: people documents, each in its own city, and "Who lives in {city}?" answered
    with the name and the document's id. The name ends the answer, right before the id: the nearest
    a citation gets to what finds the document (the title), where `documents` puts the name a
    sentence back."""
    people = rng.sample(vocab.names, rng.randint(2, 4))
    cities = rng.sample(vocab.cities, len(people))
    documents = [{"title": name, "text": f"{name} lives in {city}."} for name, city in zip(people, cities)]
    asked = rng.randrange(len(people))
    request = {
        "messages": [*_system(rng), {"role": "user", "content": f"Who lives in {cities[asked]}?"}],
        "documents": documents,
        "citation_mode": "fast",
    }
    return Example("citation_who", request, {"content": f"{people[asked]}.", "citations": [asked]})


def json_example(rng: random.Random, vocab: Vocab) -> Example:
    """A person described in the question; with the JSON knob the reply is a JSON object of the
    asked fields, else a sentence. The object has no whitespace but, in half the examples, one space
    after each comma: the server's JSON grammar (no free whitespace, vLLM's separators `,` and `:`)
    demands that space under xgrammar 0.2.8 (its issue 945, noted in vLLM's xgrammar backend), and a
    later xgrammar forbids it; taught both, the model writes whichever the grammar allows."""
    name, city, age = rng.choice(vocab.names), rng.choice(vocab.cities), rng.randint(18, 90)
    fields = {"name": name, "age": age, "city": city}
    asked = rng.choice((("name", "age", "city"), ("name", "city"), ("name", "age")))
    question = f"{name} is {age} years old and lives in {city}. Give me the {', '.join(asked)}."
    request: dict[str, Any] = {"messages": [*_system(rng), {"role": "user", "content": question}]}
    if rng.random() < 0.75:
        request["response_format"] = {"type": "json_object"}
        comma = ", " if rng.random() < 0.5 else ","
        content = json.dumps({key: fields[key] for key in asked}, separators=(comma, ":"))
        return Example("json", request, {"content": content})
    return Example("json_off", request, {"content": f"{name} is {age} years old and lives in {city}."})


KINDS: dict[str, tuple[Callable[[random.Random, Vocab], Example], int]] = {
    "copy": (copy_example, 4),
    "chat": (chat_example, 2),
    "tool_call": (tool_call_example, 3),
    "tool_none": (tool_none_example, 1),
    "tool_answer": (tool_answer_example, 2),
    "documents": (document_example, 3),
    "json": (json_example, 2),
}
# Kinds a stage may name (`--kinds`) that the default corpus leaves out: it stays the one the
# README's stages were trained on.
CURRICULUM_KINDS: dict[str, tuple[Callable[[random.Random, Vocab], Example], int]] = {
    "tool_call_twice": (tool_call_twice_example, 3),
    "citation_who": (citation_who_example, 3),
}


def generate(split: str, count: int, seed: int, kinds: Sequence[str] | None = None) -> list[Example]:
    """`count` examples of `split` (of `kinds` only, if given: a training stage's curriculum), the
    same for the same arguments."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    known = {**KINDS, **CURRICULUM_KINDS}
    unknown = set(kinds or ()) - set(known)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; kinds are {sorted(known)}")
    rng = random.Random(f"dev-corpus:{seed}:{split}")
    vocab = Vocab(NAMES[split], CITIES[split])
    chosen = [known[kind] for kind in (kinds or KINDS)]
    makers = [maker for maker, _ in chosen]
    weights = [weight for _, weight in chosen]
    return [rng.choices(makers, weights)[0](rng, vocab) for _ in range(count)]


# --- rendering --------------------------------------------------------------------------------------


def _render(tokenizer: ChatTokenizer, chat_template: str, body: dict[str, Any], generation_prompt: bool) -> Prompt:
    request = ChatCompletionRequest.model_validate({"model": MODEL_NAME, **body, "add_generation_prompt": generation_prompt})
    plan = plan_chat(request)
    return render_chat(tokenizer, chat_template, plan.template_inputs, plan.add_generation_prompt, plan.prompt_suffix)


def render_example(example: Example, tokenizer: Any, chat_template: str) -> RenderedExample:
    """The prompt the server renders for the request, and the reply as the template writes it after
    that prompt. A JSON-mode reply starts without the template's space: the server's JSON grammar
    allows no whitespace before the object."""
    prompt = _render(tokenizer, chat_template, example.request, True)
    answered = {**example.request, "messages": [*example.request["messages"], {"role": "assistant", **example.reply}]}
    full = _render(tokenizer, chat_template, answered, False)
    if not full.text.startswith(prompt.text) or full.token_ids[: len(prompt.token_ids)] != prompt.token_ids:
        raise ValueError(f"the template renders the {example.kind} reply's conversation differently from its prompt")
    target_text = full.text[len(prompt.text) :]
    target_ids = full.token_ids[len(prompt.token_ids) :]
    if example.kind == "json":
        target_text = target_text.removeprefix(" ")
        target_ids = tokenizer.encode(target_text, add_special_tokens=False)
    return RenderedExample(example, prompt, target_text, target_ids)
