"""CLIP's tokenizer from a Stable Diffusion `tokenizer` folder, with the `tokenizers` package alone
(no transformers at run time).

A folder holds either `tokenizer.json` (the whole `tokenizers` pipeline, as transformers' fast
tokenizers save it) or CLIP's original files: `vocab.json` (token -> id) and `merges.txt` (BPE
merges in priority order), with the special tokens and `model_max_length` in
`tokenizer_config.json` / `special_tokens_map.json` (SD 1.x/2.x folders). From the latter we build
the pipeline transformers' `CLIPTokenizer` builds:

- normalize: Unicode NFC, every whitespace run -> one space, lowercase;
- split into words with CLIP's regex (the special tokens, the contractions 's 't 're 've 'm 'll
  'd, letter runs, single digits, runs of other non-space characters), drop the spaces;
- map each word's UTF-8 bytes to printable characters (GPT-2's byte-level alphabet) and apply
  the BPE merges within the word, its last symbol carrying the end-of-word suffix `</w>`;
- wrap in `<|startoftext|>` ... `<|endoftext|>`.

Special tokens (bos, eos, unk, pad and any extra ones) are matched in the raw text before all
of this, as transformers does; so with SD 2.x's pad token `!`, a "!" in a prompt becomes the
pad id. Calling the tokenizer pads and truncates as diffusers' Stable Diffusion pipelines do
(`padding="max_length"`, `max_length=model_max_length`, `truncation=True`): a long prompt keeps
its first `max_length - 2` tokens between BOS and EOS.
"""

from __future__ import annotations

import json
import os

import numpy as np

TOKENIZER_JSON = "tokenizer.json"
VOCAB, MERGES = "vocab.json", "merges.txt"
CONFIG, SPECIAL_MAP = "tokenizer_config.json", "special_tokens_map.json"
# CLIP's word split (transformers 5's CLIPTokenizer); the special tokens first
CLIP_SPLIT = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
              r"[^\s\p{L}\p{N}]+")
END_OF_WORD = "</w>"
# transformers' CLIPTokenizer defaults, for a folder that names none
SPECIAL_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
EXTRA_KEYS = ("additional_special_tokens", "extra_special_tokens")
# CLIP's context length, for a folder whose tokenizer_config.json gives no model_max_length
DEFAULT_MAX_LENGTH = 77


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object")
    return value


def _content(token):
    """A special token as saved: a string or an AddedToken dict {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


def _special_tokens(folder):
    """(special token strings by role, extra special tokens, model_max_length or None)."""
    config = _read_json(os.path.join(folder, CONFIG)) if os.path.isfile(
        os.path.join(folder, CONFIG)) else {}
    merged = dict(config)
    special_map = os.path.join(folder, SPECIAL_MAP)
    # as transformers: special_tokens_map.json counts only for configs without added_tokens_decoder
    if os.path.isfile(special_map) and "added_tokens_decoder" not in config:
        merged.update(_read_json(special_map))
    roles = {role: _content(merged.get(role)) or default for role, default in
             SPECIAL_DEFAULTS.items()}
    extra = []
    for key in EXTRA_KEYS:
        values = merged.get(key) or []
        values = values.values() if isinstance(values, dict) else values
        extra += [t for t in map(_content, values) if t]
    for entry in (config.get("added_tokens_decoder") or {}).values():
        if isinstance(entry, dict) and entry.get("special") and _content(entry):
            extra.append(_content(entry))
    max_length = config.get("model_max_length")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or not 2 <= max_length \
            <= 1_000_000:  # transformers writes ~1e30 for "no limit"
        max_length = None
    return roles, extra, max_length


def _clip_bpe(folder, roles):
    """CLIP's pipeline around the BPE model of `vocab.json` + `merges.txt` (as transformers'
    CLIPTokenizer and its slow->fast converter build it)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab_path, merges_path = os.path.join(folder, VOCAB), os.path.join(folder, MERGES)
    if not os.path.isfile(merges_path):
        raise FileNotFoundError(f"{folder!r} has {VOCAB} but no {MERGES}; a CLIP tokenizer "
                                f"needs both (or {TOKENIZER_JSON})")
    try:
        vocab, merges = BPE.read_file(vocab_path, merges_path)
    except Exception as e:  # the Rust reader's errors are plain Exceptions
        raise ValueError(f"{vocab_path} / {merges_path} are not a BPE vocabulary and merges "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for role in ("bos_token", "eos_token"):
        if roles[role] not in vocab:
            raise ValueError(f"{vocab_path} has no {role} {roles[role]!r}")
    tokenizer = Tokenizer(BPE(vocab, merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix=END_OF_WORD, fuse_unk=False,
                              unk_token=roles["unk_token"]))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    # RobertaProcessing: <bos> text <eos> (cls = bos, sep = eos), offsets untouched
    tokenizer.post_processor = processors.RobertaProcessing(
        (roles["eos_token"], vocab[roles["eos_token"]]),
        (roles["bos_token"], vocab[roles["bos_token"]]), trim_offsets=False,
        add_prefix_space=False)
    return tokenizer


class CLIPTokenizer:
    """Text -> token ids for a CLIP text encoder: `tokenizer(texts, max_length=None)` ->
    int32 (N, max_length), each row <bos> tokens <eos> then the pad id, truncated to
    `max_length` (default `model_max_length`, 77 in Stable Diffusion)."""

    def __init__(self, tokenizer, roles, model_max_length):
        self._tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.special_tokens = dict(roles)
        ids = {role: tokenizer.token_to_id(token) for role, token in roles.items()}
        missing = [f"{role} {roles[role]!r}" for role, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer's vocabulary lacks the {', '.join(missing)}")
        self.bos_token_id, self.eos_token_id = ids["bos_token"], ids["eos_token"]
        self.pad_token_id, self.unk_token_id = ids["pad_token"], ids["unk_token"]

    @property
    def vocab_size(self):
        """Number of ids, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts, max_length=None):
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise ValueError(f"texts must be strings, got {bad[0]}")
        length = self.model_max_length if max_length is None else max_length
        if not isinstance(length, int) or isinstance(length, bool) or length < 2:
            raise ValueError(f"max_length={length!r} must be an integer >= 2 (room for the "
                             "start and end tokens)")
        tok = self._tokenizer
        tok.enable_truncation(max_length=length)
        tok.enable_padding(length=length, pad_id=self.pad_token_id,
                           pad_token=self.special_tokens["pad_token"])
        ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=True)]
        return np.asarray(ids, np.int32).reshape(len(texts), length)

    def decode(self, ids):
        """Token ids -> text without special tokens (words separated by single spaces)."""
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        return text.replace(END_OF_WORD, " ").strip()


def load_tokenizer(folder):
    """The CLIP tokenizer of a folder (`tokenizer.json`, else `vocab.json` + `merges.txt`, with
    `tokenizer_config.json` / `special_tokens_map.json` for special tokens and max length)."""
    from tokenizers import AddedToken, Tokenizer

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder {folder!r} does not exist")
    roles, extra, max_length = _special_tokens(folder)
    path = os.path.join(folder, TOKENIZER_JSON)
    if os.path.isfile(path):
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # the Rust parser's errors are plain Exceptions
            raise ValueError(f"{path} is not a tokenizers file "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                             ) from None
    elif os.path.isfile(os.path.join(folder, VOCAB)):
        tokenizer = _clip_bpe(folder, roles)
    else:
        raise FileNotFoundError(f"{folder!r} has no {TOKENIZER_JSON} nor {VOCAB} + {MERGES}: not "
                                "a tokenizer folder")
    specials = list(dict.fromkeys([*roles.values(), *extra]))
    tokenizer.add_special_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False,
                                             normalized=False, special=True) for t in specials])
    return CLIPTokenizer(tokenizer, roles, max_length or DEFAULT_MAX_LENGTH)
