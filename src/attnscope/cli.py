"""Command line: thin wrappers over the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one `error: ...` line (exit code 2), like every other bad input."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


PROMPT_HELP = ("a vision-language model given --text and --image builds its chat prompt with the image placeholder; "
               "--raw-prompt uses --text exactly as typed (write the placeholder yourself, e.g. '<image>\\n...')")


def add_prompt_options(parser, chat: bool = True) -> None:
    """--chat / --raw-prompt, shared by every command that encodes a prompt (see `Model.encode(chat=...)`)."""
    group = parser.add_mutually_exclusive_group()
    if chat:
        group.add_argument("--chat", action="store_true", help="wrap --text in the model's chat template (text models too)")
    group.add_argument("--raw-prompt", action="store_true", help=PROMPT_HELP)


def image_input(name: str):
    """A scene of the scene world ("scene:test-000003") or anything `load_image` reads."""
    if name.startswith("scene:"):
        from .scenes import Scene, SceneWorld

        return SceneWorld(seed=0).scene(*Scene.parse_id(name.split(":", 1)[1])).image
    from .models.images import load_image

    return load_image(name)


def prompt_chat(args) -> bool | None:
    """`chat=` for `Model.encode` from the prompt options: True, False (raw) or None (the model's default)."""
    if getattr(args, "raw_prompt", False):
        return False
    return True if getattr(args, "chat", False) else None


def add_placement_options(parser) -> None:
    """--device-map / --max-memory / --offload-folder: split the model across devices, the CPU and disk
    (`attnscope.load(..., device_map=, max_memory=, offload_folder=)`)."""
    parser.add_argument("--device-map", metavar="MAP", help="auto, balanced, sequential, one device (cpu, cuda:0), or a "
                        "JSON {module: device} object or @file.json")
    parser.add_argument("--max-memory", metavar="DEV=SIZE,...", help="memory per device for --device-map auto: "
                        "0=20GiB,1=20GiB,cpu=60GiB (what does not fit goes to disk)")
    parser.add_argument("--offload-folder", metavar="DIR", help="where modules placed on disk keep their weights")


def placement_options(args) -> dict:
    """`load` keywords from the placement options (only those given)."""
    out: dict = {}
    spec = getattr(args, "device_map", None)
    if spec is not None:
        if spec.startswith("@"):
            with open(spec[1:]) as fh:
                spec = fh.read()
        if spec.lstrip().startswith("{"):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as err:
                raise ValueError(f"--device-map is not a JSON object ({err}); e.g. '{{\"model.layers.0\": \"disk\"}}'") from err
        out["device_map"] = spec
    if getattr(args, "max_memory", None):
        memory = {}
        for item in args.max_memory.split(","):
            device, sep, size = item.partition("=")
            if not sep or not device.strip() or not size.strip():
                raise ValueError(f"--max-memory takes DEVICE=SIZE pairs (0=20GiB,cpu=60GiB); got {item!r}")
            device = device.strip()
            memory[int(device) if device.isdigit() else device] = size.strip()
        out["max_memory"] = memory
    if getattr(args, "offload_folder", None):
        out["offload_folder"] = args.offload_folder
    return out


def _spec(text: str | None, option: str, roles: bool = False):
    """A selection from the command line: comma-separated integers (negative allowed), or one slice start:stop[:step];
    with `roles`, role names too (one name alone stays a name)."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    takes = "comma-separated integers (negative allowed)" + (" and role names" if roles else "") + \
        ", or one slice start:stop[:step]"
    if any(":" in t for t in items):
        bounds = items[0].split(":")
        if len(items) > 1 or len(bounds) > 3:
            raise ValueError(f"{option} {text!r}: {option} takes {takes}")
        try:
            return slice(*(int(b) if b.strip() else None for b in bounds))
        except ValueError:
            raise ValueError(f"{option} {text!r}: a slice's bounds are integers") from None
    out = []
    for t in items:
        try:
            out.append(int(t))
        except ValueError:
            if not roles:
                raise ValueError(f"{option} {text!r}: {option} takes {takes}; {t!r} is not an integer") from None
            out.append(t)
    return out[0] if roles and len(out) == 1 and isinstance(out[0], str) else out


def cmd_models(args) -> int:
    from .models.zoo import zoo_state

    for row in zoo_state():
        state = ("cached" if row["cached"] else "installed, converts on first load") if row["installed"] else f"missing: {row['install']}"
        print(f"{row['name']:14} {state:34} {row['about']}")
    return 0


def cmd_capture(args) -> int:
    import torch

    from . import capture, load

    if args.text is None and args.image is None:
        print("error: pass --text and/or --image", file=sys.stderr)
        return 2
    reduced = {}
    if args.summaries is not None:  # per-row reductions in place of rows, to one file
        if args.to_dir or args.fp16:
            print(f"error: --summaries writes one float32 file; drop {'--to-dir' if args.to_dir else '--fp16'}",
                  file=sys.stderr)
            return 2
        from .capture.summaries import parse_summaries

        names = "all" if args.summaries == "all" else [n.strip() for n in args.summaries.split(",") if n.strip()]
        reduced = {"summaries": parse_summaries(names), "topk": args.topk}  # checked early
        if args.topk is not None and args.topk < 1:
            raise ValueError(f"--topk must be a positive number of keys; got {args.topk}")
        if args.topk is not None and "topk" not in reduced["summaries"]:  # it would be ignored without a word
            print(f"error: --topk is the number of keys of the topk summary, which --summaries {args.summaries} leaves "
                  "out; add topk to --summaries or drop --topk", file=sys.stderr)
            return 2
    elif args.topk is not None:
        print("error: --topk is the number of keys of the topk summary; add --summaries", file=sys.stderr)
        return 2
    if not args.to_dir and (why := _not_a_trace_file(Path(args.out))) and not args.overwrite:
        print(f"error: --out {args.out} {why}", file=sys.stderr)
        return 2
    model = load(args.model, **placement_options(args))
    inputs = model.encode(text=args.text, image=args.image, chat=prompt_chat(args))
    streamed = {"out": args.out, "overwrite": args.overwrite} if args.to_dir else {}
    streamed["dtype"] = torch.float16 if args.fp16 else torch.float32  # a single file stores float16 too
    with torch.no_grad(), capture(model, streams=args.stream, layers=_spec(args.layers, "--layers"),
                                  heads=_spec(args.heads, "--heads"), queries=_spec(args.queries, "--queries", roles=True),
                                  **streamed, **reduced) as trace:
        model(**inputs)
    path = args.out if args.to_dir else trace.save(args.out)
    print(f"wrote {path}: {trace}")
    return 0


def _not_a_trace_file(path: Path) -> str | None:
    """Why a single-file capture must not replace `path` unasked (None: nothing there, or an attnscope trace or
    summaries file, which a capture replaces as before)."""
    if path.is_dir():
        return "is a directory: give a file path, or stream the trace into the directory with --to-dir"
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if "attnscope" in (f.metadata() or {}):
                return None
    except Exception:  # not a safetensors file at all
        pass
    return "exists and is not an attnscope trace; pass --overwrite to replace it, or give another path"


def cmd_demo(args) -> int:
    from .demo import run

    run(args.out)
    return 0


def cmd_serve(args) -> int:
    from .viz.server import Limits, serve

    serve(host=args.host, port=args.port, model_dirs=args.models_dir or (),
          limits=Limits(max_upload=args.max_upload_mb * 1024 * 1024), traces=args.trace or ())
    return 0


def cmd_report(args) -> int:
    from .viz.report import report

    if args.text is None and args.image is None:
        print("error: pass --text and/or --image", file=sys.stderr)
        return 2
    methods = [m.strip() for m in (args.methods or "").split(",") if m.strip()]
    path = report(args.model, text=args.text, image=args.image, out=args.out, max_new_tokens=args.new_tokens,
                  methods=methods, chat=prompt_chat(args))
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB, one self-contained file)")
    return 0


def cmd_view(args) -> int:
    from pathlib import Path

    from .capture.trace import Trace
    from .viz.html import write_html

    out = Path(args.out or Path(args.file).with_suffix(".html").name)
    if out.resolve() == Path(args.file).resolve():
        raise ValueError(f"--out {out} is the trace itself; pick another file name")
    trace = Trace.load(args.file)
    path = write_html(trace, out, run=args.run, row=args.row)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB, one self-contained file): {trace!r}")
    return 0


def _quiet_loading() -> None:
    """No "Loading weights" progress bar from transformers on every command (it reads this before import)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    _quiet_loading()
    parser = _Parser(prog="attnscope", description="See and change what attention does.")
    parser.add_argument("--version", action="version", version=f"attnscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="zoo models and their cache state").set_defaults(fn=cmd_models)
    cap = sub.add_parser("capture", help="capture attention of one input to a .safetensors trace")
    cap.add_argument("--model", required=True, help="zoo name or local model directory")
    cap.add_argument("--text")
    cap.add_argument("--image", help="photo name (chelsea, astronaut, ...) or image path")
    cap.add_argument("--stream")
    cap.add_argument("--layers", help="comma-separated, negative allowed (0,-1), or a slice (0:3); default all")
    cap.add_argument("--heads", help="comma-separated or a slice, as --layers; default all")
    cap.add_argument("--queries", help="positions and roles (last, cls, image, text, ...), comma-separated (0,last), "
                                       "or a slice of positions (2:5); default all")
    cap.add_argument("--out", required=True)
    cap.add_argument("--to-dir", action="store_true",
                     help="stream the trace to the directory --out while the model runs (for long inputs)")
    cap.add_argument("--fp16", action="store_true", help="store float16 (half the disk), in a file or with --to-dir")
    cap.add_argument("--overwrite", action="store_true", help="with --to-dir: replace a trace already in --out; "
                     "without: replace an --out file that is not an attnscope trace")
    cap.add_argument("--summaries", nargs="?", const="all", metavar="NAMES",
                     help="keep per-row reductions instead of rows: all (the default with no value) or comma-separated "
                          "names from role_mass, lookback, entropy, topk; read back with Trace.load")
    cap.add_argument("--topk", type=int, help="keys kept by the topk summary (default 5)")
    add_prompt_options(cap)
    add_placement_options(cap)
    cap.set_defaults(fn=cmd_capture)
    demo = sub.add_parser("demo", help="the main job end to end on the built-in models")
    demo.add_argument("--out", default="demo-out")
    demo.set_defaults(fn=cmd_demo)
    from .check import command as check_command
    from .evaluate import command as eval_command
    from .explain import command as explain_command
    from .flow import command as flow_command
    from .ground import command as ground_command
    from .heads import command as heads_command
    from .steer import command as steer_command

    for command in (explain_command, steer_command, heads_command, eval_command, check_command, flow_command,
                    ground_command):
        command.add_parser(sub).set_defaults(fn=command.run)
    srv = sub.add_parser("serve", help="the interactive viewer: a local web app in the browser")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default loopback); any other address exposes the app to the network")
    srv.add_argument("--port", type=int, default=8765)
    srv.add_argument("--models-dir", action="append", metavar="DIR",
                     help="a folder whose model directories the app offers besides the zoo (repeatable)")
    srv.add_argument("--max-upload-mb", type=int, default=8)
    srv.add_argument("--trace", action="append", metavar="PATH",
                     help="a trace to open: a directory streamed by capture(out=DIR), read from disk as needed, or a "
                          "trace or summaries file (repeatable)")
    srv.set_defaults(fn=cmd_serve)
    view = sub.add_parser("view", help="a trace or summaries file as a self-contained HTML viewer page (no model needed)")
    view.add_argument("file", help="a .safetensors trace or summaries file (capture --out / --summaries), or a trace "
                                   "directory (capture --to-dir)")
    view.add_argument("--out", help="the page to write (default: the file's name with .html, in this folder)")
    view.add_argument("--run", type=int, default=-1, help="which run of the file (default: the last)")
    view.add_argument("--row", type=int, default=0, help="which batch row (default 0)")
    view.set_defaults(fn=cmd_view)
    rep = sub.add_parser("report", help="one input as a self-contained HTML viewer file (no network needed)")
    rep.add_argument("--model", required=True, help="zoo name or local model directory")
    rep.add_argument("--text")
    rep.add_argument("--image", help="photo name (chelsea, astronaut, ...) or image path")
    rep.add_argument("--new-tokens", type=int, default=0, help="tokens to generate greedily (language models)")
    rep.add_argument("--methods", help="attnscope.explain methods to add beside raw attention: rollout,gradattn")
    rep.add_argument("--out", default="attnscope-report.html")
    add_prompt_options(rep)
    rep.set_defaults(fn=cmd_report)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the error's text holds
        if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
            message = " ".join(err.args[0].split())  # KeyError's str() adds quotes
        print(f"error: {message}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the input's fault, printed as one `error: ...` line (exit code 2) instead of a traceback: bad
    values, missing or unreadable files (OSError: not found, permission, a busy port), models that cannot do what
    was asked."""
    from .evaluate.pope import NotAVisionLanguageModel
    from .steer import SteerError

    return (ValueError, IndexError, KeyError, OSError, RuntimeError, SteerError, NotAVisionLanguageModel)


if __name__ == "__main__":
    sys.exit(main())
