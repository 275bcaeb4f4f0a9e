"""TransMIL's parts against their definitions: Nystrom attention, PPEG, the CLS path."""

import math

import pytest
import torch

from medrobust.models.registry import build_model
from medrobust.models.transmil import (
    PPEG, NystromAttention, TransMIL, TransMILOptions, moore_penrose_pinv)


def _attention(landmarks=64, iterations=6, heads=4, head_dim=8, dim=32):
    torch.manual_seed(0)
    return NystromAttention(dim, heads, head_dim, landmarks, iterations, 33, 0.0).eval()


def _exact(attention, x):
    """Softmax attention over every token with the same projections and value residual."""
    n, heads = x.shape[0], attention.heads
    q, k, v = (t.reshape(n, heads, -1).transpose(0, 1)
               for t in attention.to_qkv(x).chunk(3, dim=-1))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = weights @ v + attention.residual(v.unsqueeze(0)).squeeze(0)
    return attention.to_out(out.transpose(0, 1).reshape(n, -1)), weights


@pytest.mark.parametrize("n", [1, 2, 17, 64])
def test_nystrom_matches_softmax_attention_with_a_landmark_per_token(n):
    x = torch.randn(n, 32, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        expected, weights = _exact(_attention(iterations=30), x)
        out, cls_attention, values = _attention(iterations=30)(x, need_cls_attention=True)
        six = _attention(iterations=6)(x)  # the reference's 6 iterations: close, not exact
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-3)  # float32 pinv
    torch.testing.assert_close(cls_attention, weights[:, 0, 1:], atol=1e-3, rtol=1e-3)
    assert values.shape == (4, n - 1, 8)
    assert (six - expected).abs().max() < 0.05 * expected.abs().max()


def test_nystrom_with_fewer_landmarks_approximates_and_stays_finite():
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = _exact(_attention(), x)
        out = _attention(landmarks=64)(x)
    assert out.shape == (300, 32) and torch.isfinite(out).all()
    # landmarks are means of 5 tokens here: an approximation, yet nowhere near noise
    assert (out - expected).abs().mean() < 0.5 * expected.abs().mean()


def test_pseudo_inverse_converges_to_the_inverse():
    matrix = torch.softmax(torch.randn(2, 10, 10, generator=torch.Generator().manual_seed(0)), -1)
    torch.testing.assert_close(moore_penrose_pinv(matrix, 30) @ matrix,
                               torch.eye(10).expand(2, 10, 10), atol=1e-3, rtol=0)


@pytest.mark.parametrize("n", [1, 5, 49, 50, 1000])
def test_ppeg_round_trip_keeps_shape_and_is_the_convolutions_plus_identity(n):
    torch.manual_seed(0)
    ppeg = PPEG(6)
    tokens = torch.randn(n, 6)
    side = max(math.ceil(math.sqrt(n)), 7)
    square = math.ceil(math.sqrt(n)) ** 2
    grid = torch.cat([tokens, tokens[:square - n], torch.zeros(side * side - square, 6)])
    image = grid.T.reshape(1, 6, side, side)
    expected = image + sum(conv(image) for conv in ppeg.convs)
    with torch.no_grad():
        out = ppeg(tokens)
        expected = expected.reshape(6, -1).T[:n]
    assert out.shape == (n, 6)
    torch.testing.assert_close(out, expected)
    for conv, size in zip(ppeg.convs, (7, 5, 3)):
        assert conv.kernel_size == (size, size) and conv.groups == 6


def test_ppeg_with_zero_convolutions_is_the_identity():
    ppeg = PPEG(4)
    for conv in ppeg.convs:
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    tokens = torch.randn(30, 4)
    torch.testing.assert_close(ppeg(tokens), tokens)


def test_transmil_has_the_references_shape():
    model = build_model({"family": "slide", "arch": "transmil", "feature_dim": 1024,
                         "num_classes": 2})
    assert isinstance(model, TransMIL) and model.options == TransMILOptions()
    for layer in (model.layer1, model.layer2):
        attention = layer.attention
        assert (attention.heads, attention.head_dim, attention.landmarks,
                attention.pinv_iterations) == (8, 64, 256, 6)
        assert attention.residual.kernel_size == (33, 1) and attention.residual.groups == 8
        assert attention.to_out[1].p == 0.1
        assert not any(isinstance(module, torch.nn.GELU) for module in layer.modules())  # no FFN
    assert model.front[0].out_features == 512 and model.front[2].p == 0.25
    assert model.cls_token.shape == (1, 512)


def test_transmil_classifies_the_normalised_cls_token():
    torch.manual_seed(0)
    model = TransMIL(8, 2, TransMILOptions(hidden_dim=16, heads=2, head_dim=8)).eval()
    bag = torch.randn(12, 8)
    with torch.no_grad():
        embeddings = model.embed_instances(bag)
        x = torch.cat([model.cls_token, embeddings])
        x = model.layer1(x)
        x = torch.cat([x[:1], model.position(x[1:])])
        expected = model.predictor(model.norm(model.layer2(x))[0])
        logits, attention = model(bag)
    torch.testing.assert_close(logits, expected)
    assert attention.shape == (12,)
    # permuting instances changes PPEG's grid, so TransMIL (unlike ABMIL) sees order
    pooled = model.aggregate(embeddings)
    scores = model.instance_probability(embeddings, pooled)
    assert scores.shape == (12,) and ((scores >= 0.5) & (scores <= 1)).all()
