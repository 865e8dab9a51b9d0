"""Make a tiny random-weight Llama chat model offline, for the vLLM CPU server of the tests.

Run with the vLLM venv's Python (it needs torch, transformers and tokenizers):

    .venv-vllm/bin/python scripts/vllm_tiny_model.py OUT_DIR

Nothing is downloaded. The tokenizer is a byte-level BPE trained by `tokenizers` on this
repository's own text; the weights are random (seeded), so what the model writes is gibberish,
but everything around it (the chat template, tokenization, sampling, usage, errors) is vLLM's
own. Sizes are the smallest vLLM's CPU attention takes: head size 32 (it supports 32, 64, 80,
... 512), 2 heads, 2 layers, a 2,048-token vocabulary: about 0.3 M parameters.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 2048
SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
# A plain chat template: `<|role|>` and the text per message, and the assistant's turn to end.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def corpus(root: Path) -> Iterator[str]:
    """The repository's own text (its code and docs) as training text for the tokenizer."""
    for folder in ("gpujobs", "workers", "tests", "scripts", "docs"):
        for path in sorted((root / folder).rglob("*")):
            if path.suffix in (".py", ".md") and path.is_file():
                yield path.read_text(encoding="utf-8", errors="replace")
    yield (root / "README.md").read_text(encoding="utf-8")


def make_tokenizer(root: Path) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tokenizer.train_from_iterator(corpus(root), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="</s>", model_max_length=2048,
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the model into")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    tokenizer = make_tokenizer(root)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, torch_dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    # Some vLLM versions read the template only from this file.
    (args.out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"model": str(args.out), "parameters": params, "vocab": len(tokenizer)}))


if __name__ == "__main__":
    main()
