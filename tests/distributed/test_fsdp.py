"""FSDP2 (``fully_shard``) and DTensor gradients: two gloo processes on the CPU.

Each rank holds a shard of every parameter; gradguard sums the squared norms of the shards
in one all-reduce per step, so both ranks see the norms of the whole model — the numbers a
single unsharded process computes — and take the same clip and skip decisions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradguard as gg
from tests.distributed._common import (
    events_of,
    flat_params,
    full_batch,
    regression_batch,
    regression_mlp,
)
from tests.distributed._launch import run_workers
from tests.strategies import assert_covers

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(150)]

LAYERS = ["0", "2", "4"]
STEPS = 4
NAN_STEP = 2
LR = 0.1


def sharded_mlp() -> nn.Sequential:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # An explicit CPU mesh: without one, fully_shard picks the GPU when the machine has one.
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = regression_mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def clip_strategies() -> dict[str, Callable[[], gg.ClipStrategy]]:
    return {
        "NormClip": lambda: gg.NormClip(0.05),
        "NormClip(per_layer)": lambda: gg.NormClip(0.05, per_layer=True),
        "AutoClip": lambda: gg.AutoClip(percentile=25.0),
        "ZClip": lambda: gg.ZClip(warmup_steps=2, z_threshold=0.5),
        "ValueClip": lambda: gg.ValueClip(0.02),
        "AGC": lambda: gg.AGC(clipping=0.01),
    }


class CollectiveCounter(TorchDispatchMode):
    """Counts the c10d collectives that go through the dispatcher (all_reduce, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if str(func).startswith(("c10d.", "_c10d_functional.")):
            self.count += 1
        return func(*args, **(kwargs or {}))


def train(
    model: nn.Module,
    world_size: int,
    rank: int | None,
    guard_kwargs: dict[str, Any],
    *,
    steps: int = STEPS,
    corrupt: Callable[[nn.Module, int], None] | None = None,
) -> dict[str, Any]:
    """SGD steps on ``model`` with a guard attached; ``rank=None`` is the unsharded
    reference, which trains on every rank's batch at once."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sink = gg.MemorySink()
    guard = gg.attach(model, opt, sinks=[sink], log_every_n_steps=1, **guard_kwargs)
    scalars, collectives, moved = [], [], []
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for step in range(steps):
            x, y = full_batch(world_size, step) if rank is None else regression_batch(rank, step)
            opt.zero_grad(set_to_none=True)
            F.mse_loss(model(x), y).backward()
            if corrupt is not None:
                corrupt(model, step)
            before = flat_params(model)
            with CollectiveCounter() as counter:
                opt.step()
            collectives.append(counter.count)
            moved.append(not torch.equal(before, flat_params(model)))
            scalars.append(guard.last_scalars)
        guard.detach()
    return {
        "scalars": scalars,
        "collectives": collectives,
        "moved": moved,
        "skipped": guard.skipped_steps,
        "params": flat_params(model),
        "sink_steps": len(sink.scalars.get("gradguard/grad_norm_total", [])),
        "sink_events": events_of(sink.events),
    }


# ---------------------------------------------------------------- worker (run in each rank)
def fsdp_scenarios(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    probe = sharded_mlp()
    x, y = regression_batch(rank, 0)
    F.mse_loss(probe(x), y).backward()
    out["grad_types"] = {name: type(p.grad).__name__ for name, p in probe.named_parameters()}
    out["placements"] = {
        name: [repr(p) for p in param.grad.placements] for name, param in probe.named_parameters()
    }
    out["local_rows"] = {
        name: param.to_local().shape[0] for name, param in probe.named_parameters()
    }

    # Norms, parameter norms and update ratios, all with default settings (activations on).
    out["norms"] = train(sharded_mlp(), world_size, rank, {"update_ratio": True})

    # The one-collective rule: log every 4 steps, so steps 1-3 only measure and decide.
    quiet = train(
        sharded_mlp(),
        world_size,
        rank,
        {"clip": gg.AutoClip(), "on_nonfinite": "skip", "activations": False},
    )
    out["collectives_logging_every_step"] = quiet["collectives"]
    opt_model = sharded_mlp()
    opt = torch.optim.SGD(opt_model.parameters(), lr=LR)
    guard = gg.attach(
        opt_model,
        opt,
        clip=gg.AutoClip(),
        on_nonfinite="skip",
        log_every_n_steps=4,
        activations=False,
    )
    counts = []
    for step in range(STEPS):
        x, y = regression_batch(rank, step)
        opt.zero_grad(set_to_none=True)
        F.mse_loss(opt_model(x), y).backward()
        with CollectiveCounter() as counter:
            opt.step()
        counts.append(counter.count)
    guard.detach()
    out["collectives_logging_every_4"] = counts

    # Clipping on shards gives the parameters of clipping unsharded.
    out["clip"] = {
        name: train(sharded_mlp(), world_size, rank, {"clip": make(), "activations": False})
        for name, make in clip_strategies().items()
    }

    # A NaN written into rank 1's shard only (rank 0's own shard is finite): both skip.
    own_shard_finite: list[bool] = []

    def corrupt(model: nn.Module, step: int) -> None:
        if step != NAN_STEP:
            return
        grad = model[2].weight.grad
        if rank == 1:
            grad.to_local()[0, 0] = float("nan")
        own_shard_finite.append(bool(torch.isfinite(grad.to_local()).all()))

    out["nan"] = train(
        sharded_mlp(),
        world_size,
        rank,
        {"clip": gg.AutoClip(percentile=50.0), "on_nonfinite": "skip"},
        corrupt=corrupt,
    )
    out["nan"]["own_shard_finite"] = own_shard_finite
    out["dtensor"] = dtensor_placements(rank, world_size)
    out["fsdp1"] = fsdp1_runs(rank, world_size)
    return out


def nan_in_first_local_grad(rank: int, has_grad: list[str]) -> Callable[[nn.Module, int], None]:
    """Records which gradients this rank holds (step 0); puts a NaN in rank 1's first
    non-empty gradient at NAN_STEP."""

    def corrupt(model: nn.Module, step: int) -> None:
        if step == 0:
            has_grad.extend(n for n, p in model.named_parameters() if p.grad is not None)
        if step == NAN_STEP and rank == 1:
            grad = next(p.grad for p in model.parameters() if p.grad is not None and p.grad.numel())
            grad.view(-1)[0] = float("nan")

    return corrupt


def fsdp1_runs(rank: int, world_size: int) -> dict[str, Any]:
    """FSDP1 (FullyShardedDataParallel) as one unit over the whole model: its shards are
    plain tensors (no DTensor), found through the model. With ``use_orig_params=True``
    rank 0 holds all of layer 0's weight and rank 1 the rest: each rank has gradients for
    different layers, yet both must take part in the same collectives."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out: dict[str, Any] = {}
    for use_orig_params in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FSDP1's deprecation notice
            model = FSDP(regression_mlp(), use_orig_params=use_orig_params, device_id="cpu")
        has_grad: list[str] = []
        corrupt = nan_in_first_local_grad(rank, has_grad)
        run = train(
            model,
            world_size,
            rank,
            {"on_nonfinite": "skip", "update_ratio": True, "activations": False},
            corrupt=corrupt,
        )
        with FSDP.summon_full_params(model):
            run["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        run["has_grad"] = has_grad
        out["orig" if use_orig_params else "flat"] = run
    return out


class _Holder(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def dtensor_placements(rank: int, world_size: int) -> dict[str, Any]:
    """DTensor parameters placed every way a model can mix them, measured by the guard.

    Shard(0) with uneven rows, Shard(1), Replicate (must not count twice), an HSDP-style
    (Replicate, Shard(0)) on a 2-D mesh whose replicas must not count twice either, and a
    plain tensor beside them. Expected numbers come from the full tensors.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    flat_mesh = init_device_mesh("cpu", (world_size,))
    hsdp_mesh = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("replicate", "shard"))
    layouts: dict[str, tuple[tuple[int, ...], Any, list[Any]]] = {
        "rows": ((5, 3), flat_mesh, [Shard(0)]),
        "cols": ((4, 6), flat_mesh, [Shard(1)]),
        "replicated": ((3, 3), flat_mesh, [Replicate()]),
        "hsdp": ((4, 2), hsdp_mesh, [Replicate(), Shard(0)]),
        "plain": ((2, 2), None, []),
    }
    torch.manual_seed(7)  # the same full tensors on every rank
    full_weights = {name: torch.randn(shape) for name, (shape, _, _) in layouts.items()}
    full_grads = [
        {name: torch.randn(shape) for name, (shape, _, _) in layouts.items()} for _ in range(2)
    ]

    def place(tensor: torch.Tensor, name: str) -> torch.Tensor:
        _, mesh, placements = layouts[name]
        # distribute_tensor may alias its input (Replicate): always hand it a copy.
        copy = tensor.clone()
        return copy if mesh is None else distribute_tensor(copy, mesh, placements)

    model = nn.Module()
    for name, weight in full_weights.items():
        model.add_module(name, _Holder(place(weight, name)))
    # One DTensor per mesh in a foreach kernel is not supported: step them one by one.
    opt = torch.optim.SGD(model.parameters(), lr=LR, foreach=False)
    guard = gg.attach(
        model, opt, on_nonfinite="skip", log_every_n_steps=1, update_ratio=True, activations=False
    )
    measured, collectives = [], []
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for step, grads in enumerate(full_grads):
            for name, grad in grads.items():
                getattr(model, name).weight.grad = place(grad, name)
            if step == 1 and rank == 1:
                # A NaN in rank 1's half of the columns only.
                model.cols.weight.grad.to_local()[0, 0] = float("nan")
            with CollectiveCounter() as counter:
                opt.step()
            collectives.append(counter.count)
            measured.append(guard.last_scalars)
    skipped = guard.skipped_steps
    guard.detach()
    updated = {name: w - LR * full_grads[0][name] for name, w in full_weights.items()}
    expected = {}
    for name in layouts:
        expected[f"gradguard/grad_norm/{name}"] = float(full_grads[0][name].norm())
        expected[f"gradguard/param_norm/{name}"] = float(updated[name].norm())
        expected[f"gradguard/update_ratio/{name}"] = float(
            (LR * full_grads[0][name]).norm() / updated[name].norm()
        )
    expected["gradguard/grad_norm_total"] = math.sqrt(
        sum(float(g.norm()) ** 2 for g in full_grads[0].values())
    )
    return {
        "measured": measured[0],
        "expected": expected,
        "nan_step_total": measured[1]["gradguard/grad_norm_total"],
        "skipped": skipped,
        "collectives": collectives,
        "local_shapes": {
            name: list(getattr(model, name).weight.to_local().shape)
            for name in layouts
            if name != "plain"
        },
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every scenario of this file in one launch: starting processes is the slow part."""
    return run_workers(fsdp_scenarios, tmp_path_factory.mktemp("fsdp"), timeout=90.0)


def reference(guard_kwargs: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return train(regression_mlp(), 2, None, guard_kwargs, **kwargs)


def relative_gap(measured: float, expected: float) -> float:
    return abs(measured - expected) / max(abs(expected), 1e-12)


# ---------------------------------------------------------------- tests
def test_fsdp2_runs_on_cpu_with_sharded_gradients(ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = ranks
    assert set(rank0["grad_types"].values()) == {"DTensor"}
    assert rank0["placements"]["0.weight"] == ["Shard(dim=0)"]
    # The 1-output layer: rank 1 holds an empty shard, which must add nothing and break nothing.
    assert (rank0["local_rows"]["4.weight"], rank1["local_rows"]["4.weight"]) == (1, 0)


def test_sharded_norms_equal_the_unsharded_reference(ranks: list[dict[str, Any]]) -> None:
    expected = reference({"update_ratio": True})
    keys = [f"gradguard/grad_norm/{n}" for n in LAYERS] + ["gradguard/grad_norm_total"]
    keys += [f"gradguard/param_norm/{n}" for n in LAYERS]
    keys += [f"gradguard/update_ratio/{n}" for n in LAYERS]
    worst = 0.0
    for rank in ranks:
        run = rank["norms"]
        for step in range(STEPS):
            for key in keys:
                want = expected["scalars"][step][key]
                got = run["scalars"][step][key]
                assert got == pytest.approx(want, rel=1e-5), (step, key)
                worst = max(worst, relative_gap(got, want))
    # Both ranks hold the same numbers, and the model did not diverge from the reference.
    for step in range(STEPS):
        for key in keys:
            assert (
                ranks[0]["norms"]["scalars"][step][key] == ranks[1]["norms"]["scalars"][step][key]
            )
    assert torch.allclose(torch.tensor(ranks[0]["norms"]["params"]), expected["params"], atol=1e-6)
    print(f"largest relative gap to the unsharded reference: {worst:.2e}")
    # Only rank 0 wrote to its sink.
    assert ranks[0]["norms"]["sink_steps"] == STEPS and ranks[1]["norms"]["sink_steps"] == 0


def test_one_collective_per_step_off_logging_steps(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        # Steps 1-3 are not logging steps: the grad-norm all-reduce is the only collective.
        assert rank["collectives_logging_every_4"] == [3, 1, 1, 1]
        # A logging step adds one for the parameter norms and one for the update norms.
        assert rank["collectives_logging_every_step"] == [3] * STEPS


def test_the_sharded_cases_cover_every_strategy() -> None:
    assert_covers(clip_strategies().values())


@pytest.mark.parametrize("strategy", list(clip_strategies()))
def test_clipping_shards_equals_clipping_unsharded(
    ranks: list[dict[str, Any]], strategy: str
) -> None:
    expected = reference({"clip": clip_strategies()[strategy](), "activations": False})
    coefs = [s["gradguard/clip/coef"] for s in expected["scalars"]]
    if strategy != "ZClip":  # ZClip only watches during its warm-up here
        assert min(coefs) < 1.0, "the reference never clipped: the test would prove nothing"
    for rank in ranks:
        run = rank["clip"][strategy]
        assert torch.allclose(torch.tensor(run["params"]), expected["params"], rtol=1e-5, atol=1e-6)
        for step in range(STEPS):
            got = run["scalars"][step]
            for key in ("gradguard/grad_norm_total", "gradguard/clip/threshold"):
                # No threshold in force (value and unit-wise clips, ZClip's warm-up): no key.
                assert (key in got) == (key in expected["scalars"][step]), (step, key)
                if key not in got:
                    continue
                want = expected["scalars"][step][key]
                if isinstance(want, float) and math.isnan(want):
                    assert got[key] == "nan" or math.isnan(float(got[key]))
                else:
                    assert got[key] == pytest.approx(want, rel=1e-5), (step, key)
            if strategy.startswith(("NormClip", "AutoClip", "ZClip")):
                # Scales computed from reduced norms: the same on every rank as unsharded.
                assert got["gradguard/clip/coef"] == pytest.approx(coefs[step], rel=1e-5)


def test_nan_in_one_ranks_shard_makes_both_ranks_skip(ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = (r["nan"] for r in ranks)
    # Rank 0's own shard was finite: alone, it would have stepped and left rank 1 behind.
    assert rank0["own_shard_finite"] == [True] and rank1["own_shard_finite"] == [False]
    for run in (rank0, rank1):
        assert run["moved"] == [step != NAN_STEP for step in range(STEPS)]
        assert run["skipped"] == 1
        assert run["scalars"][NAN_STEP]["gradguard/grad_norm_total"] == "nan"

    # The result is the unsharded run that skipped that step.
    def drop_step(model: nn.Module, step: int) -> None:
        if step == NAN_STEP:
            model[2].weight.grad[8, 0] = float("nan")  # rank 1's first row

    expected = reference(
        {"clip": gg.AutoClip(percentile=50.0), "on_nonfinite": "skip"}, corrupt=drop_step
    )
    assert expected["skipped"] == 1
    assert torch.allclose(torch.tensor(rank0["params"]), expected["params"], atol=1e-6)
    # Only rank 0 reported it, naming the layer.
    assert [(e["kind"], e["step"], e["layers"]) for e in rank0["sink_events"]] == [
        ("nonfinite", NAN_STEP, ["2"])
    ]
    assert rank1["sink_events"] == []


def test_fsdp1_shards_are_summed_too(ranks: list[dict[str, Any]]) -> None:
    # Rank 1's first non-empty gradient got a NaN at NAN_STEP (layer "2"'s or the flat one).
    def corrupt(model: nn.Module, step: int) -> None:
        if step == NAN_STEP:
            model[0].bias.grad[0] = float("nan")

    expected = reference(
        {"on_nonfinite": "skip", "update_ratio": True, "activations": False}, corrupt=corrupt
    )
    orig0, orig1 = (r["fsdp1"]["orig"] for r in ranks)
    # Each rank holds gradients for different layers...
    assert orig0["has_grad"] != orig1["has_grad"]
    worst = 0.0
    for run in (orig0, orig1):
        # ...and still both see the whole model's norms, layer by layer.
        for step in range(STEPS):
            if step == NAN_STEP:
                assert run["scalars"][step]["gradguard/grad_norm_total"] == "nan"
                continue
            for key, want in expected["scalars"][step].items():
                if not key.startswith(
                    ("gradguard/grad_norm", "gradguard/param_norm", "gradguard/update_ratio")
                ):
                    continue
                got = run["scalars"][step][
                    key.replace("norm/", "norm/_fsdp_wrapped_module.").replace(
                        "ratio/", "ratio/_fsdp_wrapped_module."
                    )
                ]
                assert got == pytest.approx(want, rel=1e-5), (step, key)
                worst = max(worst, relative_gap(got, want))
        assert run["skipped"] == 1
        assert torch.allclose(torch.tensor(run["params"]), expected["params"], atol=1e-6)
    print(f"largest relative gap, FSDP1 use_orig_params=True: {worst:.2e}")
    for run in (r["fsdp1"]["flat"] for r in ranks):
        # One flat parameter: one "layer", the FSDP unit; its norm is the model's norm.
        for step in range(STEPS):
            if step != NAN_STEP:
                want = expected["scalars"][step]["gradguard/grad_norm_total"]
                assert run["scalars"][step]["gradguard/grad_norm_total"] == pytest.approx(
                    want, rel=1e-5
                )
        assert run["skipped"] == 1
        assert torch.allclose(torch.tensor(run["params"]), expected["params"], atol=1e-6)


def test_dtensor_placements_count_every_element_once(ranks: list[dict[str, Any]]) -> None:
    worst = 0.0
    for rank in ranks:
        run = rank["dtensor"]
        for key, want in run["expected"].items():
            assert run["measured"][key] == pytest.approx(want, rel=1e-5), key
            worst = max(worst, relative_gap(run["measured"][key], want))
        # A NaN in one rank's shard of "cols" is seen by both, and both skip.
        assert run["nan_step_total"] == "nan"
        assert run["skipped"] == 1
        # Five placements on two meshes, still one collective for the gradient norms
        # (+1 for parameter norms, +1 for update norms: every step here is a logging step).
        assert run["collectives"] == [3, 3]
    assert ranks[0]["dtensor"]["local_shapes"]["rows"] == [3, 3]
    assert ranks[1]["dtensor"]["local_shapes"]["rows"] == [2, 3]
    assert ranks[0]["dtensor"]["local_shapes"]["hsdp"] == [4, 2]
    print(f"largest relative gap over DTensor placements: {worst:.2e}")
