"""docs/api.md is the public API (issue "A new user's first hour"): every name it lists exists, the
parameters it shows are the code's, every public name of the layers it covers is listed, and its
examples run. PhaseClassifier takes NumPy arrays of any image shape and predicts without the
training set, and memorized_fraction divides by the square root of the whole example's size."""

import importlib
import inspect
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import diffmem
import diffmem.evaluate
from diffmem.evaluate.classify import PhaseClassifier, memorized_fraction, sample_distances
from diffmem.io.data import load_digits

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "api.md"

# A documented name is a backticked dotted path, `diffmem.module.Name`, optionally followed by its
# signature in short, `diffmem.module.Name(a, b=1, *, c=None, ...)`.
NAME = re.compile(r"`(diffmem(?:\.[A-Za-z_]\w*)+)")
SIGNATURE = re.compile(r"`(diffmem(?:\.[A-Za-z_]\w*)+)\((.*?)\)`")
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

# The packages whose __all__ the doc covers; bench and cli are commands (README.md, --help), not an API.
PACKAGES = (
    "diffmem",
    "diffmem.core",
    "diffmem.io",
    "diffmem.viz",
    "diffmem.models",
    "diffmem.evaluate",
    "diffmem.study",
    "diffmem.report",
    "diffmem.experiments",
)
# Names in the __all__ of a covered package or documented module that are internals, not API: the
# choice lists behind config fields (documented with the fields), input helpers, pieces of the runner
# and of the report page that run_study and write_report call.
INTERNAL = {
    "diffmem.evaluate.classify": {
        "CALIBRATIONS",
        "COPY_THRESHOLDS",
        "FRACTION_KEYS",
        "QUALITIES",
        "RULES",
        "as_images",
    },
    "diffmem.evaluate.metrics": {
        "METRICS",
        "LPIPSMetric",
        "MetricNeighbours",
        "check_images",
        "neighbours",
        "streamed_neighbours",
    },
    "diffmem.evaluate.quality": {"knn_radii", "pairwise"},
    "diffmem.evaluate.audit": {"CALIBRATIONS", "CLASSES", "ImageSet"},
    "diffmem.report.page": {
        "ANOMALY_NOTES",
        "SECTIONS",
        "STAGE_SECTIONS",
        "BuiltReport",
        "Claim",
        "Omission",
        "basin_anomalies",
        "build_sections",
        "energy_anomalies",
        "large_discrepancy",
        "resolved_transitions",
        "transition_claims",
        "with_caption_note",
    },
    "diffmem.report.audit": {"AUDIT_PREFIX", "audit_dir", "audit_html"},
}


def resolve(dotted: str):
    """The object a dotted name names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                raise AttributeError(f"{dotted}: {'.'.join(parts[:cut])} has no {attr!r}")
            obj = getattr(obj, attr)
        return obj, ".".join(parts[:cut])
    raise ModuleNotFoundError(dotted)


def split_top(text: str) -> list[str]:
    """text split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [s.strip() for s in [*items, text[start:]] if s.strip()]


def signature_problems(dotted: str, shown: str) -> list[str]:
    """The parameter names in a documented signature that the code's signature lacks."""
    obj, _ = resolve(dotted)
    params = inspect.signature(obj).parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    problems = []
    for item in split_top(shown):
        if item in ("*", "/", "..."):
            continue
        name = re.match(r"\**([A-Za-z_]\w*)", item)
        if name is None:
            problems.append(f"{dotted}: cannot read the parameter {item!r}")
        elif item.startswith("**"):
            if not var_kw:
                problems.append(f"{dotted}: shows {item} but takes no keyword arguments")
        elif name.group(1) not in params:
            problems.append(f"{dotted}: no parameter {name.group(1)!r} (it has {list(params)})")
    return problems


def names_in(text: str) -> list[str]:
    return sorted(set(NAME.findall(text)))


DOC_TEXT = DOC.read_text()


def test_every_documented_name_exists():
    names = names_in(DOC_TEXT)
    assert len(names) > 120
    missing = []
    for name in names:
        try:
            resolve(name)
        except (AttributeError, ModuleNotFoundError) as e:
            missing.append(str(e))
    assert not missing, "docs/api.md lists names that do not exist:\n" + "\n".join(missing)


def test_documented_signatures_use_the_real_parameter_names():
    shown = SIGNATURE.findall(DOC_TEXT)
    assert len(shown) > 80
    problems = [p for dotted, args in shown for p in signature_problems(dotted, args)]
    assert not problems, "\n".join(problems)


def test_every_public_name_of_the_covered_layers_is_documented():
    documented = [resolve(n) for n in names_in(DOC_TEXT)]
    objects = {id(obj) for obj, _ in documented}
    modules = set(PACKAGES) | {module for _, module in documented}
    undocumented = []
    for module in sorted(modules):
        mod = importlib.import_module(module)
        for name in getattr(mod, "__all__", ()):
            if id(getattr(mod, name)) not in objects and name not in INTERNAL.get(module, set()):
                undocumented.append(f"{module}.{name}")
    assert not undocumented, "list these in docs/api.md (or in INTERNAL, saying why):\n" + "\n".join(undocumented)
    # the classifier is exported where a user looks for it
    assert "PhaseClassifier" in diffmem.evaluate.__all__
    assert diffmem.evaluate.PhaseClassifier is PhaseClassifier


def test_the_checks_catch_a_stale_doc():
    assert names_in("`diffmem.evaluate.classify.NoSuchThing(x)` and `diffmem.VPSchedule`") == [
        "diffmem.VPSchedule",
        "diffmem.evaluate.classify.NoSuchThing",
    ]
    with pytest.raises(AttributeError, match="no 'NoSuchThing'"):
        resolve("diffmem.evaluate.classify.NoSuchThing")
    assert signature_problems("diffmem.DenseAM", "patterns, *, chunk_size=4096") == []
    assert signature_problems("diffmem.DenseAM", "xi, *, chunk=4096, ...") == [
        "diffmem.DenseAM: no parameter 'xi' (it has ['patterns', 'chunk_size'])",
        "diffmem.DenseAM: no parameter 'chunk' (it has ['patterns', 'chunk_size'])",
    ]
    assert signature_problems("diffmem.critical_time", "denoiser, x, *, generator, **params") == []
    assert signature_problems("diffmem.DenseAM", "patterns, **kw") == [
        "diffmem.DenseAM: shows **kw but takes no keyword arguments"
    ]
    assert split_top("a, b=(0, 1), c={'x': 1, 'y': 2}, *, d=None") == [
        "a",
        "b=(0, 1)",
        "c={'x': 1, 'y': 2}",
        "*",
        "d=None",
    ]


def test_the_examples_run_in_order(tmp_path, monkeypatch):
    """Every python block of docs/api.md, in one session; `tmp` is made under tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    blocks = [(DOC_TEXT[: m.start(1)].count("\n"), m.group(1)) for m in BLOCK.finditer(DOC_TEXT)]
    assert len(blocks) >= 9
    ns: dict = {"__name__": "docs_api"}
    for line, code in blocks:
        # padded so that a traceback names the line of docs/api.md
        exec(compile("\n" * line + code, str(DOC), "exec"), ns)
    tmp = ns["tmp"]
    assert tmp.parent == tmp_path
    # the exact denoiser: retrieval returns each digit, every sample is a training digit
    assert ns["index"].tolist() == [0, 1, 2, 3]
    assert float(ns["distance"].max()) < 1e-6
    assert ns["ten"].x.shape == (10, 1, 8, 8)
    # a trained run loaded with its held-out split, sampled
    assert ns["run"].train_x.shape == (16, 64) and ns["held_out"].shape == (40, 64)
    assert ns["samples"].shape == (16, 64) and len(ns["seeds"]) == 16
    # exported and loaded back in one call
    assert ns["counts"] == {"train": 16, "heldout": 40}
    assert ns["model"].event_shape == (1, 8, 8) and ns["x0"].shape == (2, 1, 8, 8)
    assert ns["drawn"].shape == (4, 64)
    # NumPy arrays classified: the 30 near-copies are memorized, the unseen digits mostly generalized
    result = ns["result"]
    assert result.labels[:30] == ["memorized"] * 30
    assert result.labels[30:].count("generalized") >= 27  # each test errs on ~2% of real images
    n_memorized = result.counts()["memorized"]
    assert ns["memorized_fraction"](ns["generated"], ns["train"], ns["clf"].delta_m_).value == n_memorized / 60
    assert float(ns["d"].m[:30].max()) < 0.02
    assert ns["pooled"]["memorized"].n == 90
    assert 0 <= ns["quality"]["precision"].value <= 1
    # the analysis, the audit, the study and the reports wrote their files under tmp
    assert (tmp / "run" / "analysis" / "analysis.json").is_file()
    assert ns["audited"].n_samples == 32
    assert (ns["audit_dir"] / "summary.json").is_file() and ns["audit_dir"].parent == tmp
    assert [row["K"] for row in ns["phase"].rows] == [4, 8]
    assert ns["page"] == tmp / "study" / "report" / "report.html" and ns["page"].is_file()


# --- PhaseClassifier in scikit-learn fashion ------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    """Digits as float32 NumPy images (N, 8, 8): 100 training images, 197 held-out ones, and 20
    generated images whose first 10 are near-copies of training images (float64, as NumPy makes them)."""
    images = load_digits().x.numpy().reshape(-1, 8, 8)
    rng = np.random.default_rng(1)
    train, held = images[:100], images[1600:]
    generated = np.concatenate([train[:10] + 0.01 * rng.standard_normal((10, 8, 8)), images[1000:1010]])
    return train, held, generated


@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8), (64,)], ids=["N,H,W", "N,C,H,W", "N,D"])
def test_classifier_takes_numpy_arrays_of_any_image_shape(digits, shape):
    train, held, generated = (a.reshape(len(a), *shape) for a in digits)
    assert generated.dtype == np.float64 and train.dtype == np.float32  # once refused as float32 vs float64
    clf = PhaseClassifier().fit(train, held, n_generated=len(generated))
    result = clf.predict(generated)
    # the same labels and thresholds as tensors in float64, flat
    flat = [torch.from_numpy(a.reshape(len(a), -1)).double() for a in digits]
    ref = PhaseClassifier().fit(flat[0], flat[1], n_generated=20)
    assert result.labels == ref.predict(flat[2], flat[0]).labels
    assert result.labels[:10] == ["memorized"] * 10 and "memorized" not in result.labels[10:]
    assert clf.delta_m_ == pytest.approx(ref.delta_m_, rel=1e-6)
    assert clf.delta_s_ == pytest.approx(ref.delta_s_, rel=1e-6)


def test_predict_without_the_training_set_uses_fits(digits):
    train, held, generated = digits
    clf = PhaseClassifier(quality="none").fit(train, held)
    assert clf.train_ is not None and clf.train_.shape == (100, 8, 8)
    alone, given = clf.predict(generated), clf.predict(generated, train)
    assert alone.labels == given.labels
    torch.testing.assert_close(alone.distances.m, given.distances.m)
    other = clf.predict(generated, train[10:])  # another training set still wins when given
    assert other.labels[:10] != ["memorized"] * 10
    emb = torch.from_numpy(held.reshape(len(held), -1)).double()
    fitted = PhaseClassifier(delta_m=0.1, quality="none").fit_embedded(emb, n_generated=20)
    with pytest.raises(ValueError, match=r"holds no training images: pass them, predict\(samples, train\)"):
        fitted.predict(generated)
    assert fitted.predict(generated, train).counts()["memorized"] == 10


@pytest.mark.parametrize(
    ("where", "bad", "message"),
    [
        ("samples", np.zeros(64), r"generated samples must be a batch of examples .* got shape \(64,\); .*x\[None\]"),
        ("samples", np.zeros((8, 8)), r"differ in shape: examples of \(8,\) .* look like one example"),
        (
            "samples",
            np.zeros((5, 4, 4)),
            r"generated samples and training data differ in shape: .*\(4, 4\) \(16 values\)",
        ),
        ("held_out", np.zeros((20, 4, 4)), r"held-out images and training data differ in shape"),
        ("pool", np.zeros((20, 4, 4)), r"training pool and training data differ in shape"),
        ("train", np.zeros((5, 8, 8), dtype=np.uint8), r"floating-point images, got a NumPy array of uint8"),
        ("train", torch.zeros(5, 8, 8, dtype=torch.int64), r"floating-point images, got a tensor of torch.int64"),
        ("train", [[0.0] * 64] * 5, r"must be a torch tensor or a NumPy array of shape \(N, D\)"),
    ],
)
def test_wrong_inputs_get_a_message_that_says_what_to_do(digits, where, bad, message):
    train, held, generated = digits
    inputs = {"train": train, "held_out": held, "pool": None, "samples": generated, where: bad}
    with pytest.raises(ValueError, match=message):
        clf = PhaseClassifier(quality="none").fit(inputs["train"], inputs["held_out"], pool=inputs["pool"])
        clf.predict(inputs["samples"])


# --- memorized_fraction divides by sqrt(C * H * W) -----------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 16), (1, 16, 16), (256,), (4, 8, 8)])
def test_memorized_fraction_divides_by_the_root_of_the_whole_example_size(shape):
    # sample i is the constant image c_i against one all-zero training image: ||x|| / sqrt(D) = c_i
    # exactly when D is the whole example's size (256), and 4 c_i had it divided by sqrt(16)
    c = np.array([0.3, 0.45, 0.6, 1.0])
    samples = c.reshape(4, *[1] * len(shape)) * np.ones((4, *shape))
    train = np.zeros((1, *shape), dtype=np.float32)
    f = memorized_fraction(samples, train, 0.5)
    assert (f.value, f.n) == (0.5, 4)
    assert f.low < 0.5 < f.high
    assert memorized_fraction(samples, train, 0.29).value == 0.0
    assert memorized_fraction(samples, train, 1.0).value == 1.0
    d = sample_distances(samples, np.zeros((2, *shape)))  # the classifier's m agrees
    torch.testing.assert_close(d.m, torch.from_numpy(c), rtol=1e-12, atol=0)
    assert math.prod(shape) == 256


def test_memorized_fraction_bad_input():
    x = np.zeros((3, 16, 16))
    with pytest.raises(ValueError, match="threshold must be a positive number"):
        memorized_fraction(x, x, 0.0)
    with pytest.raises(ValueError, match="level must lie in"):
        memorized_fraction(x, x, 0.1, level=1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        memorized_fraction(x, np.zeros((3, 8, 8)), 0.1)
