"""Train the dev model on the synthetic corpus (issue 18), so Jamba's format comes from the weights.

`python -m jamba_server.train_dev_model --out /tmp/devmodel/run1` (or `make train-dev-model
OUT=...`). Plain PyTorch on CPU, deterministic from `--seed`: the architecture and tokenizer are
`dev_model`'s (same config, same tokenizer, same starting weights but Mamba's time steps, see
`init_time_steps`); the loss is on the reply tokens
only (the prompt is what the server renders, the reply what the model must write); AdamW with warmup
and cosine decay; held-out loss every `--eval-every` steps. The output is a Hugging Face model
directory like `make model`'s (config, safetensors, tokenizer, chat template) plus `train_log.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from jamba_server import dev_corpus, dev_model
from jamba_server.settings import DEFAULT_TEMPLATE

IGNORE = -100  # label of a token the loss skips (prompt and padding)


@dataclass(frozen=True)
class TrainConfig:
    out: str
    steps: int = 3000
    batch_size: int = 8
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    train_examples: int = 20000
    heldout_examples: int = 64
    eval_every: int = 100
    seed: int = 0
    threads: int = 1
    max_minutes: float | None = None  # stop early (and save) after this long
    save_every: int = 0  # also save the model every this many steps (0: only at the end)
    init_from: str | None = None  # start from this model directory's weights (a run to continue)
    kinds: str | None = None  # comma-separated corpus kinds to train on (default: all, dev_corpus.KINDS)
    stop_at: int | None = None  # end (and save) at this step, the schedule still that of `steps`
    key_weight: float = 1.0  # the loss weight of a reply's deciding tokens (`key_token_mask`); 1: none
    grow_layers: int | None = None  # deepen the starting model to this many layers (`grow`)
    key_arguments: int = 0  # 1: a call's argument values are deciding tokens too (`ARGUMENT_VALUES`)
    kv_heads: int | None = None  # give the attention layers this many key/value heads (`widen_kv_heads`)
    cite_attention: float = 0.0  # weight of `cited_attention_loss` (0: none)
    cite_head: int = 0  # the attention head `cited_attention_loss` teaches
    cite_value: float = 0.0  # weight of `CitedValueProbe`'s loss (0: none)
    cite_value_window: int = 4  # the reply positions before the `[` that `CitedValueProbe` reads
    document_number: float = 0.0  # weight of `DocumentNumberProbe`'s loss (0: none)
    cite_at_name: int = 0  # 1: teach the cite attention and value at the cited name (`name_anchors`), not the `[`;
    # 2: there and at every reply position after the name up to the `[`
    cite_carry: float = 0.0  # weight of `CitedCarryProbe`'s loss (0: none); needs `cite_at_name` 1 (with 2: the `[` only)
    grow_attn_period: int | None = None  # with `grow_layers`: the grown model's attention period (its first layers' kinds kept)
    cite_hop: float = 0.0  # weight of `cited_hop_loss` (0: none); needs `cite_at_name` and a second attention layer
    cite_hop_head: int = 0  # the second attention layer's head `cited_hop_loss` teaches


def selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, **_: Any):  # fmt: skip
    """transformers' reference Mamba1 scan (`modeling_jamba.mamba_selective_scan`, used without
    mamba-ssm), same math, trainable on CPU: the reference indexes one step of whole tensors per
    iteration, whose backward writes a full-size gradient each step (quadratic in length: 8 s for
    one backward of 8x256 tokens here); stepping through `unbind` views keeps it linear (<1 s)."""
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    decays = torch.exp(A[None, :, None, :] * dt[:, :, :, None]).unbind(2)
    inputs = (dt[:, :, :, None] * B.transpose(1, 2)[:, None].float() * hidden_states[:, :, :, None].float()).unbind(2)
    readouts = C.transpose(1, 2).unbind(1)
    state = torch.zeros_like(inputs[0])
    outputs = []
    for decay, step_input, readout in zip(decays, inputs, readouts):
        state = decay * state + step_input
        outputs.append((state * readout[:, None, :]).sum(-1))
    scan = torch.stack(outputs, dim=-1).to(hidden_states.dtype)
    if D is not None:
        scan = scan + hidden_states * D[None, :, None]
    if z is not None:
        scan = scan * F.silu(z)
    return (scan, state) if return_last_state else scan


def init_time_steps(model: Any, seed: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
    """Mamba's time-step initialization (`mamba_ssm`'s `dt_init="random"`), which transformers' Jamba
    leaves out: its `dt_proj.bias` starts at 0, so every step is softplus(0) = 0.69 and the state
    forgets a token within one or two more (exp(-0.69 * A), A from 1 to d_state). Here the steps
    start log-uniform in [dt_min, dt_max], a memory of tens to thousands of tokens, so the reply can
    see the question behind the template's role tokens (without it the model learned the replies'
    format and ignored the question: "What is 20 plus 19?" -> "17 plus 19 is 20.")."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            dt_proj = getattr(module, "dt_proj", None)
            if not isinstance(dt_proj, torch.nn.Linear):
                continue
            bound = dt_proj.in_features**-0.5
            dt_proj.weight.copy_(torch.rand(dt_proj.weight.shape, generator=generator) * 2 * bound - bound)
            log_dt = torch.rand(dt_proj.out_features, generator=generator) * math.log(dt_max / dt_min) + math.log(dt_min)
            dt = torch.exp(log_dt).clamp(min=1e-4)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus's inverse


# A new layer's residual branches end in these: zeroed, the layer adds nothing until trained.
OUTPUT_PROJECTIONS = ("out_proj.weight", "o_proj.weight", "down_proj.weight", "experts.down_proj")


def grow(model: Any, layers: int, seed: int, attn_period: int | None = None) -> Any:
    """`model` deepened to `layers` layers, computing the same function: its layers come first, the new
    ones (the same attention and MoE pattern, or every `attn_period`-th layer attention, fresh weights,
    Mamba's time steps from `init_time_steps`) have their output projections zeroed. Training then
    adds what its depth could not hold."""
    from transformers import JambaForCausalLM

    config = copy.deepcopy(model.config)
    old = config.num_hidden_layers
    if layers <= old:
        raise ValueError(f"the model has {old} layers already; grow_layers must be more")
    kinds = (config.layers_block_type, config.layers_num_experts)
    config.num_hidden_layers = layers
    config.attn_layer_period = attn_period or config.attn_layer_period
    if (config.layers_block_type[:old], config.layers_num_experts[:old]) != kinds:
        raise ValueError(f"attention period {attn_period} changes the kinds of the model's {old} layers")
    torch.manual_seed(seed)
    grown = JambaForCausalLM(config).to(torch.float32)
    init_time_steps(grown, seed)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(int(name.split(".")[2]) < old for name in missing):
        raise ValueError("the grown model's first layers are not the model's")
    with torch.no_grad():
        for layer in grown.model.layers[old:]:
            for name, parameter in layer.named_parameters():
                if name.endswith(OUTPUT_PROJECTIONS):
                    parameter.zero_()
    return grown


def widen_kv_heads(model: Any, kv_heads: int) -> Any:
    """`model` with `kv_heads` key/value heads in place of its fewer, computing the same function: each
    query head's new key/value head starts as a copy of the one it shared. Shared, one key serves both
    what a head copies and what another looks up; apart, training can tell them apart."""
    from transformers import JambaForCausalLM

    config = copy.deepcopy(model.config)
    old = config.num_key_value_heads
    if kv_heads <= old or config.num_attention_heads % kv_heads:
        raise ValueError(f"kv_heads must be more than {old} and divide {config.num_attention_heads} heads")
    config.num_key_value_heads = kv_heads
    wide = JambaForCausalLM(config).to(torch.float32)
    state = model.state_dict()
    for name, parameter in state.items():
        if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            heads = parameter.view(old, -1, parameter.shape[1])  # kv head h serves query heads h*g..(h+1)*g-1
            state[name] = heads.repeat_interleave(kv_heads // old, dim=0).reshape(-1, parameter.shape[1])
    wide.load_state_dict(state, strict=True)
    return wide


@contextlib.contextmanager
def trainable_scan() -> Iterator[None]:
    """transformers' Jamba runs `selective_scan` instead of its reference scan, inside the block."""
    from transformers.models.jamba import modeling_jamba

    reference = modeling_jamba.mamba_selective_scan
    modeling_jamba.mamba_selective_scan = selective_scan
    try:
        yield
    finally:
        modeling_jamba.mamba_selective_scan = reference


@dataclass(frozen=True)
class Sequence:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt
    key: list[bool] | None = None  # per position: a deciding reply token (`key_token_mask`)
    cite: tuple[int, int, int, int] | None = None  # `[` opening the citations; the cited document's tokens and number (`cited_span`)
    documents: tuple[tuple[int, int], ...] | None = None  # each document's tokens (`document_spans`)
    anchors: tuple[int, ...] | None = None  # where a cite loss looks up the document (`name_anchors`); None: the `[`


# The few reply characters that decide what the server parses out of a reply, among many the model
# copies or that repeat the format: which function each call names (and a name argument's value),
# whether another call follows a call's closing braces, and the cited document numbers. A plain
# per-token loss spreads its gradient over ~20-45 reply tokens of which these are 1-8.
KEY_SPANS = re.compile(r'"name": "([^"]*)"|\}\}(,|\n)|<citations>(.*?)</citations>', re.DOTALL)
# Every string value in a call (and its name): where a two-call reply goes wrong, its second call
# repeats the first one's values ("to": "Carla" twice for Carla and Dana).
ARGUMENT_VALUES = re.compile(r'"[a-z_]+": "([^"]*)"')


def key_token_mask(tokenizer: Any, text: str, token_ids: list[int], arguments: bool = False) -> list[bool]:
    """Which of `text`'s tokens (`token_ids`) overlap a `KEY_SPANS` group (or, with `arguments`, an
    `ARGUMENT_VALUES` one): all False when the text alone does not tokenize to those ids (no offsets
    to map the spans with)."""
    offsets = _offsets(tokenizer, text, token_ids)
    if offsets is None:
        return [False] * len(token_ids)
    spans = [match.span(group) for match in KEY_SPANS.finditer(text) for group in (1, 2, 3) if match.group(group)]
    if arguments:
        spans += [match.span(1) for match in ARGUMENT_VALUES.finditer(text) if match.group(1)]
    return [any(start < end_span and begin < end for begin, end_span in spans) for start, end in offsets]


def _offsets(tokenizer: Any, text: str, token_ids: list[int]) -> list[tuple[int, int]] | None:
    """Each token's character span in `text`, or None when `text` alone does not tokenize to `token_ids`."""
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    return encoding.offsets if encoding.ids == token_ids else None


def document_spans(tokenizer: Any, text: str, token_ids: list[int]) -> list[tuple[int, int]] | None:
    """The token range [start, end) of each document's title and text in a rendered prompt (empty
    without documents); None when `text` alone does not tokenize to `token_ids`."""
    offsets = _offsets(tokenizer, text, token_ids)
    if offsets is None:
        return None
    spans = []
    while (header := f"## Document ID: {len(spans)}\n") in text:
        begin = text.index(header) + len(header)
        end = min(i for i in (text.find("\n\n", begin), text.find("</documents>", begin)) if i >= 0)
        inside = [i for i, (start, stop) in enumerate(offsets) if start >= begin and stop <= end]
        spans.append((inside[0], inside[-1] + 1))
    return spans


def cited_span(tokenizer: Any, rendered: dev_corpus.RenderedExample) -> tuple[int, int, int, int] | None:
    """For a reply citing one document: the position of the `[` after `<citations>` (whose output is
    the document's number), the token range [start, end) of that document's title and text in the
    prompt, and the document's number. None for any other reply, or a prompt whose text does not
    tokenize to its ids."""
    cited = rendered.example.reply.get("citations")
    citations = tokenizer.convert_tokens_to_ids("<citations>")
    if not cited or len(cited) != 1 or citations not in rendered.target_ids:
        return None
    query = len(rendered.prompt.token_ids) + rendered.target_ids.index(citations) + 1
    spans = document_spans(tokenizer, rendered.prompt.text, rendered.prompt.token_ids)
    if not spans or cited[0] >= len(spans):
        return None
    return query, *spans[cited[0]], cited[0]


def name_anchors(tokenizer: Any, rendered: dev_corpus.RenderedExample) -> tuple[int, ...]:
    """The position of the last token of the cited document's title (a person's name) where the
    question names it and where the reply does: a query there knows the whole name and can match the
    title by it (what a copy head does), and the document's number is a few tokens from its title.
    Measured on stage 10 with the loss at the `[` (`--cite-attention`): the head spread its attention
    evenly over the documents, its query there knowing the answer's words but not which document
    they came from. Empty when the name is not found, or a text does not tokenize to its ids."""
    cited = rendered.example.reply.get("citations")
    if not cited or len(cited) != 1:
        return ()
    title = rendered.example.request["documents"][cited[0]]["title"]
    prompt, reply = rendered.prompt, rendered.target_text
    places = [(prompt.text, prompt.token_ids, prompt.text.rfind("<|user|>"), 0)]
    places.append((reply, rendered.target_ids, 0, len(prompt.token_ids)))
    anchors: list[int] = []
    for text, ids, begin, shift in places:
        offsets = _offsets(tokenizer, text, ids)
        found = text.find(title, begin) if begin >= 0 else -1
        if offsets is None or found < 0:
            continue
        end = found + len(title)
        anchors.append(shift + max(i for i, (start, stop) in enumerate(offsets) if start < end and found < stop))
    return tuple(anchors)


def encode(
    tokenizer: Any,
    chat_template: str,
    split: str,
    count: int,
    seed: int,
    kinds: list[str] | None = None,
    key_arguments: bool = False,
    cite_spans: bool = False,
    documents: bool = False,
    at_name: int = 0,
) -> list[Sequence]:
    """The split's examples (of `kinds`, if given) as prompt + reply token ids, the loss masked to the
    reply; with `cite_spans`, each citing one's `cited_span`, with `documents` each one's
    `document_spans` (each a second tokenization of its prompt); with `at_name`, each citing one's
    `name_anchors` (None where it has none: its cite losses look at the `[`), with `at_name` 2 and
    every reply position after the last of them up to the `[`."""
    sequences = []
    for example in dev_corpus.generate(split, count, seed, kinds):
        rendered = dev_corpus.render_example(example, tokenizer, chat_template)
        prompt, target = rendered.prompt.token_ids, rendered.target_ids
        key = [False] * len(prompt) + key_token_mask(tokenizer, rendered.target_text, target, key_arguments)
        cite = cited_span(tokenizer, rendered) if cite_spans else None
        spans = None
        if documents and example.request.get("documents"):
            spans = tuple(document_spans(tokenizer, rendered.prompt.text, prompt) or ())
        anchors = name_anchors(tokenizer, rendered) if at_name and cite else None
        if anchors and at_name == 2:
            anchors = (*anchors, *range(anchors[-1] + 1, cite[0] + 1))
        sequences.append(Sequence(prompt + target, [IGNORE] * len(prompt) + target, key, cite, spans, anchors or None))
    return sequences


def collate(sequences: list[Sequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: padding comes after every real token, so neither the causal attention nor
    the Mamba scan carries it into a real position; its labels are IGNORE."""
    width = max(len(s.input_ids) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    key = torch.zeros((len(sequences), width), dtype=torch.bool)
    cite_query = torch.full((len(sequences),), -1, dtype=torch.long)
    cite_span = torch.zeros((len(sequences), width), dtype=torch.bool)
    cite_index = torch.full((len(sequences),), -1, dtype=torch.long)
    document_number = torch.full((len(sequences), width), -1, dtype=torch.long)
    cite_anchor = torch.zeros((len(sequences), width), dtype=torch.bool)
    cite_carry = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, s in enumerate(sequences):
        input_ids[row, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[row, : len(s.labels)] = torch.tensor(s.labels)
        attention_mask[row, : len(s.input_ids)] = 1
        if s.key:
            key[row, : len(s.key)] = torch.tensor(s.key)
        if s.cite:
            cite_query[row] = s.cite[0]
            cite_span[row, s.cite[1] : s.cite[2]] = True
            cite_index[row] = s.cite[3]
            cite_anchor[row, list(s.anchors or (s.cite[0],))] = True
            cite_carry[row, max(s.anchors or (s.cite[0],)) : s.cite[0] + 1] = True
        for number, (start, end) in enumerate(s.documents or ()):
            document_number[row, start:end] = number
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "key": key,
        "cite_query": cite_query, "cite_span": cite_span, "cite_index": cite_index,
        "document_number": document_number, "cite_anchor": cite_anchor,
        "cite_carry": cite_carry,
    }  # fmt: skip


def batches(sequences: list[Sequence], batch_size: int, rng: random.Random) -> list[list[Sequence]]:
    """One epoch of batches, each of similar lengths (little padding), in random order."""
    order = list(sequences)
    rng.shuffle(order)
    pool = batch_size * 32
    out = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda s: len(s.input_ids))
        out.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(out)
    return out


def reply_loss(
    model: Any,
    batch: dict[str, torch.Tensor],
    key_weight: float = 1.0,
    cite_attention: float = 0.0,
    cite_head: int = 0,
    value_probe: "CitedValueProbe | None" = None,
    number_probe: "DocumentNumberProbe | None" = None,
    carry_probe: "CitedCarryProbe | None" = None,
    cite_hop: float = 0.0,
    cite_hop_head: int = 0,
) -> tuple[torch.Tensor, float]:
    """Summed next-token cross-entropy over the reply tokens, and how many there are; with a
    `key_weight`, each deciding token (`batch["key"]`) counts that many times in both; with
    `cite_attention` or `cite_hop`, plus that times `cited_attention_loss` or `cited_hop_loss`; with
    a `value_probe`, a `number_probe` or a `carry_probe`, plus its loss."""
    citing = bool((batch["cite_query"] >= 0).any())
    supervise = (cite_attention > 0 or cite_hop > 0) and citing
    numbered = number_probe is not None and bool((batch["document_number"] >= 0).any())
    carried = carry_probe is not None and citing
    captured: dict[str, torch.Tensor] = {}
    with _attention_output(model, captured) if value_probe is not None and citing else contextlib.nullcontext():
        output = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
            output_attentions=supervise, output_hidden_states=numbered or carried,
        )  # fmt: skip
    logits = output.logits
    extra = cite_attention * cited_attention_loss(output.attentions, batch, cite_head) if supervise else 0.0
    if supervise and cite_hop:
        extra = extra + cite_hop * cited_hop_loss(output.attentions, batch, cite_hop_head)
    if captured:
        extra = extra + value_probe.loss(captured["heads"], batch)
    if numbered:
        extra = extra + number_probe.loss(output.hidden_states[_first_attention_index(model)], batch)
    if carried:
        extra = extra + carry_probe.loss(output.hidden_states[-1], batch)
    losses = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), batch["input_ids"][:, 1:].reshape(-1), reduction="none"
    ).view(logits.size(0), -1)
    reply = batch["labels"][:, 1:] != IGNORE
    if key_weight == 1.0:
        return losses[reply].sum() + extra, int(reply.sum())
    weights = torch.where(batch["key"][:, 1:], key_weight, 1.0)[reply]
    return (losses[reply] * weights).sum() + extra, float(weights.sum())


def _attention_indices(model: Any) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer, "self_attn")]


def _first_attention_index(model: Any) -> int:
    return _attention_indices(model)[0]


def first_attention(model: Any) -> Any:
    return model.model.layers[_first_attention_index(model)].self_attn


@contextlib.contextmanager
def _attention_output(model: Any, captured: dict[str, torch.Tensor]) -> Iterator[None]:
    """While inside, `captured["heads"]` is set to what the first attention layer's heads return
    (the input of its `o_proj`: batch, position, heads x head size)."""
    hook = first_attention(model).o_proj.register_forward_pre_hook(lambda _, args: captured.__setitem__("heads", args[0]))
    try:
        yield
    finally:
        hook.remove()


class CitedValueProbe(torch.nn.Module):
    """A linear read of the cited document's number from the attention heads' output at the
    `window` reply positions before the `[` opening a citation, and its cross-entropy times
    `weight`, summed over the batch (averaged over the window). Not part of the saved model.
    Measured on stage 10: writing the answer's last words, head 0 puts 0.83 of its attention on
    the cited document (its copied words are 97% right), but a probe reads the document's number
    from that head output no better than chance (0.48 against 0.35), and at the `[` itself the head
    looks at the `## Document ID: N` digits. Taught to carry the number there, the heads' output a
    few tokens before the `[` is what the Mamba layer after them can bring to it. With `at_anchors`
    it reads at a reply's `name_anchors` instead (averaged over them)."""

    def __init__(self, width: int, weight: float, window: int, documents: int = 4, at_anchors: bool = False):
        super().__init__()
        self.read = torch.nn.Linear(width, documents)
        self.weight, self.window, self.at_anchors = weight, window, at_anchors

    def loss(self, heads: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.at_anchors:
            return self._loss_at_anchors(heads, batch)
        rows = (batch["cite_query"] >= 0).nonzero().squeeze(1)
        back = torch.arange(1, self.window + 1)
        positions = batch["cite_query"][rows, None] - back  # (rows, window)
        read = self.read(heads[rows[:, None], positions])  # (rows, window, documents)
        target = batch["cite_index"][rows, None].expand(-1, self.window)
        losses = F.cross_entropy(read.reshape(-1, read.size(-1)), target.reshape(-1), reduction="none")
        return self.weight * losses.view(-1, self.window).mean(-1).sum()

    def _loss_at_anchors(self, heads: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.weight * _cited_number_loss(self.read, heads, batch["cite_anchor"], batch["cite_index"])


def _cited_number_loss(
    read: torch.nn.Linear, features: torch.Tensor, where: torch.Tensor, cited: torch.Tensor
) -> torch.Tensor:
    """The cross-entropy of `read`ing each row's `cited` number from `features` (batch, position,
    width), averaged over the positions `where` marks and summed over the batch (0 for a row with none)."""
    target = cited.clamp(min=0)[:, None].expand(-1, where.size(1))
    losses = F.cross_entropy(read(features).transpose(1, 2), target, reduction="none")
    return ((losses * where).sum(-1) / where.sum(-1).clamp(min=1)).sum()


class DocumentNumberProbe(torch.nn.Module):
    """A linear read of each document token's document number from the first attention layer's
    input, and its cross-entropy times `weight`, averaged over a prompt's document tokens and summed
    over the batch. Not part of the saved model. Measured on stage 10: the number is read there from
    a document's first tokens every time, from its last ones 58% of the time (3 documents: chance
    35%), and it is the last ones (the copied words) that the attention looks at while writing the
    answer; this teaches the Mamba layers below to carry the number through the whole document."""

    def __init__(self, width: int, weight: float, documents: int = 4):
        super().__init__()
        self.read = torch.nn.Linear(width, documents)
        self.weight = weight

    def loss(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        numbers = batch["document_number"]
        losses = F.cross_entropy(self.read(hidden).transpose(1, 2), numbers.clamp(min=0), reduction="none")
        inside = numbers >= 0
        per_prompt = (losses * inside).sum(-1) / inside.sum(-1).clamp(min=1)
        return self.weight * per_prompt.sum()


class CitedCarryProbe(torch.nn.Module):
    """A linear read of the cited document's number from the model's last hidden state at every
    reply position from the cited name (the last `name_anchors`) to the `[` opening the citation,
    and its cross-entropy times `weight`, averaged over those positions and summed over the batch.
    Not part of the saved model. Measured after 500 steps of `--cite-at-name`: the number is read
    from the heads' output at the reply's name 90% of the time, from the last hidden state there
    88%, and at the `[`, eight tokens on, 44% (chance 42%): the last Mamba layer lets it go."""

    def __init__(self, width: int, weight: float, documents: int = 4):
        super().__init__()
        self.read = torch.nn.Linear(width, documents)
        self.weight = weight

    def loss(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.weight * _cited_number_loss(self.read, hidden, batch["cite_carry"], batch["cite_index"])


def cited_attention_loss(attentions: tuple[Any, ...], batch: dict[str, torch.Tensor], head: int) -> torch.Tensor:
    """-log of the attention `head` of the first attention layer pays, at a citing reply's anchors
    (the `[` opening the citation, or `name_anchors`), to the cited document's title and text,
    averaged over a reply's anchors and summed over the batch. Taught only by the cited number, the
    model looked at the `## Document ID: N` digits (a digit's key cannot know the name after it, so
    citations stayed at chance); this says where the number can be found."""
    weights = next(a for a in attentions if a is not None)[:, head]  # (batch, query, key)
    mass = (weights * batch["cite_span"][:, None, :]).sum(-1)  # (batch, query)
    anchors = batch["cite_anchor"]
    return ((-torch.log(mass + 1e-6) * anchors).sum(-1) / anchors.sum(-1).clamp(min=1)).sum()


def cited_hop_loss(attentions: tuple[Any, ...], batch: dict[str, torch.Tensor], head: int) -> torch.Tensor:
    """-log of the attention `head` of the second attention layer pays, at the `[` opening a
    citation, to the cited name's `name_anchors` (in the question and in the reply), summed over the
    batch. There the first attention layer, taught by `--cite-at-name`, has put the cited document's
    number (a probe read it 99% of the time), and no Mamba layer after it carried the number the
    eight or more tokens to the `[` (49%): a second attention layer can fetch it from there. A row
    without name anchors (its anchor is the `[` itself) adds nothing."""
    weights = [a for a in attentions if a is not None][1][:, head]  # (batch, query, key)
    rows = (batch["cite_query"] >= 0).nonzero().squeeze(1)
    queries = batch["cite_query"][rows]
    anchors = batch["cite_anchor"][rows].clone()
    anchors[torch.arange(len(rows)), queries] = False
    mass = (weights[rows, queries] * anchors).sum(-1)  # (rows,)
    return (-torch.log(mass + 1e-6) * anchors.any(-1)).sum()


@torch.no_grad()
def evaluate(model: Any, sequences: list[Sequence], batch_size: int, pad_id: int) -> float:
    """Mean loss per reply token."""
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(sequences, key=lambda s: len(s.input_ids))
    for start in range(0, len(ordered), batch_size):
        loss, tokens = reply_loss(model, collate(ordered[start : start + batch_size], pad_id))
        total, count = total + float(loss), count + tokens
    model.train()
    return total / count


def learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save(model: Any, generation: Any, tokenizer: Any, out: Path, log: dict[str, Any]) -> None:
    """Write the model directory whole or not at all (a temporary sibling, then renamed)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    generation.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _losses(model: Any, probes: dict[str, list[Sequence]], batch_size: int, pad_id: int) -> dict[str, float]:
    return {f"{name}_loss": round(evaluate(model, sequences, batch_size, pad_id), 4) for name, sequences in probes.items()}


def train(config: TrainConfig) -> dict[str, Any]:
    """Train, evaluate along the way, save; return the log (also written as train_log.json)."""
    if config.cite_hop and config.cite_at_name != 1:
        raise ValueError("cite_hop reads the name anchors: it needs cite_at_name 1")
    with trainable_scan():
        return _train(config)


def _starting_model(config: TrainConfig, vocab_size: int, eos_ids: list[int]) -> tuple[Any, Any]:
    """The model a run trains (fresh, or `init_from`'s, then grown and widened if asked) and its
    generation config."""
    model, generation = dev_model.build_model(vocab_size, eos_ids)
    if config.init_from:  # its architecture, which may be deeper than dev_model's (`grow`)
        from transformers import JambaForCausalLM

        model = JambaForCausalLM.from_pretrained(config.init_from, dtype=torch.float32)
    else:
        init_time_steps(model, config.seed)
    if config.grow_layers:
        model = grow(model, config.grow_layers, config.seed, config.grow_attn_period)
    if config.kv_heads:
        model = widen_kv_heads(model, config.kv_heads)
    if config.cite_hop and len(_attention_indices(model)) < 2:
        raise ValueError("cite_hop teaches the second attention layer: grow one (grow_layers, grow_attn_period)")
    if config.cite_attention or config.cite_hop:
        model.set_attn_implementation("eager")  # the one that returns attention weights
    return model, generation


def _probes(config: TrainConfig, model: Any) -> tuple[Any, ...]:
    """The auxiliary reads a run trains beside the model (and does not save), if asked: a
    `CitedValueProbe`, a `DocumentNumberProbe` and a `CitedCarryProbe`, each or None."""
    value = number = carry = None
    if config.cite_value:
        width = first_attention(model).o_proj.in_features
        value = CitedValueProbe(width, config.cite_value, config.cite_value_window, at_anchors=bool(config.cite_at_name))
    if config.document_number:
        number = DocumentNumberProbe(model.config.hidden_size, config.document_number)
    if config.cite_carry:
        carry = CitedCarryProbe(model.config.hidden_size, config.cite_carry)
    return value, number, carry


def _encoded_splits(config: TrainConfig, tokenizer: Any, chat_template: str) -> tuple[list[Sequence], list[Sequence]]:
    """The run's training and held-out sequences; the training ones with what its cite losses and
    probes read (cited spans, document spans, name anchors)."""
    kinds = config.kinds.split(",") if config.kinds else None
    cited = config.cite_attention > 0 or config.cite_value > 0 or config.cite_carry > 0 or config.cite_hop > 0
    train_set = encode(
        tokenizer, chat_template, "train", config.train_examples, config.seed, kinds, bool(config.key_arguments),
        cited, config.document_number > 0, config.cite_at_name,
    )  # fmt: skip
    return train_set, encode(tokenizer, chat_template, "heldout", config.heldout_examples, config.seed, kinds)


def _train(config: TrainConfig) -> dict[str, Any]:
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    chat_template = DEFAULT_TEMPLATE.read_text(encoding="utf-8")
    tokenizer = dev_model.build_tokenizer(chat_template)
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|eom|>")]
    model, generation = _starting_model(config, len(tokenizer), eos_ids)
    model.train()
    pad_id = tokenizer.pad_token_id
    started = time.monotonic()
    train_set, heldout = _encoded_splits(config, tokenizer, chat_template)
    # A fixed slice of training examples gives a train loss comparable over time.
    probes = {"train": train_set[: config.heldout_examples], "heldout": heldout}
    model_config = {key: getattr(model.config, key) for key in dev_model.MODEL_CONFIG}
    log: dict[str, Any] = {"config": asdict(config), "model_config": model_config, "evals": []}
    log["encode_seconds"] = round(time.monotonic() - started, 1)
    value_probe, number_probe, carry_probe = _probes(config, model)
    auxiliary = (value_probe, number_probe, carry_probe)
    trained = [*model.parameters(), *(p for probe in auxiliary if probe for p in probe.parameters())]
    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=config.weight_decay)
    log["evals"].append({"step": 0, **_losses(model, probes, config.batch_size, pad_id)})
    print(json.dumps(log["evals"][-1]), flush=True)
    queue: list[list[Sequence]] = []
    step, step_seconds, started = 0, 0.0, time.monotonic()
    last_step = min(config.steps, config.stop_at or config.steps)
    while step < last_step:
        if config.max_minutes is not None and time.monotonic() - started > config.max_minutes * 60:
            break
        queue = queue or batches(train_set, config.batch_size, rng)
        tick = time.monotonic()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        batch = collate(queue.pop(), pad_id)
        loss, tokens = reply_loss(
            model, batch, config.key_weight, config.cite_attention, config.cite_head, *auxiliary,
            cite_hop=config.cite_hop, cite_hop_head=config.cite_hop_head,
        )  # fmt: skip
        optimizer.zero_grad()
        (loss / tokens).backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        step += 1
        step_seconds += time.monotonic() - tick
        if step % config.eval_every == 0 or step == last_step:
            entry = {"step": step, "batch_loss": round(loss.item() / tokens, 4), **_losses(model, probes, config.batch_size, pad_id)}
            log["evals"].append(entry)
            print(json.dumps(entry), flush=True)
        if config.save_every and step % config.save_every == 0 and step < last_step:
            save(model, generation, tokenizer, Path(config.out), {**log, "steps": step})
            model.train()
    if log["evals"][-1]["step"] != step:
        log["evals"].append({"step": step, **_losses(model, probes, config.batch_size, pad_id)})
        print(json.dumps(log["evals"][-1]), flush=True)
    log["steps"] = step
    log["seconds_per_step"] = round(step_seconds / max(1, step), 3)
    log["train_seconds"] = round(time.monotonic() - started, 1)
    save(model, generation, tokenizer, Path(config.out), log)
    return log


OPTION_TYPES = {
    "learning_rate": float, "weight_decay": float, "max_minutes": float, "init_from": str,
    "kinds": str, "stop_at": int, "key_weight": float, "grow_layers": int,
    "kv_heads": int, "cite_attention": float, "cite_value": float, "document_number": float,
    "cite_carry": float, "cite_hop": float,
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="model directory to write (e.g. under /tmp/devmodel/)")
    defaults = TrainConfig(out="")
    for name, value in asdict(defaults).items():
        if name != "out":
            kind = OPTION_TYPES.get(name, int)
            parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    log = train(TrainConfig(**vars(parser.parse_args())))
    print(json.dumps({"out": log["config"]["out"], "steps": log["steps"], "seconds_per_step": log["seconds_per_step"],
                      "first": log["evals"][0], "last": log["evals"][-1]}))  # fmt: skip


if __name__ == "__main__":
    main()
