"""The trainer: DomainBed protocol, any registered method, checkpoints that resume exactly.

Determinism: every random choice of step `s` (which images, which crops, dropout) comes from
generators seeded with (seed, s), so a run resumed from a checkpoint repeats the uninterrupted
run bit for bit on the same machine, and two CPU runs with one seed are identical.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.metadata
import math
import os
import platform
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import TextColumn
from safetensors.torch import load_file, save_file

from dgkit import __version__
from dgkit.atomic import atomic_path
from dgkit.data import (
    DomainData,
    check_targets,
    discover,
    prompt_names,
    split_sources,
)
from dgkit.distill import data_store, distributed
from dgkit.distill.augment import augment, to_device
from dgkit.distill.averaging import SMA, SWAD, LossValley, refresh_batchnorm
from dgkit.distill.methods import Batch, MethodContext, get_method, hparams_dict, parse_hparams
from dgkit.distill.students import Student, build_backbone, build_head, check_student_name
from dgkit.errors import DgkitError, Interrupted
from dgkit.preprocess import PreprocessSpec
from dgkit.progress import console, make_progress
from dgkit.records import RunConfig, StudentSpec, Summary
from dgkit.rundir import RunDir
from dgkit.teacher_spec import (
    DEFAULT_TEACHER,
    RISE_TEMPLATES,
    TEACHER_LOGIT_SCALE,
    TeacherSpec,
)
from dgkit.train_config import TrainConfig

SLOW_CHECK_STEPS = 3  # steps timed before estimating how long the run takes
SLOW_HOURS = 1.0  # a CPU run estimated longer than this gets a warning


def step_seed(seed: int, step: int, what: str) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{what}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def lr_factor(config: TrainConfig, step: int, start: int = 0, end: int | None = None
              ) -> float:
    """Linear warm-up, then cosine to zero, x0.1 at each of --lr-drops, or constant, over the
    stage of steps [start, end) (the whole run unless the method has stages)."""
    step, length = step - start, (config.steps if end is None else end) - start
    warmup = min(config.warmup, length)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, length - warmup)
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if config.schedule == "step":
        return 0.1 ** sum(progress >= drop for drop in config.lr_drops)
    return 1.0


def pick_device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(config.device)


class DomainSampler:
    """Balanced batches: each source domain contributes its share, walking its own seeded
    epoch permutations, so the indices of step s depend only on (seed, s)."""

    def __init__(self, domain_rows: list[np.ndarray], batch_size: int, seed: int) -> None:
        self.rows = domain_rows
        self.seed = seed
        n = len(domain_rows)
        self.shares = [batch_size // n + (1 if d < batch_size % n else 0) for d in range(n)]
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.rows):
                self._perms.clear()
            rng = np.random.default_rng(step_seed(self.seed, epoch, f"domain{d}"))
            self._perms[key] = self.rows[d][rng.permutation(len(self.rows[d]))]
        return self._perms[key]

    def batch(self, step: int) -> np.ndarray:
        out = []
        for d, share in enumerate(self.shares):
            n = len(self.rows[d])
            positions = np.arange(step * share, (step + 1) * share)
            out.extend(self._perm(d, p // n)[p % n] for p in positions)
        return np.asarray(out, dtype=np.int64)


@dataclass
class Prepared:
    """Everything the loop needs, built once: data on the device, model, method, teacher."""

    data: DomainData
    target_ids: list[int]
    source_ids: list[int]
    prompt_names: list[str]
    # uint8 [N, 3, S, S] on the device, all decoded samples; or, with --data-store disk, their
    # store on disk, whose [rows] gathers those rows onto the device
    pixels: torch.Tensor | data_store.DiskPixels
    labels: torch.Tensor
    domains: torch.Tensor
    train_rows: np.ndarray  # rows of `pixels`
    val_rows: dict[str, np.ndarray]
    target_rows: dict[str, np.ndarray]
    teacher: Any
    teacher_rows: torch.Tensor | None  # [N, D] cached teacher embeddings per pixel row
    text: torch.Tensor | None  # [C, D]
    bad: list[tuple[str, str]]


class _StopAtStepBoundary:
    """Ctrl-C finishes the current step before the checkpoint, so the checkpoint's step count
    matches its weights and a resume repeats nothing; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class Session:
    """The mutable training objects of one run."""

    prep: Prepared
    student: Student
    method: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    averager: Any
    sampler: DomainSampler
    feed: data_store.BatchFeed | None = None  # training batches read ahead from a disk store


def _scores(model: torch.nn.Module, prep: Prepared, rows: np.ndarray, batch: int,
            device: torch.device, bf16: bool) -> tuple[float, float]:
    """Accuracy in percent and mean cross-entropy (SWAD's validation loss) on `rows`."""
    if len(rows) == 0:
        return float("nan"), float("nan")
    correct, loss = 0, 0.0
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for chunk, pixels in data_store.batches(prep.pixels, rows, batch):
            idx = torch.from_numpy(chunk).to(device)
            x = pixels.float() / 255.0
            logits = model(x).float()
            correct += (logits.argmax(-1) == prep.labels[idx]).sum().item()
            loss += F.cross_entropy(logits, prep.labels[idx], reduction="sum").item()
    return 100.0 * correct / len(rows), loss / len(rows)


class Trainer:
    def __init__(self, config: TrainConfig, run: RunDir, quiet: bool = False) -> None:
        self.config = config
        self.run = run
        self.quiet = quiet or not distributed.is_main()
        self.device = pick_device(config)
        self.bf16 = self.device.type == "cuda" and config.precision in ("auto", "bf16")
        self.method_cls = get_method(config.method)
        self.hparams = parse_hparams(self.method_cls, config.hparams)
        if (fixed := self.method_cls.total_steps(self.hparams)) is not None:
            if "steps" in config.overrides and config.steps != fixed:
                raise DgkitError(f"--steps does not apply to --method {config.method}: its "
                                 f"length is fixed by its own options ({fixed} steps); see "
                                 f"dgkit methods {config.method}")
            config.steps = fixed
        if self.method_cls.needs_teacher and not config.teacher:
            config.teacher = DEFAULT_TEACHER
        if config.templates is None:
            config.templates = list(self.method_cls.templates or RISE_TEMPLATES)

    # ---------------------------------------------------------------- preparation
    def prepare(self) -> Prepared:
        cfg = self.config
        data = discover(cfg.data)
        for warning in data.warnings:
            console.print(f"[yellow]warning:[/] {warning}")
        target_ids, source_ids = check_targets(data, cfg.targets)
        names = prompt_names(data.classes, cfg.class_names_file)
        train_idx, val_idx = split_sources(data, source_ids, cfg.seed)
        target_idx = np.array([i for i, s in enumerate(data.samples) if s.domain in target_ids],
                              dtype=np.int64)
        every = np.concatenate([train_idx, val_idx, target_idx])
        teacher = text = teacher_rows = None
        if self.method_cls.needs_teacher or cfg.teacher:  # before decoding: its errors first
            from dgkit.distill.teacher import load_teacher

            teacher = load_teacher(cfg.teacher, self.device)
        spec = PreprocessSpec(input_size=cfg.image_size, resize_size=cfg.image_size)
        decoded = data_store.load(cfg, data, every, spec, self.device, self.quiet)
        bad = [(str(p), why) for p, why in decoded.bad]
        if bad and not cfg.skip_bad:
            listing = "; ".join(f"{p} ({why})" for p, why in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise DgkitError(f"{len(bad)} image(s) cannot be decoded: {listing}{more}; fix or "
                             "remove them (dgkit data check lists all), or pass --skip-bad")
        if bad:
            console.print(f"[yellow]warning:[/] skipped {len(bad)} unreadable image(s) "
                          "(--skip-bad); dgkit data check lists them")
        row_of = {int(s): r for r, s in enumerate(decoded.indices)}
        rows = lambda idx: np.array([row_of[int(i)] for i in idx if int(i) in row_of],  # noqa: E731
                                    dtype=np.int64)
        labels = torch.tensor([data.samples[i].label for i in decoded.indices])
        domains = torch.tensor([data.samples[i].domain for i in decoded.indices])
        val_rows = {data.domains[d]: rows([i for i in val_idx if data.samples[i].domain == d])
                    for d in source_ids}
        target_rows = {data.domains[d]: rows([i for i in target_idx
                                              if data.samples[i].domain == d])
                       for d in target_ids}
        pixels = decoded.pixels
        if teacher is not None:
            from dgkit.distill import cache

            text = cache.text_embeddings(teacher, self.run, names, cfg.templates).to(self.device)
            # At the teacher's size, its embeddings come from the images decoded for training.
            same = teacher.image_size == cfg.image_size
            teacher_rows = cache.image_embeddings(teacher, self.run, data, decoded.indices,
                                                  decoded.hashes, self.device,
                                                  pixels=pixels if same else None)
        return Prepared(data, target_ids, source_ids, names, pixels.to(self.device),
                        labels.to(self.device), domains.to(self.device), rows(train_idx),
                        val_rows, target_rows, teacher,
                        None if teacher_rows is None else teacher_rows.to(self.device), text, bad)

    def build(self, prep: Prepared) -> tuple[Student, Any, StudentSpec]:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        backbone = build_backbone(cfg.student, cfg.student_weights)
        ctx = MethodContext(
            num_classes=len(prep.data.classes), class_names=prep.prompt_names,
            source_domains=[prep.data.domains[d] for d in prep.source_ids],
            total_steps=cfg.steps,
            steps_per_epoch=max(1, math.ceil(len(prep.train_rows) / cfg.batch_size)),
            num_images=len(prep.labels), feature_dim=backbone.feature_dim,
            text_embeddings=prep.text, teacher=prep.teacher)
        method = self.method_cls(self.hparams, ctx)
        head = method.head_kind()
        spec = StudentSpec(backbone=cfg.student, head=head, feature_dim=backbone.feature_dim,
                           num_classes=len(prep.data.classes),
                           embed_dim=None if head == "linear" else prep.text.shape[1],
                           input_size=cfg.image_size, mean=tuple(backbone.mean),
                           std=tuple(backbone.std))
        student = Student(backbone, build_head(spec))
        method.init_head(student.head)
        student, method = student.to(self.device), method.to(self.device)
        if cfg.channels_last:
            student = student.to(memory_format=torch.channels_last)
        if cfg.compile:
            student.backbone.compile()  # in place: state_dict keys stay the same
            if prep.teacher is not None and cfg.teacher_mode == "online":
                prep.teacher.model.visual.compile()
        return student, method, spec

    # ---------------------------------------------------------------- the loop
    def _optimizer(self, params: list[torch.nn.Parameter], method: Any
                   ) -> torch.optim.Optimizer:
        """One parameter group at the run's learning rate, plus the method's own groups (SCMD's
        logit scale); each group's `base_lr` is scaled by the schedule every step."""
        cfg = self.config
        own = method.param_groups()
        taken = {id(p) for group in own for p in group["params"]}
        groups = [{"params": [p for p in params if id(p) not in taken], "base_lr": cfg.lr},
                  *({**group, "base_lr": group["lr"],
                     "params": [p for p in group["params"] if p.requires_grad]} for group in own)]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)  # RISE's: no Nesterov
        kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        return kind(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                    fused=self.device.type == "cuda")

    def _averager(self, student: Student, start: int = 0) -> Any:
        """torch's AveragedModel for ema and swa; SMA and SWAD from `averaging`. `start` is the
        first step of the stage the average belongs to."""
        from torch.optim import swa_utils

        cfg = self.config
        if cfg.average == "sma":
            return SMA(student, start + cfg.sma_start)
        if cfg.average == "swad":
            return SWAD(LossValley(cfg.swad_n_converge, cfg.swad_n_tolerance,
                                   cfg.swad_tolerance_ratio))
        if self.config.average == "ema":
            return swa_utils.AveragedModel(
                student, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(self.config.ema_decay),
                use_buffers=True)
        if self.config.average == "swa":
            return swa_utils.AveragedModel(student, use_buffers=True)
        return None

    def setup(self, prep: Prepared) -> Session:
        """Student, method, optimiser, averager and sampler for a prepared run."""
        student, method, spec = self.build(prep)
        if distributed.is_main():
            self.run.write_student_spec(spec)
        params = [p for p in [*student.parameters(), *method.parameters()] if p.requires_grad]
        train_rows = torch.from_numpy(prep.train_rows).to(self.device)
        sampler = DomainSampler(
            [prep.train_rows[(prep.domains[train_rows] == d).cpu().numpy()]
             for d in prep.source_ids], self.config.batch_size, self.config.seed)
        feed = (data_store.BatchFeed(prep.pixels, sampler.batch, distributed.shard())
                if isinstance(prep.pixels, data_store.DiskPixels) else None)
        return Session(prep, student, method, params, self._optimizer(params, method),
                       self._averager(student), sampler, feed)

    def _stage(self, s: Session, step: int) -> tuple[int, int]:
        """[start, end) of the method's stage that `step` belongs to."""
        starts = [*s.method.stage_starts(), self.config.steps]
        k = max(i for i, b in enumerate(starts[:-1]) if b <= step)
        return starts[k], starts[k + 1]

    def _begin_stage(self, s: Session, state: dict, step: int) -> None:
        """A new stage starts from the previous stage's best-validation weights (VL2V's stage 2
        loads stage 1's best checkpoint), with a fresh optimiser and average; model selection
        then considers this stage alone."""
        distributed.broadcast_object(None)  # rank 0 has written the best weights
        if state["best"] is not None:
            best = load_file(self.run.student, device=str(self.device))
            s.student.load_state_dict(best)
        s.optimizer = self._optimizer(s.params, s.method)
        s.averager = self._averager(s.student, start=step)
        if not self.quiet:
            where = ("" if state["best"] is None else
                     f" from the best-validation weights of step {state['best']['step']}")
            console.print(f"stage {s.method.stage_starts().index(step) + 1} starts at step "
                          f"{step}{where}, with a fresh optimiser")
        state["best"] = None

    def step(self, s: Session, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step; every random choice is seeded by (seed, step)."""
        cfg, device, prep = self.config, self.device, s.prep
        s.student.train()
        s.method.train()
        s.method.set_trainable(s.student, step)
        rows = to_device(torch.from_numpy(s.sampler.batch(step)), device)
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, "augment"))
        torch.manual_seed(step_seed(cfg.seed, step, "torch"))
        images = augment(self._batch_pixels(s, step, rows), gen, cfg.image_size,
                         cfg.augmentation)
        if distributed.world() > 1:  # the same global batch everywhere; one slice each
            rows, images = rows[distributed.shard()], images[distributed.shard()]
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        batch = Batch(images, prep.labels[rows], prep.domains[rows], rows, step)
        if prep.teacher is not None:
            if cfg.teacher_mode == "online":
                with torch.autocast(device.type, torch.bfloat16, enabled=self.bf16):
                    emb = prep.teacher.encode_images(images)
            else:
                emb = prep.teacher_rows[rows]
            batch.teacher_embeddings = emb
            batch.teacher_logits = TEACHER_LOGIT_SCALE * emb @ prep.text.T
        batch = s.method.select(s.student, batch)
        start, end = self._stage(s, step)
        factor = lr_factor(cfg, step, start, end)
        for group in s.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        with torch.autocast(device.type, torch.bfloat16, enabled=self.bf16):
            features = s.student.features(batch.images)
            logits = s.student.head(features)
            terms = s.method.losses(s.student, features.float(), logits.float(), batch)
        s.optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        distributed.average_gradients(s.params)
        s.optimizer.step()
        distributed.sync_buffers(s.student)
        s.method.after_step(step)
        if isinstance(s.averager, SMA | SWAD):
            s.averager.update(s.student, step)
        elif s.averager is not None and (cfg.average == "ema" or step + 1 - start >= (
                cfg.swa_start * (end - start))):
            s.averager.update_parameters(s.student)
        return terms

    def train(self, resume: bool = False) -> Summary | None:
        cfg, run = self.config, self.run
        s = self.setup(prep := self.prepare())
        state = {"step": 0, "best": None}
        if resume and run.checkpoint.is_file():
            state = self._load_checkpoint(s)
            run.keep_metrics_until(state["step"])
        elif not resume:
            run.metrics.unlink(missing_ok=True)
        main = distributed.is_main()
        writer = self._tensorboard(state["step"]) if main else None
        # Loss terms summed on the device since the last evaluation (no sync per step); a
        # checkpoint keeps them, so a resumed run logs the means an uninterrupted one does.
        running = {k: torch.tensor(v, device=self.device)
                   for k, v in state.get("running", {}).items()}
        counted, tick, step, next_report = (state.get("counted", 0), time.perf_counter(),
                                            state["step"], 0.0)

        def checkpoint() -> None:
            state.update(step=step, running={k: v.item() for k, v in running.items()},
                         counted=counted)
            self._save_checkpoint(state, s)

        began, first = tick, step
        bar = None if self.quiet else make_progress(TextColumn("{task.fields[info]}"))
        task = bar.add_task("Training", total=cfg.steps, completed=step, info="") if bar else None
        stop = _StopAtStepBoundary()
        try:
            if bar:
                bar.start()
            stage_ends = s.method.stage_starts()[1:] + [cfg.steps]
            swad = s.averager if isinstance(s.averager, SWAD) else None
            while step < cfg.steps:
                if stop.requested:
                    raise KeyboardInterrupt
                if step in stage_ends:
                    self._begin_stage(s, state, step)
                swad = s.averager if isinstance(s.averager, SWAD) else None
                terms = self.step(s, step)
                step += 1
                if step == first + SLOW_CHECK_STEPS and main:
                    self._warn_if_slow(time.perf_counter() - began, cfg.steps - step)
                for k, v in terms.items():
                    running[k] = running.get(k, 0.0) + v.detach()
                counted += 1
                boundary = step % cfg.eval_interval == 0 or step in stage_ends
                evaluate = main and boundary
                if evaluate or time.perf_counter() > next_report:  # twice a second at most
                    next_report = time.perf_counter() + 0.5
                    losses = {k: v.item() / counted for k, v in running.items()}
                    if not all(math.isfinite(v) for v in losses.values()):
                        raise DgkitError(f"the loss became {losses} by step {step}; lower --lr "
                                         f"(now {cfg.lr})")
                    ips = counted * cfg.batch_size / max(1e-9, time.perf_counter() - tick)
                    if writer:  # at every report, not only evaluations (the mean since the
                        for k, v in losses.items():  # last evaluation)
                            writer.add_scalar(f"loss/{k}", v, step)
                    if bar:
                        info = " ".join(f"{k} {v:.3f}" for k, v in losses.items())
                        bar.update(task, completed=step, info=f"{info}  {ips:,.0f} img/s")
                if evaluate:
                    # SWAD's valley follows the validation loss of the network being trained
                    model = s.student if swad or s.averager is None else s.averager.module
                    row = self._evaluate(prep, model, step, state, losses, ips, s.optimizer,
                                         writer)
                    if swad:
                        swad.evaluated(row["source_val_loss_mean"])
                    running, counted, tick = {}, 0, time.perf_counter()
                if swad and boundary and distributed.broadcast_object(
                        swad.dead if main else None):  # rank 0 decides; every rank follows
                    end = next(e for e in stage_ends if e >= step)
                    if not self.quiet:
                        what = "training" if end == cfg.steps else "this stage"
                        console.print(f"SWAD: the validation loss left its valley by step {step}"
                                      f"; {what} stops there, as the authors' does")
                    if end == cfg.steps:
                        break
                    step = end
                if main and (step % cfg.checkpoint_interval == 0 or step in stage_ends) and \
                        step < cfg.steps:
                    checkpoint()
            if swad and main:
                self._finish_swad(s, state, step)
        except KeyboardInterrupt:
            if bar:
                bar.stop()
            if main:
                checkpoint()
            raise Interrupted(f"interrupted at step {step}; continue with dgkit distill "
                              f"--resume {run.path}") from None
        finally:
            stop.restore()
            if s.feed:
                s.feed.close()
            if bar:
                bar.stop()
            if writer:
                writer.close()
        if not main:
            return None
        run.checkpoint.unlink(missing_ok=True)
        return self._write_summary(prep, state, finished=True)

    def _warn_if_slow(self, seconds: float, steps_left: int) -> None:
        """On a CPU, the defaults (sized for a GPU) take hours: say so once, with the estimate
        from the first steps and settings that fit."""
        hours = seconds / SLOW_CHECK_STEPS * steps_left / 3600
        if self.device.type != "cpu" or hours < SLOW_HOURS:
            return
        cfg = self.config
        console.print(f"[yellow]warning:[/] on this CPU these settings ({cfg.steps} steps of "
                      f"{cfg.batch_size} images at {cfg.image_size} px) take about {hours:.1f} "
                      "h; for a first try pass --recipe fast --steps 300 --image-size 96 "
                      "--batch-size 24, or train on a GPU",
                      soft_wrap=True)

    # ---------------------------------------------------------------- evaluation
    def _measure(self, prep: Prepared, model: torch.nn.Module) -> dict[str, Any]:
        """Source-validation accuracy and loss (SWAD's: the mean over source domains of each
        one's mean cross-entropy, the authors' tr_outloss) and target accuracy, in eval mode."""
        cfg, dev = self.config, self.device
        model.eval()
        source = {d: _scores(model, prep, r, cfg.eval_batch_size, dev, self.bf16)
                  for d, r in prep.val_rows.items()}
        target = {d: _scores(model, prep, r, cfg.eval_batch_size, dev, self.bf16)[0]
                  for d, r in prep.target_rows.items()}
        return {"source_val": {d: a for d, (a, _) in source.items()},
                "source_val_mean": float(np.nanmean([a for a, _ in source.values()])),
                "source_val_loss": {d: v for d, (_, v) in source.items()},
                "source_val_loss_mean": float(np.nanmean([v for _, v in source.values()])),
                "target": target,
                "target_mean": float(np.mean(list(target.values()))) if target else None}

    def _evaluate(self, prep: Prepared, model: torch.nn.Module, step: int, state: dict,
                  losses: dict[str, float], ips: float, optimizer, writer) -> dict[str, Any]:
        row = {"step": step, **self._measure(prep, model), "losses": losses,
               "lr": optimizer.param_groups[0]["lr"], "images_per_s": round(ips, 1)}
        source, target = row["source_val"], row["target"]
        self.run.append_metrics(row)
        if writer:
            for d, v in source.items():
                writer.add_scalar(f"val/{d}", v, step)
            for d, v in target.items():
                writer.add_scalar(f"target/{d}", v, step)
            writer.add_scalar("val_loss", row["source_val_loss_mean"], step)
            writer.add_scalar("images_per_s", ips, step)
        best = state["best"]
        if best is None or row["source_val_mean"] > best["source_val_mean"]:
            # Model selection on training-domain validation only: this is the deployable student.
            state["best"] = {k: row[k] for k in ("step", "source_val", "source_val_mean",
                                                 "target", "target_mean")}
            weights = {k: v.detach().float().cpu().contiguous()
                       for k, v in _plain_state(model).items()}
            with atomic_path(self.run.student) as tmp:
                save_file(weights, str(tmp), metadata={"step": str(step)})
        if not self.quiet:
            held_out = "" if target else "  (no held-out domain)"
            if target:
                held_out = f"  target {row['target_mean']:.1f}"
            console.print(f"step {step}: source val {row['source_val_mean']:.1f}{held_out}  "
                          f"(best val at step {state['best']['step']})")
        self._write_summary(prep, state, finished=False)
        return row

    def _finish_swad(self, s: Session, state: dict, step: int) -> None:
        """The run's student becomes SWAD's average, evaluated after training as the authors do:
        BatchNorm statistics recomputed on source training batches, then measured and exported.
        Its window was chosen from source-validation losses alone; the target accuracy reported
        is this average's."""
        cfg, swad = self.config, s.averager
        mean = swad.result()
        model = copy.deepcopy(s.student)
        model.load_state_dict(mean.state)
        if cfg.swad_bn_batches:  # 0: BatchNorm statistics stay averaged
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                refresh_batchnorm(model, self._source_batches(s, step, cfg.swad_bn_batches),
                                  swad.batchnorm)
        row = self._measure(s.prep, model)
        valley = swad.valley
        how = ("the source-validation loss never converged: the last segment, as the authors' "
               "get_final_model" if valley.threshold is None else
               "the window chosen by the source-validation loss alone (LossValley, n_converge "
               f"{valley.n_converge}, n_tolerance {valley.n_tolerance}, tolerance_ratio "
               f"{valley.tolerance_ratio})")
        bn = (f"BatchNorm statistics recomputed on {cfg.swad_bn_batches} source training "
              "batches" if cfg.swad_bn_batches else "BatchNorm statistics averaged")
        selection = (f"SWAD: target accuracy of the dense average of the weights after steps "
                     f"{mean.first}-{mean.last}, {how}; {bn}")
        weights = {k: v.detach().float().cpu().contiguous()
                   for k, v in _plain_state(model).items()}
        with atomic_path(self.run.student) as tmp:  # one metadata key: its order is random
            save_file(weights, str(tmp), metadata={"step": str(mean.last)})
        state["best"] = {"step": mean.last, "selection": selection,
                         **{k: row[k] for k in ("source_val", "source_val_mean", "target",
                                                "target_mean")}}
        if not self.quiet:
            target = "" if row["target_mean"] is None else f"  target {row['target_mean']:.1f}"
            console.print(f"SWAD, steps {mean.first}-{mean.last}: source val "
                          f"{row['source_val_mean']:.1f}{target}")

    def _source_batches(self, s: Session, start: int, n: int):
        """The augmented source batches training would draw at steps start..start+n-1, each
        seeded by (seed, step): the authors' update_bn continues their training iterator."""
        cfg = self.config
        # Rank 0 alone refreshes, on whole batches: from disk, its own feed reads every row.
        feed = data_store.BatchFeed(s.feed.pixels, s.sampler.batch) if s.feed else None
        try:
            for k in range(start, start + n):
                rows = to_device(torch.from_numpy(s.sampler.batch(k)), self.device)
                gen = torch.Generator().manual_seed(step_seed(cfg.seed, k, "augment"))
                torch.manual_seed(step_seed(cfg.seed, k, "torch"))
                images = augment(s.prep.pixels[rows] if feed is None else feed(k), gen,
                                 cfg.image_size, cfg.augmentation)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                yield images
        finally:
            if feed:
                feed.close()

    @staticmethod
    def _batch_pixels(s: Session, step: int, rows: torch.Tensor) -> torch.Tensor:
        """The uint8 pixels of training step `step`'s batch `rows` on the device; from disk
        under torchrun, the rows of this rank's shard alone are read (the others are zeros:
        augmentation is per image, and each rank trains on its shard only)."""
        return s.prep.pixels[rows] if s.feed is None else s.feed(step)

    def _write_summary(self, prep: Prepared, state: dict, finished: bool) -> Summary:
        best = state["best"] or {}
        teacher = None
        if prep.teacher_rows is not None:
            hits = (prep.teacher_rows @ prep.text.T).argmax(-1) == prep.labels
            teacher = {prep.data.domains[d]: round(100.0 * hits[prep.domains == d].float()
                                                   .mean().item(), 2)
                       for d in range(len(prep.data.domains))}
        summary = Summary(
            finished=finished,
            target_domains=[prep.data.domains[d] for d in prep.target_ids],
            best_step=best.get("step"),
            target_accuracy=best.get("target"),
            target_accuracy_mean=best.get("target_mean"),
            source_val_accuracy=best.get("source_val"),
            source_val_accuracy_mean=best.get("source_val_mean"),
            teacher=self.config.teacher if prep.teacher is not None else None,
            teacher_zero_shot_accuracy=teacher,
            plumbing_check=self._plumbing_check(prep),
            skipped_images=len(prep.bad),
            **({"selection": best["selection"]} if "selection" in best else {}),
        )
        self.run.write_summary(summary)
        return summary

    def _plumbing_check(self, prep: Prepared) -> bool:
        """True when the teacher is a local checkpoint of a model with no published weights
        that dgkit teacher train did not train: its numbers only show that the pipeline runs."""
        if prep.teacher is None or not prep.teacher.spec.is_path:
            return False
        if prep.teacher.spec.training() is not None:
            return False
        import open_clip

        return not open_clip.list_pretrained_tags_by_model(prep.teacher.spec.model)

    # ---------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, state: dict, s: Session) -> None:
        payload = {"step": state["step"], "best": state["best"],
                   "running": state.get("running", {}), "counted": state.get("counted", 0),
                   "student": s.student.state_dict(), "method": s.method.state_dict(),
                   "optimizer": s.optimizer.state_dict(),
                   "averager": s.averager.state_dict() if s.averager else None}
        with atomic_path(self.run.checkpoint) as tmp:
            torch.save(payload, tmp)

    def _load_checkpoint(self, s: Session) -> dict:
        try:
            payload = torch.load(self.run.checkpoint, map_location=self.device,
                                 weights_only=True)
        except Exception as exc:
            raise DgkitError(f"checkpoint {self.run.checkpoint} cannot be read ({exc}); "
                             "start the run again with --overwrite") from exc
        s.student.load_state_dict(payload["student"])
        s.method.load_state_dict(payload["method"])
        s.optimizer.load_state_dict(payload["optimizer"])
        if s.averager is not None and payload["averager"] is not None:
            s.averager.load_state_dict(payload["averager"])
        return {"step": payload["step"], "best": payload["best"],
                "running": payload.get("running", {}), "counted": payload.get("counted", 0)}

    def _tensorboard(self, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is in the train extra; training still works without
            return None
        return SummaryWriter(str(self.run.tensorboard), purge_step=start_step or None)

    # ---------------------------------------------------------------- run.json
    def run_config(self) -> RunConfig:
        """run.json; checks the data, the targets and the student's name before any work."""
        data = discover(self.config.data)
        _, source_ids = check_targets(data, self.config.targets)
        check_student_name(self.config.student)
        if self.config.teacher:  # a missing checkpoint is said now, not after decoding
            spec = TeacherSpec.parse(self.config.teacher)
            if spec.is_path and spec.checkpoint is None:
                raise DgkitError(f"teacher checkpoint {spec.pretrained} does not exist")
        train_idx, _ = split_sources(data, source_ids, self.config.seed)
        self.config = self.config.for_data(len(source_ids), len(train_idx))
        cfg = dataclasses.replace(self.config, hparams=hparams_dict(self.hparams))
        return RunConfig(
            train=cfg,
            data_root=str(data.root.resolve()),
            domains=data.domains,
            source_domains=[d for d in data.domains if d not in cfg.targets],
            classes=data.classes,
            prompt_names=prompt_names(data.classes, cfg.class_names_file),
            preprocess=PreprocessSpec(cfg.image_size, cfg.image_size),
            dgkit_version=__version__,
            versions={"dgkit": __version__, "python": platform.python_version(),
                      "torch": torch.__version__, "numpy": np.__version__,
                      **_installed_versions("torchvision", "timm", "open_clip_torch")},
            host={"device": str(self.device), "cpus": os.cpu_count()},
        )


def _installed_versions(*packages: str) -> dict[str, str | None]:
    """Versions for run.json, None where a package is absent: ERM and PSD runs need no open_clip."""
    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict of a Student, unwrapping an AveragedModel."""
    module = getattr(model, "module", model)
    return {k: v for k, v in module.state_dict().items() if k != "n_averaged"}
