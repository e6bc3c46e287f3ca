"""Greedy layerwise learning: invertible downsampling, frozen blocks, cached prefix, aux classifier."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backproplab.data import load_dataset
from backproplab.methods.layerwise import (AuxClassifier, GreedyLayerwiseTrainer, InvertibleDownsample,
                                           LayerwiseCNN, pixel_unshuffle_order, probe)
from backproplab.train import TrainConfig


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 5, 4, 4)])
def test_invertible_downsampling_2d_round_trip_and_pixel_unshuffle(shape):
    x = torch.randn(*shape)
    down = InvertibleDownsample(2)
    y = down(x)
    assert y.shape == (shape[0], 4 * shape[1], shape[2] // 2, shape[3] // 2)
    assert torch.equal(down.inverse(y), x)
    assert torch.equal(y, nn.PixelUnshuffle(2)(x)[:, pixel_unshuffle_order(shape[1])])
    # channel s*C + c holds pixel (2h + i, 2w + j) of channel c, s = 2i + j
    c, i, j = 1 % shape[1], 1, 0
    assert torch.equal(y[:, (2 * i + j) * shape[1] + c], x[:, c, i::2, j::2])


def test_invertible_downsampling_1d_round_trip():
    x = torch.randn(3, 4, 10)
    down = InvertibleDownsample(1)
    y = down(x)
    assert y.shape == (3, 8, 5) and torch.equal(down.inverse(y), x)
    assert torch.equal(y[:, :4], x[:, :, 0::2]) and torch.equal(y[:, 4:], x[:, :, 1::2])
    with pytest.raises(ValueError, match="even"):
        down(torch.randn(1, 1, 5))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_aux_classifier_has_k_minus_1_conv_layers(k):
    aux = AuxClassifier(16, 10, k, dims=2)
    assert aux.conv_layers == k - 1
    assert aux(torch.randn(2, 16, 5, 5)).shape == (2, 10)
    model = LayerwiseCNN((1, 8, 8), 10, k=k)
    assert all(a.conv_layers == k - 1 for a in model.aux)


def test_downsampling_block_maps_4c_to_2c_and_the_trunk_has_no_pooling():
    model = LayerwiseCNN((3, 16, 16), 10, widths=(8, 16, 16, 32), downsample=(1, 3))
    conv1 = model.blocks[1][1]
    assert conv1.in_channels == 4 * 8 and conv1.out_channels == 2 * 8
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) or getattr(m, "stride", (1, 1)) not in ((1, 1), 1)
                   for b in model.blocks for m in b.modules() if not isinstance(m, InvertibleDownsample))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", n_train=300)


@pytest.mark.medium
def test_frozen_blocks_get_no_gradient_and_keep_their_statistics(digits):
    torch.manual_seed(0)
    model = LayerwiseCNN(digits.input_shape, 10, widths=(8, 16, 16), downsample=(1,), k=1)
    trainer = GreedyLayerwiseTrainer(model, TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, epochs=2,
                                                        batch_size=50))
    trainer.train_stage(0, digits)
    frozen = {k: v.clone() for k, v in model.blocks[0].state_dict().items()}  # weights and BN buffers

    seen = []

    class CheckGrads:
        def on_step_end(self, state):
            seen.append(all(p.grad is None for p in model.blocks[0].parameters()))

    for cache in (True, False):
        trainer.cache_prefix, trainer.callbacks = cache, [CheckGrads()]
        trainer.train_stage(1, digits)
        after = model.blocks[0].state_dict()
        assert all(torch.equal(frozen[k], after[k]) for k in frozen), cache
    assert seen and all(seen)
    assert not any(p.requires_grad for p in model.blocks[0].parameters())


@pytest.mark.medium
def test_cached_prefix_equals_recomputing(digits):
    def run(cache):
        torch.manual_seed(0)
        model = LayerwiseCNN(digits.input_shape, 10, widths=(8, 16, 16), downsample=(1,), k=2)
        trainer = GreedyLayerwiseTrainer(model, TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, epochs=2,
                                                            batch_size=50), cache_prefix=cache)
        records = trainer.train(digits)
        return model, records

    (a, ra), (b, rb) = run(True), run(False)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert [r["test_acc"] for r in ra] == pytest.approx([r["test_acc"] for r in rb], abs=1e-2)


@pytest.mark.medium
def test_linear_probe_is_converged_logistic_regression(digits):
    """The probe equals scikit-learn's multinomial logistic regression (an independent solver) on the same
    standardised, frozen features: same held-out accuracy, and its gradient is below the tolerance."""
    from sklearn.linear_model import LogisticRegression

    from backproplab.methods.layerwise import linear_probe

    torch.manual_seed(0)
    model = LayerwiseCNN(digits.input_shape, 10, widths=(8, 16), downsample=(1,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = probe(model, 2, digits, None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.eval()
        avg = nn.AdaptiveAvgPool2d(2)
        ftr, fte = avg(model.features(digits.x_train)).flatten(1), avg(model.features(digits.x_test)).flatten(1)
    result = linear_probe(ftr, digits.y_train, fte, digits.y_test, 10)
    assert result["converged"] and result["grad_norm"] <= 1e-4 and result["acc"] == acc
    mean, std = ftr.mean(0), ftr.std(0).clamp_min(1e-8)
    n = len(ftr)
    reference = LogisticRegression(C=1 / (1e-4 * n), tol=1e-10, max_iter=10_000).fit(
        ((ftr - mean) / std).double().numpy(), digits.y_train.numpy())
    sk_acc = reference.score(((fte - mean) / std).double().numpy(), digits.y_test.numpy())
    assert abs(sk_acc - acc) <= 2 / len(fte)
    # stopped early (what 5 epochs of Adam amounted to), the probe is not converged and says so
    assert not linear_probe(ftr, digits.y_train, fte, digits.y_test, 10, max_iter=3)["converged"]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_aux_classifier_batchnorm_follows_the_paper(k):
    aux = AuxClassifier(16, 10, k, dims=2)
    norms = [m for m in aux if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert len(norms) == (0 if k == 1 else k)  # one after each aux conv, one before the linear layer
    if k > 1:
        assert isinstance(aux[-2], nn.BatchNorm1d) and isinstance(aux[1], nn.BatchNorm2d)
    assert len([m for m in AuxClassifier(16, 10, k, dims=2, batchnorm=False)
                if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]) == 0


def test_every_arms_lr_decay_fits_its_own_budget():
    """End-to-end training runs blocks x epochs_per_block epochs: its schedule must make as many decays at
    the same fractions of its run as a greedy stage makes over its epochs."""
    from backproplab.experiments.layerwise import LayerwiseConfig, decay_schedule

    cfg = LayerwiseConfig()
    budgets = {"greedy": cfg.epochs_per_block, "e2e": cfg.epochs_per_block * len(cfg.widths)}
    lr_at = {kind: [cfg.decay_factor ** (e // decay_schedule(cfg, kind).every) for e in range(epochs)]
             for kind, epochs in budgets.items()}
    for kind, epochs in budgets.items():  # the lr at each tenth of the run
        lr_at[kind] = [lr_at[kind][int(f * epochs / 10)] for f in range(10)]
    assert lr_at["e2e"] == lr_at["greedy"]
    assert min(lr_at["e2e"]) >= cfg.decay_factor ** 1  # not 0.2^7 for most of the run


@pytest.mark.medium
def test_trainer_takes_a_list_of_blocks_and_leaves_every_parameter_trainable(digits):
    """Plain nn.Sequential stages with their own heads train exactly as the same modules in a LayerwiseCNN."""
    from torch import nn

    from backproplab.methods.layerwise import BlockStack

    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, epochs=1, batch_size=50)
    torch.manual_seed(0)
    reference = LayerwiseCNN(digits.input_shape, 10, widths=(8, 16), downsample=(1,), k=1)
    blocks = [nn.Sequential(*b) for b in copy.deepcopy(list(reference.blocks))]
    heads = [nn.Sequential(*a) for a in copy.deepcopy(list(reference.aux))]
    expected = GreedyLayerwiseTrainer(reference, cfg).train(digits)
    trainer = GreedyLayerwiseTrainer(blocks, cfg, aux=heads)
    got = trainer.train(digits)
    assert isinstance(trainer.model, BlockStack) and trainer.model.blocks[0] is blocks[0]
    assert [r["test_acc"] for r in got] == [r["test_acc"] for r in expected]
    for a, b in zip(reference.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)
    assert all(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in trainer.model.parameters())
    with pytest.raises(TypeError, match="aux="):
        GreedyLayerwiseTrainer(blocks, cfg)
    with pytest.raises(ValueError, match="one auxiliary classifier per block"):
        GreedyLayerwiseTrainer(blocks, cfg, aux=heads[:1])


@pytest.mark.medium
def test_trainer_takes_a_dataloader_and_trains_as_a_hand_written_greedy_loop(digits):
    """GreedyLayerwiseTrainer.train(loader, eval_data=...) (it failed on a DataLoader: no x_test) equals the
    greedy loop written by hand over the same batches: block j and its head by SGD on CE(aux_j(block_j(prefix
    (x)))), the prefix frozen in eval mode; each record's accuracy is that of the truncated net on eval_data."""
    from torch.utils.data import DataLoader, TensorDataset

    from backproplab.train import cross_entropy, evaluate

    cfg = TrainConfig(optimizer="sgd", lr=0.2, momentum=0.0, epochs=2, batch_size=50)
    torch.manual_seed(0)
    model = LayerwiseCNN(digits.input_shape, 10, widths=(8, 16), downsample=(1,), k=1)
    reference = copy.deepcopy(model)
    loader = DataLoader(TensorDataset(digits.x_train, digits.y_train), batch_size=50)
    test = DataLoader(TensorDataset(digits.x_test, digits.y_test), batch_size=100)
    records = GreedyLayerwiseTrainer(model, cfg).train(loader, eval_data=test)

    for j in range(2):
        for b in reference.blocks[:j]:
            b.requires_grad_(False).eval()
        params = [*reference.blocks[j].parameters(), *reference.aux[j].parameters()]
        opt = torch.optim.SGD(params, lr=0.2)
        for x, y in [batch for _ in range(2) for batch in loader]:
            h = x
            for b in reference.blocks[:j]:
                h = b(h)
            opt.zero_grad()
            F.cross_entropy(reference.aux[j](reference.blocks[j](h)), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for j, record in enumerate(records):
        expected = evaluate(model.truncated(j + 1), digits.x_test, digits.y_test, cross_entropy)
        assert record["depth"] == j + 1 and record["test_acc"] == pytest.approx(expected["acc"], abs=1e-12)
    assert records[-1]["test_acc"] > 0.5
    assert "test_acc" not in GreedyLayerwiseTrainer(copy.deepcopy(reference), cfg).train(loader)[0]
