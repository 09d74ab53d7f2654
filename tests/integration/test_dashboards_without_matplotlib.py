"""A Lightning fit with tensorboard installed but not matplotlib: the TensorBoard sink says
once what is missing and which extra brings it, and writes everything that does not need
it (scalars, the custom-scalars layout, histograms, the Event text).

matplotlib IS installed here; its absence is simulated with a ``None`` entry in
``sys.modules``, which makes ``import matplotlib`` fail the way a missing package does.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
from gradguard.integrations.lightning import GradGuardCallback
from gradguard.integrations.tensorboard import LAYOUT_TAG
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradguard as gg
from tests.integration.lightning_kit import DigitsModule, digits_loader, trainer

# Third-party noise: Lightning 2.6 trips a torch pytree deprecation (FutureWarning) at fit.
pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*:FutureWarning")


def test_lightning_tensorboard_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    callback = GradGuardCallback(on_nonfinite="skip", histograms=True)
    run = trainer(tmp_path, max_steps=5, log_every_n_steps=2, logger=logger, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(DigitsModule(nan_at=1), digits_loader())
    said = [str(w.message) for w in caught if issubclass(w.category, gg.GradGuardWarning)]
    missing = [message for message in said if "matplotlib" in message]
    assert len(missing) == 1  # once, not per logging step
    assert "pip install 'gradguard[tensorboard]'" in missing[0]
    assert any("NaN" in message for message in said)  # the Event itself was not lost

    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("gradguard/grad_norm_total")] == [0, 2, 4]
    assert "gradguard/grad_norm_log10/net.0" in tags["scalars"]
    assert LAYOUT_TAG in tags["tensors"]
    assert "gradguard/events/nonfinite/text_summary" in tags["tensors"]
    assert "gradguard/grad_histogram/net.0" in tags["histograms"]
    assert tags["images"] == []
