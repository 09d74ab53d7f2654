"""GradGuardCallback: resume, manual optimisation, several optimizers, precision, construction."""

from __future__ import annotations

import copy
import inspect
import math
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import pytest
import torch
from gradguard.integrations.lightning import GradGuardCallback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision

import gradguard as gg
from tests.integration.lightning_kit import (
    DigitsModule,
    GradProbe,
    ManualModule,
    StepSnapshot,
    digits_loader,
    params_of,
    same_state,
    trainer,
)

# Third-party noise: Lightning 2.6 trips a torch pytree deprecation (FutureWarning) at fit.
pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*:FutureWarning")

ROOT = Path(__file__).resolve().parents[2]


class _StateAtTrainStart(pl.Callback):
    """Reads the gradguard callback's state once everything is restored, before any step."""

    def __init__(self, watched: GradGuardCallback) -> None:
        self.watched = watched
        self.state: dict[str, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Copied: like torch's own state_dicts, it may hold the live tensors.
        self.state = copy.deepcopy(self.watched.state_dict())


def test_resume_from_a_mid_run_checkpoint_restores_the_guard_exactly(tmp_path: Path) -> None:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = GradGuardCallback(clip=gg.AutoClip(percentile=50.0), log_every_n_steps=2)
    trainer(tmp_path, max_steps=6, enable_checkpointing=True, callbacks=[first, checkpoints]).fit(
        DigitsModule(), digits_loader()
    )
    path = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    # Lightning loads checkpoints with weights_only=True: the guard state must survive that.
    saved = torch.load(path, weights_only=True)["callbacks"][first.state_key]
    assert saved["guards"][0]["step"] == 3
    assert saved["guards"][0]["clip"], "AutoClip's history is part of the state"

    memory = gg.MemorySink()
    resumed = GradGuardCallback(
        clip=gg.AutoClip(percentile=50.0), log_every_n_steps=2, sinks=[memory]
    )
    probe = _StateAtTrainStart(resumed)
    trainer(tmp_path, max_steps=6, callbacks=[resumed, probe]).fit(
        DigitsModule(), digits_loader(), ckpt_path=str(path)
    )
    assert probe.state is not None
    assert same_state(probe.state, saved)
    assert resumed.guard.step == 6  # training went on from step 3
    assert [step for step, _ in memory.scalars["gradguard/grad_norm_total"]] == [4]


def test_state_loaded_before_fit_is_kept_until_the_guard_attaches() -> None:
    callback = GradGuardCallback()
    state: dict[str, Any] = {"version": 1, "guards": [gg.GradGuard().state_dict()]}
    state["guards"][0]["step"] = 7
    callback.load_state_dict(state)  # what Lightning does before the optimizers exist
    assert callback.state_dict()["guards"][0]["step"] == 7
    with pytest.raises(gg.ConfigurationError, match="state_dict"):
        callback.load_state_dict({"guards": "nonsense"})
    with pytest.raises(gg.ConfigurationError, match="upgrade gradguard"):
        callback.load_state_dict({"version": 99, "guards": []})


def test_callback_pickles_for_spawned_workers() -> None:
    # strategy="ddp_spawn" pickles the Trainer, callbacks included, to start its workers.
    callback = GradGuardCallback(clip=gg.AutoClip(), on_nonfinite="skip", sinks=[gg.MemorySink()])
    copy_ = pickle.loads(pickle.dumps(callback))
    assert copy_.state_key == callback.state_key
    assert same_state(copy_.state_dict(), callback.state_dict())


def test_manual_optimisation_measures_and_clips_every_step(tmp_path: Path) -> None:
    memory = gg.MemorySink()
    probe = GradProbe()
    callback = GradGuardCallback(clip=0.01, sinks=[memory])
    module = ManualModule(lr=1.0)  # SGD lr=1: the update IS the (clipped) gradient
    before_last: dict[str, torch.Tensor] = {}

    class _LastStep(pl.Callback):
        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
        ) -> None:
            before_last.update(params_of(pl_module))

    trainer(tmp_path, max_steps=4, callbacks=[probe, callback, _LastStep()]).fit(
        module, digits_loader()
    )

    assert callback.guard.step == 4
    totals = memory.scalars["gradguard/grad_norm_total"]
    assert [step for step, _ in totals] == [0, 1, 2, 3]
    for step, value in totals:
        assert value == pytest.approx(probe.norms[step], rel=1e-4)
    assert all(coef < 1.0 for _, coef in memory.scalars["gradguard/clip/coef"])
    deltas = [p.detach() - before_last[name] for name, p in module.named_parameters()]
    update = float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in deltas]))
    )
    assert update == pytest.approx(0.01, rel=1e-3)


def test_lbfgs_closure_evaluations_make_one_step_each(tmp_path: Path) -> None:
    probe = GradProbe()
    memory = gg.MemorySink()
    callback = GradGuardCallback(sinks=[memory])
    module = DigitsModule(optimizer="lbfgs", lr=0.5)
    trainer(tmp_path, max_steps=3, callbacks=[probe, callback]).fit(module, digits_loader())

    assert probe.calls > 3  # LBFGS ran its closure (and Lightning's hook) several times a step
    assert callback.guard.step == 3
    assert [step for step, _ in memory.scalars["gradguard/grad_norm_total"]] == [0, 1, 2]


def test_several_optimizers_get_one_guard_each_with_separate_keys(tmp_path: Path) -> None:
    memory = gg.MemorySink()
    callback = GradGuardCallback(clip=gg.AutoClip(), sinks=[memory])
    # Manual optimisation: each batch steps both optimizers, and each step is a global step.
    trainer(tmp_path, max_steps=8, callbacks=[callback]).fit(
        ManualModule(two_optimizers=True, lr=0.1), digits_loader()
    )

    encoder_guard, head_guard = callback.guards
    assert encoder_guard.layers == ["encoder.0"] and head_guard.layers == ["head"]
    assert encoder_guard.step == head_guard.step == 4
    assert encoder_guard.clip is not head_guard.clip  # each optimizer clips on its own history
    encoder_steps = [s for s, _ in memory.scalars["gradguard/optimizer_0/grad_norm_total"]]
    head_steps = [s for s, _ in memory.scalars["gradguard/optimizer_1/grad_norm_total"]]
    assert encoder_steps == [0, 2, 4, 6] and head_steps == [1, 3, 5, 7]
    assert "gradguard/optimizer_1/grad_norm/head" in memory.scalars
    assert "gradguard/grad_norm_total" not in memory.scalars
    assert callback.state_dict()["guards"][1]["step"] == 4


def test_bf16_mixed_completes_with_finite_norms(tmp_path: Path) -> None:
    memory = gg.MemorySink()
    callback = GradGuardCallback(clip=gg.ZClip(), sinks=[memory])
    trainer(tmp_path, max_steps=4, precision="bf16-mixed", callbacks=[callback]).fit(
        DigitsModule(), digits_loader()
    )

    assert callback.guard.step == 4
    totals = [value for _, value in memory.scalars["gradguard/grad_norm_total"]]
    assert len(totals) == 4 and all(math.isfinite(v) and v > 0 for v in totals)
    for layer in ("net.0", "net.2"):
        assert all(
            math.isfinite(v) and v > 0 for _, v in memory.scalars[f"gradguard/grad_norm/{layer}"]
        )
    assert callback.events == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs CUDA (a lent GPU)")
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_16_mixed_unscaled_norms_scaler_owns_overflow_gradguard_skips_spikes(
    tmp_path: Path, fused: bool
) -> None:
    memory = gg.MemorySink()
    snapshot = StepSnapshot(at=6)
    callback = GradGuardCallback(
        clip=gg.AutoClip(),
        on_nonfinite="skip",
        on_spike="skip",
        spike=gg.SpikeDetector(warmup_steps=3),
        log_every_n_steps=1,
        sinks=[memory],
    )
    module = DigitsModule(nan_at=3, spike_at=6, fused=fused)
    # precision="16-mixed" with a smaller initial loss scale (65536 by default), so that the
    # 20x spike stays inside fp16's range and is gradguard's to skip, not the scaler's.
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    run = trainer(
        tmp_path,
        accelerator="cuda",
        plugins=[MixedPrecision("16-mixed", "cuda", scaler=scaler)],
        max_steps=8,
        callbacks=[snapshot, callback],
    )
    with pytest.warns(gg.GradGuardWarning, match="spiked"):
        run.fit(module, digits_loader())

    totals = dict(memory.scalars["gradguard/grad_norm_total"])
    finite = [v for v in totals.values() if math.isfinite(v)]
    # Loss-scaled gradients would read 256 times larger: these are the true norms.
    assert len(finite) == 7 and all(0.1 < v < 50 for v in finite)
    assert callback.guard.step == 8 and not math.isfinite(totals[3])
    # The NaN step is the GradScaler's (it skips it and lowers the scale): no gradguard alarm.
    # The spike is gradguard's: skipped (on fused optimizers through the scaler's found_inf).
    assert [(e.kind, e.step) for e in callback.events] == [("spike", 6)]
    assert callback.guard.skipped_steps == 1
    assert snapshot.unchanged()
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_every_gradguard_option_is_accepted_and_validated_at_construction() -> None:
    core = set(inspect.signature(gg.GradGuard.__init__).parameters) - {"self"}
    adapter = set(inspect.signature(GradGuardCallback.__init__).parameters) - {"self"}
    assert core <= adapter, f"GradGuardCallback lacks {sorted(core - adapter)}"
    with pytest.raises(gg.ConfigurationError, match="on_nonfinite"):
        GradGuardCallback(on_nonfinite=cast(Any, "explode"))
    with pytest.raises(gg.ConfigurationError, match="log_every_n_steps"):
        GradGuardCallback(log_every_n_steps=0)
    with pytest.raises(gg.ConfigurationError, match="prefix"):
        GradGuardCallback(prefix="gradguard/")
    assert GradGuardCallback(prefix="a").state_key != GradGuardCallback(prefix="b").state_key


def test_without_lightning_the_module_imports_and_construction_names_the_extra() -> None:
    code = (
        "import sys\n"
        "for name in ('lightning', 'lightning.pytorch', 'pytorch_lightning'):\n"
        "    sys.modules[name] = None\n"
        "import gradguard as gg\n"
        "from gradguard.integrations.lightning import GradGuardCallback\n"
        "try:\n"
        "    GradGuardCallback()\n"
        "except gg.MissingDependencyError as exc:\n"
        "    print('MISSING', exc.extra, exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "MISSING lightning" in result.stdout
    assert "pip install 'gradguard[lightning]'" in result.stdout


def test_example_runs_on_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import lightning_digits
    finally:
        sys.path.remove(str(ROOT / "examples"))
    with pytest.warns(gg.GradGuardWarning, match="NaN"):
        report = lightning_digits.main(["--max-steps", "12", "--log-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert report in out
    assert "optimizer steps: 12, skipped by gradguard: 1" in out
    assert list((tmp_path / "lightning_digits").rglob("events.out.tfevents.*"))
