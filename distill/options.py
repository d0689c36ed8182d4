"""The training options `dgkit distill` and `dgkit bench dg` share: one help text for each.

Each alias carries the option's type and help; the defaults come from `TrainConfig`
(`dgkit.train_config.train_default`). Imported at every CLI start, so only typer is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Method = Annotated[str, typer.Option(help="erm, kd, ... (see dgkit methods).")]
RECIPE = " (default: the recipe's; dgkit methods METHOD lists it)"
Recipe = Annotated[str, typer.Option(
    help="paper: the method's authors' optimiser, schedule, batch, steps, augmentation, "
         "averaging and teacher (dgkit methods METHOD shows each value and its source); fast: "
         "AdamW 3e-4, cosine, 96 images a step, 3000 steps, for quick runs. Options given "
         "explicitly override the recipe.")]
Seed = Annotated[int, typer.Option(help="Seeds the split, sampling and augmentation.")]
Compile = Annotated[bool, typer.Option(
    help="torch.compile the student backbone (faster on GPU after a warm-up).")]
Data = Annotated[Path | None, typer.Option(help="Root of <domain>/<class>/<image>.")]
Student = Annotated[str, typer.Option(
    help="efficientnet_lite0, resnet18, resnet50, mobilenet_v3_large or timm:<name>.")]
StudentWeights = Annotated[str, typer.Option(
    help="imagenet, none, or a path to a backbone state dict.")]
Teacher = Annotated[str | None, typer.Option(
    help="open_clip MODEL:PRETRAINED or MODEL:/path/to/checkpoint" + RECIPE)]
TeacherMode = Annotated[str | None, typer.Option(
    help="online: the teacher sees the student's augmented view, as in the papers; cached: it "
         "embeds each image once, un-augmented, which trains about twice as fast" + RECIPE)]
Templates = Annotated[Path | None, typer.Option(
    help="Prompt templates file, one per line with {} for the class name "
         "(default: the method's authors' prompts, else RISE's ensemble).")]
ClassNames = Annotated[Path | None, typer.Option(
    help="File mapping class folders to prompt names (JSON or 'folder: name' lines).")]
Steps = Annotated[int | None, typer.Option(
    help="Training steps (vl2v's are its --align-steps plus --distill-steps)" + RECIPE)]
Epochs = Annotated[float | None, typer.Option(
    help="Training length in passes over the source training images, instead of --steps"
         + RECIPE)]
BatchSize = Annotated[int | None, typer.Option(
    help="Images per step, split evenly over the source domains" + RECIPE)]
BatchPerDomain = Annotated[int | None, typer.Option(
    help="Images per step from each source domain, instead of --batch-size" + RECIPE)]
Augment = Annotated[str | None, typer.Option(
    help="domainbed (crop 0.7-1, flip, colour jitter 0.3 with hue, grayscale), domainbed-nohue "
         "or rise (crop 0.8-1, jitter 0.4 with hue 0.4)" + RECIPE)]
ImageSize = Annotated[int, typer.Option(help="Square input size of the student.")]
Lr = Annotated[float | None, typer.Option(help="Peak learning rate" + RECIPE)]
Optimizer = Annotated[str | None, typer.Option(help="adamw, adam or sgd" + RECIPE)]
WeightDecay = Annotated[float | None, typer.Option(
    help="Decoupled (AdamW) or L2 (Adam, SGD) weight decay" + RECIPE)]
Schedule = Annotated[str | None, typer.Option(
    help="cosine, step (x0.1 at fixed fractions) or constant, after warm-up" + RECIPE)]
WarmupSteps = Annotated[int | None, typer.Option(
    help="Linear warm-up steps (fast recipe: 5% of --steps, at most 500)" + RECIPE)]
EvalEvery = Annotated[int | None, typer.Option(
    help="Evaluate every N steps (default: --steps / 10; --steps / 50 with --average swad, "
         "whose segments end at evaluations).")]
CheckpointEvery = Annotated[int | None, typer.Option(
    help="Checkpoint every N steps (default: --eval-every).")]
Average = Annotated[str | None, typer.Option(
    help="Weight averaging: none, ema, swa (uniform over the last quarter), sma (SCMD's simple "
         "moving average from --sma-start) or swad (SWAD: dense average over the window the "
         "source-validation loss chooses, BatchNorm recomputed; the final average is exported)"
         + RECIPE)]
SmaStart = Annotated[int | None, typer.Option(
    help="--average sma: the step from which every step's weights are averaged" + RECIPE)]
SwadNConverge = Annotated[int, typer.Option(
    help="--average swad: evaluations whose first loss is their lowest start the valley "
         "(n_converge).")]
SwadNTolerance = Annotated[int, typer.Option(
    help="--average swad: consecutive evaluations above the threshold end the valley "
         "(n_tolerance).")]
SwadToleranceRatio = Annotated[float, typer.Option(
    help="--average swad: threshold = (1 + ratio) x the mean loss at convergence "
         "(tolerance_ratio).")]
SwadBnBatches = Annotated[int, typer.Option(
    help="--average swad: source training batches that recompute the average's BatchNorm "
         "statistics (0: none).")]
EmaDecay = Annotated[float, typer.Option(help="EMA decay per step, with --average ema.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Precision = Annotated[str, typer.Option(help="auto (bf16 on GPU), fp32 or bf16.")]
SkipBad = Annotated[bool, typer.Option(
    help="Skip unreadable images instead of refusing to train.")]
DataStore = Annotated[str | None, typer.Option(
    help="Where the decoded training images live: memory (the default: all on the device, the "
         "fastest), "
         "disk (a memory-mapped store in the user cache, built once and shared by runs over "
         "the same data; for data sets larger than memory) or auto (memory when they fit in "
         "--memory-budget, else disk). The trained student is the same in every mode; with "
         "--resume it replaces the run's own.")]
MemoryBudget = Annotated[float | None, typer.Option(
    help="--data-store auto: the most GB the decoded images may take in memory (default: half "
         "the available host memory, or half the free GPU memory when that is less); with "
         "--resume it replaces the run's own.")]
Quiet = Annotated[bool, typer.Option(help="No progress bars.")]
