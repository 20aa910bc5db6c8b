"""``radflash convert carzero``: a released-layout Lightning .ckpt in, identical scores out.

The release is emulated from a random native checkpoint: :func:`to_released` is the inverse of
the converter's mapping (qkv split back into query/key/value, the unused tensors added back,
the ``CARZero.`` prefix) and the result is wrapped like a Lightning 1.1 checkpoint with fake
omegaconf / Lightning objects (see ``test_safe_pickle``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import radflash
from radflash.checkpoints.converters.carzero import convert_carzero, infer_config, released_to_native
from radflash.checkpoints.factory import random_checkpoint, wordpiece_tokenizer
from radflash.checkpoints.format import Checkpoint, build_on_meta, load_checkpoint, save_checkpoint
from radflash.cli import cli
from radflash.errors import CheckpointError
from radflash.models.config import preset
from tests.engine.checkpoints.test_safe_pickle import lightning_globals, lightning_like

PROMPTS = ["There is pleural effusion", "There is pneumothorax of the right lung",
           "There is mild cardiomegaly with a widened mediastinum", "Cardiomegaly"]
_BERT_LAYER = {"out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
               "fc1": "intermediate.dense", "fc2": "output.dense", "mlp_norm": "output.LayerNorm"}
_BERT_EMBED = {"word_embed": "word_embeddings", "pos_embed": "position_embeddings",
               "type_embed": "token_type_embeddings", "embed_norm": "LayerNorm"}


def to_released(native: dict[str, torch.Tensor], *, prefix: str = "CARZero.", seed: int = 0) -> dict[str, torch.Tensor]:
    """radflash names → the released CARZero names, with the tensors the release also carries."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    vis, txt, fus = "img_encoder.model.", "text_encoder.model.", "fusion_module."
    for name, value in native.items():
        if name == "text.continues_word":
            continue
        if m := re.fullmatch(r"vision\.patch_embed\.(weight|bias)", name):
            out[f"{vis}patch_embed.proj.{m.group(1)}"] = value
        elif name.startswith("vision."):
            out[vis + name[len("vision."):]] = value
        elif m := re.fullmatch(r"text\.(\w+)\.(weight|bias)", name):
            out[f"{txt}embeddings.{_BERT_EMBED[m.group(1)]}.{m.group(2)}"] = value
        elif m := re.fullmatch(r"text\.layers\.(\d+)\.qkv\.(weight|bias)", name):
            for part, piece in zip(("query", "key", "value"), value.chunk(3)):
                out[f"{txt}encoder.layer.{m.group(1)}.attention.self.{part}.{m.group(2)}"] = piece.clone()
        elif m := re.fullmatch(r"text\.layers\.(\d+)\.(\w+)\.(weight|bias)", name):
            out[f"{txt}encoder.layer.{m.group(1)}.{_BERT_LAYER[m.group(2)]}.{m.group(3)}"] = value
        elif m := re.fullmatch(r"fusion\.layers\.(\d+)\.cross_attn\.(.+)", name):
            out[f"{fus}decoder.layers.{m.group(1)}.multihead_attn.{m.group(2)}"] = value
        elif m := re.fullmatch(r"fusion\.layers\.(\d+)\.(.+)", name):
            layer = f"{fus}decoder.layers.{m.group(1)}."
            out[layer + m.group(2)] = value
            if m.group(2) == "norm2.weight":  # the unused self-attention block and its norm
                dim = value.shape[0]
                out[layer + "self_attn.in_proj_weight"] = torch.randn(3 * dim, dim, generator=gen)
                out[layer + "self_attn.in_proj_bias"] = torch.randn(3 * dim, generator=gen)
                out[layer + "self_attn.out_proj.weight"] = torch.randn(dim, dim, generator=gen)
                out[layer + "self_attn.out_proj.bias"] = torch.randn(dim, generator=gen)
                out[layer + "norm1.weight"] = torch.randn(dim, generator=gen)
                out[layer + "norm1.bias"] = torch.randn(dim, generator=gen)
        elif m := re.fullmatch(r"fusion\.decoder_norm\.(weight|bias)", name):
            out[f"{fus}decoder_norm.{m.group(1)}"] = value
            out[f"{fus}decoder.norm.{m.group(1)}"] = value  # the same module in the reference
        elif m := re.fullmatch(r"fusion\.mlp\.(\d+)\.(weight|bias)", name):
            out[f"{fus}mlp_head.{3 * int(m.group(1))}.{m.group(2)}"] = value  # Linear, ReLU, Dropout, ...
        else:
            raise AssertionError(f"test mapping does not know {name}")
    hidden = native["text.word_embed.weight"].shape[1]
    out[f"{txt}pooler.dense.weight"] = torch.randn(hidden, hidden, generator=gen)
    out[f"{txt}pooler.dense.bias"] = torch.randn(hidden, generator=gen)
    out[f"{txt}embeddings.position_ids"] = torch.arange(native["text.pos_embed.weight"].shape[0])[None]
    out[f"{fus}logit_scale"] = torch.tensor(2.6592)
    return {prefix + k: v for k, v in out.items()}


def write_release(tmp_path: Path, state: dict[str, Any], name: str = "CARZero_best.ckpt", **save_kw: Any) -> Path:
    """A Lightning-1.1-like .ckpt around ``state`` (fake omegaconf / Lightning objects included)."""
    path = tmp_path / name
    with lightning_globals():
        torch.save(lightning_like(state), path, **save_kw)
    return path


def write_tokenizer(folder: Path, ckpt: Checkpoint, *, vocab_txt: bool = True, tokenizer_json: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ckpt.tokenizer.vocab
    if vocab_txt:
        tokens = sorted(vocab, key=vocab.__getitem__)
        assert [vocab[t] for t in tokens] == list(range(len(tokens)))
        (folder / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
        (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]", "unk_token": "[UNK]"}))
    if tokenizer_json:
        (folder / "tokenizer.json").write_text(ckpt.tokenizer.to_str())
    return folder


@pytest.fixture
def native() -> Checkpoint:
    return random_checkpoint("carzero-tiny", seed=torch.initial_seed())  # the test's seed (tests/conftest.py)


def _error(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


def _convert(tmp_path: Path, src: Path, tokenizer: Path, **kw: Any) -> Path:
    return convert_carzero(src, tmp_path / "out", tokenizer=tokenizer, base="carzero-tiny", **kw)


@pytest.mark.parametrize("tokenizer_file", ["vocab.txt", "tokenizer.json"])
@pytest.mark.parametrize("prefix", ["CARZero.", ""], ids=["prefixed", "bare"])
def test_converted_checkpoint_scores_like_the_native_one(tmp_path: Path, native: Checkpoint, tokenizer_file: str,
                                                         prefix: str) -> None:
    src = write_release(tmp_path, to_released(native.state_dict, prefix=prefix))
    tok = write_tokenizer(tmp_path / "tok", native, vocab_txt=tokenizer_file == "vocab.txt",
                          tokenizer_json=tokenizer_file == "tokenizer.json")
    out = _convert(tmp_path, src, tok)
    converted = radflash.load(out, device="cpu")
    reference = radflash.RadFlashModel(native, device="cpu")
    assert converted.config == native.config == preset("carzero-tiny")
    assert converted.model_id == "carzero:CARZero_best"
    assert json.loads((out / "config.json").read_text())["source"] == str(src)

    # the rebuilt tokenizer gives the same ids, and the continuation table matches bind_vocabulary's
    ids_a, mask_a = native.tokenizer(PROMPTS)
    ids_b, mask_b = converted.tokenizer(PROMPTS)
    assert torch.equal(ids_a, ids_b) and torch.equal(mask_a, mask_b)
    saved = load_checkpoint(out).state_dict
    assert torch.equal(saved["text.continues_word"], native.state_dict["text.continues_word"])
    assert saved["text.continues_word"].any()
    for key, value in native.state_dict.items():
        assert torch.equal(saved[key], value), key

    images = np.random.rand(2, 64, 80).astype(np.float32)
    expected = reference.score(images, PROMPTS).logits
    got = converted.score(images, PROMPTS).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert expected.std() > 0  # the scores are not a constant that would hide a wrong mapping


def test_cli_converts_and_the_result_loads(tmp_path: Path, native: Checkpoint) -> None:
    released = to_released(native.state_dict)
    key = "CARZero.fusion_module.decoder_norm.weight"
    shadowed = released[key].clone()
    shadowed.clone = shadowed.detach = None  # a crafted file may attach attributes to tensors
    released[key] = released[key.replace("decoder_norm", "decoder.norm")] = shadowed
    src = write_release(tmp_path, released, _use_new_zipfile_serialization=False)
    tok = write_tokenizer(tmp_path / "tok", native)
    dst = tmp_path / "carzero.safetensors"
    result = CliRunner().invoke(cli, ["convert", "carzero", str(src), str(dst), "--tokenizer", str(tok),
                                      "--model-id", "carzero-test", "--preset", "carzero-tiny"])
    assert result.exit_code == 0, result.output
    assert f"wrote {dst}" in result.output
    model = radflash.load(dst, device="cpu")
    assert model.model_id == "carzero-test" and model.config.architecture == "carzero"
    images = np.random.rand(1, 70, 64).astype(np.float32)
    torch.testing.assert_close(model.score(images, PROMPTS).logits,
                               radflash.RadFlashModel(native, device="cpu").score(images, PROMPTS).logits,
                               rtol=0, atol=1e-6)


def test_cli_needs_the_tokenizer_and_reports_errors_in_one_line(tmp_path: Path, native: Checkpoint) -> None:
    src = write_release(tmp_path, to_released(native.state_dict))
    result = CliRunner().invoke(cli, ["convert", "carzero", str(src), str(tmp_path / "out")])
    assert result.exit_code != 0 and "--tokenizer" in result.output
    # the default preset is the published size: a 48-wide tiny model cannot borrow its head counts
    result = CliRunner().invoke(cli, ["convert", "carzero", str(src), str(tmp_path / "out"),
                                      "--tokenizer", str(write_tokenizer(tmp_path / "tok", native))])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "head count" in lines[0], result.output
    result = CliRunner().invoke(cli, ["convert", "carzero", str(src), str(tmp_path / "out"),
                                      "--tokenizer", str(tmp_path / "nowhere"), "--preset", "carzero-tiny"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "tokenizer folder not found" in result.output


def test_published_sizes_are_inferred_from_shapes() -> None:
    """The full-size mapping and config inference, on the meta device (no memory, no time)."""
    cfg = preset("carzero")
    native = dict(build_on_meta(cfg).state_dict())
    released = to_released(native)
    assert "CARZero.img_encoder.model.blocks.11.attn.qkv.weight" in released
    assert "CARZero.text_encoder.model.encoder.layer.11.attention.self.value.bias" in released
    assert "CARZero.fusion_module.mlp_head.9.weight" in released
    state = released_to_native(released)
    assert set(state) == set(native) - {"text.continues_word"}
    assert all(state[k].shape == native[k].shape for k in state)
    assert infer_config(state, preset("carzero")) == cfg
    bigger = dataclasses.replace(cfg.vision, hidden=1024, heads=16, mlp=4096)
    large = dict(build_on_meta(dataclasses.replace(cfg, vision=bigger, text=dataclasses.replace(
        cfg.text, hidden=1024, heads=16, mlp=4096))).state_dict())
    large.pop("text.continues_word")
    inferred = infer_config(large, cfg)  # another width: BERT/ViT's 64-wide heads
    assert inferred.vision.heads == 16 and inferred.text.heads == 16 and inferred.fusion.heads == 4


# ---- bad inputs: each one line ----------------------------------------------------------------
def test_radflash_and_radzero_checkpoints_are_not_carzero(tmp_path: Path, native: Checkpoint) -> None:
    tok = write_tokenizer(tmp_path / "tok", native)
    radzero = random_checkpoint("tiny")
    folder = save_checkpoint(radzero, tmp_path / "radzero")
    msg = _error(_convert, tmp_path, folder, tok)
    assert "already a radflash checkpoint" in msg and "radzero" in msg and "not the released CARZero" in msg
    single = save_checkpoint(native, tmp_path / "carzero.safetensors")
    assert "already a radflash checkpoint" in _error(_convert, tmp_path, single, tok)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["CxrAlignModel"], "model_type": "cxr_align"}))
    assert "radflash convert radzero" in _error(_convert, tmp_path, hf, tok)

    radzero_like = {"vision_model.embeddings.cls_token": torch.zeros(1, 1, 8),
                    "text_model.embeddings.word_embeddings.weight": torch.zeros(4, 8)}
    msg = _error(_convert, tmp_path, write_release(tmp_path, radzero_like, "radzero.ckpt"), tok)
    assert "not a CARZero checkpoint" in msg and "radflash convert radzero" in msg
    msg = _error(_convert, tmp_path, write_release(tmp_path, dict(native.state_dict), "native.ckpt"), tok)
    assert "not a CARZero checkpoint" in msg and "already converted" in msg


def test_tokenizer_folder_problems(tmp_path: Path, native: Checkpoint) -> None:
    src = write_release(tmp_path, to_released(native.state_dict))
    assert "tokenizer folder not found" in _error(_convert, tmp_path, src, tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("nothing here")
    msg = _error(_convert, tmp_path, src, empty)
    assert "no vocab.txt or tokenizer.json" in msg and "README.md" in msg
    mpnet = tmp_path / "mpnet"
    mpnet.mkdir()
    (mpnet / "tokenizer.json").write_text(wordpiece_tokenizer(style="mpnet").to_str())
    assert "padding token '[PAD]' is missing" in _error(_convert, tmp_path, src, mpnet)
    big = tmp_path / "big"
    write_tokenizer(big, native)
    with open(big / "vocab.txt", "a", encoding="utf-8") as fh:
        fh.write("".join(f"extra{i}\n" for i in range(10)))
    assert "word embedding has 2048 rows" in _error(_convert, tmp_path, src, big)
    assert not (tmp_path / "out").exists()


def test_truncated_and_incomplete_checkpoints(tmp_path: Path, native: Checkpoint) -> None:
    tok = write_tokenizer(tmp_path / "tok", native)
    released = to_released(native.state_dict)
    src = write_release(tmp_path, released)
    data = src.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    msg = _error(_convert, tmp_path, cut, tok)
    assert str(cut) in msg and "truncated or corrupt" in msg

    no_state = tmp_path / "no_state.ckpt"
    torch.save({"epoch": 3, "global_step": 10, "weights": released}, no_state)
    msg = _error(_convert, tmp_path, no_state, tok)
    assert "no 'state_dict'" in msg and "epoch, global_step, weights" in msg

    extra = dict(released, **{"CARZero.fusion_module.temperature": torch.ones(1)})
    msg = _error(_convert, tmp_path, write_release(tmp_path, extra, "extra.ckpt"), tok)
    assert "1 tensor(s) radflash does not know" in msg and "fusion_module.temperature" in msg

    missing = {k: v for k, v in released.items() if "layer.1.attention.self.key.bias" not in k}
    msg = _error(_convert, tmp_path, write_release(tmp_path, missing, "missing.ckpt"), tok)
    assert "missing tensor CARZero.text_encoder.model.encoder.layer.1.attention.self.key.bias" in msg

    no_block = {k: v for k, v in released.items() if ".blocks.1.norm1." not in k}
    msg = _error(_convert, tmp_path, write_release(tmp_path, no_block, "no_block.ckpt"), tok)
    assert "missing" in msg and "vision.blocks.1.norm1.weight" in msg

    not_tensor = dict(released, **{"CARZero.fusion_module.decoder_norm.bias": [0.0] * 48})
    assert "entry CARZero.fusion_module.decoder_norm.bias is a list, not a tensor" in _error(
        _convert, tmp_path, write_release(tmp_path, not_tensor, "list.ckpt"), tok)
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_refused_global_in_one_line(tmp_path: Path, native: Checkpoint) -> None:
    import os

    from tests.engine.checkpoints.test_safe_pickle import Reduce

    target = tmp_path / "pwned"
    released = dict(to_released(native.state_dict), **{"CARZero.x": Reduce(os.system, f"touch {target}")})
    src = write_release(tmp_path, released)
    result = CliRunner().invoke(cli, ["convert", "carzero", str(src), str(tmp_path / "out"),
                                      "--tokenizer", str(write_tokenizer(tmp_path / "tok", native)),
                                      "--preset", "carzero-tiny"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert f"Error: {src}: refusing to unpickle global '{os.system.__module__}.system'" in result.output
    assert not target.exists() and not (tmp_path / "out").exists()
