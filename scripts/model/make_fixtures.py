#!/usr/bin/env python3
"""Make the tiny transformers fixtures that libs/model's tests compare against.

For a tiny random Llama (with Llama-3 rope scaling, untied) and a tiny random Qwen2
(q/k/v biases, tied embeddings) this writes, under libs/model/fixtures/<name>/:
  - the checkpoint as transformers saves it (config.json, model.safetensors, ...),
  - a byte-level BPE tokenizer trained here (tokenizer.json, tokenizer_config.json),
  - expected.json: input ids, attention mask, logits at every position from transformers,
    and the tokenizer's ids for a sample text.
The outputs are committed so CI needs no Python. Re-run with:
  python3 -m venv .venv-fixtures && .venv-fixtures/bin/pip install torch transformers safetensors
  .venv-fixtures/bin/python scripts/model/make_fixtures.py
"""
import json
import pathlib

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM)

ROOT = pathlib.Path(__file__).resolve().parents[2] / "libs" / "model" / "fixtures"
SAMPLE = "用户：你好，世界！\n助手：Hello, world."
CORPUS = [
    "用户：你好，请介绍一下你自己。",
    "助手：你好！我是一个语言模型，很高兴为你服务。",
    "The quick brown fox jumps over the lazy dog.",
] * 20


def tokenizer(vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def make(name, model):
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(model.config.vocab_size)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}用户：{{ m['content'] }}\n"
                         "{% else %}助手：{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}助手：{% endif %}")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    expected = {
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "logits": [[[round(float(x), 7) for x in pos] for pos in row] for row in logits],
        "sample_text": SAMPLE,
        "sample_ids": tok(SAMPLE, add_special_tokens=False)["input_ids"],
    }
    (out / "expected.json").write_text(json.dumps(expected))


def main():
    torch.manual_seed(1234)
    common = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    llama = LlamaForCausalLM(LlamaConfig(
        **common, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))
    qwen = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=10000.0, tie_word_embeddings=True))
    for model in (llama, qwen):
        model.eval()
        with torch.no_grad():  # norms at 1 and biases at 0 would hide layout mistakes
            for n, p in model.named_parameters():
                if n.endswith("norm.weight") or n.endswith(".bias"):
                    p.add_(torch.randn_like(p) * 0.1)
    make("tiny-llama", llama)
    make("tiny-qwen2", qwen)


if __name__ == "__main__":
    main()
