import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from supir_mlx.config import SUPIRConfig
from supir_mlx.conformance import run
from supir_mlx.models.conditioner import Conditioner
from supir_mlx.models.tokenizer import CLIPTokenizer, TokenizerError, byte_alphabet, default_tokenizer
from supir_mlx.weights.loading import load_official, read_weights

SOT, EOT = 49406, 49407

# Word ids (between start and end token) that the official tokenizers give for strings that exercise
# their text cleaning: transformers 4.46.3 CLIPTokenizer (slow, with ftfy 6.3.1) and open_clip 2.17.1
# `tokenize`, both over the shipped merge list. Third item: open_clip's ids where they differ.
OFFICIAL_IDS = [
    ('  multiple   spaces\tand\ttabs  ', [6470, 9006, 537, 29163], None),
    ('line one\nline two\r\nline three\rfour', [1148, 637, 1148, 1237, 1148, 2097, 2721], None),
    ('Café crème brûlée, naïve Zürich, São Paulo, Ångström, ñandú', [15304, 1075, 12138, 614, 711, 127, 119, 75, 13489, 267, 1097, 35689, 563, 89, 6522, 4021, 267, 45911, 21628, 267, 23176, 10352, 807, 7255, 332, 267, 6445, 672, 36019], None),
    ('résumé vs résumé (combining)', [29106, 7054, 4166, 1547, 29106, 7054, 4166, 263, 23561, 264], None),
    ("It's a dog's life; they're here, we've gone, I'm done, you'll see, he'd go", [585, 568, 320, 1929, 568, 970, 282, 889, 982, 763, 267, 649, 1200, 3601, 267, 328, 880, 1700, 267, 592, 1342, 862, 267, 797, 1896, 861], None),
    ("IT'S LOUD! DON'T", [585, 568, 7464, 256, 847, 713], None),
    ('1234567890 3.14159 1,000,000 2024-11-27 32k 4K HDR 1080p', [272, 273, 274, 275, 276, 277, 278, 279, 280, 271, 274, 269, 272, 275, 272, 276, 280, 272, 267, 271, 271, 271, 267, 271, 271, 271, 273, 271, 273, 275, 268, 272, 272, 268, 273, 278, 274, 273, 330, 275, 330, 28065, 272, 271, 279, 271, 335], None),
    ('“Curly quotes” and ‘single’ — dashes – ellipsis…', [257, 20795, 5808, 257, 537, 568, 17005, 262, 2005, 925, 2502, 1224, 3367, 33041, 959], None),
    ('emoji 😀🎉👨\u200d👩\u200d👧\u200d👦 🇫🇷 ❤️ ✨', [16327, 12832, 4310, 25023, 26304, 48938, 4244, 964, 355, 16223, 1752, 3531], None),
    ('日本語のテキスト 中文 한국어', [39121, 44353, 34002, 252, 21575, 2429, 228, 47121, 32421, 486, 19759, 255, 29032, 485, 15197, 250, 31871, 255, 31625, 368], None),
    ('fish &amp; chips &lt;3 &gt; &quot;q&quot; &#39;apos&#39; &#x41; &nbsp;x &EACUTE; &amp;amp;', [2759, 261, 8855, 283, 274, 285, 257, 336, 257, 262, 4089, 338, 262, 320, 343, 4166, 261], None),
    ('a &amp; b\n<tag> &amp; c\nd &amp; e', [320, 261, 321, 283, 3640, 285, 261, 6259, 282, 322, 323, 261, 6259, 282, 324], [320, 261, 321, 283, 3640, 285, 261, 322, 323, 261, 324]),
    ('ﬁne ﬂour ﬀ ﬃ ﬄ ﬅ ﬆ Ĳssel ǆ', [3797, 18592, 1304, 1021, 328, 39490, 129, 123, 339, 545, 7337, 19373, 67, 129, 378], None),
    ('ＦＵＬＬ\u3000ｗｉｄｔｈ\u3000１２３！ ｶﾀｶﾅ', [1476, 23571, 272, 273, 274, 256, 37367, 34941, 37367, 2429, 488], None),
    ('ctrl\x00\x01\x07chars\x1b[31mred\x1b[0m \ufeffbom \u200bzero\u200cwidth', [35602, 75, 1054, 82, 736, 19469, 9844, 5848, 728, 490, 23571], None),
    ('c1 \x93quoted\x94 \x85 \x80 \x81', [322, 272, 257, 27706, 257, 959, 6309, 126, 479], None),
    ('<|endoftext|> inside', [49407, 2912], [27, 347, 40786, 4160, 91, 285, 2912]),
    ('<|ENDOFTEXT|>', [], [27, 347, 40786, 4160, 91, 285]),
    ('<start_of_text> and <end_of_text>', [283, 1572, 318, 539, 318, 4160, 285, 537, 283, 806, 318, 539, 318, 4160, 285], [49406, 537, 49407]),
    ('supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis', [1642, 2857, 13093, 2076, 5868, 26850, 835, 639, 38466, 3120, 4262, 7726, 12658, 1585, 44351, 28714, 749, 20253, 9800, 535, 532, 1065, 901, 1556, 13697, 9916, 78, 39031, 13903], None),
    ('İstanbul ß ẞ ǅ Σίσυφος ΣΑΣ', [328, 16384, 11231, 127, 509, 127, 509, 67, 129, 378, 139, 225, 138, 107, 139, 225, 139, 227, 139, 228, 138, 123, 139, 480, 139, 225, 138, 109, 139, 480], None),
    ('&notin; &not; this&not that', [17788, 487, 126, 361, 589, 261, 783, 682], [17788, 487, 126, 361, 589, 126, 361, 682]),
    ('&#0; &#xD800; &#1114112; &#65;&#66;', [39802, 39802, 39802, 3937], None),
    ('😀 astral 𐀀', [7334, 45889, 172, 238, 222, 478], None),
]


def hf_row(words):
    return [SOT, *words, EOT] + [EOT] * (75 - len(words))


def open_clip_row(words):
    return [SOT, *words, EOT] + [0] * (75 - len(words))


def test_text_conformance(reference_dir):
    results = list(run(reference_dir, ["text"]))
    assert len(results) == 7
    assert [r.name for r in results if r.status != "PASS"] == [], [r.line() for r in results]


def test_fixture_prompts_give_official_ids(reference_dir):
    tok = default_tokenizer()
    for case in json.loads((reference_dir / "text" / "tokens.json").read_text()).values():
        assert tok.tokenize(case["text"], "hf")[0].tolist() == case["clip_l_hf_ids"]
        assert tok.tokenize(case["text"], "open_clip")[0].tolist() == case["openclip_ids"]


@pytest.mark.parametrize("text, hf, open_clip", OFFICIAL_IDS, ids=range(len(OFFICIAL_IDS)))
def test_tricky_strings_give_official_ids(text, hf, open_clip):
    tok = default_tokenizer()
    assert tok.tokenize(text, "hf")[0].tolist() == hf_row(hf)
    assert tok.tokenize(text, "open_clip")[0].tolist() == open_clip_row(hf if open_clip is None else open_clip)


def test_truncation_keeps_end_token():
    tok = default_tokenizer()
    one = tok.encode("cat")
    assert len(one) == 1
    for n in (74, 75, 76, 300):
        ids = tok.tokenize(" ".join(["cat"] * n), "hf")[0].tolist()
        assert len(ids) == 77 and ids[0] == SOT and ids[-1] == EOT
        assert ids[1 : 1 + min(n, 75)] == one * min(n, 75)
        assert ids[1 + min(n, 75) :] == [EOT] * (76 - min(n, 75))
    long = tok.tokenize("cat " * 300, "open_clip")[0]
    assert long[-1] == EOT and (long[1:76] == one[0]).all()


def test_vocabulary_layout():
    tok = default_tokenizer()
    alphabet = list(byte_alphabet().values())
    assert len(set(alphabet)) == 256 and all(c.isprintable() and not c.isspace() for c in alphabet)
    assert len(tok.vocab) == 49408 and (tok.sot, tok.eot) == (SOT, EOT)
    assert tok.vocab["!"] == 0 and tok.vocab["!</w>"] == 256 and tok.vocab[alphabet[-1] + "</w>"] == 511


def test_hub_files_give_the_same_ids(tmp_path, reference_dir):
    tok = default_tokenizer()
    (tmp_path / "vocab.json").write_text(json.dumps(tok.vocab), encoding="utf-8")
    ranked = sorted(tok.ranks, key=tok.ranks.get)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in ranked) + "\n", encoding="utf-8")
    hub = CLIPTokenizer.from_hub_files(tmp_path)
    texts = [c["text"] for c in json.loads((reference_dir / "text" / "tokens.json").read_text()).values()]
    texts += [t for t, _, _ in OFFICIAL_IDS]
    for style in ("hf", "open_clip"):
        np.testing.assert_array_equal(hub.tokenize(texts, style), tok.tokenize(texts, style))


def test_bad_vocabulary_and_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(TokenizerError, match="vocab.json"):
        CLIPTokenizer.from_hub_files(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(TokenizerError, match="lacks token"):
        CLIPTokenizer.from_hub_files(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nab\n")
    with pytest.raises(TokenizerError, match="line 2"):
        CLIPTokenizer.from_hub_files(tmp_path)
    tok = default_tokenizer()
    with pytest.raises(TokenizerError, match="must be a string"):
        tok.tokenize([None])
    with pytest.raises(TokenizerError, match="unknown tokenizer style"):
        tok.encode("a", "t5")


@pytest.fixture(scope="module")
def tiny_conditioner(reference_dir):
    config = SUPIRConfig.from_reference(reference_dir / "tiny" / "config.json")
    cond = Conditioner(config)
    load_official(cond, read_weights(sorted((reference_dir / "tiny").glob("*.safetensors"))), prefix="conditioner.")
    return cond


def test_encoders_are_causal(tiny_conditioner):
    tok = default_tokenizer()
    a, b = "a red fox in the snow", "a red fox in the rain at night"
    shared = 1 + 5  # start token + "a red fox in the"
    clip_l, open_clip = tiny_conditioner.embedders
    ids_l = mx.array(tok.tokenize([a, b], "hf"))
    ids_g = mx.array(tok.tokenize([a, b], "open_clip"))
    for states in (clip_l.transformer(ids_l)[-1], open_clip(ids_g)[0]):
        assert mx.array_equal(states[0, :shared], states[1, :shared])
        assert not mx.allclose(states[0, shared], states[1, shared])


def test_batch_rows_are_independent_and_prepare_condition(tiny_conditioner, reference_dir):
    config = SUPIRConfig.from_reference(reference_dir / "tiny" / "config.json")
    captions = ["a red fox. ", "an old fisherman, "]
    (c_x, c_y), (uc_x, uc_y) = tiny_conditioner.prepare_condition(captions, config.positive_prompt, "ugly")
    for i, caption in enumerate(captions):
        x, y = tiny_conditioner([caption + config.positive_prompt])
        assert mx.allclose(c_x[i], x[0], atol=1e-5) and mx.allclose(c_y[i], y[0], atol=1e-5)
    x, y = tiny_conditioner(["ugly"])
    assert mx.allclose(uc_x, mx.repeat(x, 2, axis=0), atol=1e-5) and mx.allclose(uc_y, mx.repeat(y, 2, axis=0), atol=1e-5)
    assert c_x.shape == (2, 77, config.context_dim) and c_y.shape == (2, config.vector_dim)
    with pytest.raises(ValueError, match="non-empty list"):
        tiny_conditioner.prepare_condition([], "", "")
    with pytest.raises(ValueError, match="non-empty list"):
        tiny_conditioner("one string, not a list")


def test_full_size_layout_matches_sdxl_manifest(reference_dir):
    # Parameters are lazy, so the 818M-parameter encoders are described without being allocated.
    ours = {k: tuple(v.shape) for k, v in tree_flatten(Conditioner(SUPIRConfig.sdxl_v0()).parameters())}
    manifest = json.loads((reference_dir / "manifests" / "sdxl_base_sgm.json").read_text())["tensors"]
    official = {
        k.removeprefix("conditioner."): tuple(v)
        for k, v in manifest.items()
        if k.startswith("conditioner.") and not k.endswith(".position_ids")
    }
    assert ours == official
