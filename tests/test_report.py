"""The study report: a self-contained HTML page and its tables, built from a fake study directory."""

import base64
import csv
import io
import json
import re
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmem.evaluate.classify import transition_points
from diffmem.evaluate.stages import STAGES
from diffmem.io.results import Notes, find_jobs
from diffmem.report.page import (
    STAGE_SECTIONS,
    _gallery_ks,
    build_sections,
    large_discrepancy,
    load_phase,
    resolved_transitions,
    transition_claims,
    transitions_text,
    write_report,
)
from diffmem.viz.html import Section
from report_fixture import INJECTION, POINT_CLASSES, TRANSITIONS, make_study, phase_rows, write_csv

# every section of a full study in page order, with its heading
TITLES = {
    "phase": "Phase diagram",
    "galleries": "Galleries",
    "basins": "Critical times",
    "energy": "Energy",
    "curvature": "Curvature",
    "census": "Fixed-point census",
    "collapse": "Collapse levels",
    "two_model": "Two-model test",
    "landscape": "2D landscape",
}

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="headless Chromium not installed (/usr/bin/chromium; apt-get install -y chromium)"
)


class Page(HTMLParser):
    """Tags, attributes, headings and text of an HTML page."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []  # (tag, name, value)
        self.h2: list[str] = []
        self.text: list[str] = []
        self._in_h2 = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, name, value or "") for name, value in attrs]
        self._in_h2 = tag == "h2"
        if self._in_h2:
            self.h2.append("")

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.h2[-1] += data

    @property
    def images(self) -> list[str]:
        return [v for tag, name, v in self.attrs if tag == "img" and name == "src"]


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def quartiles(values) -> tuple[float, float, float]:
    """q25, median, q75 with linear interpolation, independently of numpy."""
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def assert_self_contained(text: str) -> Page:
    page = Page(text)
    assert not {"script", "link", "iframe", "object", "embed", "base"} & set(page.tags)
    for tag, name, value in page.attrs:
        if name in ("src", "href", "srcset", "action", "poster", "data"):
            assert value.startswith(("data:image/png;base64,", "#")), f"<{tag} {name}={value[:60]!r}> is external"
    assert not re.search(r"https?://", " ".join(v for _, _, v in page.attrs))
    style = text[text.index("<style>") : text.index("</style>")]
    assert "url(" not in style and "@import" not in style
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        img.load()
        assert img.format == "PNG" and img.width > 0 and img.height > 0
    return page


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    written = make_study(root)
    path = write_report(root)
    return root, path, written


def test_report_is_self_contained_with_every_section(study):
    root, path, _ = study
    assert path == root / "report" / "report.html"
    text = path.read_text()
    page = assert_self_contained(text)
    assert page.h2 == list(TITLES.values())
    assert [a for tag, name, a in page.attrs if tag == "section" and name == "id"] == list(TITLES)
    # phase, 4 galleries (one per K), basins, energy, curvature, census, two-model, collapse, landscape
    assert len(page.images) == 12
    alts = [v for tag, name, v in page.attrs if tag == "img" and name == "alt"]
    assert [a for a in alts if a.startswith("gallery")] == [f"gallery of samples at K = {k}" for k in (4, 16, 64, 256)]
    words = " ".join(page.text)
    assert "Most samples are memorized up to K = 16" in words
    assert "Most samples are generalized from K = 256" in words
    assert "The spurious fraction peaks at K = 64 (f_S = 0.450), between the two transitions" in words
    # the study name from study.json, the configuration in a collapsible block, escaped
    assert "Study report: toy-study" in words
    assert "<details>" in text and "<script>" not in text
    assert json.dumps(INJECTION)[1:-1] in words  # the JSON text survives escaping intact
    # N is reported beside every fraction: the phase table has one row per K with N = 64 and two seeds
    for k, f_s in ((4, "0.050 [0.000, 0.130]"), (64, "0.450 [0.370, 0.530]")):
        assert re.search(rf"<tr><td>{k}</td><td>64</td><td>2</td><td>[^<]*</td><td>{re.escape(f_s)}</td>", text)


def test_phase_table_and_summary_match_phase_json(study):
    root, _, _ = study
    rows = read_csv(root / "report" / "phase.csv")
    expected = phase_rows()
    assert [int(r["K"]) for r in rows] == [r["K"] for r in expected]
    for got, want in zip(rows, expected, strict=True):
        assert int(got["n_samples"]) == want["n_samples"] and int(got["n_seeds"]) == 2
        for key in ("f_M", "f_M_low", "f_M_high", "f_S", "f_S_low", "f_S_high", "f_G", "f_G_low", "f_G_high"):
            assert float(got[key]) == pytest.approx(want[key], abs=1e-15)
    summary = json.loads((root / "report" / "summary.json").read_text())
    assert summary["transitions"] == TRANSITIONS and summary["transitions_computed"] is False
    assert summary["sections"] == list(TITLES) and summary["omitted"] == {} and summary["notes"] == []
    assert summary["study"] == "toy-study" and summary["ks"] == [4, 16, 64, 256]
    assert len(summary["jobs"]) == 8 and summary["jobs"][0] == {"name": "k-0004-seed-0", "K": 4, "seed": 0}
    for name in summary["tables"] + summary["figures"] + ["report.html"]:
        assert (root / "report" / name).stat().st_size > 0
    assert set(summary["tables"]) == {
        "phase.csv",
        "transitions.csv",  # A, B and the spurious peak interpolated in log K (the capacity work)
        "basins_by_class.csv",
        "energy_by_class.csv",
        "curvature_by_class.csv",
        "collapse_by_class.csv",
        "census_by_job.csv",
        "two_model.csv",
    }


@pytest.mark.parametrize(
    "table, source, column",
    [
        ("basins_by_class.csv", "basins.csv", "sigma_c"),
        ("basins_by_class.csv", "basins.csv", "radius"),
        ("energy_by_class.csv", "energy.csv", "energy_straight"),
        ("energy_by_class.csv", "energy.csv", "discrepancy"),
        ("curvature_by_class.csv", "curvature.csv", "lambda_min"),
        ("curvature_by_class.csv", "curvature.csv", "lambda_max"),
        ("collapse_by_class.csv", "collapse.csv", "sigma_nearest"),
    ],
)
def test_class_tables_pool_seeds_per_k_and_class(study, table, source, column):
    root, _, written = study
    rows = read_csv(root / "report" / table)
    groups = written[source]
    assert {(int(r["K"]), r["class"]) for r in rows} == set(groups)
    for r in rows:
        values = [float(p[column]) for p in groups[(int(r["K"]), r["class"])]]
        q25, q50, q75 = quartiles(values)
        assert int(r[f"{column}_n"]) == len(values) == (8 if source == "collapse.csv" else 6)
        assert int(r["n_jobs"]) == 2
        assert float(r[f"{column}_median"]) == pytest.approx(q50, rel=1e-12)
        assert float(r[f"{column}_q25"]) == pytest.approx(q25, rel=1e-12)
        assert float(r[f"{column}_q75"]) == pytest.approx(q75, rel=1e-12)
    classes = {r["class"] for r in rows}
    assert classes == (set(POINT_CLASSES) if source != "collapse.csv" else set(POINT_CLASSES[:3]))


def test_basin_status_counts(study):
    root, _, written = study
    for r in read_csv(root / "report" / "basins_by_class.csv"):
        points = written["basins.csv"][(int(r["K"]), r["class"])]
        assert int(r["n_no_basin"]) == sum(p["status"] == "no_basin" for p in points)
        assert int(r["n_censored"]) == sum(p["status"] == "censored" for p in points)
    # the fixture gives every generalized sample with index 0 no basin: one per job, two jobs per K
    for r in read_csv(root / "report" / "basins_by_class.csv"):
        assert int(r["n_no_basin"]) == (2 if r["class"] == "generalized" else 0)


def test_census_and_two_model_tables(study):
    root, _, written = study
    census = read_csv(root / "report" / "census_by_job.csv")
    assert len(census) == 8
    for got, want in zip(census, written["census"], strict=True):
        assert (int(got["K"]), int(got["seed"])) == (want["K"], want["seed"])
        assert [int(got[f"n_{k}"]) for k in ("memory", "spurious", "saddle")] == [
            want["memory"],
            want["spurious"],
            want["saddle"],
        ]
        assert float(got["share_spurious"]) == 0.2
    two = read_csv(root / "report" / "two_model.csv")
    assert [(int(r["K"]), float(r["agreement"])) for r in two] == [
        (r["K"], r["agreement"]) for r in written["two_model"]
    ]


def test_report_is_rewritten_in_place(study, tmp_path):
    root = tmp_path / "again"
    make_study(root, parts=("study",))
    first = write_report(root).read_bytes()
    assert write_report(root).read_bytes() == first  # deterministic: no random jitter, no timestamps
    assert sorted(p.name for p in (root / "report").iterdir() if p.name.startswith(".")) == []


def test_transitions_are_computed_when_phase_json_has_none(tmp_path):
    make_study(tmp_path, parts=(), transitions=False)
    path = write_report(tmp_path)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["transitions"] == transition_points(phase_rows()) == TRANSITIONS
    assert summary["transitions_computed"] is True
    assert "computed from the rows" in path.read_text()


def test_only_phase_json_gives_the_phase_section_and_notes(tmp_path):
    (tmp_path / "phase.json").write_text(json.dumps({"metric": "lpips", "rows": phase_rows()}))
    path = write_report(tmp_path)
    text = path.read_text()
    page = assert_self_contained(text)
    assert page.h2 == ["Phase diagram"] and len(page.images) == 1
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["sections"] == ["phase"] and list(summary["omitted"]) == list(TITLES)[1:]
    assert (
        summary["tables"] == ["phase.csv", "transitions.csv"]
        and summary["jobs"] == []
        and summary["study"] == tmp_path.name
    )
    words = " ".join(page.text)
    for key, title in TITLES.items():
        if key != "phase":
            assert f"{title} omitted: " in words
    assert "No study.json" in words and "lpips" in words
    assert "analyses.basins.enabled" in words and "diffmem landscape --out DIR" in words


def test_unreadable_optional_files_are_named_and_skipped(tmp_path):
    make_study(tmp_path, parts=("galleries", "basins", "two_model"))
    jobs = tmp_path / "jobs"
    bad_basins = jobs / "k-0004-seed-0" / "analysis" / "basins.csv"
    bad_basins.write_text("class,index,radius\nmemorized,0,1.0\n")
    bad_png = jobs / "k-0016-seed-1" / "analysis" / "gallery.png"
    bad_png.write_bytes(b"not a png")
    bad_job = jobs / "k-0064-seed-0" / "analysis" / "classification.json"
    bad_job.write_text("[1, 2]")
    (jobs / "k-0999-seed-0" / "analysis").mkdir(parents=True)
    (tmp_path / "two_model.json").write_text("{broken")
    path = write_report(tmp_path)
    page = assert_self_contained(path.read_text())
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    notes = "\n".join(summary["notes"])
    assert f"{bad_basins} skipped: it lacks the columns ['sigma_c']" in notes
    assert f"{bad_png} skipped: not a PNG image" in notes
    assert f"{bad_job} skipped: expected a JSON object" in notes
    assert "job k-0999-seed-0 left out" in notes
    assert f"{tmp_path / 'two_model.json'} skipped: not valid JSON" in notes
    assert [j["name"] for j in summary["jobs"]] == [
        "k-0004-seed-0",
        "k-0004-seed-1",
        "k-0016-seed-0",
        "k-0016-seed-1",
        "k-0064-seed-1",
        "k-0256-seed-0",
        "k-0256-seed-1",
    ]
    assert summary["sections"] == ["phase", "galleries", "basins"] and "two_model" in summary["omitted"]
    basins = {(int(r["K"]), r["class"]): r for r in read_csv(tmp_path / "report" / "basins_by_class.csv")}
    assert int(basins[(4, "memorized")]["sigma_c_n"]) == 3 and int(basins[(4, "memorized")]["n_jobs"]) == 1
    assert int(basins[(64, "memorized")]["sigma_c_n"]) == 3 and int(basins[(16, "memorized")]["sigma_c_n"]) == 6
    assert "bad.png" not in " ".join(page.text) and len(page.images) == 1 + 4 + 1


def test_missing_phase_json_says_which_command_writes_it(tmp_path):
    with pytest.raises(ValueError, match=r"phase\.json is missing.*`diffmem sweep CONFIG --out .*`"):
        write_report(tmp_path)
    with pytest.raises(ValueError, match="study directory not found"):
        write_report(tmp_path / "nope")


def _row(**change):
    return [{**phase_rows()[0], **change}, phase_rows()[1]]


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"rows": []}), "holds no per-K rows"),
        (json.dumps([1, 2]), "holds no per-K rows"),
        (
            json.dumps({"rows": [phase_rows()[0], {"K": 8, "n_samples": 4, "f_M": 1, "f_G": 0}]}),
            r"rows\[1\] lacks \['f_S'\]",
        ),
        (json.dumps({"rows": _row(f_M=float("nan"))}), r"rows\[0\]\.f_M must be a fraction in \[0, 1\], got nan"),
        (json.dumps({"rows": _row(f_G_high=1.5)}), r"rows\[0\]\.f_G_high must be a fraction"),
        (json.dumps({"rows": _row(K="8")}), r"rows\[0\]\.K must be a positive integer, got '8'"),
        (json.dumps({"rows": _row(n_samples=0)}), r"rows\[0\]\.n_samples must be a positive integer"),
        (json.dumps({"rows": _row(K=16)}), r"K values repeat \(\[16, 16\]\)"),
        (json.dumps({"rows": phase_rows(), "transitions": [16]}), "'transitions' must be an object"),
        (json.dumps({"rows": phase_rows(), "transitions": {"spurious_peak_K": 6.5}}), "must be an integer K or null"),
        (json.dumps({"rows": [{"K": 2, "sigma": 0.5, "n_memory": 2}]}), r"rows\[0\] lacks"),  # census-sweep's file
    ],
)
def test_malformed_phase_json_is_refused(tmp_path, content, match):
    (tmp_path / "phase.json").write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        load_phase(tmp_path)
    assert "diffmem sweep CONFIG --out" in str(info.value)
    with pytest.raises(ValueError, match=match):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_gallery_subset_keeps_the_ends_and_the_transitions():
    ks = [2**i for i in range(12)]
    transitions = {"last_memorizing_K": 16, "spurious_peak_K": 64, "first_generalizing_K": 512}
    chosen = _gallery_ks(ks, transitions)
    assert len(chosen) == 6 and chosen == sorted(chosen)
    assert {1, 2048, 16, 64, 512} <= set(chosen)
    assert _gallery_ks([4, 8], transitions) == [4, 8]
    assert _gallery_ks(ks, {}) == [1, 4, 16, 128, 512, 2048]  # ends, then an even spread


def test_transitions_in_words_handle_missing_points():
    rows = phase_rows()
    text = transitions_text(
        {"last_memorizing_K": None, "first_generalizing_K": 256, "spurious_peak_K": 64, "spurious_peak_fraction": 0.45},
        rows,
    )
    assert "At no K are most samples memorized." in text
    assert "from K = 256 on" in text and "peaks at K = 64 (f_S = 0.450)." in text
    text = transitions_text({"last_memorizing_K": 16, "first_generalizing_K": None, "spurious_peak_K": None}, rows)
    assert "At no K are most samples generalized." in text and "No sample is spurious at any K." in text


def fractions(*per_k):
    """Phase rows from (K, (f_M, low, high), (f_S, low, high), (f_G, low, high)) per K."""
    rows = []
    for k, *fs in per_k:
        row = {"K": k, "n_samples": 64}
        for name, (f, low, high) in zip(("f_M", "f_S", "f_G"), fs, strict=True):
            row.update({name: f, f"{name}_low": low, f"{name}_high": high})
        rows.append(row)
    return rows


def test_two_k_values_with_overlapping_intervals_claim_no_peak(tmp_path):
    rows = fractions(
        (4, (0.5, 0.4, 0.6), (0.3, 0.2, 0.4), (0.2, 0.1, 0.3)),
        (8, (0.4, 0.3, 0.5), (0.35, 0.25, 0.45), (0.25, 0.15, 0.35)),
    )
    transitions = transition_points(rows)
    assert transitions["spurious_peak_K"] == 8  # the point estimate names a peak...
    (tmp_path / "phase.json").write_text(json.dumps({"metric": "l2", "rows": rows, "transitions": transitions}))
    words = " ".join(Page(write_report(tmp_path).read_text()).text)
    assert "peaks at" not in words  # ...the report does not announce it
    assert "With 2 values of K no peak of the spurious fraction is claimed (it needs 3)." in words
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["transitions_resolved"]["spurious_peak_K"] is False
    assert summary["transitions"]["spurious_peak_K"] == 8  # phase.json's point estimate is kept as it is
    assert resolved_transitions(rows, transitions)["spurious_peak_K"] is None  # so no figure marks it


@pytest.mark.parametrize(
    "s_low_peak, s_high_ends, resolved",
    [(0.41, 0.4, True), (0.39, 0.4, False)],  # the peak's lower bound against the ends' upper bounds
)
def test_a_peak_is_announced_only_when_its_interval_clears_both_ends(s_low_peak, s_high_ends, resolved):
    rows = fractions(
        (4, (0.9, 0.8, 0.95), (0.05, 0.0, s_high_ends), (0.05, 0.0, 0.1)),
        (16, (0.3, 0.2, 0.4), (0.5, s_low_peak, 0.6), (0.2, 0.1, 0.3)),
        (64, (0.1, 0.0, 0.2), (0.1, 0.0, 0.2), (0.8, 0.7, 0.9)),
    )
    claims = transition_claims(rows, transition_points(rows))
    assert claims["spurious_peak_K"].resolved is resolved and claims["spurious_peak_K"].k == 16
    text = transitions_text(transition_points(rows), rows)
    if resolved:
        assert "The spurious fraction peaks at K = 16 (f_S = 0.500), between the two transitions." in text
    else:
        assert "peaks at" not in text
        assert (
            "f_S is largest at K = 16 (f_S = 0.500), but its 95% interval [0.39, 0.60] does not lie above those at both"
            in text
        )
        assert "the data do not resolve a peak" in text
    # a maximum at an end of the sweep is no peak, whatever the intervals
    end = fractions(
        *[(k, (0.5, 0.3, 0.7), (s, s - 0.01, s + 0.01), (0.1, 0.0, 0.2)) for k, s in ((4, 0.1), (8, 0.2), (16, 0.3))]
    )
    assert "an end of the sweep: no peak inside it" in transitions_text(transition_points(end), end)


def test_a_transition_whose_intervals_include_one_half_is_not_announced():
    rows = fractions(
        (4, (0.56, 0.45, 0.66), (0.2, 0.1, 0.3), (0.24, 0.15, 0.33)),
        (16, (0.3, 0.2, 0.4), (0.2, 0.1, 0.3), (0.5, 0.4, 0.6)),
        (64, (0.1, 0.0, 0.2), (0.1, 0.0, 0.2), (0.8, 0.7, 0.9)),
    )
    t = transition_points(rows)
    assert (t["last_memorizing_K"], t["first_generalizing_K"]) == (4, 64)
    claims = transition_claims(rows, t)
    assert claims["last_memorizing_K"].resolved is False
    assert (
        "f_M exceeds 1/2 up to K = 4 as a point estimate, but its 95% interval at K = 4, [0.45, 0.66], reaches 1/2"
        in claims["last_memorizing_K"].sentence
    )
    assert "do not resolve where memorization ends" in claims["last_memorizing_K"].sentence
    # f_G at K = 64 lies above 1/2 but at K = 16 its interval [0.4, 0.6] includes 1/2: the onset is not resolved
    assert claims["first_generalizing_K"].resolved is False
    assert claims["first_generalizing_K"].sentence == (
        "f_G exceeds 1/2 from K = 64 as a point estimate, but its 95% interval at K = 16, [0.40, 0.60], reaches "
        "1/2: the data do not resolve where generalization begins."
    )
    assert "Most samples are" not in transitions_text(t, rows)
    resolved = resolved_transitions(rows, t)
    assert resolved["last_memorizing_K"] is None and resolved["first_generalizing_K"] is None
    without = [{k: v for k, v in r.items() if not k.endswith(("_low", "_high"))} for r in rows]
    assert "phase.json gives no intervals" in transitions_text(t, without)


def test_the_transitions_paragraph_appears_once(study):
    _, path, _ = study
    text = path.read_text()
    for sentence in ("Most samples are memorized up to K = 16", "The spurious fraction peaks at K = 64"):
        assert text.count(sentence) == 1, sentence
    assert text.count("class='transitions'") == 1


def caption(text: str, key: str) -> str:
    """The first figure caption of section `key`, as text."""
    body = text[text.index(f'<section id="{key}">') :]
    body = body[: body.index("</section>")]
    return " ".join(Page(body[body.index("<figcaption>") : body.index("</figcaption>")]).text)


def test_anomalies_are_counted_and_explained_in_the_captions(tmp_path):
    written = make_study(tmp_path, parts=("energy", "basins"))
    energy = tmp_path / "jobs" / "k-0064-seed-0" / "analysis" / "energy.csv"
    write_csv(
        energy,
        [
            {"class": "memorized", "index": 0, "energy_straight": -50.0, "energy_arc": 0.0, "discrepancy": 1000.0},
            {"class": "generalized", "index": 0, "energy_straight": 20.0, "energy_arc": 0.0, "discrepancy": 3.0},
            {"class": "generalized", "index": 1, "energy_straight": 2.0, "energy_arc": 0.0, "discrepancy": 0.5},
            {"class": "spurious", "index": 0, "energy_straight": -100.0, "energy_arc": 0.0, "discrepancy": -5.0},
            {"class": "training", "index": 0, "energy_straight": float("nan"), "energy_arc": 0.0, "discrepancy": 1.0},
        ],
    )
    # 1000 nats: large; 3 of |E| = 20: above 10% and 1 nat; 0.5 of 2: under 1 nat; 5 of 100: 5%; nan: diverged
    assert [large_discrepancy(e, d) for e, d in ((-50, 1000), (20, 3), (2, 0.5), (-100, -5))] == [
        True,
        True,
        False,
        False,
    ]
    text = write_report(tmp_path).read_text()
    n_energy = 7 * 12 + 5
    words = caption(text, "energy")
    assert f"Anomaly: 2 of {n_energy} points have a two-path discrepancy above 10 nats, or above 10% of |E|" in words
    assert (
        "(memorized 1, generalized 1; the largest, 1,000.0 nats against E = -50.0 nats, at K = 64, memorized)" in words
    )
    assert "A learned score is not a gradient" in words
    assert f"Anomaly: 1 of {n_energy} points have a non-finite energy or discrepancy (training 1)" in words
    # the fixture gives generalized points 1 and 2 of every job a basin: 16 of the 24 generalized points
    flagged = sum(
        r["status"] != "no_basin" and r["sigma_c"] > 0
        for (_, cls), rows in written["basins.csv"].items()
        if cls == "generalized"
        for r in rows
    )
    assert flagged == 16
    words = caption(text, "basins")
    assert (
        "Anomaly: 16 of 24 generalized and off-manifold points have a finite critical level (generalized 16)." in words
    )
    assert "A basin on a generalized sample means" in words


def test_a_study_without_anomalies_says_so(tmp_path):
    make_study(tmp_path, parts=("energy", "basins"))
    for path in (tmp_path / "jobs").glob("*/analysis/basins.csv"):
        rows = list(csv.DictReader(path.open()))
        for r in rows:
            if r["class"] == "generalized":
                r.update(sigma_c=0.0, status="no_basin")
        write_csv(path, rows)
    text = write_report(tmp_path).read_text()
    assert "No point of 96 has a two-path discrepancy above 10 nats" in caption(text, "energy")
    assert "No generalized or off-manifold point of 24 has a finite critical level." in caption(text, "basins")
    assert "Anomaly" not in text


@pytest.mark.parametrize(
    "part, shown, omitted, reason",
    [
        ("energy", "energy", "curvature", "no job has analysis/curvature.csv (set analyses.curvature.enabled: true)"),
        ("curvature", "curvature", "energy", "no job has analysis/energy.csv (set analyses.energy.enabled: true)"),
    ],
)
def test_energy_and_curvature_are_separate_sections(tmp_path, part, shown, omitted, reason):
    make_study(tmp_path, parts=(part,))
    page = assert_self_contained(write_report(tmp_path).read_text())
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["sections"] == ["phase", shown] and summary["omitted"][omitted] == reason
    assert summary["tables"] == sorted(["phase.csv", "transitions.csv", f"{shown}_by_class.csv"])
    assert summary["figures"] == sorted(["phase.png", f"{shown}.png"])
    assert page.h2 == ["Phase diagram", TITLES[shown]] and len(page.images) == 2
    assert f"{TITLES[omitted]} omitted: {reason}" in " ".join(page.text)


def test_stage_sections_are_an_argument(tmp_path):
    make_study(tmp_path, parts=("two_model",), seeds=(0,))
    seen = {}

    def extra(ctx):
        seen.update(classes=ctx.classes, point_classes=ctx.point_classes, ks=[j.k for j in ctx.jobs])
        ctx.add_table("extra.csv", ["K", "value"], [{"K": j.k, "value": 2 * j.k} for j in ctx.jobs])
        return Section("extra", "Extra <b>stage</b>", "<p>extra body</p>")

    path = write_report(tmp_path, stage_sections=[("extra", "Extra", extra), ("none", "Nothing", lambda ctx: "why")])
    assert seen == {
        "classes": ("memorized", "spurious", "generalized", "off_manifold"),
        "point_classes": ("memorized", "spurious", "generalized", "off_manifold", "training"),
        "ks": [4, 16, 64, 256],
    }
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["sections"] == ["phase", "extra", "two_model"]
    assert list(summary["omitted"]) == ["galleries", "none", "landscape"] and summary["omitted"]["none"] == "why"
    assert read_csv(tmp_path / "report" / "extra.csv") == [{"K": str(k), "value": str(2 * k)} for k in (4, 16, 64, 256)]
    page = assert_self_contained(path.read_text())
    assert page.h2 == ["Phase diagram", "Extra <b>stage</b>", "Two-model test"]  # the title is escaped
    assert "Nothing omitted: why" in " ".join(page.text) and "<p>extra body</p>" in path.read_text()


@pytest.mark.parametrize(
    "stage, match",
    [
        (("basins", "Wrong", lambda ctx: Section("other", "Other", "")), "returned a Section keyed 'other'"),
        (("basins", "Wrong", lambda ctx: None), "returned NoneType"),
        (("landscape", "Twice", lambda ctx: "why"), r"section keys repeat: \['landscape'\]"),
    ],
)
def test_a_stage_section_that_breaks_the_contract_is_refused(tmp_path, stage, match):
    make_study(tmp_path, parts=())
    with pytest.raises(ValueError, match=match):
        build_sections(tmp_path, load_phase(tmp_path), find_jobs(tmp_path), Notes(), [stage])


def test_two_sections_cannot_write_the_same_file(tmp_path):
    make_study(tmp_path, parts=("basins",))
    again = ("again", "Again", STAGE_SECTIONS[0][2])
    with pytest.raises(ValueError, match="two sections write the table basins_by_class.csv"):
        build_sections(tmp_path, load_phase(tmp_path), find_jobs(tmp_path), Notes(), [*STAGE_SECTIONS, again])


def test_stage_sections_come_from_the_registry():
    """Each analysis stage contributes its own section, in the registry's order."""
    assert [key for key, _, _ in STAGE_SECTIONS] == ["basins", "energy", "curvature", "census", "collapse"]
    assert all(TITLES[key] == title for key, title, _ in STAGE_SECTIONS)
    assert all(fn is STAGES[key].report for key, _, fn in STAGE_SECTIONS)


# --- headless Chromium --------------------------------------------------------------------------------------

CONSOLE = re.compile(r'CONSOLE[^\]]*\]\s*"(?P<message>.*)", source: (?P<source>.*) \(\d+\)\s*$')
PROBE = """<script>
window.addEventListener("load", () => {
  let ok = 0;
  for (const img of document.images) {
    if (img.complete && img.naturalWidth > 0) ok++; else console.error("broken image: " + img.alt);
  }
  console.log("probe: " + ok + " of " + document.images.length + " images decoded");
});
</script>"""


def render(page: Path, tmp_path: Path) -> tuple[list[str], np.ndarray]:
    """Load page in headless Chromium; returns the page's console messages and the screenshot (H, W) in grey."""
    shot = tmp_path / f"{page.stem}.png"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / f'profile-{page.stem}'}",
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    messages = [m["message"] for line in proc.stderr.splitlines() if (m := CONSOLE.search(line))]
    with Image.open(shot) as img:
        grey = np.asarray(img.convert("L"), dtype=np.float64)
    return messages, grey


def is_blank(grey: np.ndarray) -> bool:
    return float(grey.var()) < 50.0


def test_blank_check_tells_blank_from_drawn():
    assert is_blank(np.full((200, 100), 255.0))
    drawn = np.full((200, 100), 255.0)
    drawn[20:40, 10:90] = 0.0  # one line of text-sized ink
    assert not is_blank(drawn)


@needs_chromium
def test_chromium_renders_the_report_without_console_messages(study, tmp_path):
    _, path, _ = study
    messages, grey = render(path, tmp_path)
    assert messages == []
    assert grey.shape == (2000, 1280) and not is_blank(grey)
    probe = tmp_path / "probe.html"
    text = path.read_text()
    probe.write_text(text.replace("</body>", PROBE + "</body>"))
    messages, _ = render(probe, tmp_path)
    assert messages == ["probe: 12 of 12 images decoded"]


@needs_chromium
def test_chromium_console_detection_catches_errors(tmp_path):
    page = tmp_path / "failing.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img alt="bad" src="data:image/png;base64,AAAA">'
        "<script>throw new Error('deliberate failure')</script>" + PROBE + "</body></html>"
    )
    messages, _ = render(page, tmp_path)
    assert "Uncaught Error: deliberate failure" in messages
    assert "broken image: bad" in messages and "probe: 0 of 1 images decoded" in messages


def test_jobs_directly_under_the_study_directory_are_found(tmp_path):
    make_study(tmp_path, parts=("basins",), seeds=(0,))
    for job in (tmp_path / "jobs").iterdir():
        job.rename(tmp_path / job.name)
    (tmp_path / "jobs").rmdir()
    write_report(tmp_path)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [j["K"] for j in summary["jobs"]] == [4, 16, 64, 256] and "basins" in summary["sections"]
