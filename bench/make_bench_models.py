#!/usr/bin/env python3
"""Random-initialised checkpoints of shapes the peers' harness does not build, by its own code.

The issue's cases are the harness's (`peers/make_models.py`); these serve slothnb's own defaults,
e.g. whether a 3B model should graph whole layers or only the forward (`layer_graphs.default_for`):

    3b   Llama-3.2-3B (config.json of meta-llama/Llama-3.2-3B: tied embeddings, rope llama3 x32)
    5b   between 3B and 7B: 24 Llama layers of Yi-6B's/Llama-2-7B's width (hidden 4096, MLP 11008,
         GQA 32/8), Llama-3's vocabulary, tied embeddings; 4.8B parameters

    python3 bench/make_bench_models.py 3b        # -> $ANCHOR_MODEL_ROOT/rand-llama-3b
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "peers"))
import make_models  # noqa: E402  (the harness's builder: same init, tokenizer and file layout)

EXTRA = {
    "3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
               intermediate_size=8192, tie_word_embeddings=True, rope_factor=32.0),
    "5b": dict(hidden_size=4096, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=11008, tie_word_embeddings=True, rope_factor=8.0),
}
DIR_NAME = {"3b": "rand-llama-3b", "5b": "rand-llama-5b"}


def main(names):
    for name in names:
        if name not in EXTRA:
            sys.exit(f"unknown model {name!r}: this script builds {sorted(EXTRA)}; the issue's shapes come from "
                     "peers/make_models.py (run_gpu.sh model:NAME)")
        make_models.SHAPES[name] = EXTRA[name]
        make_models.FAMILY[name] = "llama"
        make_models.DIR_NAME[name] = DIR_NAME[name]
        make_models.build(name, os.environ.get("ANCHOR_MODEL_ROOT", "/tmp/anchor_models"))


if __name__ == "__main__":
    main(sys.argv[1:])
