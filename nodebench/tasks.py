"""Tasks: what varies between experiments that share the one training loop (:func:`nodebench.
train.run`).

A task owns its data (held in memory), its batches, its loss and its evaluation metrics; the loop
owns everything else (optimiser, schedule, instruments, TensorBoard, metrics.csv, summary.json,
checkpoint and resume). Every task has the same methods:

* ``train_batches(batch_size, generator)``: the batches of one epoch, shuffled by ``generator``
  (the loop checkpoints it, so a resumed run draws the same batches); ``batches_per_epoch``;
* ``loss(model, batch) -> (loss, out)`` and ``count(batch, out) -> {"seen": n, ...}``: the
  scalar that is optimised (a mean over the batch) and the sums behind ``train_columns``;
* ``evaluate(model, batch_size) -> (metrics, batches)``: ``eval_columns`` on the test data, under
  ``torch.no_grad``; ``target`` is the column whose best (lowest) value the summary reports;
* ``check_batch(size)``: the fixed inputs and targets of the solve-validity and gradient-error
  checks (:mod:`nodebench.validity`), or None where the model has no ODE block they apply to;
* ``save_artifacts(model, run_dir)``: what a report draws figures from (optional).

The task is chosen by the dataset: ``dataset.task`` (a ``_target_`` node) in ``conf/dataset/``;
image datasets have none and get :class:`Classification`. Tasks:

=================  ==========================================  ===============================
task               datasets (conf/dataset)                     paper
=================  ==========================================  ===============================
Classification     mnist, cifar10, svhn, synthetic, shapes     Chen et al. 2018 Table 1,
                                                               Dupont et al. 2019 Section 5
PointRegression    g_1d, annulus, annulus_wedge                Dupont et al. 2019 Sections 3-4
TrajectoryFit      spiral_system, random_matrix, lotka_vol...  seed 001 (dynamical systems)
LatentSequence     spirals                                     Chen et al. 2018 Table 2
=================  ==========================================  ===============================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .solvers import Gradient, odesolve


class Classification:
    """Image classification: cross-entropy, training and test error (%), Chen et al. 2018
    Table 1.

    ``data``: a :class:`nodebench.data.TensorDataset` (uint8 images (N, C, H, W), int64 labels);
    batches are (x float in [0, 1], y); the last incomplete training batch is dropped.
    """

    name = "classification"
    train_columns = ("train_error",)
    eval_columns = ("test_error",)
    target = "test_error"
    unit = "images"

    def __init__(self, data) -> None:
        self.data = data

    @property
    def train_size(self) -> int:
        return int(self.data.train_x.shape[0])

    @property
    def test_size(self) -> int:
        return int(self.data.test_x.shape[0])

    def to(self, device: torch.device) -> Classification:
        self.data = self.data.to(device)
        return self

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.data.batches_per_epoch(batch_size)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator:
        return self.data.train_batches(batch_size, generator)

    def channels_last(self, batch: tuple) -> tuple:
        x, y = batch
        return x.contiguous(memory_format=torch.channels_last), y

    def loss(self, model: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = model(x)
        return nn.functional.cross_entropy(logits, y), logits

    def count(self, batch: tuple, logits: torch.Tensor) -> dict:
        y = batch[1]
        return {"seen": y.numel(), "wrong": (logits.argmax(1) != y).sum().item()}

    def train_stats(self, sums: dict) -> dict:
        return {"train_error": 100.0 * sums["wrong"] / max(sums["seen"], 1)}

    def evaluate(self, model: nn.Module, batch_size: int) -> tuple[dict, int]:
        """Test error (%) over the whole test set, and the number of evaluation batches."""
        wrong, total, batches = 0, 0, 0
        for x, y in self.data.test_batches(batch_size):
            wrong += (model(x).argmax(1) != y).sum().item()
            total += y.numel()
            batches += 1
        return {"test_error": 100.0 * wrong / max(total, 1)}, batches

    def check_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``size`` test images and their labels (no random numbers drawn)."""
        return next(iter(self.data.test_batches(int(size))))

    check_loss = staticmethod(nn.functional.cross_entropy)

    def save_artifacts(self, model: nn.Module, run_dir: Path) -> None:
        return None


POINT_LOSSES = {"mse": nn.functional.mse_loss, "smooth_l1": nn.functional.smooth_l1_loss}


class PointRegression:
    """Regression of a scalar target in {-1, +1} on points (N, d): Dupont et al. 2019, Sections
    3-4 (g_1d, the annulus, the annulus with a held-out wedge).

    Loss: ``mse`` (the paper's) or ``smooth_l1``, mean over the batch. Columns: training sign
    accuracy (fraction of points whose output has the target's sign, over the epoch's batches),
    test loss and test sign accuracy. Batches are shuffled, the last one may be smaller (the
    authors' data loader). ``save_artifacts`` writes ``features.pt`` (h(1) of every training and
    test point, 60 trajectories at 21 times in [0, 1]) for the report's figures.
    """

    name = "regression"
    train_columns = ("train_accuracy",)
    eval_columns = ("test_loss", "test_accuracy")
    target = "test_loss"
    unit = "points"

    def __init__(self, data, loss: str = "mse") -> None:
        if loss not in POINT_LOSSES:
            from .errors import ConfigError
            raise ConfigError(f"dataset.task.loss must be one of {', '.join(POINT_LOSSES)}, "
                              f"got {loss!r}")
        self.data, self.loss_name = data, loss
        self.loss_fn = POINT_LOSSES[loss]

    @property
    def train_size(self) -> int:
        return int(self.data.x.shape[0])

    @property
    def test_size(self) -> int:
        return int(self.data.test_x.shape[0])

    def to(self, device: torch.device) -> PointRegression:
        d = self.data
        d.x, d.y, d.test_x, d.test_y = (v.to(device) for v in (d.x, d.y, d.test_x, d.test_y))
        return self

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.train_size / batch_size)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator:
        return self.data.batches(batch_size, generator)

    def loss(self, model: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        out = model(x)
        return self.loss_fn(out, y), out

    def count(self, batch: tuple, out: torch.Tensor) -> dict:
        y = batch[1]
        return {"seen": y.shape[0], "right": (torch.sign(out) == y).sum().item()}

    def train_stats(self, sums: dict) -> dict:
        return {"train_accuracy": sums["right"] / max(sums["seen"], 1)}

    def evaluate(self, model: nn.Module, batch_size: int) -> tuple[dict, int]:
        x, y = self.data.test_x, self.data.test_y
        loss, right, batches = 0.0, 0, 0
        for start in range(0, x.shape[0], batch_size):
            out = model(x[start:start + batch_size])
            target = y[start:start + batch_size]
            loss += self.loss_fn(out, target, reduction="sum").item()
            right += (torch.sign(out) == target).sum().item()
            batches += 1
        n = max(x.shape[0], 1)
        return {"test_loss": loss / n, "test_accuracy": right / n}, batches

    def check_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.test_x[:size], self.data.test_y[:size]

    def check_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(out, y)

    def save_artifacts(self, model: nn.Module, run_dir: Path) -> None:
        d = self.data
        with torch.no_grad():
            keep = torch.randperm(d.x.shape[0], generator=torch.Generator().manual_seed(0))[:60]
            keep = keep.to(d.x.device)
            torch.save({"x": d.x.cpu(), "y": d.y.cpu(), "features": model.features(d.x).cpu(),
                        "test_x": d.test_x.cpu(), "test_y": d.test_y.cpu(),
                        "test_features": model.features(d.test_x).cpu(),
                        "traj_index": keep.cpu(),
                        "trajectory": model.trajectory(
                            d.x[keep], torch.linspace(0.0, 1.0, 21, device=d.x.device)).cpu()},
                       run_dir / "features.pt")


class TrajectoryFit:
    """Fit of an autonomous ODE-Net dy/dt = f(y) to one trajectory (seed 001, after torchdiffeq's
    ode_demo).

    ``data``: a :class:`nodebench.dynamics.TrajectoryData`. An epoch is ``batches`` iterations; each
    batch is ``batch_size`` random sub-trajectories of ``batch_time`` consecutive observed points
    of the training window (:func:`nodebench.dynamics.sub_trajectories`), solved from their first
    points; the loss is ``l1`` (the seed's) or ``mse`` between solved and observed points.
    Evaluation solves the learned field once from y0 over the whole time range (at most
    ``eval_max_num_steps`` steps) and reports the MSE against the truth in the training window
    (``fit_mse``) and after it (``extrap_mse``), and each divided by the variance of the truth in
    the window (``fit_rel``, ``extrap_rel``; dimensionless). No ODE block of the validity checks:
    they are skipped.
    """

    name = "trajectory"
    train_columns = ()
    eval_columns = ("fit_mse", "fit_rel", "extrap_mse", "extrap_rel", "fit_var", "extrap_var")
    target = "fit_mse"
    unit = "observed points"

    def __init__(self, data, batches: int = 50, batch_time: int = 10, loss: str = "l1",
                 eval_max_num_steps: int | None = 20000) -> None:
        from .errors import ConfigError

        if loss not in ("l1", "mse"):
            raise ConfigError(f"dataset.task.loss must be l1 or mse, got {loss!r}")
        for key, value in (("batches", batches), ("batch_time", batch_time)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"dataset.task.{key} must be a positive integer, got {value!r}")
        self.data, self.batches = data, batches
        self.batch_time = min(batch_time, len(data.obs_train))
        self.loss_fn = nn.functional.l1_loss if loss == "l1" else nn.functional.mse_loss
        self.eval_max_num_steps = eval_max_num_steps

    @property
    def train_size(self) -> int:
        return len(self.data.obs_train)

    @property
    def test_size(self) -> int:
        return len(self.data.t)

    def to(self, device: torch.device) -> TrajectoryFit:
        self.data = self.data.to(device)
        return self

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.batches

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator:
        from .dynamics import sub_trajectories

        d = self.data
        for _ in range(self.batches):
            yield sub_trajectories(d.obs_train, d.y_train, self.batch_time, batch_size, generator)

    def loss(self, model: nn.Module, batch: tuple) -> tuple[torch.Tensor, None]:
        y0, union, pos, target = batch
        out = model(y0, union.to(y0.dtype) * self.data.dt)  # (U, B, dim)
        out = out[pos, torch.arange(pos.shape[0], device=pos.device)[:, None]]  # (B, T, dim)
        return self.loss_fn(out, target), None

    def count(self, batch: tuple, out: None) -> dict:
        return {"seen": batch[0].shape[0]}

    def train_stats(self, sums: dict) -> dict:
        return {}

    def predict(self, model: nn.Module) -> torch.Tensor:
        """The learned trajectory from y0 over the whole grid, (N, dim) float32."""
        d = self.data
        solver = dataclasses.replace(model.solver, max_num_steps=self.eval_max_num_steps)
        return odesolve(model.func, d.y_train[:1], d.t - d.t[0], solver,
                        Gradient("direct"))[:, 0, :]

    def evaluate(self, model: nn.Module, batch_size: int) -> tuple[dict, int]:
        from .dynamics import trajectory_errors
        from .errors import SolverFailure

        pred = self.predict(model)
        if not bool(torch.isfinite(pred).all()):
            raise SolverFailure("non-finite learned trajectory")
        return trajectory_errors(self.data.y, pred.double(), self.data.train_end), 1

    def check_batch(self, size: int) -> None:
        return None

    check_loss = None

    def save_artifacts(self, model: nn.Module, run_dir: Path) -> None:
        d = self.data
        with torch.no_grad():
            pred = self.predict(model).cpu()
        torch.save({"t": d.t.cpu(), "true": d.y.float().cpu(), "pred": pred,
                    "observed": d.observed.cpu(), "train_end": d.train_end},
                   run_dir / "trajectory.pt")


class LatentSequence:
    """Latent ODE and RNN baselines on irregularly observed spirals: Chen et al. 2018, section 5.1
    and Table 2 (:mod:`nodebench.latent`).

    ``data``: a :class:`nodebench.latent.SpiralData` (the spirals and their ``n`` observations).
    Batches are the observations of ``batch_size`` training spirals (shuffled, the last incomplete
    batch dropped). Loss: the latent ODE's negative ELBO per spiral (one reparameterised sample,
    Gaussian likelihood with fixed std ``obs_std``), or an RNN's Gaussian NLL of the next
    observation per predicted point. Evaluation on the test spirals: ``test_rmse`` (predictive
    RMSE of the extrapolation window against the noisy points: Table 2's number),
    ``test_rmse_clean`` (against the noise-free curve) and ``recon_rmse`` (at the observed points).
    The latent ODE calls ``odesolve`` itself (no ODE block): the validity checks are skipped.
    ``save_artifacts`` writes ``predictions.pt`` (``keep`` test spirals) for the report's figure.
    """

    name = "latent"
    train_columns = ()
    eval_columns = ("test_rmse", "test_rmse_clean", "recon_rmse")
    target = "test_rmse"
    unit = "spirals"

    def __init__(self, data, obs_std: float = 0.1, keep: int = 4) -> None:
        self.data, self.obs_std, self.keep = data, float(obs_std), int(keep)

    @property
    def train_size(self) -> int:
        return self.data.spirals.config.n_train

    @property
    def test_size(self) -> int:
        c = self.data.spirals.config
        return c.n_spirals - c.n_train

    def to(self, device: torch.device) -> LatentSequence:
        self.data = self.data.to(device)
        return self

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.train_size // batch_size

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator:
        order = torch.randperm(self.train_size, generator=generator)
        for start in range(0, self.train_size - batch_size + 1, batch_size):
            yield self.data.obs[order[start:start + batch_size].to(self.data.obs.x.device)]

    def loss(self, model: nn.Module, obs) -> tuple[torch.Tensor, None]:
        from .latent import LatentODE

        if isinstance(model, LatentODE):
            s = self.data.spirals
            loglik, kl = model.elbo(obs.x, obs.t, obs.idx, s.t[s.window], self.obs_std)
            return -(loglik - kl).mean(), None
        return model.nll(obs.x, obs.t), None

    def count(self, obs, out: None) -> dict:
        return {"seen": obs.x.shape[0]}

    def train_stats(self, sums: dict) -> dict:
        return {}

    def evaluate(self, model: nn.Module, batch_size: int) -> tuple[dict, int]:
        from .latent import predict, rmse

        s = self.data.spirals
        p = predict(model, s, self.data.obs, s.test)
        return {"test_rmse": rmse(p["extrap"], s.noisy[s.test][:, s.extrap]),
                "test_rmse_clean": rmse(p["extrap"], s.clean[s.test][:, s.extrap]),
                "recon_rmse": rmse(p["recon"], p["recon_target"])}, 1

    def check_batch(self, size: int) -> None:
        return None

    check_loss = None

    def save_artifacts(self, model: nn.Module, run_dir: Path) -> None:
        from .latent import predict

        s, c = self.data.spirals, self.data.spirals.config
        k = min(self.keep, c.n_spirals - c.n_train)
        test = torch.arange(c.n_train, c.n_train + k)
        o = self.data.obs[test]
        p = predict(model, s, self.data.obs, test)
        torch.save({"t": s.t.cpu(), "n_window": c.n_window, "clean": s.clean[test].cpu(),
                    "noisy": s.noisy[test].cpu(), "obs_idx": o.idx.cpu(), "obs_x": o.x.cpu(),
                    **{key: value.detach().cpu() for key, value in p.items()}},
                   run_dir / "predictions.pt")
