"""Write a small random OPT checkpoint with a byte-level BPE tokenizer into a directory, for trying
``snake-coordinator simulate --model opt:DIR --dataset austen`` without downloading anything.

The tokenizer (``tokenizers``, OPT's specials first: <s> 0, <pad> 1, </s> 2, <unk> 3) is trained on the
train part (first 80 %) of every Austen novel, never on the held-out test parts. The weights are random:
such a base has a perplexity of about its vocabulary size, so a trial lowers it easily.

    PYTHONPATH=$PWD python tools/make_opt.py /tmp/opt-small --vocab 4096 --layers 4 --hidden 128
"""

from __future__ import annotations

import argparse
from pathlib import Path

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--vocab", type=int, default=4096, help="BPE tokens = the model's vocabulary")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (ffn: 4x)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--positions", type=int, default=128, help="max_position_embeddings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    from coordinator.text.austen import load_austen
    from coordinator.text.sequences import SPLIT_FRACTIONS
    from models.opt import opt_config

    texts = [text[: int(len(text) * SPLIT_FRACTIONS[0])] for text in load_austen().values()]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=args.vocab, min_frequency=2, special_tokens=SPECIALS, show_progress=False)
    torch.manual_seed(args.seed)
    config = opt_config(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, ffn_dim=4 * args.hidden,
        num_attention_heads=args.heads, max_position_embeddings=args.positions, word_embed_proj_dim=args.hidden,
        pad_token_id=1, bos_token_id=2, eos_token_id=2,
    )  # fmt: skip
    model = transformers.OPTForCausalLM(config)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save(str(args.out / "tokenizer.json"))
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.out}: OPT {args.layers} layers, width {args.hidden}, {params:,} parameters, BPE {tok.get_vocab_size()}"
    )


if __name__ == "__main__":
    main()
