"""``vocaseg``: a thin command-line layer over the Python API.

  vocaseg demo                                  # offline: synth scenes + the shipped toy CLIP
  vocaseg segment photo.jpg --classes "cat, dog, grass" --out out/
  vocaseg eval --dataset voc21 --data-root data/VOCdevkit --out voc21.json
  vocaseg score --dataset ade150 --data-root data/ade --pred-dir preds/ --out ade.json
  vocaseg train clip --out runs/toy
  vocaseg train maskclip-plus --preset synth --out runs/mcp
  vocaseg train segclip --preset synth --out runs/segclip
  vocaseg train clip-rc --preset synth --out runs/rc
  vocaseg train clipteacher --preset synth --out runs/ct
  vocaseg list                                  # models, methods, shipped runs, datasets, presets
  vocaseg eval --dataset synth --model toy --report report/   # + an HTML report
  vocaseg gallery --out docs/                   # every method on the same synth scenes, one picture
  vocaseg app                                   # a web page (pip install "vocaseg[app]")
  vocaseg bench
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EPILOG_MODELS = """\
models: any open_clip architecture with a ViT or ResNet image tower (ViT-B-16, ViT-L-14, RN50, ...)
  --pretrained default   OpenAI weights where open_clip has them (downloads once, then cached)
  --pretrained TAG       any open_clip tag, e.g. laion2b_s34b_b88k
  --pretrained FILE      a local checkpoint: OpenAI .pt, open_clip .bin/.pt/.safetensors
  --pretrained none      random weights (for testing)
  --model toy            the small CLIP shipped with vocaseg (trained on the synthetic world; offline)
"""


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def _add_model_args(p: argparse.ArgumentParser, default_model: str = "ViT-B-16") -> None:
    g = p.add_argument_group("model and method")
    g.add_argument("--model", default=default_model, help=f"open_clip architecture, 'toy', a folder with "
                   f"open_clip_config.json, a run folder from `vocaseg train` or a shipped run such as "
                   f"toy-maskclip-plus (`vocaseg list` shows them; default: {default_model})")
    g.add_argument("--pretrained", default="default", help="CLIP weights: 'default', an open_clip tag, a file, or "
                   "'none' (for a run folder: 'default' = the weights it was trained with)")
    g.add_argument("--method", default=None, metavar="METHOD",
                   help="a training-free rule (maskclip, raw, sclip, clearclip, naclip) or, for a run folder, its "
                   "trained method (default: maskclip for a CLIP, the trained method for a run)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--templates", default=None,
                   help="prompt templates: maskclip85 (default for segment), imagenet80, plain, photo, or a file")
    g.add_argument("--key-smoothing", type=float, nargs="?", const=1.0, default=None, metavar="T",
                   help="MaskCLIP key smoothing where the max class probability is below T (default T: 1.0, "
                   "i.e. everywhere, as MaskCLIP's code)")
    g.add_argument("--key-smoothing-mode", choices=["official", "paper"], default=None,
                   help="official (default): MaskCLIP's code, keys through out_proj normalised over positions; "
                   "paper: Eq. 5, cosine between per-token keys")
    g.add_argument("--prompt-denoising", type=float, nargs="?", const=0.5, default=None, metavar="T",
                   help="MaskCLIP prompt denoising: drop classes never above confidence T (default T: 0.5)")
    g.add_argument("--pamr", action="store_true", help="refine masks along image edges (PAMR)")
    g.add_argument("--calibration", type=float, default=None, metavar="G",
                   help="zero-shot runs (clip-rc, clipteacher): lower the trained (seen) classes' scores by G "
                   "against the unseen ones, instead of the run's own value; sweep it on val, not test")
    g.add_argument("--ensemble", type=float, default=None, metavar="BETA",
                   help="clip-rc runs: blend the head's scores of the classes it was not trained on with the "
                   "cosine scores of its own CLIP features, weight BETA in [0, 1] (FC-CLIP's geometric "
                   "ensemble; not in the CLIP-RC paper; the README's synth rows use 0.6)")
    g = p.add_argument_group("inference (defaults: the dataset's protocol, or SCLIP-style for segment)")
    g.add_argument("--mode", choices=["slide", "whole"], default=None)
    g.add_argument("--short-side", type=int, default=None, help="resize so the short side is N px (0: 1.5x model size)")
    g.add_argument("--window", type=int, default=None, help="sliding window size (default: the model's input size)")
    g.add_argument("--stride", type=int, default=None, help="sliding window stride (default: window / 2)")
    g.add_argument("--scales", type=str, default=None, help="multi-scale factors, e.g. 0.75,1,1.5")
    g.add_argument("--logit-scale", type=float, default=None, help="softmax temperature on cosines (default 40)")
    g.add_argument("--prob-threshold", type=float, default=None, help="pixels below this probability -> background")
    g.add_argument("--area-threshold", type=float, default=None, help="drop classes covering less than this share")
    g.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward pass (default 4 on a CPU, 128 on a GPU)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16", "int8"], default="auto",
                   help="auto: bf16 on a GPU, fp32 on the CPU; int8: dynamic int8 image tower on the CPU "
                        "(training-free methods); on CPUs with AMX (Xeon Sapphire Rapids and later) int8 and "
                        "bf16 run 2-3x fp32 (README, Speed)")
    g.add_argument("--compile", action="store_true",
                   help="run the model through torch.compile: each new input size compiles first (tens of "
                        "seconds); the same outputs within float rounding, about 3 %% faster on a 2-core CPU "
                        "(not yet measured on a GPU; README, Speed)")


def _add_train_run_args(g, eval_help: str = "held-out split evaluated at the end (recorded, never used to "
                        "choose weights; default val)", precision_help: str | None = None) -> None:
    """The options every ``vocaseg train METHOD`` shares: held-out evaluation, seeds, device, resume."""
    g.add_argument("--eval-split", default=None, help=eval_help)
    g.add_argument("--eval-images", type=int, default=None, help="images of it (default 100; 0: none)")
    g.add_argument("--eval-every", type=int, default=None, help="also evaluate every N steps (default: end only)")
    g.add_argument("--synth-seed", type=int, default=None, help="seed of the synthetic world (default 0)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None)
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp64"], default=None, help=precision_help)
    g.add_argument("--workers", type=int, default=None, help="data loading processes (default 0)")
    g.add_argument("--checkpoint-every", type=int, default=None)
    g.add_argument("--resume", action="store_const", const=True, default=None, help="continue OUT/state.pt exactly")
    g.add_argument("--overwrite", action="store_const", const=True, default=None, help="replace a run in OUT")


def _inference_options(args, base: dict | None = None) -> dict:
    opts = dict(base or {})
    for key in ("mode", "short_side", "window", "stride", "logit_scale", "prob_threshold", "area_threshold",
                "key_smoothing", "key_smoothing_mode", "prompt_denoising", "calibration", "ensemble"):
        value = getattr(args, key)
        if value is not None:
            opts[key] = value
    if args.scales:
        try:
            opts["scales"] = tuple(float(s) for s in args.scales.split(","))
        except ValueError:
            raise UserError(f"--scales must be comma-separated numbers, not {args.scales!r}") from None
    opts["pamr"] = args.pamr
    opts["batch_size"] = args.batch_size
    opts["precision"] = args.precision
    opts["compile"] = args.compile
    return opts


def _device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_segmenter(args, templates, options: dict):
    from . import Segmenter
    from .runs import find_run

    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    if find_run(args.model) is not None:
        templates = None  # a run prompts with the templates it was trained with, unless --templates says otherwise
    try:
        return Segmenter.from_pretrained(args.model, pretrained=pretrained, method=args.method,
                                         device=_device(args.device), templates=args.templates or templates,
                                         **options)
    except (ValueError, NotImplementedError) as err:  # an option the model cannot run (e.g. int8 on a run)
        raise UserError(str(err)) from None


# ---------------------------------------------------------------------------- segment
def cmd_segment(args) -> int:
    from tqdm import tqdm

    from .images import ImageReadError, expand_inputs, read_image
    from .visualize import overlay, save_label_png
    from .vocabulary import Vocabulary, parse_background

    # Everything about the user's input is checked before any weights are loaded.
    if args.classes_file:
        vocab = Vocabulary.from_file(args.classes_file)
    elif args.classes:
        vocab = Vocabulary.parse(args.classes)
    else:
        raise UserError("name the classes: --classes \"cat, dog, grass\" (or --classes-file FILE)")
    background = parse_background(args.background)
    paths = expand_inputs(args.inputs)
    if not paths:
        raise UserError(f"no images found in {' '.join(args.inputs)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)

    stems: dict[str, int] = {}
    for p in paths:
        stems[p.stem] = stems.get(p.stem, 0) + 1

    def outputs(p: Path) -> list[Path]:
        stem = p.stem if stems[p.stem] == 1 else f"{p.parent.name}_{p.stem}"
        return [out / f"{stem}.png", out / f"{stem}_overlay.png", out / f"{stem}.json"]

    todo, skipped = [], 0
    for p in paths:
        if not args.overwrite and any(o.exists() for o in outputs(p)):
            print(f"skip: {outputs(p)[0]} exists (pass --overwrite to replace)", file=sys.stderr)
            skipped += 1
        else:
            todo.append(p)
    if not todo:
        print(f"nothing to do: {skipped} image(s) already segmented in {out}")
        return 0

    seg = _load_segmenter(args, "maskclip85", _inference_options(args))
    done = failed = 0
    bar = tqdm(total=len(todo), desc="segment", unit="img", dynamic_ncols=True)
    for start in range(0, len(todo), args.batch_images):
        chunk = todo[start:start + args.batch_images]
        arrays, ok = [], []
        for p in chunk:
            try:
                arrays.append(read_image(p))
                ok.append(p)
            except ImageReadError as err:
                tqdm.write(f"error: {err}", file=sys.stderr)
                failed += 1
        if arrays:
            results = seg.segment_arrays(arrays, seg.vocabulary(vocab, background))
            for p, array, res in zip(ok, arrays, results):
                label_path, overlay_path, json_path = outputs(p)
                labels = res.labels_compact  # uint8: a 48-megapixel map is 48 MB, not 384
                save_label_png(labels, label_path)
                overlay(array, labels, res.classes, title=p.name).save(overlay_path)
                json_path.write_text(json.dumps({
                    "image": str(p), "size": list(res.size), "classes": res.classes,
                    "fractions": res.fractions(), "model": args.model, "pretrained": args.pretrained,
                    "method": seg.method, "labels": label_path.name, "overlay": overlay_path.name}, indent=2))
                done += 1
        bar.update(len(chunk))
    bar.close()
    print(f"{done} segmented, {skipped} skipped, {failed} failed -> {out}")
    return 1 if failed else 0


# ---------------------------------------------------------------------------- eval / score
def _dataset_from_args(args):
    from .data.datasets import build_dataset

    folder = dict(image_dir=args.image_dir, label_dir=args.label_dir, classes_file=args.classes_file,
                  ignore_index=args.ignore_index, length=args.limit, seed=getattr(args, "synth_seed", None))
    return build_dataset(args.dataset, args.data_root, args.split, **folder)


def _split_from_args(args, dataset):
    from .evaluation import get_split

    return get_split(args.split_set, dataset.name) if args.split_set else None


def _write_result(result: dict, out: str | None, overwrite: bool) -> None:
    from .evaluation import format_table

    print(format_table(result))
    if out:
        path = Path(out)
        if path.exists() and not overwrite:
            alt = path.with_name(f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
            print(f"{path} exists; writing {alt} instead (pass --overwrite to replace)", file=sys.stderr)
            path = alt
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"result -> {path}")


def cmd_eval(args) -> int:
    import torch

    from .evaluation import WorstImages, evaluate
    from .runs import run_inference_defaults

    report = Path(args.report) if args.report else None
    if report is not None:
        if report.exists() and not report.is_dir():
            raise UserError(f"--report {report} is a file; give a folder")
        if (report / "index.html").exists() and not args.overwrite:
            raise UserError(f"--report {report} already holds a report; pass --overwrite to replace it")
        if args.report_worst < 0:
            raise UserError("--report-worst must be 0 or more")
    dataset = _dataset_from_args(args)
    split = _split_from_args(args, dataset)
    # the dataset's protocol, then a trained run's own (e.g. whole image), then what the command line says
    options = _inference_options(args, {**dataset.protocol, **run_inference_defaults(args.model)})
    distributed = "RANK" in __import__("os").environ and not torch.distributed.is_initialized()
    if distributed:
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        torch.distributed.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(__import__("os").environ.get("LOCAL_RANK", 0)))
            args.device = f"cuda:{torch.cuda.current_device()}"
    seg = _load_segmenter(args, dataset.templates, options)
    worst = WorstImages(args.report_worst, len(dataset.classes)) if report is not None else None
    t0 = time.time()
    result, matrix = evaluate(seg, dataset, split, batch_images=args.batch_images, workers=args.workers,
                              save_predictions=args.save_predictions, on_image=worst, return_matrix=True)
    result["seconds"] = round(time.time() - t0, 1)
    if worst is not None:
        worst.gather()
        result["worst_images"] = worst.summary()
    result["config"] = {"dataset": dataset.name, "data_root": args.data_root, "split": args.split,
                        "split_set": args.split_set, "model": args.model, "pretrained": args.pretrained,
                        "method": seg.method, "templates": args.templates or dataset.templates,
                        "inference": {k: (list(v) if isinstance(v, tuple) else v)
                                      for k, v in vars(seg.config).items()},
                        "command": " ".join(sys.argv)}
    if not distributed or torch.distributed.get_rank() == 0:
        _write_result(result, args.out, args.overwrite)
        if report is not None:
            from .report import write_report

            index = write_report(result, report, dataset.classes, matrix.matrix, worst)
            print(f"report -> {index} (open it in a browser; no server needed)")
    if distributed:
        torch.distributed.destroy_process_group()
    return 0


def cmd_score(args) -> int:
    from .evaluation import score_predictions

    dataset = _dataset_from_args(args)
    split = _split_from_args(args, dataset)
    result = score_predictions(dataset, args.pred_dir, split)
    result["config"] = {"dataset": dataset.name, "data_root": args.data_root, "split": args.split,
                        "split_set": args.split_set, "pred_dir": args.pred_dir, "command": " ".join(sys.argv)}
    _write_result(result, args.out, args.overwrite)
    return 0


# ---------------------------------------------------------------------------- train
def cmd_train_clip(args) -> int:
    from .training.clip_pretrain import ClipPretrainConfig, train_clip

    cfg = ClipPretrainConfig(out=args.out, model=args.model, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, warmup_steps=args.warmup, image_size=args.image_size, seed=args.seed,
                             workers=args.workers, checkpoint_every=args.checkpoint_every,
                             device=_device(args.device), resume=args.resume)
    train_clip(cfg)
    return 0


MCP_OPTIONS = ("model", "pretrained", "dataset", "data_root", "train_split", "setting", "split_set", "unlabeled",
               "void_from_gt", "student", "student_weights", "augment", "crop", "steps", "batch_size", "lr",
               "weight_decay", "self_training_from", "teacher_key_smoothing", "teacher_key_smoothing_mode",
               "teacher_prompt_denoising", "confidence", "learned_background", "templates", "eval_split",
               "eval_images", "eval_every", "synth_seed", "precision", "seed", "workers", "checkpoint_every",
               "resume", "overwrite")


def _resumed_config(out: Path, overrides: dict, changeable: tuple[str, ...]) -> dict:
    """The saved config of the run in ``out``, with the few options that may change on resume."""
    import torch

    state = out / "state.pt"
    if not state.is_file():
        raise UserError(f"nothing to resume in {out}: no state.pt (start without --resume)")
    saved = dict(torch.load(state, map_location="cpu", weights_only=False).get("config") or {})
    differ = [k for k, v in overrides.items() if v is not None and k not in changeable and k in saved
              and saved[k] != v]
    if differ:
        raise UserError(f"--resume continues the run in {out} as it was started; these options differ from it: "
                        f"{', '.join(differ)} (start a new run with another --out instead)")
    saved.pop("out", None)
    saved.pop("device", None)
    return {**saved, **{k: v for k, v in overrides.items() if v is not None and k in changeable}}


RESUME_CHANGEABLE = ("workers", "checkpoint_every", "resume", "precision")  # options a --resume may change


def _normalise_none(overrides: dict, keys: tuple[str, ...]) -> None:
    """'None' / 'NONE' on the command line mean the option's value 'none' (e.g. random weights)."""
    for key in keys:
        if isinstance(overrides.get(key), str) and overrides[key].lower() == "none":
            overrides[key] = "none"


def _preset_and_command(args, overrides: dict) -> str | None:
    """The preset to start from (a resumed run's own config already holds it) and, for a new run,
    the command line recorded in its config."""
    if args.resume:
        return overrides.pop("preset", None)
    from .runs import vocaseg_command

    overrides["command"] = vocaseg_command()
    return args.preset


def _report_training(summary: dict) -> None:
    ev = summary.get("eval") or {}
    print(f"{summary['steps']} steps in {summary['train_seconds_this_run']:.0f} s "
          f"({summary['steps_per_s_this_run']:.2f} steps/s); held-out: "
          + (", ".join(f"{k} {v}" for k, v in ev.items()) or "none"))


def _train_method(args, options: tuple[str, ...], make_config, train, *, recipe=None, synth_preset=None,
                  none_keys: tuple[str, ...] = ("pretrained",), adjust=None, parsed: dict | None = None) -> int:
    """What every ``vocaseg train METHOD`` does: read the options (a resumed run's own config instead),
    pick the synth preset for the synthetic world, build the config (and the recipe, which checks the
    data and models before anything is written), train, and print the summary.

    ``parsed``: options the command parsed from text (e.g. "0.5,1"); ``adjust(overrides)``: the method's
    own normalisation, after resume; ``recipe``: a Recipe class built before training."""
    overrides = {k: getattr(args, k) for k in options}
    overrides.update({k: v for k, v in (parsed or {}).items() if v is not None})
    if args.resume:  # a resumed run continues with the configuration it was started with
        overrides = _resumed_config(Path(args.out), overrides, RESUME_CHANGEABLE)
    elif synth_preset and args.preset is None and args.dataset in (None, "synth"):
        args.preset = synth_preset  # the synthetic world trains with the toy recipe's measured values
    _normalise_none(overrides, none_keys)
    if adjust:
        adjust(overrides)
    try:
        preset = _preset_and_command(args, overrides)
        cfg = make_config(preset, out=args.out, device=_device(args.device), **overrides)
        built = recipe(cfg) if recipe else None
    except (ValueError, TypeError, NotImplementedError) as err:
        raise UserError(str(err)) from None
    _report_training(train(cfg, built) if recipe else train(cfg))
    return 0


def _numbers(text: str | None, kind, flag: str, example: str) -> tuple | None:
    """'0.5,1' -> (0.5, 1.0) for a comma-separated option, with an error naming the flag."""
    if not text:
        return None
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag} takes {example}; not {text!r}") from None


def cmd_train_maskclip_plus(args) -> int:
    from .methods.maskclip_plus import make_config, train_maskclip_plus

    def adjust(overrides):
        if overrides["self_training_from"] is not None and overrides["self_training_from"] <= 0:
            overrides["self_training_from"] = 10 ** 12  # "never": guided learning throughout

    return _train_method(args, MCP_OPTIONS, make_config, train_maskclip_plus, adjust=adjust,
                         none_keys=("pretrained", "student_weights"))


RECLIP_OPTIONS = ("model", "pretrained", "rect_run", "dataset", "data_root", "train_split", "train_images",
                  "templates", "use_reference", "n_context", "position_bias", "bias_init_scale", "bias_sign",
                  "gumbel_scale", "pseudo_threshold", "pseudo_quantile", "pseudo_top_k", "student", "student_weights", "losses",
                  "feature_weight", "text_weight", "mask_logit_scale", "distill_prune", "distill_prune_scale", "test_pruning", "augment", "crop", "steps",
                  "batch_size", "lr", "weight_decay", "eval_split", "eval_images", "eval_every", "synth_seed",
                  "precision", "seed", "workers", "checkpoint_every", "resume", "overwrite")


def cmd_train_reclip(args) -> int:
    from .methods.reclip import make_config, train_reclip

    if not args.resume and args.stage is None:
        raise UserError("say which stage: --stage rect (rectification) or --stage distill --rect-run RUN")
    stage = [args.stage]

    def adjust(overrides):
        stage[0] = overrides.pop("stage", stage[0])  # a resumed run's own stage
        for key in ("distill_prune", "test_pruning"):  # 0 switches the pruning off
            if overrides.get(key) == 0:
                overrides[key] = None

    return _train_method(args, RECLIP_OPTIONS, lambda preset, **kw: make_config(preset, stage[0], **kw),
                         train_reclip, adjust=adjust, none_keys=("pretrained", "student_weights"))


SEGCLIP_OPTIONS = ("model", "pretrained", "dataset", "data_root", "train_images", "twins", "max_words", "losses",
                   "group_after", "centres", "cross_attention_blocks", "gumbel_tau", "official_batch_mixing",
                   "image_pool", "mask_ratio", "decoder_width", "decoder_depth", "decoder_heads", "kl_form", "patch_labels",
                   "superpixel_scale", "superpixel_sigma", "superpixel_min_size", "stored_side", "steps",
                   "batch_size", "lr", "clip_lr", "weight_decay", "warmup", "templates", "gate_top_k",
                   "background_thresholds", "eval_dataset", "eval_data_root", "eval_split", "eval_images",
                   "eval_every", "synth_seed", "precision", "seed", "workers", "checkpoint_every", "resume",
                   "overwrite")


def cmd_train_segclip(args) -> int:
    from .methods.segclip import SegClipRecipe, make_config, train_segclip

    def adjust(overrides):
        if overrides.get("eval_dataset") == "none":
            overrides["eval_images"] = 0

    crop = _numbers(args.crop_scale, float, "--crop-scale", "two numbers, e.g. 0.5,1")
    return _train_method(args, SEGCLIP_OPTIONS, make_config, train_segclip, recipe=SegClipRecipe,
                         synth_preset="synth", none_keys=("pretrained", "eval_dataset"), adjust=adjust,
                         parsed={"crop_scale": crop})


CLIP_RC_OPTIONS = ("setting", "init", "model", "pretrained", "dataset", "data_root", "train_split", "split_set",
                   "templates", "n_prompts", "deep_prompts", "regions", "region_block", "fuse", "recovery_layers",
                   "patch_context", "decoder_layers", "decoder_heads", "decoder_ffn", "dropout", "dense_rule",
                   "calibration", "loss", "focal_weight", "dice_weight", "recovery_weight", "augment", "crop", "steps", "batch_size", "lr",
                   "weight_decay", "warmup", "eval_split", "eval_images", "eval_every", "synth_seed", "precision",
                   "seed", "workers", "checkpoint_every", "resume", "overwrite")


def cmd_train_clip_rc(args) -> int:
    from .methods.clip_rc import make_config, train_clip_rc

    # the synthetic world trains with the toy recipe (its transductive variant with --init)
    synth = "synth_trans" if args.setting == "transductive" else "synth"
    return _train_method(args, CLIP_RC_OPTIONS, make_config, train_clip_rc, synth_preset=synth)


CLIPTEACHER_OPTIONS = ("setting", "model", "pretrained", "dataset", "data_root", "train_split", "split_set",
                       "templates", "student", "student_weights", "glm", "tau", "bank_size", "plm",
                       "teacher_dense_rule", "kmeans_iters", "fusion_threshold", "adapter", "adapter_layers",
                       "adapter_heads", "global_weight", "generate_weight", "ce_weight", "focal_weight",
                       "dice_weight", "loss_stride", "calibration", "augment", "crop", "steps", "batch_size", "lr",
                       "head_lr_mult", "weight_decay", "warmup", "eval_split", "eval_images", "eval_every",
                       "synth_seed", "precision", "seed", "workers", "checkpoint_every", "resume", "overwrite")


def cmd_train_clipteacher(args) -> int:
    from .methods.clipteacher import ClipTeacherRecipe, make_config, train_clipteacher

    windows = _numbers(args.kmeans_windows, int, "--kmeans-windows", "block counts, e.g. 3,7")
    return _train_method(args, CLIPTEACHER_OPTIONS, make_config, train_clipteacher, recipe=ClipTeacherRecipe,
                         synth_preset="synth", none_keys=("pretrained", "student_weights"),
                         parsed={"kmeans_windows": windows})


def cmd_convert_segclip(args) -> int:
    from .methods.segclip import convert_official

    try:
        out = convert_official(args.checkpoint, args.out, model=args.model,
                               background_thresholds=args.background_thresholds, overwrite=args.overwrite)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(f"run folder: {out} (the released SegCLIP; load with --model {out})")
    return 0


def cmd_list(args) -> int:
    import open_clip

    from .backbone import RULES
    from .data.datasets import DATASET_NAMES
    from .evaluation import ZERO_SHOT_SPLITS
    from .methods import METHODS
    from .methods.maskclip_plus import PRESETS
    from .methods.reclip import PRESETS as RECLIP_PRESETS
    from .methods.clip_rc import PRESETS as CLIP_RC_PRESETS
    from .methods.clipteacher import PRESETS as CLIPTEACHER_PRESETS
    from .methods.segclip import PRESETS as SEGCLIP_PRESETS
    from .runs import read_run_info, shipped_runs
    from .students import list_students

    archs = open_clip.list_models()
    print("models:")
    print("  toy                   the small CLIP shipped with vocaseg (synthetic world, offline)")
    print(f"  {len(archs)} open_clip architectures, e.g. ViT-B-16, ViT-L-14, RN50 (with --pretrained TAG or FILE)")
    print("  a folder with open_clip_config.json, or a run folder written by `vocaseg train`")
    print("methods:")
    print(f"  training-free: {', '.join(RULES)}")
    for entry in METHODS.values():
        print(f"  {entry.name:<20s}  {entry.summary} (train: {entry.train})")
    print("shipped runs (--model NAME):")
    runs = shipped_runs()
    for name, path in runs.items():
        info = read_run_info(path)
        ev = (info.get("trained") or {}).get("eval") or {}
        score = ", ".join(f"{k} {v}" for k, v in ev.items() if "IoU" in k)
        n = next((v for k, v in ev.items() if k.endswith("_images")), None)
        score += f" (held-out eval at the end of training, {n} images)" if score and n else ""
        print(f"  {name:<24s} {info['method']} ({info.get('setting')}, {info.get('dataset')}"
              f"{', ' + info['split_set'] if info.get('split_set') else ''}) {score}")
    if not runs:
        print("  none")
    print(f"datasets: {', '.join(DATASET_NAMES)}")
    print(f"zero-shot split sets: {', '.join(ZERO_SHOT_SPLITS)} (or --split-set 'unseen:cls a,cls b')")
    print(f"students: {', '.join(list_students())}")
    print(f"maskclip-plus presets: {', '.join(PRESETS)}")
    print(f"reclip presets (--stage rect | distill): {', '.join(RECLIP_PRESETS)}")
    print(f"segclip presets: {', '.join(SEGCLIP_PRESETS)}")
    print(f"clip-rc presets: {', '.join(CLIP_RC_PRESETS)}")
    print(f"clipteacher presets: {', '.join(CLIPTEACHER_PRESETS)}")
    return 0


# ---------------------------------------------------------------------------- demo / bench
def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, num_scenes=args.scenes, overwrite=args.overwrite, device=_device(args.device))
    return 0


def cmd_app(args) -> int:
    import importlib.util

    from .app import INSTALL_HINT, SegmentationApp, launch

    if importlib.util.find_spec("gradio") is None:
        raise UserError(INSTALL_HINT)
    if args.max_upload_mb <= 0 or args.max_megapixels <= 0:
        raise UserError("--max-upload-mb and --max-megapixels must be positive")
    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    app = SegmentationApp(args.model, pretrained=pretrained, runs=args.run, device=_device(args.device),
                          max_upload_mb=args.max_upload_mb, max_megapixels=args.max_megapixels)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: serving on {args.host}, reachable from other machines", file=sys.stderr)
    print(f"vocaseg app: model {args.model}, methods {', '.join(app.methods)}; {app.limits_text()}")
    launch(app, host=args.host, port=args.port)
    return 0


def cmd_gallery(args) -> int:
    from .gallery import make_gallery

    if args.scenes < 1:
        raise UserError("--scenes must be 1 or more")
    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    make_gallery(args.out, scenes=args.scenes, split=args.split, model=args.model, pretrained=pretrained,
                 runs=args.run, device=_device(args.device), overwrite=args.overwrite)
    return 0


def _per_device(path: str | None, device: str, several: bool) -> str | None:
    """bench.json -> bench-cpu.json when several devices are timed."""
    if path is None or not several:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{device}{p.suffix}"))


def cmd_bench(args) -> int:
    from .bench import run_bench

    import torch

    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        try:
            run_bench(model=args.model, device=device, images=args.images, batch_sizes=tuple(args.batch_size),
                      precisions=tuple(args.precision), threads=args.threads, baseline=args.baseline,
                      json_path=_per_device(args.json, device, len(devices) > 1), settings=args.setting,
                      images_per_call=args.images_per_call, text=args.text, eval_images=args.eval_images,
                      eval_dir=args.eval_dir, workers=args.workers, batch_images=args.batch_images,
                      load_batches=args.load_batch, compile_modes=(False, True) if args.compile else (False,))
        except (ValueError, NotImplementedError) as err:
            raise UserError(str(err)) from None
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="vocaseg", description=__doc__, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"vocaseg {__import__('vocaseg').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("segment", help="segment images into the classes you name", formatter_class=fmt,
                       description="Segment images into named classes. Per image, writes NAME.png (class "
                       "indices, palette), NAME_overlay.png (picture with legend) and NAME.json (class shares).",
                       epilog="examples:\n  vocaseg segment street.jpg --classes \"car, road, tree, sky\" --out out/\n"
                       "  vocaseg segment photos/ --classes \"tv monitor, television; sofa; cat\" --out out/\n"
                       "  vocaseg segment 'shots/*.png' --classes-file classes.txt --model toy --out out/\n"
                       "classes: comma-separated; when a class needs synonyms, separate classes with ';'\n"
                       "and synonyms with ','. A class file has one class per line, synonyms after commas.\n\n"
                       + EPILOG_MODELS)
    p.add_argument("inputs", nargs="+", help="image files, folders, or glob patterns")
    p.add_argument("--classes", help="class names, e.g. \"cat, dog, grass\"")
    p.add_argument("--classes-file", help="file with one class per line (synonyms after commas)")
    p.add_argument("--background", default=None,
                   help="add a background class: 'background', or words that count as background ('sky,wall')")
    p.add_argument("--out", default="vocaseg-out", help="output folder (default: vocaseg-out)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip those images)")
    p.add_argument("--batch-images", type=int, default=4, help="images segmented together (default 4)")
    _add_model_args(p)
    p.set_defaults(func=cmd_segment)

    from .data.datasets import DATASET_NAMES

    def data_args(q):
        q.add_argument("--dataset", required=True, choices=DATASET_NAMES)
        q.add_argument("--data-root", default=None, help="dataset folder in mmsegmentation's layout")
        q.add_argument("--split", default="val", help="val (default), train, test ...")
        q.add_argument("--split-set", default=None, help="zero-shot split: voc_zs3, context_zs3, coco_stuff_zs3, "
                       "synth_zs, or 'unseen:cls a,cls b'")
        q.add_argument("--image-dir", default=None, help="folder dataset: images sub-folder (default images)")
        q.add_argument("--label-dir", default=None, help="folder dataset: labels sub-folder (default labels)")
        q.add_argument("--classes-file", default=None, help="folder dataset: class file (default classes.txt)")
        q.add_argument("--ignore-index", type=int, default=None, help="folder dataset: label value to ignore")
        q.add_argument("--limit", type=int, default=None, help="only the first N images (quick checks)")
        q.add_argument("--synth-seed", type=int, default=None,
                       help="synth: draw the scenes of the world seeded N instead of 0 (held-out worlds)")
        q.add_argument("--out", default=None, help="write the JSON result here")
        q.add_argument("--overwrite", action="store_true", help="replace an existing --out file (eval: and --report folder)")

    p = sub.add_parser("eval", help="run a method over a benchmark and report mIoU", formatter_class=fmt,
                       description="Evaluate a method on a dataset with the dataset's protocol (SCLIP's for the "
                       "benchmarks). Multi-GPU/CPU: torchrun --nproc-per-node N -m vocaseg.cli eval ...",
                       epilog="examples:\n  vocaseg eval --dataset synth --model toy --method maskclip\n"
                       "  vocaseg eval --dataset synth --model toy --out r.json --report report/   # + HTML report\n"
                       "  vocaseg eval --dataset voc21 --data-root data/VOCdevkit/VOC2012 --method sclip --out r.json\n"
                       "  vocaseg eval --dataset folder --data-root ../shared/data/camvid --image-dir val \\\n"
                       "      --label-dir valannot --classes-file camvid.txt --ignore-index 11\n\n" + EPILOG_MODELS)
    data_args(p)
    p.add_argument("--batch-images", type=int, default=4, help="images per inference batch (default 4)")
    p.add_argument("--workers", type=int, default=2, help="data loading processes (default 2)")
    p.add_argument("--save-predictions", default=None, help="also write label PNGs to this folder")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="also write an HTML report to DIR/index.html (opens without a server): per-class IoU "
                   "bar chart, confusion-matrix heat map, the worst images as picture | ground truth | "
                   "prediction, and the same JSON as --out (DIR/eval.json)")
    p.add_argument("--report-worst", type=int, default=6, metavar="N",
                   help="images shown in the report's worst-images section (default 6; 0: none)")
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="score a folder of predicted label PNGs", formatter_class=fmt,
                       description="Score predictions made by any method: PRED_DIR/<image id>.png holding "
                       "class indices (255 = no prediction) at the ground truth's size.")
    data_args(p)
    p.add_argument("--pred-dir", required=True)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("train", help="training commands")
    tsub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    t = tsub.add_parser("clip", help="contrastive CLIP pretraining on the synthetic world",
                        formatter_class=fmt, epilog="the shipped toy model was made with (about 5 min on one H100, bf16;\n"
                        "about 1.5-2 h on a 2-core CPU):\n"
                        "  vocaseg train clip --out runs/toy --steps 2400 --seed 0 --device cuda --workers 4\n"
                        "a model folder (--model DIR) holds open_clip_config.json; its optional\n"
                        "\"vocaseg\": {\"class_token_block\": K} makes the class token join before block K\n"
                        "(the toy: 5 of 0..5, so the image embedding is read out of the last block)")
    t.add_argument("--out", required=True, help="run folder: checkpoint.pt, weights, train_info.json")
    t.add_argument("--model", default="toy", help="architecture: 'toy', a model folder, or any open_clip name")
    t.add_argument("--steps", type=int, default=2400)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--image-size", type=int, default=None, help="scene size in px (default: the model's input size)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=1, help="scene generation processes")
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--device", default=None)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.set_defaults(func=cmd_train_clip)

    t = tsub.add_parser(
        "maskclip-plus", help="MaskCLIP+: a DeepLab student on MaskCLIP pseudo-labels, then self-training",
        formatter_class=fmt, description="Train MaskCLIP+ (Zhou et al., ECCV 2022, Sec. 3.4). A frozen MaskCLIP "
        "teacher labels every augmented crop on the fly; the student's classifier is the frozen CLIP text "
        "embeddings, so the result stays open-vocabulary. The run folder loads with --model OUT anywhere "
        "(segment, eval, score, bench) and with Segmenter.from_pretrained(OUT).",
        epilog="settings:\n"
        "  annotation-free   every pixel pseudo-labelled by the teacher; no ground truth is read\n"
        "  transductive      zero-shot: seen-class masks, unseen pixels pseudo-labelled among the unseen\n"
        "                    classes (--unlabeled unseen-gt, the official rule) or every unlabelled pixel\n"
        "                    among all classes (--unlabeled strict); self-training from --self-training-from\n"
        "  supervised        a baseline: ground truth only (with --split-set: seen classes only)\n\n"
        "presets (the papers' schedules; values you pass win):\n"
        "  synth, synth_zs3                       the toy recipes (toy CLIP, synthetic world, CPU-sized)\n"
        "  context59, coco_stuff171, voc20        annotation-free, ViT-B/16 teacher, DeepLabV2-R101\n"
        "  voc_zs3, context_zs3, coco_stuff_zs3   transductive zero-shot, RN50 teacher\n\n"
        "examples:\n"
        "  vocaseg train maskclip-plus --preset synth --out runs/mcp\n"
        "  vocaseg train maskclip-plus --preset synth_zs3 --out runs/mcp-zs3\n"
        "  vocaseg train maskclip-plus --preset context59 --data-root data/VOCdevkit --out runs/ctx \\\n"
        "      --pretrained /path/ViT-B-16.pt --student-weights /path/resnet101.pth\n"
        "  torchrun --nproc-per-node 4 -m vocaseg.cli train maskclip-plus --preset voc_zs3 --data-root ... --out ...\n"
        "  vocaseg train maskclip-plus --out runs/mcp --resume          # continue an interrupted run exactly\n"
        "  vocaseg eval --dataset synth --model runs/mcp               # then use it like any model")
    t.add_argument("--out", required=True, help="run folder (never overwritten without --overwrite)")
    t.add_argument("--preset", default=None, help="start from a preset (see below)")
    g = t.add_argument_group("teacher and data")
    g.add_argument("--model", default=None, help="the CLIP (teacher and text side): toy (default), an open_clip name "
                   "or a model folder")
    g.add_argument("--pretrained", default=None, help="its weights: a tag, a file, 'none' (default: 'default')")
    g.add_argument("--dataset", default=None, help="synth (default) or any dataset of `vocaseg list`")
    g.add_argument("--data-root", default=None)
    g.add_argument("--train-split", default=None, help="split to train on (default: train)")
    g.add_argument("--setting", default=None, choices=["annotation-free", "transductive", "supervised"])
    g.add_argument("--split-set", default=None, help="zero-shot split for transductive / supervised runs (synth_zs)")
    g.add_argument("--unlabeled", default=None, choices=["unseen-gt", "strict"],
                   help="transductive: which pixels are pseudo-labelled (default unseen-gt, the official rule)")
    g.add_argument("--void-from-gt", action="store_const", const=True, default=None,
                   help="annotation-free: ignore the dataset's void pixels, as the official runs (reads label files)")
    g.add_argument("--teacher-key-smoothing", type=float, nargs="?", const=1.0, default=None, metavar="T",
                   help="key smoothing in the teacher (default off, as the paper's headline runs)")
    g.add_argument("--teacher-key-smoothing-mode", choices=["official", "paper"], default=None)
    g.add_argument("--teacher-prompt-denoising", type=float, nargs="?", const=0.5, default=None, metavar="T")
    g.add_argument("--confidence", type=float, default=None,
                   help="ignore teacher labels less probable than this (default 0: off, as the paper)")
    g.add_argument("--templates", default=None, help="prompt templates (default maskclip85)")
    g = t.add_argument_group("student and schedule")
    g.add_argument("--student", default=None, help="deeplabv2-toy (default), deeplabv2-r101, deeplabv3plus-r101 ...")
    g.add_argument("--student-weights", default=None,
                   help="backbone weights: 'default' (ImageNet where it exists), a local .pth, or 'none'")
    g.add_argument("--learned-background", action="store_const", const=True, default=None,
                   help="a learned background embedding as class 0 (Context ZS3)")
    g.add_argument("--augment", default=None, choices=["synth", "voc_coco", "context"])
    g.add_argument("--crop", type=int, default=None)
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None, help="global batch per step (default 16)")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--self-training-from", type=int, default=None, metavar="STEP",
                   help="first self-training step (0: never; default: the preset's, else never)")
    _add_train_run_args(t.add_argument_group("run"),
                        precision_help="auto: bf16 autocast on CUDA, fp32 on CPU; fp64 only for numerical checks")
    t.set_defaults(func=cmd_train_maskclip_plus)

    t = tsub.add_parser(
        "reclip", help="ReCLIP: rectify CLIP's class and space bias (--stage rect), then distil (--stage distill)",
        formatter_class=fmt, description="Train ReCLIP (Wang & Kang, CVPR 2024), unsupervised: only the "
        "training images and the class names are read, never a label. Stage rect learns a Reference prompt "
        "(class-preference bias) and a projection of the positional embedding (space-preference bias) that "
        "are subtracted from MaskCLIP's logits; stage distill trains a DeepLabV2 student from the rectified "
        "CLIP. Each run folder loads with --model OUT anywhere (segment, eval, score, bench).",
        epilog="presets (the paper's schedules; values you pass win):\n"
        "  synth                        the toy recipe (toy CLIP, synthetic world, CPU-sized)\n"
        "  voc20, context59, ade150     ViT-B/16, the official thresholds, crops and epochs\n\n"
        "ablations (rect): --no-reference, --position-bias shared|none, --bias-sign add;\n"
        "                  (distill): --losses mask | mask,feature | mask,feature,text\n\n"
        "examples:\n"
        "  vocaseg train reclip --preset synth --stage rect --out runs/r-rect\n"
        "  vocaseg train reclip --preset synth --stage distill --rect-run runs/r-rect --out runs/r\n"
        "  vocaseg train reclip --preset voc20 --stage rect --data-root data/VOCdevkit --out runs/voc-rect\n"
        "  vocaseg train reclip --out runs/r --resume                  # continue an interrupted run exactly\n"
        "  vocaseg eval --dataset synth --model runs/r                 # then use it like any model")
    t.add_argument("--out", required=True, help="run folder (never overwritten without --overwrite)")
    t.add_argument("--stage", choices=["rect", "distill"], default=None, help="rect: rectification; distill: "
                   "distillation into a student (needs --rect-run)")
    t.add_argument("--preset", default=None, help="start from a preset (see below)")
    g = t.add_argument_group("CLIP and data")
    g.add_argument("--model", default=None, help="the CLIP: toy (default), an open_clip name or a model folder")
    g.add_argument("--pretrained", default=None, help="its weights: a tag, a file, 'none' (default: 'default')")
    g.add_argument("--rect-run", default=None, help="distill: the rectification run to learn from (its CLIP is used)")
    g.add_argument("--dataset", default=None, help="synth (default) or any dataset of `vocaseg list`")
    g.add_argument("--data-root", default=None)
    g.add_argument("--train-split", default=None, help="split to train on (default: train)")
    g.add_argument("--train-images", type=int, default=None, help="use only the first N training images")
    g.add_argument("--templates", default=None, help="prompt templates of the Query (default maskclip85)")
    g.add_argument("--pseudo-threshold", type=float, default=None, metavar="T",
                   help="image-level pseudo classes: 100 x cosine >= T (default: the preset's, else a quantile)")
    g.add_argument("--pseudo-quantile", type=float, default=None, metavar="Q",
                   help="without a threshold: T = this quantile of all training images' scores (default 0.75)")
    g.add_argument("--pseudo-top-k", type=int, default=None, help="classes kept when none passes T (default 3)")
    g = t.add_argument_group("rectification")
    g.add_argument("--no-reference", dest="use_reference", action="store_const", const=False, default=None,
                   help="ablation: no Reference prompt")
    g.add_argument("--n-context", type=int, default=None, help="context vectors (default: all free text positions)")
    g.add_argument("--position-bias", choices=["per-class", "shared", "none"], default=None,
                   help="per-class (official, default), shared (the paper's one map) or none")
    g.add_argument("--bias-init-scale", type=float, default=None, metavar="S",
                   help="initial scale of the positional bias map (its last BN's gamma; official 1.0)")
    g.add_argument("--bias-sign", choices=["subtract", "add"], default=None, help="ablation: add the bias instead")
    g.add_argument("--gumbel-scale", type=float, default=None, help="Gumbel-softmax of this x logits (default 1000)")
    g.add_argument("--test-pruning", type=float, default=None, metavar="T",
                   help="the result's test-time class pruning threshold (x100 softmax; 0: off; default: the preset's)")
    g = t.add_argument_group("distillation")
    g.add_argument("--student", default=None, help="deeplabv2-toy (default), deeplabv2-r50 ...")
    g.add_argument("--student-weights", default=None,
                   help="backbone weights: 'default' (ImageNet where it exists), a local .pth, or 'none'")
    g.add_argument("--losses", default=None, help="comma-separated subset of mask,feature,text (default: all)")
    g.add_argument("--feature-weight", type=float, default=None, help="alpha (default 0.5)")
    g.add_argument("--text-weight", type=float, default=None, help="beta (default 0.5)")
    g.add_argument("--mask-logit-scale", type=float, default=None, metavar="S",
                   help="multiply the student's logits (a difference of cosines) by S in the mask loss "
                        "(default 1, the paper's)")
    g.add_argument("--distill-prune", type=float, default=None, metavar="T",
                   help="prune the teacher's classes whose softmax (at --distill-prune-scale) never reaches T "
                        "(0: off; default 0.5)")
    g.add_argument("--distill-prune-scale", type=float, default=None, metavar="S",
                   help="the softmax scale of that pruning (official: 10; the synth preset: 100)")
    g = t.add_argument_group("schedule and run")
    g.add_argument("--augment", default=None, choices=["synth", "mmseg", "mmseg_context"])
    g.add_argument("--crop", type=int, default=None)
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    _add_train_run_args(g)
    t.set_defaults(func=cmd_train_reclip)

    t = tsub.add_parser(
        "segclip", help="SegCLIP: fine-tune a CLIP ViT on image-caption pairs with learnable centres that group "
        "patches into regions", formatter_class=fmt,
        description="Train SegCLIP (Luo et al., ICML 2023), annotation-free: only images and their captions are "
        "read. A semantic group module (learnable centres, cross-attention, hard Gumbel assignment of patches "
        "to centres) is inserted after block --group-after of the image tower; the later blocks run on the "
        "region tokens. Losses: CLIP's contrastive loss on the max-pooled regions, a masked reconstruction "
        "routed through the regions, and a KL that keeps each Felzenszwalb superpixel on one centre. At "
        "inference each region is scored against the class names and each pixel takes its centre's label. "
        "The run folder loads with --model OUT anywhere (segment, eval, score, bench).",
        epilog="presets (values you pass win):\n"
        "  synth       the toy recipe: toy CLIP, synthetic captioned scenes, module after block 4 of 6,\n"
        "              2,400 steps of 128 (a GPU job; a CPU does a few steps a minute)\n"
        "  cc3m_coco   the paper's schedule: OpenAI ViT-B/16, module after block 10, batch 768, 43k steps\n"
        "              (10 epochs of CC3M + COCO), lr 4e-3 / 4e-6; give the pairs with --dataset csv|webdataset\n\n"
        "data (--dataset):\n"
        "  synth        the synthetic world's captioned train scenes (offline)\n"
        "  csv          --data-root pairs.csv: rows 'path,caption' (paths relative to the file; header optional)\n"
        "  webdataset   --data-root 'shards/cc3m-{00000..00331}.tar' (or a folder of .tar, or a glob): samples\n"
        "               KEY.jpg + KEY.txt (or KEY.json with a caption); read by random access, indexed once\n"
        "  superpixels of file datasets are computed once per image and cached under ~/.cache/vocaseg\n\n"
        "ablations:\n"
        "  --losses contrastive | contrastive,reconstruction | contrastive,superpixel   (default: all three)\n"
        "  --group-after N --centres L --cross-attention-blocks K   where the module sits, its size\n"
        "  --official-batch-mixing   emulate the official cross-attention, which on its torch 1.8 mixes the\n"
        "               images of a batch (image b sees flat tokens b, B+b, ...); for comparison only\n"
        "  --kl-form paper, --patch-labels majority, --gate-top-k 0, --templates maskclip85\n"
        "  --image-pool mean   the image embedding as the mean of the regions (GroupViT's), not the max\n\n"
        "the released model (no training): vocaseg convert segclip segclip.bin --out runs/segclip-paper\n\n"
        "examples:\n"
        "  vocaseg train segclip --model toy --dataset synth --out runs/s     # the synth preset (GPU-sized)\n"
        "  vocaseg train segclip --preset synth_cpu --out runs/s   # batch 32 x 600 steps: ~25 min on one CPU core\n"
        "  vocaseg train segclip --preset synth --losses contrastive --out runs/s-con\n"
        "  vocaseg train segclip --preset cc3m_coco --dataset webdataset --data-root 'cc/{00000..00331}.tar' \\\n"
        "      --pretrained /path/ViT-B-16.pt --device cuda --workers 8 --out runs/segclip\n"
        "  torchrun --nproc-per-node 8 -m vocaseg.cli train segclip --preset cc3m_coco ... --out runs/segclip\n"
        "  vocaseg train segclip --out runs/s --resume          # continue an interrupted run exactly\n"
        "  vocaseg eval --dataset synth --model runs/s          # then use it like any model")
    t.add_argument("--out", required=True, help="run folder (never overwritten without --overwrite)")
    t.add_argument("--preset", default=None, help="start from a preset (see below; default: synth for --dataset synth)")
    g = t.add_argument_group("CLIP and data")
    g.add_argument("--model", default=None, help="the CLIP ViT to start from: toy (default), an open_clip name or a "
                   "model folder")
    g.add_argument("--pretrained", default=None, help="its weights: a tag, a file, 'none' (default: 'default')")
    g.add_argument("--dataset", default=None, choices=["synth", "csv", "webdataset"],
                   help="image-caption pairs (default synth)")
    g.add_argument("--data-root", default=None, help="csv: the file; webdataset: the shards")
    g.add_argument("--train-images", type=int, default=None, help="use only the first N pairs (synth: N scenes)")
    g.add_argument("--no-twins", dest="twins", action="store_const", const=False, default=None,
                   help="synth: plain scenes, without each scene's twin with other shapes")
    g.add_argument("--max-words", type=int, default=None, help="caption tokens kept (default 32, official)")
    g.add_argument("--stored-side", type=int, default=None,
                   help="short side images are resized to before cropping and superpixels (default: the model's "
                   "input size; the official stores images at 224)")
    g.add_argument("--crop-scale", default=None, help="random resized crop area range (default 0.5,1)")
    g = t.add_argument_group("the group module and losses")
    g.add_argument("--losses", default=None, help="comma-separated: contrastive (required), reconstruction, "
                   "superpixel (default: all)")
    g.add_argument("--group-after", type=int, default=None, metavar="N",
                   help="insert the module after block N (blocks N.. run on the regions; toy default 4, ViT-B 10)")
    g.add_argument("--centres", type=int, default=None, metavar="L", help="learnable centres = regions (default 8)")
    g.add_argument("--cross-attention-blocks", type=int, default=None, metavar="K",
                   help="cross-attention blocks of the centres (default 2)")
    g.add_argument("--gumbel-tau", type=float, default=None, help="Gumbel-softmax temperature (default 0.9)")
    g.add_argument("--image-pool", choices=("max", "mean"), default=None,
                   help="the image embedding from the region tokens: max (official, default) or mean (GroupViT's; "
                        "every region then gets the contrastive loss's gradient)")
    g.add_argument("--official-batch-mixing", action="store_const", const=True, default=None,
                   help="emulate the official cross-attention's mixing of a batch's images (not the method)")
    g.add_argument("--mask-ratio", type=float, default=None, help="reconstruction: share of patches dropped (0.75)")
    g.add_argument("--decoder-width", type=int, default=None, help="reconstruction decoder width (default: half "
                   "the tower's)")
    g.add_argument("--decoder-depth", type=int, default=None, help="decoder blocks (default 3)")
    g.add_argument("--decoder-heads", type=int, default=None, help="decoder heads (default 8; synth 4)")
    g.add_argument("--kl-form", choices=["code", "paper"], default=None,
                   help="superpixel KL: code (softmax of the one-hot rows, default) or paper (Eq. 5-6)")
    g.add_argument("--patch-labels", choices=["floor_mean", "majority"], default=None,
                   help="a patch's superpixel: floor of the mean id (official) or the most frequent id")
    g.add_argument("--superpixel-scale", type=float, default=None, help="Felzenszwalb scale at the stored size "
                   "(default: 224 scaled with the side; synth 100)")
    g.add_argument("--superpixel-sigma", type=float, default=None, help="Felzenszwalb sigma (default 0.9)")
    g.add_argument("--superpixel-min-size", type=int, default=None, help="Felzenszwalb min_size (default: 224 "
                   "scaled with the area; synth 64)")
    g = t.add_argument_group("inference of the result")
    g.add_argument("--templates", default=None, help="prompt templates (default photo: 'a photo of a {}.', official)")
    g.add_argument("--gate-top-k", type=int, default=None, help="classes the image embedding lets through (default "
                   "5; 0: all)")
    g.add_argument("--background-thresholds", choices=["code", "paper"], default=None,
                   help="VOC / Context / COCO-Object background thresholds: code 0.80/0.25/0.65 (default) or "
                   "paper 0.75/0.25/0.65")
    g = t.add_argument_group("schedule and run")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None, help="global batch per step (synth 128)")
    g.add_argument("--lr", type=float, default=None, help="new modules and the blocks after the module (synth 4e-3)")
    g.add_argument("--clip-lr", type=float, default=None, help="the blocks before it and the text tower (synth 1e-6)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW decoupled decay (default 0.05)")
    g.add_argument("--warmup", type=float, default=None, help="share of the steps with a linear warm-up (0.15)")
    g.add_argument("--eval-dataset", default=None, help="held-out dataset evaluated at the end, recorded only "
                   "(default synth; 'none' to skip; e.g. voc21 with --eval-data-root)")
    g.add_argument("--eval-data-root", default=None)
    _add_train_run_args(g, eval_help="its split (default val)",
                        precision_help="fp32 (default, as the official), bf16 autocast, auto (bf16 on CUDA)")
    t.set_defaults(func=cmd_train_segclip)

    t = tsub.add_parser(
        "clip-rc", help="CLIP-RC: zero-shot segmentation from seen-class labels (deep prompts, region tokens, "
        "a decoder on a frozen CLIP ViT)", formatter_class=fmt,
        description="Train CLIP-RC (Zhang et al., CVPR 2024) on the seen classes of a zero-shot split. The CLIP "
        "stays frozen; deep visual prompts, region-level bridge tokens (each a class token of one cell of the "
        "patch grid), the region alignment and a decoder are trained with sigmoid focal + dice losses, plus a "
        "training-only recovery decoder. Inductive: unseen names are never read in training, unseen pixels "
        "are negatives. Transductive: start from an inductive run (--init) and pseudo-label the unseen pixels "
        "with the model's own online argmax over the unseen classes. The run folder loads with --model OUT "
        "anywhere (segment, eval, app) and names any classes.",
        epilog="presets (the paper's schedules; values you pass win):\n"
        "  synth, synth_trans            the toy recipe (toy CLIP, synthetic world, split synth_zs)\n"
        "  voc_zs3[_trans]               VOC 15/5, ViT-B/16, 40k (transductive 20k) at batch 16\n"
        "  context_zs3[_trans]           Pascal Context 50/10 (background seen)\n"
        "  coco_stuff_zs3[_trans]        COCO-Stuff 156/15, 100 prompts, loss weights 200/3/50\n\n"
        "ablations: --regions 0 (no region tokens), --fuse cls|rlb|none, --recovery-layers 0,\n"
        "           --dense-rule raw|maskclip, --regions 1|4|36, --region-block 0 (toy: join early)\n"
        "diagnostics (not the paper's): --loss ce (softmax cross-entropy), --patch-context 2 (3x3 convs on\n"
        "           the decoder's image tokens), --augment synth_noscale (no random rescale)\n\n"
        "examples:\n"
        "  vocaseg train clip-rc --preset synth --out runs/rc                     # inductive, toy\n"
        "  vocaseg train clip-rc --setting transductive --init runs/rc --out runs/rc-trans\n"
        "  vocaseg train clip-rc --preset voc_zs3 --data-root data/VOCdevkit --device cuda --out runs/voc-rc\n"
        "  vocaseg train clip-rc --out runs/rc --resume                           # continue exactly\n"
        "  vocaseg eval --dataset synth --split-set synth_zs --model runs/rc      # mIoU(S), mIoU(U), hIoU")
    t.add_argument("--out", required=True, help="run folder (never overwritten without --overwrite)")
    t.add_argument("--preset", default=None, help="start from a preset (see below; synth when training on synth)")
    t.add_argument("--setting", choices=["inductive", "transductive", "supervised"], default=None,
                   help="inductive (default): seen labels only; transductive: + online pseudo labels on unseen "
                        "pixels, from --init; supervised: every class labelled (the upper bound, no --split-set)")
    t.add_argument("--init", default=None, help="transductive: the inductive run to start from (its CLIP is used)")
    g = t.add_argument_group("CLIP and data")
    g.add_argument("--model", default=None, help="the CLIP ViT: toy (default), an open_clip name or a model folder")
    g.add_argument("--pretrained", default=None, help="its weights: a tag, a file, 'none' (default: 'default')")
    g.add_argument("--dataset", default=None, help="synth (default) or any dataset of `vocaseg list`")
    g.add_argument("--data-root", default=None)
    g.add_argument("--train-split", default=None, help="split to train on (default: train)")
    g.add_argument("--split-set", default=None, help="the zero-shot split: synth_zs (default), voc_zs3, "
                   "context_zs3, coco_stuff_zs3, or 'unseen:a,b'")
    g.add_argument("--templates", default=None, help="prompt templates of the text embeddings (default maskclip85)")
    g = t.add_argument_group("architecture (ablations)")
    g.add_argument("--n-prompts", type=int, default=None, help="deep visual prompts per block (default 10)")
    g.add_argument("--shallow-prompts", dest="deep_prompts", action="store_const", const=False, default=None,
                   help="prompts in the first block only (VPT-shallow)")
    g.add_argument("--regions", type=int, default=None, help="region tokens M, a square number (default 16; 0: none)")
    g.add_argument("--region-block", type=int, default=None, metavar="N",
                   help="region tokens join before block N (default: where the class token joins: 0 in "
                   "open_clip's towers, 5 in the toy's)")
    g.add_argument("--fuse", choices=["both", "cls", "rlb", "none"], default=None,
                   help="tokens fused into the image tokens (default both)")
    g.add_argument("--recovery-layers", type=int, default=None, help="recovery decoder layers (default 1; 0: none)")
    g.add_argument("--patch-context", type=int, default=None, metavar="N",
                   help="N 3x3 convolutions over the decoder's image tokens, residual (default 0; not the paper's: "
                   "its patches are scored alone, a toy diagnostic)")
    g.add_argument("--decoder-layers", type=int, default=None, help="default 3")
    g.add_argument("--decoder-heads", type=int, default=None, help="default 8 (toy: 4)")
    g.add_argument("--decoder-ffn", type=int, default=None, help="default 2048 (toy: 512)")
    g.add_argument("--dropout", type=float, default=None, help="default 0.1")
    g.add_argument("--dense-rule", choices=["raw", "maskclip"], default=None,
                   help="the last block's patch tokens: raw (official) or maskclip's value path (toy default)")
    g.add_argument("--calibration", type=float, default=None,
                   help="subtracted from the seen classes' scores at inference (default 0.1 inductive, else 0)")
    g = t.add_argument_group("loss and schedule")
    g.add_argument("--loss", choices=["focal_dice", "ce"], default=None,
                   help="focal_dice: the paper's per-class sigmoid focal + dice, unseen pixels negatives (default); "
                   "ce: softmax cross-entropy over the trained classes, unseen pixels ignored (diagnostic)")
    g.add_argument("--focal-weight", type=float, default=None, help="default 100")
    g.add_argument("--dice-weight", type=float, default=None, help="default 1")
    g.add_argument("--recovery-weight", type=float, default=None, help="default 2")
    g.add_argument("--augment", default=None, choices=["synth", "synth_noscale", "mmseg"],
                   help="synth: the toy world rescaled by U(0.75, 1.5), 96 crops, flips; synth_noscale: the same "
                   "without the rescale (diagnostic); mmseg: the papers' pipeline (real presets)")
    g.add_argument("--crop", type=int, default=None,
                   help="training crop = the model's input size (real presets 512; synth 96). With --augment "
                   "synth the 96 px scenes are drawn at this scale and tested at it: --crop 192 trains and tests "
                   "the world at 2x, a 24 x 24 patch grid for the toy, as the papers' 512 crops are 2.3x CLIP's 224")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (the real presets and synth_trans 2e-4, the papers' rate; synth 1e-3, "
                   "sized for its 2000 steps)")
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default 150; real presets 1500)")
    _add_train_run_args(g)
    t.set_defaults(func=cmd_train_clip_rc)

    t = tsub.add_parser(
        "clipteacher", help="CLIPTeacher: any segmentation network learns zero-shot segmentation from seen-class "
        "labels with a frozen CLIP teacher", formatter_class=fmt,
        description="Train CLIPTeacher (Li et al., 2023; CLIP-ZSS) on the seen classes of a zero-shot split. A "
        "student network (any of `vocaseg list`'s students, or timm:NAME) emits CLIP-sized features scored "
        "against frozen text embeddings. A frozen CLIP ViT teaches it in training only: the global learning "
        "module pulls the student's CLIP-attended image vector to CLIP's own (InfoNCE against a bank of 24 "
        "steps), and the pixel learning module clusters CLIP's tokens in the unlabelled area (multi-scale "
        "k-means, fusion) into potential objects whose weights a vision-language adapter generates, so those "
        "pixels are supervised too. Unseen class names are never read in training. At test time gamma is "
        "added to the unseen classes (--calibration; `vocaseg eval --calibration G` sweeps it).",
        epilog="presets (the paper's schedules; values you pass win):\n"
        "  synth               the toy recipe (toy CLIP, fpn-toy from scratch, GLM mean pooling, split synth_zs, 1500 steps)\n"
        "  voc_zs3             VOC 15/5, ViT-B/16 teacher, Swin-B + all-MLP head, 20k at batch 16\n"
        "  context_zs3         Pascal Context 49/10 over 59 classes (split context59_zs3), 40k\n"
        "  coco_stuff_zs3      COCO-Stuff 156/15, 80k\n\n"
        "ablations (the paper's Tables 3-5): --glm none|mean|max, --no-plm, --generate-weight 0,\n"
        "  --adapter mlp|none, --ce-weight 0, --focal-weight 0 --dice-weight 0;\n"
        "  the seen-only baseline (same student, no teacher): --glm none --no-plm\n\n"
        "examples:\n"
        "  vocaseg train clipteacher --preset synth --out runs/ct                          # toy\n"
        "  vocaseg train clipteacher --preset synth --student deeplabv2-toy --out runs/ct-deeplab\n"
        "  vocaseg train clipteacher --preset synth --glm none --no-plm --out runs/seen-only\n"
        "  vocaseg train clipteacher --preset voc_zs3 --data-root data/VOCdevkit --device cuda --out runs/voc-ct\n"
        "  vocaseg train clipteacher --out runs/ct --resume                                # continue exactly\n"
        "  vocaseg eval --dataset synth --split val --split-set synth_zs --model runs/ct --calibration 0.5")
    t.add_argument("--out", required=True, help="run folder (never overwritten without --overwrite)")
    t.add_argument("--preset", default=None, help="start from a preset (see below; synth when training on synth)")
    t.add_argument("--setting", choices=["inductive", "supervised"], default=None,
                   help="inductive (default): seen labels only; supervised: every class labelled (upper bound)")
    g = t.add_argument_group("CLIP, student and data")
    g.add_argument("--model", default=None, help="the CLIP ViT teacher: toy (default), an open_clip name, a folder")
    g.add_argument("--pretrained", default=None, help="its weights: a tag, a file, 'none' (default: 'default')")
    g.add_argument("--student", default=None, help="fpn-toy (synth default), deeplabv2-toy, mlp-convnext-atto-toy, "
                   "deeplabv2-r101, mlp-swin-base, mlp-convnext-tiny, ..., or timm:NAME (any timm model with "
                   "features_only, all-MLP head)")
    g.add_argument("--student-weights", default=None, help="'default' (ImageNet for the real students), 'none', "
                   "or a local backbone file")
    g.add_argument("--dataset", default=None, help="synth (default) or any dataset of `vocaseg list`")
    g.add_argument("--data-root", default=None)
    g.add_argument("--train-split", default=None, help="split to train on (default: train)")
    g.add_argument("--split-set", default=None, help="the zero-shot split: synth_zs (default), voc_zs3, "
                   "context59_zs3, coco_stuff_zs3, or 'unseen:a,b'")
    g.add_argument("--templates", default=None, help="prompt templates of the text embeddings (default maskclip85)")
    g = t.add_argument_group("global learning module")
    g.add_argument("--glm", choices=["attention", "mean", "max", "none"], default=None,
                   help="how the student's image vector is pooled (default attention, the paper's; the synth preset: mean; none: no GLM)")
    g.add_argument("--tau", type=float, default=None, help="InfoNCE temperature (default 0.07)")
    g.add_argument("--bank-size", type=int, default=None, help="steps of CLIP class tokens kept as negatives (24)")
    g = t.add_argument_group("pixel learning module")
    g.add_argument("--no-plm", dest="plm", action="store_const", const=False, default=None,
                   help="no pixel learning module (no k-means, no adapter, no generate loss)")
    g.add_argument("--teacher-dense-rule", choices=["raw", "maskclip", "sclip", "clearclip", "naclip"], default=None,
                   help="CLIP's dense tokens clustered (default raw: the unaltered tower)")
    g.add_argument("--kmeans-windows", default=None, help="centre grids, e.g. 3,7 (default)")
    g.add_argument("--kmeans-iters", type=int, default=None, help="default 10")
    g.add_argument("--fusion-threshold", type=float, default=None, help="lambda of the mask fusion (default 0.8)")
    g.add_argument("--adapter", choices=["decoder", "mlp", "none"], default=None,
                   help="the vision-language adapter (default decoder)")
    g.add_argument("--adapter-layers", type=int, default=None, help="default 2")
    g.add_argument("--adapter-heads", type=int, default=None, help="default 8 (toy: 4)")
    g = t.add_argument_group("losses, inference and schedule")
    g.add_argument("--global-weight", type=float, default=None, help="default 1")
    g.add_argument("--generate-weight", type=float, default=None, help="default 1 (0: no L_generate)")
    g.add_argument("--ce-weight", type=float, default=None, help="default 1")
    g.add_argument("--focal-weight", type=float, default=None, help="default 1")
    g.add_argument("--dice-weight", type=float, default=None, help="default 1")
    g.add_argument("--loss-stride", type=int, default=None, help="pixel losses on every k-th label pixel "
                   "(default 1; synth 2)")
    g.add_argument("--calibration", type=float, default=None, help="gamma added to unseen classes at inference "
                   "(default 1.5)")
    g.add_argument("--augment", default=None, choices=["synth", "voc_coco", "context"])
    g.add_argument("--crop", type=int, default=None)
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (synth 2e-3; real 6e-5)")
    g.add_argument("--head-lr-mult", type=float, default=None, help="head and adapter lr multiplier (real 10)")
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (synth 100; real 1500)")
    _add_train_run_args(g)
    t.set_defaults(func=cmd_train_clipteacher)

    p = sub.add_parser("convert", help="turn a released checkpoint into a run folder")
    csub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    c = csub.add_parser("segclip", help="the official SegCLIP release (segclip.bin) as a run folder",
                        formatter_class=fmt, description="Rename the parameters of the official SegCLIP checkpoint "
                        "onto open_clip's CLIP and vocaseg's group module and write a run folder, so that "
                        "--model OUT runs the paper's model without training. Nothing is downloaded.",
                        epilog="example:\n  vocaseg convert segclip segclip.bin --out runs/segclip-paper\n"
                        "  vocaseg eval --dataset voc21 --data-root data/VOCdevkit/VOC2012 --model runs/segclip-paper\n"
                        "(segclip.bin: " + "https://github.com/ArrowLuo/SegCLIP/releases/tag/checkpoint_v0)")
    c.add_argument("checkpoint", help="the official segclip.bin")
    c.add_argument("--out", required=True, help="the run folder to write")
    c.add_argument("--model", default="ViT-B-16-quickgelu", help="its open_clip architecture (default "
                   "ViT-B-16-quickgelu: the released model is OpenAI's ViT-B/16, QuickGELU)")
    c.add_argument("--background-thresholds", choices=["code", "paper"], default="code")
    c.add_argument("--overwrite", action="store_true", help="replace a run in OUT")
    c.set_defaults(func=cmd_convert_segclip)

    p = sub.add_parser("list", help="models, methods, shipped runs, datasets, split sets, students, presets")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("demo", help="offline demo: synth scenes segmented by the shipped toy CLIP (MaskCLIP) and the shipped MaskCLIP+ run")
    p.add_argument("--out", default="vocaseg-demo")
    p.add_argument("--scenes", type=int, default=6)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "app", help="a web page: upload an image, type classes, see the segmentation (needs vocaseg[app])",
        formatter_class=fmt, description="Serve a Gradio page: upload or paste an image (or pick a bundled "
        "synthetic example), type the classes (synonyms: 'tv, television; sofa; cat'), pick the method (every "
        "training-free rule of the model, and trained runs), set window/whole, key smoothing, prompt denoising, "
        "background words and a probability threshold; see the overlay with a legend, the class shares and the "
        "time taken, and download the label PNG. Runs offline with the shipped toy CLIP. Binds to 127.0.0.1 "
        "unless --host says otherwise. Needs Gradio: pip install \"vocaseg[app]\".",
        epilog="examples:\n"
        "  vocaseg app                                           # toy CLIP + its shipped runs, http://127.0.0.1:7860\n"
        "  vocaseg app --model ViT-B-16 --pretrained /path/ViT-B-16.pt --device cuda\n"
        "  vocaseg app --model runs/mcp                          # a trained run (and its CLIP's rules)\n"
        "  vocaseg app --host 0.0.0.0 --port 8080                # reachable from other machines\n\n"
        + EPILOG_MODELS)
    p.add_argument("--model", default="toy", help="a CLIP (its training-free rules) or a run folder / shipped "
                   "run (default: toy)")
    p.add_argument("--pretrained", default="default", help="CLIP weights: 'default', an open_clip tag, a file, "
                   "or 'none'")
    p.add_argument("--run", action="append", default=None, metavar="RUN",
                   help="a trained run to offer too (repeat for more; default: the shipped runs trained on --model)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload accepted, MB (default 10)")
    p.add_argument("--max-megapixels", type=float, default=16.0, help="largest image accepted (default 16 MP)")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser(
        "gallery", help="the same synth scenes segmented by every available method, side by side, with mIoUs",
        formatter_class=fmt, description="Segment the first N scenes of a synth split with every training-free "
        "rule of the CLIP and every trained run on it, and draw one picture: a row per scene, columns image | "
        "ground truth | each method, each method's mIoU over these scenes in its header and each image's own "
        "mIoU in its corner. Writes OUT/gallery.png and OUT/gallery.json (the numbers). The mIoUs are those of "
        "`vocaseg eval --dataset synth --split SPLIT --limit N --model M --method X`.",
        epilog="examples:\n"
        "  vocaseg gallery --out docs/                        # the README's picture: toy rules + shipped runs\n"
        "  vocaseg gallery --out g/ --scenes 8 --split val\n"
        "  vocaseg gallery --out g/ --run runs/mcp --run runs/rect   # your runs instead of the shipped ones")
    p.add_argument("--out", required=True, help="folder for gallery.png and gallery.json")
    p.add_argument("--scenes", type=int, default=5, help="scenes (rows) drawn and scored (default 5)")
    p.add_argument("--split", default="test", choices=["val", "test", "train"], help="synth split (default test)")
    p.add_argument("--model", default="toy", help="the CLIP whose training-free rules are shown (default toy), or a run")
    p.add_argument("--pretrained", default="default", help="its weights (default: 'default')")
    p.add_argument("--run", action="append", default=None, metavar="RUN",
                   help="a trained run to show (repeat for more; default: the shipped runs trained on --model)")
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/gallery.png")
    p.set_defaults(func=cmd_gallery)

    p = sub.add_parser(
        "bench", help="steady-state images/s, windows/s and peak memory of inference (random weights)",
        formatter_class=fmt,
        description="Time the SCLIP protocol (short side 336, 224 windows every 112 px, 21 classes) and whole-image "
        "inference at 336 on random 500x375 images, with random weights (speed does not depend on them), handed "
        "to the segmenter --images-per-call at a time, labels at the full image size, after a warm-up call. Every "
        "--precision and --batch-size given is timed in the same run, so their ratios are one measurement. "
        "--baseline adds the official code's per-window loop; --text cold text embeddings (171 classes x 85 "
        "templates); --eval-images N `vocaseg eval` end to end on N generated JPEGs, and its data loading alone.",
        epilog="examples:\n"
        "  vocaseg bench --precision fp32 int8 bf16                # the CPU's int8 and bf16 paths against fp32\n"
        "  vocaseg bench --precision fp32 --compile                # eager against torch.compile\n"
        "  VOCASEG_INT8_ENGINE=x86 vocaseg bench --precision fp32 int8   # another int8 engine (default: onednn\n"
        "                                                          # on CPUs with AMX, torch's x86 elsewhere)\n"
        "  vocaseg bench --device cuda --baseline --json gpu.json  # + the per-window loop of the official code\n"
        "  vocaseg bench --model toy --images 32\n"
        "  vocaseg bench --device cuda --batch-size 64 128 256 --text --eval-images 2000 --workers 14")
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--device", default=None, help="default: CPU, then CUDA if present")
    p.add_argument("--images", type=int, default=None, help="images per measurement (default: 8 on a CPU, 512 on a GPU)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[None], metavar="N",
                   help="windows per forward, one or more (default: 4 on a CPU, 128 on a GPU)")
    p.add_argument("--images-per-call", type=int, default=64, metavar="N",
                   help="images handed to the segmenter at a time, as eval's --batch-images (default 64)")
    p.add_argument("--precision", nargs="+", choices=["auto", "fp32", "bf16", "fp16", "int8"], default=["auto"],
                   help="one or more; ratios are to the first (default auto: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--setting", nargs="+", choices=["sclip slide 336/224/112", "whole image 336"], default=None,
                   help="time only these settings (default: both)")
    p.add_argument("--baseline", action="store_true",
                   help="also time the official code's way: one window at a time in a Python loop (fp16 on a GPU)")
    p.add_argument("--compile", action="store_true",
                   help="time every row twice, eager and through torch.compile (compiling happens in the warm-up "
                        "call and is not timed)")
    p.add_argument("--json", default=None, metavar="FILE", help="write every number, the device and versions here")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--text", action="store_true",
                   help="also time cold text embeddings: 171 new class names x the 85 MaskCLIP templates")
    p.add_argument("--eval-images", type=int, default=0, metavar="N",
                   help="also time `vocaseg eval` end to end over a folder dataset of N generated 500x375 JPEGs, "
                   "and its data loading alone")
    p.add_argument("--eval-dir", default=None, help="where that dataset is written and kept (default: a temporary folder, removed afterwards)")
    p.add_argument("--workers", type=int, default=8, help="eval's data loading processes (default 8)")
    p.add_argument("--batch-images", type=int, default=64, help="eval's images per model call (default 64)")
    p.add_argument("--load-batch", type=int, nargs="+", default=[8], metavar="N",
                   help="eval's images per loader batch, one or more (default 8; regrouped into --batch-images calls)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data.datasets import DatasetError
    from .images import ImageReadError
    from .loading import ModelNotFoundError, WeightsUnavailableError
    from .vocabulary import VocabularyError

    from .runs import RunError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, VocabularyError, ModelNotFoundError, DatasetError, ImageReadError, WeightsUnavailableError,
            FileExistsError, FileNotFoundError, RunError) as err:
        print(f"vocaseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
