import subprocess
import sys

import qbert_deploy


def test_public_api_is_what_it_claims() -> None:
    missing = [name for name in qbert_deploy.__all__ if getattr(qbert_deploy, name, None) is None]
    assert missing == [], missing


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import sys, qbert_deploy, qbert_deploy.runtimes.session; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False", "qbert_deploy.runtimes must not pull in torch"
