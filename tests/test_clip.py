"""CLIP text encoder and tokenizer (`jaxdiff.models.clip`, `jaxdiff.interop.clip`,
`jaxdiff.interop.tokenizer`) against transformers: tiny random `CLIPTextModel` /
`CLIPTextModelWithProjection` folders written by `save_pretrained`, and a small CLIP-format BPE
vocabulary trained here."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxdiff.interop import clip, folders  # noqa: E402
from jaxdiff.interop.tokenizer import load_tokenizer  # noqa: E402

VOCAB = 100
BOS = 98
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=24)


def _rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _torch_model(cls_name, eos, hidden_act="quick_gelu", seed=0):
    config = transformers.CLIPTextConfig(**TINY, eos_token_id=eos, bos_token_id=BOS,
                                         pad_token_id=0, hidden_act=hidden_act)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from init (unit LayerNorms, zero biases): every weight matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _ids(eos, seed=0, batch=4, length=16):
    """Token rows as a tokenizer makes them: BOS, words, EOS, then padding (the EOS or 0).
    The words contain both 2 (the legacy eos_token_id) and VOCAB - 1 (argmax's choice), so
    legacy pooling (argmax) and modern pooling (first `eos`) read different positions."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int64)
    mask = np.zeros((batch, length), np.int64)
    for row in range(batch):
        n = 3 + row * 3
        words = rng.integers(3, BOS - 1, n)
        words[0] = 2
        if eos != VOCAB - 1:
            words[-1] = VOCAB - 1
        pad = eos if row % 2 else 0
        ids[row] = np.concatenate([[BOS], words, [eos], [pad] * (length - n - 2)])
        mask[row, :n + 2] = 1
    return ids, mask


def _save(tmp_path, model, name):
    path = str(tmp_path / name)
    model.save_pretrained(path)
    return path


CASES = [("CLIPTextModel", 2), ("CLIPTextModel", 97), ("CLIPTextModelWithProjection", 2),
         ("CLIPTextModelWithProjection", VOCAB - 1)]


@pytest.mark.parametrize("cls_name,eos", CASES)
def test_parity_with_transformers(tmp_path, cls_name, eos):
    model = _torch_model(cls_name, eos, hidden_act="gelu" if eos == 97 else "quick_gelu")
    folder = _save(tmp_path, model, "enc")
    ours, params = clip.load(folder)
    assert type(ours).__name__ == cls_name and ours.eos_token_id == eos
    ids, mask = _ids(eos)
    for attention_mask in (None, mask):
        out = ours.apply({"params": params}, jnp.asarray(ids, jnp.int32),
                    None if attention_mask is None else jnp.asarray(attention_mask),
                    output_hidden_states=True)
        with torch.no_grad():
            kw = dict(attention_mask=None if attention_mask is None else
                      torch.tensor(attention_mask), output_hidden_states=True)
            ref = model(torch.tensor(ids), **kw)
            base = model.text_model(torch.tensor(ids), **kw) if hasattr(model, "text_model") \
                else ref
        assert len(out.hidden_states) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
        errors = {"last": _rel(out.last_hidden_state, ref.last_hidden_state),
                  "pooled": _rel(out.pooler_output, base.pooler_output),
                  "penultimate": _rel(out.hidden_states[-2], ref.hidden_states[-2])}
        errors |= {f"hidden{i}": _rel(a, b) for i, (a, b) in
                   enumerate(zip(out.hidden_states, ref.hidden_states))}
        if cls_name == "CLIPTextModelWithProjection":
            assert out.text_embeds.shape == (ids.shape[0], TINY["projection_dim"])
            errors["text_embeds"] = _rel(out.text_embeds, ref.text_embeds)
        else:
            assert out.text_embeds is None
        assert max(errors.values()) <= 1e-4, errors
    # the pooled row is where the config says: argmax(ids) (legacy 2) or the first eos
    where = ids.argmax(-1) if eos == 2 else (ids == eos).argmax(-1)
    np.testing.assert_array_equal(
        np.asarray(out.pooler_output),
        np.asarray(out.last_hidden_state)[np.arange(len(ids)), where])


def test_parity_float64(tmp_path):
    model = _torch_model("CLIPTextModelWithProjection", VOCAB - 1).double()
    folder = _save(tmp_path, model, "enc64")
    ids, _ = _ids(VOCAB - 1, seed=3)
    with jax.enable_x64(True):
        ours, params = clip.load(folder, dtype=jnp.float64)
        out = jax.jit(ours.apply, static_argnames="output_hidden_states")(
            {"params": params}, jnp.asarray(ids), output_hidden_states=True)
        assert out.last_hidden_state.dtype == jnp.float64
        with torch.no_grad():
            ref = model(torch.tensor(ids), output_hidden_states=True)
        errors = [_rel(out.last_hidden_state, ref.last_hidden_state),
                  _rel(out.hidden_states[-2], ref.hidden_states[-2]),
                  _rel(out.text_embeds, ref.text_embeds)]
    assert max(errors) <= 1e-6, errors


def test_export_round_trip(tmp_path):
    for cls_name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        model = _torch_model(cls_name, VOCAB - 1, seed=5)
        ours, params = clip.load(_save(tmp_path, model, cls_name))
        out_dir = str(tmp_path / f"{cls_name}_export")
        clip.export(out_dir, ours, params)
        back, info = getattr(transformers, cls_name).from_pretrained(out_dir,
                                                                     output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert type(back).__name__ == cls_name
        ids, _ = _ids(VOCAB - 1, seed=7)
        with torch.no_grad():
            a, b = model(torch.tensor(ids)), back.eval()(torch.tensor(ids))
        np.testing.assert_array_equal(a.last_hidden_state.numpy(), b.last_hidden_state.numpy())
        if cls_name == "CLIPTextModelWithProjection":
            np.testing.assert_array_equal(a.text_embeds.numpy(), b.text_embeds.numpy())
        # our export has the hub layout (text_model. prefix); it loads back to the same params
        again_module, again = clip.load(out_dir)
        assert again_module == ours
        jax.tree.map(np.testing.assert_array_equal, again, params)
    # a position_ids buffer, as older checkpoints store it, is skipped
    config = clip.config_of(ours, params)
    buffered = str(tmp_path / "buffered")
    folders.save_params(buffered, params, config, filename="model.safetensors",
                        extra={"text_model.embeddings.position_ids": np.arange(77)[None]})
    jax.tree.map(np.testing.assert_array_equal, clip.load(buffered)[1], params)


def test_errors_are_one_line(tmp_path):
    vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
        image_size=8, patch_size=4))
    with pytest.raises(ValueError, match="CLIPTextModel") as err:
        clip.load(_save(tmp_path, vision, "vision"))
    assert "\n" not in str(err.value)
    config = {"architectures": ["CLIPTextModel"], **TINY}
    for key, value in (("hidden_act", "relu"), ("num_attention_heads", 5),
                       ("eos_token_id", [1, 2])):
        with pytest.raises(ValueError, match=key) as err:
            clip.from_config({**config, key: value})
        assert "\n" not in str(err.value)
    module = clip.from_config(config)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        module.init(jax.random.key(0), jnp.zeros((1, 78), jnp.int32))
    with pytest.raises(ValueError, match="vocab_size"):
        module.init(jax.random.key(0), jnp.full((1, 4), VOCAB, jnp.int32))
    with pytest.raises(FileNotFoundError, match="tokenizer") as err:
        load_tokenizer(str(tmp_path))
    assert "\n" not in str(err.value)


# --- tokenizer ---------------------------------------------------------------------------------

CORPUS = [
    "a photo of a cat sitting on the mat", "the quick brown fox jumps over the lazy dog",
    "an astronaut riding a horse on mars, high quality, 4k", "photograph of a café in paris",
    "it's a painting of the sea at sunset, they're watching", "a red car parked in the street",
    "portrait of a woman with blue eyes, oil on canvas", "mountains and rivers in the morning",
    "a bowl of fruit: apples, bananas and oranges", "we'll see the stars tonight, i'm sure",
    "ancient castle on a hill, dramatic lighting, trending on artstation",
    "a small house in the forest with snow", "city skyline at night with neon lights",
]
TEXTS = [
    "a photo of a cat", "A PHOTO OF A CAT", "An Astronaut Riding A Horse On Mars!!",
    "  extra   spaces\tand\ttabs\nand newlines  ", "", "it's, they're; we'll? I'M", "4k 1080p 2024",
    "café naïve résumé", "cafe\u0301 (combining accent, NFC)", "emoji 🐱🚀 and ✨ sparkles",
    "日本語のテキスト 中文", "Ünïcödé ÀÉÎÕÜ ß", "punctuation...!?;:---***", "hello!world!",
    "<|startoftext|>inside<|endoftext|> text", "x" * 40, "tokens " * 100,
    "a mat, the mat; THE MAT", "mixed123numbers456", "quotes \"double\" and 'single'",
]


def _train_clip_vocab(folder):
    """vocab.json + merges.txt in CLIP's format: the 256 byte-level symbols, the same with
    `</w>`, the merged tokens in merge order, then <|startoftext|> and <|endoftext|>."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                             behavior="removed", invert=True),
        ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=1000, end_of_word_suffix="</w>", show_progress=False,
                                  initial_alphabet=ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(tok.to_str())["model"]["merges"]]
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {}
    for token in [*alphabet, *(a + "</w>" for a in alphabet), *(a + b for a, b in merges),
                  "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab, merges


def _original_files_folder(src, folder, pad):
    """A Stable Diffusion-style folder: CLIP's files and the two JSON configs, no tokenizer.json."""
    os.makedirs(folder)
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(src, name), encoding="utf-8") as f, \
                open(os.path.join(folder, name), "w", encoding="utf-8") as g:
            g.write(f.read())
    bos = {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
           "single_word": False, "__type": "AddedToken"}
    config = {"add_prefix_space": False, "bos_token": bos, "do_lower_case": True,
              "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 77,
              "pad_token": pad, "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad,
                   "unk_token": "<|endoftext|>"}, f)
    return folder


def test_tokenizer_matches_transformers(tmp_path):
    src = str(tmp_path / "src")
    vocab, merges = _train_clip_vocab(src)
    assert len(merges) >= 200
    made = {}
    for name, pad in (("sd1", "<|endoftext|>"), ("sd2", "!")):
        saved = str(tmp_path / f"{name}_saved")
        transformers.CLIPTokenizer(os.path.join(src, "vocab.json"),
                                   os.path.join(src, "merges.txt"), pad_token=pad,
                                   model_max_length=77).save_pretrained(saved)
        assert os.path.isfile(os.path.join(saved, "tokenizer.json"))
        made[f"{name}_json"] = (saved, pad)
        made[f"{name}_files"] = (_original_files_folder(src, str(tmp_path / f"{name}_files"), pad),
                                 pad)
    for name, (folder, pad) in made.items():
        ours = load_tokenizer(folder)
        assert ours.model_max_length == 77 and ours.pad_token_id == vocab[pad]
        assert (ours.bos_token_id, ours.eos_token_id) == (
            vocab["<|startoftext|>"], vocab["<|endoftext|>"])
        ids = ours(TEXTS)
        assert ids.dtype == np.int32 and ids.shape == (len(TEXTS), 77)
        assert (ids[:, 0] == ours.bos_token_id).all()
        assert ids[TEXTS.index("tokens " * 100), -1] == ours.eos_token_id  # truncated, EOS kept
        short = ours(TEXTS[:3], max_length=12)
        for cls in (transformers.CLIPTokenizer, transformers.CLIPTokenizerFast):
            ref = cls.from_pretrained(folder)
            expected = ref(TEXTS, padding="max_length", max_length=ref.model_max_length,
                           truncation=True, return_tensors="np")["input_ids"]
            np.testing.assert_array_equal(ids, expected, err_msg=f"{name} {cls.__name__}")
            expected = ref(TEXTS[:3], padding="max_length", max_length=12, truncation=True,
                           return_tensors="np")["input_ids"]
            np.testing.assert_array_equal(short, expected, err_msg=f"{name} max_length=12")
    # SD 2's pad "!" is a special token: a "!" in a prompt becomes the pad id, as in transformers
    sd2 = load_tokenizer(made["sd2_files"][0])
    for tokenizer, inside in ((sd2, True), (load_tokenizer(made["sd1_files"][0]), False)):
        row = list(tokenizer(["hello!world"])[0])
        assert (vocab["!"] in row[1:row.index(tokenizer.eos_token_id)]) == inside
    assert load_tokenizer(made["sd1_files"][0]).decode(
        load_tokenizer(made["sd1_files"][0])(["a photo of a cat"])[0]) == "a photo of a cat"
