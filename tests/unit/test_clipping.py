"""Clip strategies against their references, on real models and real optimizers.

References: torch's own clip functions; a plain loop of each paper's algorithm; timm's AGC
formula (re-implemented below, timm needs torchvision); the ``autoclip`` and ``zclip`` pip
packages (installed with ``--no-deps``; the tests that need them skip without them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from tests.models import digits, mlp
from tests.strategies import assert_covers
from tests.syncs import count_syncs

THRESHOLD = "gradguard/clip/threshold"
COEF = "gradguard/clip/coef"
CLIPPED = "gradguard/clip/clipped_steps"


def make_model(seed: int = 0, sizes: tuple[int, ...] = (64, 32, 32, 10)) -> nn.Sequential:
    torch.manual_seed(seed)
    return mlp(list(sizes))


def batches(
    steps: int, seed: int = 0, size: int = 32
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    x, y = digits()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (size,), generator=gen)
        yield x[idx], y[idx]


def guard_for(
    model: nn.Module, opt: torch.optim.Optimizer, clip: object, **kw: object
) -> tuple[gg.GradGuard, gg.MemorySink]:
    sink = gg.MemorySink()
    kw.setdefault("activations", False)
    kw.setdefault("log_every_n_steps", 1)
    kw.setdefault("detectors", [])  # the depth-profile detectors are not under test here
    kw.setdefault("on_spike", "ignore")  # the spikes below are deliberate: not under test
    guard = gg.attach(model, opt, clip=clip, sinks=[sink], **kw)  # type: ignore[arg-type]
    return guard, sink


def series(sink: gg.MemorySink, key: str) -> list[float]:
    return [value for _, value in sink.scalars[key]]


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_scale: float = 1.0) -> None:
    (nn.functional.cross_entropy(model(x), y) * loss_scale).backward()


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def total_norm(model: nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads_of(model)])))


def assert_params_close(a: nn.Module, b: nn.Module, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------ NormClip / ValueClip
def torch_clipped(
    model: nn.Module, clip: Callable[[list[torch.Tensor]], object]
) -> list[torch.Tensor]:
    """What torch's clip function makes of the model's current gradients (on copies)."""
    copies = []
    for p in model.parameters():
        copy = p.detach().clone().requires_grad_()
        copy.grad = p.grad.detach().clone()
        copies.append(copy)
    clip(copies)
    return [c.grad for c in copies]


@pytest.mark.parametrize(
    "make_clip", [lambda: 0.5, lambda: gg.NormClip(0.5)], ids=["float", "NormClip"]
)
def test_normclip_equals_clip_grad_norm(make_clip: Callable[[], object], bookkeeping: str) -> None:
    clip = make_clip()
    ours, ref = make_model(), make_model()
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-2)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    _, sink = guard_for(ours, opt_ours, clip)
    coefs = []
    for x, y in batches(15):
        opt_ours.zero_grad()
        backward(ours, x, y)
        expected = torch_clipped(ours, lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5))
        opt_ours.step()
        for got, want in zip(grads_of(ours), expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
        opt_ref.zero_grad()
        backward(ref, x, y)
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        coefs.append(min(1.0, 0.5 / (float(norm) + 1e-6)))
        opt_ref.step()
    assert_params_close(ours, ref, rtol=1e-5, atol=1e-7)
    assert series(sink, COEF) == pytest.approx(coefs, rel=1e-5)
    assert series(sink, THRESHOLD) == [0.5] * 15
    assert series(sink, CLIPPED)[-1] == sum(c < 1 for c in coefs) > 0


def clip_each_layer(model: nn.Module, params: list[torch.Tensor], max_norm: float) -> None:
    start = 0
    for layer in model:
        count = len(list(layer.parameters()))
        if count:
            torch.nn.utils.clip_grad_norm_(params[start : start + count], max_norm)
            start += count


def test_normclip_per_layer_clips_each_layer_on_its_own(bookkeeping: str) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, sink = guard_for(model, opt, gg.NormClip(0.2, per_layer=True))
    for x, y in batches(10):
        opt.zero_grad()
        backward(model, x, y)
        before = total_norm(model)
        expected = torch_clipped(model, lambda ps: clip_each_layer(model, ps, 0.2))
        opt.step()
        for got, want in zip(grads_of(model), expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
        after = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in expected])))
        assert sink.latest(COEF) == pytest.approx(after / before, rel=1e-5)
    assert series(sink, CLIPPED)[-1] == 10


def test_valueclip_equals_clip_grad_value() -> None:
    ours, ref = make_model(), make_model()
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    _, sink = guard_for(ours, opt_ours, gg.ValueClip(0.01))
    for x, y in batches(10):
        opt_ours.zero_grad()
        backward(ours, x, y)
        opt_ours.step()
        opt_ref.zero_grad()
        backward(ref, x, y)
        before = total_norm(ref)
        torch.nn.utils.clip_grad_value_(ref.parameters(), 0.01)
        after = total_norm(ref)
        opt_ref.step()
        assert sink.latest(COEF) == pytest.approx(after / before, rel=1e-5)
        assert THRESHOLD not in sink.scalars  # no single norm limit: nothing to draw
    for pa, pb in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(pa, pb)


# ------------------------------------------------------------------ AutoClip
def reference_autoclip(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    percentile: float,
    history: int,
    per_layer: bool,
) -> list[list[float]]:
    """The paper's loop: record the norm, take the percentile (current norm included), clip."""
    layers = [m for m in model if isinstance(m, nn.Linear)]
    norms: list[list[float]] = [[] for _ in (layers if per_layer else [model])]
    thresholds = []
    for x, y in batches(steps):
        opt.zero_grad()
        backward(model, x, y)
        groups = [list(m.parameters()) for m in layers] if per_layer else [list(model.parameters())]
        step_thresholds = []
        for hist, params in zip(norms, groups):
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
            hist.append(norm)
            threshold = float(np.percentile(np.array(hist[-history:]), percentile))
            step_thresholds.append(threshold)
            torch.nn.utils.clip_grad_norm_(params, threshold)
        thresholds.append(step_thresholds)
        opt.step()
    return thresholds


@pytest.mark.parametrize(("percentile", "history"), [(10.0, 10_000), (50.0, 7), (90.0, 1)])
def test_autoclip_equals_the_papers_loop(percentile: float, history: int, bookkeeping: str) -> None:
    ours, ref = make_model(), make_model()
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-2)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    _, sink = guard_for(ours, opt_ours, gg.AutoClip(percentile, history=history))
    for x, y in batches(30):
        opt_ours.zero_grad()
        backward(ours, x, y)
        opt_ours.step()
    expected = reference_autoclip(ref, opt_ref, 30, percentile, history, per_layer=False)
    assert series(sink, THRESHOLD) == pytest.approx([t[0] for t in expected], rel=1e-5)
    assert_params_close(ours, ref, rtol=1e-4, atol=1e-6)
    if percentile < 90:
        assert series(sink, CLIPPED)[-1] >= 10  # the clip really bound


def test_autoclip_per_layer_keeps_a_history_per_layer(bookkeeping: str) -> None:
    ours, ref = make_model(), make_model()
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-2)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    strategy = gg.AutoClip(25.0, history=12, per_layer=True)
    guard, sink = guard_for(ours, opt_ours, strategy)
    layer_thresholds = []
    for x, y in batches(25):
        opt_ours.zero_grad()
        backward(ours, x, y)
        opt_ours.step()
        # The per-layer limits in force, read from the strategy's state (a test-only peek).
        state = strategy.state_dict()
        layer_thresholds.append(state)
    expected = reference_autoclip(ref, opt_ref, 25, 25.0, 12, per_layer=True)
    assert_params_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert guard.layers == ["0", "2", "4"]
    ring = layer_thresholds[-1]["ring"]
    assert ring.shape == (3, 12) and not ring.isnan().any()  # 25 steps: the ring wrapped
    got = [float(np.percentile(row.numpy(), 25.0)) for row in ring]
    assert got == pytest.approx(expected[-1], rel=1e-5)
    assert THRESHOLD not in sink.scalars  # no single threshold


def test_autoclip_package_takes_the_percentile_one_step_later() -> None:
    """Same norms fed to both: the package's threshold at step t+1 is ours at step t."""
    autoclip_torch = pytest.importorskip("autoclip.torch")
    gen = torch.Generator().manual_seed(3)
    scales = [1.0, 2.0, 0.5, 4.0, 1.5, 30.0, 1.0, 0.8, 1.2, 2.5]
    grads = [
        [torch.randn(10, 8, generator=gen) * s, torch.randn(10, generator=gen) * s] for s in scales
    ]
    ours, theirs = nn.Linear(8, 10), nn.Linear(8, 10)
    opt = torch.optim.SGD(ours.parameters(), lr=0.0)  # lr 0: only the clipped grads matter
    _, sink = guard_for(ours, opt, gg.AutoClip(50.0, history=100))
    clipper = autoclip_torch.QuantileClip(
        theirs.parameters(), quantile=0.5, history_length=100, global_threshold=True
    )
    theirs_after = []
    for step_grads in grads:
        for model in (ours, theirs):
            for p, g in zip(model.parameters(), step_grads):
                p.grad = g.clone()
        opt.step()
        clipper.step()
        theirs_after.append(total_norm(theirs))
    norms = [float(torch.linalg.vector_norm(torch.stack([g.norm() for g in s]))) for s in grads]
    ours_thr = series(sink, THRESHOLD)
    for t in range(len(norms)):
        assert ours_thr[t] == pytest.approx(float(np.percentile(norms[: t + 1], 50)), rel=1e-6)
        # The package clips step t to the median of the norms BEFORE it (none at step 0).
        theirs_thr = float(np.percentile(norms[:t], 50)) if t else math.inf
        assert theirs_after[t] == pytest.approx(min(norms[t], theirs_thr), rel=1e-5)
    # The documented difference, where it shows most: the spike at step 5 is clipped less
    # by ours, whose median already counts the spike.
    assert ours_thr[5] > float(np.percentile(norms[:5], 50))


def test_autoclip_never_records_a_nonfinite_norm(bookkeeping: str) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _, sink = guard_for(model, opt, gg.AutoClip(50.0, history=100), on_nonfinite="skip", warn=False)
    norms: list[float] = []
    for step, (x, y) in enumerate(batches(8)):
        opt.zero_grad()
        backward(model, x, y)
        if step == 3:
            model[0].weight.grad[0, 0] = float("nan")
        else:
            norms.append(total_norm(model))
        opt.step()
        if step == 3:
            assert sink.latest(COEF) == 1.0  # a NaN step is left to on_nonfinite
        assert sink.latest(THRESHOLD) == pytest.approx(float(np.percentile(norms, 50)), rel=1e-5)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------ ZClip
ZCLIP_CASES = [
    {"mode": "zscore", "clip_option": "adaptive_scaling"},
    {"mode": "zscore", "clip_option": "mean"},
    {"mode": "percentile"},
    {"mode": "zscore", "clip_option": "adaptive_scaling", "max_grad_norm": 2.0},
]


@pytest.mark.parametrize("options", ZCLIP_CASES)
def test_zclip_equals_the_zclip_package_through_a_spike(
    options: dict[str, object], bookkeeping: str
) -> None:
    zclip = pytest.importorskip("zclip")
    ours, ref = make_model(), make_model()
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-3)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-3)
    _, sink = guard_for(ours, opt_ours, gg.ZClip(warmup_steps=10, **options))  # type: ignore[arg-type]
    package_options = dict(options)
    package_options.setdefault("max_grad_norm", None)
    theirs = zclip.ZClip(warmup_steps=10, **package_options)
    spike_step, coefs_ref = 30, []
    for step, (x, y) in enumerate(batches(36)):
        scale = 40.0 if step == spike_step else 1.0
        opt_ours.zero_grad()
        backward(ours, x, y, scale)
        opt_ours.step()
        opt_ref.zero_grad()
        backward(ref, x, y, scale)
        before = total_norm(ref)
        theirs.step(ref)
        coefs_ref.append(total_norm(ref) / before)
        opt_ref.step()
        for g_ours, g_ref in zip(grads_of(ours), grads_of(ref)):
            torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-7)
    assert_params_close(ours, ref, rtol=1e-4, atol=1e-6)
    coefs = series(sink, COEF)
    assert coefs == pytest.approx(coefs_ref, rel=1e-4)
    assert coefs[spike_step] < 0.2  # the spike was cut down
    assert coefs[spike_step] == min(coefs)


def test_zclip_warmup_has_no_hidden_cap(bookkeeping: str) -> None:
    zclip = pytest.importorskip("zclip")
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _, sink = guard_for(model, opt, gg.ZClip(warmup_steps=5))
    package_model = make_model()
    package = zclip.ZClip(warmup_steps=5)  # the package's defaults: max_grad_norm=1.0
    for x, y in batches(5):
        opt.zero_grad()
        backward(model, x, y, loss_scale=50.0)  # norms well above 1
        opt.step()
        package_model.zero_grad()
        backward(package_model, x, y, loss_scale=50.0)
        package.step(package_model)
        assert total_norm(package_model) == pytest.approx(1.0, rel=1e-5)  # the package's cap
    assert series(sink, COEF) == [1.0] * 5  # ours left warm-up alone
    assert THRESHOLD not in sink.scalars  # nothing in force during warm-up: no NaN points
    assert all(v > 1.0 for v in series(sink, "gradguard/grad_norm_total"))


def test_zclip_statistics_survive_a_nan_step(bookkeeping: str) -> None:
    zclip = pytest.importorskip("zclip")
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _, sink = guard_for(model, opt, gg.ZClip(warmup_steps=4), on_nonfinite="skip", warn=False)
    for step, (x, y) in enumerate(batches(12)):
        opt.zero_grad()
        backward(model, x, y, loss_scale=20.0 if step == 10 else 1.0)
        if step in (2, 7):  # once in warm-up, once after
            model[2].bias.grad[0] = float("inf")
        opt.step()
    thresholds = sink.scalars[THRESHOLD]
    # Warm-up is steps 0-3 (no threshold in force, none logged); the EMA starts from their
    # finite norms, leaving out step 2's Inf.
    assert [step for step, _ in thresholds] == list(range(4, 12))
    assert all(math.isfinite(t) for _, t in thresholds)
    assert series(sink, COEF)[10] < 1.0  # still catches the next spike
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The documented difference: in the package, one NaN norm poisons the EMA for good.
    package, package_model = zclip.ZClip(warmup_steps=2, max_grad_norm=None), make_model()
    for nan_step in (False, False, True):
        package_model.zero_grad()
        backward(package_model, *next(batches(1)))
        if nan_step:
            package_model[2].bias.grad[0] = float("nan")
        package.step(package_model)
    assert math.isnan(package.mean)


# ------------------------------------------------------------------ AGC
class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.body = nn.Sequential(nn.Linear(144, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x.view(-1, 1, 8, 8))).flatten(1)
        return self.head(self.body(h))


def timm_adaptive_clip_grad(parameters: list[nn.Parameter], clip_factor: float, eps: float) -> None:
    """timm.utils.agc.adaptive_clip_grad, re-implemented (timm itself needs torchvision)."""

    def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
        if x.ndim <= 1:
            return x.norm(2.0)
        return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)

    for p in parameters:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p.detach()).clamp_(min=eps).mul_(clip_factor)
        grad_norm = unitwise_norm(p.grad.detach())
        clipped = p.grad.detach() * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.detach().copy_(torch.where(grad_norm < max_norm, p.grad.detach(), clipped))


def conv_pair() -> tuple[SmallConvNet, SmallConvNet]:
    torch.manual_seed(0)
    a = SmallConvNet()
    b = SmallConvNet()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("exclude", [(), ("head",)])
def test_agc_equals_timm(exclude: tuple[str, ...]) -> None:
    ours, ref = conv_pair()
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    _, sink = guard_for(ours, opt_ours, gg.AGC(clipping=0.02, exclude=exclude))
    clipped_params = [p for n, p in ref.named_parameters() if not n.startswith(exclude)]
    for x, y in batches(12):
        opt_ours.zero_grad()
        backward(ours, x, y)
        opt_ours.step()
        opt_ref.zero_grad()
        backward(ref, x, y)
        before = total_norm(ref)
        timm_adaptive_clip_grad(clipped_params, 0.02, 1e-3)
        after = total_norm(ref)
        opt_ref.step()
        for g_ours, g_ref in zip(grads_of(ours), grads_of(ref)):
            assert torch.equal(g_ours, g_ref)
        assert sink.latest(COEF) == pytest.approx(after / before, rel=1e-5)
        assert THRESHOLD not in sink.scalars  # no single norm limit: nothing to draw
    for pa, pb in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(pa, pb)
    assert series(sink, CLIPPED)[-1] == 12


def test_agc_exclude_leaves_the_head_alone() -> None:
    model, plain = conv_pair()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    guard_for(model, opt, gg.AGC(clipping=1e-4, exclude="head"))
    x, y = next(batches(1))
    backward(model, x, y)
    backward(plain, x, y)
    opt.step()
    assert torch.equal(model.head.weight.grad, plain.head.weight.grad)
    assert torch.equal(model.head.bias.grad, plain.head.bias.grad)
    assert model.body[0].weight.grad.norm() < 0.5 * plain.body[0].weight.grad.norm()


def test_agc_unknown_layer_in_exclude_is_refused_at_attach() -> None:
    model, _ = conv_pair()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(gg.ConfigurationError, match=r"exclude='haed' names no layer.*'head'"):
        gg.attach(model, opt, clip=gg.AGC(exclude=("haed",)), detectors=[])
    # Nothing was left registered: the corrected guard attaches to the same optimizer.
    gg.attach(model, opt, clip=gg.AGC(exclude=("head",)), activations=False, detectors=[]).detach()


# ------------------------------------------------------------------ AMP (fused optimizers)
AMP_STRATEGIES: list[Callable[[], gg.ClipStrategy]] = [
    lambda: gg.NormClip(0.3),
    lambda: gg.NormClip(0.1, per_layer=True),
    lambda: gg.ValueClip(0.005),
    lambda: gg.AutoClip(20.0),
    lambda: gg.ZClip(warmup_steps=3),
    lambda: gg.AGC(clipping=0.02),
]


def test_the_tuned_lists_cover_every_strategy() -> None:
    assert_covers(AMP_STRATEGIES)
    assert_covers(ALL_STRATEGIES.values())


@pytest.mark.parametrize("make", AMP_STRATEGIES)
def test_fused_amp_clips_the_unscaled_gradients(make: Callable[[], gg.ClipStrategy]) -> None:
    """A GradScaler leaves fused optimizers' gradients scaled: clipping must not notice."""
    plain, scaled = make_model(), make_model()
    opt_plain = torch.optim.Adam(plain.parameters(), lr=1e-2, fused=True)
    opt_scaled = torch.optim.Adam(scaled.parameters(), lr=1e-2, fused=True)
    _, sink_plain = guard_for(plain, opt_plain, make())
    _, sink_scaled = guard_for(scaled, opt_scaled, make())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in batches(8):
        opt_plain.zero_grad()
        backward(plain, x, y)
        opt_plain.step()
        opt_scaled.zero_grad()
        scaler.scale(nn.functional.cross_entropy(scaled(x), y)).backward()
        scaler.step(opt_scaled)
        scaler.update()
    assert_params_close(plain, scaled, rtol=1e-5, atol=1e-7)
    for key in (COEF, THRESHOLD, "gradguard/grad_norm_total"):
        assert (key in sink_scaled.scalars) == (key in sink_plain.scalars)
        if key not in sink_plain.scalars:
            continue
        assert series(sink_scaled, key) == pytest.approx(
            series(sink_plain, key), rel=1e-5, nan_ok=True
        )
    assert series(sink_scaled, CLIPPED)[-1] > 0


# ------------------------------------------------------------------ no host sync
ALL_STRATEGIES: dict[str, Callable[[], gg.ClipStrategy]] = {
    "norm": lambda: gg.NormClip(0.5),
    "norm-per-layer": lambda: gg.NormClip(0.5, per_layer=True),
    "value": lambda: gg.ValueClip(0.01),
    "autoclip": lambda: gg.AutoClip(),
    "autoclip-per-layer": lambda: gg.AutoClip(per_layer=True),
    "zclip-warmup": lambda: gg.ZClip(),
    "zclip": lambda: gg.ZClip(warmup_steps=2),
    "zclip-percentile": lambda: gg.ZClip(warmup_steps=2, mode="percentile", max_grad_norm=1.0),
    "agc": lambda: gg.AGC(),
}


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", list(ALL_STRATEGIES))
def test_no_host_sync_on_non_logging_steps(name: str, fused: bool, bookkeeping: str) -> None:
    x = torch.randn(16, 8)
    torch.manual_seed(0)
    model = mlp([8, 32, 32, 4])
    opt = torch.optim.Adam(model.parameters(), fused=fused)
    for _ in range(2):
        _step(model, opt, x)
    with count_syncs() as bare:
        _step(model, opt, x)
    guard = gg.attach(model, opt, clip=ALL_STRATEGIES[name](), log_every_n_steps=1000, detectors=[])
    for _ in range(3):  # step 0 logs; 1 and 2 do not (and end ZClip's 2-step warm-up)
        _step(model, opt, x)
    with count_syncs() as guarded:
        _step(model, opt, x)
    guard.detach()
    assert guarded.count - bare.count == 0


# ------------------------------------------------------------------ configuration errors
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: gg.AutoClip(percentile=-1.0),
            r"percentile=-1.0 is not valid: expected a number in \[0, 100\]",
        ),
        (
            lambda: gg.AutoClip(percentile=101),
            r"percentile=101 is not valid: expected a number in \[0, 100\]",
        ),
        (lambda: gg.AutoClip(history=0), r"history=0 is not valid: expected an integer >= 1"),
        (
            lambda: gg.AutoClip(per_layer="yes"),
            r"per_layer='yes' is not valid: expected True or False",
        ),
        (lambda: gg.AGC(clipping=0), r"clipping=0 is not valid: expected a number in \(0, inf\]"),
        (lambda: gg.AGC(eps=-1e-3), r"eps=-0.001 is not valid"),
        (
            lambda: gg.AGC(exclude=("head", 3)),
            r"exclude=\('head', 3\) is not valid: expected layer names",
        ),
        (
            lambda: gg.ZClip(mode="median"),
            r"mode='median' is not valid: expected one of 'zscore', 'percentile'",
        ),
        (
            lambda: gg.ZClip(clip_option="max"),
            r"clip_option='max' is not valid: expected one of 'adaptive_scaling', 'mean'",
        ),
        (lambda: gg.ZClip(alpha=1.0), r"alpha=1.0 is not valid: expected a number in \(0, 1\)"),
        (lambda: gg.ZClip(z_threshold=0), r"z_threshold=0 is not valid"),
        (
            lambda: gg.ZClip(warmup_steps=0),
            r"warmup_steps=0 is not valid: expected an integer >= 1",
        ),
        (lambda: gg.ZClip(max_grad_norm=-1.0), r"max_grad_norm=-1.0 is not valid"),
        (lambda: gg.NormClip(0.0), r"max_norm=0.0 is not valid"),
        (lambda: gg.ValueClip(float("nan")), r"value=nan is not valid: expected a finite number"),
        (
            lambda: gg.GradGuard(clip="banana"),
            r"clip='banana' is not valid: .*AutoClip, ZClip, AGC",
        ),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(
    make: Callable[[], object], message: str
) -> None:
    with pytest.raises(gg.ConfigurationError, match=message):
        make()


def test_repr_shows_the_configuration() -> None:
    assert (
        repr(gg.AutoClip(5.0, history=100))
        == "AutoClip(percentile=5.0, history=100, per_layer=False)"
    )
    assert repr(gg.AGC(exclude="head")) == "AGC(clipping=0.01, eps=0.001, exclude=('head',))"
    assert "mode='percentile', max_grad_norm=None" in repr(gg.ZClip(mode="percentile"))
