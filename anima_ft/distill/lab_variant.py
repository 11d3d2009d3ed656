"""The mini-lab's redistribution variant: distill the lab's base model into a student with a re-initialized adapter.

    anima-ft distill lab --lab-dir runs/lab [--steps 150] [--out runs/lab/distill_reinit]

Reads what ``anima-ft lab`` wrote (``base.safetensors``, ``data/shards/{target,replay}_{train,probe}``), then runs
one process, world size 1, plain torch AdamW (the recipe ``configs/distill/lab_redistribute.yaml`` is the same
experiment through the DeepSpeed trainer once the trainer has the distill hook):

    student = base DiT + adapter re-initialized with ``reinit_seed`` (frozen unless --adapter-lr > 0)
    loss    = distill on replay-class images (teacher = frozen base) + flow on target-class images
    report  = redistribution.md: the teacher-gap pairing table on the held-out probe images of each split, and the
              flow probe loss of base vs student (forgetting on the replay classes, learning on the target ones)

Every number in ``redistribution.md`` is measured by this run; nothing is written in advance.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from anima_ft.config.distill import DistillConfig, SourceLoss
from anima_ft.config.schema import ObjectiveConfig
from anima_ft.eval.eval_sets import EvalSample, load_shard_eval_set

from .attribution import redistribution, redistribution_table
from .context import prepare_student
from .objective import DistillObjective
from .teacher import Teacher, load_teacher

logger = logging.getLogger(__name__)
SIGMAS = (0.2, 0.4, 0.6, 0.8)


def collate_samples(samples: list[EvalSample], sources: list[str]) -> dict:
    """Batch-contract micro-batch from eval samples (zero-padded Qwen states / T5 ids, bool masks)."""
    shapes = {tuple(s.latents.shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"samples of one micro-batch must share a latent size, got {sorted(shapes)}")
    B = len(samples)
    S = max(1, max(s.qwen_states.shape[0] for s in samples))
    L = max(s.t5_ids.shape[0] for s in samples)
    C = samples[0].qwen_states.shape[1]
    qwen, qmask = torch.zeros(B, S, C), torch.zeros(B, S, dtype=torch.bool)
    t5, t5mask = torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L, dtype=torch.bool)
    for b, s in enumerate(samples):
        n, m = s.qwen_states.shape[0], s.t5_ids.shape[0]
        qwen[b, :n], qmask[b, :n] = s.qwen_states.float(), True
        t5[b, :m], t5mask[b, :m] = s.t5_ids, True
    return {"latents": torch.stack([s.latents.float() for s in samples]), "qwen_states": qwen, "qwen_mask": qmask,
            "t5_ids": t5, "t5_mask": t5mask, "source": list(sources),
            "source_id": torch.tensor([0 if x == "target" else 1 for x in sources]),
            "caption": [s.caption for s in samples], "key": [s.key for s in samples]}


def train_student(base_path: str | Path, pools: dict[str, list[EvalSample]], cfg: DistillConfig, steps: int,
                  batch_size: int, lr: float, adapter_lr: float, seed: int) -> tuple[torch.nn.Module, torch.nn.Module,
                                                                                      list[float]]:
    """``(teacher, student, per-step losses)``: the distillation loop (module docstring), half of each batch per pool."""
    teacher = load_teacher(str(base_path), dtype=torch.float32)
    student = load_teacher(str(base_path), dtype=torch.float32).train()
    prepare_student(student, cfg)
    for name, p in student.named_parameters():
        p.requires_grad_(adapter_lr > 0 or not name.startswith("llm_adapter."))
    groups = [{"params": [p for n, p in student.named_parameters() if not n.startswith("llm_adapter.")], "lr": lr}]
    if adapter_lr > 0:
        groups.append({"params": list(student.llm_adapter.parameters()), "lr": adapter_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    objective = DistillObjective(Teacher(teacher), cfg, ObjectiveConfig())
    gen = torch.Generator().manual_seed(seed)
    names = sorted(pools)
    losses = []
    for step in range(steps):
        picked, sources = [], []
        for i in range(batch_size):
            name = names[i % len(names)]
            picked.append(pools[name][int(torch.randint(len(pools[name]), (1,), generator=gen))])
            sources.append(name)
        out = objective(student, collate_samples(picked, sources), torch.Generator().manual_seed(seed * 100003 + step))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return teacher, student.eval(), losses


def run(lab_dir: Path, out: Path, steps: int, batch_size: int, lr: float, adapter_lr: float, reinit_seed: int,
        seed: int, num_noises: int = 4, target_weight: float = 1.0) -> Path:
    """Run the variant and write ``out/redistribution.md`` (+ ``result.json``, ``distilled.safetensors``)."""
    from anima_ft.eval.probe import evaluate_sets
    from anima_ft.model import save_anima

    shards = lab_dir / "data" / "shards"
    base = lab_dir / "base.safetensors"
    for path in (base, shards):
        if not path.exists():
            raise ValueError(f"{path} not found: run `anima-ft lab --out {lab_dir}` first")
    pools = {"replay": load_shard_eval_set(shards / "replay_train", "replay")}
    if target_weight > 0:  # 0 = pure distillation on replay images (isolates redistribution from fine-tuning)
        pools["target"] = load_shard_eval_set(shards / "target_train", "target")
    probes = {"replay_classes": load_shard_eval_set(shards / "replay_probe", "replay_classes"),
              "target_classes": load_shard_eval_set(shards / "target_probe", "target_classes")}
    cfg = DistillConfig(enabled=True, adapter_source="reinit", reinit_seed=reinit_seed,
                        losses=[SourceLoss("target", "flow", target_weight), SourceLoss("replay", "distill", 1.0)])
    t0 = time.perf_counter()
    teacher, student, losses = train_student(base, pools, cfg, steps, batch_size, lr, adapter_lr, seed)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    save_anima(student, out / "distilled.safetensors", metadata={"anima_ft.distill": json.dumps(cfg.__dict__,
                                                                                                  default=str)})
    probe_base = evaluate_sets(teacher, probes, SIGMAS, num_noises, seed)
    probe_student = evaluate_sets(student, probes, SIGMAS, num_noises, seed)
    k = max(1, steps // 10)
    lines = ["# Redistribution variant (distill into the DiT with a re-initialized adapter)", "",
             f"Student: base DiT + adapter re-initialized (seed {reinit_seed}), adapter LR {adapter_lr:g}, DiT LR "
             f"{lr:g}; {steps} AdamW steps of {batch_size} samples: "
             + ("half replay-class images with the distill loss against the frozen base, half target-class images "
                f"with the flow loss (weight {target_weight:g})" if target_weight > 0 else
                "replay-class images only, distill loss against the frozen base (no target fine-tuning)")
             + f"; {seconds:.0f} s on CPU.", "",
             f"Training loss: first {k} steps {sum(losses[:k]) / k:.4f}, last {k} steps {sum(losses[-k:]) / k:.4f}.",
             "", "## Teacher gap of DiT / adapter pairings (mean squared velocity difference to the base; relative "
             "in parentheses)", ""]
    result = {"losses": losses, "seconds": seconds, "sets": {}}
    references = {}
    if (lab_dir / "no_replay.safetensors").exists():  # the lab's plain fine-tune: the baseline when target_weight > 0
        references["no_replay fine-tune"] = load_teacher(str(lab_dir / "no_replay.safetensors"), dtype=torch.float32)
    for name, samples in probes.items():
        red = redistribution(teacher, student, samples, SIGMAS, reinit_seed, num_noises, seed, references)
        result["sets"][name] = red
        lines += [f"### {name} (held-out probe images)", "", redistribution_table(red), ""]
    lines += ["## Flow probe loss (fixed sigmas and noises), base vs student", "",
              "| set | " + " | ".join(f"sigma {s:g}" for s in SIGMAS) + " |", "|---|" + "---|" * len(SIGMAS)]
    for name in probes:
        b, s = probe_base[name].mean(0).tolist(), probe_student[name].mean(0).tolist()
        lines.append(f"| {name} | " + " | ".join(f"{x:.4f} -> {y:.4f}" for x, y in zip(b, s)) + " |")
    (out / "result.json").write_text(json.dumps(result))
    path = out / "redistribution.md"
    path.write_text("\n".join(lines) + "\n")
    logger.info("wrote %s", path)
    return path


def main(argv: list[str]) -> int:
    """``anima-ft distill lab`` entry point."""
    ap = argparse.ArgumentParser(prog="anima-ft distill lab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab-dir", type=Path, default=Path("runs/lab"), help="directory of a finished `anima-ft lab`")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default LAB_DIR/distill_reinit)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3, help="DiT learning rate")
    ap.add_argument("--adapter-lr", type=float, default=0.0, help="re-initialized adapter LR (0 = frozen)")
    ap.add_argument("--reinit-seed", type=int, default=1234)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-weight", type=float, default=1.0,
                    help="flow-loss weight of target images; 0 = replay-only pure distillation")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = run(args.lab_dir, args.out or args.lab_dir / "distill_reinit", args.steps, args.batch_size, args.lr,
               args.adapter_lr, args.reinit_seed, args.seed, target_weight=args.target_weight)
    print(path.read_text())
    return 0
