"""`qbert-export --deploy PROFILE` (issue 18 item 8): a folder whose model.onnx is the fast lowered graph, so that
Optimum's default load, qbert-serve, qbert-validate, --check and the Triton repository all run the served file."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from qbert_deploy.cli.export import main as export_main
from qbert_deploy.cli.validate import main as validate_main
from qbert_deploy.data.tsv import Example, write_tsv
from qbert_deploy.runtimes.export_dir import model_files, recorded_files
from qbert_deploy.runtimes.lowering import LoweringError, lower_in_export
from qbert_deploy.runtimes.serving import ServedModel
from qbert_deploy.runtimes.triton_repo import write_triton_repo
from qbert_deploy.validation.profiles import default_profiles, profile_model
from tests.served import Reference
from tests.stack import needs_optimum
from tests.tiny import SENTENCES, text_batch

pytestmark = pytest.mark.compat  # the Optimum test needs transformers 4.57: `make test-compat` runs this file too


@pytest.fixture(scope="module")
def exports(tiny_model_pt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deploy")
    assert export_main([str(tiny_model_pt), "-o", str(root / "deploy"), "--deploy", "cpu-w8a8"]) == 0
    assert export_main([str(tiny_model_pt), "-o", str(root / "plain"), "--lower", "cpu-w8a8"]) == 0
    return {"deploy": root / "deploy", "plain": root / "plain", "root": root}


def _lowered_for(path: Path) -> str | None:
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props.get("qbert.lowering", "{}")).get("profile")


def test_the_deployment_folder_holds_the_lowered_graph_as_model_onnx(exports: dict[str, Path]) -> None:
    deploy, plain = exports["deploy"], exports["plain"]
    files = model_files(deploy)
    assert (files.deployed, files.canonical.name, files.lowered) == ("cpu-w8a8", "model.canonical.onnx",
                                                                     {"cpu-w8a8": deploy / "model.onnx"})
    assert sorted(p.name for p in deploy.glob("*.onnx")) == ["model.canonical.onnx", "model.onnx"]
    assert _lowered_for(deploy / "model.onnx") == "cpu-w8a8" and _lowered_for(files.canonical) is None
    # the same graphs as a plain export's, under the deployment's names, each recorded
    assert (deploy / "model.onnx").read_bytes() == (plain / "model.cpu-w8a8.onnx").read_bytes()
    assert files.canonical.read_bytes() == (plain / "model.onnx").read_bytes()
    assert sorted(recorded_files(deploy)) == ["model.canonical.onnx", "model.onnx"]
    assert json.loads((deploy / "qbert_recipe.json").read_text())["deployed"] == "cpu-w8a8"


def test_check_verifies_both_files(exports: dict[str, Path], tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "qbert_deploy.cli.export", "--check", str(exports["deploy"])],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok   lowered model.onnx" in done.stdout and "model.onnx is lowered for cpu-w8a8" in done.stdout
    # a swapped pair (the canonical graph where the lowered one should be) is caught
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(exports["deploy"]), str(broken)], check=True)
    (broken / "model.onnx").write_bytes((broken / "model.canonical.onnx").read_bytes())
    done = subprocess.run([sys.executable, "-m", "qbert_deploy.cli.export", "--check", str(broken)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "FAIL file hashes" in done.stdout, done.stdout


def test_serve_runs_model_onnx_as_its_profile_and_the_canonical_on_request(exports: dict[str, Path]) -> None:
    deploy, plain = exports["deploy"], exports["plain"]
    served = ServedModel(deploy)
    assert (served.path.name, served.profile, served.served.lowered_in_memory) == ("model.onnx", "cpu-w8a8", False)
    expected = Reference(plain / "model.cpu-w8a8.onnx", "cpu-w8a8").logits(text_batch())
    np.testing.assert_array_equal(served.run(text_batch()), expected)
    canonical = ServedModel(deploy, profile="canonical")
    assert canonical.path.name == "model.canonical.onnx"
    np.testing.assert_array_equal(canonical.run(text_batch()), Reference(plain / "model.onnx").logits(text_batch()))


def test_validate_runs_the_canonical_and_the_deployed_file(exports: dict[str, Path], tiny_model_pt: Path,
                                                           tmp_path: Path) -> None:
    deploy = exports["deploy"]
    assert default_profiles(deploy, ["cpu"]) == {"cpu": ["canonical", "cpu-w8a8"]}
    assert profile_model(deploy, "canonical", tmp_path) == deploy / "model.canonical.onnx"
    assert profile_model(deploy, "cpu-w8a8", tmp_path) == deploy / "model.onnx"
    write_tsv(tmp_path / "dev.tsv", [Example(s, i % 2) for i, s in enumerate(SENTENCES)])
    assert validate_main([str(deploy), "--checkpoint", str(tiny_model_pt), "--data", str(tmp_path / "dev.tsv"),
                          "--report", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    names = [b["name"] for b in report["backends"]]
    assert any("cpu-w8a8" in name for name in names) and any("canonical" in name for name in names), names


def test_lowering_adds_profiles_beside_it_but_not_the_deployed_one_again(exports: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    folder = tmp_path / "deploy"
    subprocess.run(["cp", "-r", str(exports["deploy"]), str(folder)], check=True)
    path = lower_in_export(folder, "weight-only")
    assert path.name == "model.weight-only.onnx" and "model.weight-only.onnx" in recorded_files(folder)
    assert set(model_files(folder).lowered) == {"cpu-w8a8", "weight-only"}
    with pytest.raises(LoweringError, match="already lowered for cpu-w8a8"):
        lower_in_export(folder, "cpu-w8a8")


def test_the_triton_repository_ships_the_deployed_file(exports: dict[str, Path], tmp_path: Path) -> None:
    repo = write_triton_repo(exports["deploy"], tmp_path / "repo")
    assert (repo.source.name, repo.profile, repo.lowered) == ("model.onnx", "cpu-w8a8", False)
    assert repo.model.read_bytes() == (exports["deploy"] / "model.onnx").read_bytes()


def test_a_bad_deploy_profile_is_one_line(tiny_model_pt: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "qbert_deploy.cli.export", str(tiny_model_pt), "-o",
                           str(tmp_path / "x"), "--deploy", "cpu-w8a8,weight-only"], capture_output=True, text=True)
    assert done.returncode == 2 and "--deploy takes one profile" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()


@needs_optimum
def test_optimum_loads_the_fast_file_by_default(exports: dict[str, Path]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from optimum.onnxruntime import ORTModelForSequenceClassification

        model = ORTModelForSequenceClassification.from_pretrained(exports["deploy"])
    assert Path(model.path).name == "model.onnx" and _lowered_for(Path(model.path)) == "cpu-w8a8"
    import torch

    batch = text_batch()
    logits = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    expected = Reference(exports["plain"] / "model.cpu-w8a8.onnx", "cpu-w8a8").logits(batch)
    assert np.abs(logits - expected).max() <= 1e-4
