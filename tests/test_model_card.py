import copy
import json
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from vidiffuse.errors import ConfigError
from vidiffuse.govern.card import NOT_MEASURED, RMF_FUNCTIONS, write_model_card

EVAL_REPORT = ROOT / "benchmarks" / "results" / "eval-shapes" / "report.json"


def bias_report():
    def attribute(significant, p, over, under):
        return {"n_videos": 48, "unreadable": 2, "n": 46, "observed": {}, "unexpected": {},
                "observed_proportions": {}, "expected_proportions": {}, "expected_counts": {}, "bins": None,
                "chi2": 31.5, "dof": 2, "p_value": p, "reliable": True, "alpha": 0.01, "significant": significant,
                "most_over": {"value": over, "observed": 0.61, "expected": 0.33, "difference": 0.28, "residual": 3.3},
                "most_under": {"value": under, "observed": 0.09, "expected": 0.33, "difference": -0.24,
                               "residual": -2.8}}

    return {"kind": "vidiffuse-bias-audit", "version": 1, "model": "shapes", "n_per_attribute": 48,
            "classifier": "analyzer", "expected_source": {"source": "training captions"},
            "test": "chi-square goodness of fit", "alpha": 0.05, "correction": "bonferroni", "n_tests": 2,
            "alpha_corrected": 0.025, "flagged": ["shape"],
            "attributes": {"shape": attribute(True, 1.4e-7, "square", "triangle"),
                           "size": attribute(False, 0.4242, "small", "large")}}


def memorization_report():
    # the shape `vidiffuse.govern.memorization.memorization_report` writes
    return {"metric": "embedding_cosine", "metric_definition": "cosine similarity of video embeddings",
            "threshold": 0.97, "threshold_note": "4.4% of independent shapes-world clips score above it",
            "n_generated": 64, "n_training": 20000, "n_flagged": 1, "flag_rate": 1 / 64,
            "nearest_similarity": {"max": 0.9812, "median": 0.91, "min": 0.8},
            "flagged": [{"generated": "0003.mp4", "training": "001234.mp4", "similarity": 0.9812}],
            "nearest": [{"generated": f"{i:04d}.mp4", "neighbours": []} for i in range(64)]}


def watermark_result():
    # the shape benchmarks/watermark.py writes to benchmarks/results/watermark.json
    def attack(detection, bits, gray_detection):
        return {"n": 40, "bit_accuracy": bits, "payload_bit_accuracy": bits, "detection_rate": detection,
                "correct_payload_rate": detection, "median_p_value": 1e-13,
                "by_background": {"black": {"n": 20, "bit_accuracy": bits, "detection_rate": detection},
                                  "gray": {"n": 20, "bit_accuracy": bits, "detection_rate": gray_detection}}}

    return {"model": "shapes", "n": 40, "threshold_p_value": 1e-06, "method": "vidiffuse-spread-spectrum-v1",
            "strength": 2.0, "bits": {"payload": 32, "check": 48}, "psnr_db": {"mean": 40.25, "min": 38.75},
            "seconds": {"generate_per_video": 15.0, "embed_per_video": 0.04, "detect_per_video": 0.04},
            "embed_overhead": 0.0125,
            "attacks": {"none (H.264 CRF 23)": attack(0.975, 0.9975, 0.95),
                        "downscale to half": attack(0.625, 0.9404, 0.5),
                        "brightness +10%": attack(0.55, 0.8438, 0.45)},
            "unmarked": {"generated, marking off": {"n": 40, "false_positives": 0, "min_p_value": 0.01},
                         "real shapes-world clips": {"n": 30, "false_positives": 1, "min_p_value": 1e-7}}}


def test_card_carries_the_measured_numbers_of_the_given_reports(tmp_path):
    report = json.loads(EVAL_REPORT.read_text())
    m = report["metrics"]
    paths = write_model_card("shapes", tmp_path, eval_report=EVAL_REPORT, bias=bias_report(),
                             memorization=memorization_report())
    card = paths["card"].read_text()
    for key in ("adherence_background", "adherence_color", "adherence_shape", "adherence_size",
                "adherence_direction", "adherence_mean"):
        assert f"{m[key]:.3f}" in card, key
    assert f"{m['fvd_shapes']:.1f}" in card and f"{report['fvd_shapes_ci95'][0]:.1f}" in card
    assert f"{m['seconds_per_video']:.2f} s/video" in card
    # limitations are derived: each attribute below its target in this report is named, the others are not
    from vidiffuse.govern.card import ADHERENCE_TARGETS

    below = {a for a, target in ADHERENCE_TARGETS.items() if m[f"adherence_{a}"] < target}
    assert below  # this report has some (direction 0.81 < 0.90)
    for attribute, target in ADHERENCE_TARGETS.items():
        line = f"Prompt adherence for {attribute} is {m[f'adherence_{attribute}']:.3f}, below the target {target:.2f}"
        assert (line in card) == (attribute in below), attribute
    assert "Prompt adherence for background" not in card  # 0.992 meets its 0.95 target
    # bias and memorization findings
    assert "| shape | 46 | 2 | 31.5 | 2 | 1.40e-07 | FLAGGED | square (0.61 vs 0.33)" in card
    assert "When a prompt leaves shape unsaid" in card and "When a prompt leaves size unsaid" not in card
    assert "1 of 64 generated videos were flagged as near copies of one of 20000 training clips" in card
    assert "| 0003.mp4 | 001234.mp4 | 0.9812 |" in card and "max 0.9812, median 0.9100" in card
    assert "4.4% of independent shapes-world clips" in card  # the base rate travels with the finding
    # model facts come from the directory: 12.6M transformer parameters, counted from the safetensors header
    assert "VideoDiT, 12,597,888 parameters" in card
    recorded = json.loads((ROOT / "src/vidiffuse/weights/shapes/model_index.json").read_text()).get(
        "training_data_manifest_sha256")
    assert (recorded or "not recorded in model_index.json") in card
    risk = json.loads(paths["risk_report"].read_text())
    assert risk["measured"] == {"eval": True, "memorization": True, "bias": True, "watermark": False,
                                "training_data_manifest": recorded is not None}
    assert risk["inputs"]["eval"]["path"] == str(EVAL_REPORT) and len(risk["inputs"]["eval"]["sha256"]) == 64


def test_missing_inputs_are_said_to_be_not_measured(tmp_path):
    paths = write_model_card("shapes", tmp_path)
    card = paths["card"].read_text()
    for section in ("Evaluation", "Memorization", "Bias audit", "Watermark robustness"):
        assert f"{section}: {NOT_MEASURED}" in card
    assert "adherence_mean" not in card and "FVD" not in card.split("## Risks")[0]
    risk = json.loads(paths["risk_report"].read_text())
    assert {k: v for k, v in risk["measured"].items() if k != "training_data_manifest"} == {
        "eval": False, "memorization": False, "bias": False, "watermark": False}
    evidence = {r["risk"]: r["evidence"] for r in risk["nist_ai_rmf"]}
    assert evidence["Generated videos passed off as real footage"] == f"watermark robustness {NOT_MEASURED}"
    assert "| detection rate |" not in card and "watermark" not in " ".join(risk["limitations"])
    assert evidence["Reproducing training clips (memorization)"] == f"memorization {NOT_MEASURED}"
    assert NOT_MEASURED in evidence["Skewed defaults for attributes the prompt leaves unsaid (bias, homogenization)"]


def test_risk_report_covers_all_rmf_functions_and_the_600_1_risks(tmp_path):
    risk = json.loads(write_model_card("shapes", tmp_path, eval_report=EVAL_REPORT)["risk_report"].read_text())
    assert set(risk["nist_ai_rmf_functions"]) == set(RMF_FUNCTIONS)
    assert all(risk["nist_ai_rmf_functions"][f] for f in RMF_FUNCTIONS)  # at least one risk under each
    assert all(r["action"] and r["evidence"] for r in risk["nist_ai_rmf"])
    gai = {r["risk"]: r for r in risk["nist_ai_600_1"]}
    assert len(gai) == 12
    assert {"Information Integrity", "Intellectual Property", "Harmful Bias and Homogenization", "Data Privacy",
            "Confabulation", "Environmental Impacts"} <= set(gai)
    assert all(r["why"] for r in gai.values())
    # trained on procedural shapes only: privacy does not apply, confabulation does (adherence is measured)
    assert gai["Data Privacy"]["applies"] == "no" and gai["Confabulation"]["applies"] == "yes"
    adherence = json.loads(EVAL_REPORT.read_text())["metrics"]["adherence_mean"]
    assert f"adherence_mean {adherence:.3f}" in gai["Confabulation"]["evidence"]


def test_card_shows_the_watermark_benchmark_numbers(tmp_path):
    paths = write_model_card("shapes", tmp_path, watermark=watermark_result())
    card = paths["card"].read_text()
    section = card.split("## Provenance marking")[1].split("\n## ")[0]
    # the code's facts: marking on by default, opting out recorded in the signed manifest, verify checks both
    assert "on by default" in section and "`--no-watermark`" in section and "`vidiffuse verify FILE`" in section
    assert "40.2 dB mean, 38.8 dB min" in section and "1.2% to generation time" in section
    assert "| downscale to half | 40 | 0.625 | 0.940 |" in section
    assert "| brightness +10% | 40 | 0.550 | 0.844 |" in section
    assert "| real shapes-world clips | 30 | 1 |" in section and "| generated, marking off | 40 | 0 |" in section
    assert NOT_MEASURED not in section
    risk = json.loads(paths["risk_report"].read_text())
    assert risk["measured"]["watermark"] is True
    # the weakest edits (detection below 0.9) are limitations, weakest first; the strong one is not
    marks = [x for x in risk["limitations"] if x.startswith("The watermark is detected")]
    assert len(marks) == 2 and "'brightness +10%'" in marks[0] and "'downscale to half'" in marks[1]
    assert "0.550 of 40 marked videos" in marks[0] and "lowest on gray backgrounds, 0.450)" in marks[0]
    assert not any("H.264 CRF 23" in x for x in risk["limitations"])
    assert "reported 1 of 30 unmarked videos (real shapes-world clips) as marked" in " ".join(risk["limitations"])
    evidence = {r["risk"]: r["evidence"] for r in risk["nist_ai_rmf"]}["Generated videos passed off as real footage"]
    assert evidence == ("watermark detected (p ≤ 1e-06) in 0.550–0.975 of 40 marked videos across 3 edits "
                        "(weakest: brightness +10%, 0.550); 1 of 70 unmarked videos falsely detected; PSNR 40.2 dB")
    integrity = {r["risk"]: r for r in risk["nist_ai_600_1"]}["Information Integrity"]
    assert evidence in integrity["evidence"] and "signed C2PA manifest" in integrity["evidence"]


def test_a_data_manifest_is_checked_against_the_models_hash(tmp_path, tiny_bundle):
    import hashlib
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_bundle, model)
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"files": []}')
    index = json.loads((model / "model_index.json").read_text())
    index["training_data_manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    (model / "model_index.json").write_text(json.dumps(index))
    card = write_model_card(model, tmp_path / "a", data_manifest=manifest)["card"].read_text()
    assert index["training_data_manifest_sha256"] in card and "matches the model's" in card
    manifest.write_text('{"files": ["changed"]}')
    card = write_model_card(model, tmp_path / "b", data_manifest=manifest)["card"].read_text()
    assert "does NOT match the model's" in card
    # no training record and not the shapes world: content risks are not claimed away
    risk = json.loads((tmp_path / "b" / "risk_report.json").read_text())
    assert {r["risk"]: r["applies"] for r in risk["nist_ai_600_1"]}["Data Privacy"] == "yes"
    assert "Training record: not measured" in card


def test_malformed_inputs_are_rejected(tmp_path):
    bad = copy.deepcopy(memorization_report())
    del bad["threshold"]
    with pytest.raises(ConfigError, match="missing threshold"):
        write_model_card("shapes", tmp_path, memorization=bad)
    with pytest.raises(ConfigError, match="not a vidiffuse bias report"):
        write_model_card("shapes", tmp_path, bias={"attributes": {}})
    with pytest.raises(ConfigError, match="no 'metrics'"):
        write_model_card("shapes", tmp_path, eval_report={"n": 3})
    no_psnr = {k: v for k, v in watermark_result().items() if k != "psnr_db"}
    with pytest.raises(ConfigError, match="not a watermark benchmark result .missing psnr_db"):
        write_model_card("shapes", tmp_path, watermark=no_psnr)
    bad_rate = watermark_result()
    bad_rate["attacks"]["downscale to half"]["detection_rate"] = 62.5  # a percentage where a rate belongs
    with pytest.raises(ConfigError, match="attack 'downscale to half' needs"):
        write_model_card("shapes", tmp_path, watermark=bad_rate)
    assert not (tmp_path / "MODEL_CARD.md").exists()


def test_cli_rejects_malformed_json_in_one_line(tmp_path, monkeypatch, capsys):
    """In-process through the real entry point (`main`), which turns errors into one `error:` line."""
    from vidiffuse import cli

    broken = tmp_path / "broken.json"
    broken.write_text('{"metric": "phash", ')
    monkeypatch.setattr("sys.argv", ["vidiffuse", "govern", "card", "--model", "shapes", "--eval", str(EVAL_REPORT),
                                     "--memorization", str(broken), "--out", str(tmp_path / "card")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    stderr = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and "Traceback" not in stderr and len(stderr.splitlines()) == 1
    assert stderr.startswith("error: memorization report") and "is not valid JSON" in stderr
    assert not (tmp_path / "card").exists()


def test_cli_rejects_a_malformed_watermark_result_in_one_line(tmp_path, monkeypatch, capsys):
    from vidiffuse import cli

    result = watermark_result()
    result["unmarked"]["real shapes-world clips"]["false_positives"] = 31  # more than the 30 clips
    bad = tmp_path / "watermark.json"
    bad.write_text(json.dumps(result))
    monkeypatch.setattr("sys.argv", ["vidiffuse", "govern", "card", "--model", "shapes", "--watermark", str(bad),
                                     "--out", str(tmp_path / "card")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    stderr = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and "Traceback" not in stderr and len(stderr.splitlines()) == 1
    assert stderr == (f"error: {bad}: unmarked set 'real shapes-world clips' needs counts 'n' and "
                      "'false_positives' (at most n)")
    assert not (tmp_path / "card").exists()


def test_cli_writes_the_card(tmp_path):
    bias_file = tmp_path / "bias.json"
    bias_file.write_text(json.dumps(bias_report()))
    watermark_file = tmp_path / "watermark.json"
    watermark_file.write_text(json.dumps(watermark_result()))
    r = run_cli("govern", "card", "--model", "shapes", "--eval", EVAL_REPORT, "--bias", bias_file,
                "--watermark", watermark_file, "--out", tmp_path / "card")
    assert r.returncode == 0, r.stderr
    card = Path(tmp_path / "card" / "MODEL_CARD.md").read_text()
    assert "FLAGGED" in card and f"Memorization: {NOT_MEASURED}" in card
    assert "| downscale to half | 40 | 0.625 | 0.940 |" in card and str(watermark_file) in card
    assert (tmp_path / "card" / "risk_report.json").is_file()


def test_html_rendering_is_well_formed_and_carries_the_tables(tmp_path):
    from html.parser import HTMLParser

    paths = write_model_card("shapes", tmp_path, eval_report=EVAL_REPORT, bias=bias_report())
    page = paths["html"].read_text()

    class Balance(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack, self.counts = [], {}

        def handle_starttag(self, tag, attrs):
            self.counts[tag] = self.counts.get(tag, 0) + 1
            if tag != "meta":
                self.stack.append(tag)

        def handle_endtag(self, tag):
            assert self.stack and self.stack.pop() == tag, (tag, self.stack[-5:])

    parser = Balance()
    parser.feed(page)
    assert parser.stack == []
    markdown = paths["card"].read_text()
    assert parser.counts["table"] == markdown.count("\n|---|") and parser.counts["h2"] == markdown.count("\n## ")
    m = json.loads(EVAL_REPORT.read_text())["metrics"]
    assert f"<td>{m['adherence_shape']:.3f}</td>" in page and "<td>FLAGGED</td>" in page
