"""Training the dev model: the trainable scan is transformers' scan, the loss sees only reply tokens
and no padding, and a run writes a model directory transformers loads and generates with."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.jamba import modeling_jamba

from jamba_server import dev_corpus
from jamba_server.dev_model import build_model
from jamba_server.settings import DEFAULT_TEMPLATE
from jamba_server.train_dev_model import (
    IGNORE,
    CitedCarryProbe,
    CitedValueProbe,
    DocumentNumberProbe,
    Sequence,
    TrainConfig,
    cited_hop_loss,
    cited_span,
    collate,
    document_spans,
    grow,
    init_time_steps,
    key_token_mask,
    name_anchors,
    reply_loss,
    selective_scan,
    train,
    trainable_scan,
    widen_kv_heads,
)


def _scan_inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    batch, dim, state, length = 2, 6, 4, 9

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).requires_grad_()

    return dict(
        hidden_states=rand(batch, dim, length),
        dt=rand(batch, dim, length),
        A=(-torch.rand(dim, state, generator=generator)).requires_grad_(),
        B=rand(batch, state, length),
        C=rand(batch, state, length),
        D=rand(dim),
        z=rand(batch, dim, length),
        delta_bias=rand(dim),
    )


def test_the_trainable_scan_gives_the_reference_scan_outputs_state_and_gradients():
    results = []
    for scan in (modeling_jamba.mamba_selective_scan, selective_scan):
        inputs = _scan_inputs(seed=3)
        output, state = scan(**inputs, delta_softplus=True, return_last_state=True)
        (output.square().sum() + state.sum()).backward()
        results.append((output, state, [inputs[k].grad for k in sorted(inputs)]))
    (out_ref, state_ref, grads_ref), (out, state, grads) = results
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(state, state_ref.float())
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5)


def test_trainable_scan_swaps_the_scan_only_inside_the_block():
    reference = modeling_jamba.mamba_selective_scan
    with trainable_scan():
        assert modeling_jamba.mamba_selective_scan is selective_scan
    assert modeling_jamba.mamba_selective_scan is reference


def test_time_steps_start_in_mambas_range_and_deterministic():
    """transformers' init leaves every step at softplus(0) = 0.69; after `init_time_steps` the steps
    (softplus of the bias) lie in [1e-3, 0.1], spread over the range, the same for the same seed."""
    biases = []
    for _ in range(2):
        model, _ = build_model(64, [2])
        dt_projs = [m.dt_proj for m in model.modules() if isinstance(getattr(m, "dt_proj", None), torch.nn.Linear)]
        assert dt_projs and all(torch.allclose(torch.nn.functional.softplus(p.bias), torch.tensor(math.log(2))) for p in dt_projs)
        init_time_steps(model, seed=0)
        steps = torch.cat([torch.nn.functional.softplus(p.bias) for p in dt_projs])
        assert steps.min() >= 1e-3 * 0.999 and steps.max() <= 0.1 * 1.001
        assert steps.min() < 3e-3 and steps.max() > 0.03
        biases.append(steps)
    torch.testing.assert_close(biases[0], biases[1])


def test_collate_pads_on_the_right_and_labels_only_the_reply():
    batch = collate([Sequence([1, 20, 21, 30], [IGNORE, IGNORE, IGNORE, 30]), Sequence([1, 22], [IGNORE, 22])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 20, 21, 30], [1, 22, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 30], [IGNORE, 22, IGNORE, IGNORE]]


def test_a_padded_batch_has_the_loss_of_its_sequences_alone():
    model, _ = build_model(64, [2, 5])
    generator = torch.Generator().manual_seed(0)
    long_ids, short_ids = (torch.randint(14, 64, (n,), generator=generator).tolist() for n in (40, 17))
    long = Sequence(long_ids, [IGNORE] * 30 + long_ids[30:])
    short = Sequence(short_ids, [IGNORE] * 10 + short_ids[10:])
    with torch.no_grad(), trainable_scan():
        together, count = reply_loss(model, collate([long, short], pad_id=0))
        alone = [reply_loss(model, collate([s], pad_id=0)) for s in (long, short)]
    assert count == 10 + 7 == sum(n for _, n in alone)
    torch.testing.assert_close(together, alone[0][0] + alone[1][0], rtol=1e-4, atol=1e-4)


def test_key_tokens_are_the_called_functions_what_follows_each_call_and_the_cited_documents(dev_model):
    tokenizer = AutoTokenizer.from_pretrained(dev_model)
    calls = ' <tool_calls>[\n    {"name": "get_time", "arguments": {"city": "Oslo"}},\n    {"name": "get_phone", "arguments": {"name": "Ana"}}\n]</tool_calls><|eom|>'
    cited = " Ana lives in Oslo.<citations>[2]</citations><|eom|>"
    for text, wanted in ((calls, 'get_time"}},get_phoneAna\n'), (cited, "[2]"), (" Hello! How are you?<|eom|>", "")):
        ids = tokenizer.encode(text, add_special_tokens=False)
        mask = key_token_mask(tokenizer, text, ids)
        assert len(mask) == len(ids)
        assert "".join(tokenizer.decode([i]) for i, key in zip(ids, mask) if key) == wanted
    # With `arguments`, every value a call copies from the question is key too.
    ids = tokenizer.encode(calls, add_special_tokens=False)
    keys = "".join(tokenizer.decode([i]) for i, key in zip(ids, key_token_mask(tokenizer, calls, ids, True)) if key)
    assert keys == 'get_timeOslo"}},get_phoneAna\n'
    # Text that does not tokenize alone to the ids given has no offsets to map: nothing is key.
    assert not any(key_token_mask(tokenizer, cited, tokenizer.encode(cited + "x", add_special_tokens=False)))


def test_key_weight_counts_each_key_reply_token_that_many_times():
    model, _ = build_model(64, [2, 5])
    ids = torch.randint(14, 64, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    key = [False] * 12
    key[9] = True
    sequence = Sequence(ids, [IGNORE] * 6 + ids[6:], key)
    with torch.no_grad(), trainable_scan():
        plain, count = reply_loss(model, collate([sequence], pad_id=0))
        weighted, weight = reply_loss(model, collate([sequence], pad_id=0), key_weight=4.0)
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    per_token = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    assert count == 6 and weight == 9.0
    torch.testing.assert_close(plain, per_token[5:].sum())
    torch.testing.assert_close(weighted, per_token[5:].sum() + 3 * per_token[8])


def test_a_citing_reply_knows_its_opening_bracket_and_the_cited_documents_tokens(dev_model):
    tokenizer = AutoTokenizer.from_pretrained(dev_model)
    template = DEFAULT_TEMPLATE.read_text(encoding="utf-8")
    found = 0
    for example in dev_corpus.generate("heldout", 40, seed=2, kinds=["documents", "citation_who"]):
        rendered = dev_corpus.render_example(example, tokenizer, template)
        span = cited_span(tokenizer, rendered)
        if not example.reply.get("citations"):
            assert span is None
            continue
        query, start, end, number = span
        assert number == example.reply["citations"][0]
        ids = rendered.prompt.token_ids + rendered.target_ids
        assert tokenizer.decode(ids[query - 1 : query + 2]) == f"<citations>[{example.reply['citations'][0]}"
        document = example.request["documents"][example.reply["citations"][0]]
        assert tokenizer.decode(ids[start:end]).strip() == f"Title: {document['title']}\nText: {document['text']}"
        found += 1
    assert found >= 10


def test_cited_attention_loss_is_minus_log_the_heads_attention_on_the_document_and_teaches_it():
    model, _ = build_model(64, [2, 5])
    model.set_attn_implementation("eager")
    ids = torch.randint(14, 64, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    sequence = Sequence(ids, [IGNORE] * 20 + ids[20:], cite=(25, 5, 12, 1))
    batch = collate([sequence, Sequence(ids[:10], [IGNORE] * 5 + ids[5:10])], pad_id=0)
    with trainable_scan():
        plain, _ = reply_loss(model, batch)
        taught, _ = reply_loss(model, batch, cite_attention=2.0, cite_head=1)
        weights = next(a for a in model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_attentions=True).attentions if a is not None)
        (taught - plain).backward()
    mass = weights[0, 1, 25, 5:12].sum()
    torch.testing.assert_close(taught - plain, -2.0 * torch.log(mass + 1e-6))
    queries = model.model.layers[2].self_attn.q_proj.weight.grad.view(2, -1, model.config.hidden_size)
    assert queries[1].abs().sum() > 0 and queries[0].abs().sum() == 0  # it teaches that head alone


def test_cited_value_probe_reads_the_number_from_the_heads_output_before_the_bracket_and_teaches_values():
    model, _ = build_model(64, [2, 5])
    ids = torch.randint(14, 64, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    sequence = Sequence(ids, [IGNORE] * 20 + ids[20:], cite=(25, 5, 12, 2))
    batch = collate([sequence, Sequence(ids[:10], [IGNORE] * 5 + ids[5:10])], pad_id=0)
    attention = model.model.layers[2].self_attn
    probe = CitedValueProbe(attention.o_proj.in_features, weight=3.0, window=2)
    heads = []
    hook = attention.o_proj.register_forward_pre_hook(lambda _, args: heads.append(args[0]))
    with trainable_scan():
        plain, _ = reply_loss(model, batch)
        hook.remove()
        taught, _ = reply_loss(model, batch, value_probe=probe)
        (taught - plain).backward()
    read = probe.read(heads[0][0, [24, 23]].detach())
    wanted = 3.0 * torch.nn.functional.cross_entropy(read, torch.tensor([2, 2]))
    torch.testing.assert_close(taught - plain, wanted)
    assert attention.v_proj.weight.grad.abs().sum() > 0  # it teaches what the heads carry
    assert attention.o_proj.weight.grad is None or attention.o_proj.weight.grad.abs().sum() == 0
    assert probe.read.weight.grad.abs().sum() > 0


def test_name_anchors_are_the_last_token_of_the_cited_name_in_the_question_and_in_the_reply(dev_model):
    tokenizer = AutoTokenizer.from_pretrained(dev_model)
    template = DEFAULT_TEMPLATE.read_text(encoding="utf-8")
    kinds = set()
    for example in dev_corpus.generate("heldout", 40, seed=5, kinds=["documents", "citation_who"]):
        rendered = dev_corpus.render_example(example, tokenizer, template)
        anchors = name_anchors(tokenizer, rendered)
        if not example.reply.get("citations"):
            assert anchors == ()
            continue
        name = example.request["documents"][example.reply["citations"][0]]["title"]
        ids = rendered.prompt.token_ids + rendered.target_ids
        question = len(rendered.prompt.token_ids) - 3  # before `<|eom|><|bom|><|assistant|>`
        wanted = [name in example.request["messages"][-1]["content"], True]  # the question, the reply
        assert [any(a < question for a in anchors), any(a >= question for a in anchors)] == wanted
        for anchor in anchors:
            assert tokenizer.decode(ids[anchor - 6 : anchor + 1]).endswith(name)  # the name ends there
            assert not tokenizer.decode(ids[anchor - 6 : anchor + 2]).endswith(name)
        kinds.add((example.kind, len(anchors)))
    assert kinds == {("citation", 2), ("citation_who", 1)}


def test_the_cite_losses_at_name_anchors_average_over_them():
    model, _ = build_model(64, [2, 5])
    model.set_attn_implementation("eager")
    ids = torch.randint(14, 64, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    sequence = Sequence(ids, [IGNORE] * 20 + ids[20:], cite=(25, 5, 12, 3), anchors=(16, 22))
    batch = collate([sequence, Sequence(ids[:10], [IGNORE] * 5 + ids[5:10])], pad_id=0)
    attention = model.model.layers[2].self_attn
    probe = CitedValueProbe(attention.o_proj.in_features, weight=3.0, window=2, at_anchors=True)
    heads = []
    hook = attention.o_proj.register_forward_pre_hook(lambda _, args: heads.append(args[0]))
    with trainable_scan():
        plain, _ = reply_loss(model, batch)
        hook.remove()
        looked, _ = reply_loss(model, batch, cite_attention=2.0, cite_head=0)
        read, _ = reply_loss(model, batch, value_probe=probe)
        weights = next(a for a in model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_attentions=True).attentions if a is not None)
    mass = weights[0, 0, [16, 22], 5:12].sum(-1)
    torch.testing.assert_close(looked - plain, -2.0 * torch.log(mass + 1e-6).mean())
    wanted = 3.0 * torch.nn.functional.cross_entropy(probe.read(heads[0][0, [16, 22]]), torch.tensor([3, 3]))
    torch.testing.assert_close(read - plain, wanted)


def test_the_carry_probe_reads_the_number_from_the_reply_name_to_the_bracket_and_teaches_the_last_layer():
    model, _ = build_model(64, [2, 5])
    ids = torch.randint(14, 64, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    sequence = Sequence(ids, [IGNORE] * 20 + ids[20:], cite=(25, 5, 12, 1), anchors=(16, 22))
    batch = collate([sequence, Sequence(ids[:10], [IGNORE] * 5 + ids[5:10])], pad_id=0)
    assert batch["cite_carry"][0].nonzero().squeeze(1).tolist() == [22, 23, 24, 25]
    assert not batch["cite_carry"][1].any()
    probe = CitedCarryProbe(model.config.hidden_size, weight=2.0)
    with trainable_scan():
        plain, _ = reply_loss(model, batch)
        hidden = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states[-1]
        carried, _ = reply_loss(model, batch, carry_probe=probe)
        (carried - plain).backward()
    wanted = 2.0 * torch.nn.functional.cross_entropy(probe.read(hidden[0, 22:26]), torch.tensor([1] * 4))
    torch.testing.assert_close(carried - plain, wanted)
    assert model.model.layers[3].mamba.out_proj.weight.grad.abs().sum() > 0  # the last Mamba layer learns to carry it


def test_document_spans_are_each_documents_title_and_text_and_the_number_probe_reads_them(dev_model):
    tokenizer = AutoTokenizer.from_pretrained(dev_model)
    template = DEFAULT_TEMPLATE.read_text(encoding="utf-8")
    example = next(e for e in dev_corpus.generate("heldout", 20, seed=4, kinds=["documents"]))
    rendered = dev_corpus.render_example(example, tokenizer, template)
    ids = rendered.prompt.token_ids
    spans = document_spans(tokenizer, rendered.prompt.text, ids)
    documents = example.request["documents"]
    assert [tokenizer.decode(ids[a:b]).strip() for a, b in spans] == [
        f"Title: {d['title']}\nText: {d['text']}" for d in documents
    ]
    batch = collate([Sequence(ids, [IGNORE] * len(ids), documents=tuple(spans))], pad_id=0)
    hidden = torch.randn(1, len(ids), 8, generator=torch.Generator().manual_seed(1))
    probe = DocumentNumberProbe(8, weight=2.0)
    inside = [i for a, b in spans for i in range(a, b)]
    numbers = torch.tensor([n for n, (a, b) in enumerate(spans) for _ in range(a, b)])
    wanted = 2.0 * torch.nn.functional.cross_entropy(probe.read(hidden[0, inside]), numbers)
    torch.testing.assert_close(probe.loss(hidden, batch), wanted)


def test_a_short_run_writes_a_model_directory_transformers_loads_and_generates_with(tmp_path, dev_model):
    out = tmp_path / "model"
    config = TrainConfig(
        out=str(out), steps=2, batch_size=2, warmup_steps=1, train_examples=6, heldout_examples=2, eval_every=1
    )
    log = train(config)
    assert [e["step"] for e in log["evals"]] == [0, 1, 2]
    assert json.loads((out / "train_log.json").read_text())["steps"] == 2
    assert (out / "tokenizer.json").read_bytes() == (dev_model / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((dev_model / "config.json").read_text())
    assert (out / "chat_template.jinja").read_text() == (dev_model / "chat_template.jinja").read_text()
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    messages = [{"role": "user", "content": "Hello!"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    trained = dict(model.named_parameters())
    start, _ = build_model(len(tokenizer), [2, 5])
    assert any(not torch.equal(p, trained[name]) for name, p in start.named_parameters())


def test_a_run_can_start_from_another_runs_weights(tmp_path):
    first = TrainConfig(out=str(tmp_path / "a"), steps=1, batch_size=2, warmup_steps=1, train_examples=4, heldout_examples=2)
    train(first)
    again = TrainConfig(**{**first.__dict__, "out": str(tmp_path / "b"), "steps": 0, "init_from": first.out})
    train(again)
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("a", "b"))
    assert all(torch.equal(p, dict(b.named_parameters())[name]) for name, p in a.named_parameters())


def test_a_stage_stopped_early_ends_where_its_schedule_stands_and_is_deterministic(tmp_path):
    """`stop_at` ends (and saves) a run at that step of the schedule of `steps`; `kinds` limits the
    corpus; two runs with the same settings write the same weights (the recipe in the README)."""
    base = dict(steps=3, batch_size=2, warmup_steps=1, train_examples=4, heldout_examples=2, kinds="copy")
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **base))
    runs = [train(TrainConfig(out=str(tmp_path / name), stop_at=2, **base)) for name in ("a", "b")]
    assert whole["steps"] == 3 and [r["steps"] for r in runs] == [2, 2] and runs[0]["evals"][-1]["step"] == 2
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("a", "b"))
    assert all(torch.equal(p, dict(b.named_parameters())[name]) for name, p in a.named_parameters())


def test_growing_adds_layers_of_the_same_pattern_and_keeps_the_function():
    model, _ = build_model(688, [2, 5])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    grown = grow(model, 8, seed=1)
    layers = model.config.num_hidden_layers
    assert grown.config.num_hidden_layers == 8 and layers < 8
    assert [type(layer) for layer in grown.model.layers[:layers]] == [type(layer) for layer in model.model.layers]
    assert type(grown.model.layers[layers + 2].self_attn) is type(model.model.layers[2].self_attn)
    ids = torch.randint(20, 600, (2, 40), generator=torch.Generator().manual_seed(0))
    with trainable_scan(), torch.no_grad():
        torch.testing.assert_close(grown(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    grown(input_ids=ids).logits.square().mean().backward()
    assert grown.model.layers[-1].mamba.out_proj.weight.grad.abs().sum() > 0  # the new layers learn
    with pytest.raises(ValueError, match="more"):
        grow(model, layers, seed=1)


def test_growing_with_an_attention_period_puts_attention_where_it_says_and_keeps_the_first_layers():
    model, _ = build_model(688, [2, 5])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    grown = grow(model, 6, seed=1, attn_period=3)
    assert grown.config.layers_block_type == ["mamba", "mamba", "attention", "mamba", "mamba", "attention"]
    assert grown.config.layers_num_experts[:4] == model.config.layers_num_experts
    ids = torch.randint(20, 600, (2, 40), generator=torch.Generator().manual_seed(0))
    with trainable_scan(), torch.no_grad():
        torch.testing.assert_close(grown(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="changes the kinds"):
        grow(model, 6, seed=1, attn_period=2)  # layer 0 would become attention


def test_the_hop_loss_is_minus_log_the_second_attention_layers_head_on_the_name_anchors_at_the_bracket(tmp_path):
    model = grow(build_model(64, [2, 5])[0], 6, seed=2, attn_period=3)
    model.set_attn_implementation("eager")
    ids = torch.randint(14, 64, (30,), generator=torch.Generator().manual_seed(6)).tolist()
    sequence = Sequence(ids, [IGNORE] * 20 + ids[20:], cite=(25, 5, 12, 1), anchors=(16, 22))
    batch = collate([sequence, Sequence(ids[:10], [IGNORE] * 5 + ids[5:10])], pad_id=0)
    with trainable_scan():
        plain, _ = reply_loss(model, batch)
        hopped, _ = reply_loss(model, batch, cite_hop=2.0, cite_hop_head=1)
        attentions = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_attentions=True).attentions
        (hopped - plain).backward()
    second = [a for a in attentions if a is not None][1]
    torch.testing.assert_close(hopped - plain, -2.0 * torch.log(second[0, 1, 25, [16, 22]].sum() + 1e-6))
    torch.testing.assert_close(cited_hop_loss(attentions, batch, 1), -torch.log(second[0, 1, 25, [16, 22]].sum() + 1e-6))
    queries = model.model.layers[5].self_attn.q_proj.weight.grad.view(2, -1, model.config.hidden_size)
    assert queries[1].abs().sum() > 0 and queries[0].abs().sum() == 0  # it teaches that head alone
    without_names = collate([Sequence(ids, [IGNORE] * 20 + ids[20:], cite=(25, 5, 12, 1))], pad_id=0)
    with trainable_scan(), torch.no_grad():
        unnamed = model(input_ids=without_names["input_ids"], output_attentions=True).attentions
    assert cited_hop_loss(unnamed, without_names, 1) == 0  # its only anchor is the `[` itself
    with pytest.raises(ValueError, match="cite_at_name 1"):
        train(TrainConfig(out="unused", cite_hop=1.0))
    with pytest.raises(ValueError, match="second attention layer"):
        train(TrainConfig(out=str(tmp_path / "run"), cite_hop=1.0, cite_at_name=1, steps=1))


def test_widening_gives_each_query_head_its_own_key_value_head_and_keeps_the_function():
    model, _ = build_model(688, [2, 5])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    wide = widen_kv_heads(model, 2)
    assert model.config.num_key_value_heads == 1 and wide.config.num_key_value_heads == 2
    ids = torch.randint(20, 600, (2, 40), generator=torch.Generator().manual_seed(0))
    with trainable_scan(), torch.no_grad():
        torch.testing.assert_close(wide(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    wide(input_ids=ids).logits.square().mean().backward()
    key = wide.model.layers[2].self_attn.k_proj.weight
    first, second = key.grad.view(2, -1, key.shape[1])  # each head's key learns its own way
    assert not torch.allclose(first, second)
    with pytest.raises(ValueError, match="more than 2"):
        widen_kv_heads(wide, 2)
