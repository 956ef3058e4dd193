"""The command line behaves like a well-kept tool: every bad input is one `error:` line with exit code 2 (no
traceback), `--version` and `python -m attnscope` work, no weight-loading progress bar, `serve` on a busy port fails
before printing a URL and stops within seconds on SIGTERM even mid-request, the report's title is cut at a word and
its provenance names its inputs, and `explain --out x.png` draws a colour bar and labels the sink boxes."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnscope import __version__
from attnscope.cli import main
from attnscope.models import zoo

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def use(monkeypatch):
    def put(name, model):
        monkeypatch.setitem(zoo.LOADERS, name, lambda: model)
    return put


@pytest.fixture
def not_an_image(tmp_path) -> Path:
    path = tmp_path / "not_an_image.jpg"
    path.write_text("this is text, not a JPEG")
    return path


def one_error_line(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, argv
    assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
    return err[0]


def test_every_command_turns_bad_input_into_one_error_line(dinov2, minilm, smollm, use, capsys, tmp_path, not_an_image):
    use("dinov2-small", dinov2)
    use("minilm", minilm)
    use("smollm2-135m", smollm)
    out = str(tmp_path / "x.safetensors")
    cases = {
        "not an image": (["capture", "--model", "dinov2-small", "--image", str(not_an_image), "--out", out],
                         "not an image file"),
        "missing image": (["capture", "--model", "dinov2-small", "--image", "nope.png", "--out", out], "no image file"),
        "unknown model": (["capture", "--model", "no-such-model", "--text", "hi", "--out", out], "zoo names"),
        "text to an image model": (["capture", "--model", "dinov2-small", "--text", "hi", "--out", out], "no tokenizer"),
        "bad layer list": (["capture", "--model", "minilm", "--text", "hi", "--layers", "a,b", "--out", out],
                           "'a' is not an integer"),
        "slice among layers": (["capture", "--model", "minilm", "--text", "hi", "--layers", "0,1:3", "--out", out],
                               "one slice"),
        "bad slice bound": (["capture", "--model", "minilm", "--text", "hi", "--heads", "0:x", "--out", out],
                            "bounds are integers"),
        "unknown query role": (["capture", "--model", "minilm", "--text", "hi", "--queries", "0,nonsense", "--out",
                                out], "nonsense"),
        "layer out of range": (["capture", "--model", "minilm", "--text", "hi", "--layers", "40", "--out", out], "40"),
        "unwritable out": (["capture", "--model", "minilm", "--text", "hi", "--out", str(tmp_path / "no" / "x.st")], ""),
        "explain bad image": (["explain", "--model", "dinov2-small", "--image", str(not_an_image), "--out",
                               str(tmp_path / "e.png")], "not an image file"),
        "explain bad param": (["explain", "--model", "minilm", "--text", "hi", "--method", "rollout", "--param",
                               "discard_over=column", "--out", str(tmp_path / "e.json")], "discard_over"),
        "explain bad suffix": (["explain", "--model", "minilm", "--text", "hi", "--out", str(tmp_path / "e.gif")], ".gif"),
        "report bad image": (["report", "--model", "dinov2-small", "--image", str(not_an_image), "--out",
                              str(tmp_path / "r.html")], "not an image file"),
        "heads bad metric": (["heads", "--model", "minilm", "--text", "hi", "--metrics", "nonsense"], "nonsense"),
        "generate bad method": (["generate", "--model", "smollm2-135m", "--text", "hi", "--steer", "nope"], "unknown method"),
        "eval bad n": (["eval", "pope", "--n", "0"], "--n"),
        "unknown option": (["capture", "--bogus"], "capture"),
        "unknown command": (["frobnicate"], "invalid choice"),
        "bad int": (["eval", "pope", "--n", "ten"], "invalid int"),
    }
    for name, (argv, needle) in cases.items():
        try:
            line = one_error_line(capsys, argv)
        except SystemExit as exit_:  # argparse exits after printing its one line
            assert exit_.code == 2, name
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error: "), (name, err)
            line = err[0]
        assert needle in line, (name, line)


def test_version_and_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "attnscope", "--version"], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0 and out.stdout.strip() == f"attnscope {__version__}"
    out = subprocess.run([sys.executable, "-m", "attnscope", "models"], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0 and "minilm" in out.stdout


def test_no_loading_progress_bar(tmp_path):
    out = subprocess.run([sys.executable, "-m", "attnscope", "capture", "--model", "minilm", "--text", "a cat",
                          "--layers", "0", "--out", str(tmp_path / "t.safetensors")], capture_output=True, text=True,
                         env=ENV)
    assert out.returncode == 0, out.stderr
    assert "Loading weights" not in out.stderr and "it/s" not in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_on_a_busy_port_fails_before_printing_a_url():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "attnscope", "serve", "--port", str(port)], capture_output=True,
                             text=True, env=ENV, timeout=60)
    assert out.returncode == 2 and "http://" not in out.stdout
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "already in use" in err[0]


def test_serve_stops_promptly_on_sigterm_during_a_request():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "attnscope", "serve", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        assert "http://127.0.0.1" in proc.stdout.readline()
        body = ("--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nsmollm2-135m\r\n"
                "--b\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nTell me a long story about a cat.\r\n"
                "--b\r\nContent-Disposition: form-data; name=\"max_new_tokens\"\r\n\r\n64\r\n--b--\r\n").encode()
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        client.sendall(b"POST /api/run HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(2.0)  # the model is loading or generating now
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert time.monotonic() - start < 8.0
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_report_title_and_provenance(dinov2, minilm, use, tmp_path, capsys):
    use("dinov2-small", dinov2)
    use("minilm", minilm)
    text = "The quick brown fox jumps over the lazy dog near the riverbank today"
    assert main(["report", "--model", "minilm", "--text", text, "--out", str(tmp_path / "t.html")]) == 0
    page = (tmp_path / "t.html").read_text()
    title = page.split("<title>")[1].split("</title>")[0]
    shown = title.split("&#x27;")[1]
    assert shown.endswith("…") and text.startswith(shown[:-1]) and text[len(shown) - 1] == " "  # cut at a word
    assert main(["report", "--model", "dinov2-small", "--image", "chelsea", "--out", str(tmp_path / "i.html")]) == 0
    page = (tmp_path / "i.html").read_text()
    assert '"inputs": []' not in page and '"inputs":[]' not in page
    assert "image: chelsea" in page and "pixel_values [1, 3, 224, 224] xxh3_128:" in page
    capsys.readouterr()


def test_explain_png_has_a_colour_bar_and_labelled_sinks(dinov2, use, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnscope.explain.explanation import Explanation

    use("dinov2-small", dinov2)
    figures = []
    original = Explanation.show

    def keep(self, ax=None):
        fig = original(self, ax)
        figures.append(fig)
        return fig

    monkeypatch.setattr(Explanation, "show", keep)
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    assert main(["explain", "--model", "dinov2-small", "--image", "chelsea", "--method", "rollout",
                 "--out", str(tmp_path / "chelsea.png")]) == 0
    (fig,) = figures
    image_ax, bar_ax = fig.axes
    assert "rollout score" in bar_ax.get_ylabel()
    boxes = [p for p in image_ax.patches if p.get_edgecolor()[:3] == matplotlib.colors.to_rgb("cyan")]
    if boxes:  # DINOv2 has sinks on chelsea: every box is explained by the legend
        legend = image_ax.get_legend()
        assert legend is not None and "attention sink" in legend.get_texts()[0].get_text()
    matplotlib.pyplot.close("all")


def test_capture_takes_slices_positions_and_roles_as_the_library_does(smollm, use, capsys, tmp_path):
    """--layers and --heads take a slice, --queries positions and roles together: the file holds what the library's
    capture gives for the same selection (the slice 0:2 was "invalid literal for int()", a position "unknown role")."""
    import torch

    import attnscope
    from attnscope.capture.trace import Trace

    use("smollm2-135m", smollm)
    out = tmp_path / "t.safetensors"
    assert main(["capture", "--model", "smollm2-135m", "--text", "The cat sat on the mat", "--layers", "0:2",
                 "--heads", "1,3", "--queries", "0,last", "--out", str(out)]) == 0
    capsys.readouterr()
    with torch.no_grad(), attnscope.capture(smollm, layers=slice(0, 2), heads=[1, 3], queries=[0, "last"]) as ref:
        smollm(**smollm.encode("The cat sat on the mat"))
    loaded = Trace.load(out)
    got, want = loaded.run().records, ref.run().records
    assert sorted(got) == sorted(want) == [("text", 0), ("text", 1)]
    for key in want:
        (a,), (b,) = got[key], want[key]
        assert a.heads == b.heads == [1, 3] and a.queries == b.queries and len(a.queries) == 2
        assert torch.equal(a.probs, b.probs)
