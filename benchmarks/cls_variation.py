"""How much does each layer's [CLS] state vary between sentences? (A diagnostic for READ on encoders.)

READ corrects each token from that token's own per-layer states; a classifier that reads only [CLS] therefore
gets a correction computed from the [CLS] states alone. This prints, per layer, the spread of the [CLS] state
across sentences relative to its size: mean over dimensions of the across-sentence std, divided by the RMS of
the state. Protocol: the first N sentences of the GLUE SST-2 dev set, max length 64, the embedded
all-MiniLM-L6-v2 unless --model is given.

Usage: python benchmarks/cls_variation.py [--data-dir ../shared/data/glue] [--samples 200] [--model PATH]
"""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> list[float]:
    from transformers import AutoModel, AutoTokenizer

    from readapt.pretrained import embedded_backbone_dir
    from readapt.tasks import load_glue_split

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)

    path = args.model or embedded_backbone_dir()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    sentences = [e.texts[0] for e in load_glue_split("sst2", args.data_dir, "validation")[: args.samples]]
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states
    print(f"# [CLS] variation across {len(sentences)} SST-2 dev sentences, model {path}")
    print("layer  relative spread (std across sentences / RMS of the state)")
    spreads = []
    for layer, hidden in enumerate(states):
        cls = hidden[:, 0]
        spread = (cls.std(0).mean() / cls.pow(2).mean().sqrt()).item()
        spreads.append(spread)
        print(f"{layer:>5}  {spread:.4f}")
    return spreads


if __name__ == "__main__":
    main()
