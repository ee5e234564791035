"""Prompt embeddings, computed once per text and kept: a repeated prompt or negative prompt skips the text
encoders, and the refiner reuses what the base computed.

Content pipelines repeat themselves (the same negative prompt on every request, several seeds of one prompt).
Without help, an SDXL ensemble runs four text-encoder passes per image: CLIP-L and OpenCLIP-bigG on the prompt
for the base, then bigG on the prompt and on "" (the refiner's empty negative prompt; its config does not use
zeros) for the refiner. Eager and launch-bound, they cost 52 ms of a 1.42 s compiled image while the GPU
waits (run 24, docs/benchmarks.md). Here:

- each text is encoded once per encoder set (role) and kept, least recently used first out, up to
  max_entries across requests; with the cache off the engine uses `for_one_pass`, which keeps a pass's texts
  for that pass only;
- the refiner's embeddings of a text are the last channels of the base's: the base concatenates CLIP-L's and
  bigG's penultimate hidden states and pools bigG's, the refiner uses bigG's alone, and the engine loads the
  refiner around the base's text_encoder_2. So when the module is the same object and the refiner's tokenizer
  gives the same ids, the refiner's part is a slice of the base's, bit for bit, and bigG does not run again.

The embeddings are exactly what each pipeline's encode_prompt computes (tests compare them tensor for
tensor): the pipeline is handed them through its prompt_embeds arguments.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from imagesmith.engine.execution_device import module_execution_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextPart:
    """One text's embeddings for one encoder set: penultimate hidden states and the pooled vector."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    # What produced the last channels, so the refiner can tell whether they are its own.
    encoder_2: Any
    token_ids_2: tuple[int, ...]


def zero_negative_rows(pipe: Any, negatives: list[str] | None, guidance_scale: float) -> bool:
    """Whether a pass's unguided rows get zeros for text: guided, no negative prompt, and a model trained that
    way (SDXL's base: force_zeros_for_empty_prompt; encode_prompt does the same). engine/empty_negative.py
    relies on it."""
    return guidance_scale > 1.0 and negatives is None and bool(pipe.config.force_zeros_for_empty_prompt)


class PromptEmbeddingCache:
    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], TextPart] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.derived = 0  # refiner parts sliced from the base's

    @classmethod
    def for_one_pass(cls) -> PromptEmbeddingCache:
        """With the cache off: texts are still encoded once within a pass, and the refiner still reuses the
        base's; nothing outlives the pass (it holds at most a batch's texts)."""
        return cls(max_entries=1 << 16)

    def pipeline_args(
        self, pipe: Any, role: str, prompts: list[str], negatives: list[str] | None, guidance_scale: float
    ) -> dict[str, torch.Tensor | None]:
        """The prompt_embeds arguments of a pipeline call for a batch of rows (one prompt per image), as
        pipe.encode_prompt would compute them for `prompt=prompts, negative_prompt=negatives`."""
        guided = guidance_scale > 1.0  # diffusers' do_classifier_free_guidance for SDXL
        positive = [self._text(pipe, role, prompt) for prompt in prompts]
        hidden = torch.cat([part.hidden for part in positive])
        pooled = torch.cat([part.pooled for part in positive])
        args: dict[str, torch.Tensor | None] = {
            "prompt_embeds": hidden,
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": None,
            "negative_pooled_prompt_embeds": None,
        }
        if not guided:
            return args
        if zero_negative_rows(pipe, negatives, guidance_scale):
            args["negative_prompt_embeds"] = torch.zeros_like(hidden)
            args["negative_pooled_prompt_embeds"] = torch.zeros_like(pooled)
            return args
        # encode_prompt encodes a negative prompt like a prompt (same tokenizer padding to 77 tokens).
        negative = [self._text(pipe, role, text or "") for text in (negatives or [""] * len(prompts))]
        args["negative_prompt_embeds"] = torch.cat([part.hidden for part in negative])
        args["negative_pooled_prompt_embeds"] = torch.cat([part.pooled for part in negative])
        return args

    def encode_ahead(self, pipe: Any, role: str, text: str) -> bool:
        """Encode `text` now and keep it, for a pass still to come (engine/encode_ahead.py). False when there is
        nothing to do: it is kept already, or the cache keeps nothing."""
        if self.max_entries <= 0 or (role, text) in self._entries:
            return False
        self._keep((role, text), self._encode(pipe, text))
        return True

    def _text(self, pipe: Any, role: str, text: str) -> TextPart:
        key = (role, text)
        part = self._entries.get(key)
        if part is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return part
        part = self._from_base(pipe, role, text)
        if part is not None:
            self.derived += 1
        else:
            self.misses += 1
            part = self._encode(pipe, text)
        self._keep(key, part)
        return part

    def _from_base(self, pipe: Any, role: str, text: str) -> TextPart | None:
        """The refiner's part as the last channels of the base's, when the base's bigG and tokenizer made it."""
        if role != "refiner" or pipe.text_encoder is not None:
            return None
        base = self._entries.get(("base", text))
        if base is None or base.encoder_2 is not pipe.text_encoder_2:
            return None
        self._entries.move_to_end(("base", text))  # in use: the next pass of this prompt wants it too
        if _token_ids(pipe.tokenizer_2, text) != base.token_ids_2:
            return None
        width = int(pipe.text_encoder_2.config.hidden_size)
        return TextPart(base.hidden[..., -width:].contiguous(), base.pooled, base.encoder_2, base.token_ids_2)

    @torch.no_grad()  # load_models freezes its weights, but an engine built around other models may not
    def _encode(self, pipe: Any, text: str) -> TextPart:
        """What `pipe.encode_prompt(prompt=text, num_images_per_prompt=1, do_classifier_free_guidance=False)`
        computes, step for step, except that the token ids reach the GPU without waiting for it.

        Why not encode_prompt itself: it moves the ids with a blocking `.to(device)`, which on CUDA waits for
        every kernel already queued. Encode ahead (engine/encode_ahead.py) encodes between a pass's denoising
        steps, while a whole UNet step is queued: each text then stalled the host until the GPU ran dry, and the
        GPU idled while the host encoded (run 77 measured the queue's base stage +1.4 % against the engine
        alone). From pinned memory with non_blocking, the copy is queued behind that work like the encoders'
        kernels, and the host goes on."""
        pairs = [
            (tokenizer, encoder)
            for tokenizer, encoder in (
                (pipe.tokenizer, pipe.text_encoder),
                (pipe.tokenizer_2, pipe.text_encoder_2),
            )
            if tokenizer is not None and encoder is not None
        ]
        hidden_parts: list[torch.Tensor] = []
        pooled: torch.Tensor | None = None
        token_ids_2: tuple[int, ...] = ()
        for tokenizer, encoder in pairs:
            prompt = (
                pipe.maybe_convert_prompt(text, tokenizer) if hasattr(pipe, "maybe_convert_prompt") else text
            )
            ids = _token_ids(tokenizer, prompt)
            _say_if_cut(tokenizer, prompt)
            output = encoder(
                # The engine's pinned answer (no offload) first: diffusers' search walks all of the encoder's
                # modules (run 67: most of each prompt's host time; engine/execution_device.py).
                _on_device_without_waiting(torch.tensor([ids]), module_execution_device(encoder)),
                output_hidden_states=True,
            )
            # As encode_prompt: the pooled vector is the first 2-D output[0] (bigG's projection; CLIP-L's
            # output[0] is its last hidden state), the embeddings the penultimate hidden states, side by side.
            if pooled is None and output[0].ndim == 2:
                pooled = output[0]
            hidden_parts.append(output.hidden_states[-2])
            if encoder is pipe.text_encoder_2:
                token_ids_2 = ids
        if pooled is None:
            raise ValueError("the pipeline's text encoders gave no pooled embedding (no text_encoder_2?)")
        dtype = pipe.text_encoder_2.dtype if pipe.text_encoder_2 is not None else pipe.unet.dtype
        hidden = torch.cat(hidden_parts, dim=-1).to(dtype=dtype)
        return TextPart(hidden, pooled, pipe.text_encoder_2, token_ids_2)

    def _keep(self, key: tuple[str, str], part: TextPart) -> None:
        if self.max_entries <= 0:
            return
        self._entries[key] = part
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def _say_if_cut(tokenizer: Any, text: str) -> None:
    """A warning when the text is longer than the encoder takes (_token_ids cuts it), as encode_prompt warns."""
    if len(tokenizer(text).input_ids) > tokenizer.model_max_length:
        log.warning(
            "the prompt is longer than the text encoder's %d tokens; only its start is used: %.60r",
            tokenizer.model_max_length,
            text,
        )


def _on_device_without_waiting(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`ids` on `device`; to a CUDA device from pinned memory, queued on the current stream without the host
    waiting for it (a plain `.to(device)` from pageable memory synchronises the stream first)."""
    if device.type != "cuda":
        return ids.to(device)
    return ids.pin_memory().to(device, non_blocking=True)


def _token_ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    # As encode_prompt tokenizes: padded to the model's length, truncated.
    ids = tokenizer(
        text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids
    return tuple(int(i) for i in ids)
