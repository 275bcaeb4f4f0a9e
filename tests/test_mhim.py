"""MHIM-MIL's parts against their definitions: EMA teacher, masks, recycle queries, loss."""

import pytest
import torch
import torch.nn.functional as F

from medrobust.errors import ConfigError
from medrobust.models.mhim import (
    MHIM, GlobalRecycle, MHIMOptions, cosine_value, high_score_mask, kept_indices,
    soft_cross_entropy)
from medrobust.models.mil import ABMIL, ABMILOptions
from medrobust.models.transmil import TransMIL, TransMILOptions


def _student(arch="abmil"):
    torch.manual_seed(0)
    if arch == "transmil":
        return TransMIL(8, 2, TransMILOptions(hidden_dim=16, heads=2, head_dim=8))
    return ABMIL(8, 2, ABMILOptions(hidden_dim=16, attention_dim=8))


def _mhim(arch="abmil", **options):
    student = _student(arch)
    torch.manual_seed(1)
    teacher_state = {key: torch.randn_like(value) for key, value in student.state_dict().items()}
    return MHIM(student, teacher_state, MHIMOptions(teacher="base", **options)), teacher_state


def test_defaults_are_the_references():
    options = MHIMOptions(teacher="base")
    assert (options.momentum, options.temperature_teacher, options.temperature_student,
            options.mask_ratio_hr, options.merge_momentum) == (0.9999, 0.1, 1.0, 1.0, 0.9999)
    with pytest.raises(ConfigError, match="mask_ratio_h must be in"):
        MHIMOptions(teacher="base", mask_ratio_h=1.5)
    with pytest.raises(ConfigError, match="momentum_schedule must be one of"):
        MHIMOptions(teacher="base", momentum_schedule="linear")
    with pytest.raises(ConfigError, match="missing key"):
        MHIMOptions.from_mapping({})


@pytest.mark.parametrize("arch", ["abmil", "transmil"])
def test_teacher_gets_no_gradient_and_follows_the_student_by_ema_exactly(arch):
    model, teacher_state = _mhim(arch, momentum=0.9)
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key])  # initialised from the baseline's weights
    model.train()
    loss, _, _ = model.loss(torch.randn(20, 8), torch.tensor(1), 0, 10, torch.Generator())
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert any(p.grad is not None for p in model.student.parameters())
    before = {name: p.detach().clone() for name, p in model.teacher.named_parameters()}
    student = dict(model.student.named_parameters())
    model.update_teacher(0.9)
    for name, parameter in model.teacher.named_parameters():
        torch.testing.assert_close(parameter, 0.9 * before[name] + 0.1 * student[name].detach(),
                                   rtol=1e-6, atol=1e-6)  # float32 rounding


@pytest.mark.parametrize("n, ratio, random_ratio, candidates, masked", [
    (100, 0.03, 1.0, 3, 3),       # top ceil(100 * 0.03) all masked
    (100, 0.03, 0.5, 6, 3),       # top 6, half of them masked
    (10, 0.01, 0.5, 1, 1),        # ceil keeps one candidate, ceil(0.5) masks it
    (10, 0.6, 0.5, 10, 6),        # r_h / r_hr > 1: a random 0.6 of all
])
def test_high_score_mask_sizes(n, ratio, random_ratio, candidates, masked):
    scores = torch.rand(n, generator=torch.Generator().manual_seed(0))
    indices = high_score_mask(scores, ratio, random_ratio, torch.Generator().manual_seed(1))
    assert len(indices) == masked == len(set(indices.tolist()))
    top = set(torch.topk(scores, candidates).indices.tolist())
    assert set(indices.tolist()) <= top


def test_masks_union_high_score_and_random_and_never_empty_the_bag():
    model, _ = _mhim(mask_ratio=0.5, mask_ratio_h=0.1, mask_ratio_hr=1.0)
    scores = torch.arange(40.0)
    masked = model.masked_instances(scores, 0, 1, torch.Generator().manual_seed(0))
    assert set(range(36, 40)) <= set(masked.tolist())   # the top 4 scores
    assert 20 <= len(masked) <= 24                       # with 20 random ones, overlaps aside
    everything = torch.arange(3)
    assert kept_indices(3, everything, torch.tensor([0.5, 0.1, 0.9])).tolist() == [1]


def test_cosine_schedules_run_from_start_to_end():
    assert cosine_value(0.03, 0.0, 0, 100) == pytest.approx(0.03)
    assert cosine_value(0.03, 0.0, 50, 100) == pytest.approx(0.015)
    assert cosine_value(0.03, 0.0, 100, 100) == pytest.approx(0.0)
    model, _ = _mhim(mask_ratio_h=0.03, mask_ratio_h_schedule="cosine",
                     momentum_schedule="cosine", momentum=0.99)
    assert model.mask_ratio_h(100, 100) == pytest.approx(0.0)
    assert model.momentum(0, 100) == pytest.approx(0.99)
    assert model.momentum(100, 100) == pytest.approx(1.0)


@pytest.mark.parametrize("arch", ["abmil", "transmil"])
def test_the_student_starts_from_what_init_student_names(arch):
    fresh = _student(arch).state_dict()
    for start in ("none", "front", "all"):
        model, teacher_state = _mhim(arch, init_student=start)
        for key, value in model.student.state_dict().items():
            from_teacher = start == "all" or (start == "front" and key.startswith("front."))
            assert torch.equal(value, teacher_state[key] if from_teacher else fresh[key]), \
                (start, key)
    with pytest.raises(ConfigError, match="init_student must be one of"):
        MHIMOptions(teacher="base", init_student="fc")


def test_recycle_layers_start_as_the_reference_initialises_them():
    """Xavier-normal weights and zero biases, as the reference's MHIM applies to every
    submodule; PyTorch's default would give the output layer a nonzero bias."""
    torch.manual_seed(0)
    recycle = GlobalRecycle(512, k=1, merge_ratio=0.2, momentum=0.9999)
    output = recycle.to_out[0]
    assert torch.count_nonzero(output.bias) == 0
    xavier_std = (2 / (output.in_features + output.out_features)) ** 0.5
    assert float(output.weight.detach().std()) == pytest.approx(xavier_std, rel=0.05)


def test_recycle_queries_follow_the_outputs_by_ema_without_gradient():
    torch.manual_seed(0)
    recycle = GlobalRecycle(16, k=3, merge_ratio=0.25, momentum=0.9, dropout=0.0).train()
    assert "queries" in dict(recycle.named_buffers())
    assert "queries" not in dict(recycle.named_parameters())
    instances = torch.randn(40, 16, requires_grad=True)
    before = recycle.queries.clone()
    order = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    out = recycle(instances, torch.Generator().manual_seed(2))
    assert out.shape == (10 + 3, 16)  # int(40 * 0.25) kept as they are, 3 merged tokens
    torch.testing.assert_close(out[:10], instances[order[:10].sort().values])
    after = recycle.queries.clone()
    with torch.no_grad():
        recycle.queries.copy_(before)
        merged = recycle.cross_attention(instances[order[10:]])
    torch.testing.assert_close(out[10:], merged)
    torch.testing.assert_close(after, 0.9 * before + 0.1 * merged)
    out.sum().backward()
    assert instances.grad is not None and recycle.queries.grad is None
    recycle.eval()  # not used at test time; MHIM never calls it outside its loss


def test_consistency_loss_is_soft_cross_entropy_of_bag_features():
    student, teacher = torch.randn(16), torch.randn(16)
    expected = -(F.softmax(teacher / 0.1, -1) * F.log_softmax(student, -1)).sum()
    torch.testing.assert_close(soft_cross_entropy(student, teacher, 1.0, 0.1), expected)


def test_loss_is_ce_on_the_masked_bag_plus_alpha_consistency():
    model, _ = _mhim(mask_ratio_h=0.1, recycle=False, alpha=0.5)
    model.eval()  # no dropout: the parts can be recomputed
    bag, label = torch.randn(30, 8), torch.tensor(1)
    loss, logits, parts = model.loss(bag, label, 0, 1, torch.Generator().manual_seed(0))
    assert model.teacher.training is False
    with torch.no_grad():
        embeddings = model.teacher.embed_instances(bag)
        pooled = model.teacher.aggregate(embeddings)
        scores = model.teacher.instance_probability(embeddings, pooled)
    top = set(torch.topk(scores, 3).indices.tolist())
    keep = [i for i in range(30) if i not in top]
    feature = model.student.aggregate(model.student.embed_instances(bag)[keep]).feature
    expected = (F.cross_entropy(model.student.classify(feature)[None], label[None])
                + 0.5 * soft_cross_entropy(feature, pooled.feature, 1.0, 0.1))
    torch.testing.assert_close(loss, expected)
    assert parts["masked"] == 3 and logits.shape == (2,)


@pytest.mark.parametrize("arch", ["abmil", "transmil"])
def test_test_time_forward_is_the_students_and_ignores_masking(arch):
    model, _ = _mhim(arch, mask_ratio=0.7, mask_ratio_h=0.5)
    model.eval()
    bag = torch.randn(25, 8)
    with torch.no_grad():
        logits, attention = model(bag)
        expected, expected_attention = model.student(bag)
    torch.testing.assert_close(logits, expected)
    assert attention.shape == (25,)
    torch.testing.assert_close(attention, expected_attention)
    with torch.no_grad():  # nothing random at test time: a second call agrees
        torch.testing.assert_close(model(bag)[0], logits)
