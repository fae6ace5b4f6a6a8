"""SUPIR's caption of the stage-1 image: LLaVA-1.5 asked the official question, sampled as the official agent does.

The request reproduces `llava/llava_agent.py` of the SUPIR repository: conversation template vicuna_v1, the
prompt split at `<image>` with BOS on the first chunk only, the image replaced by its 576 patch features,
sampling at temperature 0.2 / top-p 0.7 (greedy when asked), at most 512 new tokens, then the agent's clean-up.
The captioner is meant to live only for the caption: `close()` (or leaving a `with` block) frees its memory
before diffusion starts. Within a caption the vision tower and projector (0.6 GB in fp16) are released once the
image features exist, so they are not resident beside the language model's KV cache (the caption stage's peak).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import apply_top_p
from PIL import Image

from .models.llava import LlavaModel, load_llava, preprocess_image
from .pipeline.residency import Residency
from .weights.llava_convert import default_llava_dir

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
QUESTION = "Describe this image and its style in a very detailed manner."  # test.py (LLavaAgent default)
QUESTION_GRADIO = QUESTION + " The image is a realistic photography, not an art painting."  # gradio_demo default
IMAGE = "<image>"
STOP = "</s>"  # vicuna_v1 sep2
TEMPERATURE, TOP_P, MAX_NEW_TOKENS = 0.2, 0.7, 512
PARTS = {"vision": ("vision_tower.", "multi_modal_projector."), "language": ("language_model.",)}


class CaptionerUnavailable(FileNotFoundError):
    """No converted captioner weights; the message says how to make them."""


def prompt_text(question: str = QUESTION) -> str:
    """vicuna_v1 with one user turn and an open assistant turn (mm_use_im_start_end off)."""
    return f"{SYSTEM} USER: {IMAGE}\n{question} ASSISTANT:"


def prompt_ids(tokenizer, question: str = QUESTION) -> tuple[list[int], list[int]]:
    """Token ids before and after the image, as `tokenizer_image_token` builds them: each chunk tokenized on its
    own; when the first starts with BOS, every later chunk loses its first token (its own BOS)."""
    before, after = (tokenizer.encode(c) for c in prompt_text(question).split(IMAGE))
    offset = 1 if before and before[0] == tokenizer.bos_token_id else 0
    return before, after[offset:]


def clean_caption(text: str) -> str:
    """The agent's clean-up of the decoded answer (decoded with special tokens skipped)."""
    text = text.strip()
    if text.endswith(STOP):
        text = text[: -len(STOP)]
    return text.strip().replace("\n", " ").replace("\r", " ")


def make_sampler(temperature: float, top_p: float, seed: int) -> Callable[[mx.array], mx.array]:
    """Token choice from log-probabilities: argmax at temperature 0, else HF's order (temperature, then
    nucleus on the tempered distribution) with its own key chain from `seed`."""
    if temperature == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    key = mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        lp = logprobs / temperature
        lp = apply_top_p(lp - mx.logsumexp(lp, axis=-1, keepdims=True), top_p)
        return mx.random.categorical(lp, key=sub)

    return sample


def generate(
    model: LlavaModel, embeddings: mx.array, sampler: Callable, max_new_tokens: int, eos_token_id: int | None
) -> list[int]:
    """New token ids after the prompt embeddings [T, hidden], via mlx-lm's cached generation loop."""
    ids: list[int] = []
    steps = generate_step(mx.array([], dtype=mx.int32), model.language_model, input_embeddings=embeddings,
                          sampler=sampler, max_tokens=max_new_tokens)
    for token, _ in steps:
        if token == eos_token_id:
            break
        ids.append(token)
    return ids


class Captioner:
    """`with Captioner.load() as c: text = c.caption(image, seed=1234)`."""

    def __init__(self, model: LlavaModel, tokenizer, question: str = QUESTION, files: list[Path] | None = None):
        """`files`: the safetensors files `model` was loaded from; with them the vision tower is released after
        each image's features are computed and read back for the next image."""
        self.model = model
        self.tokenizer = tokenizer
        self.question = question
        self.residency = Residency(model, files, PARTS) if files else None

    @classmethod
    def load(cls, path: str | Path | None = None, *, dtype: mx.Dtype | None = None, question: str = QUESTION) -> "Captioner":
        """Load a converted folder (see `weights.llava_convert.convert_llava`); fp16 on a GPU, fp32 on CPU."""
        path = Path(path).expanduser() if path else default_llava_dir()
        if not (path / "config.json").is_file():
            raise CaptionerUnavailable(
                f"no converted LLaVA captioner in {path} (no config.json): download llava-hf/llava-1.5-13b-hf and convert it once with "
                f"`supir-mlx convert-llava <download folder> {path}` (or pass --no-caption / a prompt)"
            )
        from transformers import AutoTokenizer

        from .weights.llava_convert import check_llava_folder

        check_llava_folder(path)
        dtype = dtype or (mx.float16 if mx.default_device() == mx.gpu else mx.float32)
        return cls(load_llava(path, dtype), AutoTokenizer.from_pretrained(str(path)), question,
                   sorted(path.glob("model*.safetensors")))

    def caption(self, image: Image.Image | np.ndarray, *, seed: int = 0, greedy: bool = False,
                max_new_tokens: int = MAX_NEW_TOKENS) -> str:
        """One caption of `image` (PIL or uint8 HxWx3); sampled from `seed` unless `greedy`."""
        if self.model is None:
            raise RuntimeError("this captioner was closed")
        before, after = prompt_ids(self.tokenizer, self.question)
        pixels = preprocess_image(image, self.model.config.vision.image_size)
        sampler = make_sampler(0.0 if greedy else TEMPERATURE, TOP_P, seed)
        ids = self.generate_ids(pixels, before, after, sampler, max_new_tokens, self.tokenizer.eos_token_id)
        return clean_caption(self.tokenizer.decode(ids, skip_special_tokens=True))

    def generate_ids(self, pixels: mx.array, before: list[int], after: list[int], sampler: Callable,
                     max_new_tokens: int, eos_token_id: int | None) -> list[int]:
        """New token ids for the prompt `before` + image features of `pixels` + `after`."""
        if self.residency:
            self.residency.use("vision", "language")
        embeddings = self.model.embed(before, self.model.image_features(pixels)[0], after)
        if self.residency:
            mx.eval(embeddings)
            self.residency.use("language")
        return generate(self.model, embeddings, sampler, max_new_tokens, eos_token_id)

    def close(self) -> None:
        """Drop the weights and return MLX's cached buffers, so diffusion gets the memory."""
        self.model = None
        self.tokenizer = None
        self.residency = None
        from .memory import release_freed  # (memory imports the pipeline package, which imports this)

        release_freed()

    def __enter__(self) -> "Captioner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
