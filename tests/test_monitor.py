"""GradientNormMonitor in real Trainer.fit runs, read back from real TensorBoard and CSV files."""

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_gradguard import GradientNormMonitor
from tests.helpers.models import TinyMLP, tiny_trainer
from tests.helpers.sync import counting
from tests.helpers.tb import load_events, read_layout, read_scalars


class ClipGradNormReference(Callback):
    """Clips with torch's own ``clip_grad_norm_`` and records the pre-clip norm it returns for every step."""

    def __init__(self, max_norm: float = 0.5) -> None:
        self.max_norm = max_norm
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        norm = torch.nn.utils.clip_grad_norm_(pl_module.parameters(), self.max_norm)
        self.norms[trainer.global_step] = norm.item()


def test_logged_norm_equals_clip_grad_norm_pre_clip_norm_at_every_step(tmp_path):
    reference = ClipGradNormReference(max_norm=0.5)
    monitor = GradientNormMonitor(layer_interval=3)
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    csv_logger = CSVLogger(tmp_path, name="csv", version=0)
    # the monitor runs before the reference in the list, so it sees the gradients before they are clipped
    trainer = tiny_trainer(
        tmp_path, max_steps=17, callbacks=[monitor, reference], logger=[tb, csv_logger], log_every_n_steps=5
    )
    trainer.fit(TinyMLP(lr=0.2))

    scalars = read_scalars(tb.log_dir)
    logged = scalars["gradguard/grad_norm"]
    assert sorted(logged) == list(range(17)), "one value per optimizer step, no gaps"
    assert max(reference.norms.values()) > 0.5, "the reference must actually have clipped"
    for step, value in logged.items():
        assert value == pytest.approx(reference.norms[step], rel=1e-6)

    # per-layer norms every 3 steps, for every parameter tensor
    layer_tags = [t for t in scalars if t.startswith("gradguard/layer/")]
    assert len(layer_tags) == len(list(TinyMLP().parameters()))
    for tag in layer_tags:
        assert sorted(scalars[tag]) == [0, 3, 6, 9, 12, 15]
    # the per-layer norms make up the global norm
    for step in (0, 3, 6):
        assert math.sqrt(sum(scalars[t][step] ** 2 for t in layer_tags)) == pytest.approx(logged[step], rel=1e-5)

    # the max since the last write sits at the last step of each flush and equals the max of that interval
    norm_max = scalars["gradguard/grad_norm_max"]
    assert sorted(norm_max) == [4, 9, 14, 16]
    for end, start in ((4, 0), (9, 5), (14, 10), (16, 15)):
        assert norm_max[end] == pytest.approx(max(logged[s] for s in range(start, end + 1)))

    # the CSV logger got the same values with the same step numbers
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("gradguard/grad_norm")]
    assert {int(r["step"]): float(r["gradguard/grad_norm"]) for r in rows} == pytest.approx(logged, rel=1e-6)


def test_dashboard_layout_and_histograms(tmp_path):
    monitor = GradientNormMonitor(layer_interval=2, histogram_interval=4)
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = tiny_trainer(tmp_path, max_steps=9, callbacks=[monitor], logger=tb, log_every_n_steps=4)
    trainer.fit(TinyMLP())

    layout = read_layout(tb.log_dir)
    assert "gradguard" in layout
    charts = layout["gradguard"]
    assert any("grad_norm" in regex for regex in charts["gradient norm"])
    assert charts["layer norms"] == [r"gradguard/(opt\d+/)?layer/.*"]

    events = load_events(tb.log_dir)
    hist_tags = events.Tags()["histograms"]
    assert sorted(hist_tags) == sorted(f"gradguard/hist/{n}" for n, _ in TinyMLP().named_parameters())
    for tag in hist_tags:
        hists = events.Histograms(tag)
        assert [h.step for h in hists] == [0, 4, 8]
        assert all(h.histogram_value.num > 0 for h in hists)
        # the bucket counts cover every element of the gradient
        assert all(sum(h.histogram_value.bucket) == h.histogram_value.num for h in hists)


def test_no_host_sync_per_step_and_one_read_per_flush(tmp_path):
    monitor = counting(GradientNormMonitor)(layer_interval=2, histogram_interval=3, flush_interval=4)
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = tiny_trainer(tmp_path, max_steps=12, callbacks=[monitor], logger=tb)
    trainer.fit(TinyMLP())
    assert monitor.syncs["step"] == [0] * 12
    # a flush every 4 steps: one host read in that step's batch-end hook, none elsewhere
    assert monitor.syncs["batch_end"] == [0, 0, 0, 1] * 3
    assert sorted(read_scalars(tb.log_dir)["gradguard/grad_norm"]) == list(range(12))


def test_gradient_accumulation_records_once_per_optimizer_step(tmp_path):
    reference = ClipGradNormReference(max_norm=math.inf)
    monitor = GradientNormMonitor()
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = tiny_trainer(
        tmp_path, max_steps=5, accumulate_grad_batches=3, callbacks=[monitor, reference], logger=tb, log_every_n_steps=2
    )
    trainer.fit(TinyMLP())
    logged = read_scalars(tb.log_dir)["gradguard/grad_norm"]
    assert sorted(logged) == [0, 1, 2, 3, 4]
    assert logged == pytest.approx(reference.norms, rel=1e-6)


class TwoOptimizerGAN(L.LightningModule):
    """Manual optimization with two optimizers, each stepping its own half of the model."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.gen = torch.nn.Linear(4, 4)
        self.disc = torch.nn.Linear(4, 1)
        self.norms: dict[str, list[float]] = {"gen": [], "disc": []}

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        (x,) = batch
        loss_d = self.disc(self.gen(x).detach()).pow(2).mean()
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        self.norms["disc"].append(torch.nn.utils.get_total_norm([p.grad for p in self.disc.parameters()]).item())
        opt_d.step()
        loss_g = (self.disc(self.gen(x)) - 1).pow(2).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        self.norms["gen"].append(torch.nn.utils.get_total_norm([p.grad for p in self.gen.parameters()]).item())
        opt_g.step()

    def train_dataloader(self):
        x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)

    def configure_optimizers(self):
        return torch.optim.Adam(self.gen.parameters(), lr=1e-2), torch.optim.SGD(self.disc.parameters(), lr=1e-2)


def test_manual_optimization_with_two_optimizers_logs_one_series_per_optimizer(tmp_path):
    """Each optimizer gets its own series and its own per-layer interval, tagged ``opt<i>``, on the step axis of
    Lightning's ``self.log`` (batches that stepped), not on ``global_step`` (which counts both optimizers)."""

    class Logging(TwoOptimizerGAN):
        def training_step(self, batch, batch_idx):
            super().training_step(batch, batch_idx)
            self.log("batch_marker", float(batch_idx))

    model = Logging()
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = tiny_trainer(
        tmp_path, max_steps=16, callbacks=[GradientNormMonitor(layer_interval=2)], logger=tb, log_every_n_steps=1
    )
    trainer.fit(model)
    scalars = read_scalars(tb.log_dir)
    assert "gradguard/grad_norm" not in scalars
    gen, disc = scalars["gradguard/opt0/grad_norm"], scalars["gradguard/opt1/grad_norm"]
    assert sorted(gen) == sorted(disc) == list(range(8)), "one value per batch for each optimizer"
    assert sorted(scalars["batch_marker"]) == list(range(8)), "the same axis as Lightning's own logging"
    assert [disc[s] for s in range(8)] == pytest.approx(model.norms["disc"], rel=1e-6)
    assert [gen[s] for s in range(8)] == pytest.approx(model.norms["gen"], rel=1e-6)
    for prefix, names in (("opt0", ["gen.weight", "gen.bias"]), ("opt1", ["disc.weight", "disc.bias"])):
        for name in names:
            assert sorted(scalars[f"gradguard/{prefix}/layer/{name}"]) == [0, 2, 4, 6], (prefix, name)
    assert not any(tag.startswith("gradguard/layer/") for tag in scalars)


def test_bf16_mixed_precision_on_cpu(tmp_path):
    reference = ClipGradNormReference(max_norm=math.inf)
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = tiny_trainer(
        tmp_path, max_steps=6, precision="bf16-mixed", callbacks=[GradientNormMonitor(), reference], logger=tb
    )
    trainer.fit(TinyMLP())
    logged = read_scalars(tb.log_dir)["gradguard/grad_norm"]
    assert sorted(logged) == list(range(6))
    assert all(math.isfinite(v) and v > 0 for v in logged.values())
    assert logged == pytest.approx(reference.norms, rel=1e-6)


def test_resume_from_checkpoint_continues_step_numbers(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    reference = ClipGradNormReference(max_norm=math.inf)

    def run(max_steps, ckpt_path=None):
        monitor = GradientNormMonitor(layer_interval=None)
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=6, save_top_k=-1)
        tb = TensorBoardLogger(tmp_path, name="tb", version=0)
        trainer = tiny_trainer(
            tmp_path,
            max_steps=max_steps,
            callbacks=[monitor, reference, checkpoint],
            logger=tb,
            enable_checkpointing=True,
            log_every_n_steps=4,
        )
        trainer.fit(TinyMLP(), ckpt_path=ckpt_path)
        return monitor, tb

    run(6)
    _, tb = run(11, ckpt_path=str(next(ckpt_dir.glob("*step=6*.ckpt"))))
    logged = read_scalars(tb.log_dir)["gradguard/grad_norm"]
    assert sorted(logged) == list(range(11)), "steps continue after resume, none written twice or lost"
    assert logged == pytest.approx(reference.norms, rel=1e-6)


def test_callback_metrics_feed_early_stopping(tmp_path):
    """Opt-in: the flushed values reach ``trainer.callback_metrics``, so EarlyStopping can stop on the norm."""
    from lightning.pytorch.callbacks import EarlyStopping

    monitor = GradientNormMonitor(layer_interval=None, flush_interval=2, callback_metrics=True)
    # stop as soon as the gradient norm is checked at the end of the first epoch: it is never below 0
    stop = EarlyStopping("gradguard/grad_norm", stopping_threshold=1e9, check_on_train_epoch_end=True)
    trainer = tiny_trainer(tmp_path, max_epochs=5, max_steps=-1, callbacks=[monitor, stop], logger=False)
    trainer.fit(TinyMLP(num_samples=32))
    assert trainer.current_epoch == 1 and trainer.global_step == 4, "stopped after the first epoch"
    assert trainer.callback_metrics["gradguard/grad_norm"] > 0
    assert "gradguard/grad_norm_max" in trainer.callback_metrics
    # off by default: nothing added
    trainer = tiny_trainer(tmp_path, max_steps=4, callbacks=[GradientNormMonitor(flush_interval=2)], logger=False)
    trainer.fit(TinyMLP(num_samples=32))
    assert not any(key.startswith("gradguard/") for key in trainer.callback_metrics)


def test_warns_once_without_logger(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=2, callbacks=[GradientNormMonitor()], logger=False)
    with pytest.warns(UserWarning, match="no logger") as record:
        trainer.fit(TinyMLP())
    assert sum("no logger" in str(w.message) for w in record) == 1


def test_two_monitors_are_refused(tmp_path):
    # distinct state keys, so Lightning's own duplicate check lets them through to ours
    trainer = tiny_trainer(tmp_path, callbacks=[GradientNormMonitor(), GradientNormMonitor(norm_type=1)])
    with pytest.raises(ValueError, match="Found 2 GradientNormMonitor callbacks"):
        trainer.fit(TinyMLP())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layer_interval": 0}, r"Expected `layer_interval` to be a positive integer or None but got 0"),
        ({"histogram_interval": -3}, r"`histogram_interval`.* but got -3"),
        ({"flush_interval": 2.5}, r"`flush_interval`.* but got 2.5"),
        ({"norm_type": 0}, r"`norm_type`.* but got 0"),
        ({"norm_type": "l2"}, r"`norm_type`.* but got 'l2'"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientNormMonitor(**kwargs)


def test_other_norm_types(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    model = TinyMLP()
    seen = {}

    class Probe(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen[trainer.global_step] = torch.nn.utils.get_total_norm(
                [p.grad for p in pl_module.parameters()], norm_type=math.inf
            ).item()

    trainer = tiny_trainer(tmp_path, max_steps=4, callbacks=[GradientNormMonitor(norm_type="inf"), Probe()], logger=tb)
    trainer.fit(model)
    assert read_scalars(tb.log_dir)["gradguard/grad_norm"] == pytest.approx(seen, rel=1e-6)
