"""The speed/accuracy trade-off, measured: every parameter-free family on the reference weights, one process.

For each family (``SWEEPS``) a sweep of its knob, training-free, on the reference model's weights: validation top-1
/ top-5 on the digits, GMACs (counted by running the model), patch tokens per block, PyTorch eager latency and, with
ONNX, the export parity and onnxruntime latency of the edge protocol (``tokenzoo.export``: CPU execution provider,
1 thread, batch 1), beside the base model. Fine-tuned variants (a ``tools/train_cls.py`` output folder: its
``run.json`` says which model, knob and recipe) are measured the same way, so a recipe's gain is read off against
the same family training-free. ``training_cost`` times a training step (forward, backward, AdamW) and an inference
forward of each family at its paper default against the base, interleaved round by round so that a busy machine
slows all of them alike.

``tradeoff_section(run)`` renders a run as Markdown lines for model_zoo.md, labelled "measured on scikit-learn digits
with the reference model" (not ImageNet); ``plot_tradeoff(run, path)`` draws accuracy against GMACs and against
latency, one line per family, the base as a star.
"""
import datetime
import hashlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..profiling import count_gmacs, count_params, eager_latency, eval_mode, example_input, format_token_counts
from ..profiling import machine_info, token_counts
from .data import DIGITS_DATA_CONFIG, build_eval_loader, check_image_folder, load_split
from .engine import RUN_NAME, WEIGHTS_NAME, create_classifier, evaluate
from .reference import PARAMETER_FREE, REFERENCE_KWARGS, REFERENCE_MODEL

if TYPE_CHECKING:  # the export extra; imported where ONNX is measured
    from tokenzoo.export.images import ImageSet

__all__ = ["SWEEPS", "Sweep", "check_tradeoff_run", "loader_image_set", "measure_point", "plot_tradeoff",
           "run_tradeoff", "tradeoff_section", "training_cost"]

PathLike = Union[str, Path]
DATASET = "scikit-learn digits"
LABEL = "measured on scikit-learn digits with the reference model"


@dataclass(frozen=True)
class Sweep:
    """A family's knob: its constructor argument, the values swept and the paper's default."""

    model: str
    knob: str
    values: Tuple[Any, ...]
    default: Any

    def knob_value(self, model: nn.Module) -> Any:
        """The knob's value in a built model (what a fine-tuned model from ``run.json`` was built with)."""
        if self.knob == "num_clusters":
            return model.cluster_settings.num_clusters
        return getattr(model, self.knob)


SWEEPS: Dict[str, Sweep] = {
    "evit": Sweep(PARAMETER_FREE["evit"], "keep_rate", (0.9, 0.8, 0.7, 0.6, 0.5, 0.4), 0.7),
    "tome": Sweep(PARAMETER_FREE["tome"], "r", (4, 8, 11, 13, 15), 13),
    "mctf": Sweep(PARAMETER_FREE["mctf"], "r", (4, 8, 12, 14, 16), 16),
    "mctf_fast": Sweep(PARAMETER_FREE["mctf_fast"], "r", (0.15, 0.25, 0.35, 0.45, 0.55), 0.35),
    "expedit": Sweep(PARAMETER_FREE["expedit"], "num_clusters", (0.9, 0.8, 0.7, 0.6, 0.5), 0.7),
}


def _family_of(model_name: str) -> str:
    for family, sweep in sorted(SWEEPS.items(), key=lambda item: -len(item[1].model)):
        if model_name == sweep.model:
            return family
    return "deit" if model_name == REFERENCE_MODEL else model_name


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def measure_point(
        model: nn.Module, loader: torch.utils.data.DataLoader, img_size: Tuple[int, int], onnx_dir: Optional[Path],
        warmup: int, iters: int, step: Callable[[str], None] = lambda msg: None,
        int8_images: Optional[Tuple["ImageSet", "ImageSet"]] = None, weights: str = "",
) -> Dict[str, Any]:
    """Accuracy and cost of one model: val top-1/top-5, params, GMACs, tokens per block, eager batch-1 latency and
    (``onnx_dir``) ONNX parity and onnxruntime batch-1 latency.

    With ``int8_images`` (agreement images, calibration images) also both INT8 files of ``tokenzoo.export``
    (dynamic, and static QDQ calibrated on the calibration images): their onnxruntime batch-1 latency and their
    top-1 agreement / logit cosine with the FP32 file on the agreement images, measured with ``weights`` (the edge
    issue's INT8 figures on a trained model)."""
    step("validation accuracy")
    metrics = evaluate(model, loader)
    step("GMACs and tokens")
    result: Dict[str, Any] = dict(
        top1=metrics["top1"], top5=metrics["top5"], params_m=count_params(model) / 1e6,
        gmacs=count_gmacs(model, img_size), tokens_per_block=token_counts(model, img_size))
    step("eager latency (batch 1)")
    result["eager_latency_ms"] = eager_latency(model, 1, img_size, warmup, iters)
    result["onnx"] = None
    if onnx_dir is not None:
        from tokenzoo.export.latency import ort_latency
        from tokenzoo.export.onnx_export import PARITY_TOL, check_parity, export_onnx

        step("ONNX export, parity, onnxruntime latency (batch 1)")
        path = export_onnx(model, onnx_dir / "point.onnx", img_size=img_size, force=True)
        diffs = check_parity(model, path, batch_sizes=(1, 3), img_size=img_size)
        result["onnx"] = dict(parity_max_abs_diff={str(b): d for b, d in diffs.items()},
                              parity_ok=max(diffs.values()) <= PARITY_TOL,
                              ort_latency=ort_latency(path, 1, img_size, threads=1, warmup=warmup, runs=iters))
        if int8_images is not None:
            from tokenzoo.export.quantize import INT8_MODES, quantize_int8
            from tokenzoo.export.verify import agreement

            agreement_images, calibration = int8_images
            result["onnx"]["int8"] = {}
            for mode in INT8_MODES:
                step(f"INT8 {mode}: quantize, agreement with FP32, onnxruntime latency (batch 1)")
                int8_path = onnx_dir / f"point.int8-{mode}.onnx"
                quantize_int8(path, int8_path, mode=mode, calibration=calibration if mode == "static" else None,
                              force=True)
                result["onnx"]["int8"][mode] = dict(
                    agreement=agreement(path, int8_path, agreement_images, weights),
                    ort_latency=ort_latency(int8_path, 1, img_size, threads=1, warmup=warmup, runs=iters))
                int8_path.unlink()
        path.unlink()
    return result


def loader_image_set(loader: torch.utils.data.DataLoader, description: str,
                     count: Optional[int] = None) -> "ImageSet":
    """The first ``count`` (default all) images of an eval loader as an ``ImageSet`` (already normalized)."""
    from tokenzoo.export.images import ImageSet

    images = [image for batch, _ in loader for image in batch][:count]
    return ImageSet(images, f"{description} ({len(images)} images)")


def _finetuned_spec(folder: Path) -> Dict[str, Any]:
    """What a ``tools/train_cls.py`` output folder trained: model, kwargs, recipe, epochs, weights."""
    run_file, weights = folder / RUN_NAME, folder / WEIGHTS_NAME
    if not run_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"--finetuned {folder}: expected a tools/train_cls.py output folder with {RUN_NAME} "
                                f"and {WEIGHTS_NAME}")
    run = json.loads(run_file.read_text())
    s = run["settings"]
    training = dict(recipe=s["recipe"], epochs=s["epochs"], lr=s.get("lr"), batch_size=s["batch_size"],
                    init=s.get("checkpoint"), distill=s.get("distill"), folder=str(folder),
                    keep_rate_start_epoch=s.get("keep_rate_start_epoch") if s["recipe"] == "evit" else None,
                    keep_rate_epochs=s.get("keep_rate_epochs") if s["recipe"] == "evit" else None,
                    wall_seconds=run.get("wall_seconds"))
    return dict(model=s["model"], kwargs=s.get("model_kwargs") or {}, weights=weights, training=training)


def run_tradeoff(
        data_dir: PathLike,
        checkpoint: PathLike,
        families: Sequence[str] = tuple(SWEEPS),
        values: Optional[Dict[str, Sequence[Any]]] = None,
        finetuned: Sequence[PathLike] = (),
        onnx: bool = True,
        int8: bool = True,
        warmup: int = 10,
        iters: int = 50,
        cost_batch_size: int = 32,
        cost_rounds: int = 5,
        split: str = "val",
        progress: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
) -> Dict[str, Any]:
    """Measure the base, each family's sweep, the fine-tuned variants and the training cost; returns the run.

    Args:
        data_dir: The digits ImageFolder.
        checkpoint: The reference weights.
        families: Families to sweep (keys of ``SWEEPS``).
        values: Knob values per family instead of the sweep's (the paper default is marked wherever it is swept).
        finetuned: ``tools/train_cls.py`` output folders to measure beside the sweeps.
        onnx: Export each model and time it on onnxruntime.
        int8: With ``onnx``, also quantize the base and each paper default (``measure_point``): agreement on the
            validation split, static calibration on 32 training images spread over the classes.
        warmup, iters: Untimed and timed runs of each latency.
        cost_batch_size, cost_rounds: Batch and rounds of ``training_cost``.
        split: The split evaluated.
        progress: Where progress messages go.

    Call with ``torch.set_num_threads(1)`` for the edge protocol (the command line does).

    Raises:
        ValueError, FileNotFoundError: Unknown family, missing data or weights, a fine-tuned folder that is not one.
    """
    unknown = [f for f in families if f not in SWEEPS]
    if unknown:
        raise ValueError(f"unknown families {unknown}; allowed: {', '.join(SWEEPS)}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"weights {str(checkpoint)!r} do not exist")
    folders = check_image_folder(data_dir, ["train", split] if onnx and int8 else [split])  # train: calibration
    folder = folders[split]
    specs = [_finetuned_spec(Path(f)) for f in finetuned]
    img_size = tuple(DIGITS_DATA_CONFIG["input_size"][1:])
    loader = build_eval_loader(load_split(folder, DIGITS_DATA_CONFIG, is_training=False), batch_size=64)

    def build(name: str, weights: Path, **kwargs: Any) -> nn.Module:
        return create_classifier(name, checkpoint=weights, **dict(REFERENCE_KWARGS, **kwargs)).eval()

    int8_images = None
    weights_description = f"the digits reference model ({checkpoint.name})"
    if onnx and int8:
        train = load_split(folders["train"], DIGITS_DATA_CONFIG, is_training=False)
        spread = torch.utils.data.Subset(train, range(0, len(train), max(1, len(train) // 32)))
        int8_images = (loader_image_set(loader, f"{DATASET}, {split} split"),
                       loader_image_set(build_eval_loader(spread, batch_size=64), f"{DATASET}, train split", 32))

    plan: List[Tuple[Dict[str, Any], Callable[[], nn.Module]]] = [(
        dict(family="deit", label="base", model=REFERENCE_MODEL, kwargs={}, knob=None, value=None,
             paper_default=True, training=None),
        lambda: build(REFERENCE_MODEL, checkpoint))]
    for family in families:
        sweep = SWEEPS[family]
        for value in (values or {}).get(family, sweep.values):
            meta = dict(family=family, label=f"{sweep.knob}={value}", model=sweep.model, kwargs={sweep.knob: value},
                        knob=sweep.knob, value=value, paper_default=value == sweep.default, training=None)
            plan.append((meta, lambda s=sweep, v=value: build(s.model, checkpoint, **{s.knob: v})))
    for spec in specs:
        model = build(spec["model"], spec["weights"], **spec["kwargs"])  # built once here: checks before measuring
        family = _family_of(spec["model"])
        sweep = SWEEPS.get(family)
        value = sweep.knob_value(model) if sweep else None
        meta = dict(family=family, label=f"{sweep.knob}={value} fine-tuned" if sweep else "fine-tuned",
                    model=spec["model"], kwargs=spec["kwargs"], knob=sweep.knob if sweep else None, value=value,
                    paper_default=sweep is not None and value == sweep.default, training=spec["training"],
                    weights=str(spec["weights"]))
        plan.append((meta, lambda m=model: m))

    points = []
    with tempfile.TemporaryDirectory(prefix="tokenzoo-tradeoff-") as tmp:
        for i, (meta, make) in enumerate(plan, 1):
            prefix = f"[{i}/{len(plan)}] {meta['model']} {meta['label']}"
            model = make()
            quantize = int8_images is not None and meta["paper_default"] and not meta["training"]
            point = dict(meta, **measure_point(model, loader, img_size, Path(tmp) if onnx else None, warmup, iters,
                                               lambda msg, p=prefix: progress(f"{p}: {msg}"),
                                               int8_images if quantize else None,
                                               weights_description if quantize else ""))
            points.append(point)
    base = points[0]
    for point in points:
        point["top1_drop"] = base["top1"] - point["top1"]
        point["ratios"] = dict(
            gmacs=point["gmacs"] / base["gmacs"],
            eager_latency_p50=point["eager_latency_ms"]["p50_ms"] / base["eager_latency_ms"]["p50_ms"],
            ort_latency_p50=point["onnx"]["ort_latency"]["p50_ms"] / base["onnx"]["ort_latency"]["p50_ms"]
            if onnx else None)
        for mode, q in ((point.get("onnx") or {}).get("int8") or {}).items():
            q["speedup_vs_fp32"] = point["onnx"]["ort_latency"]["p50_ms"] / q["ort_latency"]["p50_ms"]
            q["latency_ratio_vs_base_int8"] = (q["ort_latency"]["p50_ms"]
                                               / base["onnx"]["int8"][mode]["ort_latency"]["p50_ms"])

    progress("training cost: train step vs inference forward, interleaved rounds")
    defaults = {"deit": lambda: build(REFERENCE_MODEL, checkpoint)}
    defaults.update({family: lambda s=SWEEPS[family]: build(s.model, checkpoint) for family in families})
    cost = training_cost({family: make() for family, make in defaults.items()}, img_size, cost_batch_size,
                         cost_rounds)

    return dict(
        kind="tradeoff",
        dataset=DATASET,
        label=LABEL,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=machine_info(),
        settings=dict(img_size=list(img_size), split=split, val_images=len(loader.dataset),
                      data_config=dict(DIGITS_DATA_CONFIG), warmup=warmup, iters=iters, onnx=onnx,
                      eager="PyTorch eager, torch.inference_mode, eval mode, batch 1",
                      ort_session="CPUExecutionProvider, 1 intra-op thread, 1 inter-op, sequential, ORT_ENABLE_ALL, "
                                  "batch 1" if onnx else None),
        weights=dict(path=str(checkpoint), sha256=_sha256(checkpoint), model=REFERENCE_MODEL,
                     kwargs=dict(REFERENCE_KWARGS)),
        base=base,
        points=points[1:],
        training_cost=cost,
    )


def _train_step_seconds(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                        optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    loss = nn.functional.cross_entropy(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def _forward_seconds(model: nn.Module, images: torch.Tensor) -> float:
    with eval_mode(model), torch.inference_mode():
        start = time.perf_counter()
        model(images)
        return time.perf_counter() - start


def training_cost(models: Dict[str, nn.Module], img_size: Tuple[int, int], batch_size: int = 32,
                  rounds: int = 5) -> Dict[str, Any]:
    """Median time of a training step (forward + backward + AdamW step, train mode) and of an inference forward
    (eval mode) at the same batch, for each model, and their ratios to the first model.

    Each round times every model once (a warm-up round first), so the models share the machine's state alike.
    """
    if not models:
        raise ValueError("training_cost needs at least one model")
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-6) for name, model in models.items()}
    images = {name: example_input(model, batch_size, img_size) for name, model in models.items()}
    targets = torch.zeros(batch_size, dtype=torch.long)
    train_times: Dict[str, List[float]] = {name: [] for name in models}
    infer_times: Dict[str, List[float]] = {name: [] for name in models}
    for round_index in range(rounds + 1):
        for name, model in models.items():
            model.train()
            train = _train_step_seconds(model, images[name], targets, optimizers[name])
            infer = _forward_seconds(model, images[name])
            if round_index:  # round 0 warms up
                train_times[name].append(train)
                infer_times[name].append(infer)
    base = next(iter(models))
    out: Dict[str, Any] = dict(batch_size=batch_size, rounds=rounds, img_size=list(img_size), base=base,
                               threads=torch.get_num_threads(), models={})
    for name in models:
        train_ms = 1e3 * statistics.median(train_times[name])
        infer_ms = 1e3 * statistics.median(infer_times[name])
        out["models"][name] = dict(train_step_ms=train_ms, inference_ms=infer_ms)
    ref = out["models"][base]
    for entry in out["models"].values():
        entry["train_ratio"] = entry["train_step_ms"] / ref["train_step_ms"]
        entry["inference_ratio"] = entry["inference_ms"] / ref["inference_ms"]
    for model in models.values():
        model.eval()
    return out


_REQUIRED = ("kind", "dataset", "created", "machine", "settings", "weights", "base", "points")


def check_tradeoff_run(run: Dict[str, Any], source: str = "trade-off run") -> None:
    """Raise ValueError unless ``run`` is a trade-off run (the JSON ``tools/tradeoff.py`` writes)."""
    missing = [key for key in _REQUIRED if key not in run]
    if missing or run.get("kind") != "tradeoff":
        raise ValueError(f"{source}: not a tools/tradeoff.py result (missing {missing or ['kind=tradeoff']})")


def _setting(point: Dict[str, Any]) -> str:
    if point["knob"] is None:
        return "base (no reduction)"
    return f"`{point['knob']}={point['value']}`" + (" (paper)" if point["paper_default"] else "")


def _training(point: Dict[str, Any]) -> str:
    t = point.get("training")
    if not t:
        return "none (reference weights)"
    recipe = {"evit": "EViT keep-rate warm-up", "mctf": "MCTF consistency", "none": "plain"}.get(t["recipe"],
                                                                                            t["recipe"])
    return f"{recipe}, {t['epochs']} epochs from the reference"


def tradeoff_section(run: Dict[str, Any]) -> List[str]:
    """Markdown lines of a trade-off run for model_zoo.md, labelled as digits results (not ImageNet)."""
    check_tradeoff_run(run)
    m, s, w, base = run["machine"], run["settings"], run["weights"], run["base"]
    kwargs = w["kwargs"]
    lines = [
        f"## Speed/accuracy trade-off, {LABEL}",
        "",
        f"Not ImageNet: validation accuracy on {run['dataset']} ({s['val_images']} validation images, "
        f"{s['img_size'][0]}x{s['img_size'][1]} px) of the project's reference model, `{w['model']}` reshaped to "
        f"{kwargs['depth']} blocks, width {kwargs['embed_dim']}, {kwargs['num_heads']} heads, patch "
        f"{kwargs['patch_size']} ({s['img_size'][0] // kwargs['patch_size']}x{s['img_size'][1] // kwargs['patch_size']}"
        f" tokens) and trained by `tools/train_cls.py` (`{w['path']}`, sha256 `{w['sha256'][:12]}`). Every family "
        f"loads the same weights; training-free unless the training column says otherwise. Base top-1: "
        f"{base['top1']:.2f}%.",
        "",
        f"- **Machine**: {m['cpu']}, {m['cpu_usable']} usable cores, {m['platform']}; torch {m['torch']}, timm "
        f"{m['timm']}, onnxruntime {m['onnxruntime']}",
        f"- **Latency**: batch 1, float32; eager PyTorch (`torch.inference_mode`, {m['torch_num_threads']} "
        f"thread(s)){'; onnxruntime ' + s['ort_session'] if s.get('ort_session') else ''}; {s['warmup']} warm-up + "
        f"{s['iters']} timed runs, median",
        f"- **Created**: {run['created']}" + (f"; plot: `{run['plot']}`" if run.get("plot") else ""),
        "",
        "| family | setting | training | val top-1 (%) | drop vs base (points) | GMACs | GMACs vs base | "
        "eager p50 (ms) | ORT p50 (ms) | ORT vs base | patch tokens per block |",
        "|" + "---|" * 11,
    ]
    for point in [base, *run["points"]]:
        ort = point["onnx"]["ort_latency"]["p50_ms"] if point.get("onnx") else None
        lines.append(
            f"| {point['family']} | {_setting(point)} | {_training(point)} | {point['top1']:.2f} | "
            f"{point['top1_drop']:+.2f} | {point['gmacs']:.3f} | {point['ratios']['gmacs']:.3f} | "
            f"{point['eager_latency_ms']['p50_ms']:.2f} | {'n/a' if ort is None else f'{ort:.2f}'} | "
            f"{'n/a' if ort is None else format(point['ratios']['ort_latency_p50'], '.3f')} | "
            f"{format_token_counts(point['tokens_per_block'])} |")
    quantized = [p for p in [base, *run["points"]] if (p.get("onnx") or {}).get("int8")]
    if quantized:
        agreement = quantized[0]["onnx"]["int8"]["dynamic"]["agreement"]
        lines += [
            "",
            f"INT8 (onnxruntime quantization, `tokenzoo.export`) of the base and each paper default: top-1 agreement "
            f"and mean logit cosine with the FP32 file on {agreement['images']}, weights: {agreement['weights']}; "
            f"latency batch 1, 1 thread; speed-up = FP32 p50 / INT8 p50; ratio = INT8 p50 / the base's INT8 p50 in "
            f"the same mode:",
            "",
            "| family | setting | GMACs vs base | INT8 mode | top-1 agreement (%) | mean cosine | INT8 p50 (ms) | "
            "speed-up vs FP32 | INT8 ratio vs base INT8 |",
            "|" + "---|" * 9,
        ]
        for point in quantized:
            for mode, q in point["onnx"]["int8"].items():
                lines.append(
                    f"| {point['family']} | {_setting(point)} | {point['ratios']['gmacs']:.3f} | {mode} | "
                    f"{100 * q['agreement']['top1_agreement']:.2f} | {q['agreement']['mean_cosine']:.5f} | "
                    f"{q['ort_latency']['p50_ms']:.2f} | {q['speedup_vs_fp32']:.2f}x | "
                    f"{q['latency_ratio_vs_base_int8']:.3f} |")
    cost = run.get("training_cost")
    if cost:
        lines += [
            "",
            f"Training step (forward + backward + AdamW, train mode) against inference forward, batch "
            f"{cost['batch_size']}, median of {cost['rounds']} interleaved rounds, {cost['threads']} thread(s), each "
            f"family at its paper default, ratios to {cost['base']}:",
            "",
            "| model | train step (ms) | inference (ms) | train ratio | inference ratio |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {name} | {c['train_step_ms']:.1f} | {c['inference_ms']:.1f} | {c['train_ratio']:.3f} | "
                  f"{c['inference_ratio']:.3f} |" for name, c in cost["models"].items()]
    return lines


def plot_tradeoff(run: Dict[str, Any], path: PathLike) -> Path:
    """Draw top-1 against GMACs and against latency (onnxruntime, or eager without ONNX): one line per family over
    its sweep, fine-tuned variants as separate markers, the paper default ringed, the base as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_tradeoff_run(run)
    onnx = bool(run["settings"].get("onnx"))

    def latency(point: Dict[str, Any]) -> float:
        return point["onnx"]["ort_latency"]["p50_ms"] if onnx else point["eager_latency_ms"]["p50_ms"]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    axes_x = ((lambda p: p["gmacs"], "GMACs"),
              (latency, "onnxruntime latency, batch 1, 1 thread (ms)" if onnx else "eager latency, batch 1 (ms)"))
    colors = dict(zip(SWEEPS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    base = run["base"]
    for ax, (x_of, x_label) in zip(axes, axes_x):
        for family in SWEEPS:
            sweep = sorted((p for p in run["points"] if p["family"] == family and not p.get("training")),
                           key=x_of)
            if sweep:
                ax.plot([x_of(p) for p in sweep], [p["top1"] for p in sweep], "o-", color=colors[family],
                        label=family, markersize=4)
                default = [p for p in sweep if p["paper_default"]]
                ax.plot([x_of(p) for p in default], [p["top1"] for p in default], "o", color=colors[family],
                        markersize=11, markerfacecolor="none")
            for p in (p for p in run["points"] if p["family"] == family and p.get("training")):
                ax.plot(x_of(p), p["top1"], "D", color=colors[family], markersize=7,
                        label=f"{family} {_training(p).split(',')[0]}")
        for p in (p for p in run["points"] if p["family"] == "deit"):
            ax.plot(x_of(p), p["top1"], "s", color="black", markersize=6, label="base fine-tuned")
        ax.plot(x_of(base), base["top1"], "*", color="black", markersize=14, label="base (DeiT-shaped reference)")
        ax.set_xlabel(x_label)
        ax.set_ylabel("validation top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Speed/accuracy trade-off, {LABEL} (not ImageNet); ring: paper default", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
