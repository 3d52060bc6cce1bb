"""What `anexa plot -o` and `anexa bench --json/--plot` write: a file of the kind its suffix names, in that
format, never over a run's checkpoints or metrics nor over a user's file of another kind; refused in one
line (exit 2) before any work. And metrics files with damaged bytes are read like torn lines."""

import shutil

import pytest
from helpers import train_tiny_through_cli, user_error
from typer.testing import CliRunner

from anexa_cli.main import app
from anexa_core.io.metrics import read_metrics
from anexa_core.measure import bench

PNG = b"\x89PNG\r\n\x1a\n"
BENCH = ["bench", "--seq", "16", "--head-dim", "16", "--batch", "1", "--heads", "1", "--repeats", "1", "-a", "math"]
"""The quickest `anexa bench`: one row, measured in well under a second on a CPU."""


@pytest.fixture(scope="module")
def trained(sherlock_path, tmp_path_factory):
    return train_tiny_through_cli(sherlock_path, tmp_path_factory.mktemp("trained") / "run")


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run, with a plot of the user's own (``extra.png``) beside its files."""
    copy = shutil.copytree(trained, tmp_path / "run")
    (copy / "extra.png").write_bytes(PNG + b"a plot drawn earlier")
    return copy


def contents(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.fixture
def no_measuring(monkeypatch):
    """Every check must come before measuring: a bench that starts measuring fails the test."""

    def measured(*args, **kwargs):
        raise AssertionError("measured before checking where the results go")

    for name in ("bench_attention", "bench_train", "bench_generate"):
        monkeypatch.setattr(bench, name, measured)


@pytest.mark.parametrize(
    "args, match",
    [
        (
            ["plot", "{run}", "-o", "{run}/model.safetensors"],
            "choose one of .png, .pdf, .svg (e.g. --out {run}/model.png)",
        ),
        (["plot", "{run}", "-o", "{run}/metrics.jsonl"], "--out {run}/metrics.jsonl: the suffix names the format"),
        (
            ["plot", "{run}", "-o", "{run}/extra.png"],
            "--out {run}/extra.png is inside the run in {run}: write it outside the run (only `anexa plot` of that run "
            "alone redraws its loss.png)",
        ),
        ([*BENCH, "--json", "{run}/model.safetensors"], "--json {run}/model.safetensors: the suffix names the format"),
        ([*BENCH, "--json", "{run}/steps.jsonl"], "end it in .json (e.g. --json {run}/steps.json)"),
        ([*BENCH, "--plot", "{run}/best.safetensors"], "--plot {run}/best.safetensors: the suffix names the format"),
        ([*BENCH, "--plot", "{run}/loss.png"], "--plot {run}/loss.png is inside the run in {run}"),
        ([*BENCH, "--plot", "{run}/extra.png"], "--plot {run}/extra.png is inside the run"),
        # Found by a second QA session: new files were written into a run folder (then refused as the run's),
        # and a plot of other runs replaced a run's own loss.png.
        ([*BENCH, "--json", "{run}/rows.json"], "--json {run}/rows.json is inside the run in {run}"),
        (["plot", "{run}", "-o", "{run}/other.png"], "--out {run}/other.png is inside the run in {run}"),
        (["plot", "{run}", "-o", "{run}/sub/x.png"], "--out {run}/sub/x.png is inside the run in {run}:"),
        (["plot", "{other}", "-o", "{run}/loss.png"], "--out {run}/loss.png is inside the run in {run}"),
        (["plot", "{run}", "{other}", "-o", "{run}/loss.png"], "--out {run}/loss.png is inside the run in {run}"),
        (["bench", "train", "--json", "{run}/train_state.safetensors"], "--json {run}/train_state.safetensors: the"),
        (["bench", "generate", "--json", "{run}/model.safetensors"], "--json {run}/model.safetensors: the suffix"),
    ],
)
def test_plot_and_bench_never_write_over_a_file_of_a_run(run, no_measuring, args, match):
    """A checkpoint, the metrics, the run's loss.png (for bench) or any other file of a run folder is refused
    in one line before any work, and every file of the run is left as it was, byte for byte."""
    before = contents(run)
    other = run.parent / "other"
    if not other.exists():
        shutil.copytree(run, other)
    user_error([arg.format(run=run, other=other) for arg in args], match.format(run=run))
    assert contents(run) == before


@pytest.mark.parametrize(
    "args, match",
    [
        (
            ["plot", "{run}", "-o", "{tmp}/notes.png"],
            "--out {tmp}/notes.png exists and is not a PNG Anexa wrote: pass a",
        ),
        # Found by a QA session: a user's own picture or rows of the same kind were replaced.
        (["plot", "{run}", "-o", "{tmp}/photo.png"], "--out {tmp}/photo.png exists and is not a PNG Anexa wrote"),
        (["plot", "{run}", "-o", "{tmp}/photo.pdf"], "--out {tmp}/photo.pdf exists and is not a PDF Anexa wrote"),
        ([*BENCH, "--json", "{tmp}/list.json"], "--json {tmp}/list.json exists and is not a JSON list of bench rows"),
        (["plot", "{run}", "-o", "{tmp}/notes.svg"], "--out {tmp}/notes.svg exists and is not an SVG"),
        ([*BENCH, "--json", "{tmp}/config.json"], "--json {tmp}/config.json exists and is not a JSON list"),
        ([*BENCH, "--plot", "{tmp}/notes.pdf"], "--plot {tmp}/notes.pdf exists and is not a PDF"),
        ([*BENCH, "--plot", "{tmp}/out.foo"], "choose one of .png, .pdf, .svg (e.g. --plot {tmp}/out.png)"),
        ([*BENCH, "--plot", "{tmp}/out.pgn"], "did you mean '.png'? choose one of .png, .pdf, .svg"),
        (["plot", "{run}", "-o", "{tmp}/loss"], "--out {tmp}/loss: the suffix names the format"),
    ],
)
def test_an_output_replaces_only_a_file_of_its_own_kind_and_needs_a_suffix_it_writes(
    run, tmp_path, no_measuring, args, match
):
    """A user's file whose first bytes are not of the kind the suffix names is refused, as is a suffix that
    is not a format written (matplotlib's ``Format 'foo' is not supported`` traceback, before)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("notes.png", "notes.svg", "notes.pdf"):
        (mine / name).write_text("my notes")
    (mine / "config.json").write_text('{"lr": 0.001}\n')
    (mine / "list.json").write_text('[{"my": "data", "device": "cpu", "status": "ok"}]\n')  # no attention key
    pyplot = pytest.importorskip("matplotlib.pyplot")
    figure = pyplot.figure()
    for suffix in ("png", "pdf"):  # matplotlib's own files: a picture, not one of Anexa's plots
        figure.savefig(mine / f"photo.{suffix}", format=suffix)
    pyplot.close(figure)
    before = contents(mine)
    user_error([arg.format(run=run, tmp=mine) for arg in args], match.format(tmp=mine))
    assert contents(mine) == before


def test_an_output_that_is_not_a_regular_file_is_never_opened(run, tmp_path):
    """A named pipe (or a device) at the path is refused without being read: reading a pipe would wait."""
    import os

    os.mkfifo(tmp_path / "pipe.png")
    user_error(
        ["plot", str(run), "-o", str(tmp_path / "pipe.png")], f"--out {tmp_path / 'pipe.png'} is not a regular file"
    )


def test_plot_writes_the_format_its_suffix_names_and_redraws_a_runs_own_plot(run, tmp_path, monkeypatch):
    """.pdf is a PDF and .svg an SVG (not PNG bytes under another name); the run's loss.png, the default
    --out inside the run folder, and an earlier plot of ours are replaced."""
    for suffix, start in ((".pdf", b"%PDF-"), (".svg", b"<?xml"), (".PNG", PNG)):
        out = tmp_path / f"loss{suffix}"
        result = CliRunner().invoke(app, ["plot", str(run), "-o", str(out)])
        assert result.exit_code == 0 and result.stderr == f"wrote {out}\n", result.output
        assert out.read_bytes().startswith(start)
    assert b"<svg" in (tmp_path / "loss.svg").read_bytes()
    for suffix in (".pdf", ".svg", ".PNG"):  # our own plots are redrawn (their metadata says whose they are)
        again = CliRunner().invoke(app, ["plot", str(run), "-o", str(tmp_path / f"loss{suffix}")])
        assert again.exit_code == 0, again.output
    (run / "loss.png").write_bytes(b"")  # an empty file holds nothing to lose
    assert CliRunner().invoke(app, ["plot", str(run), "-o", str(run / "loss.png")]).exit_code == 0
    assert (run / "loss.png").read_bytes().startswith(PNG)
    monkeypatch.chdir(run)
    assert CliRunner().invoke(app, ["plot", "."]).exit_code == 0


def test_bench_writes_the_plot_format_its_suffix_names_and_replaces_its_own_json(tmp_path):
    rows, plot = tmp_path / "rows.json", tmp_path / "attention.pdf"
    for _ in range(2):
        result = CliRunner().invoke(app, [*BENCH, "--device", "cpu", "--json", str(rows), "--plot", str(plot)])
        assert result.exit_code == 0, result.output
    assert rows.read_text().startswith("[") and plot.read_bytes().startswith(b"%PDF-")
    rows.write_text('[{"attention": "math", "device": "cpu", "status": "ok"}]\n')  # the keys every row has
    result = CliRunner().invoke(app, [*BENCH, "--device", "cpu", "--json", str(rows)])
    assert result.exit_code == 0 and "fwd_ms" in rows.read_text(), result.output
    rows.write_text(rows.read_text()[:-3])  # not JSON any more: not rows Anexa wrote
    user_error([*BENCH, "--json", str(rows)], f"--json {rows} exists and is not a JSON list of bench rows")


def test_metrics_with_bytes_that_are_not_utf8_read_like_torn_lines(run):
    """A metrics file overwritten with binary data (a plot, once) or with a damaged line: those lines are
    skipped, as a torn one is, so `--resume` goes on and `plot` says what is missing — no traceback."""
    with (run / "steps.jsonl").open("ab") as steps:
        steps.write(b'\xff\xfe{"step": 99}\n')
    assert [record["step"] for record in read_metrics(run / "steps.jsonl")] == [10, 20, 30]
    (run / "metrics.jsonl").write_bytes(PNG + b"\x00\xff\n\x80")
    assert read_metrics(run / "metrics.jsonl") == []
    user_error(["plot", str(run), "-o", str(run.parent / "x.png")], f"{run} has no evaluation yet")
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--steps", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert [record["step"] for record in read_metrics(run / "metrics.jsonl")] == [32]


def test_the_files_that_mark_a_run_are_the_checkpoints_names():
    """``files.RUN_FILES`` (looked for without loading torch) names the files ``checkpoint`` writes."""
    from anexa_core.io import checkpoint, files

    assert files.RUN_FILES == (checkpoint.MODEL_FILE, checkpoint.BEST_FILE, checkpoint.STATE_FILE)
