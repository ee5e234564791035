"""On a CUDA GPU: the text encoders replayed as CUDA graphs (engine/encoder_graphs.py) give bit for bit what
eager gives, for every prompt, and their outputs survive the next replay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from text_embeddings import encode_prompt_alone

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.encoder_graphs import installed
from imagesmith.schemas import GenerationRequest

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_encoders_give_the_eager_images_bit_for_bit(tiny_settings: Settings) -> None:
    on_cuda = tiny_settings.with_changes(device="cuda")
    eager = Engine.start(on_cuda.with_changes(text_encoder_graphs=False))
    graphed = Engine.start(on_cuda.with_changes(text_encoder_graphs=True))
    assert "text encoders as CUDA graphs x2" in graphed.levers
    for prompt, seed in [("a lighthouse", 1), ("a harbour at night, rain", 2), ("a lighthouse", 3)]:
        request = GenerationRequest(prompt=prompt, width=128, height=128, num_inference_steps=6, seed=seed)
        a = np.asarray(eager.generate(request).images[0])
        b = np.asarray(graphed.generate(request).images[0])
        assert np.array_equal(a, b), prompt
    for encoder in (graphed.models.base.text_encoder, graphed.models.base.text_encoder_2):
        graph = installed(encoder)
        assert graph is not None and graph.failure is None, graph and graph.failure
        assert graph.graph is not None and graph.replays >= 2  # two new prompts (the third was cached)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_each_replay_answers_its_own_ids_and_earlier_outputs_survive(tiny_settings: Settings) -> None:
    engine = Engine.start(tiny_settings.with_changes(device="cuda", text_encoder_graphs=True))
    encoder = engine.models.base.text_encoder_2
    graph = installed(encoder)
    assert graph is not None
    first_ids, second_ids = (
        torch.randint(0, encoder.config.vocab_size, (1, 77), device="cuda") for _ in range(2)
    )
    before = graph.replays  # the start-up's warm-up may have replayed it
    with torch.no_grad():
        first = encoder(first_ids, output_hidden_states=True)
        second = encoder(second_ids, output_hidden_states=True)  # replays over the graph's outputs
        expected_first = graph.eager_forward(first_ids, output_hidden_states=True)
        expected_second = graph.eager_forward(second_ids, output_hidden_states=True)
    assert graph.failure is None and graph.replays == before + 2
    for got, want in [(first, expected_first), (second, expected_second)]:
        assert torch.equal(got[0], want[0])
        assert torch.equal(got.hidden_states[-2], want.hidden_states[-2])
    assert not torch.equal(first.hidden_states[-2], second.hidden_states[-2])
    # A call with a tensor argument (an attention mask) is not the recorded call: eager, nothing replayed.
    mask = torch.ones_like(first_ids)
    mask[:, 40:] = 0
    with torch.no_grad():
        masked = encoder(first_ids, attention_mask=mask, output_hidden_states=True)
        expected_masked = graph.eager_forward(first_ids, attention_mask=mask, output_hidden_states=True)
    assert graph.replays == before + 2
    assert torch.equal(masked.hidden_states[-2], expected_masked.hidden_states[-2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graphs", [True, False])
def test_encoding_a_new_text_never_waits_for_the_gpu(tiny_settings: Settings, graphs: bool) -> None:
    """Encode ahead encodes between a pass's steps, with a UNet step queued: a synchronising copy there makes the
    GPU idle while the host encodes (prompt_cache._encode says why). torch raises on any synchronising call
    under sync debug mode "error"; the embeddings stay encode_prompt's own."""
    from imagesmith.engine.prompt_cache import PromptEmbeddingCache

    engine = Engine.start(tiny_settings.with_changes(device="cuda", text_encoder_graphs=graphs))
    base = engine.models.base
    cache = PromptEmbeddingCache(8)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert cache.encode_ahead(base, "base", "a harbour at night, rain")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    args = cache.pipeline_args(base, "base", ["a harbour at night, rain"], None, 1.0)
    hidden, pooled = encode_prompt_alone(base, "a harbour at night, rain")
    assert torch.equal(args["prompt_embeds"], hidden) and torch.equal(args["pooled_prompt_embeds"], pooled)
