import torch

from kandinsky5.nano.text import NANO_TEXT_DIM, NanoTextEncoder


def test_minilm_encodes_offline_with_the_text_encoder_contract(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = NanoTextEncoder.from_pretrained()
    out = encoder.encode(["a red circle moves to the right", "a crimson disc slides rightwards", "a blue star"])
    assert out.tokens.shape == (3, 32, NANO_TEXT_DIM) and out.pooled.shape == (3, NANO_TEXT_DIM)
    assert out.mask.dtype == torch.bool and out.mask[:, 0].all() and not out.mask[:, -1].any()
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(3))
    # A paraphrase lands nearer its original than an unrelated caption does.
    similarity = out.pooled @ out.pooled.T
    assert similarity[0, 1] > similarity[1, 2]
