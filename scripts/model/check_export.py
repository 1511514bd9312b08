#!/usr/bin/env python3
"""Check that Hugging Face transformers (and PEFT, when installed) load what lmforge saves.

  LMFORGE_EXPORT_DIR=/tmp/lmforge-export cargo test -p lmforge-model --test transformers_fixtures \
      -- --ignored export_fixtures_for_transformers_check
  python scripts/model/check_export.py /tmp/lmforge-export

Loads each exported model and tokenizer with the Auto classes and compares the logits with
the fixture's expected.json (which transformers produced from the original weights).
"""
import json
import pathlib
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "libs" / "model" / "fixtures"


def main():
    out = pathlib.Path(sys.argv[1])
    for name in ("tiny-llama", "tiny-qwen2"):
        expected = json.loads((FIXTURES / name / "expected.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(out / name).eval()
        tok = AutoTokenizer.from_pretrained(out / name)
        ids = torch.tensor(expected["input_ids"])
        mask = torch.tensor(expected["attention_mask"])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        want = torch.tensor(expected["logits"])
        diff = ((logits - want).abs() * mask[..., None]).max().item()
        ids_ok = tok(expected["sample_text"], add_special_tokens=False)["input_ids"] == expected["sample_ids"]
        chat = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                       add_generation_prompt=True)
        print(f"{name}: max |logit diff| {diff:.2e}, tokenizer ids equal: {ids_ok}, chat: {chat!r}")
        assert diff < 1e-4 and ids_ok and chat == "用户：你好\n助手："
    try:
        from peft import PeftModel
    except ImportError:
        print("peft not installed: adapter check skipped")
        return
    # lmforge's PEFT adapter loads in PEFT, and PEFT's merge equals lmforge's merge.
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny-llama").eval()
    peft_merged = PeftModel.from_pretrained(base, out / "lora-adapter").merge_and_unload().eval()
    ours = AutoModelForCausalLM.from_pretrained(out / "lora-merged").eval()
    ids = torch.tensor(json.loads((FIXTURES / "tiny-llama" / "expected.json").read_text())["input_ids"][:1])
    with torch.no_grad():
        diff = (peft_merged(ids).logits - ours(ids).logits).abs().max().item()
        # PEFT merged into `base` in place, so compare with a fresh copy of the base.
        fresh = AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny-llama").eval()
        moved = (fresh(ids).logits - ours(ids).logits).abs().max().item()
    print(f"lora: PEFT merge vs lmforge merge max |logit diff| {diff:.2e} (adapter moved logits by {moved:.2e})")
    assert diff < 1e-4 and moved > 1e-3


if __name__ == "__main__":
    main()
