"""Training recipes: how each method's authors trained it (`paper`, the default) and dgkit's quick
recipe (`fast`: AdamW 3e-4, cosine, 96 images a step, for first tries and the quickstart).

A recipe sets training options (the `TrainConfig` fields named in it); every value carries the
file in the authors' repository that it comes from. Options given explicitly override the
recipe's value. The method's own hyper-parameters keep their defaults in the method's `Hparams`,
with their sources beside them (`Method.sources`). Imports only the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dgkit.errors import DgkitError
from dgkit.teacher_spec import DEFAULT_TEACHER
from dgkit.train_config import TrainConfig, train_default

RECIPES = TrainConfig.CHOICES["recipe"]


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str


DOMAINBED = "facebookresearch/DomainBed"
SCMD = "SeanLeng1/SCMD"
RISE = "WisconsinAIVision/RISE"
VL2V = "val-iisc/VL2V-ADiP"

# DomainBed's ERM, the protocol SCMD, VL2V-ADiP and SWAD build on (DomainBed at b93c22a).
ERM = {
    "optimizer": Setting("adam", f"{DOMAINBED} domainbed/algorithms.py:107-111"),
    "lr": Setting(5e-5, f"{DOMAINBED} domainbed/hparams_registry.py:214"),
    "weight_decay": Setting(0.0, f"{DOMAINBED} domainbed/hparams_registry.py:219"),
    "schedule": Setting("constant", f"{DOMAINBED} domainbed/algorithms.py:107-111 (no "
                                    "scheduler)"),
    "warmup_steps": Setting(0, f"{DOMAINBED} domainbed/algorithms.py:107-111 (no warm-up)"),
    "batch_per_domain": Setting(32, f"{DOMAINBED} domainbed/hparams_registry.py:233"),
    "steps": Setting(5001, f"{DOMAINBED} domainbed/datasets.py:55 (N_STEPS 5001), "
                           "scripts/train.py:206 (range(0, n_steps))"),
    "eval_every": Setting(300, f"{DOMAINBED} domainbed/datasets.py:234-235 (PACS "
                               "CHECKPOINT_FREQ)"),
    "augment": Setting("domainbed", f"{DOMAINBED} domainbed/datasets.py:199-208"),
    "average": Setting("none", f"{DOMAINBED} domainbed/algorithms.py (ERM: no averaging)"),
}

KD = {
    **ERM,
    "teacher": Setting(DEFAULT_TEACHER, "dgkit: the smallest OpenAI CLIP (Hinton KD on "
                                        "DomainBed's ERM, T = 3 as RISE and SCMD)"),
    "teacher_mode": Setting("online", "dgkit: the teacher sees the student's augmented batch, "
                                      "as in RISE, SCMD and VL2V-ADiP"),
}

PAPER: dict[str, dict[str, Setting]] = {
    "erm": ERM,
    "kd": KD,
    # PS-KD's own schedule (SGD 0.1, 300 epochs) trains CIFAR-100 from scratch
    # (lgcnsai/PS-KD-Pytorch main.py:55-62); on a pre-trained student dgkit uses DomainBed's.
    "psd": ERM,
    "scmd": {
        **ERM,
        "steps": Setting(5001, f"{SCMD} DomainBed/domainbed/datasets.py:317 (N_STEPS 5001), "
                               "scripts/train.py:265"),
        "teacher": Setting("ViT-B-32:openai",
                           f"{SCMD} DomainBed/domainbed/hparams_registry.py:94"),
        "teacher_mode": Setting("online", f"{SCMD} DomainBed/domainbed/algorithms.py:1297 "
                                          "(CLIP on the selected augmented batch)"),
        "average": Setting("sma", f"{SCMD} DomainBed/domainbed/hparams_registry.py:41 (SMA "
                                  "True)"),
        "sma_start": Setting(300, f"{SCMD} DomainBed/domainbed/algorithms.py:1268 "
                                  "(MovingAvg start_iter)"),
        "eval_every": Setting(300, f"{SCMD} DomainBed/domainbed/datasets.py:318, "
                                   "scripts/train.py:233-234"),
    },
    "rise": {
        "optimizer": Setting("sgd", f"{RISE} optimizer/optimizer_helper.py:9, "
                                    "train_rise.py:104-105 (nesterov False)"),
        "momentum": Setting(0.9, f"{RISE} optimizer/optimizer_helper.py:9"),
        "lr": Setting(1e-3, f"{RISE} train_rise.py:25 (TerraIncognita 2e-3: :258)"),
        "weight_decay": Setting(5e-4, f"{RISE} optimizer/optimizer_helper.py:9"),
        "schedule": Setting("step", f"{RISE} optimizer/optimizer_helper.py:13 (StepLR, gamma "
                                    "0.1)"),
        "lr_drops": Setting([0.8], f"{RISE} optimizer/optimizer_helper.py:11 (step_size "
                                   "0.8 x epochs)"),
        "warmup_steps": Setting(0, f"{RISE} optimizer/optimizer_helper.py (no warm-up)"),
        "epochs": Setting(20, f"{RISE} train_rise.py:26"),
        "batch_size": Setting(128, f"{RISE} train_rise.py:18"),
        "augment": Setting("rise", f"{RISE} data/data_helper.py:104-109, train_rise.py:20-24"),
        "teacher": Setting("ViT-B-16:openai", f"{RISE} train_rise.py:34,46"),
        "teacher_mode": Setting("online", f"{RISE} train_rise.py:128-130 (CLIP on the same "
                                          "augmented batch)"),
        "average": Setting("none", f"{RISE} train_rise.py:212-216 (best validation epoch)"),
    },
    "vl2v": {
        **ERM,
        "eval_every": Setting(200, f"{VL2V} domainbed/datasets/datasets.py:289-290 (PACS "
                                   "CHECKPOINT_FREQ)"),
        "teacher": Setting("ViT-B-16:openai", f"{VL2V} scripts/*/run_stage{{1,2}}.sh:6"),
        "teacher_mode": Setting("online", f"{VL2V} domainbed/algorithms/distill_clip.py:317 "
                                          "(CLIP on the augmented batch)"),
        "average": Setting("swad", f"{VL2V} scripts/*/run_stage{{1,2}}.sh:20 (--swad True)"),
        # SWAD's update_bn runs only when BatchNorm is not frozen; VL2V's is (khanrc/swad
        # domainbed/trainer.py:290-293, VL2V domainbed/hparams_registry.py:26).
        "swad_bn_batches": Setting(0, f"{VL2V} domainbed/trainer.py:507-510 (no update_bn "
                                      "with frozen BatchNorm)"),
    },
}


def settings(recipe: str, method: str) -> dict[str, Setting]:
    """The recipe's training options for `method`, each with its source. The fast recipe names
    the same options as the paper one, at dgkit's quick defaults."""
    if recipe not in RECIPES:
        raise DgkitError(f"--recipe '{recipe}' is not one of: {', '.join(RECIPES)}")
    paper = PAPER.get(method, ERM)
    if recipe == "paper":
        return paper
    fast = "dgkit's fast recipe"
    return {name: Setting(DEFAULT_TEACHER if name == "teacher" else train_default(name), fast)
            for name in paper}


def train_config(recipe: str, given: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of `recipe` for given["method"], with every option in `given` over the
    recipe's value; it records the recipe and which of its values were overridden."""
    method = given.get("method", train_default("method"))
    values = {name: s.value for name, s in settings(recipe, method).items()}
    if "steps" in given:  # a step count replaces the recipe's epochs
        values.pop("epochs", None)
    if "batch_size" in given:
        values.pop("batch_per_domain", None)
    overrides = sorted(k for k in given if k in values or k in ("steps", "batch_size"))
    return TrainConfig(**{**values, **given, "recipe": recipe, "overrides": overrides})
