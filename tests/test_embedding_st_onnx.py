"""sentence-transformers' own ONNX backend loads our embedding export and gives our session's embeddings.

Its ONNX backend runs through Optimum's ORTModelForFeatureExtraction, which installs only with transformers<4.58:
this runs in `make test-compat` and is skipped elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qbert_deploy.runtimes.session import open_session
from qbert_deploy.tasks.embeddings import ONNX_FILE_NAME
from tests.stack import needs_optimum
from tests.tiny import SENTENCES


@needs_optimum
def test_sentence_transformers_onnx_backend_loads_the_export(embedding_export: Path) -> None:
    from sentence_transformers import SentenceTransformer

    theirs_model = SentenceTransformer(str(embedding_export), backend="onnx", device="cpu",
                                       model_kwargs={"file_name": ONNX_FILE_NAME})
    theirs = theirs_model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False)
    tokenizer = theirs_model.tokenizer
    encoded = tokenizer(SENTENCES, padding=True, truncation=True, max_length=theirs_model.max_seq_length,
                        return_tensors="np")
    session = open_session(embedding_export / ONNX_FILE_NAME)
    names = {i.name for i in session.get_inputs()}
    ours = session.run(["sentence_embedding"], {k: np.asarray(v, np.int64) for k, v in encoded.items()
                                                 if k in names})[0]
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
