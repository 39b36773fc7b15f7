"""poegpt's tokenizer as a Hugging Face fast tokenizer, and back (docs/huggingface.md, "Tokenizer").

`export-hf` writes a plain `tokenizer.json` (`PreTrainedTokenizerFast`, no remote code): the same
split regex and byte-level BPE, with every (left, right) split of a token as a merge ranked by the
token, and whole pieces looked up first, which is how tiktoken applies the ranks; `<|bos|>` is
prepended by the post-processor when `add_special_tokens=True`, like `Tokenizer.encode`, and
special-token text typed in the input stays text. `tokenizer_from_json` reverses it exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import PoEError

SPECIAL_TOKENS_MAP = "special_tokens_map.json"


def byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes stand for themselves, the other 68 bytes map to
    code points from 256 up, in byte order, so every token is a string of visible characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def hf_tokenizer(tok):
    """poegpt's Tokenizer as a `tokenizers.Tokenizer` that encodes to the same ids."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors
    table = byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    ranks = tok.mergeable_ranks
    merges = []
    for piece, rank in ranks.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], text(left), text(right)))
    merges.sort()
    bpe = models.BPE(vocab={text(b): r for b, r in ranks.items()}, merges=[(m[3], m[4]) for m in merges],
                     ignore_merges=True)
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([name for name, _ in specials])
    bos = "<|bos|>"
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                                      special_tokens=[(bos, tok.bos_id)])
    for name, i in specials:
        if hf.token_to_id(name) != i:
            raise PoEError(f"special token {name} got id {hf.token_to_id(name)} in the export, not {i}")
    return hf


def save_tokenizer(tok, out: Path, context: int) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json, loadable by AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast
    bos = "<|bos|>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizer(tok), bos_token=bos, eos_token=bos, pad_token=bos,
        model_max_length=context, padding_side="left", split_special_tokens=True,
        model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=False)
    fast.save_pretrained(out)
    # The class name every transformers version knows (5.x resolves it to its tokenizers backend).
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    specials = {"bos_token": bos, "eos_token": bos, "pad_token": bos}
    (out / SPECIAL_TOKENS_MAP).write_text(json.dumps(specials, indent=2) + "\n")


def tokenizer_from_json(path: Path):
    """poegpt's Tokenizer back from an exported tokenizer.json."""
    from ...tokenizer import SPECIAL_TOKENS, Tokenizer
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        model, pre = state["model"], state["pre_tokenizer"]
        if model["type"] != "BPE":
            raise ValueError(f"model type {model['type']}")
        split = next(p for p in pre["pretokenizers"] if p["type"] == "Split")
        pattern = split["pattern"]["Regex"]
        back = {c: b for b, c in byte_to_unicode().items()}
        specials = {t["content"]: t["id"] for t in state["added_tokens"]}
        ranks = {bytes(back[c] for c in piece): i for piece, i in model["vocab"].items() if piece not in specials}
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as e:
        raise PoEError(f"{path} is not a tokenizer.json written by export-hf ({type(e).__name__}: {e})") from None
    tok = Tokenizer(ranks, pattern=pattern)
    if specials != tok.special_tokens:
        raise PoEError(f"{path}: its special tokens differ from poegpt's {SPECIAL_TOKENS}")
    return tok
