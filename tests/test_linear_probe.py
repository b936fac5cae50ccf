"""The linear-probe solver against independent values: hand-computed metrics, scikit-learn, numpy BN stats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from evalsuite.errors import BadData, BadFeatures, UserError
from tasks.linear.probe import (
    LinearProbe,
    ProbeConfig,
    build_probe,
    cross_entropy,
    epoch_batches,
    evaluate_probe,
    lr_at,
    param_groups,
    predict_logits,
    topk_accuracy,
    total_iterations,
    train_linear_probe,
)
from tasks.linear.task import imagenet_task
from tasks.linear.task import task as places_task


def blobs(n_per_class: int, dim: int, classes: int, sep: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes around random centres; returned as the cache's fp16."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(0, 1, (classes, dim)) * sep
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + rng.normal(0, 1, (len(y), dim)) + 3.0  # an offset the BatchNorm must remove
    return x.astype(np.float16), y.astype(np.int64)


# ---------------------------------------------------------------------------- metrics


def test_topk_accuracy_hand_computed():
    logits = np.array([
        [0.1, 0.9, 0.0, 0.0],   # true 1: rank 0 -> top1 and top2
        [0.5, 0.2, 0.3, 0.4],   # true 2: classes 0 and 3 above -> rank 2: only top3
        [0.2, 0.2, 0.2, 0.2],   # true 3: all tied -> rank 0 (ties count for the sample)
        [0.0, 1.0, 2.0, 3.0],   # true 0: three above -> rank 3: only top4
    ])
    labels = np.array([1, 2, 3, 0])
    acc = topk_accuracy(logits, labels, ks=(1, 2, 3, 4, 5))
    assert acc == {1: 0.5, 2: 0.5, 3: 0.75, 4: 1.0, 5: 1.0}


def test_cross_entropy_hand_computed():
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0]])
    # p(true) = 1/2 and 3/4
    assert cross_entropy(logits, np.array([1, 0])) == pytest.approx(-(np.log(0.5) + np.log(0.75)) / 2)


def test_lr_schedule_steps_at_milestones():
    cfg = ProbeConfig(epochs=14, lr=0.01, lr_milestones=(4, 8, 12), lr_gamma=0.1, batch_size=10)
    ipe = 5
    assert lr_at(0, ipe, cfg) == pytest.approx(0.01)
    assert lr_at(19, ipe, cfg) == pytest.approx(0.01)      # last iteration of epoch 4
    assert lr_at(20, ipe, cfg) == pytest.approx(0.001)     # first iteration of epoch 5
    assert lr_at(40, ipe, cfg) == pytest.approx(1e-4)
    assert lr_at(69, ipe, cfg) == pytest.approx(1e-5)
    assert total_iterations(50, cfg) == 70


def test_dino21_lr_is_scaled_by_batch_and_follows_a_per_epoch_cosine():
    """eval_linear.py: lr = 0.001 x (128 per GPU x 8 GPUs) / 256 = 0.004, CosineAnnealingLR(100, eta_min=0) stepped
    after every epoch: lr_e = 0.004 (1 + cos(pi e / 100)) / 2, constant within an epoch."""
    cfg = ProbeConfig.from_protocol(imagenet_task.default_protocol("dino21"))
    assert (cfg.lr, cfg.batch_size, cfg.lr_base_batch, cfg.scaled_lr) == (0.001, 1024, 256, 0.004)
    ipe = 1281167 // 1024  # 1251 full batches of ImageNet-1k's train split
    assert lr_at(0, ipe, cfg) == lr_at(ipe - 1, ipe, cfg) == pytest.approx(0.004, rel=1e-12)
    assert lr_at(ipe, ipe, cfg) == pytest.approx(0.0039990131207, rel=1e-10)  # 0.002 (1 + cos(pi / 100))
    assert lr_at(50 * ipe, ipe, cfg) == pytest.approx(0.002, rel=1e-12)
    assert lr_at(99 * ipe + 7, ipe, cfg) == pytest.approx(9.8687927e-7, rel=1e-7)  # 0.002 (1 + cos(0.99 pi))
    # the same numbers as torch's CosineAnnealingLR over the 100 epochs
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.004)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 100, eta_min=0)
    for epoch in range(100):
        assert lr_at(epoch * ipe, ipe, cfg) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()
    # the step schedule scales the same way when asked to
    step = ProbeConfig(lr=0.1, batch_size=512, lr_base_batch=256, lr_milestones=(1,), epochs=2)
    assert (lr_at(0, 10, step), lr_at(10, 10, step)) == (pytest.approx(0.2), pytest.approx(0.02))
    with pytest.raises(UserError, match="lr_base_batch must be >= 1"):
        ProbeConfig(lr_base_batch=0)


def test_dino21_head_trains_like_eval_linears_sgd_by_hand():
    """No BatchNorm, N(0, 0.01^2) weights and zero bias, SGD momentum 0.9 without Nesterov or weight decay, the
    cosine lr: two full-batch epochs recomputed with numpy (softmax cross-entropy gradients, momentum buffer)."""
    x, y = blobs(4, 6, 3, sep=1.0, seed=5)
    p = imagenet_task.default_protocol("dino21").replace(epochs=2, batch_size=12, lr=0.5, lr_base_batch=6)
    cfg = ProbeConfig.from_protocol(p, seed=2)  # scaled lr 1.0, then 0.5 in epoch 2
    init = build_probe(6, 3, cfg)
    assert init.bn is None and float(init.fc.bias.detach().abs().max()) == 0.0
    w, b = init.fc.weight.detach().double().numpy(), init.fc.bias.detach().double().numpy()
    fit = train_linear_probe(x, y, 3, cfg, progress=False)
    xf, onehot = x.astype(np.float64), np.eye(3)[y]
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for lr in (1.0, 0.5):
        z = xf @ w.T + b
        prob = np.exp(z - z.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        g = (prob - onehot) / len(y)
        vw, vb = 0.9 * vw + g.T @ xf, 0.9 * vb + g.sum(0)
        w, b = w - lr * vw, b - lr * vb
    assert [h["lr"] for h in fit.history] == pytest.approx([1.0, 0.5])
    np.testing.assert_allclose(fit.model.fc.weight.detach().numpy(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fit.model.fc.bias.detach().numpy(), b, rtol=1e-5, atol=1e-6)


def test_per_epoch_evaluation_is_kept_in_the_history_and_survives_a_resume(tmp_path):
    x, y = blobs(10, 6, 3, sep=0.5, seed=1)
    cfg = ProbeConfig(epochs=4, batch_size=8, lr=0.05, lr_milestones=(3,), bn="feature", seed=1)

    def evaluate(model):
        return {"val_top1": topk_accuracy(predict_logits(model, x), y, (1,))[1]}

    full = train_linear_probe(x, y, 3, cfg, progress=False, evaluate=evaluate)
    plain = train_linear_probe(x, y, 3, cfg, progress=False)
    for k, v in full.model.state_dict().items():  # evaluating does not change the training
        assert torch.equal(v, plain.model.state_dict()[k]), k

    def stop(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_linear_probe(x, y, 3, cfg, state_path=tmp_path / "s.pt", progress=False, evaluate=evaluate,
                           on_epoch_end=stop)
    with pytest.raises(UserError, match="evaluated_each_epoch=True"):
        train_linear_probe(x, y, 3, cfg, state_path=tmp_path / "s.pt", progress=False)
    resumed = train_linear_probe(x, y, 3, cfg, state_path=tmp_path / "s.pt", progress=False, evaluate=evaluate)
    assert resumed.resumed_from_epoch == 2
    assert [h["val_top1"] for h in resumed.history] == [h["val_top1"] for h in full.history]
    assert len(full.history) == 4


def test_epoch_batches_are_seeded_permutations():
    a = epoch_batches(10, 3, seed=7, epoch=0)
    assert [len(b) for b in a] == [3, 3, 3]  # incomplete last batch dropped
    assert len(np.unique(np.concatenate(a))) == 9
    assert all((x == y).all() for x, y in zip(a, epoch_batches(10, 3, seed=7, epoch=0)))
    assert not all((x == y).all() for x, y in zip(a, epoch_batches(10, 3, seed=7, epoch=1)))
    assert [len(b) for b in epoch_batches(4, 256, 0, 0)] == [4]  # fewer rows than a batch: one batch of all


# ---------------------------------------------------------------------------- accuracy vs scikit-learn


def test_probe_matches_sklearn_logistic_regression():
    xtr, ytr = blobs(100, 16, 4, sep=0.5, seed=0)
    xte, yte = blobs(100, 16, 4, sep=0.5, seed=1)
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(xtr.astype(np.float32), ytr)
    ref_acc = float((ref.predict(xte.astype(np.float32)) == yte).mean())
    cfg = ProbeConfig(epochs=15, batch_size=40, lr=0.1, lr_milestones=(10,), weight_decay=1e-4, bn="feature")
    fit = train_linear_probe(xtr, ytr, 4, cfg, progress=False)
    acc = evaluate_probe(fit.model, xte, yte, ks=(1,))["topk"][1]
    assert 0.75 < ref_acc < 0.95  # a problem where accuracy is informative
    assert acc == pytest.approx(ref_acc, abs=0.03)
    losses = [h["loss"] for h in fit.history]
    assert losses[-1] < losses[0]


def test_noise_features_score_near_chance():
    rng = np.random.default_rng(3)
    xtr = rng.normal(size=(400, 32)).astype(np.float16)
    xva = rng.normal(size=(800, 32)).astype(np.float16)
    ytr, yva = rng.integers(0, 4, 400), rng.integers(0, 4, 800)
    cfg = ProbeConfig(epochs=10, batch_size=32, lr=0.05, lr_milestones=(8,), bn="feature")
    fit = train_linear_probe(xtr, ytr, 4, cfg, progress=False)
    acc = evaluate_probe(fit.model, xva, yva, ks=(1,))["topk"][1]
    assert abs(acc - 0.25) < 0.07  # ~4.6 binomial standard deviations at n=800


# ---------------------------------------------------------------------------- BatchNorm (affine off)


def ema_stats(x: np.ndarray, batches, channels: int, momentum: float) -> tuple[np.ndarray, np.ndarray]:
    """Running mean / unbiased variance exactly as specified, computed independently in float64."""
    mean, var = np.zeros(channels), np.ones(channels)
    for idx in batches:
        b = x[idx].astype(np.float64).reshape(len(idx), channels, -1)  # (B, C, L)
        vals = b.transpose(1, 0, 2).reshape(channels, -1)
        mean = (1 - momentum) * mean + momentum * vals.mean(axis=1)
        var = (1 - momentum) * var + momentum * vals.var(axis=1, ddof=1)
    return mean, var


@pytest.mark.parametrize("mode,channels", [("channel", 4), ("feature", None)])
def test_batchnorm_running_stats_and_eval_output(mode, channels):
    rng = np.random.default_rng(0)
    # 4 channels x 3 grid cells, channel c with mean 10*c and std c+1
    scale = np.repeat(np.arange(1, 5), 3)
    x = (rng.normal(size=(64, 12)) * scale + 10 * np.repeat(np.arange(4), 3)).astype(np.float16)
    y = rng.integers(0, 3, 64)
    cfg = ProbeConfig(epochs=3, batch_size=16, lr=0.01, lr_milestones=(), bn=mode, bn_momentum=0.1, seed=5)
    fit = train_linear_probe(x, y, 3, cfg, channels=channels, progress=False)
    bn = fit.model.bn
    assert list(bn.parameters()) == []  # affine off: nothing learnable but the linear layer
    batches = [b for e in range(3) for b in epoch_batches(64, 16, 5, e)]
    exp_mean, exp_var = ema_stats(x, batches, channels or 12, 0.1)
    assert bn.running_mean.shape == (channels or 12,)
    np.testing.assert_allclose(bn.running_mean.numpy(), exp_mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.running_var.numpy(), exp_var, rtol=1e-4, atol=1e-4)
    # evaluation uses the running statistics, shared by every grid cell of a channel in "channel" mode
    with torch.no_grad():
        z = fit.model.normalize(torch.from_numpy(x[:5].astype(np.float32))).numpy()
    rep = 3 if mode == "channel" else 1
    m, v = np.repeat(exp_mean, rep), np.repeat(exp_var, rep)
    np.testing.assert_allclose(z, (x[:5].astype(np.float64) - m) / np.sqrt(v + 1e-5), rtol=1e-3, atol=1e-3)
    w, b = fit.model.fc.weight.detach().numpy(), fit.model.fc.bias.detach().numpy()
    np.testing.assert_allclose(predict_logits(fit.model, x[:5]), z @ w.T + b, rtol=1e-4, atol=1e-4)


def test_probe_init_is_seeded_gaussian_with_zero_bias():
    cfg = ProbeConfig(init_std=0.01, seed=3)
    a, b = build_probe(5000, 20, cfg, channels=50), build_probe(5000, 20, cfg, channels=50)
    assert torch.equal(a.fc.weight, b.fc.weight)
    assert float(a.fc.weight.detach().std()) == pytest.approx(0.01, rel=0.02)
    assert float(a.fc.bias.detach().abs().max()) == 0.0


def test_vissl_head_is_affine_batchnorm_with_pytorch_default_linear_init():
    # VISSL eval_mlp: nn.BatchNorm2d(in_channels) (affine, scale 1 / shift 0) + nn.Linear with its default init,
    # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight, the same bound for the bias
    cfg = ProbeConfig.from_protocol(places_task.default_protocol("vissl"), seed=4)
    dim, classes, channels = 4096, 64, 64
    model = build_probe(dim, classes, cfg, channels=channels)
    bn = model.bn
    assert [tuple(p.shape) for p in bn.parameters()] == [(channels,), (channels,)]
    assert torch.equal(bn.weight.detach(), torch.ones(channels))
    assert torch.equal(bn.bias.detach(), torch.zeros(channels))
    assert (bn.eps, bn.momentum) == (1e-5, 0.1)
    bound = 1 / np.sqrt(dim)
    w, b = model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()
    assert w.shape == (classes, dim) and b.shape == (classes,)
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert w.std() == pytest.approx(bound / np.sqrt(3), rel=0.01)  # uniform(-a, a) has std a / sqrt(3)
    assert abs(w.mean()) < 1e-4 and np.abs(b).min() > 0 and b.std() > bound / 4
    assert torch.equal(build_probe(dim, classes, cfg, channels=channels).fc.weight, model.fc.weight)  # seeded
    # goyal19 (fair_ssb): BN without scale/shift, N(0, 0.01^2) weights, zero bias
    g = build_probe(dim, classes, ProbeConfig.from_protocol(places_task.default_protocol("goyal19")), channels=channels)
    assert list(g.bn.parameters()) == []
    assert float(g.fc.weight.detach().std()) == pytest.approx(0.01, rel=0.02)
    assert float(g.fc.bias.detach().abs().max()) == 0.0


def test_batchnorm_scale_and_shift_are_learnt_but_never_decayed():
    model = LinearProbe(12, 3, channels=4, bn="channel", affine=True)
    groups = param_groups(model, 5e-4)
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(2, 5e-4), (2, 0.0)]
    assert groups[0]["params"][0] is model.fc.weight and groups[1]["params"][0] is model.bn.weight
    # behaviour: all-zero features normalise to 0, so the BN scale gets no gradient; only weight decay could
    # move it. A huge decay leaves it at exactly 1 while the shift (which the loss reaches) is learnt.
    y = np.arange(24) % 3
    cfg = ProbeConfig(epochs=3, batch_size=8, lr=0.1, lr_milestones=(), weight_decay=0.5, bn="channel",
                      bn_affine=True, init="pytorch_default")
    fit = train_linear_probe(np.zeros((24, 12), np.float16), y, 3, cfg, channels=4, progress=False)
    assert torch.equal(fit.model.bn.weight.detach(), torch.ones(4))
    assert float(fit.model.bn.bias.detach().abs().max()) > 0


def test_each_epoch_trains_on_view_e_mod_k(monkeypatch):
    # K = 3 views of 32 rows told apart by an offset; the probe must see view e mod 3 in epoch e, and only the
    # view in use is loaded (a view function runs when training reaches its epochs)
    base, y = blobs(8, 6, 4, sep=1.0, seed=0)
    views = [(base.astype(np.float32) + 10 * v).astype(np.float16) for v in range(3)]
    loads = []

    def loader(v):
        def load():
            loads.append(v)
            return views[v]
        return load

    seen: list[torch.Tensor] = []
    real_forward = LinearProbe.forward

    def spy(self, x):
        if self.training:
            seen.append(x.detach().clone())
        return real_forward(self, x)

    monkeypatch.setattr(LinearProbe, "forward", spy)
    cfg = ProbeConfig(epochs=5, batch_size=8, lr_milestones=(), bn="feature", seed=2)
    fit = train_linear_probe([loader(v) for v in range(3)], y, 4, cfg, progress=False)
    assert loads == [0, 1, 2, 0, 1]
    assert fit.views == 3 and [h["view"] for h in fit.history] == [0, 1, 2, 0, 1]
    batches = [(e, idx) for e in range(5) for idx in epoch_batches(32, 8, 2, e)]
    assert len(seen) == len(batches) == 20
    for (epoch, idx), x in zip(batches, seen):
        np.testing.assert_array_equal(x.numpy(), views[epoch % 3][idx].astype(np.float32))
    with pytest.raises(BadFeatures, match=r"train features \(view 1\) have shape \(32, 5\)"):
        train_linear_probe([views[0], views[1][:, :5]], y, 4, cfg, progress=False)


def test_views_resume_to_the_same_weights(tmp_path):
    base, y = blobs(10, 6, 3, sep=0.5, seed=1)
    views = [(base.astype(np.float32) * (1 + 0.1 * v)).astype(np.float16) for v in range(3)]
    cfg = ProbeConfig(epochs=4, batch_size=8, lr=0.05, lr_milestones=(3,), bn="feature", seed=1)
    full = train_linear_probe(views, y, 3, cfg, progress=False)

    def stop(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_linear_probe(views, y, 3, cfg, state_path=tmp_path / "s.pt", progress=False, on_epoch_end=stop)
    with pytest.raises(UserError, match=r"views=3 \(now 2\)"):
        train_linear_probe(views[:2], y, 3, cfg, state_path=tmp_path / "s.pt", progress=False)
    resumed = train_linear_probe(views, y, 3, cfg, state_path=tmp_path / "s.pt", progress=False)
    assert resumed.resumed_from_epoch == 2
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


# ---------------------------------------------------------------------------- resume


def test_resume_after_interruption_gives_the_same_weights(tmp_path):
    x, y = blobs(30, 24, 3, sep=0.5, seed=0)
    cfg = ProbeConfig(epochs=5, batch_size=16, lr=0.05, lr_milestones=(3,), bn="channel", seed=11)
    full = train_linear_probe(x, y, 3, cfg, channels=6, state_path=tmp_path / "a.pt", progress=False)

    def stop_at_2(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_linear_probe(x, y, 3, cfg, channels=6, state_path=tmp_path / "b.pt", progress=False,
                           on_epoch_end=stop_at_2)
    resumed = train_linear_probe(x, y, 3, cfg, channels=6, state_path=tmp_path / "b.pt", progress=False)
    assert resumed.resumed_from_epoch == 2
    assert full.resumed_from_epoch == 0
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert len(resumed.history) == 5


def test_state_of_other_settings_is_refused_naming_them(tmp_path):
    x, y = blobs(20, 8, 2, sep=1.0, seed=0)
    cfg = ProbeConfig(epochs=2, batch_size=8, lr_milestones=(), bn="feature")
    state = tmp_path / "s.pt"
    done = train_linear_probe(x, y, 2, cfg, state_path=state, settings={"tap": "res5"}, progress=False)
    again = train_linear_probe(x, y, 2, cfg, state_path=state, settings={"tap": "res5"}, progress=False)
    assert again.resumed_from_epoch == 2 and again.history == done.history  # nothing left to train
    with pytest.raises(UserError, match=r"linear probe resume state .*: tap='res5' \(now 'res4'\)"):
        train_linear_probe(x, y, 2, cfg, state_path=state, settings={"tap": "res4"}, progress=False)
    with pytest.raises(UserError, match=r"config\.lr=0\.01 \(now 0\.02\)"):
        train_linear_probe(x, y, 2, ProbeConfig(epochs=2, batch_size=8, lr=0.02, lr_milestones=(), bn="feature"),
                           state_path=state, settings={"tap": "res5"}, progress=False)
    other = x.copy()
    other[5] += np.float16(1)
    with pytest.raises(UserError, match=r"features=") as e:
        train_linear_probe(other, y, 2, cfg, state_path=state, settings={"tap": "res5"}, progress=False)
    assert "tap=" not in str(e.value) and "config" not in str(e.value)
    with pytest.raises(UserError, match=r"features="):
        train_linear_probe(x, 1 - y, 2, cfg, state_path=state, settings={"tap": "res5"}, progress=False)


def test_corrupt_state_is_reported_in_one_line_and_training_starts_over(tmp_path, capsys):
    x, y = blobs(20, 8, 2, sep=1.0, seed=0)
    cfg = ProbeConfig(epochs=2, batch_size=8, lr_milestones=(), bn="feature")
    reference = train_linear_probe(x, y, 2, cfg, progress=False)
    state = tmp_path / "bad.pt"
    state.write_bytes(b"not a torch file")
    capsys.readouterr()
    fit = train_linear_probe(x, y, 2, cfg, state_path=state, progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreadable linear probe resume state" in err[0] and str(state) in err[0]
    assert fit.resumed_from_epoch == 0 and fit.epochs_run == 2
    assert [h["loss"] for h in fit.history] == [h["loss"] for h in reference.history]
    # the state written over it is a valid one: the next call resumes from it
    assert train_linear_probe(x, y, 2, cfg, state_path=state, progress=False).resumed_from_epoch == 2


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    x, y = blobs(10, 8, 2, sep=1.0, seed=0)
    cfg = ProbeConfig(epochs=1, batch_size=4, lr_milestones=(), bn="feature")
    nan = x.copy()
    nan[7, 3] = np.nan
    with pytest.raises(BadFeatures, match="train features contain NaN/Inf .*row 7"):
        train_linear_probe(nan, y, 2, cfg, progress=False)
    with pytest.raises(BadData, match="label 5 at sample 0 is outside the class range 0..1"):
        train_linear_probe(x, np.full(len(y), 5), 2, cfg, progress=False)
    with pytest.raises(BadData, match="label -1"):
        train_linear_probe(x, np.r_[y[:-1], -1], 2, cfg, progress=False)
    with pytest.raises(BadData, match="empty"):
        train_linear_probe(x[:0], y[:0], 2, cfg, progress=False)
    with pytest.raises(BadData, match="expected 20 labels"):
        train_linear_probe(x, y[:5], 2, cfg, progress=False)
    fit = train_linear_probe(x, y, 2, cfg, progress=False)
    with pytest.raises(BadFeatures, match="val features contain NaN"):
        evaluate_probe(fit.model, nan, y)
    with pytest.raises(BadData, match="val labels"):
        evaluate_probe(fit.model, x, y + 2)
    with pytest.raises(BadFeatures, match="not a multiple"):
        train_linear_probe(x, y, 2, ProbeConfig(epochs=1, bn="channel"), channels=3, progress=False)
    with pytest.raises(UserError, match="bn mode"):
        ProbeConfig(bn="group")
    with pytest.raises(UserError, match="increasing"):
        ProbeConfig(lr_milestones=(8, 4))


def test_diverging_training_is_reported_not_recorded():
    x, y = blobs(20, 8, 2, sep=1.0, seed=0)
    cfg = ProbeConfig(epochs=3, batch_size=8, lr=1e30, lr_milestones=(), bn="none")
    with pytest.raises(BadFeatures, match="training loss became"):
        train_linear_probe(x * np.float16(100), y, 2, cfg, progress=False)
