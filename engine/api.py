"""Public Python API: ``radflash.load(...)`` returns a :class:`RadFlashModel`.

The wrapper owns everything around the tensor maths: tokenising and caching prompt embeddings
(prompts are fixed per run), preprocessing, device/dtype placement and the choice of image
encoder backend. The model module itself stays a plain ``nn.Module`` of the family the
checkpoint's config names (:mod:`radflash.models.registry`); the wrapper talks to it only through
:class:`radflash.models.base.ModelFamily`, so a new family needs no change here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from radflash.checkpoints.format import Checkpoint, check_state_dict, load_checkpoint
from radflash.devices import resolve_device, resolve_dtype, resolve_precision
from radflash.errors import InputError
from radflash.kernels import MapResult, upsample_maps
from radflash.models.registry import build
from radflash.preprocess import ImageLike, Preprocessing, as_image_list, preprocess
from radflash.tokenizer import check_prompts

log = logging.getLogger("radflash")

DEMO_MODEL = Path(__file__).parent / "assets" / "demo"


@dataclass(frozen=True)
class Scores:
    """Zero-shot scores: ``logits`` = ℓ/τ (AUROC is computed on these) and ``probs`` = sigmoid."""

    prompts: tuple[str, ...]
    logits: torch.Tensor  # (B, T) float32
    probs: torch.Tensor  # (B, T) float32


class RadFlashModel:
    def __init__(self, ckpt: Checkpoint, *, device: str | torch.device = "auto", dtype=None,
                 backend: str = "eager", checkpoint_path: str | Path | None = None) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)  # the module's storage dtype (float32 on the CPU)
        # the image encoder's precision (fp32/bf16/fp16/int8; "auto" until a measurement decides it)
        self.precision = resolve_precision(dtype, self.device)
        self.config = ckpt.config
        self.model_id = ckpt.model_id
        self.sha256 = ckpt.sha256
        self.default_prompts = dict(ckpt.prompts)
        self.calibration = dict(ckpt.calibration)
        self.notice = ckpt.notice
        self.tokenizer = ckpt.tokenizer
        self.preprocessing = Preprocessing(self.config.image_size, self.config.mean, self.config.std,
                                          self.config.letterbox)
        self.family: str = self.config.architecture  # registry name, e.g. "radzero"
        module = build(self.config)
        check_state_dict(module, ckpt.state_dict, ckpt.source or self.model_id)
        module.load_state_dict(ckpt.state_dict)
        self.module = module.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._stacked: tuple[tuple[str, ...], torch.Tensor] | None = None  # the last prompt list, stacked
        self.backend_name = backend
        # where artefacts made for this checkpoint (an INT8 encoder) are kept; None: built in memory
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self._encoder = self._make_encoder(backend)

    def _make_encoder(self, backend: str, **opts: Any):
        from radflash.backends import make_backend

        encoder = make_backend(backend, self, **opts)
        self.precision = getattr(encoder, "precision", self.precision)  # what auto chose, or what was built
        return encoder

    def set_backend(self, backend: str, *, dtype: str | torch.dtype | None = None, **opts: Any) -> None:
        """Switch the image-encoder backend (and, with ``dtype=``, its precision; ``auto``: measured).

        ``opts`` go to the backend (``batch_size=`` for ``auto``'s timing). The module's storage dtype
        does not change: on the CPU it stays float32 and only the encoder runs in the new precision.
        """
        if dtype is not None:
            opts["precision"] = resolve_precision(dtype, self.device)
        self._encoder = self._make_encoder(backend, **opts)
        self.backend_name = getattr(self._encoder, "name", backend)

    @property
    def encoder(self) -> Any:
        """The image-tower backend in use (eager, compile, onnxruntime, openvino, ...; ``auto``'s choice)."""
        return self._encoder

    @property
    def backend_selection(self) -> dict[str, Any] | None:
        """How ``auto`` picked the encoder backend (timings, reason, cache hit); ``None`` if it was named."""
        return getattr(self._encoder, "selection", None)

    # ---- text -------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Per-prompt features (T, ...) of the family (RadZero: (T, D) after the shared LayerNorm).

        Each prompt is encoded once per model. A run asks for the same prompt list with every
        batch, so the stacked tensor of the last list is kept too: CARZero's prompt features
        (every decoder layer's keys and values) are large enough that re-stacking them per batch
        would cost a copy of hundreds of MB at ~190 prompts.
        """
        check_prompts(prompts)
        key = tuple(prompts)
        if self._stacked is not None and self._stacked[0] == key:
            return self._stacked[1]
        todo = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        feats = None
        if todo:
            ids, mask = self.tokenizer(todo)
            feats = self.module.text_features(ids.to(self.device), mask.to(self.device))
            self._text_cache.update(zip(todo, feats.unbind(0)))
        stacked = feats if feats is not None and todo == list(key) else (
            torch.stack([self._text_cache[p] for p in prompts]))
        self._stacked = (key, stacked)
        return stacked

    # ---- images -----------------------------------------------------------------------------
    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        return preprocess(images, self.preprocessing, device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def encode_images(self, images: ImageLike | Sequence[ImageLike] | None = None, *,
                      pixels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 + N, D) image tokens (before the shared LayerNorm) from images or preprocessed pixels."""
        if pixels is None:
            if images is None:
                raise InputError("encode_images needs images or pixels")
            pixels = self.preprocess(images)
        return self._encoder.encode(pixels)

    # ---- head -------------------------------------------------------------------------------
    @property
    def supports_maps(self) -> bool:
        """Whether this model's family gives similarity maps (segmentation, grounding) besides scores."""
        return bool(self.module.supports_maps)

    def require_maps(self) -> None:
        """Raise one clear :class:`InputError` if the family has no maps.

        Verbs that need maps call this before any image is read, so a run fails once, up front,
        instead of recording the same error for every image.
        """
        if not self.supports_maps:
            raise InputError(f"model family {self.family!r} has no similarity maps; use score")

    @torch.inference_mode()
    def head(self, tokens: torch.Tensor, prompts: Sequence[str], *,
             return_maps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The family's head on image tokens and (cached) prompt features: logits (B, T), maps if asked."""
        if return_maps:
            self.require_maps()
        return self.module.head(tokens, self.encode_text(prompts), return_maps=return_maps)

    @torch.inference_mode()
    def score(self, images: ImageLike | Sequence[ImageLike] | None = None, prompts: Sequence[str] | None = None,
              *, tokens: torch.Tensor | None = None) -> Scores:
        """Zero-shot logits and probabilities (B, T) for each image and prompt."""
        prompts = self._prompts(prompts)
        if tokens is None:
            tokens = self.encode_images(images)
        logits, _ = self.head(tokens, prompts)
        logits = logits.float()
        return Scores(tuple(prompts), logits, torch.sigmoid(logits))

    @torch.inference_mode()
    def similarity_maps(
        self,
        images: ImageLike | Sequence[ImageLike] | None = None,
        prompts: Sequence[str] | None = None,
        *,
        size: tuple[int, int] | None = None,
        output: str = "prob",
        threshold: float | Sequence[float] | torch.Tensor = 0.5,
        tokens: torch.Tensor | None = None,
    ) -> MapResult:
        """Per-prompt pixel maps sigmoid(upsampled s) at ``size`` (default: the images' own size).

        Also returns the arg-max pixel and peak probability (grounding); ``output="mask"`` gives
        thresholded uint8 masks without materialising float maps, ``"both"`` maps and masks in one pass.
        Raises :class:`InputError` if the model's family has no maps (:attr:`supports_maps`).
        """
        self.require_maps()  # before any image is encoded
        prompts = self._prompts(prompts)
        if size is None:
            if images is None:
                raise InputError("similarity_maps needs size= when called with tokens only")
            shapes = {tuple(img.shape[-2:]) for img in as_image_list(images)}
            if len(shapes) != 1:
                raise InputError(f"images have different sizes {sorted(shapes)}: pass size= or call per image")
            size = shapes.pop()
        if tokens is None:
            tokens = self.encode_images(images)
        _, sim = self.head(tokens, prompts, return_maps=True)
        grid = self.grid_for(tokens.shape[1] - 1)
        b, t, _ = sim.shape
        thr = torch.as_tensor(threshold, dtype=torch.float32, device=sim.device)
        if thr.ndim and thr.numel() != t:
            raise InputError(f"{thr.numel()} thresholds given for {t} prompts")
        return upsample_maps(sim.view(b, t, *grid), tuple(int(s) for s in size), output=output,
                             threshold=thr if thr.ndim else float(thr))

    def grid_for(self, patches: int) -> tuple[int, int]:
        side = self.config.image_size // self.config.vision.patch
        if side * side != patches:
            raise InputError(f"{patches} patch tokens do not form the {side}×{side} grid of this model")
        return side, side

    def _prompts(self, prompts: Sequence[str] | None) -> list[str]:
        if prompts is None:
            if not self.default_prompts:
                raise InputError(f"model {self.model_id} has no default prompts: pass prompts=")
            return list(self.default_prompts.values())
        check_prompts(prompts)
        return list(prompts)

    @property
    def tau(self) -> float:
        """RadZero's temperature τ; families without one (CARZero: no temperature) raise one line."""
        tau = getattr(self.module, "tau", None)
        if tau is None:
            raise AttributeError(f"model family {self.family!r} has no temperature τ")
        return tau

    def __repr__(self) -> str:
        return (f"RadFlashModel({self.model_id!r}, device={self.device}, dtype={self.dtype}, "
                f"precision={self.precision!r}, backend={self.backend_name!r}, image_size={self.config.image_size})")


def load(path: str | Path | None = None, *, device: str | torch.device = "auto", dtype=None,
         backend: str = "eager") -> RadFlashModel:
    """Load a radflash checkpoint (folder or single .safetensors); ``None`` → the embedded demo model.

    ``dtype``: ``None`` (float32 on the CPU, bfloat16 on CUDA), ``"auto"`` (CPU: the encoder's
    precision and, with ``backend="auto"``, its runtime chosen by measurement with an agreement check,
    see :mod:`radflash.backends.auto`), ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"int8"``
    (the encoder's precision; on the CPU the text tower, heads and maps stay float32), or a
    ``torch.dtype`` for the whole module.
    """
    if path is None:
        path = DEMO_MODEL
    ckpt = load_checkpoint(path)
    if not ckpt.source:
        ckpt.source = str(path)
    if ckpt.notice and not os.environ.get("RADFLASH_NO_DEMO_NOTICE"):
        log.warning("%s", ckpt.notice)
    return RadFlashModel(ckpt, device=device, dtype=dtype, backend=backend, checkpoint_path=path)


def as_model(model: RadFlashModel | str | Path | None, *, device: str | torch.device = "auto", dtype=None,
             backend: str = "eager") -> RadFlashModel:
    """What every verb function accepts as ``model=``: a loaded model, a checkpoint path, or None (demo).

    A loaded model is reused as it is (switching backend only when another one is asked for), so
    callers that score several folders load the weights once.
    """
    if isinstance(model, RadFlashModel):
        precision = None if dtype is None else resolve_precision(dtype, model.device)
        if precision is not None and precision not in ("auto", model.precision):
            model.set_backend(model.backend_name if backend == "eager" else backend, dtype=dtype)
        elif backend not in ("eager", model.backend_name):
            model.set_backend(backend)
        return model
    if model is not None and not isinstance(model, (str, Path)):
        raise InputError(f"model must be a checkpoint path or a RadFlashModel, got {type(model).__name__}")
    return load(model, device=device, dtype=dtype, backend=backend)

