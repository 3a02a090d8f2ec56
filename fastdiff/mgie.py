"""MGIE end to end (Apple, ICLR 2024): an image and an instruction in; the edited image and the
MLLM's own reading of the instruction (its "expressive instruction") out.

    mgie = fastdiff.MGIE.from_pretrained("LLaVA-7B-v1", "mgie_7b", "instruct-pix2pix", dtype="bf16")
    result = mgie.edit("in.png", "make it snowy", seed=13331)
    result.image.save("out.png"); print(result.expressive_instruction)

The procedure is MGIE's inference (apple/ml-mgie, ml_mgie/mgie.py), step by step:
  1. the image is shrunk to fit 512 x 512 (PIL thumbnail; max_size), and the edit is made at that
     size (a 1024x700 input gives a 512x350 result); the MLLM sees its centre square resized to
     512, through CLIP's own preprocessing;
  2. prompt: vicuna_v1_1 around "what will this image be like if {instruction}", a newline and
     <im_start> + <im_patch> x (image_size / patch_size)^2 + <im_end>;
  3. LLaVA-v1 (fastdiff.models.llava) decodes greedily, 96 new tokens at most, no 3-gram
     repeated (the prompt's ids included), keeping the last layer's hidden states;
  4. p = min(index of the first [IMG0] in prompt + output - 1, or len(hid) - 9 without one;
     len(hid) - 9); hid[p:p+8] are the [IMG] states; the output text without its special
     tokens is the expressive instruction;
  5. the InstructPix2Pix pipeline with MGIE's UNet, conditioned by edit_head(hid, emb) against
     edit_head(zeros, emb) (fastdiff.Pipeline's img_hidden_states; emb is mllm.pt's, see
     loading.load_mgie), 3-way guidance, Euler ancestral; 100 steps and scales 7.5 / 1.5 are the
     editing pipeline's defaults (fastdiff.requests.Defaults), MGIE's.
The edit is resolved (Pipeline.resolve) once, before the MLLM runs, so bad options fail at once;
steps 1-4 run per request in the caller's thread; step 5 is an ordinary edit, so in an Engine its
denoising shares the step-level UNet batch with every other edit (`submit`).
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future
from pathlib import Path

import torch
from PIL import Image

from fastdiff import loading
from fastdiff.loading import IMG_TOKENS
from fastdiff.images import load_image
from fastdiff.jobs import step_jobs
from fastdiff.models.checkpoint import CheckpointError
from fastdiff.models.llava import IMAGE_END, IMAGE_PATCH, IMAGE_START, LlavaV1, read_llava_config
from fastdiff.pipeline import Pipeline, Resolved
from fastdiff.requests import DEFAULT_MAX_PIXELS, EditRequest, PipelineError, build_request, describe, resolve_dtype

__all__ = ["MGIE", "MGIEReading", "MGIEEdit", "IMG_TOKENS"]

# vicuna_v1_1: system, " ", "USER: " + message, " ", "ASSISTANT:" (the assistant's turn left open)
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
QUESTION = "what will this image be like if {instruction}"
MAX_NEW_TOKENS, NO_REPEAT_NGRAM = 96, 3
MAX_SIZE = 512  # MGIE shrinks the input to fit this square, and shows the MLLM a square of this side


@dataclasses.dataclass(frozen=True)
class MGIEReading:
    """What the MLLM made of an instruction: its text, the 8 [IMG] hidden states (8, W) that
    condition the edit, where they were taken (img_position, in prompt + output positions; when
    the MLLM wrote no [IMG] token, img_token_written is False and they are its last states, MGIE's
    fallback), the image as the diffusion sees it, and timings (s) and token counts."""

    expressive_instruction: str
    img_hidden_states: torch.Tensor
    img_position: int
    img_token_written: bool
    image: Image.Image
    generated_ids: list[int]
    timings: dict


@dataclasses.dataclass(frozen=True)
class MGIEEdit:
    """mgie.edit's result: the edited image (PIL unless output_type says otherwise; the size of the
    input after max_size's shrink, sides rounded down to the VAE's factor: 8 for SD), the expressive instruction, whether
    the MLLM wrote its [IMG] tokens (see MGIEReading), and timings per stage in seconds."""

    image: object
    expressive_instruction: str
    img_token_written: bool
    timings: dict


def _folder(name: str, value) -> Path:
    if not isinstance(value, (str, Path)) or not Path(value).is_dir():
        raise PipelineError(name, f"expected a folder, got {describe(value)}" + (
            " (no such directory)" if isinstance(value, (str, Path)) else ""))
    return Path(value)


# fields of the loaders' errors that stand for the folder an MGIE argument names (None: the
# detail starts with the file's path)
_FOLDER_FIELDS = ("folder", "mgie", "llava_dir", "path", None)


def _renamed(argument: str, load):
    """load() with its PipelineErrors and CheckpointErrors naming `argument`, the folder at fault."""
    try:
        return load()
    except (PipelineError, CheckpointError) as exc:
        raise PipelineError(argument, exc.detail if exc.field in _FOLDER_FIELDS else str(exc)) from exc


def _vision_tower(name: str, llava_dir: Path, vision_dir, dtype, device):
    """CLIPVisionModel + CLIPImageProcessor from vision_dir, else from mm_vision_tower as a local
    folder or a name already in the Hugging Face cache (nothing is downloaded)."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    if vision_dir is not None:
        source = str(_folder("vision_dir", vision_dir))
    else:
        source = next((str(c) for c in (Path(name), llava_dir / name) if c.is_dir()), name)
    try:
        vision = CLIPVisionModel.from_pretrained(source, dtype=dtype, local_files_only=True).to(device)
        processor = CLIPImageProcessor.from_pretrained(source, local_files_only=True)
    except OSError as exc:
        if vision_dir is None:
            raise PipelineError("vision_dir", f"the vision tower {name!r} (mm_vision_tower in {llava_dir / 'config.json'}) "
                                f"is not found locally; download it (e.g. `huggingface-cli download {name} --local-dir "
                                f"clip`) and pass vision_dir=that folder (CLI: --vision)") from exc
        raise PipelineError("vision_dir", "cannot load a CLIP vision model and its preprocessor_config.json from "
                            f"{source} ({exc})") from exc
    return vision, processor


def _center_square(image: Image.Image, side: int) -> Image.Image:
    """The largest centred square, resized to side x side (what MGIE shows its MLLM)."""
    w, h = image.size
    m = min(w, h)
    left, top = (w - m) // 2, (h - m) // 2
    return image.crop((left, top, left + m, top + m)).resize((side, side))


def check_instruction(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PipelineError("instruction", f"expected a non-empty string, got {describe(value)}")
    return value


def _max_size(value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8):
        raise PipelineError("max_size", f"expected an integer >= 8 or None, got {describe(value)}")
    return value


class MGIE:
    """The MLLM (LlavaV1 + its tokenizer and CLIP image processor) and the editing Pipeline whose
    edit head and [IMG] embeddings (mllm.pt's emb) turn the MLLM's states into UNet conditioning."""

    def __init__(self, *, llava: LlavaV1, tokenizer, image_processor, pipe: Pipeline, eos_token_id: int | None,
                 use_im_start_end: bool):
        self.llava, self.tokenizer, self.image_processor, self.pipe = llava, tokenizer, image_processor, pipe
        self.eos_token_id = eos_token_id
        self.img0_id = tokenizer.convert_tokens_to_ids(IMG_TOKENS[0])
        vision = llava.vision.config
        patches = IMAGE_PATCH * (vision.image_size // vision.patch_size) ** 2
        self.image_placeholder = f"{IMAGE_START}{patches}{IMAGE_END}" if use_im_start_end else patches

    def __repr__(self):
        llm = self.llava.llm.config
        return f"MGIE(LLaVA {llm.num_hidden_layers} layers x {llm.hidden_size}, {self.pipe!r})"

    @classmethod
    def from_pretrained(cls, llava_dir, mgie_dir, ip2p_dir, *, vision_dir=None, dtype=None, device=None,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> "MGIE":
        """llava_dir: LLaVA-7B-v1 as on disk (config.json "model_type": "llava", tokenizer,
        pytorch_model-*.bin or safetensors). mgie_dir: MGIE's unet.pt and mllm.pt. ip2p_dir:
        InstructPix2Pix in diffusers' layout (timbrooks/instruct-pix2pix). vision_dir: the CLIP
        vision tower (openai/clip-vit-large-patch14) when mm_vision_tower is not found locally.
        dtype: as Pipeline.from_pretrained (bf16 on the CPU keeps 7B at ~13.5 GB)."""
        from transformers import AutoTokenizer

        dtype = resolve_dtype(dtype, device)
        llava_dir, mgie_dir = _folder("llava_dir", llava_dir), _folder("mgie_dir", mgie_dir)
        ip2p_dir = _folder("ip2p_dir", ip2p_dir)
        # the diffusion half first: its problems show in seconds, before the 7B weights are read
        parts = _renamed("ip2p_dir", lambda: loading.load_pipeline_parts(ip2p_dir, dtype=dtype, device=device))
        mgie_parts, mllm = loading.load_mgie(mgie_dir, parts["unet"], dtype=dtype, device=device, field="mgie_dir")
        parts.update(mgie_parts, name=f"mgie:{mgie_dir.name}+{ip2p_dir.name}")
        pipe = _renamed("mgie_dir", lambda: Pipeline(**parts, max_pixels=max_pixels))
        width = pipe.edit_head.llm2hid.in_features

        _, mm = _renamed("llava_dir", lambda: read_llava_config(llava_dir))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(llava_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise PipelineError("llava_dir", f"cannot load the tokenizer from {llava_dir} ({exc})") from exc
        # MGIE's order: the [IMG] tokens, the embeddings resized to this vocabulary, then LLaVA's
        # image tokens, which LLaVA-v1's tokenizer already holds (so they need no new rows)
        tokenizer.add_tokens(list(IMG_TOKENS), special_tokens=True)
        vocab_size = len(tokenizer)
        image_tokens = [IMAGE_PATCH] + ([IMAGE_START, IMAGE_END] if mm.get("mm_use_im_start_end") else [])
        tokenizer.add_tokens(image_tokens, special_tokens=True)
        beyond = [t for t in image_tokens if tokenizer.convert_tokens_to_ids(t) >= vocab_size]
        if beyond:
            raise PipelineError("llava_dir", f"its tokenizer lacks {beyond} (LLaVA-v1's tokenizer holds {image_tokens} "
                                f"before MGIE's [IMG] tokens)")
        vision, processor = _vision_tower(mm["mm_vision_tower"], llava_dir, vision_dir, dtype, device)
        llava = _renamed("llava_dir", lambda: LlavaV1.from_pretrained(
            llava_dir, vision, vocab_size=vocab_size, patch_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PATCH),
            overrides=mllm, dtype=dtype, device=device))  # mllm.pt's rows for the new tokens
        if llava.width != width:
            raise PipelineError("llava_dir", f"the LLM is {llava.width} wide but MGIE's edit head takes {width}-wide states")
        eos = llava.llm.config.eos_token_id
        return cls(llava=llava, tokenizer=tokenizer, image_processor=processor, pipe=pipe,
                   eos_token_id=eos[0] if isinstance(eos, list) else eos, use_im_start_end=bool(mm.get("mm_use_im_start_end")))

    # -- the MLLM -------------------------------------------------------------------------------

    def prompt(self, instruction: str) -> str:
        """The full prompt for `instruction` (vicuna_v1_1 around MGIE's question and the image tokens)."""
        question = QUESTION.format(instruction=instruction) + "\n" + self.image_placeholder
        return f"{VICUNA_SYSTEM} USER: {question} ASSISTANT:"

    def describe(self, image, instruction: str, *, max_size: int | None = MAX_SIZE) -> MGIEReading:
        """Run only the MLLM: the expressive instruction and the [IMG] hidden states for `image`."""
        instruction, max_size = check_instruction(instruction), _max_size(max_size)
        return self._read(self._input_image(image, max_size), instruction)

    def _input_image(self, image, max_size: int | None) -> Image.Image:
        """The image as MGIE edits it: shrunk to fit max_size x max_size (PIL thumbnail, as MGIE)."""
        image = load_image(image, max_pixels=self.pipe.max_pixels)  # a new RGB image: safe to shrink in place
        if max_size is not None:
            image.thumbnail((max_size, max_size))
        return image

    def _read(self, image: Image.Image, instruction: str) -> MGIEReading:
        timings = {}
        start = time.perf_counter()
        device = self.llava.mm_projector.weight.device
        pixels = self.image_processor(images=_center_square(image, MAX_SIZE), return_tensors="pt").pixel_values
        ids = self.tokenizer(self.prompt(instruction)).input_ids
        embeds = self.llava.embed(torch.tensor([ids], device=device), pixels.to(device))  # (1, L, W)
        timings["vision_s"] = time.perf_counter() - start
        generated, hidden = self.llava.greedy(ids, embeds, max_new_tokens=MAX_NEW_TOKENS,
                                              no_repeat_ngram_size=NO_REPEAT_NGRAM, eos_token_id=self.eos_token_id,
                                              timings=timings)  # hidden: (L + n - 1, W)
        sequence = ids + generated
        written = self.img0_id in generated
        last = len(hidden) - len(IMG_TOKENS) - 1
        position = min(sequence.index(self.img0_id) - 1, last) if written else last
        states = hidden[position:position + len(IMG_TOKENS)]  # (8, W)
        text = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
        timings.update(prompt_tokens=len(ids), new_tokens=len(generated))
        return MGIEReading(text, states.clone(), position, written, image, generated, timings)

    # -- editing --------------------------------------------------------------------------------

    def _resolve(self, image, instruction, max_size, options) -> tuple[Resolved, MGIEReading]:
        """The edit resolved once, before the MLLM runs (so bad options fail in milliseconds, not
        after the 7B model), with a placeholder for the [IMG] states; then the MLLM reads the
        shrunk image and its states replace the placeholder."""
        instruction, max_size = check_instruction(instruction), _max_size(max_size)
        placeholder = torch.zeros(len(IMG_TOKENS), self.llava.width)
        request = build_request(EditRequest, image=self._input_image(image, max_size), img_hidden_states=placeholder,
                                **options)
        resolved = self.pipe.resolve(request)
        reading = self._read(resolved.request.image, instruction)
        return resolved.with_img_hidden_states(reading.img_hidden_states.float()), reading

    def edit(self, image, instruction: str, *, max_size: int | None = MAX_SIZE, **options) -> MGIEEdit:
        """Edit `image` (PIL, array or path) following `instruction`. max_size: the input is shrunk to
        fit max_size x max_size first, as MGIE does (512: a 1024x700 input gives a 512x350 result;
        None keeps its size). options: EditRequest's (steps, guidance_scale, image_guidance_scale,
        seed, sampler, generator, latents, output_type, ...); what is not given takes the pipeline's
        defaults, MGIE's: 100 steps, scales 7.5 / 1.5, the ip2p folder's Euler ancestral. seed:
        None draws one (MGIE's demo uses 13331)."""
        resolved, reading = self._resolve(image, instruction, max_size, options)
        timings = dict(reading.timings)
        start = time.perf_counter()
        prepared = self.pipe.prepare(resolved)  # VAE encoder, edit head on the states and on zeros
        timings["encode_s"] = time.perf_counter() - start
        start = time.perf_counter()
        while not all(job.done for job in prepared.jobs):
            step_jobs(self.pipe.unet, [job for job in prepared.jobs if not job.done])
            prepared.step_end()
        timings["unet_s"], timings["steps"] = time.perf_counter() - start, prepared.jobs[0].run.num_steps
        start = time.perf_counter()
        outputs = prepared.finish()
        timings["vae_decode_s"] = time.perf_counter() - start
        return MGIEEdit(outputs[0], reading.expressive_instruction, reading.img_token_written, timings)

    def submit(self, engine, image, instruction: str, *, max_size: int | None = MAX_SIZE, **options) -> Future:
        """Run the MLLM here, then queue the edit on `engine` (a fastdiff.Engine over `self.pipe`),
        where its denoising joins the shared UNet batch. The Future gives an MGIEEdit (timings: the
        MLLM's only). Options as edit."""
        if getattr(engine, "pipe", None) is not self.pipe:
            raise PipelineError("engine", "expected a fastdiff.Engine over this MGIE's pipeline: Engine(mgie.pipe)")
        resolved, reading = self._resolve(image, instruction, max_size, options)
        inner, outer = engine.submit(resolved), Future()

        def relay(done: Future):
            if done.cancelled():
                outer.cancel()
            elif done.exception() is not None:
                outer.set_exception(done.exception())
            else:
                outer.set_result(MGIEEdit(done.result(), reading.expressive_instruction, reading.img_token_written,
                                          dict(reading.timings)))

        inner.add_done_callback(relay)
        return outer
