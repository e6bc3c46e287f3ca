"""Luck Matters: teachers, correlation metrics against numpy, exact-copy students, BN-bias fractions."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from backproplab.methods import teacher_student as ts


def test_2020_teacher_nodes_are_active_half_the_time_on_its_data():
    teacher = ts.make_teacher(version="2020", seed=3)
    data = ts.teacher_data(teacher, 2000, 20000, seed=3)
    for layer, acts in enumerate(ts.hidden_activations(teacher, data.x_test)):
        rate = (acts > 0).double().mean(0)
        # median calibration on 20000 other draws: each node active 50% +- sampling error (sd ~ 0.0035)
        assert rate.min() > 0.47 and rate.max() < 0.53, (layer, rate)


def test_2019_teacher_weights_come_from_the_grid_with_distinct_unit_rows():
    teacher = ts.make_teacher(version="2019", seed=1)
    for lin in teacher.linears:
        rows = lin.weight
        torch.testing.assert_close(rows.norm(dim=1), torch.ones(len(rows)))
        # up to each row's normalisation, entries are multiples of 0.25 (the grid {+-0.5, +-0.25, 0})
        quarters = 4 * rows / (rows.abs().max(1, keepdim=True).values / 0.5)
        torch.testing.assert_close(quarters, quarters.round(), rtol=0, atol=1e-5)
        assert len({tuple(r.tolist()) for r in rows}) == len(rows)


def test_2019_teacher_bias_is_divided_by_the_row_norm_like_the_authors_normalize_layer():
    """Undo the normalisation: where a row holds both 0.25 and 0.5 magnitudes its raw scale is known
    (the largest entry was 0.5), and bias * scale must then be the raw U(-0.5, 0.5) draw."""
    from scipy import stats

    raw_biases = []
    for seed in range(3):
        for lin in ts.make_teacher(version="2019", seed=seed).linears:
            for w, b in zip(lin.weight.double(), lin.bias.double()):
                mags = w.abs()[w.abs() > 1e-9]
                if (mags.max() / mags.min() - 2).abs() < 1e-6:  # magnitudes 0.25 and 0.5: scale = 0.5 / max
                    raw_biases.append(float(b * 0.5 / mags.max()))
    assert len(raw_biases) > 300
    assert max(map(abs, raw_biases)) <= 0.5 + 1e-6
    assert stats.kstest(raw_biases, stats.uniform(-0.5, 1).cdf).pvalue > 0.01


def test_normalize_rows_keeps_each_nodes_half_space():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    x = torch.randn(200, 5)
    before = lin(x)
    w = lin.weight.detach().clone()
    ts.normalize_rows(lin)
    torch.testing.assert_close(lin(x), before / w.norm(dim=1))
    assert torch.equal(lin(x) > 0, before > 0)


def test_2020_teacher_outputs_are_standardised_on_fresh_inputs():
    teacher = ts.make_teacher(version="2020", seed=4)
    data = ts.teacher_data(teacher, 10, 20000, seed=9)  # other draws than the calibration's
    y = data.y_test.double()
    # mean and sd of each of the 100 outputs: 0 and 1 up to sampling error (about 0.007 each, twice over)
    assert y.mean(0).abs().max() < 0.05
    assert (y.std(0) - 1).abs().max() < 0.05


def test_correlation_equals_numpy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 4, generator=g), torch.randn(500, 6, generator=g)
    b[:, 0] = 2 * a[:, 1] + 0.1 * b[:, 0]
    b[:, 5] = 0.0  # a dead node: correlation defined as 0
    c = ts.correlation(a, b)
    full = np.corrcoef(a.numpy().T, b[:, :5].numpy().T)[:4, 4:]
    np.testing.assert_allclose(c[:, :5].numpy(), full, rtol=1e-10, atol=1e-12)
    assert torch.equal(c[:, 5], torch.zeros(4, dtype=c.dtype))


@pytest.mark.medium
@pytest.mark.parametrize("copies", [1, 2, 3])
def test_exact_wider_permuted_copy_scores_correlation_one(copies):
    teacher = ts.make_teacher(version="2020", seed=2)  # every node active ~half the time: no dead node
    student = ts.duplicated_student(teacher, copies=copies, seed=5)
    x = torch.randn(3000, 20, generator=torch.Generator().manual_seed(0)) * 10
    torch.testing.assert_close(student(x), teacher(x), rtol=1e-5, atol=1e-4)  # the same function
    teacher_acts = ts.hidden_activations(teacher, x)
    for corr, width, t in zip(ts.layer_correlations(teacher, student, x), teacher.widths, teacher_acts):
        table = ts.match_table(corr)
        assert corr.shape == (width, width * copies)
        torch.testing.assert_close(table["best"], torch.ones(width, dtype=torch.float64), rtol=0, atol=1e-9)
        # every copy of a teacher node, and every copy of teacher nodes correlated >= 0.9 with it, is a hit
        similar = (ts.correlation(t, t) >= 0.9).sum(1)
        assert torch.equal(table["hits"], copies * similar) and table["covered"] == 1.0


def test_luck_rank_and_fan_out():
    init = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    final = torch.tensor([[0.2, 0.95, 0.1], [0.1, 0.99, 0.0]])
    assert ts.luck_ranks(init, final).tolist() == [2.0, 0.0]
    net = ts.ReLUNet(3, [2], 4)
    with torch.no_grad():
        net.linears[1].weight.copy_(torch.tensor([[3.0, 0.0], [4.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    assert ts.fan_out_norms(net)[0].tolist() == [5.0, 1.0]


def test_prune_keeps_the_function_of_the_kept_nodes():
    torch.manual_seed(0)
    student = ts.ReLUNet(5, [6, 4], 3)
    keep = [torch.tensor([0, 2, 5]), torch.tensor([1, 3])]
    small = ts.prune_to_nodes(student, keep)
    x = torch.randn(10, 5)
    acts = ts.hidden_activations(student, x)
    small_acts = ts.hidden_activations(small, x)
    # layer 1 nodes are identical; layer 2 only sees the kept layer-1 nodes, so compare by hand
    torch.testing.assert_close(small_acts[0], acts[0][:, keep[0]])
    lin = student.linears[1]
    expected = torch.relu(acts[0][:, keep[0]] @ lin.weight[keep[1]][:, keep[0]].T + lin.bias[keep[1]])
    torch.testing.assert_close(small_acts[1], expected)
    fresh = ts.prune_to_nodes(student, keep, reinit=True)
    assert fresh.widths == (3, 2) and not torch.equal(fresh.linears[0].weight, small.linears[0].weight)


def test_bn_bias_fractions_are_exact():
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(1, 5, 1), nn.BatchNorm1d(5))
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([-1.0, 2.0, -0.5, 0.0]))
        model[4].bias.copy_(torch.tensor([-1.0, -2.0, -3.0, 4.0, -0.1]))
    fr = ts.bn_bias_fractions(model)
    assert fr == {"1": 0.25 * 2, "4": 0.8}
    assert ts.bn_bias_fractions(model.state_dict()) == fr


def test_bn_bias_cli(tmp_path, capsys):
    from backproplab.cli import main

    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([-1.0, -2.0, -0.5, 1.0]))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    assert main(["bn-bias", str(tmp_path / "model.pt")]) == 0
    assert "1: 0.750" in capsys.readouterr().out
    assert main(["bn-bias", str(tmp_path / "missing.pt")]) == 2


def test_fan_out_ratio_is_per_layer_and_relative_to_each_nodes_start():
    best = torch.tensor([0.95, 0.92, 0.3, 0.1, 0.7])  # matched, matched, unmatched, unmatched, neither
    start = torch.tensor([2.0, 1.0, 4.0, 0.5, 9.0])
    final = torch.tensor([4.0, 3.0, 2.0, 0.5, 1.0])
    # relative: unmatched (0.5 + 1) / 2 = 0.75 over matched (2 + 3) / 2 = 2.5
    assert ts.fan_out_ratio(best, final, start) == pytest.approx(0.3)
    # raw norms would say (2 + 0.5) / 2 over (4 + 3) / 2
    assert ts.fan_out_ratio(best, final) == pytest.approx(1.25 / 3.5)
    assert np.isnan(ts.fan_out_ratio(best[:2], final[:2], start[:2]))  # no unmatched node: undefined


def test_lucky_nodes_keep_every_duplicate_of_a_matched_teacher_node():
    from backproplab.experiments.luck_matters import lucky_nodes

    corr = torch.tensor([[0.95, 0.2, 0.93, 0.1], [0.1, 0.5, 0.2, 0.91]])  # teacher node 0 matched twice
    assert lucky_nodes([corr], 0.9)[0].tolist() == [0, 2, 3]
    assert lucky_nodes([corr], 0.99)[0].tolist() == [0, 3]  # none reaches it: each teacher node's best


@pytest.mark.medium
def test_quick_reproduction_runs_on_cpu(tmp_path):
    """A tiny run end to end: the verdicts exist, the per-layer fan-out in final.json is what the stored
    per-node norms give (recomputed here with numpy), and every pruning arm that trains has the same budget."""
    import json

    from backproplab import experiments

    exp = experiments.get("luck_matters")
    cfg = experiments.make_config(exp, ["train_size=2000", "test_size=500", "epochs=2", "bn_epochs=1",
                                        "multipliers=1,2", "prune_epochs=1", "two_layer_steps=300",
                                        "matched_corr=0.3", "unmatched_corr=0.2"],  # both groups occur this early
                                  quick=True, seeds=1)
    exp_dir = experiments.run(exp, cfg, out=tmp_path, progress=False)
    summary = json.loads((exp_dir / "summary.json").read_text())
    assert any("BatchNorm biases" in v for v in summary["notes"]) and summary["figures"] == ["luck_matters.png"]
    claims = {v["claim"] for v in summary["verdicts"]}
    assert claims >= {"luck_matters.bn_bias_negative", "luck_matters.rewind_beats_reinit",
                      "luck_matters.lucky_finetune_beats_reinit", "luck_matters.fan_out_l_shape.two_layer",
                      *(f"luck_matters.fan_out_l_shape.layer{li}" for li in range(1, 5))}
    defined = 0
    for arm, depth in (("mult2", 4), ("two_layer", 1)):
        final = json.loads((exp_dir / arm / "seed0" / "final.json").read_text())
        assert len(final["layers"]) == depth
        for li, layer in enumerate(final["layers"], start=1):
            best, rel = np.array(layer["student_best"]), np.array(layer["fan_out"]) / np.array(layer["fan_out_init"])
            lo, hi = rel[best < 0.2], rel[best >= 0.3]
            expected = lo.mean() / hi.mean() if len(lo) and len(hi) else None
            got = final[f"fan_out_ratio_layer{li}"]
            assert (got is None) if expected is None else got == pytest.approx(expected, rel=1e-5)
            defined += expected is not None
    assert defined >= 2
    pruning = json.loads((exp_dir / "mult2" / "seed0" / "final.json").read_text())["pruning"]
    assert set(pruning["steps"].values()) == {math.ceil(2000 / 64)}  # prune_epochs x steps an epoch, each
    assert set(pruning["steps"]) == {"lucky_finetuned", "random_finetuned", "reinit", "lucky_rewound"}
