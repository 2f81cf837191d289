"""Build the tiny Jamba-architecture dev models: Jamba-style tokenizer, and random or trained weights.

`python -m jamba_server.dev_model --out models/jamba-tiny-dev` writes the random-weight model, all
generated here from a fixed seed and a built-in corpus. `--trained` writes the same architecture and
tokenizer with the weights `train_dev_model` learned (issue 18), committed in `dev-model/` and
checked against `TRAINED_SHA256` first. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from jamba_server.settings import DEFAULT_TEMPLATE

SEED = 1234
TRAINED_SOURCE = Path(__file__).resolve().parents[2] / "dev-model" / "jamba-tiny-dev-trained"
# of TRAINED_SOURCE/model.safetensors: a changed file fails `make model` (update it with the file)
TRAINED_SHA256 = "0e51c9f8db24f063468d82215318b6aa854f5b219a7f9561cbc8b7047c7e6ee6"
VOCAB_SIZE = 1024

# Ids 0-3 follow Jamba's tokenizer; the rest are Jamba 1.5's chat and tool tokens, each one token.
SPECIAL_TOKENS = [
    "<|pad|>",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|unk|>",
    "<|bom|>",
    "<|eom|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool|>",
    "<tool_calls>",
    "</tool_calls>",
    "<citations>",
    "</citations>",
]

MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=2,  # head_dim 64: the CPU attention backend has no head_dim 16
    num_key_value_heads=1,
    attn_layer_period=4,
    attn_layer_offset=2,  # layers 0, 1, 3 are Mamba, layer 2 is attention
    expert_layer_period=2,
    expert_layer_offset=1,  # layers 1 and 3 are MoE
    num_experts=4,
    num_experts_per_tok=2,
    mamba_d_state=8,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_dt_rank=8,
    max_position_embeddings=262144,  # as Jamba 1.5's config: long-request tests need the room
    tie_word_embeddings=False,
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. Hello, how are you? I am fine, thank you.
What's the weather like right now in Jerusalem and in London? It is 18 degrees celsius.
You are a helpful assistant. Answer briefly and use the documents when they help.
{"name": "get_current_weather", "arguments": {"location": "Paris", "format": "celsius"}}
{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
Harry Potter is a series of seven fantasy novels written by British author J. K. Rowling.
The Great Gatsby is a novel by American writer F. Scott Fitzgerald. The bridge opened in 1937.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14 -7 true false null [] {} [0, 2] ("a", "b")
Shalom! Bonjour, ça va? ¿Qué tal? Übersetzen. Grüße aus Köln. Привет. مرحبا. שלום. 你好。
def add(a, b):\n    return a + b\n# Tools\n## Functions\n## Document ID: 0\nTitle: Text:\n
"""


def _corpus() -> list[str]:
    lines = [line for line in _CORPUS.splitlines() if line]
    return lines * 20


def build_tokenizer(chat_template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert core.token_to_id(token) == expected_id, token
    bos = "<|startoftext|>"
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token="<|endoftext|>",
        unk_token="<|unk|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


# What training may change of `MODEL_CONFIG` (`train_dev_model.grow`, `widen_kv_heads`): a build from
# trained weights takes these from them.
TRAINABLE_SHAPE = ("num_hidden_layers", "attn_layer_period", "num_key_value_heads")


def build_model(vocab_size: int, eos_ids: list[int], **shape: int):
    """`MODEL_CONFIG`'s model with random weights; `shape` overrides `TRAINABLE_SHAPE` settings (a
    trained model may be deeper, or have more key/value heads)."""
    if not set(shape) <= set(TRAINABLE_SHAPE):
        raise ValueError(f"only {TRAINABLE_SHAPE} may differ from MODEL_CONFIG, not {sorted(shape)}")
    import torch
    from transformers import GenerationConfig, JambaConfig, JambaForCausalLM

    torch.manual_seed(SEED)
    config = JambaConfig(
        vocab_size=vocab_size,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=eos_ids,
        **{**MODEL_CONFIG, **shape},
    )
    model = JambaForCausalLM(config).to(torch.float32).eval()
    generation = GenerationConfig(bos_token_id=1, eos_token_id=eos_ids, pad_token_id=0)
    return model, generation


class WeightsChanged(Exception):
    """The committed trained weights are not the ones `TRAINED_SHA256` names."""


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def trained_weights(source: Path = TRAINED_SOURCE, expected: str = TRAINED_SHA256) -> Path:
    """The committed weights file, once its checksum is the expected one."""
    weights = source / "model.safetensors"
    actual = sha256_of(weights)
    if actual != expected:
        raise WeightsChanged(f"{weights}: sha256 {actual}, expected {expected} (dev_model.TRAINED_SHA256)")
    return weights


def build(out: Path, weights: Path | None = None) -> str:
    """Write the checkpoint to `out` (random weights, or the safetensors file `weights` in the same
    architecture, in their `TRAINABLE_SHAPE`); return a digest of its weights and tokenizer."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = build_tokenizer(DEFAULT_TEMPLATE.read_text(encoding="utf-8"))
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|eom|>")]
    if weights is None:
        model, generation = build_model(len(tokenizer), eos_ids)
    else:  # through transformers: its checkpoint layout is not its state_dict's
        import torch
        from transformers import JambaForCausalLM

        trained = JambaForCausalLM.from_pretrained(weights.parent, dtype=torch.float32)
        shape = {name: getattr(trained.config, name) for name in TRAINABLE_SHAPE}
        model, generation = build_model(len(tokenizer), eos_ids, **shape)
        model.load_state_dict(trained.state_dict(), strict=True)
        if (weights.parent / "train_log.json").exists():
            shutil.copyfile(weights.parent / "train_log.json", tmp / "train_log.json")
    model.save_pretrained(tmp, safe_serialization=True)
    generation.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    digest = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json"):
        digest.update((tmp / name).read_bytes())
    (tmp / "DIGEST").write_text(digest.hexdigest() + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="models/jamba-tiny-dev")
    parser.add_argument("--trained", action="store_true", help=f"the trained weights in {TRAINED_SOURCE}")
    args = parser.parse_args()
    try:
        digest = build(Path(args.out), trained_weights() if args.trained else None)
    except WeightsChanged as error:
        raise SystemExit(f"dev_model: {error}") from None
    print(json.dumps({"model": args.out, "sha256": digest}))


if __name__ == "__main__":
    main()
