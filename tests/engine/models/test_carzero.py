"""CARZero through radflash's own paths: cleaning, word aggregation, cached prompt side, letterbox,
the API and the verbs. Parity with the reference at the published sizes is in test_carzero_parity.
"""

from __future__ import annotations

import random
import string

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import radflash
from radflash.checkpoints.factory import random_checkpoint
from radflash.checkpoints.format import save_checkpoint
from radflash.cli import cli as main
from radflash.errors import InputError
from radflash.preprocess import Preprocessing, preprocess
from radflash.tokenizer import clean_carzero
from tests.engine.carzero_reference import reference_aggregate, reference_clean
from tests.tolerances import tolerance

PROMPTS = ["There is cardiomegaly", "Cardiomegaly", "There is a small left pleural effusion",
           "Bilateral lower lobe consolidation and edema"]


@pytest.fixture(scope="module")
def cz_path(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("cz") / "carzero-tiny"
    save_checkpoint(random_checkpoint("carzero-tiny", seed=5, model_id="cz-test"), path)
    return path


@pytest.fixture(scope="module")
def cz(cz_path):
    return radflash.load(cz_path, device="cpu")


# ---- prompt cleaning ------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "Cardiomegaly",  # one word: dropped whole
    "There is Cardiomegaly",
    "1. Small effusion. 2. No pneumothorax.\nHeart size normal",
    "Nodule measuring 3.5 cm. 12.3 mm opacity",  # digits with dots split pieces
    "Pneumonía en el lóbulo derecho",  # non-ASCII letters dropped from words
    "é ü ñ",  # words that vanish entirely
    "Effusion.",
    "",
    "a.b.c.d",
    "left_lower lobe\ufffd\ufffdopacity",
])
def test_cleaning_matches_the_reference_on_edge_cases(text: str) -> None:
    assert clean_carzero(text) == reference_clean(text)


def test_cleaning_matches_the_reference_on_random_text() -> None:
    alphabet = string.ascii_letters + string.digits + "..  \n,;-_éüñ日\ufffd"
    rng = random.Random(torch.initial_seed())
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert clean_carzero(text) == reference_clean(text), repr(text)


# ---- text side ------------------------------------------------------------------------------------
def test_word_aggregation_matches_the_reference_loop(cz) -> None:
    long = " ".join(["xylophone quixotic zebras"] * 10)  # unknown words: many ## pieces; cut at 97 mid-word
    prompts = [*PROMPTS, long]
    ids, mask = cz.tokenizer(prompts)
    assert ids.shape[1] == 97 and mask[-1].all()
    text = cz.module.text
    with torch.no_grad():
        summed = torch.stack(text.hidden_states(ids, mask)[-4:])  # (4, T, L, D)
        got = text.word_features(ids, mask)
    padded_ids = torch.nn.functional.pad(ids, (0, 97 - ids.shape[1]))
    padded = torch.nn.functional.pad(summed.permute(1, 0, 2, 3), (0, 0, 0, 97 - ids.shape[1]))
    idx = {i: t for t, i in cz.tokenizer.vocab.items()}
    want = reference_aggregate(padded, padded_ids, idx).sum(1)
    assert got.shape == (len(prompts), 97, summed.shape[-1])
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * want.abs().max())
    words = [len(clean_carzero(p).split()) for p in prompts[:-1]]
    for row, n in enumerate(words):  # [CLS] + words + [SEP], then zero rows
        assert got[row, 2 + n:].abs().max() == 0 and got[row, 1 + n].abs().max() > 0


def test_cached_prompt_side_gives_the_per_pair_scores(cz) -> None:
    tokens = cz.encode_images([np.random.rand(70, 50).astype(np.float32) for _ in range(3)])
    batched = cz.score(tokens=tokens, prompts=PROMPTS)
    module = cz.module
    ids, mask = cz.tokenizer(PROMPTS)
    with torch.no_grad():
        memory = module.prompt_memory(ids, mask)
        for i in range(tokens.shape[0]):
            for j in range(len(PROMPTS)):  # one decoder pass per pair and direction, nothing cached
                s1 = module.fusion.decode(memory[j, :1][None], module.fusion.memory_kv(tokens[i:i + 1]))
                s2 = module.fusion.decode(tokens[i:i + 1, :1], module.fusion.memory_kv(memory[j:j + 1]))
                want = float((s1 + s2) / 2)
                assert batched.logits[i, j].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert torch.equal(batched.probs, torch.sigmoid(batched.logits))
    # prompts scored separately (cache hits and misses mixed) give the same columns
    again = cz.score(tokens=tokens, prompts=[*PROMPTS[2:], "There is a new prompt here"])
    assert torch.allclose(again.logits[:, :2], batched.logits[:, 2:], rtol=1e-6, atol=1e-6)


# ---- letterbox preprocessing ----------------------------------------------------------------------
def area_reference(img: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Box-filter resize in float64 by explicit integration over each output cell (shrinking only)."""
    h, w = img.shape
    out = np.zeros((new_h, new_w))
    sy, sx = h / new_h, w / new_w
    for i in range(new_h):
        for j in range(new_w):
            total = 0.0
            for y in range(int(np.floor(i * sy)), min(h, int(np.ceil((i + 1) * sy)))):
                wy = min(y + 1, (i + 1) * sy) - max(y, i * sy)
                for x in range(int(np.floor(j * sx)), min(w, int(np.ceil((j + 1) * sx)))):
                    wx = min(x + 1, (j + 1) * sx) - max(x, j * sx)
                    total += img[y, x] * wy * wx
            out[i, j] = total / (sy * sx)
    return out


def letterbox_reference(img: np.ndarray, side: int, crop: int) -> np.ndarray:
    """The reference's ``_resize_img`` (sizes, pad split) then torchvision's CenterCrop."""
    size = img.shape
    max_dim = max(size)
    max_ind = size.index(max_dim)
    if max_ind == 0:
        desired = (side, int(float(size[1]) * (side / float(size[0]))))
    else:
        desired = (int(float(size[0]) * (side / float(size[1]))), side)
    resized = area_reference(img, *desired)
    if max_ind == 0:
        pad = side - resized.shape[1]
        pads = [(0, 0), (int(np.floor(pad / 2)), int(np.ceil(pad / 2)))]
    else:
        pad = side - resized.shape[0]
        pads = [(int(np.floor(pad / 2)), int(np.ceil(pad / 2))), (0, 0)]
    padded = np.pad(resized, pads, "constant", constant_values=0)
    top = round((side - crop) / 2.0)
    return padded[top:top + crop, top:top + crop]


@pytest.mark.parametrize("shape", [(90, 61), (61, 90), (144, 144), (100, 37), (73, 73)])
def test_letterbox_matches_the_reference_geometry(shape: tuple[int, int]) -> None:
    img = np.random.rand(*shape)
    spec = Preprocessing(64, (0.0,) * 3, (1.0,) * 3, letterbox=72)
    got = preprocess(torch.from_numpy(img.astype(np.float32)), spec)[0, 0].double().numpy()
    want = letterbox_reference(img, 72, 64)
    assert got.shape == want.shape == (64, 64)
    assert np.abs(got - want).max() <= 1e-5  # float32 products over ≤ 2 input pixels per axis


def test_letterbox_keeps_sixteen_bit_precision() -> None:
    img = (np.random.randint(0, 65536, size=(96, 80)) / 65535.0).astype(np.float32)
    spec = Preprocessing(64, (0.0,) * 3, (1.0,) * 3, letterbox=72)
    got = preprocess(torch.from_numpy(img), spec)[0, 0].numpy()
    assert len(np.unique(got)) > 2000  # an 8-bit round trip would leave at most 256 levels


# ---- API and verbs --------------------------------------------------------------------------------
def test_carzero_has_no_maps_and_says_so_in_one_line(cz) -> None:
    assert cz.supports_maps is False and cz.family == "carzero"
    with pytest.raises(InputError) as err:
        cz.similarity_maps([np.random.rand(64, 64).astype(np.float32)], PROMPTS[:1])
    assert "carzero" in str(err.value) and "\n" not in str(err.value)


def test_segment_refuses_a_carzero_model(cz_path, tmp_path) -> None:
    img = tmp_path / "in" / "a.png"
    img.parent.mkdir()
    from PIL import Image

    Image.fromarray((np.random.rand(64, 64) * 255).astype(np.uint8)).save(img)
    result = CliRunner().invoke(main, ["segment", str(img.parent), "-o", str(tmp_path / "out"),
                                       "--model", str(cz_path), "--prompt", "There is an effusion"])
    assert result.exit_code != 0
    assert "has no similarity maps" in result.output


def test_score_verb_runs_carzero_like_the_api(cz_path, cz, tmp_path) -> None:
    import pyarrow.parquet as pq
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    images = {}
    for i, shape in enumerate([(80, 64), (64, 96), (70, 70)]):
        arr = (np.random.rand(*shape) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
        images[f"img{i}.png"] = arr
    out = tmp_path / "out"
    findings = tmp_path / "findings.txt"
    findings.write_text("effusion: There is a pleural effusion\nedema: There is pulmonary edema\n")
    result = CliRunner().invoke(main, ["score", str(folder), "-o", str(out), "--model", str(cz_path),
                                       "--device", "cpu", "--findings", str(findings)])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert len(table) == 3
    want = cz.score([a.astype(np.float32) / 255 for a in images.values()],
                    ["There is a pleural effusion", "There is pulmonary edema"])
    for row in table:
        i = list(images).index(row["path"].rsplit("/", 1)[-1])
        got = [row["effusion.prob"], row["edema.prob"]]
        assert got == pytest.approx(want.probs[i].tolist(), abs=1e-5), row


def test_models_lists_the_family() -> None:
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0 and "carzero" in result.output


def test_onnx_runtime_backend_encodes_carzero_like_eager(cz_path, cz) -> None:
    pytest.importorskip("onnxruntime")
    images = [np.random.rand(80, 64).astype(np.float32) for _ in range(3)]
    want = cz.score(images, PROMPTS)
    got = radflash.load(cz_path, device="cpu", backend="onnxruntime").score(images, PROMPTS)
    assert torch.allclose(got.logits, want.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.interpreter
def test_fused_cross_attention_kernel_gives_the_torch_scores(cz) -> None:
    """The head with the Triton kernel forced (interpreted on CPU) equals the plain-torch path."""
    from radflash.kernels import set_kernel_backend

    tokens = cz.encode_images([np.random.rand(70, 50).astype(np.float32) for _ in range(2)])
    text = cz.encode_text(PROMPTS)
    with set_kernel_backend("torch"):
        want, _ = cz.module.head(tokens, text)
    with set_kernel_backend("triton"):
        got, _ = cz.module.head(tokens, text)
    # float32 chains of width-D reductions on intermediates of the size of the normalised tokens
    tol = tolerance(torch.float32, terms=cz.config.vision.hidden, magnitude=float(tokens.abs().max()))
    tol.assert_close(got, want)
